/**
 * The single-transaction path: the key claimed, the function run and its answer stored in one
 * transaction, the caller's (`withIdempotency`) or one the library opens and retries
 * (`transaction()`).
 */
import type { Kysely, Transaction } from 'kysely'
import type { Execution } from './api.js'
import { runningFunction, type AttemptSlot, type Coalescer } from './coalesce.js'
import { plainClaim } from './dialect.js'
import type { KeyTable } from './keytable.js'
import type { NormalizedKey } from './keys.js'
import { CLAIM_ROUNDS, claimWait, keptChanging, type Settings } from './retries.js'
import { claimFailed, EXPIRED, type Verdicts } from './verdict.js'

/**
 * How much longer than `ttl` a single-transaction claim lives: a store made within this of the
 * claim keeps the claim's `expires_at` (the `finish` statement), and a store that leaves every
 * indexed column as it was is a heap-only update on Postgres and touches no secondary index on
 * InnoDB. A finished key so lives `ttl`, plus at most 1% of it (a second at most).
 */
export function finishSlack(ttl: number): number {
  return Math.min(1000, Math.floor(ttl / 100))
}

export class TransactionPath {
  readonly #table: KeyTable
  readonly #coalescer: Coalescer
  readonly #verdicts: Verdicts

  constructor(table: KeyTable, coalescer: Coalescer, verdicts: Verdicts) {
    this.#table = table
    this.#coalescer = coalescer
    this.#verdicts = verdicts
  }

  /**
   * Runs `fn` once per key inside `trx`, or returns the stored result. `claimed` is told when the
   * key is claimed, before `fn` runs.
   */
  async inTransaction<T, DB>(
    trx: Transaction<DB>,
    key: NormalizedKey,
    fn: (trx: Transaction<DB>) => Promise<T>,
    settings: Settings,
    claimed?: () => void,
  ): Promise<Execution<T>> {
    const table = this.#table
    const db = trx.withoutPlugins() as unknown as Kysely<unknown>
    const s = await table.statements(db)
    const wait = claimWait(settings)
    const values = plainClaim(key, settings.ttl + finishSlack(settings.ttl), wait)
    for (let round = 1; ; round++) {
      const claim = await table.waiting(settings, () => s.claim(db, values))
      let id = claim.claimed
      if (claim.claimed === null) {
        const row = claim.row ?? (await table.waiting(settings, () => s.latest(db, key.scope, key.key, wait)))
        if (row) {
          const verdict = await this.#verdicts.on(db, s, row, key, settings, trx)
          if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
          if (await table.waiting(settings, () => s.reclaim(db, row.id, values))) id = row.id
        }
      }
      if (id !== null) {
        claimed?.()
        const entry = this.#coalescer.entry(key)
        try {
          const value = await runningFunction(
            entry,
            () => fn(trx),
            (value) => s.finish(db, id, table.values.encode(value), settings.ttl),
          )
          return { value, replayed: false }
        } catch (error) {
          claimFailed(trx, entry)
          throw error
        }
      }
      if (round === CLAIM_ROUNDS) throw keptChanging(settings)
    }
  }

  /**
   * Opens a transaction and runs {@link inTransaction} in it, retrying races (serialization
   * failures, deadlocks) with jittered back-off. A read before it answers a finished key with no
   * transaction; with `claimFirst` the claim comes first and the key is read only when it
   * exists. Duplicates in this instance learn that the attempt claims the key (and so get 409
   * when out of time, rather than wait for its answer) once the read found the key unfinished,
   * or with `claimFirst` once the claim succeeded: an attempt that replays is waited for either way.
   */
  async inOwnTransaction<T, DB>(
    db: Kysely<DB>,
    key: NormalizedKey,
    fn: (trx: Transaction<DB>) => Promise<T>,
    settings: Settings,
    slot: Pick<AttemptSlot, 'claiming'>,
  ): Promise<Execution<T>> {
    if (!settings.claimFirst) {
      const plain = db.withoutPlugins() as unknown as Kysely<unknown>
      const s = await this.#table.statements(plain)
      const row = await this.#table.translated(settings, () => s.lookup(plain, key.scope, key.key))
      if (row) {
        const verdict = await this.#verdicts.on(plain, s, row, key, settings)
        if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
      }
      slot.claiming()
    }
    const claimed = settings.claimFirst ? () => slot.claiming() : undefined
    return this.#table.retrying(settings, () => {
      const builder = settings.isolationLevel ? db.transaction().setIsolationLevel(settings.isolationLevel) : db.transaction()
      return builder.execute((trx) => this.inTransaction(trx, key, fn, settings, claimed))
    })
  }
}
