import { sql, type Kysely, type RawBuilder, type Transaction } from 'kysely'
import type { DatabaseName } from '../test/support/databases.js'
import { KEYS_TABLE, type BenchDB } from './support.js'

/**
 * The library's statement sequences written out by hand with Kysely's `sql`, no library code in
 * between: what the idempotency table costs the database, so that the benchmark can tell it from
 * what the library's JavaScript adds. The statements have the shape of the library's (the same
 * columns, clock expressions and lock-wait handling per database), so both send the same SQL.
 */
export interface RawSequences {
  /** The library's sequence: read the key; then claim it first, run `work`, store the response. */
  claimFirst(key: string, work: (trx: Transaction<BenchDB>) => Promise<unknown>): Promise<unknown>
  /** The claim-last sequence: read the key; then run `work` and insert the key already finished. */
  claimLast(key: string, work: (trx: Transaction<BenchDB>) => Promise<unknown>): Promise<unknown>
}

/** A fixed request hash: the raw paths measure statements, not hashing. */
const FINGERPRINT = 'a'.repeat(64)
const TTL = 24 * 3600 * 1000
/** How much longer a claim lives than `ttl`, as the library's (`finishSlack`). */
const SLACK = 1000
/** `conflictWait`'s default, as the library passes it to the claim. */
const WAIT = 5000

interface Shape {
  readonly clock: RawBuilder<unknown>
  later(ms: unknown): RawBuilder<unknown>
  /** A JSON column read as text. */
  text(column: RawBuilder<unknown>): RawBuilder<unknown>
  /** JSON text as the value of a JSON column. */
  json(text: unknown): RawBuilder<unknown>
  /** Sends the claim insert (with its lock-wait bound) and answers the new row's id. */
  claim(trx: Transaction<BenchDB>, columns: RawBuilder<unknown>, values: RawBuilder<unknown>): Promise<unknown>
}

/** `mariadb`: whether a MySQL server takes `SET STATEMENT … FOR` (MariaDB) or needs the session variable set around the claim. */
export function rawSequences(database: DatabaseName, db: Kysely<BenchDB>, mariadb: boolean): RawSequences {
  const table = sql.table(KEYS_TABLE)
  const shape = SHAPES[database](mariadb)
  const now = shape.clock
  const key = sql.ref('key')
  const lookup = (scope: string, k: string) =>
    sql`select k.id as id, k.fingerprint as fingerprint, k.recovery_point as point, ${shape.text(sql.ref('k.response'))} as response, k.codec as codec,
      k.expires_at <= ${now} as expired, k.lock_token is not null and k.locked_until > ${now} as locked,
      k.lock_token as token, ${shape.text(sql.ref('k.phase_results'))} as phases
      from ${table} as k where k.scope = ${scope} and ${sql.ref('k.key')} = ${k}`.execute(db)
  const insert = (trx: Transaction<BenchDB>, k: string, finished: string | null) => {
    // A claim made first leaves `response` to its default (null), as the library's does.
    const response = finished === null ? [sql``, sql``] : [sql`response, `, sql`${shape.json(finished)}, `]
    const columns = sql`(scope, ${key}, fingerprint, recovery_point, ${response[0]}phase_results, codec, lock_token, locked_until, created_at, last_run_at, expires_at, flow_name, recover_after)`
    const values = sql`${''}, ${k}, ${FINGERPRINT}, ${sql.lit(finished === null ? 'started' : 'finished')}, ${response[1]}${shape.json(null)}, ${finished === null ? null : 'json'}, ${null},
      ${shape.later(null)}, ${now}, ${now}, ${shape.later(finished === null ? TTL + SLACK : TTL)}, ${null}, ${shape.later(null)}`
    return shape.claim(trx, columns, values)
  }
  const fresh = async (k: string) => {
    if ((await lookup('', k)).rows.length > 0) throw new Error(`The raw path's key "${k}" exists already.`)
  }
  return {
    async claimFirst(k, work) {
      await fresh(k)
      return db.transaction().execute(async (trx) => {
        const id = await insert(trx, k, null)
        const value = await work(trx)
        await sql`update ${table} set response = ${shape.json(JSON.stringify(value))}, codec = ${'json'}, recovery_point = 'finished',
          last_run_at = ${now}, expires_at = case when expires_at >= ${shape.later(TTL)} then expires_at else ${shape.later(TTL)} end
          where id = ${id}`.execute(trx)
        return value
      })
    },
    async claimLast(k, work) {
      await fresh(k)
      return db.transaction().execute(async (trx) => {
        const value = await work(trx)
        await insert(trx, k, JSON.stringify(value))
        return value
      })
    },
  }
}

const SHAPES: Record<DatabaseName, (mariadb: boolean) => Shape> = {
  postgres: () => ({
    clock: sql`statement_timestamp()`,
    later: (ms) => sql`(statement_timestamp() + ${ms}::double precision * interval '1 millisecond')`,
    text: (column) => sql`${column}::text`,
    json: (text) => sql`${text}::text::json`,
    async claim(trx, columns, values) {
      // lock_timeout is set for the insert alone: parked in a custom setting, put back by RETURNING.
      const { rows } = await sql<{ id: string }>`insert into ${sql.table(KEYS_TABLE)} ${columns} select ${values}
        where set_config('lock_timeout', ${String(WAIT)} || left(set_config('kysely_idempotency.lock_timeout', current_setting('lock_timeout'), true), 0), true) is not null
        on conflict (scope, "key") do nothing
        returning id, set_config('lock_timeout', coalesce(nullif(current_setting('kysely_idempotency.lock_timeout', true), ''), current_setting('lock_timeout')), true) as restored`.execute(
        trx,
      )
      return claimed(rows[0]?.id)
    },
  }),
  mysql: (mariadb) => ({
    clock: sql`utc_timestamp(3)`,
    later: (ms) => sql`(utc_timestamp(3) + interval ${ms} * 1000 microsecond)`,
    text: (column) => column,
    json: (text) => sql`${text}`,
    async claim(trx, columns, values) {
      const seconds = Math.ceil(WAIT / 1000)
      const insert = sql`insert into ${sql.table(KEYS_TABLE)} ${columns} values (${values})`
      if (mariadb) return claimed((await sql`set statement innodb_lock_wait_timeout = ${seconds} for ${insert}`.execute(trx)).insertId)
      await sql`set @kysely_idempotency_wait = @@innodb_lock_wait_timeout, innodb_lock_wait_timeout = ${seconds}`.execute(trx)
      const { insertId } = await insert.execute(trx)
      await sql`set innodb_lock_wait_timeout = @kysely_idempotency_wait`.execute(trx)
      return claimed(insertId)
    },
  }),
  sqlite: () => {
    const clock = sql`cast((julianday('now') - 2440587.5) * 86400000 as integer)`
    return {
      clock,
      later: (ms) => sql`(${clock} + ${ms})`,
      text: (column) => column,
      json: (text) => sql`${text}`,
      async claim(trx, columns, values) {
        const { rows } = await sql<{ id: number }>`insert into ${sql.table(KEYS_TABLE)} ${columns} values (${values})
          on conflict (scope, "key") do nothing returning id as id`.execute(trx)
        return claimed(rows[0]?.id)
      },
    }
  },
}

function claimed(id: unknown): unknown {
  if (id === undefined || id === null) throw new Error('The raw path met its key already claimed; every call uses a new key.')
  return id
}
