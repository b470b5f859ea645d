import { inject, describe, expect, it } from 'vitest'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { sql, type Kysely } from 'kysely'
import { detectDialect } from '../dialects/registry.js'
import { IdempotencySetupError, type IdempotencyDialect } from '../index.js'
import { DialectContractError, dialectChecks, exerciseDialect, type CheckId, type DialectTarget } from '../testing/index.js'
import { ALL_TARGETS, openDatabase, PGLITE_LOCATION, type DatabaseName, type Target } from './support/databases.js'
import { itIf, targetsFor } from './support/harness.js'

const ONE_WRITER = 'SQLite has one writer at a time: a second writer waits for the write lock, so rows are never locked one by one'
const BUSY_TIMEOUT = "SQLite waits for the connection's busy timeout, not for the statement's own wait (SPEC §4.2)"
const NO_SCHEMAS = 'SQLite has no schemas: the library refuses a withSchema instance there (IdempotencySetupError)'
/** Where the kit runs on a withSchema instance: once per database and in-process server; it costs ~15 s a target. */
const SCHEMA_TARGETS = ['postgres', 'pglite', 'mysql']
const ONE_SCHEMA_RUN =
  "the kit names its tables through the library's own table placement, the same code whatever the driver, pooler or session settings of the database"
const SYNCHRONOUS =
  'better-sqlite3 waits for a lock synchronously, blocking the process: a holder in the same process cannot end while its competitor waits'

/** What each target cannot show of the contract, and why. */
function notApplicable(target: Target): Partial<Record<CheckId, string>> {
  if (target.database !== 'sqlite') return {}
  return {
    'claim-waits': SYNCHRONOUS,
    'lock-wait-restored': SYNCHRONOUS,
    'claim-wait-zero': BUSY_TIMEOUT,
    'claim-wait-bounded': BUSY_TIMEOUT,
    'lock-wait-bounded': BUSY_TIMEOUT,
    'classify-deadlock': ONE_WRITER,
    'prune-skips-locked': ONE_WRITER,
  }
}

/** The target's database, and a second instance on it where its pool cannot lend two connections (SQLite: the same file). */
function open(target: Target): { target: DialectTarget; close(): Promise<void> } {
  const dir = target.driver === 'better-sqlite3' ? mkdtempSync(join(tmpdir(), 'kidem-contract-')) : undefined
  const location = dir
    ? join(dir, 'contract.db')
    : target.driver === 'pglite'
      ? PGLITE_LOCATION
      : inject('locations')[target.server ?? (target.database as 'postgres' | 'mysql')]!
  const db: Kysely<any> = openDatabase(target.driver, location)
  const second: Kysely<any> | undefined = dir ? openDatabase(target.driver, location) : undefined
  return {
    target: {
      db,
      ...(target.dialect ? { dialect: target.dialect() } : {}),
      competitor: target.driver === 'pglite' ? false : (second ?? db),
      notApplicable: notApplicable(target),
    },
    async close() {
      await second?.destroy()
      await db.destroy()
      if (dir) rmSync(dir, { recursive: true, force: true })
    },
  }
}

for (const target of targetsFor('dialect contract')) {
  describe(`dialect contract: ${target.id}`, () => {
    // Listing the checks opens nothing; each check opens its own instances, since a failed check
    // may leave a connection waiting.
    const listing: DialectTarget = {
      db: {} as Kysely<unknown>,
      competitor: target.driver === 'pglite' ? false : undefined,
      notApplicable: notApplicable(target),
    }
    for (const check of dialectChecks(listing)) {
      const test = check.notApplicable === undefined ? it : it.skip
      test(check.notApplicable === undefined ? check.title : `${check.title} (N/A: ${check.notApplicable})`, async () => {
        const opened = open(target)
        try {
          await dialectChecks(opened.target)
            .find((c) => c.id === check.id)!
            .run()
        } finally {
          await opened.close()
        }
      }, 60_000)
    }

    itIf(SCHEMA_TARGETS.includes(target.id), target.database === 'sqlite' ? NO_SCHEMAS : `run on ${SCHEMA_TARGETS.join(', ')}: ${ONE_SCHEMA_RUN}`)(
      'runs every check on a withSchema instance: its tables, the 0001 table and the history are in that schema, and nothing is left',
      async () => {
        const opened = open(target)
        const { db } = opened.target
        const id = Math.random().toString(36).slice(2, 8)
        // A schema (a MySQL database) of this test's own, and a prefix no other test's tables start with.
        const schema = `kidem_contract_schema_${id}`
        const prefix = `kidem_ws_${id}`
        const dialect = opened.target.dialect ?? detectDialect(db)
        // When a check prepares the dialect's statements, its table has just been made (or upgraded
        // from 0001): where everything named after the prefix is then tells where the kit put it.
        const prepared: Array<{ table: string; found: string[] }> = []
        const watched: IdempotencyDialect = {
          ...dialect,
          async prepare(on, table) {
            if (!table.endsWith('_missing')) prepared.push({ table, found: await relations(db, target.database, prefix) })
            return dialect.prepare(on, table)
          },
        }
        try {
          await db.schema.createSchema(schema).execute()
          const tenant = db.withSchema(schema)
          const run: DialectTarget = {
            ...opened.target,
            db: tenant,
            dialect: watched,
            competitor: opened.target.competitor === false ? false : tenant,
            tablePrefix: prefix,
          }
          const report = await exerciseDialect(run)
          const applicable = dialectChecks(run).filter((c) => c.notApplicable === undefined)
          expect(report.passed).toEqual(applicable.map((c) => c.id))
          // One scratch table per check that ran, and the one upgrade-0001 made from 0001.
          expect(prepared).toHaveLength(applicable.length + 1)
          for (const { table, found } of prepared) {
            const name = table.slice(schema.length + 1)
            expect(table).toBe(`${schema}.${name}`)
            expect(found).toContain(`${schema}.${name}`)
            expect(found).toContain(`${schema}.${name}_migration`)
            expect(found.filter((relation) => !relation.startsWith(`${schema}.`))).toEqual([])
          }
          // The kit dropped what it made, in the schema and elsewhere.
          expect(await relations(db, target.database, prefix)).toEqual([])
        } finally {
          await (target.database === 'mysql'
            ? sql`drop database if exists ${sql.id(schema)}`.execute(db)
            : sql`drop schema if exists ${sql.id(schema)} cascade`.execute(db))
          await opened.close()
        }
      },
      240_000,
    )
  })
}

/** Every relation (table, index, sequence; MySQL: table) whose name starts with `prefix`, as `schema.name`, in any schema. */
async function relations(db: Kysely<any>, database: DatabaseName, prefix: string): Promise<string[]> {
  const query =
    database === 'mysql'
      ? sql<{ s: string; n: string }>`select table_schema as s, table_name as n from information_schema.tables where table_name like ${`${prefix}%`}`
      : sql<{ s: string; n: string }>`select ns.nspname as s, c.relname as n from pg_class c join pg_namespace ns on ns.oid = c.relnamespace
          where c.relname like ${`${prefix}%`}`
  const { rows } = await query.execute(db)
  // An underscore of the prefix matches any character in LIKE.
  return rows
    .filter((row) => row.n.startsWith(prefix))
    .map((row) => `${row.s}.${row.n}`)
    .sort()
}

describe('the dialect contract kit', () => {
  it('reports every check that failed, after running them all, and names what the dialect did', async () => {
    const opened = open(ALL_TARGETS.find((t) => t.id === 'sqlite')!)
    const { dialect: _, ...rest } = opened.target
    const broken = { ...(await import('../index.js')).sqliteDialect, classify: () => undefined }
    try {
      const failure = await exerciseDialect({ ...rest, dialect: broken }).catch((error: unknown) => error)
      expect(failure).toBeInstanceOf(DialectContractError)
      const report = (failure as DialectContractError).report
      expect(report.failed.map((f) => f.id).sort()).toEqual(['classify-serialization', 'classify-undefined-table', 'lock-latest'])
      expect((failure as Error).message).toMatch(/classify-undefined-table: .*\n.*maps to undefined instead of 'undefined_table'/)
      expect(report.passed.length + report.notApplicable.length + report.failed.length).toBe(dialectChecks(opened.target).length)
    } finally {
      await opened.close()
    }
  }, 120_000)

  it('fails a competing check with what to do, instead of hanging, when the target lends one connection and names no competitor', async () => {
    const opened = open(ALL_TARGETS.find((t) => t.id === 'sqlite')!)
    const { competitor: _, ...alone } = opened.target
    try {
      const check = dialectChecks(alone).find((c) => c.id === 'lock-latest')!
      expect(check.notApplicable).toBeUndefined()
      await expect(check.run()).rejects.toThrow(/lends one connection at a time\. Pass a second Kysely instance on the same database as competitor/)
    } finally {
      await opened.close()
    }
  }, 60_000)

  it('refuses a withSchema instance on SQLite, as the library does, instead of failing every check as the dialect', async () => {
    const opened = open(ALL_TARGETS.find((t) => t.id === 'sqlite')!)
    const tenant = opened.target.db.withSchema('tenant')
    const target: DialectTarget = { ...opened.target, db: tenant }
    try {
      const refused = await exerciseDialect(target).catch((error: unknown) => error)
      expect(refused).toBeInstanceOf(IdempotencySetupError)
      expect((refused as Error).message).toMatch(/schema "tenant" \(withSchema\), which sqlite cannot hold the idempotency table in/)
      await expect(dialectChecks(target)[0]!.run()).rejects.toThrow(IdempotencySetupError)
    } finally {
      await opened.close()
    }
  })

  it('refuses a table prefix that is not a plain identifier', () => {
    expect(() => dialectChecks({ db: {} as Kysely<unknown>, dialect: {} as never, tablePrefix: 'x; drop table y' })).toThrow(TypeError)
  })
})
