import { CompiledQuery, SqliteAdapter, SqliteDialect, SqliteIntrospector, SqliteQueryCompiler, sql, type RawBuilder } from 'kysely'
import { prepare } from '../src/sql.js'
import { driver, OpenError, type DatabaseSupport } from './support.js'
import {
  isAdapter,
  aliased,
  CLAIM_SLOTS,
  decodeKeyRow,
  errorProperty,
  insertedColumns,
  insertedValues,
  keyRowColumns,
  type DialectStatements,
  type IdempotencyDialect,
} from '../src/dialect.js'

/** Milliseconds since the Unix epoch on the database clock (SQLite has no timestamp type). */
const clock = sql`cast((julianday('now') - 2440587.5) * 86400000 as integer)`
const later = (ms: RawBuilder<unknown>) => sql`(${clock} + ${ms})`
const jsonText = (column: RawBuilder<unknown>) => column
const json = (text: RawBuilder<unknown>) => text
const elapsed = (column: RawBuilder<unknown>) => sql`(${clock} - ${column})`

const epochMs = (column: RawBuilder<unknown>) => column
/**
 * SQLite (`better-sqlite3`, or any Kysely dialect built on `SqliteAdapter`).
 *
 * SQLite has one writer at a time. The claim is the first statement of the transaction and
 * a write, so it takes the write lock before the transaction has read anything, as
 * `BEGIN IMMEDIATE` would; a writer that read first would instead fail at its first write
 * with `SQLITE_BUSY_SNAPSHOT` (reported as a race). How long a writer waits for the lock
 * is the connection's busy timeout (better-sqlite3's `timeout` option, default 5 s), not
 * `conflictWait`: changing it per statement would cost two statements per request. Use WAL
 * mode when several processes share the file.
 *
 * Times are integers (milliseconds since the epoch), JSON is `TEXT` kept as written.
 */
export const sqliteDialect: IdempotencyDialect = {
  name: 'sqlite',
  // `withSchema` names an attached database there, where Kysely's schema builder cannot make an index.
  schemas: false,
  supports: (adapter) => isAdapter(adapter, SqliteAdapter),
  clock,
  later,
  elapsed,
  epochMs,
  jsonText,
  json,
  columnTypes: {
    id: 'integer',
    identity: (column) => column.primaryKey(),
    scope: 'text',
    key: 'text',
    text: 'text',
    json: 'text',
    time: 'integer',
  },
  upgrades: {
    async columns(db, table) {
      const { rows } = await sql<{ name: string }>`select name from pragma_table_info(${table.name})`.execute(db)
      return rows.map((r) => r.name.toLowerCase())
    },
    async dropIndex(db, _table, name) {
      await db.schema.dropIndex(name).execute()
    },
    async indexes(db, table) {
      const { rows } = await sql<{ index: string; unique: number; partial: number; column: string | null; rank: number }>`
        select l.name as "index", l."unique" as "unique", l.partial as partial, i.name as "column", i.seqno as rank
        from pragma_index_list(${table.name}) as l join pragma_index_info(l.name) as i`.execute(db)
      const byIndex = new Map<string, typeof rows>()
      for (const row of rows) byIndex.set(row.index, [...(byIndex.get(row.index) ?? []), row])
      return [...byIndex.values()]
        .filter((parts) => parts.every((p) => p.partial === 0 && p.column !== null))
        .map((parts) => ({ unique: parts[0]!.unique === 1, columns: parts.sort((a, b) => a.rank - b.rank).map((p) => p.column!.toLowerCase()) }))
    },
  },
  classify(error) {
    const code = errorProperty(error, 'code')
    if (typeof code !== 'string') return undefined
    if (code === 'SQLITE_BUSY_SNAPSHOT') return 'serialization_failure'
    if (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED')) return 'lock_timeout'
    if (code === 'SQLITE_ERROR' && /no such table/i.test(String((error as Error).message))) return 'undefined_table'
    return undefined
  },
  async prepare(db, table) {
    const claim = prepare(
      db,
      CLAIM_SLOTS,
      (p) => sql`
      insert into ${sql.table(table)} ${insertedColumns} values (${insertedValues({ clock, later, json }, p)})
      on conflict (scope, "key") do nothing
      returning id as id`,
    )
    // A write statement takes the write lock even when it changes no row.
    const writeLock = prepare(
      db,
      ['scope', 'key'],
      (p) => sql`
      update ${sql.table(table)} set id = id where scope = ${p.scope} and "key" = ${p.key}`,
    )
    const read = prepare(
      db,
      ['scope', 'key'],
      (p) => sql`
      select ${keyRowColumns({ clock, jsonText })} from ${aliased(table)} where k.scope = ${p.scope} and k."key" = ${p.key}`,
    )
    const busyTimeout = prepare(db, [], () => sql`pragma busy_timeout`)
    // A pragma takes no bound parameter; the value is an integer written into the statement.
    const setBusyTimeout = (ms: number) => CompiledQuery.raw(`pragma busy_timeout = ${Math.trunc(ms)}`)
    const pruneBatch = prepare(
      db,
      ['limit'],
      (p) => sql`
      delete from ${sql.table(table)} where id in (
        select id from ${sql.table(table)}
        where expires_at <= ${clock} and (locked_until is null or locked_until <= ${clock})
        order by expires_at limit ${p.limit})`,
    )

    const statements: DialectStatements = {
      async claim(db, values) {
        const { rows } = await db.executeQuery<{ id: number }>(claim.bind(values))
        if (rows[0]) return { claimed: rows[0].id }
        return { claimed: null, row: undefined }
      },
      async lock(db, scope, key) {
        await db.executeQuery(writeLock.bind({ scope, key }))
        const { rows } = await db.executeQuery<Record<string, unknown>>(read.bind({ scope, key }))
        return rows[0] && decodeKeyRow(rows[0])
      },
      // The busy timeout is the connection's: set to 0 around the write lock, and put back.
      async lockNow(db, scope, key) {
        const { rows } = await db.executeQuery<{ timeout: number | bigint }>(busyTimeout.bind({}))
        await db.executeQuery(setBusyTimeout(0))
        try {
          return await statements.lock(db, scope, key, 0)
        } finally {
          await db.executeQuery(setBusyTimeout(Number(rows[0]?.timeout ?? 0)))
        }
      },
      withLockWait: (_db, _wait, run) => run(),
      async pruneBatch(db, limit) {
        const result = await db.executeQuery(pruneBatch.bind({ limit }))
        return Number(result.numAffectedRows ?? 0)
      },
    }
    return statements
  },
}

/** SQLite in the registry, opened with better-sqlite3: `sqlite:PATH`, or a path ending in `.db`, `.sqlite` or `.sqlite3`. */
export const sqliteSupport: DatabaseSupport = {
  label: 'SQLite',
  names: ['sqlite'],
  dialect: sqliteDialect,
  code: 'sqliteDialect',
  urls: ['sqlite:PATH', 'a *.db path'],
  // A path with no scheme that ends like a database file, or a Windows path (whose drive looks like a scheme).
  owns: (location) => (!/^[a-z][a-z0-9+.-]*:/i.test(location) && /\.(db|sqlite3?)$/i.test(location)) || /^[a-z]:[\\/]/i.test(location),
  async open(location, { create }) {
    const path = location.replace(/^sqlite:(\/\/)?/i, '')
    const Database = (await driver<{ default: typeof import('better-sqlite3') }>('better-sqlite3')).default
    try {
      return new SqliteDialect({ database: new Database(path, { fileMustExist: !create }) })
    } catch (error) {
      throw new OpenError(`Cannot open the SQLite file ${path}: ${(error as Error).message}.`, { cause: error })
    }
  },
  kysely: { adapter: SqliteAdapter, compiler: SqliteQueryCompiler, introspector: SqliteIntrospector },
}
