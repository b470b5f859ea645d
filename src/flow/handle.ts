/** The handle an atomic-phases flow works with, what its `fail()` throws, and what `abandoned()` lists of an unfinished one. */
import type { Transaction } from 'kysely'
import type { Storable } from '../codec/values.js'

/**
 * The handle an atomic-phases flow receives from `Idempotency.run`: it runs each phase
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
   * import { idempotency, key, rideRequest, userId } from './app'
   *
   * const rideId = await idempotency.run({ key, scope: userId, request: rideRequest }, async (flow) => {
   *   const ride = await flow.phase('ride_created', (trx) =>
   *     trx.insertInto('rides').values(rideRequest).returningAll().executeTakeFirstOrThrow())
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
   * import { idempotency, key, rideRequest, stripe } from './app'
   *
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

/** An unfinished atomic-phases flow whose lock has expired; see `Idempotency.abandoned`. */
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

/** What `flow.fail()` throws to end a flow with `response`. */
export class Failure<T> extends Error {
  constructor(
    readonly owner: object,
    readonly response: T,
  ) {
    super('flow.fail() was called outside of the flow that owns it.')
  }
}

/** Whether `error` is what `flow.fail()` throws to end a flow with an answer. */
export function isFailure(error: unknown): boolean {
  return error instanceof Failure
}
