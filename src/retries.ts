/**
 * Database errors the library understands, turned into errors that say what happened, and the
 * rules for trying again: which failures a transaction is run again for, with what back-off,
 * how many rounds a claim takes before it gives up, and the one `Retry-After` a conflict gives.
 */
import type { IsolationLevel } from 'kysely'
import type { IdempotencyDialect } from './dialect.js'
import type { Reuse } from './options.js'
import { IdempotencyConflictError, IdempotencySetupError } from './errors.js'

/** Per-call settings, resolved from the options with their defaults. */
export interface Settings {
  readonly ttl: number
  readonly conflictWait: number
  /**
   * How long a claim waits for a holder of the key in another process, when less than
   * `conflictWait` is left (a duplicate already waited in memory). Default `conflictWait`.
   */
  readonly claimWait?: number
  readonly maxAttempts: number
  /** What a finished key gives a new call with the same request: its answer, or `IdempotencyKeyUsedError`. */
  readonly reuse: Reuse
  readonly isolationLevel?: IsolationLevel
  /** `transaction()` claims the key first in its transaction, rather than reading it before. */
  readonly claimFirst?: boolean
}

/** Claim rounds before giving up when rows keep vanishing or being reclaimed under us. */
export const CLAIM_ROUNDS = 3

/** Seconds after which a retry of a conflicting request is likely to succeed: the wait it was allowed. */
export function retryAfter(settings: Settings | undefined): number {
  return settings ? secondsAtLeastOne(settings.conflictWait) : 1
}

/** `ms` as the whole seconds a `Retry-After` gives: rounded up, and never 0, which would invite a retry storm. */
export function secondsAtLeastOne(ms: number): number {
  return Math.max(1, Math.ceil(ms / 1000))
}

/** How long a claim waits for a holder of the key in another process. */
export function claimWait(settings: Settings): number {
  return settings.claimWait ?? settings.conflictWait
}

/** The conflict of a claim that ran out of rounds: the key kept changing under concurrent requests. */
export function keptChanging(settings: Settings): IdempotencyConflictError {
  return new IdempotencyConflictError('race', 'The key kept changing under concurrent requests; retry the request.', {
    retryAfter: retryAfter(settings),
  })
}

/** Full jitter: a random delay up to 10 ms × 2^attempt, capped at 500 ms. */
export function backOff(attempt: number): Promise<void> {
  const ceiling = Math.min(500, 10 * 2 ** attempt)
  return new Promise((resolve) => setTimeout(resolve, Math.random() * ceiling))
}

/** How the statements on one table meet the database's errors. */
export class DatabaseErrors {
  readonly #dialect: IdempotencyDialect
  /** The table as messages name it. */
  readonly #table: string

  constructor(dialect: IdempotencyDialect, table: string) {
    this.#dialect = dialect
    this.#table = table
  }

  /** Runs `statement`, turning the database errors the library understands into errors that say what happened. */
  translated<T>(settings: Settings | undefined, statement: () => Promise<T>): Promise<T> {
    return this.#translated(settings, statement, false)
  }

  /**
   * {@link translated} for a statement that may wait for a key another transaction holds (a
   * claim, a locking read, a fence): a statement timeout the caller set on the session that ends
   * it is the end of that wait, a conflict. Elsewhere it is the database's own error.
   */
  waiting<T>(settings: Settings | undefined, statement: () => Promise<T>): Promise<T> {
    return this.#translated(settings, statement, true)
  }

  /**
   * Runs `attempt` (a whole transaction) again while it fails with a race (serialization
   * failure, deadlock, a key changing under it), up to `maxAttempts` times, with jittered back-off.
   */
  async retrying<T>(settings: Settings, attempt: () => Promise<T>): Promise<T> {
    for (let n = 1; ; n++) {
      try {
        return await attempt()
      } catch (error) {
        if (!this.#retryable(error)) throw error
        if (n >= settings.maxAttempts) {
          // What the database said goes in `cause`; the caller gets the answer a client can act on.
          if (error instanceof IdempotencyConflictError) throw error
          throw new IdempotencyConflictError(
            'race',
            `Concurrent requests kept conflicting with this one in the database (${n} attempts); retry the request.`,
            { retryAfter: retryAfter(settings), cause: error },
          )
        }
        await backOff(n)
      }
    }
  }

  async #translated<T>(settings: Settings | undefined, statement: () => Promise<T>, waits: boolean): Promise<T> {
    try {
      return await statement()
    } catch (error) {
      const after = retryAfter(settings)
      switch (this.#dialect.classify(error)) {
        // biome-ignore lint/suspicious/noFallthroughSwitchClause: a statement timeout that ended a wait is a lock timeout.
        case 'statement_timeout':
          if (!waits) throw error
        // falls through: it ended a wait for the key
        case 'lock_timeout':
          throw new IdempotencyConflictError('in_flight', 'A request with the same idempotency key is still in progress; retry later.', {
            retryAfter: after,
            cause: error,
          })
        case 'serialization_failure':
        case 'deadlock':
          throw new IdempotencyConflictError(
            'race',
            'A concurrent request with the same idempotency key committed first; roll this transaction back and retry to get its response.',
            { retryAfter: after, cause: error },
          )
        case 'undefined_table':
          throw new IdempotencySetupError(
            `The table "${this.#table}" does not exist; create it with idempotency.migrate() or \`npx kysely-idempotency migrate\`.`,
            { cause: error },
          )
        default:
          throw error
      }
    }
  }

  #retryable(error: unknown): boolean {
    if (error instanceof IdempotencyConflictError) return error.reason === 'race'
    const kind = this.#dialect.classify(error)
    return kind === 'serialization_failure' || kind === 'deadlock'
  }
}
