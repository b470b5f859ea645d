import { defineCommand } from 'citty'
import {
  Kysely,
  MysqlAdapter,
  MysqlIntrospector,
  MysqlQueryCompiler,
  PostgresAdapter,
  PostgresIntrospector,
  PostgresQueryCompiler,
  SqliteAdapter,
  SqliteIntrospector,
  SqliteQueryCompiler,
  type CompiledQuery,
  type DatabaseConnection,
  type Driver,
  type QueryResult,
} from 'kysely'
import { mysqlDialect } from '../../dialects/mysql.js'
import { postgresDialect } from '../../dialects/postgres.js'
import { sqliteDialect } from '../../dialects/sqlite.js'
import { schemaMigrations } from '../../migrations/index.js'
import { checkTableName, DEFAULT_TABLE } from '../../src/table.js'
import { CliError } from '../errors.js'

const DIALECTS = {
  postgres: { module: postgresDialect, adapter: PostgresAdapter, compiler: PostgresQueryCompiler, introspector: PostgresIntrospector },
  mysql: { module: mysqlDialect(), adapter: MysqlAdapter, compiler: MysqlQueryCompiler, introspector: MysqlIntrospector },
  sqlite: { module: sqliteDialect, adapter: SqliteAdapter, compiler: SqliteQueryCompiler, introspector: SqliteIntrospector },
}

/** The other names of each database, as in the URL schemes `--url` takes. */
const ALIASES: Readonly<Record<string, keyof typeof DIALECTS>> = { postgresql: 'postgres', mariadb: 'mysql' }

export const sqlCommand = defineCommand({
  meta: { name: 'sql', description: 'Print the DDL of the idempotency table without connecting (for Prisma, Flyway, Atlas…)' },
  args: {
    dialect: { type: 'string', description: 'Database to write the DDL for: postgres (postgresql), mysql (mariadb) or sqlite', valueHint: 'name' },
    table: { type: 'string', description: 'Name of the idempotency table', default: DEFAULT_TABLE, valueHint: 'name' },
    debug: { type: 'boolean', description: 'Show the stack trace of an error', default: false },
  },
  async run({ args }) {
    const name = args.dialect?.toLowerCase() ?? ''
    const key = Object.hasOwn(ALIASES, name) ? ALIASES[name]! : name
    const chosen = Object.hasOwn(DIALECTS, key) ? DIALECTS[key as keyof typeof DIALECTS] : undefined
    if (!chosen) {
      const got = args.dialect === undefined ? '' : `, got "${args.dialect}"`
      throw new CliError(`Choose the database with --dialect postgres|postgresql|mysql|mariadb|sqlite${got}.`)
    }
    for (const [migration, statements] of await ddl(chosen, checkTableName(args.table))) {
      console.log(`-- ${migration}`)
      for (const statement of statements) console.log(`${statement};`)
    }
  },
})

/** The statements each migration runs, compiled for one database by a Kysely that never connects. */
async function ddl(chosen: (typeof DIALECTS)[keyof typeof DIALECTS], table: string): Promise<Array<[string, string[]]>> {
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
      createAdapter: () => new chosen.adapter(),
      createDriver: () => driver,
      createIntrospector: (db) => new chosen.introspector(db),
      createQueryCompiler: () => new chosen.compiler(),
    },
  })
  const migrations = await schemaMigrations(table, chosen.module, 'print').getMigrations()
  const printed: Array<[string, string[]]> = []
  for (const name of Object.keys(migrations).sort()) {
    statements = []
    await migrations[name]!.up(db)
    printed.push([name, statements])
  }
  return printed
}
