import { sql, type Kysely } from 'kysely'
import type { IdempotencyDialect, TableUpgrades } from '../src/dialect.js'
import type { MigrationResult, MigrationResultSet } from '../src/migrate.js'
import { qualified, type TableName } from '../src/table.js'

/** One migration of the idempotency table, as Kysely's `Migrator` and kysely-ctl take it. */
export interface IdempotencyMigration {
  // biome-ignore lint/suspicious/noExplicitAny: Kysely's own Migration takes Kysely<any>; anything narrower is not assignable to it.
  up(db: Kysely<any>): Promise<void>
  // biome-ignore lint/suspicious/noExplicitAny: as for up.
  down(db: Kysely<any>): Promise<void>
}

/** The migrations of the idempotency table by name; a Kysely `MigrationProvider` in every Kysely version. */
export interface IdempotencyMigrationProvider {
  getMigrations(): Promise<Record<string, IdempotencyMigration>>
}

/** A migration, and when it was recorded as applied (`undefined`: pending). */
export interface MigrationState {
  readonly name: string
  readonly executedAt: Date | undefined
}

/**
 * The history tables of the idempotency table `table`: `<name>_migration` and
 * `<name>_migration_lock`, in the table's schema. They have the columns and the lock row of
 * Kysely's `Migrator`, so that the history one writes is the history the other reads: a
 * `Migrator` (Kysely 0.28's or 0.29's) given {@link migrationTables} and this library's own
 * runner below record in the same place.
 */
export function historyOf(table: TableName): { readonly table: TableName; readonly lock: TableName } {
  return { table: { ...table, name: `${table.name}_migration` }, lock: { ...table, name: `${table.name}_migration_lock` } }
}

/** The id of the one row of the lock table, as Kysely's `Migrator` writes it. */
const LOCK_ROW = 'migration_lock'

/**
 * Runs the migrations of `table` that its history does not list, in name order, and records
 * each. Kysely's `Migrator` moved between Kysely versions (`kysely` in 0.28, `kysely/migration`
 * in 0.29), so the library runs its few migrations itself, with the same history format.
 *
 * When the history lists every migration (every start of an app but the first), nothing is
 * locked. Otherwise, where DDL is transactional (Postgres, SQLite), everything runs in one READ
 * COMMITTED transaction that first locks the history's lock row: a second migrator waits for it,
 * then finds the work recorded. The lock is a row, not a session-level advisory lock, so this
 * also works through a pooler in transaction mode; the dialect may add the lock Kysely's
 * `Migrator` takes, as a transaction-level one ({@link TableUpgrades.migrationLock}). Elsewhere
 * (MySQL), one connection holds the adapter's own migration lock (`GET_LOCK`, the one Kysely's
 * `Migrator` takes) while the migrations run.
 *
 * `migrations` receive `db` itself (with its plugins, so that they find the schema of a
 * `withSchema` instance) or a transaction or connection of it.
 */
export async function migrateToLatest(
  db: Kysely<unknown>,
  dialect: IdempotencyDialect,
  table: TableName,
  migrations: Record<string, IdempotencyMigration>,
): Promise<MigrationResultSet> {
  const history = historyOf(table)
  const pending = async (on: Kysely<unknown>) => {
    const done = await recorded(on, history.table)
    return Object.keys(migrations)
      .sort()
      .filter((name) => !done.has(name))
  }
  const plain = db.withoutPlugins()
  if ((await dialect.upgrades.columns(plain, history.table)).length && !(await pending(plain)).length) return { results: [] }
  await ensureHistory(plain, dialect, history)
  const run = async (on: Kysely<unknown>): Promise<MigrationResultSet> => {
    const plain = on.withoutPlugins()
    const results: MigrationResult[] = []
    for (const name of await pending(plain)) {
      await migrations[name]!.up(on)
      await plain
        .insertInto(qualified(history.table) as never)
        .values({ name, timestamp: new Date().toISOString() } as never)
        .execute()
      results.push({ migrationName: name, direction: 'Up', status: 'Success' })
    }
    return { results }
  }
  const adapter = db.getExecutor().adapter
  if (adapter.supportsTransactionalDdl) {
    // Under SERIALIZABLE or REPEATABLE READ, every migrator that waited for the lock row would fail
    // once the first commits; READ COMMITTED lets it read the history the first one wrote.
    return db
      .transaction()
      .setIsolationLevel('read committed')
      .execute(async (trx) => {
        await dialect.upgrades.migrationLock?.(trx.withoutPlugins())
        await sql`update ${sql.table(qualified(history.lock))} set is_locked = 1 where id = ${LOCK_ROW}`.execute(trx.withoutPlugins())
        const result = await run(trx)
        await sql`update ${sql.table(qualified(history.lock))} set is_locked = 0 where id = ${LOCK_ROW}`.execute(trx.withoutPlugins())
        return result
      })
  }
  return db.connection().execute(async (connection) => {
    const options = { lockTable: history.lock.name, lockRowId: LOCK_ROW, ...(table.schema === undefined ? {} : { lockTableSchema: table.schema }) }
    await adapter.acquireMigrationLock(connection, options)
    try {
      return await run(connection)
    } finally {
      await adapter.releaseMigrationLock(connection, options)
    }
  })
}

/** Every migration of `migrations` in name order, with when it was recorded as applied. */
export async function migrationStates(
  db: Kysely<unknown>,
  dialect: IdempotencyDialect,
  table: TableName,
  migrations: Record<string, IdempotencyMigration>,
): Promise<MigrationState[]> {
  const history = historyOf(table).table
  const plain = db.withoutPlugins()
  const done = (await dialect.upgrades.columns(plain, history)).length ? await recorded(plain, history) : new Map<string, Date>()
  return Object.keys(migrations)
    .sort()
    .map((name) => ({ name, executedAt: done.get(name) }))
}

/** The migrations the history lists, with when each was recorded. */
async function recorded(db: Kysely<unknown>, history: TableName): Promise<Map<string, Date>> {
  const { rows } = await sql<{ name: string; timestamp: string }>`select name, ${sql.ref('timestamp')} from ${sql.table(qualified(history))}`.execute(
    db,
  )
  return new Map(rows.map((row) => [row.name, new Date(row.timestamp)]))
}

/**
 * Creates the history tables and the lock row where missing. Two processes may do it at once:
 * an error is ignored when what it was about to make is there afterwards (Postgres can fail a
 * `create table if not exists` that loses a race in its catalog).
 */
async function ensureHistory(db: Kysely<unknown>, dialect: IdempotencyDialect, history: ReturnType<typeof historyOf>): Promise<void> {
  const exists = async (t: TableName) => (await dialect.upgrades.columns(db, t)).length > 0
  if (!(await exists(history.table))) {
    const schema = history.table.schema
    // Creating a schema needs a privilege that creating a table in it does not, even with
    // `if not exists` (Postgres checks it first): only a schema that is missing is created.
    if (schema !== undefined && !(await db.introspection.getSchemas()).some((s) => s.name === schema)) {
      const create = () => db.schema.createSchema(schema).ifNotExists().execute()
      // A second `if not exists` succeeds once the schema that won the race is there.
      await create().catch(create)
    }
    await tolerate(
      () =>
        db.schema
          .createTable(qualified(history.table))
          .ifNotExists()
          .addColumn('name', 'varchar(255)', (c) => c.notNull().primaryKey())
          .addColumn('timestamp', 'varchar(255)', (c) => c.notNull())
          .execute(),
      () => exists(history.table),
    )
  }
  if (!(await exists(history.lock))) {
    await tolerate(
      () =>
        db.schema
          .createTable(qualified(history.lock))
          .ifNotExists()
          .addColumn('id', 'varchar(255)', (c) => c.notNull().primaryKey())
          .addColumn('is_locked', 'integer', (c) => c.notNull().defaultTo(0))
          .execute(),
      () => exists(history.lock),
    )
  }
  const lockRow = async () => (await sql`select id from ${sql.table(qualified(history.lock))} where id = ${LOCK_ROW}`.execute(db)).rows.length > 0
  if (!(await lockRow())) {
    await tolerate(() => sql`insert into ${sql.table(qualified(history.lock))} (id, is_locked) values (${LOCK_ROW}, 0)`.execute(db), lockRow)
  }
}

async function tolerate(make: () => Promise<unknown>, made: () => Promise<boolean>): Promise<void> {
  try {
    await make()
  } catch (error) {
    if (!(await made())) throw error
  }
}
