import * as kysely from 'kysely'
import type { MigrationResultSet } from 'kysely/migration'

const subpath = 'kysely/migration' // in a variable, so that no bundler resolves it ahead of time
/**
 * Kysely's own `Migrator`, as a user of either supported Kysely has it: `kysely/migration` in
 * 0.29, `kysely` in 0.28 (the compatibility lane), so that the history format is tested against both.
 */
const { Migrator: KyselyMigrator } = (await import(subpath).catch(() => kysely)) as typeof import('kysely/migration')

/**
 * Kysely's `Migrator`, run again when it fails: to find its history tables it lists every column
 * of every table in the database (`pg_get_serial_sequence` on each), which fails when another
 * test file drops a table meanwhile (42P01 on a table it never uses). The race is Kysely's, and
 * the test files here run side by side on one database; a failure of this library's migrations
 * would repeat in every attempt.
 */
export class Migrator extends KyselyMigrator {
  override async getMigrations(): ReturnType<InstanceType<typeof KyselyMigrator>['getMigrations']> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await super.getMigrations()
      } catch (error) {
        if (attempt === ATTEMPTS) throw error
      }
    }
  }

  override migrateToLatest(): Promise<MigrationResultSet> {
    return retried(() => super.migrateToLatest())
  }

  override migrateTo(target: Parameters<InstanceType<typeof KyselyMigrator>['migrateTo']>[0]): Promise<MigrationResultSet> {
    return retried(() => super.migrateTo(target))
  }

  override migrateDown(): Promise<MigrationResultSet> {
    return retried(() => super.migrateDown())
  }
}

const ATTEMPTS = 5

async function retried(migrate: () => Promise<MigrationResultSet>): Promise<MigrationResultSet> {
  for (let attempt = 1; ; attempt++) {
    const result = await migrate()
    if (attempt === ATTEMPTS || result.error === undefined) return result
  }
}
