/** One attempt's run of a flow body while it holds the key's lock: phases, steps, the order they keep, and the end. */
import type { Kysely, Transaction } from 'kysely'
import type { AttemptSlot } from '../coalesce.js'
import type { Encoded } from '../codec/store.js'
import { FINISHED, STARTED } from '../dialect.js'
import { IdempotencyFlowError, IdempotencyLockLostError, IdempotencySerializationError } from '../errors.js'
import type { KeyTable } from '../keytable.js'
import type { NormalizedKey } from '../keys.js'
import { failureOf, type Observer } from '../observe.js'
import type { Lease, Renewal } from '../rows.js'
import type { Statements } from '../statements.js'
import { Failure, type Flow } from './handle.js'
import { checkName, extension, readState, renewal, type Entry, type FlowSettings, type FlowState } from './state.js'
import type { RecordedFailure, SurvivedFailures } from './survived.js'

/** Tries at releasing a key when the attempt failed (see `Attempt.#release`). */
const RELEASE_ATTEMPTS = 3

export class Attempt<DB, T> {
  readonly #db: Kysely<DB>
  readonly #plain: Kysely<unknown>
  readonly #table: KeyTable
  readonly #observer: Observer
  readonly #failures: SurvivedFailures
  readonly #s: Statements
  readonly #key: NormalizedKey
  readonly #lease: Lease
  readonly #settings: FlowSettings
  readonly #slot: AttemptSlot
  /** What earlier attempts recorded (values, and failures the flow went on from), and in which order. */
  readonly #recorded: ReadonlyMap<string, Entry>
  readonly #order: readonly string[]
  /**
   * Failures of this attempt's phases and steps that the flow went on from, not recorded yet:
   * the next record writes them before its own entry (SPEC §4.3.6).
   */
  #survived: Array<readonly [string, RecordedFailure]> = []
  /**
   * The flow state as last written, decoded afresh: never an object the flow code holds, so
   * what it does to a value or to its request after a record cannot reach the next record.
   */
  #state: FlowState
  /** How many of the recorded names this attempt has met, in order. */
  #position = 0
  readonly #called = new Set<string>()
  /** The phase or step running now. */
  #busy: string | undefined
  /** The flow body has returned or thrown: no call is admitted any more. */
  #ended = false
  /** The error this attempt raised when it found its own lock taken over. */
  #lost: IdempotencyLockLostError | undefined
  /**
   * What ended this attempt early (an order violation, a lost lock): every later call on the
   * flow rejects with it, and the attempt does not finish the key even if the flow swallowed it.
   */
  #broken: IdempotencyFlowError | IdempotencyLockLostError | undefined

  constructor(
    db: Kysely<DB>,
    table: KeyTable,
    observer: Observer,
    failures: SurvivedFailures,
    s: Statements,
    key: NormalizedKey,
    lease: Lease,
    stored: Encoded,
    settings: FlowSettings,
    slot: AttemptSlot,
  ) {
    this.#db = db
    this.#plain = db.withoutPlugins() as unknown as Kysely<unknown>
    this.#table = table
    this.#observer = observer
    this.#failures = failures
    this.#s = s
    this.#key = key
    this.#lease = lease
    this.#settings = settings
    this.#slot = slot
    this.#state = readState(table.values, stored.text, stored.codec)
    // The values handed to the flow are a copy of their own.
    const handed = readState(table.values, stored.text, stored.codec).phases
    this.#recorded = new Map(handed.map((entry) => [entry[0], entry]))
    this.#order = handed.map(([name]) => name)
  }

  /** The recovery point this attempt starts from. */
  get resumedFrom(): string {
    return this.#order.at(-1) ?? STARTED
  }

  async run(body: (flow: Flow<DB, T>) => Promise<T>): Promise<T> {
    try {
      let value: T
      try {
        value = await body(this.#flow())
        this.#settle()
        const missed = this.#order[this.#position]
        if (missed !== undefined && !this.#broken) {
          this.#break(
            new IdempotencyFlowError(
              `The flow returned before reaching "${missed}", which an earlier attempt recorded; a resume must call the recorded phases in the same order.`,
            ),
          )
        }
      } catch (error) {
        this.#settle()
        if (this.#broken || !(error instanceof Failure) || error.owner !== this) throw error
        value = error.response as T
      }
      if (this.#broken) throw this.#broken
      await this.#complete(value)
      return value
    } catch (error) {
      // Whatever was thrown, `undefined` included; only a lost lock is not ours to release.
      const lost = this.#lost !== undefined && (this.#broken ?? error) === this.#lost
      if (!lost) await this.#release()
      throw this.#broken ?? error
    }
  }

  /**
   * Lets go of the key so that a retry or the recovery worker resumes at once. A pool may first
   * hand over the connection whose session just died under the failed statement, so the release
   * is tried again on another; if it still fails, the lease runs out by itself, and the error to
   * report stays the one that ended the attempt.
   */
  async #release(): Promise<void> {
    for (let attempt = 1; attempt <= RELEASE_ATTEMPTS; attempt++) {
      try {
        return await this.#s.release(this.#plain, this.#lease, this.#settings.ttl, this.#settings.failure)
      } catch {
        // Tried again below, on whatever connection the pool has now.
      }
    }
  }

  /** The body has returned or thrown: a phase or step it did not await breaks the attempt. */
  #settle(): void {
    this.#ended = true
    if (this.#busy !== undefined) {
      this.#break(new IdempotencyFlowError(`The flow ended while "${this.#busy}" was still running; await every phase and step. It is not recorded.`))
    }
  }

  #flow(): Flow<DB, T> {
    const key = this.#key
    const flowId = this.#state.flow
    return {
      key: key.key,
      scope: key.scope,
      attempt: this.#state.attempt,
      resumedFrom: this.resumedFrom,
      phase: (name, fn) => this.#perform('phase', name, () => this.#phase(name, fn)),
      step: (name, fn) => this.#perform('step', name, () => this.#step(name, fn)),
      stepKey: (name) => `${flowId}.${checkName(name)}`,
      fail: (response) => {
        throw new Failure(this, response)
      },
    }
  }

  /** Checks the call against the recorded order; returns the recorded value or runs `perform`, in a span. */
  async #perform<V>(kind: 'phase' | 'step', name: string, perform: () => Promise<V>): Promise<V> {
    if (this.#ended) throw new IdempotencyFlowError(`"${name}" was called after the flow ended.`)
    if (this.#broken) throw this.#broken
    const recorded = this.#admit(name)
    // Set at once, so that a call made before this one settles is seen as concurrent.
    if (!recorded) this.#busy = name
    try {
      return await this.#observer.observe(
        `idempotency.${kind}`,
        undefined,
        { attributes: { 'idempotency.phase': name } },
        async () => {
          if (!recorded) return await perform()
          // A failure an earlier attempt went on from: the same path again, without running.
          if (recorded.length === 3) throw this.#failures.replay(recorded[2])
          return recorded[1] as V
        },
        // A recorded failure thrown again is a replay too: nothing ran.
        (result) => (recorded ? { type: 'replayed' } : 'error' in result ? failureOf(result.error) : { type: 'executed' }),
      )
    } catch (error) {
      if (this.#lost && error === this.#lost) this.#break(this.#lost)
      // Recorded with the next record, if the flow goes on to one; not if this ends the attempt.
      else if (!recorded && !this.#broken && !(error instanceof Failure)) this.#survived.push([name, this.#failures.record(error)])
      throw error
    } finally {
      if (!recorded) this.#busy = undefined
    }
  }

  /**
   * Decides whether `name` may run now: its recorded value when an earlier attempt recorded it
   * at this position, `undefined` when it is new. Anything else breaks the attempt.
   */
  #admit(name: string): Entry | undefined {
    try {
      checkName(name)
    } catch (error) {
      throw this.#break(error as IdempotencyFlowError)
    }
    if (this.#busy !== undefined) {
      throw this.#break(
        new IdempotencyFlowError(`"${name}" was called while "${this.#busy}" was running; await each phase and step before the next.`),
      )
    }
    if (this.#called.has(name))
      throw this.#break(new IdempotencyFlowError(`The phase or step name "${name}" is used twice in one flow; names must be unique.`))
    this.#called.add(name)
    const expected = this.#order[this.#position]
    if (expected === undefined) return undefined
    if (expected !== name) {
      throw this.#break(
        new IdempotencyFlowError(
          this.#recorded.has(name)
            ? `The flow called "${name}" where an earlier attempt recorded "${expected}"; a resume must call the recorded phases in the same order. Nothing more runs in this attempt.`
            : `The flow called "${name}" before "${expected}", which an earlier attempt recorded first; a resume must call the recorded phases in the same order. Nothing more runs in this attempt.`,
        ),
      )
    }
    this.#position++
    return this.#recorded.get(name)
  }

  #break<E extends IdempotencyFlowError | IdempotencyLockLostError>(error: E): E {
    this.#broken ??= error
    return error
  }

  async #phase<V>(name: string, fn: (trx: Transaction<DB>) => Promise<V>): Promise<V> {
    const table = this.#table
    const s = this.#s
    const settings = this.#settings
    // Its fence extends the lock before it commits: duplicates here must not take over meanwhile.
    const recorded = await this.#slot.holding(() =>
      table.retrying(settings, () =>
        this.#db.transaction().execute(async (trx) => {
          const own = trx.withoutPlugins() as unknown as Kysely<unknown>
          const held = await table.waiting(settings, () =>
            s.withLockWait(own, settings.conflictWait, () => s.fence(own, this.#lease, extension(settings))),
          )
          if (!held) throw this.#lockLost(name)
          const value = await fn(trx)
          return { value, state: await this.#record(own, name, value) }
        }),
      ),
    )
    this.#slot.leased(settings.lockTimeout)
    this.#adopt(recorded.state)
    return recorded.value
  }

  /** Takes `state`, as its record committed, for the flow's state: the failures it wrote are recorded now. */
  #adopt(state: FlowState): void {
    this.#state = state
    this.#survived = []
  }

  async #step<V>(name: string, fn: () => Promise<V>): Promise<V> {
    // A stalled attempt that lost its lock finds out before calling the other system again,
    // and a live one gets a whole lease for the call.
    const held = await this.#table.waiting(this.#settings, () => this.#s.fence(this.#plain, this.#lease, extension(this.#settings)))
    if (!held) throw this.#lockLost(name)
    this.#slot.leased(this.#settings.lockTimeout)
    const value = await fn()
    this.#adopt(await this.#record(this.#plain, name, value))
    this.#slot.leased(this.#settings.lockTimeout)
    return value
  }

  /**
   * Records `value` under `name` (fenced) and returns the new state as written; the caller
   * adopts it once committed.
   */
  async #record(db: Kysely<unknown>, name: string, value: unknown): Promise<FlowState> {
    if (this.#ended) throw new IdempotencyFlowError(`"${name}" finished after the flow ended, so it was not recorded; await every phase and step.`)
    const r = this.#renewed(name, value)
    if (!(await this.#table.waiting(this.#settings, () => this.#s.record(db, this.#lease, name, r)))) throw this.#lockLost(name)
    return readState(this.#table.values, r.phases.text, r.phases.codec)
  }

  /**
   * The state with the failures the flow went on from and then `name` recorded, encoded; a
   * refusal names the phase, not the state's layout.
   */
  #renewed(name: string, value: unknown): Renewal {
    const phases: Entry[] = [...this.#state.phases, ...this.#survived.map(([failed, failure]): Entry => [failed, null, failure])]
    try {
      return renewal(this.#table.values, this.#settings, { ...this.#state, phases: [...phases, [name, value]] })
    } catch (error) {
      const inState = `The value at phases[${phases.length}][1]`
      if (!(error instanceof IdempotencySerializationError) || !error.message.startsWith(inState)) throw error
      const rest = error.message.slice(inState.length)
      const where = /^[.[]/.test(rest) ? ` at ${rest.replace(/^\./, '').replace(/ .*$/s, '')}` : ''
      throw new IdempotencySerializationError(`The value of "${name}"${where}${rest.slice(rest.indexOf(' '))}`, { cause: error })
    }
  }

  async #complete(value: T): Promise<void> {
    const settings = this.#settings
    const response = this.#table.values.encode(value)
    if (!(await this.#table.waiting(settings, () => this.#s.complete(this.#plain, this.#lease, response, settings.ttl))))
      throw this.#lockLost(FINISHED)
  }

  #lockLost(name: string): IdempotencyLockLostError {
    this.#lost ??= new IdempotencyLockLostError(
      `Another attempt took over the idempotency key "${this.#key.key}" after this attempt's lock expired, so "${name}" was not recorded; raise lockTimeout above the slowest step.`,
    )
    return this.#lost
  }
}
