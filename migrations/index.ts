import { Migrator, type Kysely, type Migration, type MigrationProvider, type MigrationResultSet } from 'kysely'
import type { IdempotencyDialect } from '../src/dialect.js'
import { checkTableName, DEFAULT_TABLE, detectDialect } from '../src/detect.js'
import { IdempotencyError } from '../src/errors.js'

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
 *
 * ### Examples
 *
 * ```ts
 * import { Migrator } from 'kysely'
 * import { idempotencyMigrations } from 'kysely-idempotency'
 *
 * const migrator = new Migrator({ db, provider: idempotencyMigrations(), migrationTableName: 'idempotency_migration' })
 * const { error } = await migrator.migrateToLatest()
 * ```
 */
export function idempotencyMigrations(options: IdempotencyMigrationsOptions = {}): MigrationProvider {
  const table = checkTableName(options.tableName ?? DEFAULT_TABLE)
  const migrations: Record<string, Migration> = {
    [`kysely_idempotency_${table}_0001_create`]: {
      async up(db: Kysely<unknown>) {
        const types = (options.dialect ?? detectDialect(db)).columnTypes
        await db.schema
          .createTable(table)
          .addColumn('id', types.id, (c) => types.identity(c))
          .addColumn('scope', types.scope, (c) => c.notNull())
          .addColumn('key', types.key, (c) => c.notNull())
          .addColumn('fingerprint', types.text, (c) => c.notNull())
          .addColumn('recovery_point', types.text, (c) => c.notNull())
          .addColumn('phase_results', types.json)
          .addColumn('response', types.json)
          .addColumn('lock_token', types.text)
          .addColumn('locked_until', types.time)
          .addColumn('created_at', types.time, (c) => c.notNull())
          .addColumn('last_run_at', types.time, (c) => c.notNull())
          .addColumn('expires_at', types.time, (c) => c.notNull())
          .addUniqueConstraint(`${table}_scope_key`, ['scope', 'key'])
          .execute()
        await db.schema.createIndex(`${table}_expires_at`).on(table).column('expires_at').execute()
      },
      async down(db: Kysely<unknown>) {
        await db.schema.dropTable(table).execute()
      },
    },
    // Stored values name the codec that wrote them (rows from before hold plain JSON, codec
    // null); MySQL tables become utf8mb4 with a binary collation whatever the database default.
    [`kysely_idempotency_${table}_0002_codec`]: {
      async up(db: Kysely<unknown>) {
        const dialect = options.dialect ?? detectDialect(db)
        await db.schema.alterTable(table).addColumn('codec', dialect.columnTypes.text).execute()
        await dialect.upgrades.unicode?.(db, table)
      },
      async down(db: Kysely<unknown>) {
        await db.schema.alterTable(table).dropColumn('codec').execute()
      },
    },
  }
  return { getMigrations: async () => migrations }
}

/** Where {@link migrateTable} records the migrations of `table`. */
export function migrationTables(table: string): { migrationTableName: string; migrationLockTableName: string } {
  return { migrationTableName: `${table}_migration`, migrationLockTableName: `${table}_migration_lock` }
}

/** Attempts of a migration that lost a race against the same migration in another process. */
const MIGRATE_ATTEMPTS = 5

/**
 * Brings `table` to the latest schema with its own migration history. When several processes
 * migrate at once, the loser of a race on the history tables tries again and finds the work done.
 */
export async function migrateTable(db: Kysely<unknown>, table: string, dialect: IdempotencyDialect): Promise<MigrationResultSet> {
  const migrator = new Migrator({
    db: db.withoutPlugins(),
    provider: idempotencyMigrations({ tableName: table, dialect }),
    ...migrationTables(table),
  })
  for (let attempt = 1; ; attempt++) {
    const result = await migrator.migrateToLatest()
    if (!result.error) return result
    if (attempt === MIGRATE_ATTEMPTS || !lostRace(result.error, dialect)) {
      throw new IdempotencyError('migration_failed', 500, `Migrating the table "${table}" failed: ${describe(result.error)}`, {
        cause: result.error,
      })
    }
    await new Promise((resolve) => setTimeout(resolve, 50 * attempt * Math.random()))
  }
}

function lostRace(error: unknown, dialect: IdempotencyDialect): boolean {
  const kind = dialect.classify(error)
  if (kind === 'serialization_failure' || kind === 'deadlock' || kind === 'lock_timeout') return true
  // Creating the history tables concurrently fails with "already exists" or a duplicate row
  // in the catalog; the other process's creation succeeded, so trying again is right.
  return /already exists|duplicate/i.test(describe(error))
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error)
}
