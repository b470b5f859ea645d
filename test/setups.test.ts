/**
 * The Kysely instance as users configure it: a schema per tenant (`withSchema`), the plugins
 * people add, the drivers' own parsing settings, and timeouts set on the pool's sessions.
 */
import * as kysely from 'kysely'
import {
  CamelCasePlugin,
  CompiledQuery,
  DeduplicateJoinsPlugin,
  HandleEmptyInListsPlugin,
  Kysely,
  MysqlDialect,
  ParseJSONResultsPlugin,
  PostgresDialect,
  SqliteDialect,
  sql,
  replaceWithNoncontingentExpression,
  type KyselyPlugin,
} from 'kysely'
import Database from 'better-sqlite3'
import { PostgresJSDialect } from 'kysely-postgres-js5'
import { createPool } from 'mysql2'
import pg from 'pg'
import postgres from 'postgres'
import { PGlite } from '@electric-sql/pglite'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { createIdempotency, IdempotencySetupError, withIdempotency, type Flow, type Idempotency } from '../index.js'
import type { TableName } from '../src/table.js'
import type { Target } from './support/databases.js'
import { gate, itIf, itWhere, openFixture, targetsFor, type Fixture } from './support/harness.js'
import { sleep } from './support/util.js'

/** Everything a user does with an instance, on `db`: replays, flows, the recovery worker, operations. */
async function exercise(fx: Fixture, db: Kysely<any>, options: { dialect?: Target['dialect'] } = {}): Promise<void> {
  const idempotency = createIdempotency({ db, tableName: fx.table, lockTimeout: 300, ...(options.dialect ? { dialect: options.dialect() } : {}) })
  // A no-op where the fixture made the table; PGlite's own instance starts empty.
  await idempotency.migrate()
  const value = { n: 1, at: new Date(5), big: 7n, nested: { created_at: 'kept as written' } }
  expect(await idempotency.executeTransaction({ key: 'x', request: { a: 1 } }, async () => value)).toEqual({ value, replayed: false })
  expect(await idempotency.executeTransaction({ key: 'x', request: { a: 1 } }, async () => 'again')).toEqual({ value, replayed: true })
  expect(await db.transaction().execute((trx) => idempotency.withIdempotency(trx, { key: 'x', request: { a: 1 } }, async () => 'again'))).toEqual(
    value,
  )

  let failures = 1
  const flow = idempotency.defineFlow('setup-flow', async (f: Flow<any, string>, request: { id: number }) => {
    const first = await f.phase('first', async () => request.id)
    const second = await f.step('second', async () => {
      if (failures-- > 0) throw new Error('the provider is down')
      return first + 1
    })
    return `done ${second}`
  })
  await expect(flow.run({ key: 'f', request: { id: 41 } })).rejects.toThrow('the provider is down')
  const [abandoned] = await idempotency.abandoned()
  expect(abandoned).toMatchObject({ key: 'f', recoveryPoint: 'first', request: { id: 41 }, attempts: 1, flowName: 'setup-flow' })
  const held = await idempotency.inspect({ key: 'f' })
  expect(held).toMatchObject({ state: 'abandoned', recoveryPoint: 'first', attempts: 1, lockedUntil: null })
  expect(held!.expiresAt.getTime()).toBeGreaterThan(Date.now())
  expect(await idempotency.recover()).toEqual({ finished: 1, failed: 0, skipped: 0 })
  expect(await flow.executeRun({ key: 'f', request: { id: 41 } })).toEqual({ value: 'done 42', replayed: true })

  await idempotency.transaction({ key: 'old', request: 1 }, async () => 'expires', { ttl: 1 })
  await sleep(20)
  expect(await idempotency.counts()).toEqual({ live: 0, finished: 2, expired: 1, abandoned: 0 })
  expect(await idempotency.prune()).toBe(1)
  expect(await idempotency.forget({ key: 'x' })).toBe(true)
  expect(await idempotency.inspect({ key: 'x' })).toBeUndefined()
}

for (const target of targetsFor('setups', ['statement-paths'])) {
  describe(`setups: ${target.id}`, () => {
    let fx: Fixture
    const cleanups: Array<() => Promise<unknown>> = []
    beforeEach(async () => {
      fx = await openFixture(target)
    })
    afterEach(async () => {
      for (const cleanup of cleanups.splice(0).reverse()) await cleanup()
      await fx.close()
    })

    /** A schema (a MySQL database) of this test's own, dropped afterwards. */
    const schema = (name: string) => {
      const made = `${fx.table}_${name}`
      cleanups.push(() =>
        target.database === 'mysql'
          ? sql`drop database if exists ${sql.id(made)}`.execute(fx.db)
          : sql`drop schema if exists ${sql.id(made)} cascade`.execute(fx.db),
      )
      return made
    }
    const columns = (table: TableName) => fx.idempotency.dialect.upgrades.columns(fx.db, table)

    itIf(target.database !== 'sqlite', 'SQLite has no schemas (see the next test)')(
      "keeps the schema of withSchema: the table, its history and its keys are the tenant's own",
      async () => {
        const [one, two] = [schema('one'), schema('two')]
        const tenant = (s: string) => createIdempotency({ db: fx.db.withSchema(s), tableName: fx.table })
        const [first, second] = [tenant(one), tenant(two)]
        for (const instance of [first, second]) await instance.migrate()
        for (const s of [one, two]) {
          expect(await columns({ schema: s, name: fx.table })).toContain('fingerprint')
          expect(await columns({ schema: s, name: `${fx.table}_migration` })).toContain('name')
        }
        const once = (instance: Idempotency<any>, answer: string) => instance.executeTransaction({ key: 'k', request: 1 }, async () => answer)
        expect(await once(first, 'tenant one')).toEqual({ value: 'tenant one', replayed: false })
        expect(await once(second, 'tenant two')).toEqual({ value: 'tenant two', replayed: false })
        expect(await once(fx.idempotency, 'no schema')).toEqual({ value: 'no schema', replayed: false })
        expect(await once(second, 'again')).toEqual({ value: 'tenant two', replayed: true })
        expect(await once(first, 'again')).toEqual({ value: 'tenant one', replayed: true })
        // The free function finds the schema in the transaction it is given.
        const free = await fx.db
          .withSchema(two)
          .transaction()
          .execute((trx) => withIdempotency(trx, { key: 'k', request: 1 }, async () => 'again', { tableName: fx.table }))
        expect(free).toBe('tenant two')
        // The same key in another tenant, inside this tenant's function, is another key, not a nested call.
        const inner = await first.transaction({ key: 'n', request: 1 }, async (trx) =>
          second.withIdempotency(trx, { key: 'n', request: 1 }, async () => 'inner'),
        )
        expect(inner).toBe('inner')
        expect(await first.counts()).toMatchObject({ finished: 2 })
        expect(await fx.idempotency.counts()).toMatchObject({ finished: 1 })
      },
    )

    itIf(target.database === 'postgres' && target.driver !== 'pglite', 'needs a Postgres server with roles')(
      'migrates a withSchema instance as a role that may not create schemas, once its schema and table exist',
      async () => {
        const tenant = schema('app')
        await createIdempotency({ db: fx.db.withSchema(tenant), tableName: fx.table }).migrate()
        const role = `${fx.table}_role`
        cleanups.push(async () => {
          await sql`drop owned by ${sql.id(role)}`.execute(fx.db)
          await sql`drop role ${sql.id(role)}`.execute(fx.db)
        })
        await sql`create role ${sql.id(role)} login`.execute(fx.db)
        await sql`grant usage on schema ${sql.id(tenant)} to ${sql.id(role)}`.execute(fx.db)
        await sql`grant select, insert, update, delete on all tables in schema ${sql.id(tenant)} to ${sql.id(role)}`.execute(fx.db)
        const url = new URL(fx.location)
        url.username = role
        const app = withDriverSettings(target, url.toString())
        try {
          const idempotency = createIdempotency({ db: app.withSchema(tenant), tableName: fx.table })
          expect((await idempotency.migrate()).results).toEqual([])
          expect(await idempotency.transaction('k', async () => 'as the app')).toBe('as the app')
        } finally {
          await app.destroy()
        }
      },
    )

    itIf(target.database === 'sqlite', 'only SQLite has no schemas')(
      'refuses withSchema on SQLite when the instance is created, naming why',
      async () => {
        const refused = () => createIdempotency({ db: fx.db.withSchema('tenant'), tableName: fx.table })
        expect(refused).toThrow(IdempotencySetupError)
        expect(refused).toThrow(/schema "tenant" \(withSchema\), which sqlite cannot hold the idempotency table in/)
        await expect(
          fx.db
            .withSchema('tenant')
            .transaction()
            .execute((trx) => withIdempotency(trx, 'k', async () => 1)),
        ).rejects.toBeInstanceOf(IdempotencySetupError)
      },
    )

    it('works through CamelCasePlugin, ParseJSONResultsPlugin, DeduplicateJoinsPlugin and HandleEmptyInListsPlugin, which its function still gets', async () => {
      const plugins: KyselyPlugin[] = [
        new CamelCasePlugin(),
        new ParseJSONResultsPlugin(),
        new DeduplicateJoinsPlugin(),
        new HandleEmptyInListsPlugin({ strategy: replaceWithNoncontingentExpression }),
      ]
      const db = plugins.reduce((instance, plugin) => instance.withPlugin(plugin), fx.db)
      await exercise(fx, db)
      // The function's transaction keeps the plugins: camelCase names reach a snake_case table.
      const idempotency = createIdempotency({ db, tableName: fx.table })
      const orders = `${fx.table}_orders`
      cleanups.push(() => fx.db.schema.dropTable(orders).ifExists().execute())
      await fx.db.schema.createTable(orders).addColumn('order_ref', 'varchar(50)').execute()
      const placed = await idempotency.transaction('camel', async (trx) => {
        await trx.insertInto(orders).values({ orderRef: 'o-1' }).execute()
        return trx.selectFrom(orders).select('orderRef').where('orderRef', 'in', []).execute()
      })
      expect(placed).toEqual([])
      expect(await fx.db.selectFrom(orders).select('order_ref').execute()).toEqual([{ order_ref: 'o-1' }])
    })

    it('refuses a plugin that renames its table, instead of leaving it out', async () => {
      const db = fx.db.withPlugin(new CamelCasePlugin())
      expect(() => createIdempotency({ db, tableName: 'idemKeys' })).toThrow(/renames the table "idemKeys" to "idem_keys"/)
    })

    it("reads its own table whatever the driver's parsing settings", async () => {
      const db = withDriverSettings(target, fx.location)
      try {
        await exercise(fx, db)
      } finally {
        await db.destroy()
      }
    })

    // The timeouts are settings of each session, which a pooler hands from client to client.
    itWhere(
      target,
      'pool',
      'session-state',
    )('answers 409 in_flight when a statement timeout set on the sessions ends the wait for the key, and replays once it finished', async () => {
      const db = withStatementTimeout(target, fx.location, 300)
      try {
        const hurried = createIdempotency({ db, tableName: fx.table, conflictWait: 5000 })
        const entered = gate()
        const release = gate()
        const first = fx.idempotency.transaction({ key: 't', request: 1 }, async () => {
          entered.open()
          await release.promise
          return 'first'
        })
        await entered.promise
        const started = Date.now()
        const calls = [
          hurried.transaction({ key: 't', request: 1 }, async () => 'second'),
          db.transaction().execute((trx) => hurried.withIdempotency(trx, { key: 't', request: 1 }, async () => 'second')),
        ]
        const outcomes = await Promise.allSettled(calls).finally(release.open)
        for (const outcome of outcomes) {
          expect(outcome).toMatchObject({ status: 'rejected', reason: { name: 'IdempotencyConflictError', reason: 'in_flight', retryAfter: 5 } })
        }
        expect(Date.now() - started).toBeLessThan(3000)
        expect(await first).toBe('first')
        expect(await hurried.transaction({ key: 't', request: 1 }, async () => 'third')).toBe('first')
      } finally {
        await db.destroy()
      }
    })

    itWhere(
      target,
      'pool',
      'session-state',
    )('keeps waiting its conflictWait whatever lock wait the sessions have, and replays the first answer', async () => {
      const db = withLockWaitTimeout(target, fx.location)
      try {
        const patient = createIdempotency({ db, tableName: fx.table, conflictWait: 5000 })
        const entered = gate()
        const first = fx.idempotency.transaction({ key: 'w', request: 1 }, async () => {
          entered.open()
          await sleep(1500)
          return 'first'
        })
        await entered.promise
        expect(await patient.executeTransaction({ key: 'w', request: 1 }, async () => 'second')).toEqual({ value: 'first', replayed: true })
        expect(await first).toBe('first')
      } finally {
        await db.destroy()
      }
    })
  })
}

/**
 * The target's database through its driver with the parsing settings users turn on: pg's int8 as
 * BigInt, timestamps as strings and JSON unparsed; postgres.js's BigInt and camelCase columns;
 * mysql2's date strings, big numbers as strings and a time zone; better-sqlite3's safe integers.
 */
function withDriverSettings(target: Target, location: string): Kysely<any> {
  switch (target.driver) {
    case 'pg': {
      const unparsed = (text: string) => text
      const getTypeParser = ((oid: number, format?: 'text' | 'binary') =>
        oid === 20
          ? BigInt
          : [1082, 1114, 1184, 114, 3802].includes(oid)
            ? unparsed
            : pg.types.getTypeParser(oid, format ?? 'text')) as typeof pg.types.getTypeParser
      return new Kysely({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: location, max: 5, types: { getTypeParser } }) }) })
    }
    case 'postgres-js':
      return new Kysely({
        dialect: new PostgresJSDialect({
          postgres: postgres(location, { max: 5, onnotice: () => {}, types: { bigint: postgres.BigInt }, transform: postgres.camel }),
        }),
      })
    case 'mysql2':
      return new Kysely({
        dialect: new MysqlDialect({
          pool: createPool({
            uri: location,
            connectionLimit: 5,
            dateStrings: true,
            supportBigNumbers: true,
            bigNumberStrings: true,
            timezone: '+05:30',
          }),
        }),
      })
    case 'better-sqlite3': {
      const file = new Database(location, { timeout: 5000 })
      file.defaultSafeIntegers(true)
      return new Kysely({ dialect: new SqliteDialect({ database: file }) })
    }
    case 'pglite': {
      // An instance of its own, with PGlite's parsers for int8, timestamps and JSON.
      const unparsed = (text: string) => text
      const pglite = new PGlite({ parsers: { 20: BigInt, 1184: unparsed, 114: unparsed } })
      const { PGliteDialect } = kysely as Partial<typeof import('kysely')>
      return new Kysely({ dialect: new PGliteDialect!({ pglite }) })
    }
  }
}

/** The target's server database with a statement timeout on every session of the pool. */
function withStatementTimeout(target: Target, location: string, ms: number): Kysely<any> {
  switch (target.driver) {
    case 'pg':
      return new Kysely({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: location, max: 5, statement_timeout: ms }) }) })
    case 'postgres-js':
      return new Kysely({
        dialect: new PostgresJSDialect({ postgres: postgres(location, { max: 5, onnotice: () => {}, connection: { statement_timeout: ms } }) }),
      })
    case 'mysql2':
      // MariaDB's max_statement_time is in seconds.
      return new Kysely({
        dialect: new MysqlDialect({
          pool: createPool({ uri: location, connectionLimit: 5 }),
          onCreateConnection: (connection) =>
            connection.executeQuery(CompiledQuery.raw(`set session max_statement_time = ${ms / 1000}`)).then(() => undefined),
        }),
      })
    default:
      throw new Error(`${target.id} has no sessions to time out.`)
  }
}

/** The target's server database with a short lock wait on every session of the pool. */
function withLockWaitTimeout(target: Target, location: string): Kysely<any> {
  switch (target.driver) {
    case 'pg':
      return new Kysely({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: location, max: 5, lock_timeout: 100 }) }) })
    case 'postgres-js':
      return new Kysely({
        dialect: new PostgresJSDialect({ postgres: postgres(location, { max: 5, onnotice: () => {}, connection: { lock_timeout: 100 } }) }),
      })
    case 'mysql2':
      return new Kysely({
        dialect: new MysqlDialect({
          pool: createPool({ uri: location, connectionLimit: 5 }),
          onCreateConnection: (connection) =>
            connection.executeQuery(CompiledQuery.raw('set session innodb_lock_wait_timeout = 1')).then(() => undefined),
        }),
      })
    default:
      throw new Error(`${target.id} has no sessions to set.`)
  }
}
