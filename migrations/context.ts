/**
 * What each migration of the idempotency table works with, and the checks of a table found in
 * place (made from the printed DDL, or by another migration history).
 */
import type { Kysely } from 'kysely'
import { detectDialect } from '../dialects/registry.js'
import type { IdempotencyDialect } from '../src/dialect.js'
import { IdempotencyMigrationError } from '../src/errors.js'
import { locateTable, qualified, type TableName } from '../src/table.js'

/**
 * What a migration does with its change: `adopt` makes it unless the table already has it;
 * `baseline` only checks that the table has it (no DDL); `print` makes it without looking
 * (for printing the DDL without a database).
 */
export type Mode = 'adopt' | 'baseline' | 'print'

/** One table's migrations: its name, the mode, and the dialect chosen for it, if any. */
export interface MigrationContext {
  readonly table: string
  readonly mode: Mode
  /** What a migration works with: the database without plugins, where the table is, and the dialect. */
  open(db: Kysely<unknown>): { plain: Kysely<unknown>; where: TableName; dialect: IdempotencyDialect }
}

/** The context of `table`'s migrations. Each finds the table where the Kysely instance it is given would (in the schema of `withSchema`, if any). */
export function migrationContext(table: string, chosen: IdempotencyDialect | undefined, mode: Mode): MigrationContext {
  return { table, mode, open: (db) => ({ plain: db.withoutPlugins(), where: locateTable(db, table), dialect: chosen ?? detectDialect(db) }) }
}

export function expectColumns(table: string, found: readonly string[], wanted: readonly string[], migration: string): void {
  if (!found.length) {
    throw new IdempotencyMigrationError(
      `There is no table "${table}" to record as migrated; apply the DDL that \`kysely-idempotency sql\` prints first, or migrate without baseline.`,
    )
  }
  const missing = wanted.filter((column) => !found.includes(column))
  if (missing.length) {
    throw new IdempotencyMigrationError(
      `The table "${table}" exists but lacks the column${missing.length > 1 ? 's' : ''} ${missing.join(', ')} (migration ${migration}); ` +
        'it is not an idempotency table of this library, or was changed by hand. Choose another table name or fix the table.',
    )
  }
}

/**
 * The indexes migration 0001 creates, on a table found in place: the unique (scope, key) index
 * is what makes a second claim of a key wait or fail, so a table without it is refused; the
 * `expires_at` index only speeds up pruning, so it is made unless nothing may change.
 */
export async function expectIndexes(db: Kysely<unknown>, where: TableName, dialect: IdempotencyDialect, mode: Mode): Promise<void> {
  const table = where.name
  const indexes = await dialect.upgrades.indexes(db, where)
  const unique = indexes.some((i) => i.unique && i.columns.length === 2 && i.columns.includes('scope') && i.columns.includes('key'))
  if (!unique) {
    throw new IdempotencyMigrationError(
      `The table "${table}" has no unique index on (scope, key) (migration 0001_create), without which two requests with one key ` +
        'would both run; add a unique constraint on (scope, key) to the table, or choose another table name.',
    )
  }
  if (indexes.some((i) => i.columns[0] === 'expires_at')) return
  if (mode === 'baseline') {
    throw new IdempotencyMigrationError(
      `The table "${table}" has no index on expires_at (migration 0001_create), which prune needs; ` +
        'apply the DDL that `kysely-idempotency sql` prints, or migrate without baseline to create it.',
    )
  }
  await db.schema.createIndex(`${table}_expires_at`).on(qualified(where)).column('expires_at').execute()
}
