import * as kysely from 'kysely'
import type { MigrationResultSet } from 'kysely/migration'

const subpath = 'kysely/migration' // in a variable, so that no bundler resolves it ahead of time
/**
 * Kysely's own `Migrator`, as a user of either supported Kysely has it: `kysely/migration` in
 * 0.29, `kysely` in 0.28 (the compatibility lane), so that the history format is tested against both.
 */
const { Migrator: KyselyMigrator } = (await import(subpath).catch(() => kysely)) as typeof import('kysely/migration')

/**
 * Kysely's `Migrator`, run again when it fails because its listing of every table of the schema
 * met a table that another test file dropped meanwhile (Postgres 42P01): the race is Kysely's, and
 * the test files here run two at a time on one database.
 */
export class Migrator extends KyselyMigrator {
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

async function retried(migrate: () => Promise<MigrationResultSet>): Promise<MigrationResultSet> {
  for (let attempt = 1; ; attempt++) {
    const result = await migrate()
    if (attempt === 5 || (result.error as { code?: unknown } | undefined)?.code !== '42P01') return result
  }
}
