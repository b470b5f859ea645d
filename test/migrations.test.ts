import { sql } from 'kysely'
import { Migrator } from './support/migrator.js'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { createIdempotency, IdempotencyMigrationError, idempotencyMigrations, migrationTables } from '../index.js'
import { detectDialect } from '../dialects/registry.js'
import type { TableName } from '../src/table.js'
import { itIf, itWhere, openFixture, startWorker, targetsFor, type Fixture } from './support/harness.js'

for (const target of targetsFor('migrations')) {
  describe(`migrations: ${target.id}`, () => {
    let fx: Fixture
    let extra: string[]
    beforeEach(async () => {
      fx = await openFixture(target)
      extra = []
    })
    afterEach(async () => {
      for (const table of extra) await fx.db.schema.dropTable(table).ifExists().execute()
      await fx.close()
    })

    const at = (name: string): TableName => ({ schema: undefined, name })
    const columnsOf = (table: string) => (target.dialect?.() ?? detectDialect(fx.db)).upgrades.columns(fx.db, at(table))

    const fresh = (suffix: string) => {
      const table = `${fx.table}_${suffix}`
      const { migrationTableName, migrationLockTableName } = migrationTables(table)
      extra.push(table, migrationTableName, migrationLockTableName)
      return createIdempotency({ db: fx.db, tableName: table, ...(target.dialect ? { dialect: target.dialect() } : {}) })
    }

    it('is a no-op when the table is already at the latest schema', async () => {
      expect((await fx.idempotency.migrate()).results).toEqual([])
    })

    it('runs each migration once when 30 instances migrate at once, under any default isolation', async () => {
      const table = fresh('many').tableName
      const instances = Array.from({ length: 30 }, () =>
        createIdempotency({ db: fx.db, tableName: table, ...(target.dialect ? { dialect: target.dialect() } : {}) }),
      )
      const ran = (await Promise.all(instances.map((i) => i.migrate()))).flatMap((r) => r.results.map((m) => m.migrationName))
      expect(ran.sort()).toEqual(['0001_create', '0002_codec', '0003_recovery'].map((m) => `kysely_idempotency_${table}_${m}`))
      expect(await instances[0]!.transaction('k', async () => 'works')).toBe('works')
    })

    // Kysely's Migrator holds a session-level advisory lock.
    itWhere(target, 'session-state')('never migrates at the same moment as a Migrator of your own', async () => {
      for (let round = 0; round < 3; round++) {
        const idempotency = fresh(`mixed${round}`)
        const table = idempotency.tableName
        const own = new Migrator({ db: fx.db, provider: idempotencyMigrations({ tableName: table }), ...migrationTables(table) })
        const [library, theirs] = await Promise.all([idempotency.migrate(), own.migrateToLatest()])
        expect(theirs.error).toBeUndefined()
        const ran = [...library.results, ...(theirs.results ?? [])].map((m) => m.migrationName)
        expect(ran.sort()).toEqual(['0001_create', '0002_codec', '0003_recovery'].map((m) => `kysely_idempotency_${table}_${m}`))
      }
    })

    itWhere(target, 'processes')('is safe to run from 4 processes at once', async () => {
      const idempotency = fresh('m')
      const startAt = Date.now() + 1500
      const workers = Array.from({ length: 4 }, () =>
        startWorker({ target: target.id, location: fx.location, table: idempotency.tableName, action: 'migrate', startAt }),
      )
      for (const result of await Promise.all(workers.map((w) => w.done))) {
        expect(result.code, result.stderr).toBe(0)
        expect(result.stdout).toContain('migrated')
      }
      expect(await idempotency.transaction('k', async () => 'works')).toBe('works')
      expect((await idempotency.migrate()).results).toEqual([])
    })

    // Kysely's Migrator holds a session-level advisory lock.
    itWhere(target, 'session-state')(
      "adopts a table a Migrator made under another history table (0.1.0's README), making nothing again",
      async () => {
        const idempotency = fresh('adopt')
        const table = idempotency.tableName
        extra.push(`${table}_old`, `${table}_old_lock`)
        const old = new Migrator({
          db: fx.db,
          provider: idempotencyMigrations({ tableName: table }),
          migrationTableName: `${table}_old`,
          migrationLockTableName: `${table}_old_lock`,
        })
        expect((await old.migrateToLatest()).error).toBeUndefined()
        await idempotency.transaction('kept', async () => new Date(1))
        const adopted = await idempotency.migrate()
        expect(adopted.results?.map((r) => [r.migrationName, r.status])).toEqual([
          [`kysely_idempotency_${table}_0001_create`, 'Success'],
          [`kysely_idempotency_${table}_0002_codec`, 'Success'],
          [`kysely_idempotency_${table}_0003_recovery`, 'Success'],
        ])
        expect(await idempotency.transaction('kept', async () => new Date(2))).toEqual(new Date(1))
        expect((await idempotency.migrate()).results).toEqual([])
        // Your own Migrator, now with the shared history tables, finds everything recorded.
        const own = new Migrator({ db: fx.db, provider: idempotencyMigrations({ tableName: table }), ...migrationTables(table) })
        expect((await own.migrateToLatest()).results).toEqual([])
      },
    )

    // Kysely's Migrator holds a session-level advisory lock.
    itWhere(target, 'session-state')('baseline records only what the table has, changes nothing, and names what it lacks', async () => {
      const idempotency = fresh('base')
      const table = idempotency.tableName
      await expect(idempotency.migrate({ baseline: true })).rejects.toThrow(new RegExp(`no table "${table}" to record as migrated`))
      const made = new Migrator({
        db: fx.db,
        provider: {
          getMigrations: async () => ({
            only: (await idempotencyMigrations({ tableName: table }).getMigrations())[`kysely_idempotency_${table}_0001_create`]!,
          }),
        },
        migrationTableName: `${table}_by_hand`,
        migrationLockTableName: `${table}_by_hand_lock`,
      })
      extra.push(`${table}_by_hand`, `${table}_by_hand_lock`)
      expect((await made.migrateToLatest()).error).toBeUndefined()
      const refused = idempotency.migrate({ baseline: true })
      await expect(refused).rejects.toBeInstanceOf(IdempotencyMigrationError)
      await expect(refused).rejects.toThrow(new RegExp(`"${table}" predates migration 0002_codec \\(it has no codec column\\).*without --baseline`))
      expect(await columnsOf(table)).not.toContain('codec')
      // Without baseline, the missing change is made and the rest recorded (MySQL, without transactional DDL, recorded 0001 already).
      expect((await idempotency.migrate()).results.map((r) => r.migrationName)).toContain(`kysely_idempotency_${table}_0003_recovery`)
      expect(await columnsOf(table)).toContain('codec')
      expect(await idempotency.transaction('k', async () => 1n)).toBe(1n)
    })

    it('refuses a table of that name that is not an idempotency table', async () => {
      const idempotency = fresh('foreign')
      await fx.db.schema.createTable(idempotency.tableName).addColumn('id', 'integer').addColumn('key', 'varchar(20)').execute()
      const refused = idempotency.migrate()
      await expect(refused).rejects.toBeInstanceOf(IdempotencyMigrationError)
      await expect(refused).rejects.toThrow(/exists but lacks the columns scope, fingerprint, .*not an idempotency table of this library/)
    })

    /** The table of every migration as someone might write it by hand. */
    const byHand = async (table: string, { unique = true, expiresIndex = true, upper = false } = {}) => {
      const types = (target.dialect?.() ?? detectDialect(fx.db)).columnTypes
      const name = (column: string) => (upper ? column.toUpperCase() : column)
      let create = fx.db.schema
        .createTable(table)
        .addColumn(name('id'), types.id, (c) => types.identity(c))
        .addColumn(name('scope'), types.scope, (c) => c.notNull())
        .addColumn(name('key'), types.key, (c) => c.notNull())
      for (const column of ['fingerprint', 'recovery_point']) create = create.addColumn(name(column), types.text, (c) => c.notNull())
      for (const column of ['phase_results', 'response']) create = create.addColumn(name(column), types.json)
      for (const column of ['lock_token', 'codec']) create = create.addColumn(name(column), types.text)
      for (const column of ['locked_until', 'recover_after']) create = create.addColumn(name(column), types.time)
      create = create.addColumn(name('flow_name'), types.text).addColumn(name('recovery_failures'), 'integer', (c) => c.notNull().defaultTo(0))
      for (const column of ['created_at', 'last_run_at', 'expires_at']) create = create.addColumn(name(column), types.time, (c) => c.notNull())
      if (unique) create = create.addUniqueConstraint(`${table}_unique`, [name('scope'), name('key')])
      await create.execute()
      if (target.database === 'mysql') await sql`alter table ${sql.table(table)} convert to character set utf8mb4 collate utf8mb4_bin`.execute(fx.db)
      if (expiresIndex) await fx.db.schema.createIndex(`${table}_exp`).on(table).column(name('expires_at')).execute()
      await fx.db.schema.createIndex(`${table}_rec`).on(table).column(name('recover_after')).execute()
    }

    // Kysely's Migrator holds a session-level advisory lock.
    itWhere(target, 'session-state')(
      'refuses a table in place without the unique (scope, key) index, which at-most-once needs, in either mode',
      async () => {
        const idempotency = fresh('nouniq')
        await byHand(idempotency.tableName, { unique: false })
        for (const baseline of [false, true]) {
          const refused = idempotency.migrate({ baseline })
          await expect(refused).rejects.toBeInstanceOf(IdempotencyMigrationError)
          await expect(refused).rejects.toThrow(/has no unique index on \(scope, key\).*add a unique constraint on \(scope, key\)/)
        }
        const status = await new Migrator({
          db: fx.db,
          provider: idempotencyMigrations({ tableName: idempotency.tableName }),
          ...migrationTables(idempotency.tableName),
        }).getMigrations()
        expect(status.map((m) => m.executedAt)).toEqual([undefined, undefined, undefined])
        // With the index added, the same table is adopted.
        await fx.db.schema.createIndex(`${idempotency.tableName}_sk`).on(idempotency.tableName).columns(['key', 'scope']).unique().execute()
        expect((await idempotency.migrate({ baseline: true })).results).toHaveLength(3)
        expect(await idempotency.transaction('k', async () => new Date(3))).toEqual(new Date(3))
      },
    )

    it('makes the expires_at index a table in place lacks, and baseline names it instead', async () => {
      const idempotency = fresh('noexp')
      await byHand(idempotency.tableName, { expiresIndex: false })
      await expect(idempotency.migrate({ baseline: true })).rejects.toThrow(/has no index on expires_at \(migration 0001_create\), which prune needs/)
      const dialect = target.dialect?.() ?? detectDialect(fx.db)
      expect((await dialect.upgrades.indexes(fx.db, at(idempotency.tableName))).some((i) => i.columns[0] === 'expires_at')).toBe(false)
      expect((await idempotency.migrate()).results).toHaveLength(3)
      expect((await dialect.upgrades.indexes(fx.db, at(idempotency.tableName))).some((i) => i.columns[0] === 'expires_at')).toBe(true)
      expect(await idempotency.prune()).toBe(0)
    })

    // Postgres keeps the case of quoted names, and the library's statements name columns in lower case.
    itIf(target.database !== 'postgres', 'Postgres keeps the case of quoted column names')(
      'adopts a table whose column names differ only in case, as the database compares them',
      async () => {
        const idempotency = fresh('upper')
        await byHand(idempotency.tableName, { upper: true })
        expect((await idempotency.migrate({ baseline: true })).results).toHaveLength(3)
        expect(await idempotency.transaction('k', async () => 5n)).toBe(5n)
        expect(await idempotency.transaction('k', async () => 6n)).toBe(5n)
        const stopped = idempotency.run({ key: 'f', scope: 's', request: 1 }, async (flow) => {
          await flow.phase('one', async () => 1)
          throw new Error('stops')
        })
        await expect(stopped).rejects.toThrow('stops')
        expect(await idempotency.abandoned()).toMatchObject([{ scope: 's', key: 'f', recoveryPoint: 'one', request: 1 }])
        expect(await idempotency.run({ key: 'f', scope: 's', request: 1 }, async (flow) => (await flow.phase('one', async () => 2)) + 10)).toBe(11)
      },
    )

    // Kysely's Migrator holds a session-level advisory lock.
    itWhere(target, 'session-state')('tells a table migrated by 0.1.0 (0001 recorded, 0002 not) that it predates 0002, and migrates it', async () => {
      const idempotency = fresh('old')
      const table = idempotency.tableName
      const first = `kysely_idempotency_${table}_0001_create`
      const old = new Migrator({
        db: fx.db,
        provider: { getMigrations: async () => ({ [first]: (await idempotencyMigrations({ tableName: table }).getMigrations())[first]! }) },
        ...migrationTables(table),
      })
      expect((await old.migrateToLatest()).error).toBeUndefined()
      await expect(idempotency.migrate({ baseline: true })).rejects.toThrow(new RegExp(`"${table}" predates migration 0002_codec`))
      expect((await idempotency.migrate()).results?.map((r) => [r.migrationName, r.status])).toEqual([
        [`kysely_idempotency_${table}_0002_codec`, 'Success'],
        [`kysely_idempotency_${table}_0003_recovery`, 'Success'],
      ])
    })

    it('names its history tables after the table, idempotency_keys by default', () => {
      expect(migrationTables()).toEqual({
        migrationTableName: 'idempotency_keys_migration',
        migrationLockTableName: 'idempotency_keys_migration_lock',
      })
      expect(() => migrationTables('a;b')).toThrow(/not a plain identifier/)
    })

    // Kysely's Migrator holds a session-level advisory lock.
    itWhere(target, 'session-state')('hands its migrations to a Migrator of your own, which can also undo them', async () => {
      const table = `${fx.table}_own`
      extra.push(table, `${table}_history`, `${table}_history_lock`)
      const migrator = new Migrator({
        db: fx.db,
        provider: idempotencyMigrations({ tableName: table }),
        migrationTableName: `${table}_history`,
        migrationLockTableName: `${table}_history_lock`,
      })
      // Kysely's Migrator introspects every table of the database first (pg_get_serial_sequence on
      // each, on Postgres): one that a test running beside this one drops at that moment fails it
      // with 42P01 naming that table, before any migration runs. That, and only that, is tried again.
      const settled = async <R extends { error?: unknown }>(run: () => Promise<R>): Promise<R> => {
        for (let tries = 1; ; tries++) {
          const result = await run()
          const message = result.error instanceof Error ? result.error.message : ''
          if (tries < 3 && /^relation ".*" does not exist$/.test(message) && !message.includes(table)) continue
          return result
        }
      }
      const up = await settled(() => migrator.migrateToLatest())
      expect(up.error).toBeUndefined()
      expect(up.results?.map((r) => [r.migrationName, r.status])).toEqual([
        [`kysely_idempotency_${table}_0001_create`, 'Success'],
        [`kysely_idempotency_${table}_0002_codec`, 'Success'],
        [`kysely_idempotency_${table}_0003_recovery`, 'Success'],
      ])
      const idempotency = createIdempotency({ db: fx.db, tableName: table })
      expect(await idempotency.transaction('k', async () => 1)).toBe(1)
      for (let i = 0; i < 3; i++) expect((await settled(() => migrator.migrateDown())).error).toBeUndefined()
      await expect(idempotency.transaction('k2', async () => 1)).rejects.toThrow(/does not exist/)
    })
  })
}
