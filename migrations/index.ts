import { sql, type Kysely } from 'kysely'
import type { IdempotencyDialect } from '../src/dialect.js'
import { detectDialect } from '../dialects/registry.js'
import { IdempotencyMigrationError } from '../src/errors.js'
import { checkTableName, DEFAULT_TABLE, locateTable, qualified, type TableName } from '../src/table.js'
import {
  historyOf,
  migrateToLatest,
  type IdempotencyMigration,
  type IdempotencyMigrationProvider,
} from './history.js'
import type { MigrateTable } from '../src/migrate.js'

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
 *
 * const migrator = new Migrator({ db, provider: idempotencyMigrations(), ...migrationTables() })
 * const { error } = await migrator.migrateToLatest()
 * ```
 */
export function idempotencyMigrations(options: IdempotencyMigrationsOptions = {}): IdempotencyMigrationProvider {
  return schemaMigrations(checkTableName(options.tableName ?? DEFAULT_TABLE), options.dialect, 'adopt')
}

/**
 * What a migration does with its change: `adopt` makes it unless the table already has it;
 * `baseline` only checks that the table has it (no DDL); `print` makes it without looking
 * (for printing the DDL without a database).
 */
type Mode = 'adopt' | 'baseline' | 'print'

/** The columns migration 0003 adds. */
const RECOVERY = ['flow_name', 'recovery_failures', 'recover_after'] as const

/** The columns migration 0001 creates. */
const CREATED = ['id', 'scope', 'key', 'fingerprint', 'recovery_point', 'phase_results', 'response', 'lock_token', 'locked_until', 'created_at', 'last_run_at', 'expires_at']

/**
 * The migrations of the table `table`. Each finds the table where the Kysely instance it is given
 * would (in the schema of `withSchema`, if any), and then runs without that instance's plugins.
 */
export function schemaMigrations(table: string, chosen: IdempotencyDialect | undefined, mode: Mode): IdempotencyMigrationProvider {
  /** What every migration works with: the database without plugins, the table, and the dialect. */
  const open = (db: Kysely<unknown>) => ({ plain: db.withoutPlugins(), where: locateTable(db, table), dialect: chosen ?? detectDialect(db) })
  const migrations: Record<string, IdempotencyMigration> = {
    [`kysely_idempotency_${table}_0001_create`]: {
      async up(db: Kysely<unknown>) {
        const { plain, where, dialect } = open(db)
        if (mode !== 'print') {
          const columns = await dialect.upgrades.columns(plain, where)
          if (columns.length || mode === 'baseline') {
            expectColumns(table, columns, CREATED, '0001_create')
            return expectIndexes(plain, where, dialect, mode)
          }
        }
        const types = dialect.columnTypes
        await plain.schema
          .createTable(qualified(where))
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
        await plain.schema.createIndex(`${table}_expires_at`).on(qualified(where)).column('expires_at').execute()
      },
      async down(db: Kysely<unknown>) {
        const { plain, where } = open(db)
        await plain.schema.dropTable(qualified(where)).execute()
      },
    },
    // Stored values name the codec that wrote them (rows from before hold plain JSON, codec
    // null); MySQL tables become utf8mb4 with a binary collation whatever the database default.
    [`kysely_idempotency_${table}_0002_codec`]: {
      async up(db: Kysely<unknown>) {
        const { plain, where, dialect } = open(db)
        const unicode = dialect.upgrades.unicode
        if (mode === 'print') {
          await plain.schema.alterTable(qualified(where)).addColumn('codec', dialect.columnTypes.text).execute()
          return unicode?.apply(plain, where)
        }
        const columns = await dialect.upgrades.columns(plain, where)
        if (mode === 'baseline' && !columns.includes('codec')) {
          throw new IdempotencyMigrationError(
            `The table "${table}" predates migration 0002_codec (it has no codec column), so there is nothing to record; ` +
              'run `kysely-idempotency migrate` without --baseline (or idempotency.migrate()) to add the column.',
          )
        }
        if (!columns.includes('codec')) await plain.schema.alterTable(qualified(where)).addColumn('codec', dialect.columnTypes.text).execute()
        if (!unicode || (await unicode.applied(plain, where))) return
        if (mode === 'baseline') {
          throw new IdempotencyMigrationError(
            `The table "${table}" is not in utf8mb4 with the utf8mb4_bin collation (migration 0002_codec); ` +
              'apply the DDL that `kysely-idempotency sql` prints, or migrate without baseline.',
          )
        }
        await unicode.apply(plain, where)
      },
      async down(db: Kysely<unknown>) {
        const { plain, where } = open(db)
        await plain.schema.alterTable(qualified(where)).dropColumn('codec').execute()
      },
    },
    // Flows defined by name are stored with it, so that the recovery worker can finish them:
    // `recover_after` is set only while such a flow is unfinished (its index holds nothing else).
    [`kysely_idempotency_${table}_0003_recovery`]: {
      async up(db: Kysely<unknown>) {
        const { plain, where, dialect } = open(db)
        const types = dialect.columnTypes
        const added: Record<(typeof RECOVERY)[number], (alter: ReturnType<Kysely<unknown>['schema']['alterTable']>) => { execute(): Promise<void> }> = {
          flow_name: (alter) => alter.addColumn('flow_name', types.text),
          recovery_failures: (alter) => alter.addColumn('recovery_failures', 'integer', (c) => c.notNull().defaultTo(0)),
          recover_after: (alter) => alter.addColumn('recover_after', types.time),
        }
        const index = () => plain.schema.createIndex(`${table}_recover_after`).on(qualified(where)).column('recover_after').execute()
        if (mode === 'print') {
          for (const column of RECOVERY) await added[column](plain.schema.alterTable(qualified(where))).execute()
          return index()
        }
        const columns = await dialect.upgrades.columns(plain, where)
        const missing = RECOVERY.filter((column) => !columns.includes(column))
        const indexed = (await dialect.upgrades.indexes(plain, where)).some((i) => i.columns[0] === 'recover_after')
        if (mode === 'baseline' && (missing.length || !indexed)) {
          throw new IdempotencyMigrationError(
            `The table "${table}" predates migration 0003_recovery (it lacks ${missing.length ? missing.join(', ') : 'the index on recover_after'}), ` +
              'so there is nothing to record; run `kysely-idempotency migrate` without --baseline (or idempotency.migrate()) to add it.',
          )
        }
        for (const column of missing) await added[column](plain.schema.alterTable(qualified(where))).execute()
        if (!indexed) await index()
      },
      async down(db: Kysely<unknown>) {
        const { plain, where, dialect } = open(db)
        await dialect.upgrades.dropIndex(plain, where, `${table}_recover_after`)
        for (const column of [...RECOVERY].reverse()) await plain.schema.alterTable(qualified(where)).dropColumn(column).execute()
      },
    },
  }
  return { getMigrations: async () => migrations }
}

function expectColumns(table: string, found: readonly string[], wanted: readonly string[], migration: string): void {
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
async function expectIndexes(db: Kysely<unknown>, where: TableName, dialect: IdempotencyDialect, mode: Mode): Promise<void> {
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
  const { rows } = await sql<{ keys: number | string | bigint }>`select count(*) as ${sql.ref('keys')} from ${sql.table(qualified(table))}`.execute(db)
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
