/** Claiming a flow's key for one attempt, and listing the flows no attempt holds. */
import type { Kysely } from 'kysely'
import type { Execution } from '../api.js'
import type { AttemptSlot } from '../coalesce.js'
import type { Encoded } from '../codec/store.js'
import type { KeyTable } from '../keytable.js'
import type { NormalizedKey } from '../keys.js'
import type { Observer } from '../observe.js'
import { CLAIM_ROUNDS, claimWait, keptChanging } from '../retries.js'
import type { Lease } from '../rows.js'
import type { Statements } from '../statements.js'
import { EXPIRED, type Verdicts } from '../verdict.js'
import { Attempt } from './attempt.js'
import type { AbandonedFlow, Flow } from './handle.js'
import { flowNameOf, fresh, named, newToken, NotResumable, readable, readState, renewal, resumable, text, type FlowSettings } from './state.js'
import type { SurvivedFailures } from './survived.js'

/**
 * Runs flows of atomic phases: each call is one attempt, which claims the key (a new row, a
 * takeover of a stopped attempt, or a replay) and then runs the flow body as an {@link Attempt}.
 */
export class FlowRunner {
  readonly #table: KeyTable
  readonly #verdicts: Verdicts
  readonly #observer: Observer
  readonly #failures: SurvivedFailures

  constructor(table: KeyTable, verdicts: Verdicts, observer: Observer, failures: SurvivedFailures) {
    this.#table = table
    this.#verdicts = verdicts
    this.#observer = observer
    this.#failures = failures
  }

  /**
   * Runs `body` as one attempt at `key`. The claim waits at most `slot.claimWait` for a holder in
   * another process; every lock this attempt takes or extends is reported to `slot`.
   */
  async run<T, DB>(
    db: Kysely<DB>,
    key: NormalizedKey,
    body: (flow: Flow<DB, T>) => Promise<T>,
    settings: FlowSettings,
    slot: AttemptSlot,
  ): Promise<Execution<T>> {
    const table = this.#table
    const claiming = { ...settings, claimWait: slot.claimWait }
    const plain = db.withoutPlugins() as unknown as Kysely<unknown>
    const s = await table.statements(plain)
    const started = performance.now()
    const seen = await table.translated(settings, () => s.lookup(plain, key.scope, key.key))
    if (settings.resumeOnly && !(seen && resumable(seen, key))) throw new NotResumable()
    if (seen && !resumable(seen, key)) {
      const verdict = await this.#verdicts.on(plain, s, seen, key, settings)
      if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
    }
    slot.claiming()
    // A new key is claimed by its insert alone, outside any transaction: on InnoDB, a locking
    // read of an absent row takes gap locks that make concurrent first claims deadlock. One
    // connection, because a dialect may bound the insert's lock wait with session settings.
    const claim =
      (!seen && (await plain.connection().execute((conn) => this.#insert(conn, s, key, claiming)))) ||
      (await table.retrying(settings, () => plain.transaction().execute((trx) => this.#claim(trx, s, key, claiming))))
    if ('value' in claim) return { value: claim.value as T, replayed: true }
    slot.leased(settings.lockTimeout)
    const attempt = new Attempt<DB, T>(db, table, this.#observer, this.#failures, s, key, claim.lease, claim.stored, settings, slot)
    if (claim.takenOver) {
      this.#observer.emit({
        type: 'taken_over',
        operation: settings.operation,
        scope: key.scope,
        key: key.key,
        durationMs: performance.now() - started,
        ...flowNameOf(settings),
        recoveryPoint: attempt.resumedFrom,
      })
    }
    return { value: await attempt.run(body), replayed: false }
  }

  async abandoned(db: Kysely<unknown>, olderThan: number, limit: number): Promise<AbandonedFlow[]> {
    const plain = db.withoutPlugins()
    const s = await this.#table.statements(plain)
    const rows = await this.#table.translated(undefined, () => s.abandoned(plain, olderThan, limit))
    return rows.map((row) => {
      const state = readable(() => readState(this.#table.values, String(row.phases), row.codec == null ? null : String(row.codec)))
      return {
        scope: text(row.scope),
        key: text(row.key),
        recoveryPoint: String(row.point),
        request: 'value' in state ? state.value.request : undefined,
        attempts: 'value' in state ? state.value.attempt : null,
        unreadable: 'error' in state ? state.error : null,
        age: Number(row.age),
        idle: Number(row.idle),
        flowName: row.flow == null ? null : String(row.flow),
        recoveryFailures: Number(row.failures ?? 0),
        recoverable: Number(row.due) === 1,
      }
    })
  }

  /** Inserts the key with a new lock; `undefined` if it exists. */
  async #insert(db: Kysely<unknown>, s: Statements, key: NormalizedKey, settings: FlowSettings): Promise<Claimed | undefined> {
    if (settings.resumeOnly) throw new NotResumable()
    const token = newToken()
    const { phases, ...extension } = renewal(this.#table.values, settings, fresh(key, settings))
    const values = { ...key, ...extension, ...named(settings), wait: claimWait(settings), token, phases: phases.text, codec: phases.codec }
    const claim = await this.#table.waiting(settings, () => s.claim(db, values))
    return claim.claimed === null ? undefined : { lease: { id: claim.claimed, token }, stored: phases, takenOver: false }
  }

  /** In one short transaction: a new row, a takeover of a stopped attempt, or a replay. */
  async #claim(trx: Kysely<unknown>, s: Statements, key: NormalizedKey, settings: FlowSettings): Promise<Claimed | { value: unknown }> {
    const table = this.#table
    for (let round = 1; round <= CLAIM_ROUNDS; round++) {
      const row = await table.waiting(settings, () => s.lock(trx, key.scope, key.key, claimWait(settings)))
      if (!row) {
        const claim = await this.#insert(trx, s, key, settings)
        if (claim) return claim
        continue
      }
      const token = newToken()
      if (resumable(row, key)) {
        const previous = readState(table.values, row.phases!, row.codec)
        const taken = renewal(table.values, settings, { ...previous, attempt: previous.attempt + 1 })
        const due = settings.resumeOnly && settings.flow !== null ? settings.flow : undefined
        if (await s.takeOver(trx, row.id, row.token, { id: row.id, token }, taken, due))
          return { lease: { id: row.id, token }, stored: taken.phases, takenOver: true }
        if (due !== undefined) throw new NotResumable()
        continue
      }
      if (settings.resumeOnly) throw new NotResumable()
      const verdict = await this.#verdicts.on(trx, s, row, key, settings)
      if (verdict !== EXPIRED) return verdict
      const { phases, ...extension } = renewal(table.values, settings, fresh(key, settings))
      const values = { ...key, ...extension, ...named(settings), wait: claimWait(settings), token, phases: phases.text, codec: phases.codec }
      if (await table.waiting(settings, () => s.reclaim(trx, row.id, values)))
        return { lease: { id: row.id, token }, stored: phases, takenOver: false }
    }
    throw keptChanging(settings)
  }
}

/** A claimed key: the attempt's lock, the flow state as it was written, and whether another attempt had left it unfinished. */
interface Claimed {
  readonly lease: Lease
  readonly stored: Encoded
  readonly takenOver: boolean
}
