/**
 * What `migrate()` reports, and what the core needs of the table's migrations (`migrations/`),
 * which the package entry gives it.
 */
import type { Kysely } from 'kysely'
import type { IdempotencyDialect } from './dialect.js'
import type { TableName } from './table.js'

/** One migration `migrate()` ran or recorded, in the shape of Kysely's `MigrationResult`. */
export interface MigrationResult {
  readonly migrationName: string
  readonly direction: 'Up'
  readonly status: 'Success'
}

/** What `migrate()` did: the migrations it ran or recorded, none when the table was up to date. */
export interface MigrationResultSet {
  readonly results: readonly MigrationResult[]
}

/** Brings `table` to the latest schema; with `baseline`, records what it has and changes nothing. */
export type MigrateTable = (db: Kysely<unknown>, table: TableName, dialect: IdempotencyDialect, baseline: boolean) => Promise<MigrationResultSet>
