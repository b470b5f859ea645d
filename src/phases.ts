import { randomBytes } from 'node:crypto'
import type { Kysely, Transaction } from 'kysely'
import type { Encoded, Storable, ValueStore } from './codec.js'
import { claimWait, EXPIRED, type AttemptSlot, type Core, type Execution, type Settings } from './core.js'
import { FINISHED, STARTED, type KeyRow } from './dialect.js'
import { IdempotencyConflictError, IdempotencyFlowError, IdempotencyLockLostError, IdempotencySerializationError } from './errors.js'
import { failureOf, type IdempotencyOperation, type Observer } from './observe.js'
import type { NormalizedKey } from './request.js'
import type { Extension, Lease, RecoveryFailure, Renewal, Statements } from './statements.js'
import type { RecordedFailure, SurvivedFailures } from './survived.js'

/**
 * The handle an atomic-phases flow receives from {@link Idempotency.run}: it runs each phase
 * or step at most once per key, across attempts and processes.
 */
export interface Flow<DB, T> {
  /** The client's idempotency key. */
  readonly key: string
  /** The scope of the key. */
  readonly scope: string
  /** 1 for the first attempt at this key, 2 for the first resume, and so on. */
  readonly attempt: number
  /** The recovery point this attempt started from: `started` or the last recorded phase or step. */
  readonly resumedFrom: string

  /**
   * Runs `fn` in its own transaction and records its value with it; on a resume where the
   * phase is already recorded, returns the recorded value (decoded: equal, same types) and runs
   * nothing, whatever the flow does around the call. A value the codec refuses rolls the phase
   * back with `IdempotencySerializationError`.
   *
   * Throws `IdempotencyLockLostError` (and rolls the phase back) when another attempt took
   * the key over.
   *
   * ### Examples
   *
   * ```ts
   * const rideId = await idempotency.run({ key, request: rideRequest }, async (flow) => {
   *   const ride = await flow.phase('ride_created', (trx) =>
   *     trx.insertInto('rides').values({ user_id: userId, ...rideRequest }).returningAll().executeTakeFirstOrThrow())
   *   return ride.id
   * })
   * ```
   */
  phase<V>(name: string, fn: (trx: Transaction<DB>) => Promise<V & Storable<V>>): Promise<V>

  /**
   * Runs `fn` outside any transaction (for a call to another system) and then records its
   * value, fenced like a phase. If the process dies between the call and the record, the
   * call runs again on resume: make it idempotent with {@link stepKey}.
   *
   * ### Examples
   *
   * ```ts
   * const intentId = await idempotency.run({ key, request: rideRequest }, async (flow) => {
   *   const intent = await flow.step('charge_created', async () => {
   *     const created = await stripe.paymentIntents.create({ amount: rideRequest.price, currency: 'usd' }, { idempotencyKey: flow.stepKey('charge_created') })
   *     return { id: created.id, status: created.status }
   *   })
   *   return intent.id
   * })
   * ```
   */
  step<V>(name: string, fn: () => Promise<V & Storable<V>>): Promise<V>

  /**
   * A key for the foreign call of step `name`, the same in every attempt and process that
   * works on this key, and different after the key expires and is used again.
   */
  stepKey(name: string): string

  /**
   * Finishes the key now with `response` as the stored response (a deterministic failure,
   * such as a declined card), so that retries replay it instead of resuming. It throws to
   * end the flow; a phase it is called in rolls back. `run` then returns `response`.
   */
  fail(response: T): never
}

/** An unfinished atomic-phases flow whose lock has expired; see {@link Idempotency.abandoned}. */
export interface AbandonedFlow {
  readonly scope: string
  readonly key: string
  /** The last recorded phase or step, or `started`. */
  readonly recoveryPoint: string
  /** The `request` given to `run` (decoded), to re-drive the flow with; `undefined` when {@link unreadable}. */
  readonly request: unknown
  /** How many attempts worked on the flow; `null` when {@link unreadable}. */
  readonly attempts: number | null
  /**
   * Why the flow's stored state cannot be read here (written by another codec, or damaged), or
   * `null`. The flow is listed all the same, so that one such row never hides the others.
   */
  readonly unreadable: string | null
  /** Milliseconds since the key was first claimed. */
  readonly age: number
  /** Milliseconds since an attempt last recorded anything. */
  readonly idle: number
  /** The name the flow was defined with (`defineFlow`), or `null`. */
  readonly flowName: string | null
  /** How many times the recovery worker tried to finish the flow and failed. */
  readonly recoveryFailures: number
  /**
   * Whether the recovery worker may pick the flow now: it is defined by name, not backing off
   * after a failure, and has not failed too often.
   */
  readonly recoverable: boolean
}

/** Settings of one `run`. */
export interface FlowSettings extends Settings {
  readonly lockTimeout: number
  /** The name the flow was defined with, for the recovery worker; `null` for a flow run without one. */
  readonly flow: string | null
  /**
   * The id of the {@link Finisher} that makes the flow's result its stored answer, stored with the
   * flow so that the recovery worker finishes it the same way; `null` when the result is stored as it is.
   */
  readonly finisher: string | null
  /** Only take over an unfinished flow that no attempt holds (the recovery worker); anything else is {@link NotResumable}. */
  readonly resumeOnly: boolean
  /** The recovery worker's attempt: if it fails, its release counts the failure and backs the flow off. */
  readonly failure?: RecoveryFailure
  /** The method the attempt serves, for its events. */
  readonly operation: IdempotencyOperation
}

/** A flow the recovery worker meant to resume was finished, expired, held or gone by the time it looked. */
export class NotResumable extends Error {
  constructor() {
    super('The flow is no longer waiting to be resumed.')
  }
}

/** What `phase_results` holds for a flow, written by the instance's codec. */
interface FlowState {
  /** Random id the step keys derive from; a new one when the key starts over for a new request. */
  readonly flow: string
  readonly attempt: number
  readonly request: unknown
  /**
   * Recorded phases and steps in the order they were recorded: each with its value, or, for
   * a failure the flow went on from (SPEC §4.3.6), `null` and the failure.
   */
  readonly phases: ReadonlyArray<Entry>
  /** Present when a finisher makes the flow's answer ({@link FlowSettings.finisher}). */
  readonly finisher?: string
  /** The finisher's id as flows stored it before finishers were named (only ever read). */
  readonly answer?: string
  /** The lease and lifetime of the run that started the flow, for the recovery worker to keep. */
  readonly lockTimeout?: number
  readonly ttl?: number
}

/** A recorded phase or step: its name and value, or its name and the failure the flow survived. */
type Entry = readonly [name: string, value: unknown] | readonly [name: string, value: null, failure: RecordedFailure]

/** `phase_results` as version 0.1.0 wrote it: plain JSON, phase names beside the flow's `$` members. */
interface LegacyPhaseMap {
  readonly $flow: string
  readonly $attempt: number
  readonly $request: unknown
  readonly [name: string]: unknown
}

const NAME = /^[A-Za-z][A-Za-z0-9_.:-]{0,99}$/
const CLAIM_ROUNDS = 3
/** Tries at releasing a key when the attempt failed (see `Attempt.#release`). */
const RELEASE_ATTEMPTS = 3

class Failure<T> extends Error {
  constructor(
    readonly owner: object,
    readonly response: T,
  ) {
    super('flow.fail() was called outside of the flow that owns it.')
  }
}

/** The atomic-phases algorithm on top of a {@link Core}. */
export class Phases {
  readonly #core: Core
  readonly #observer: Observer
  readonly #failures: SurvivedFailures

  constructor(core: Core, observer: Observer, failures: SurvivedFailures) {
    this.#core = core
    this.#observer = observer
    this.#failures = failures
  }

  /**
   * Runs `body` as one attempt at `key`. The claim waits at most `slot.claimWait` for a holder in
   * another process; every lock this attempt takes or extends is reported to `slot`.
   */
  async run<T, DB>(db: Kysely<DB>, key: NormalizedKey, body: (flow: Flow<DB, T>) => Promise<T>, settings: FlowSettings, slot: AttemptSlot): Promise<Execution<T>> {
    const core = this.#core
    const claiming = { ...settings, claimWait: slot.claimWait }
    const plain = db.withoutPlugins() as unknown as Kysely<unknown>
    const s = await core.statements(plain)
    const started = performance.now()
    const seen = await core.guard(settings, () => s.lookup(plain, key.scope, key.key))
    if (settings.resumeOnly && !(seen && resumable(seen, key))) throw new NotResumable()
    if (seen && !resumable(seen, key)) {
      const verdict = await core.judge(plain, s, seen, key, settings)
      if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
    }
    slot.claiming()
    // A new key is claimed by its insert alone, outside any transaction: on InnoDB, a locking
    // read of an absent row takes gap locks that make concurrent first claims deadlock. One
    // connection, because a dialect may bound the insert's lock wait with session settings.
    const claim =
      (!seen && (await plain.connection().execute((conn) => this.#insert(conn, s, key, claiming)))) ||
      (await core.retrying(settings, () => plain.transaction().execute((trx) => this.#claim(trx, s, key, claiming))))
    if ('value' in claim) return { value: claim.value as T, replayed: true }
    slot.leased(settings.lockTimeout)
    const attempt = new Attempt<DB, T>(db, core, this.#observer, this.#failures, s, key, claim.lease, claim.stored, settings, slot)
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
    const s = await this.#core.statements(plain)
    const rows = await this.#core.guard(undefined, () => s.abandoned(plain, olderThan, limit))
    return rows.map((row) => {
      const state = readable(() => readState(this.#core.values, String(row.phases), row.codec == null ? null : String(row.codec)))
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
    const { phases, ...extension } = renewal(this.#core.values, settings, fresh(key, settings))
    const values = { ...key, ...extension, ...named(settings), wait: claimWait(settings), token, phases: phases.text, codec: phases.codec }
    const claim = await this.#core.waiting(settings, () => s.claim(db, values))
    return claim.claimed === null ? undefined : { lease: { id: claim.claimed, token }, stored: phases, takenOver: false }
  }

  /** In one short transaction: a new row, a takeover of a stopped attempt, or a replay. */
  async #claim(
    trx: Kysely<unknown>,
    s: Statements,
    key: NormalizedKey,
    settings: FlowSettings,
  ): Promise<Claimed | { value: unknown }> {
    const core = this.#core
    for (let round = 1; round <= CLAIM_ROUNDS; round++) {
      const row = await core.waiting(settings, () => s.lock(trx, key.scope, key.key, claimWait(settings)))
      if (!row) {
        const claim = await this.#insert(trx, s, key, settings)
        if (claim) return claim
        continue
      }
      const token = newToken()
      if (resumable(row, key)) {
        const previous = readState(core.values, row.phases!, row.codec)
        const taken = renewal(core.values, settings, { ...previous, attempt: previous.attempt + 1 })
        const due = settings.resumeOnly && settings.flow !== null ? settings.flow : undefined
        if (await s.takeOver(trx, row.id, row.token, { id: row.id, token }, taken, due)) return { lease: { id: row.id, token }, stored: taken.phases, takenOver: true }
        if (due !== undefined) throw new NotResumable()
        continue
      }
      if (settings.resumeOnly) throw new NotResumable()
      const verdict = await core.judge(trx, s, row, key, settings)
      if (verdict !== EXPIRED) return verdict
      const { phases, ...extension } = renewal(core.values, settings, fresh(key, settings))
      const values = { ...key, ...extension, ...named(settings), wait: claimWait(settings), token, phases: phases.text, codec: phases.codec }
      if (await core.waiting(settings, () => s.reclaim(trx, row.id, values))) return { lease: { id: row.id, token }, stored: phases, takenOver: false }
    }
    throw new IdempotencyConflictError('race', 'The key kept changing under concurrent requests; retry the request.', {
      retryAfter: Math.max(1, Math.ceil(settings.conflictWait / 1000)),
    })
  }
}

/** A claimed key: the attempt's lock, the flow state as it was written, and whether another attempt had left it unfinished. */
interface Claimed {
  readonly lease: Lease
  readonly stored: Encoded
  readonly takenOver: boolean
}

/** One attempt's run of a flow body while it holds the lock. */
class Attempt<DB, T> {
  readonly #db: Kysely<DB>
  readonly #plain: Kysely<unknown>
  readonly #core: Core
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
    core: Core,
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
    this.#core = core
    this.#observer = observer
    this.#failures = failures
    this.#s = s
    this.#key = key
    this.#lease = lease
    this.#settings = settings
    this.#slot = slot
    this.#state = readState(core.values, stored.text, stored.codec)
    // The values handed to the flow are a copy of their own.
    const handed = readState(core.values, stored.text, stored.codec).phases
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
          this.#break(new IdempotencyFlowError(`The flow returned before reaching "${missed}", which an earlier attempt recorded; a resume must call the recorded phases in the same order.`))
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
      throw this.#break(new IdempotencyFlowError(`"${name}" was called while "${this.#busy}" was running; await each phase and step before the next.`))
    }
    if (this.#called.has(name)) throw this.#break(new IdempotencyFlowError(`The phase or step name "${name}" is used twice in one flow; names must be unique.`))
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
    const core = this.#core
    const s = this.#s
    const settings = this.#settings
    // Its fence extends the lock before it commits: duplicates here must not take over meanwhile.
    const recorded = await this.#slot.holding(() => core.retrying(settings, () =>
      this.#db.transaction().execute(async (trx) => {
        const own = trx.withoutPlugins() as unknown as Kysely<unknown>
        const held = await core.waiting(settings, () =>
          s.withLockWait(own, settings.conflictWait, () => s.fence(own, this.#lease, extension(settings))),
        )
        if (!held) throw this.#lockLost(name)
        const value = await fn(trx)
        return { value, state: await this.#record(own, name, value) }
      }),
    ))
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
    const held = await this.#core.waiting(this.#settings, () => this.#s.fence(this.#plain, this.#lease, extension(this.#settings)))
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
    if (!(await this.#core.waiting(this.#settings, () => this.#s.record(db, this.#lease, name, r)))) throw this.#lockLost(name)
    return readState(this.#core.values, r.phases.text, r.phases.codec)
  }

  /**
   * The state with the failures the flow went on from and then `name` recorded, encoded; a
   * refusal names the phase, not the state's layout.
   */
  #renewed(name: string, value: unknown): Renewal {
    const phases: Entry[] = [...this.#state.phases, ...this.#survived.map(([failed, failure]): Entry => [failed, null, failure])]
    try {
      return renewal(this.#core.values, this.#settings, { ...this.#state, phases: [...phases, [name, value]] })
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
    const response = this.#core.values.encode(value)
    if (!(await this.#core.waiting(settings, () => this.#s.complete(this.#plain, this.#lease, response, settings.ttl)))) throw this.#lockLost(FINISHED)
  }

  #lockLost(name: string): IdempotencyLockLostError {
    this.#lost ??= new IdempotencyLockLostError(
      `Another attempt took over the idempotency key "${this.#key.key}" after this attempt's lock expired, so "${name}" was not recorded; raise lockTimeout above the slowest step.`,
    )
    return this.#lost
  }
}

/** How a new key of the flow is marked for the recovery worker: by its name, due as soon as no attempt holds it. */
function named(settings: FlowSettings): { flow: string | null; recoverIn: number | null } {
  return settings.flow === null ? { flow: null, recoverIn: null } : { flow: settings.flow, recoverIn: 0 }
}

function flowNameOf(settings: FlowSettings): { flowName?: string } {
  return settings.flow === null ? {} : { flowName: settings.flow }
}

/** What the recovery worker needs of a stored flow state: its request, its mark, and the lease and lifetime it was started with. */
export function readStarted(values: ValueStore, text: string, codec: string | null): Pick<FlowState, 'request' | 'finisher' | 'lockTimeout' | 'ttl'> {
  const { request, finisher, answer, lockTimeout, ttl } = readState(values, text, codec)
  const finishedBy = finisher ?? answer
  return { request, ...(finishedBy ? { finisher: finishedBy } : {}), ...(lockTimeout ? { lockTimeout } : {}), ...(ttl ? { ttl } : {}) }
}

/** Whether `error` is what `flow.fail()` throws to end a flow with an answer. */
export function isFailure(error: unknown): boolean {
  return error instanceof Failure
}

/** What `read` gives, or why it cannot be read: a message, for a listing that goes on. */
export function readable<T>(read: () => T): { value: T } | { error: string } {
  try {
    return { value: read() }
  } catch (error) {
    return { error: error instanceof Error ? error.message : String(error) }
  }
}

/** The attempts a stored flow state counts. */
export function readAttempts(values: ValueStore, text: string, codec: string | null): number {
  return readState(values, text, codec).attempt
}



/** The lock and lifetime a flow's statements set: a held key outlives its lock by `ttl`. */
function extension(settings: FlowSettings): Extension {
  return { lease: settings.lockTimeout, expiresIn: settings.lockTimeout + settings.ttl }
}

function renewal(values: ValueStore, settings: FlowSettings, state: FlowState): Renewal {
  return { ...extension(settings), phases: values.encode(state) }
}

/** Reads `phase_results`, whichever version wrote it. */
function readState(values: ValueStore, text: string, codec: string | null): FlowState {
  const stored = values.decode(text, codec)
  if (codec !== null) return stored as FlowState
  const { $flow, $attempt, $request, ...phases } = stored as LegacyPhaseMap
  return { flow: $flow, attempt: $attempt, request: $request, phases: Object.entries(phases) }
}

/** A row that `run` continues: a flow's, same request, not finished or expired, nobody holding it. */
function resumable(row: KeyRow, key: NormalizedKey): boolean {
  return !row.expired && !row.locked && row.phases !== null && row.fingerprint === key.fingerprint && row.recoveryPoint !== FINISHED
}

function fresh(key: NormalizedKey, settings: FlowSettings): FlowState {
  const how = { ...(settings.finisher ? { finisher: settings.finisher } : {}), lockTimeout: settings.lockTimeout, ttl: settings.ttl }
  return { flow: randomBytes(16).toString('base64url'), attempt: 1, request: key.request, phases: [], ...how }
}

function newToken(): string {
  return randomBytes(16).toString('hex')
}

function checkName(name: string): string {
  if (typeof name !== 'string' || !NAME.test(name) || name === STARTED || name === FINISHED) {
    throw new IdempotencyFlowError(
      `${JSON.stringify(name)} is not a valid phase or step name: use 1 to 100 letters, digits, "_", ".", ":" or "-", starting with a letter, other than "started" and "finished".`,
    )
  }
  return name
}

/** A text column as a string: MySQL returns `VARBINARY` columns (`scope`, `key`) as bytes. */
export function text(value: unknown): string {
  return value instanceof Uint8Array ? new TextDecoder().decode(value) : String(value)
}
