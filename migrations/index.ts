import { sql, type Kysely } from 'kysely'
import type { IdempotencyDialect } from '../src/dialect.js'
import { IdempotencyMigrationError } from '../src/errors.js'
import { checkTableName, DEFAULT_TABLE, qualified, type TableName } from '../src/table.js'
import { historyOf, migrateToLatest, type IdempotencyMigrationProvider } from './history.js'
import type { MigrateTable } from '../src/migrate.js'
import { create } from './0001_create.js'
import { codec } from './0002_codec.js'
import { recovery } from './0003_recovery.js'
import { migrationContext, type Mode } from './context.js'

export type { IdempotencyMigration, IdempotencyMigrationProvider } from './history.js'
export type { MigrationResult, MigrationResultSet } from '../src/migrate.js'

/** Options of {@link idempotencyMigrations}. */
export interface IdempotencyMigrationsOptions {
  /** Name of the idempotency table. Default `idempotency_keys`. */
  readonly tableName?: string
  /** The database module to use. Default: chosen from the Kysely instance the migration runs on. */
  readonly dialect?: IdempotencyDialect
}

/**
 * The idempotency table's schema as a Kysely `MigrationProvider`, for your own `Migrator`
 * or for kysely-ctl (`migrations.provider`). Migration names start with
 * `kysely_idempotency_<table>_`, so they sort apart from yours and two tables never collide.
 * Record them in the history tables {@link migrationTables} names, as `idempotency.migrate()`
 * and the command-line tool do. A migration whose change is already in the table (applied
 * from the printed DDL, or recorded in another history) is recorded without running again. A
 * `Migrator` given `db.withSchema(schema)` makes the table in that schema (give it
 * `migrationTableSchema: schema` too, so that the history is there as well).
 *
 * ### Examples
 *
 * ```ts
 * import { Migrator } from 'kysely/migration' // Kysely 0.28: from 'kysely'
 * import { idempotencyMigrations, migrationTables } from 'kysely-idempotency'
 * import { db } from './app'
 *
 * const migrator = new Migrator({ db, provider: idempotencyMigrations(), ...migrationTables() })
 * const { error } = await migrator.migrateToLatest()
 * ```
 */
export function idempotencyMigrations(options: IdempotencyMigrationsOptions = {}): IdempotencyMigrationProvider {
  return schemaMigrations(checkTableName(options.tableName ?? DEFAULT_TABLE), options.dialect, 'adopt')
}

/** The table's migrations, in order: each file holds one. */
const MIGRATIONS = [
  ['0001_create', create],
  ['0002_codec', codec],
  ['0003_recovery', recovery],
] as const

/** The migrations of the table `table`, named `kysely_idempotency_<table>_<migration>`. */
export function schemaMigrations(table: string, chosen: IdempotencyDialect | undefined, mode: Mode): IdempotencyMigrationProvider {
  const context = migrationContext(table, chosen, mode)
  const migrations = Object.fromEntries(MIGRATIONS.map(([name, migration]) => [`kysely_idempotency_${table}_${name}`, migration(context)]))
  return { getMigrations: async () => migrations }
}

/**
 * Where the migrations of `table` are recorded: `<table>_migration` and `<table>_migration_lock`,
 * used by `idempotency.migrate()`, the command-line tool, and your own `Migrator` when you
 * spread this into its options.
 */
export function migrationTables(table: string = DEFAULT_TABLE): { migrationTableName: string; migrationLockTableName: string } {
  const history = historyOf({ schema: undefined, name: checkTableName(table) })
  return { migrationTableName: history.table.name, migrationLockTableName: history.lock.name }
}

/** Attempts of a migration that lost a race against the same migration in another process. */
const MIGRATE_ATTEMPTS = 5

/**
 * Brings `table` to the latest schema with its own migration history; with `baseline`, only
 * records as applied what the table already has, and fails on anything it lacks. When several
 * processes migrate at once, the loser of a race on the history tables tries again and finds
 * the work done. `db` is the instance's own Kysely instance: its `withSchema` names the schema.
 */
export const migrateTable: MigrateTable = async (db, table, dialect, baseline) => {
  const migrations = await schemaMigrations(table.name, dialect, baseline ? 'baseline' : 'adopt').getMigrations()
  for (let attempt = 1; ; attempt++) {
    try {
      return await migrateToLatest(db, dialect, table, migrations)
    } catch (error) {
      if (error instanceof IdempotencyMigrationError) throw error
      if (attempt === MIGRATE_ATTEMPTS || !lostRace(error, dialect)) {
        throw new IdempotencyMigrationError(`Migrating the table "${qualified(table)}" failed: ${describe(error)}`, { cause: error })
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 50 * attempt * Math.random()))
  }
}

function lostRace(error: unknown, dialect: IdempotencyDialect): boolean {
  const kind = dialect.classify(error)
  if (kind === 'serialization_failure' || kind === 'deadlock' || kind === 'lock_timeout') return true
  // Creating a table or an index concurrently fails with "already exists" or a duplicate row
  // (in the catalog, or in the history table); the other process succeeded, so trying again is
  // right.
  return /already exists|duplicate|unique constraint/i.test(describe(error))
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error)
}

/** How many keys `table` holds, or `undefined` when there is no such table. */
export async function countKeys(db: Kysely<unknown>, table: TableName, dialect: IdempotencyDialect): Promise<number | undefined> {
  if (!(await dialect.upgrades.columns(db, table)).length) return undefined
  const { rows } = await sql<{ keys: number | string | bigint }>`select count(*) as ${sql.ref('keys')} from ${sql.table(qualified(table))}`.execute(
    db,
  )
  return Number(rows[0]?.keys ?? 0)
}

/**
 * Drops `table` and its migration history tables, whatever the history says (undoing 0002 alone
 * would leave values that only the codec column tells how to read).
 */
export async function dropTable(db: Kysely<unknown>, table: TableName): Promise<void> {
  const history = historyOf(table)
  for (const name of [table, history.table, history.lock]) await db.schema.dropTable(qualified(name)).ifExists().execute()
}
