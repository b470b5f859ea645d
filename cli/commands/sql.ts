import { defineCommand } from 'citty'
import { Kysely, type CompiledQuery, type DatabaseConnection, type Driver, type QueryResult } from 'kysely'
import { databaseNamed, DATABASE_NAMES, DATABASES_IN_WORDS, type DatabaseSupport } from '../../dialects/registry.js'
import { schemaMigrations } from '../../migrations/index.js'
import { checkTableName, DEFAULT_TABLE } from '../../src/table.js'
import { CliError } from '../errors.js'

export const sqlCommand = defineCommand({
  meta: { name: 'sql', description: 'Print the DDL of the idempotency table without connecting (for Prisma, Flyway, Atlas…)' },
  args: {
    dialect: { type: 'string', description: `Database to write the DDL for: ${DATABASES_IN_WORDS}`, valueHint: 'name' },
    table: { type: 'string', description: 'Name of the idempotency table', default: DEFAULT_TABLE, valueHint: 'name' },
    debug: { type: 'boolean', description: 'Show the stack trace of an error', default: false },
  },
  async run({ args }) {
    const chosen = databaseNamed(args.dialect ?? '')
    if (!chosen) {
      const got = args.dialect === undefined ? '' : `, got "${args.dialect}"`
      throw new CliError(`Choose the database with --dialect ${DATABASE_NAMES.join('|')}${got}.`)
    }
    for (const [migration, statements] of await ddl(chosen, checkTableName(args.table))) {
      console.log(`-- ${migration}`)
      for (const statement of statements) console.log(`${statement};`)
    }
  },
})

/** The statements each migration runs, compiled for one database by a Kysely that never connects. */
async function ddl(chosen: DatabaseSupport, table: string): Promise<Array<[string, string[]]>> {
  let statements: string[] = []
  const connection: DatabaseConnection = {
    async executeQuery<R>(query: CompiledQuery): Promise<QueryResult<R>> {
      statements.push(query.sql)
      return { rows: [] }
    },
    streamQuery: () => {
      throw new Error('Printing DDL does not stream.')
    },
  }
  const driver: Driver = {
    init: async () => {},
    acquireConnection: async () => connection,
    beginTransaction: async () => {},
    commitTransaction: async () => {},
    rollbackTransaction: async () => {},
    releaseConnection: async () => {},
    destroy: async () => {},
  }
  const db = new Kysely<unknown>({
    dialect: {
      createAdapter: () => new chosen.kysely.adapter(),
      createDriver: () => driver,
      createIntrospector: (db) => new chosen.kysely.introspector(db),
      createQueryCompiler: () => new chosen.kysely.compiler(),
    },
  })
  const migrations = await schemaMigrations(table, chosen.dialect, 'print').getMigrations()
  const printed: Array<[string, string[]]> = []
  for (const name of Object.keys(migrations).sort()) {
    statements = []
    await migrations[name]!.up(db)
    printed.push([name, statements])
  }
  return printed
}
