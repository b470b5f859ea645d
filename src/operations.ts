/** What operators do: inspect one key, forget it, and delete expired keys. */
import type { Kysely } from 'kysely'
import type { Coalescer } from './coalesce.js'
import { FINISHED, plainClaim } from './dialect.js'
import { IdempotencyConflictError } from './errors.js'
import { readable, readAttempts } from './flow/state.js'
import type { KeyTable } from './keytable.js'
import type { NormalizedKey } from './keys.js'
import { backOff, secondsAtLeastOne, type Settings } from './retries.js'
import type { Statements } from './statements.js'

/** Which key `inspect` and `forget` look at. */
export interface KeyReference {
  readonly key: string
  /** Default `''`. */
  readonly scope?: string
}

/** One key as the table holds it; see `idempotency.inspect`. */
export interface KeyInspection {
  /**
   * `running`: an attempt holds it now. `finished`: its answer is stored and replayed.
   * `abandoned`: unfinished and nobody holds it (a flow whose process stopped, to be resumed
   * by a retry or the recovery worker; or a single-transaction claim committed without its
   * answer). `expired`: past its lifetime, a new request to the next caller.
   */
  readonly state: 'running' | 'finished' | 'abandoned' | 'expired'
  /** `started`, the last recorded phase or step, or `finished`. */
  readonly recoveryPoint: string
  /** The name of a flow defined with `defineFlow`, else `null`. */
  readonly flowName: string | null
  /** Attempts that worked on the key (1 for a single-transaction key); `null` when {@link unreadable}. */
  readonly attempts: number | null
  /** Why the flow's stored state cannot be read here (written by another codec, or damaged), or `null`. */
  readonly unreadable: string | null
  /** Failed recoveries by the recovery worker. */
  readonly recoveryFailures: number
  readonly createdAt: Date
  /** When an attempt last claimed, recorded or finished it. */
  readonly lastRunAt: Date
  /**
   * When the key expires: `ttl` after it finished (a single-transaction key stored soon after its
   * claim: up to 1% of `ttl` later, a second at most), or after the lock of the attempt holding it.
   */
  readonly expiresAt: Date
  /** When the lock of the attempt that holds it runs out; `null` when none does. */
  readonly lockedUntil: Date | null
}

export async function inspectKey(table: KeyTable, db: Kysely<unknown>, key: NormalizedKey): Promise<KeyInspection | undefined> {
  const plain = db.withoutPlugins()
  const s = await table.statements(plain)
  const row = await table.translated(undefined, () => s.inspect(plain, key.scope, key.key))
  if (!row) return undefined
  const point = String(row.point)
  const locked = Number(row.locked) === 1
  const state = locked ? 'running' : Number(row.expired) === 1 ? 'expired' : point === FINISHED ? 'finished' : 'abandoned'
  const codec = row.codec == null ? null : String(row.codec)
  const attempts = row.phases == null ? { value: 1 } : readable(() => readAttempts(table.values, String(row.phases), codec))
  return {
    state,
    recoveryPoint: point,
    flowName: row.flow == null ? null : String(row.flow),
    attempts: 'value' in attempts ? attempts.value : null,
    unreadable: 'error' in attempts ? attempts.error : null,
    recoveryFailures: Number(row.failures ?? 0),
    createdAt: new Date(Number(row.created)),
    lastRunAt: new Date(Number(row.ran)),
    expiresAt: new Date(Number(row.expires)),
    lockedUntil: locked ? new Date(Number(row.lockedUntil)) : null,
  }
}

/**
 * Deletes the key unless an attempt holds it: in one transaction, so that no attempt claims it
 * between the check and the delete. An attempt holds it while a flow's lock lasts, and while a
 * single transaction that claimed it is open: the row is then locked, and the delete, which
 * never waits, refuses instead of deleting the answer that transaction is about to commit.
 */
export async function forgetKey(
  table: KeyTable,
  coalescer: Coalescer,
  db: Kysely<unknown>,
  key: NormalizedKey,
  settings: Settings & { lockTimeout: number },
): Promise<boolean> {
  const held = () =>
    new IdempotencyConflictError(
      'in_flight',
      `The idempotency key "${key.key}" is held by a running attempt; forget it once that attempt ends or its lock runs out.`,
      { retryAfter: secondsAtLeastOne(settings.lockTimeout) },
    )
  if (coalescer.runsHere(key)) throw held()
  const plain = db.withoutPlugins()
  const s = await table.statements(plain)
  const now = <T>(statement: () => Promise<T>) =>
    table.waiting(settings, statement).catch((error: unknown) => {
      throw error instanceof IdempotencyConflictError ? held() : error
    })
  return plain
    .transaction()
    .execute(async (trx) => {
      const row = await now(() => s.lockNow(trx, key.scope, key.key))
      if (row) {
        if (row.locked) throw held()
        await s.remove(trx, row.id)
        return true
      }
      // Postgres does not show another transaction's uncommitted claim to a read; a claim of our
      // own, not waiting, runs into it (and refuses), or succeeds and is rolled back.
      const probe = plainClaim(key, 1, 0)
      if ((await now(() => s.claim(trx, probe))).claimed === null) throw held()
      throw NOTHING
    })
    .catch((error: unknown) => {
      if (error === NOTHING) return false
      throw error
    })
}

/** Rolls back the probe of {@link forgetKey}: there was nothing to forget. */
const NOTHING = Symbol('nothing to forget')

/** Attempts at one prune batch that the database aborts (deadlock with requests on the same rows). */
const PRUNE_ATTEMPTS = 5

/**
 * Deletes expired, unlocked rows in batches of `batchSize`; returns how many. A batch the
 * database aborts because requests lock the same rows (a deadlock, a lock wait) is tried again.
 */
export async function pruneKeys(table: KeyTable, db: Kysely<unknown>, batchSize: number): Promise<number> {
  const plain = db.withoutPlugins()
  const s = await table.statements(plain)
  let total = 0
  for (;;) {
    const deleted = await pruneBatch(table, plain, s, batchSize)
    total += deleted
    if (deleted < batchSize) return total
  }
}

async function pruneBatch(table: KeyTable, db: Kysely<unknown>, s: Statements, batchSize: number): Promise<number> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await table.translated(undefined, () => s.pruneBatch(db, batchSize))
    } catch (error) {
      if (!(error instanceof IdempotencyConflictError)) throw error
      if (attempt < PRUNE_ATTEMPTS) {
        await backOff(attempt)
        continue
      }
      throw new IdempotencyConflictError(
        'race',
        `Pruning "${table.name}" was stopped by the database ${attempt} times in a row while requests were using the same rows (${(error.cause as Error | undefined)?.message ?? 'lock conflict'}); run prune again later.`,
        { retryAfter: 1, cause: error.cause },
      )
    }
  }
}
