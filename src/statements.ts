import { sql, type Kysely, type RawBuilder } from 'kysely'
import {
  aliased,
  decodeKeyRow,
  FINISHED,
  keyRowColumns,
  STARTED,
  type ClaimValues,
  type DialectStatements,
  type IdempotencyDialect,
  type KeyRow,
  type RowId,
} from './dialect.js'
import type { Encoded } from './codec/store.js'
import { backOffAssignments, type RecoveryFailure } from './recovery/backoff.js'
import { prepare } from './sql.js'
import type { AbandonedRow, Extension, InspectedRow, KeyCounts, Lease, Renewal } from './rows.js'

/**
 * Every statement the library sends for one table: the dialect's own, plus the ones that are
 * the same everywhere once the dialect supplies its clock and JSON handling.
 */
export interface Statements extends Required<DialectStatements> {
  lookup(db: Kysely<unknown>, scope: string, key: string): Promise<KeyRow | undefined>
  /** Restarts an expired key that nobody holds for a new request; `false` if that is no longer so. */
  reclaim(db: Kysely<unknown>, id: RowId, values: ClaimValues): Promise<boolean>
  /** Stores a single-transaction response; the key lives `ttl` ms from now. */
  finish(db: Kysely<unknown>, id: RowId, response: Encoded, ttl: number): Promise<void>
  /** Milliseconds until the key expires, on the database clock. */
  remaining(db: Kysely<unknown>, id: RowId): Promise<number>
  /**
   * Gives the lock of an unfinished key to a new attempt; `false` if `previous` no longer holds
   * it. With `due`, only a flow of that name that the recovery worker may pick now.
   */
  takeOver(db: Kysely<unknown>, id: RowId, previous: string | null, lease: Lease, renewal: Renewal, due?: string): Promise<boolean>
  /**
   * Checks that `lease` still holds the key and extends its lock; inside a transaction, the row
   * stays locked until it ends.
   */
  fence(db: Kysely<unknown>, lease: Lease, extension: Extension): Promise<boolean>
  /** Records a phase and extends the lock, if `lease` still holds it. */
  record(db: Kysely<unknown>, lease: Lease, point: string, renewal: Renewal): Promise<boolean>
  /** Stores the response and clears the lock, if `lease` still holds it; the key lives `ttl` ms from now. */
  complete(db: Kysely<unknown>, lease: Lease, response: Encoded, ttl: number): Promise<boolean>
  /**
   * Clears the lock so that a retry resumes at once, if `lease` still holds it; the unfinished
   * key then lives `ttl` ms from now. With `failure` (the recovery worker's attempt failed), the
   * same statement counts the failure and backs the flow off ({@link RecoveryFailure}), so that
   * no worker holding a stale list can take the flow over in between.
   */
  release(db: Kysely<unknown>, lease: Lease, ttl: number, failure?: RecoveryFailure): Promise<void>
  abandoned(db: Kysely<unknown>, idleFor: number, limit: number): Promise<readonly AbandonedRow[]>
  /** Unfinished flows of these names that no attempt holds and the recovery worker may pick now, due longest first. */
  recoverable(db: Kysely<unknown>, names: readonly string[], idleFor: number, limit: number): Promise<readonly AbandonedRow[]>
  /** How many flows the recovery worker could pick now but for their names, which are not among `names`. */
  unknownFlows(db: Kysely<unknown>, names: readonly string[], idleFor: number): Promise<number>
  /**
   * Counts a failed recovery of a flow that had failed `seen` times, and backs it off
   * ({@link RecoveryFailure}); nothing if someone else counted meanwhile.
   */
  recoveryFailed(db: Kysely<unknown>, id: RowId, seen: number, failure: RecoveryFailure): Promise<void>
  /** Puts off the recovery worker's next look at a flow by `ms`, counting no failure. */
  postpone(db: Kysely<unknown>, id: RowId, ms: number): Promise<void>
  inspect(db: Kysely<unknown>, scope: string, key: string): Promise<InspectedRow | undefined>
  /** Deletes the row `id`. */
  remove(db: Kysely<unknown>, id: RowId): Promise<void>
  counts(db: Kysely<unknown>): Promise<KeyCounts>
}

/** Compiles every statement for `table` once. */
export async function prepareStatements(db: Kysely<unknown>, dialect: IdempotencyDialect, table: string): Promise<Statements> {
  const own = await dialect.prepare(db, table)
  const now = dialect.clock
  const later = dialect.later
  const json = dialect.json
  const ours = (p: { id: unknown; token: unknown }) => sql`id = ${p.id} and lock_token = ${p.token}`
  const lookup = prepare(
    db,
    ['scope', 'key'],
    (p) => sql`
    select ${keyRowColumns(dialect)} from ${aliased(table)} where k.scope = ${p.scope} and ${sql.ref('k.key')} = ${p.key}`,
  )
  const unheld = sql`(locked_until is null or locked_until <= ${now})`
  const reclaim = prepare(
    db,
    ['id', 'fingerprint', 'expiresIn', 'token', 'lease', 'phases', 'codec', 'flow', 'recoverIn'],
    (p) => sql`
    update ${sql.table(table)} set fingerprint = ${p.fingerprint}, recovery_point = ${sql.lit(STARTED)},
      phase_results = ${json(p.phases)}, codec = ${p.codec}, response = null, lock_token = ${p.token}, locked_until = ${later(p.lease)},
      created_at = ${now}, last_run_at = ${now}, expires_at = ${later(p.expiresIn)},
      flow_name = ${p.flow}, recovery_failures = 0, recover_after = ${later(p.recoverIn)}
    where id = ${p.id} and expires_at <= ${now} and ${unheld}`,
  )
  // The claim's expiry, when it is at least `ttl` away still (see finishSlack), is kept, so that
  // the store changes no indexed column.
  const finish = prepare(
    db,
    ['id', 'response', 'codec', 'ttl'],
    (p) => sql`
    update ${sql.table(table)} set response = ${json(p.response)}, codec = ${p.codec}, recovery_point = ${sql.lit(FINISHED)},
      last_run_at = ${now}, expires_at = case when expires_at >= ${later(p.ttl)} then expires_at else ${later(p.ttl)} end
    where id = ${p.id}`,
  )
  const remaining = prepare(
    db,
    ['id'],
    (p) => sql`
    select ${dialect.elapsed(sql.ref('expires_at'))} as elapsed from ${sql.table(table)} where id = ${p.id}`,
  )
  const takeOverSlots = ['id', 'previous', 'token', 'lease', 'expiresIn', 'phases', 'codec'] as const
  const takeOverSet = (p: Readonly<Record<(typeof takeOverSlots)[number], RawBuilder<unknown>>>) => sql`
    update ${sql.table(table)} set lock_token = ${p.token}, locked_until = ${later(p.lease)}, phase_results = ${json(p.phases)},
      codec = ${p.codec}, last_run_at = ${now}, expires_at = ${later(p.expiresIn)}
    where id = ${p.id} and recovery_point <> ${sql.lit(FINISHED)}
      and coalesce(lock_token, '') = coalesce(${p.previous}, '') and ${unheld}`
  const takeOver = prepare(db, takeOverSlots, takeOverSet)
  // The recovery worker's candidates may be stale: another worker may have backed the flow off or given it up.
  const takeOverDue = prepare(db, [...takeOverSlots, 'flow'], (p) => sql`${takeOverSet(p)} and flow_name = ${p.flow} and recover_after <= ${now}`)
  const fence = prepare(
    db,
    ['id', 'token', 'lease', 'expiresIn'],
    (p) => sql`
    update ${sql.table(table)} set locked_until = ${later(p.lease)}, last_run_at = ${now}, expires_at = ${later(p.expiresIn)}
    where ${ours(p)}`,
  )
  const record = prepare(
    db,
    ['id', 'token', 'point', 'lease', 'expiresIn', 'phases', 'codec'],
    (p) => sql`
    update ${sql.table(table)} set phase_results = ${json(p.phases)}, codec = ${p.codec}, recovery_point = ${p.point},
      locked_until = ${later(p.lease)}, last_run_at = ${now}, expires_at = ${later(p.expiresIn)}
    where ${ours(p)}`,
  )
  const complete = prepare(
    db,
    ['id', 'token', 'response', 'codec', 'ttl'],
    (p) => sql`
    update ${sql.table(table)} set response = ${json(p.response)}, codec = ${p.codec}, recovery_point = ${sql.lit(FINISHED)},
      lock_token = null, locked_until = null, last_run_at = ${now}, expires_at = ${later(p.ttl)}, recover_after = null
    where ${ours(p)}`,
  )
  const release = prepare(
    db,
    ['id', 'token', 'ttl'],
    (p) => sql`
    update ${sql.table(table)} set lock_token = null, locked_until = null, expires_at = ${later(p.ttl)} where ${ours(p)}`,
  )
  const backOff = (max: RawBuilder<unknown>) => backOffAssignments(later, max)
  const releaseFailed = prepare(
    db,
    ['id', 'token', 'ttl', 'max'],
    (p) => sql`
    update ${sql.table(table)} set lock_token = null, locked_until = null, expires_at = ${later(p.ttl)}, ${backOff(p.max)}
    where ${ours(p)}`,
  )
  const idle = dialect.elapsed(sql.ref('last_run_at'))
  const abandonedColumns = sql`id as id, scope as scope, ${sql.ref('key')} as ${sql.ref('key')}, recovery_point as point,
    ${dialect.jsonText(sql.ref('phase_results'))} as phases, codec as codec, ${dialect.elapsed(sql.ref('created_at'))} as age, ${idle} as idle,
    flow_name as flow, recovery_failures as failures, recover_after is not null and recover_after <= ${now} as due, fingerprint as fingerprint`
  const abandoned = prepare(
    db,
    ['idle', 'limit'],
    (p) => sql`
    select ${abandonedColumns} from ${sql.table(table)}
    where recovery_point <> ${sql.lit(FINISHED)} and phase_results is not null and expires_at > ${now}
      and ${unheld} and ${idle} >= ${p.idle}
    order by last_run_at limit ${p.limit}`,
  )

  const recoveryFailed = prepare(
    db,
    ['id', 'seen', 'max'],
    (p) => sql`
    update ${sql.table(table)} set ${backOff(p.max)}
    where id = ${p.id} and recover_after is not null and recovery_failures = ${p.seen}`,
  )
  const postpone = prepare(
    db,
    ['id', 'ms'],
    (p) => sql`
    update ${sql.table(table)} set recover_after = ${later(p.ms)} where id = ${p.id} and recover_after is not null`,
  )
  const epoch = (column: string) => dialect.epochMs(sql.ref(column))
  const inspect = prepare(
    db,
    ['scope', 'key'],
    (p) => sql`
    select id as id, recovery_point as point, ${dialect.jsonText(sql.ref('phase_results'))} as phases, codec as codec,
      flow_name as flow, recovery_failures as failures, expires_at <= ${now} as expired,
      lock_token is not null and locked_until > ${now} as locked, ${epoch('created_at')} as created, ${epoch('last_run_at')} as ran,
      ${epoch('expires_at')} as expires, ${epoch('locked_until')} as ${sql.ref('lockedUntil')}
    from ${sql.table(table)} where scope = ${p.scope} and ${sql.ref('key')} = ${p.key}`,
  )
  const remove = prepare(db, ['id'], (p) => sql`delete from ${sql.table(table)} where id = ${p.id}`)

  const unexpired = sql`expires_at > ${now}`
  const unfinished = sql`${unexpired} and recovery_point <> ${sql.lit(FINISHED)}`
  const held = sql`lock_token is not null and locked_until > ${now}`
  const count = (condition: RawBuilder<unknown>) => sql`coalesce(sum(case when ${condition} then 1 else 0 end), 0)`
  const counts = prepare(
    db,
    [],
    () => sql`
    select ${count(sql`${unfinished} and ${held}`)} as live,
      ${count(sql`${unexpired} and recovery_point = ${sql.lit(FINISHED)}`)} as finished,
      ${count(sql`expires_at <= ${now}`)} as expired,
      ${count(sql`${unfinished} and not (${held})`)} as abandoned
    from ${sql.table(table)}`,
  )

  const changed = async (db: Kysely<unknown>, query: ReturnType<typeof fence.bind>) => (await db.executeQuery(query)).numAffectedRows === 1n
  const read = async (db: Kysely<unknown>, scope: string, key: string) => {
    const { rows } = await db.executeQuery<Record<string, unknown>>(lookup.bind({ scope, key }))
    return rows[0] && decodeKeyRow(rows[0])
  }
  return {
    ...own,
    lookup: read,
    latest: own.latest ?? read,
    reclaim: (db, id, values) => own.withLockWait(db, values.wait, () => changed(db, reclaim.bind({ ...values, id }))),
    async finish(db, id, response, ttl) {
      await db.executeQuery(finish.bind({ id, response: response.text, codec: response.codec, ttl }))
    },
    async remaining(db, id) {
      const { rows } = await db.executeQuery<{ elapsed: unknown }>(remaining.bind({ id }))
      return -Number(rows[0]?.elapsed ?? 0)
    },
    takeOver: (db, id, previous, lease, renewal, due) => {
      const values = { ...renewal, id, previous, token: lease.token, phases: renewal.phases.text, codec: renewal.phases.codec }
      return changed(db, due === undefined ? takeOver.bind(values) : takeOverDue.bind({ ...values, flow: due }))
    },
    fence: (db, lease, extension) => changed(db, fence.bind({ ...lease, ...extension })),
    record: (db, lease, point, renewal) =>
      changed(db, record.bind({ ...lease, ...renewal, point, phases: renewal.phases.text, codec: renewal.phases.codec })),
    complete: (db, lease, response, ttl) => changed(db, complete.bind({ ...lease, response: response.text, codec: response.codec, ttl })),
    async release(db, lease, ttl, failure) {
      await db.executeQuery(failure ? releaseFailed.bind({ ...lease, ttl, max: failure.maxFailures }) : release.bind({ ...lease, ttl }))
    },
    async counts(db) {
      const { rows } = await db.executeQuery<Record<keyof KeyCounts, unknown>>(counts.bind({}))
      const row = rows[0]
      return { live: Number(row?.live), finished: Number(row?.finished), expired: Number(row?.expired), abandoned: Number(row?.abandoned) }
    },
    async abandoned(db, idleFor, limit) {
      const { rows } = await db.executeQuery<AbandonedRow>(abandoned.bind({ idle: idleFor, limit }))
      return rows
    },
    // Compiled per call: the list of names varies, and the worker calls it once per pass.
    async recoverable(db, names, idleFor, limit) {
      if (!names.length) return []
      const { rows } = await sql<AbandonedRow>`
        select ${abandonedColumns} from ${sql.table(table)}
        where recover_after <= ${now} and flow_name in (${sql.join(names)}) and recovery_point <> ${sql.lit(FINISHED)}
          and expires_at > ${now} and ${unheld} and ${idle} >= ${idleFor}
        order by recover_after limit ${limit}`.execute(db)
      return rows
    },
    async unknownFlows(db, names, idleFor) {
      const others = names.length ? sql`and flow_name not in (${sql.join(names)})` : sql``
      const { rows } = await sql<{ n: unknown }>`
        select count(*) as n from ${sql.table(table)}
        where recover_after <= ${now} and flow_name is not null ${others} and recovery_point <> ${sql.lit(FINISHED)}
          and expires_at > ${now} and ${unheld} and ${idle} >= ${idleFor}`.execute(db)
      return Number(rows[0]?.n ?? 0)
    },
    async recoveryFailed(db, id, seen, failure) {
      await db.executeQuery(recoveryFailed.bind({ id, seen, max: failure.maxFailures }))
    },
    async postpone(db, id, ms) {
      await db.executeQuery(postpone.bind({ id, ms }))
    },
    async inspect(db, scope, key) {
      const { rows } = await db.executeQuery<InspectedRow>(inspect.bind({ scope, key }))
      return rows[0]
    },
    async remove(db, id) {
      await db.executeQuery(remove.bind({ id }))
    },
  }
}
