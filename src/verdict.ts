/**
 * What a key's existing row means for a new attempt at it: the stored answer to replay, a key
 * that may start over (expired), or the error the caller gets (another request, in flight, an
 * unfinished flow, a claim committed without its answer).
 */
import type { Kysely } from 'kysely'
import { functionRunning, inFlight, processWide, type Coalescer } from './coalesce.js'
import { FINISHED, STARTED, type KeyRow } from './dialect.js'
import { IdempotencyConflictError, IdempotencyKeyReuseError, IdempotencyKeyUsedError } from './errors.js'
import type { KeyTable } from './keytable.js'
import type { NormalizedKey } from './keys.js'
import { retryAfter, secondsAtLeastOne, type Settings } from './retries.js'
import type { Statements } from './statements.js'

/** A key whose row may be claimed again: it expired, and no attempt holds it. */
export const EXPIRED = Symbol('expired')
/** A single-transaction claim committed without its response. */
const STRANDED = Symbol('stranded')

/**
 * Keys (table, scope, key) that a call claimed in a transaction and then failed: the claim
 * stays until that transaction ends, so a second call in it must not blame a commit.
 */
const failedClaims = processWide('failedClaims', () => new WeakMap<object, Set<string>>())

/** Marks `entry` as claimed in `trx` by a call that then failed. */
export function claimFailed(trx: object, entry: string): void {
  let failed = failedClaims.get(trx)
  if (!failed) failedClaims.set(trx, (failed = new Set()))
  failed.add(entry)
}

export class Verdicts {
  readonly #table: KeyTable
  readonly #coalescer: Coalescer

  constructor(table: KeyTable, coalescer: Coalescer) {
    this.#table = table
    this.#coalescer = coalescer
  }

  /**
   * What an existing row means for a new attempt: its stored response, {@link EXPIRED} when
   * the key may start over, or the error the caller gets.
   */
  async on(
    db: Kysely<unknown>,
    statements: Statements,
    row: KeyRow,
    key: NormalizedKey,
    settings: Settings,
    trx?: object,
  ): Promise<{ value: unknown } | typeof EXPIRED> {
    const verdict = this.#decide(row, key, settings)
    if (verdict !== STRANDED) return verdict
    if (trx && failedClaims.get(trx)?.has(this.#coalescer.entry(key))) {
      throw new IdempotencyConflictError(
        'stranded',
        `An earlier call with the idempotency key "${key.key}" in this same transaction claimed the key and then threw; the claim stays ` +
          'until the transaction ends. Roll the transaction back, and retry it, instead of calling again in it.',
        { retryAfter: 1 },
      )
    }
    const remaining = await this.#table.translated(settings, () => statements.remaining(db, row.id))
    throw new IdempotencyConflictError(
      'stranded',
      `The idempotency key "${key.key}" was claimed by a transaction that committed without storing a response (withIdempotency or its ` +
        `function threw, and the transaction was committed instead of rolled back), so the key cannot be used until it expires in ` +
        `${Math.ceil(remaining / 1000)} s. Roll the transaction back whenever withIdempotency throws.`,
      { retryAfter: secondsAtLeastOne(remaining) },
    )
  }

  #decide(row: KeyRow, key: NormalizedKey, settings: Settings): { value: unknown } | typeof EXPIRED | typeof STRANDED {
    if (row.expired && !row.locked) return EXPIRED
    if (row.fingerprint !== key.fingerprint) {
      throw new IdempotencyKeyReuseError(
        `The idempotency key "${key.key}" was already used for a different request; send a new key for a new request.`,
      )
    }
    if (row.recoveryPoint === FINISHED) {
      if (settings.reuse === 'reject') {
        throw new IdempotencyKeyUsedError(
          `The idempotency key "${key.key}" already answered this request, and this call rejects a used key instead of replaying it; nothing ran. ` +
            'Use a new key for a new request.',
        )
      }
      return { value: this.#table.values.decode(row.response ?? 'null', row.codec) }
    }
    if (row.phases === null && !row.locked && row.recoveryPoint === STARTED) {
      // A single-transaction claim is visible before its response only to its own transaction,
      // or after a commit that should have been a rollback.
      if (!functionRunning(this.#coalescer.entry(key))) return STRANDED
      throw new IdempotencyConflictError(
        'nested',
        `The idempotency key "${key.key}" is already in use by an enclosing call in this transaction: a call with the same key is nested inside its own function. Give the inner call a key of its own.`,
        { retryAfter: retryAfter(settings) },
      )
    }
    if (row.locked) {
      throw inFlight(key, settings)
    }
    throw new IdempotencyConflictError(
      'unfinished_flow',
      `The idempotency key "${key.key}" belongs to an unfinished flow stopped at "${row.recoveryPoint}"; resume it with idempotency.run() and the same key.`,
      { retryAfter: retryAfter(settings) },
    )
  }
}
