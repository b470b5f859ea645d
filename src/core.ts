import type { IsolationLevel, Kysely, Transaction } from 'kysely'
import { FINISHED, type ClaimValues, type IdempotencyDialect, type KeyRow } from './dialect.js'
import { IdempotencyConflictError, IdempotencyKeyReuseError, IdempotencySetupError } from './errors.js'
import { serializeResult, type NormalizedKey } from './request.js'
import { prepareStatements, type Statements } from './statements.js'

/** What an idempotent execution gave: the value, and whether it was replayed from storage. */
export interface Execution<T> {
  /** `fn`'s value on a first execution; the stored value (a JSON round trip of it) on a replay. */
  readonly value: T
  /** `true` when `fn` did not run because the key was already finished. */
  readonly replayed: boolean
}

/** Per-call settings, resolved from the options with their defaults. */
export interface Settings {
  readonly ttl: number
  readonly conflictWait: number
  readonly maxAttempts: number
  readonly isolationLevel?: IsolationLevel
}

export const EXPIRED = Symbol('expired')
/** Claim rounds before giving up when rows keep vanishing or being reclaimed under us. */
const CLAIM_ROUNDS = 3

/**
 * The idempotency algorithm for one table, independent of the database: every difference
 * between databases is asked of the dialect.
 */
export class Core {
  readonly #dialect: IdempotencyDialect
  readonly #table: string
  #statements: Promise<Statements> | undefined

  constructor(dialect: IdempotencyDialect, table: string) {
    this.#dialect = dialect
    this.#table = table
  }

  /** Runs `fn` once per key inside `trx`, or returns the stored result. */
  async execute<T, DB>(trx: Transaction<DB>, key: NormalizedKey, fn: (trx: Transaction<DB>) => Promise<T>, settings: Settings): Promise<Execution<T>> {
    const db = trx.withoutPlugins() as unknown as Kysely<unknown>
    const s = await this.statements(db)
    const values: ClaimValues = { ...key, ttl: settings.ttl, wait: settings.conflictWait, token: null, lease: null, phases: null }
    for (let round = 1; ; round++) {
      const claim = await this.guard(settings, () => s.claim(db, values))
      let id = claim.claimed
      if (claim.claimed === null) {
        const row = claim.row ?? (await this.guard(settings, () => s.latest(db, key.scope, key.key, settings.conflictWait)))
        if (row) {
          const verdict = this.decide(row, key, settings)
          if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
          if (await this.guard(settings, () => s.reclaim(db, row.id, values))) id = row.id
        }
      }
      if (id !== null) {
        const value = await fn(trx)
        await s.finish(db, id, serializeResult(value))
        return { value, replayed: false }
      }
      if (round === CLAIM_ROUNDS) {
        throw new IdempotencyConflictError('race', 'The key kept changing under concurrent requests; retry the request.', {
          retryAfter: retryAfter(settings),
        })
      }
    }
  }

  /**
   * Answers a replay with one read, else opens a transaction and runs {@link execute} in it,
   * retrying races (serialization failures, deadlocks) with jittered back-off.
   */
  async transaction<T, DB>(db: Kysely<DB>, key: NormalizedKey, fn: (trx: Transaction<DB>) => Promise<T>, settings: Settings): Promise<Execution<T>> {
    const plain = db.withoutPlugins() as unknown as Kysely<unknown>
    const s = await this.statements(plain)
    const row = await this.guard(settings, () => s.lookup(plain, key.scope, key.key))
    if (row) {
      const verdict = this.decide(row, key, settings)
      if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
    }
    return this.retrying(settings, () => {
      const builder = settings.isolationLevel ? db.transaction().setIsolationLevel(settings.isolationLevel) : db.transaction()
      return builder.execute((trx) => this.execute(trx, key, fn, settings))
    })
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
        if (n >= settings.maxAttempts || !this.#retryable(error)) throw error
        await backOff(n)
      }
    }
  }

  /** Deletes expired, unlocked rows in batches of `batchSize`; returns how many. */
  async prune(db: Kysely<unknown>, batchSize: number): Promise<number> {
    const plain = db.withoutPlugins()
    const s = await this.statements(plain)
    let total = 0
    for (;;) {
      const deleted = await this.guard(undefined, () => s.pruneBatch(plain, batchSize))
      total += deleted
      if (deleted < batchSize) return total
    }
  }

  /** The table's statements, compiled on first use. */
  statements(db: Kysely<unknown>): Promise<Statements> {
    this.#statements ??= this.guard(undefined, () => prepareStatements(db, this.#dialect, this.#table)).catch((error: unknown) => {
      this.#statements = undefined
      throw error
    })
    return this.#statements
  }

  /**
   * What an existing row means for a new attempt: its stored response, {@link EXPIRED} when
   * the key may start over, or the error the caller gets.
   */
  decide(row: KeyRow, key: NormalizedKey, settings: Settings): { value: unknown } | typeof EXPIRED {
    if (row.expired) return EXPIRED
    if (row.fingerprint !== key.fingerprint) {
      throw new IdempotencyKeyReuseError(
        `The idempotency key "${key.key}" was already used for a different request; send a new key for a new request.`,
      )
    }
    if (row.recoveryPoint === FINISHED) return { value: JSON.parse(row.response ?? 'null') }
    if (row.locked) {
      throw new IdempotencyConflictError('in_flight', `A request with the idempotency key "${key.key}" is still in progress; retry later.`, {
        retryAfter: retryAfter(settings),
      })
    }
    throw new IdempotencyConflictError(
      'unfinished_flow',
      `The idempotency key "${key.key}" belongs to an unfinished flow stopped at "${row.recoveryPoint}"; resume it with idempotency.run() and the same key.`,
      { retryAfter: retryAfter(settings) },
    )
  }

  /** Turns the database errors the library understands into errors that say what happened. */
  async guard<T>(settings: Settings | undefined, statement: () => Promise<T>): Promise<T> {
    try {
      return await statement()
    } catch (error) {
      const kind = this.#dialect.classify(error)
      const after = settings ? retryAfter(settings) : 1
      switch (kind) {
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

function retryAfter(settings: Settings): number {
  return Math.max(1, Math.ceil(settings.conflictWait / 1000))
}

/** Full jitter: a random delay up to 10 ms × 2^attempt, capped at 500 ms. */
function backOff(attempt: number): Promise<void> {
  const ceiling = Math.min(500, 10 * 2 ** attempt)
  return new Promise((resolve) => setTimeout(resolve, Math.random() * ceiling))
}
