import { Migrator } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { createIdempotency, idempotencyMigrations, migrationTables } from '../src/index.js'
import { openFixture, selectedTargets, startWorker, type Fixture } from './support/harness.js'

// Migrations run on a direct connection, never through a pooler in transaction mode (the README
// says why), so the pgbouncer target has no migration tests.
for (const target of selectedTargets().filter((t) => t.server !== 'pgbouncer')) {
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

    const fresh = (suffix: string) => {
      const table = `${fx.table}_${suffix}`
      const { migrationTableName, migrationLockTableName } = migrationTables(table)
      extra.push(table, migrationTableName, migrationLockTableName)
      return createIdempotency({ db: fx.db, tableName: table, ...(target.dialect ? { dialect: target.dialect() } : {}) })
    }

    it('is a no-op when the table is already at the latest schema', async () => {
      const again = await fx.idempotency.migrate()
      expect(again.error).toBeUndefined()
      expect(again.results).toEqual([])
    })

    it('is safe to run from 4 processes at once', async () => {
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

    it('hands its migrations to a Migrator of your own, which can also undo them', async () => {
      const table = `${fx.table}_own`
      extra.push(table, `${table}_history`, `${table}_history_lock`)
      const migrator = new Migrator({
        db: fx.db,
        provider: idempotencyMigrations({ tableName: table }),
        migrationTableName: `${table}_history`,
        migrationLockTableName: `${table}_history_lock`,
      })
      const up = await migrator.migrateToLatest()
      expect(up.error).toBeUndefined()
      expect(up.results?.map((r) => [r.migrationName, r.status])).toEqual([
        [`kysely_idempotency_${table}_0001_create`, 'Success'],
        [`kysely_idempotency_${table}_0002_codec`, 'Success'],
      ])
      const idempotency = createIdempotency({ db: fx.db, tableName: table })
      expect(await idempotency.transaction('k', async () => 1)).toBe(1)
      for (let i = 0; i < 2; i++) expect((await migrator.migrateDown()).error).toBeUndefined()
      await expect(idempotency.transaction('k2', async () => 1)).rejects.toThrow(/does not exist/)
    })
  })
}

for (const target of selectedTargets().filter((t) => t.server === 'pgbouncer')) {
  describe(`migrations: ${target.id}`, () => {
    it('migrates on the direct connection, and the pooler then serves the table', async () => {
      const fx = await openFixture(target)
      try {
        expect(await fx.idempotency.transaction('k', async () => 'through the pooler')).toBe('through the pooler')
        expect(await fx.idempotency.transaction('k', async () => 'again')).toBe('through the pooler')
      } finally {
        await fx.close()
      }
    })
  })
}
