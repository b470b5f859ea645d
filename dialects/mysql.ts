import { MysqlAdapter, MysqlDialect, MysqlIntrospector, MysqlQueryCompiler, sql, type Kysely, type MysqlPool, type RawBuilder } from 'kysely'
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

/** `ER_DUP_ENTRY`: the key exists; the insert still waited for and locked the existing row. */
const DUPLICATE_KEY = 1062

const ERRNO: Readonly<Record<number, DatabaseErrorKind>> = {
  1213: 'deadlock',
  1205: 'lock_timeout',
  // ER_LOCK_NOWAIT: MySQL's answer to NOWAIT (MariaDB answers 1205).
  3572: 'lock_timeout',
  // MariaDB's max_statement_time, MySQL's max_execution_time (which bounds a SELECT).
  1969: 'statement_timeout',
  3024: 'statement_timeout',
  1146: 'undefined_table',
}

const clock = sql`utc_timestamp(3)`
const later = (ms: RawBuilder<unknown>) => sql`(utc_timestamp(3) + interval ${ms} * 1000 microsecond)`
const jsonText = (column: RawBuilder<unknown>) => column
const json = (text: RawBuilder<unknown>) => text
const elapsed = (column: RawBuilder<unknown>) => sql`(timestampdiff(microsecond, ${column}, utc_timestamp(3)) div 1000)`
// DATETIME holds UTC times (utc_timestamp), so the difference to the epoch is taken without a time zone.
const epochMs = (column: RawBuilder<unknown>) => sql`(timestampdiff(microsecond, '1970-01-01 00:00:00', ${column}) div 1000)`
const columns = keyRowColumns({ clock, jsonText })

/** How MySQL and MariaDB differ in bounding a row-lock wait for one statement. */
export interface MysqlDialectOptions {
  /**
   * Bound lock waits per statement with MariaDB's `SET STATEMENT innodb_lock_wait_timeout=N FOR …`
   * (no extra round trip). When `false`, the session value is set before the statement and
   * put back after it, which works on MySQL, where `innodb_lock_wait_timeout` cannot be set
   * per statement. Default: asked of the server once (`SELECT VERSION()`).
   */
  readonly statementLockWait?: boolean
}

/**
 * MySQL and MariaDB with InnoDB (`mysql2`, or any Kysely dialect built on `MysqlAdapter`).
 *
 * The claim is a plain `INSERT` whose duplicate-key error (1062) means "the key exists": when
 * another transaction holds an uncommitted insert of the same key, InnoDB makes it wait and then
 * leaves it holding a shared lock on that row; the error rolls back that statement only. (Not
 * `INSERT IGNORE`, which would also turn, in strict mode, an error such as an invalid value
 * into a warning and store something else.) A
 * plain `SELECT` under REPEATABLE READ would answer from the transaction's snapshot, which
 * may predate the competing commit, so the row is read with a locking read. It is a shared
 * one (`LOCK IN SHARE MODE`): every duplicate already holds a shared lock, and asking for
 * an exclusive one would make them deadlock against each other. A deadlock that InnoDB
 * still reports (three inserters of a key whose first one rolled back) aborts the whole
 * transaction; the core reports it as a race.
 *
 * `key` and `scope` are `VARBINARY`, so keys compare byte by byte: no case folding and no
 * trailing-space padding, as the other databases compare them. Responses are `LONGTEXT`,
 * kept as written (MySQL's `JSON` type would reorder keys). The table is `utf8mb4` with a
 * binary collation whatever the database's default, so any Unicode text is stored as sent.
 *
 * ### Examples
 *
 * ```ts
 * import { createIdempotency, mysqlDialect } from 'kysely-idempotency'
 * import { db } from './app'
 *
 * createIdempotency({ db, dialect: mysqlDialect({ statementLockWait: false }) })
 * ```
 */
export function mysqlDialect(options: MysqlDialectOptions = {}): IdempotencyDialect {
  return {
    name: 'mysql',
    schemas: true,
    supports: (adapter) => isAdapter(adapter, MysqlAdapter),
    clock,
    later,
    elapsed,
    epochMs,
    jsonText,
    json,
    columnTypes: {
      id: 'bigint',
      identity: (column) => column.autoIncrement().primaryKey(),
      scope: sql`varbinary(1020)`,
      key: sql`varbinary(255)`,
      text: 'varchar(255)',
      json: sql`longtext`,
      time: sql`datetime(3)`,
    },
    upgrades: {
      async columns(db, table) {
        const { rows } = await sql<{ name: string }>`
          select column_name as name from information_schema.columns where ${inTable(table)}`.execute(db)
        return rows.map((r) => r.name.toLowerCase())
      },
      async dropIndex(db, table, name) {
        await db.schema.dropIndex(name).on(qualified(table)).execute()
      },
      async indexes(db, table) {
        // A prefix index (sub_part) or a functional one (no column name) is not the plain index the statements need.
        const { rows } = await sql<{ nonUnique: number | string; columns: string; partial: number | string }>`
          select non_unique as ${sql.ref('nonUnique')}, group_concat(lower(column_name) order by seq_in_index separator ',') as columns,
            sum(sub_part is not null or column_name is null) as partial
          from information_schema.statistics where ${inTable(table)}
          group by index_name, non_unique`.execute(db)
        return rows.filter((r) => Number(r.partial) === 0).map((r) => ({ unique: Number(r.nonUnique) === 0, columns: String(r.columns).split(',') }))
      },
      unicode: {
        // Converting rebuilds the whole table, so a table already in utf8mb4_bin is left alone.
        async applied(db, table) {
          const { rows } = await sql<{ other: number | string }>`
            select count(*) as other from information_schema.columns
            where ${inTable(table)} and collation_name is not null and collation_name <> 'utf8mb4_bin'
            union all
            select count(*) from information_schema.tables
            where ${inTable(table)} and table_collation <> 'utf8mb4_bin'`.execute(db)
          return rows.every((r) => Number(r.other) === 0)
        },
        async apply(db, table) {
          await sql`alter table ${sql.table(qualified(table))} convert to character set utf8mb4 collate utf8mb4_bin`.execute(db)
        },
      },
    },
    classify(error) {
      const errno = errorProperty(error, 'errno')
      return typeof errno === 'number' ? ERRNO[errno] : undefined
    },
    async prepare(db, table) {
      const statementLockWait = options.statementLockWait ?? (await isMariadb(db))
      const waitPrefix = (seconds: RawBuilder<unknown>) => (statementLockWait ? sql`set statement innodb_lock_wait_timeout = ${seconds} for ` : sql``)
      const claim = prepare(
        db,
        [...CLAIM_SLOTS, 'seconds'],
        (p) => sql`${waitPrefix(p.seconds)}
        insert into ${sql.table(table)} ${insertedColumns} values (${insertedValues({ clock, later, json }, p)})`,
      )
      const latest = prepare(
        db,
        ['scope', 'key', 'seconds'],
        (p) => sql`${waitPrefix(p.seconds)}
        select ${columns} from ${aliased(table)} where k.scope = ${p.scope} and k.\`key\` = ${p.key} lock in share mode`,
      )
      const lock = prepare(
        db,
        ['scope', 'key', 'seconds'],
        (p) => sql`${waitPrefix(p.seconds)}
        select ${columns} from ${aliased(table)} where k.scope = ${p.scope} and k.\`key\` = ${p.key} for update`,
      )
      const lockNow = prepare(
        db,
        ['scope', 'key'],
        (p) => sql`
        select ${columns} from ${aliased(table)} where k.scope = ${p.scope} and k.\`key\` = ${p.key} for update nowait`,
      )
      const setWait = prepare(
        db,
        ['seconds'],
        (p) => sql`
        set @kysely_idempotency_wait = @@innodb_lock_wait_timeout, innodb_lock_wait_timeout = ${p.seconds}`,
      )
      const restoreWait = prepare(db, [], () => sql`set innodb_lock_wait_timeout = @kysely_idempotency_wait`)
      // Rows another transaction holds (a request reclaiming an expired key) are skipped, not
      // waited for. The delete reads the chosen ids first (STRAIGHT_JOIN): scanning the table
      // itself would lock, and wait for, every row it passes.
      const pruneBatch = prepare(
        db,
        ['limit'],
        (p) => sql`
        delete k from (
          select id from ${sql.table(table)}
          where expires_at <= ${clock} and (locked_until is null or locked_until <= ${clock})
          order by expires_at limit ${p.limit} for update skip locked) as expired
        straight_join ${sql.table(table)} as k on k.id = expired.id`,
      )

      const withLockWait = async <T>(db: Kysely<unknown>, wait: number, run: () => Promise<T>): Promise<T> => {
        await db.executeQuery(setWait.bind({ seconds: toSeconds(wait) }))
        let result: T
        try {
          result = await run()
        } catch (error) {
          // The session outlives the transaction: put the setting back before the connection
          // returns to the pool, and report the statement's own error.
          await db.executeQuery(restoreWait.bind({})).catch(() => undefined)
          throw error
        }
        await db.executeQuery(restoreWait.bind({}))
        return result
      }
      const bounded = <T>(db: Kysely<unknown>, wait: number, run: () => Promise<T>): Promise<T> =>
        statementLockWait ? run() : withLockWait(db, wait, run)

      const statements: DialectStatements = {
        async claim(db, values) {
          try {
            const result = await bounded(db, values.wait, () => db.executeQuery(claim.bind({ ...values, seconds: toSeconds(values.wait) })))
            return { claimed: String(result.insertId) }
          } catch (error) {
            if (errorProperty(error, 'errno') === DUPLICATE_KEY) return { claimed: null, row: undefined }
            throw error
          }
        },
        async latest(db, scope, key, wait) {
          const { rows } = await bounded(db, wait, () =>
            db.executeQuery<Record<string, unknown>>(latest.bind({ scope, key, seconds: toSeconds(wait) })),
          )
          return rows[0] && decodeKeyRow(rows[0])
        },
        async lock(db, scope, key, wait) {
          const { rows } = await bounded(db, wait, () =>
            db.executeQuery<Record<string, unknown>>(lock.bind({ scope, key, seconds: toSeconds(wait) })),
          )
          return rows[0] && decodeKeyRow(rows[0])
        },
        async lockNow(db, scope, key) {
          const { rows } = await db.executeQuery<Record<string, unknown>>(lockNow.bind({ scope, key }))
          return rows[0] && decodeKeyRow(rows[0])
        },
        withLockWait,
        async pruneBatch(db, limit) {
          const result = await db.executeQuery(pruneBatch.bind({ limit }))
          return Number(result.numAffectedRows ?? 0)
        },
      }
      return statements
    },
  }
}

/** The catalog rows of `table`: in its database (`withSchema`), else in the connection's. */
function inTable(table: TableName): RawBuilder<unknown> {
  const schema = table.schema === undefined ? sql`database()` : sql`${table.schema}`
  return sql`table_schema = ${schema} and table_name = ${table.name}`
}

/**
 * `innodb_lock_wait_timeout` for a wait of `ms`, in whole seconds. 0 does not wait on MariaDB;
 * MySQL raises it to its minimum, 1 s.
 */
function toSeconds(ms: number): number {
  return Math.ceil(ms / 1000)
}

async function isMariadb(db: Kysely<unknown>): Promise<boolean> {
  const { rows } = await db.executeQuery<{ version: string }>(prepare(db, [], () => sql`select version() as version`).bind({}))
  return /mariadb/i.test(rows[0]?.version ?? '')
}

/** MySQL and MariaDB in the registry, opened with mysql2. */
export const mysqlSupport: DatabaseSupport = {
  label: 'MySQL/MariaDB',
  names: ['mysql', 'mariadb'],
  dialect: mysqlDialect(),
  code: 'mysqlDialect()',
  urls: ['mysql://', 'mariadb://'],
  async open(location, { timeout }) {
    const mysql = await driver<typeof import('mysql2')>('mysql2')
    const pool = mysql.createPool({ uri: location.replace(/^mariadb:/i, 'mysql:'), connectionLimit: 1, connectTimeout: timeout })
    // Recent mysql2 types its query values as a mutable array, which Kysely's MysqlPool interface
    // rejects; the call is the same at run time.
    return new MysqlDialect({ pool: pool as unknown as MysqlPool })
  },
  kysely: { adapter: MysqlAdapter, compiler: MysqlQueryCompiler, introspector: MysqlIntrospector },
}
