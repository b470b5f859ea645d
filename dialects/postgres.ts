import { PostgresAdapter, PostgresDialect, PostgresIntrospector, PostgresQueryCompiler, sql, type RawBuilder } from 'kysely'
import { prepare } from '../src/sql.js'
import { driver, type DatabaseSupport } from './support.js'
import { qualified, type TableName } from '../src/table.js'
import {
  isAdapter,
  aliased,
  decodeKeyRow,
  errorProperty,
  keyRowColumns,
  CLAIM_SLOTS,
  insertedColumns,
  insertedValues,
  type DatabaseErrorKind,
  type DialectStatements,
  type IdempotencyDialect,
} from '../src/dialect.js'

const SQLSTATE: Readonly<Record<string, DatabaseErrorKind>> = {
  '40001': 'serialization_failure',
  '40P01': 'deadlock',
  '55P03': 'lock_timeout',
  // query_canceled: statement_timeout (or an operator's pg_cancel_backend) ended the statement.
  '57014': 'statement_timeout',
  '42P01': 'undefined_table',
}

/** The advisory lock id of Kysely's `PostgresAdapter.acquireMigrationLock`. */
const KYSELY_MIGRATION_LOCK = '3853314791062309107'

const clock = sql`statement_timestamp()`
const later = (ms: RawBuilder<unknown>) => sql`(statement_timestamp() + ${ms}::double precision * interval '1 millisecond')`
const jsonText = (column: RawBuilder<unknown>) => sql`${column}::text`
// Typed as text first: a parameter the server types as json, postgres.js would encode as a JSON string.
const json = (text: RawBuilder<unknown>) => sql`${text}::text::json`
const elapsed = (column: RawBuilder<unknown>) => sql`(extract(epoch from statement_timestamp() - ${column}) * 1000)::bigint`
const epochMs = (column: RawBuilder<unknown>) => sql`(extract(epoch from ${column}) * 1000)::bigint`
const columns = keyRowColumns({ clock, jsonText })
/** Where the claim keeps the caller's lock_timeout until it is put back. */
const PARKED = sql.lit('kysely_idempotency.lock_timeout')
// Outside a transaction (an autocommit claim) the parked value is gone by the next
// statement, and so is the claim's own setting: then the current value stays.
const restore = sql`set_config('lock_timeout', coalesce(nullif(current_setting(${PARKED}, true), ''), current_setting('lock_timeout')), true)`

/**
 * PostgreSQL (`pg`, or any Kysely dialect built on `PostgresAdapter`).
 *
 * The claim is one plain statement: `INSERT … ON CONFLICT DO NOTHING` waits for an
 * uncommitted insert of the same key, so its `WHERE` sets `lock_timeout` (transaction-local,
 * through `set_config`) before the insert and its `RETURNING` puts the caller's value back.
 * When the key exists nothing is returned; a second statement puts the value back and reads
 * the row, which a new statement sees once the competing transaction committed. A first
 * execution pays one cheap statement; only duplicates pay the second. Under REPEATABLE READ and
 * SERIALIZABLE, a key committed by a transaction the snapshot cannot see makes the insert
 * fail with a serialization failure (40001); the core reports it as a race.
 *
 * Responses are stored in a `json` column, which keeps the text as written, so a replay
 * has the first response's key order (`jsonb` would reorder keys).
 */
export const postgresDialect: IdempotencyDialect = {
  name: 'postgres',
  schemas: true,
  supports: (adapter) => isAdapter(adapter, PostgresAdapter),
  clock,
  later,
  elapsed,
  epochMs,
  jsonText,
  json,
  columnTypes: {
    id: 'bigint',
    identity: (column) => column.generatedByDefaultAsIdentity().primaryKey(),
    scope: 'varchar(255)',
    key: 'varchar(255)',
    text: 'varchar(255)',
    json: 'json',
    time: 'timestamptz',
  },
  upgrades: {
    async columns(db, table) {
      const { rows } = await sql<{ name: string }>`
        select attname as name from pg_attribute
        where attrelid = ${regclass(table)} and attnum > 0 and not attisdropped`.execute(db)
      return rows.map((r) => r.name)
    },
    async dropIndex(db, table, name) {
      // An index lives in its table's schema.
      await db.schema.dropIndex(qualified(table, name)).execute()
    },
    async migrationLock(db) {
      // Kysely's Migrator (0.28 and 0.29) holds this advisory lock for the session; taken for the
      // transaction here, it waits for a Migrator's, and a pooler cannot strand it.
      await sql`select pg_advisory_xact_lock(${sql.raw(KYSELY_MIGRATION_LOCK)})`.execute(db)
    },
    async indexes(db, table) {
      const { rows } = await sql<{ unique: boolean; columns: string }>`
        select i.indisunique as "unique", string_agg(a.attname, ',' order by k.n) as columns
        from pg_index i
        cross join lateral unnest(i.indkey) with ordinality as k(attnum, n)
        join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
        where i.indrelid = ${regclass(table)} and i.indpred is null and i.indexprs is null
        group by i.indexrelid, i.indisunique`.execute(db)
      return rows.map((r) => ({ unique: r.unique, columns: r.columns.split(',') }))
    },
  },
  classify(error) {
    const code = errorProperty(error, 'code')
    return typeof code === 'string' ? SQLSTATE[code] : undefined
  },
  async prepare(db, table) {
    // The previous lock_timeout is parked in a transaction-local custom setting: the argument
    // of the outer set_config is evaluated first, so the order is fixed without a CTE (whose
    // planning costs more than the insert itself).
    const claim = prepare(
      db,
      [...CLAIM_SLOTS, 'wait'],
      (p) => sql`
      insert into ${sql.table(table)} ${insertedColumns}
      select ${insertedValues({ clock, later, json }, p)}
      where set_config('lock_timeout', ${p.wait} || left(set_config(${PARKED}, current_setting('lock_timeout'), true), 0), true) is not null
      on conflict (scope, "key") do nothing
      returning id, ${restore} as restored`,
    )
    const existing = prepare(
      db,
      ['scope', 'key'],
      (p) => sql`
      select ${columns} from (select ${restore} as restored) as r
      left join ${aliased(table)} on k.scope = ${p.scope} and k."key" = ${p.key}`,
    )
    const lock = prepare(
      db,
      ['scope', 'key'],
      (p) => sql`
      select ${columns} from ${aliased(table)} where k.scope = ${p.scope} and k."key" = ${p.key} for update`,
    )
    const lockNow = prepare(
      db,
      ['scope', 'key'],
      (p) => sql`
      select ${columns} from ${aliased(table)} where k.scope = ${p.scope} and k."key" = ${p.key} for update nowait`,
    )
    const setWait = prepare(
      db,
      ['wait'],
      (p) => sql`
      with prev as materialized (select current_setting('lock_timeout') as setting)
      select prev.setting as setting, set_config('lock_timeout', ${p.wait}, true) from prev`,
    )
    const restoreWait = prepare(db, ['setting'], (p) => sql`select set_config('lock_timeout', ${p.setting}, true)`)
    const pruneBatch = prepare(
      db,
      ['limit'],
      (p) => sql`
      delete from ${sql.table(table)} where id in (
        select id from ${sql.table(table)}
        where expires_at <= ${clock} and (locked_until is null or locked_until <= ${clock})
        order by expires_at limit ${p.limit} for update skip locked)`,
    )

    const statements: DialectStatements = {
      async claim(db, values) {
        const { rows } = await db.executeQuery<{ id: string }>(claim.bind({ ...values, wait: lockTimeout(values.wait) }))
        if (rows[0]) return { claimed: rows[0].id }
        const found = await db.executeQuery<Record<string, unknown>>(existing.bind(values))
        const row = found.rows[0]
        return { claimed: null, row: row?.id == null ? undefined : decodeKeyRow(row) }
      },
      async lock(db, scope, key, wait) {
        const { rows } = await statements.withLockWait(db, wait, () => db.executeQuery<Record<string, unknown>>(lock.bind({ scope, key })))
        return rows[0] && decodeKeyRow(rows[0])
      },
      async lockNow(db, scope, key) {
        const { rows } = await db.executeQuery<Record<string, unknown>>(lockNow.bind({ scope, key }))
        return rows[0] && decodeKeyRow(rows[0])
      },
      async withLockWait(db, wait, run) {
        const { rows } = await db.executeQuery<{ setting: string }>(setWait.bind({ wait: lockTimeout(wait) }))
        const result = await run()
        await db.executeQuery(restoreWait.bind({ setting: rows[0]!.setting }))
        return result
      },
      async pruneBatch(db, limit) {
        const result = await db.executeQuery(pruneBatch.bind({ limit }))
        return Number(result.numAffectedRows ?? 0)
      },
    }
    return statements
  },
}

/**
 * The table's oid, or `NULL` when there is none: in its schema, else found through
 * `search_path`, as the library's statements find it.
 */
function regclass(table: TableName): RawBuilder<unknown> {
  return table.schema === undefined
    ? sql`to_regclass(quote_ident(${table.name}))`
    : sql`to_regclass(quote_ident(${table.schema}) || '.' || quote_ident(${table.name}))`
}

/** `lock_timeout` for a wait of `ms`: 0 would mean no limit, so "do not wait" is the shortest, 1 ms. */
function lockTimeout(ms: number): string {
  return String(Math.max(1, ms))
}

/** PostgreSQL in the registry, opened with pg. */
export const postgresSupport: DatabaseSupport = {
  label: 'PostgreSQL',
  names: ['postgres', 'postgresql'],
  dialect: postgresDialect,
  code: 'postgresDialect',
  urls: ['postgres://', 'postgresql://'],
  async open(location, { timeout }) {
    const pg = (await driver<{ default: typeof import('pg') }>('pg')).default
    return new PostgresDialect({ pool: new pg.Pool({ connectionString: location, max: 1, connectionTimeoutMillis: timeout }) })
  },
  kysely: { adapter: PostgresAdapter, compiler: PostgresQueryCompiler, introspector: PostgresIntrospector },
}
