import type { Kysely } from 'kysely'
import type { Core, Settings } from './core.js'
import { FINISHED } from './dialect.js'
import { IdempotencyConflictError } from './errors.js'
import { readAttempts } from './phases.js'
import type { NormalizedKey } from './request.js'

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
  /** Attempts that worked on the key (1 for a single-transaction key). */
  readonly attempts: number
  /** Failed recoveries by the recovery worker. */
  readonly recoveryFailures: number
  readonly createdAt: Date
  /** When an attempt last claimed, recorded or finished it. */
  readonly lastRunAt: Date
  readonly expiresAt: Date
  /** When the lock of the attempt that holds it runs out; `null` when none does. */
  readonly lockedUntil: Date | null
}

export async function inspectKey(core: Core, db: Kysely<unknown>, key: NormalizedKey): Promise<KeyInspection | undefined> {
  const plain = db.withoutPlugins()
  const s = await core.statements(plain)
  const row = await core.guard(undefined, () => s.inspect(plain, key.scope, key.key))
  if (!row) return undefined
  const point = String(row.point)
  const locked = Number(row.locked) === 1
  const state = locked ? 'running' : Number(row.expired) === 1 ? 'expired' : point === FINISHED ? 'finished' : 'abandoned'
  const codec = row.codec == null ? null : String(row.codec)
  return {
    state,
    recoveryPoint: point,
    flowName: row.flow == null ? null : String(row.flow),
    attempts: row.phases == null ? 1 : readAttempts(core.values, String(row.phases), codec),
    recoveryFailures: Number(row.failures ?? 0),
    createdAt: new Date(Number(row.created)),
    lastRunAt: new Date(Number(row.ran)),
    expiresAt: new Date(Number(row.expires)),
    lockedUntil: locked ? new Date(Number(row.lockedUntil)) : null,
  }
}

/**
 * Deletes the key unless an attempt holds it: in one transaction, so that no attempt claims it
 * between the check and the delete.
 */
export async function forgetKey(core: Core, db: Kysely<unknown>, key: NormalizedKey, settings: Settings & { lockTimeout: number }): Promise<boolean> {
  const plain = db.withoutPlugins()
  const s = await core.statements(plain)
  return plain.transaction().execute(async (trx) => {
    const row = await core.waiting(settings, () => s.lock(trx, key.scope, key.key, settings.conflictWait))
    if (!row) return false
    if (row.locked) {
      throw new IdempotencyConflictError(
        'in_flight',
        `The idempotency key "${key.key}" is held by a running attempt; forget it once that attempt ends or its lock runs out.`,
        { retryAfter: Math.max(1, Math.ceil(settings.lockTimeout / 1000)) },
      )
    }
    await s.remove(trx, row.id)
    return true
  })
}
