/** The public API of an idempotency instance (see `createIdempotency` in the package entry). */
import type { Kysely, Transaction } from 'kysely'
import type { Storable } from './codec/values.js'
import type { ConsumeOptions, Delivery, Message } from './consume.js'
import type { IdempotencyDialect } from './dialect.js'
import type { AbandonedFlow, Flow } from './flow/handle.js'
import type { IdempotencyKeyInput } from './keys.js'
import type { MigrationResultSet } from './migrate.js'
import type { KeyInspection, KeyReference } from './operations.js'
import type { AbandonedOptions, CallOptions, MigrateOptions, PruneOptions, RunOptions, TransactionOptions } from './options.js'
import type { DefinedFlow, DefineFlowOptions, FlowFunction } from './recovery/registry.js'
import type { RecoverOptions, RecoveryReport, RecoveryWorker, StartRecoveryOptions } from './recovery/worker.js'
import type { KeyCounts } from './rows.js'

/** What an idempotent execution gave: the value, and whether it was replayed from storage. */
export interface Execution<T> {
  /** `fn`'s value on a first execution; on a replay, the stored value, decoded: an equal value of the same types. */
  readonly value: T
  /** `true` when `fn` did not run because the key was already finished. */
  readonly replayed: boolean
}

/** An idempotency store bound to one Kysely instance and one table; see `createIdempotency`. */
export interface Idempotency<DB> {
  /** The Kysely instance the store was created with. */
  readonly db: Kysely<DB>
  /** The table this instance uses. */
  readonly tableName: string
  /** The database module in use. */
  readonly dialect: IdempotencyDialect
  /** How long a finished key stays replayable when a call does not say (the `ttl` option), in milliseconds. */
  readonly ttl: number

  /**
   * Runs `fn` at most once per key inside your transaction `trx`, and returns its value;
   * a later call with the same key returns the stored value instead: an equal value of the
   * same types (a `Date` stays a `Date`, a `bigint` a `bigint`), rebuilt by the codec. The key
   * claim, `fn`'s writes and the stored result commit or roll back together with `trx`. If this
   * throws, roll `trx` back. A value the codec refuses throws `IdempotencySerializationError`.
   *
   * ### Examples
   *
   * ```ts
   * import { body, db, idempotency, key, userId } from './app'
   *
   * const order = await db.transaction().execute((trx) =>
   *   idempotency.withIdempotency(trx, { key, scope: userId, request: body }, (trx) =>
   *     trx.insertInto('orders').values(body).returningAll().executeTakeFirstOrThrow()))
   * ```
   */
  withIdempotency<T>(
    trx: Transaction<DB>,
    key: IdempotencyKeyInput,
    fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>,
    options?: CallOptions,
  ): Promise<T>

  /** {@link withIdempotency}, also telling whether the value was replayed. */
  execute<T>(
    trx: Transaction<DB>,
    key: IdempotencyKeyInput,
    fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>,
    options?: CallOptions,
  ): Promise<Execution<T>>

  /**
   * Like {@link withIdempotency} in a transaction the library opens: a replay is answered by
   * one read before any transaction starts (with the option `claimFirst`, the claim comes first
   * in the transaction instead); serialization failures and deadlocks are retried
   * with jittered back-off (so `fn` may run more than once, each time in a transaction that
   * was rolled back: keep its side effects inside the database).
   *
   * ### Examples
   *
   * ```ts
   * import { accountId, body, idempotency, key } from './app'
   *
   * const order = await idempotency.transaction({ key, scope: accountId, request: body }, (trx) =>
   *   trx.insertInto('orders').values(body).returningAll().executeTakeFirstOrThrow())
   * ```
   */
  transaction<T>(key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>, options?: TransactionOptions): Promise<T>

  /** {@link transaction}, also telling whether the value was replayed. */
  executeTransaction<T>(
    key: IdempotencyKeyInput,
    fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>,
    options?: TransactionOptions,
  ): Promise<Execution<T>>

  /**
   * Runs a flow of atomic phases at most once per key, for work that cannot fit in one
   * transaction (a call to a payment provider between two database phases). Each
   * `flow.phase` commits its own transaction together with a recovery point; each
   * `flow.step` runs outside any transaction and records its value. An attempt that stops
   * (throws, crashes, loses its lock) leaves the recorded phases behind, and the next call
   * with the same key resumes after the last one. Returning finishes the key: the value is
   * stored and replayed to every later call.
   *
   * Throws `IdempotencyConflictError` while another attempt holds the key, and
   * `IdempotencyLockLostError` when this attempt's lock expired and another took over.
   *
   * The result type is the one the flow function returns; give it (`run<Result>(…)`) to use
   * `flow.fail(response)`, whose response must be one too.
   *
   * ### Examples
   *
   * ```ts
   * import { idempotency, insertRide, key, markCharged, payments, rideRequest, userId } from './app'
   *
   * const ride = await idempotency.run({ key, scope: userId, request: rideRequest }, async (flow) => {
   *   const r = await flow.phase('ride_created', (trx) => insertRide(trx, rideRequest))
   *   const charge = await flow.step('charge_created', () =>
   *     payments.charge(r, { idempotencyKey: flow.stepKey('charge_created') }))
   *   await flow.phase('ride_charged', (trx) => markCharged(trx, r.id, charge.id))
   *   return { status: 201, body: r }
   * })
   * ```
   */
  run<T = never>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T & Storable<T>>, options?: RunOptions): Promise<T>
  // Without a type argument the result type is inferred from what the function returns; the
  // handle's type cannot depend on it then (TypeScript fixes it first), so fail() needs one.
  run<R>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, never>) => Promise<R & Storable<R>>, options?: RunOptions): Promise<R>

  /** {@link run}, also telling whether the value was replayed. */
  executeRun<T = never>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T & Storable<T>>, options?: RunOptions): Promise<Execution<T>>
  executeRun<R>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, never>) => Promise<R & Storable<R>>, options?: RunOptions): Promise<Execution<R>>

  /**
   * Lists unfinished atomic-phases flows that no attempt holds (their process crashed or gave
   * up), idle longest first. Resume one by calling {@link run} with its scope, key and request.
   */
  abandoned(options?: AbandonedOptions): Promise<AbandonedFlow[]>

  /** How many keys the table holds in each state, for monitoring. */
  counts(): Promise<KeyCounts>

  /**
   * Brings the table to the latest schema, recording applied migrations in its own table
   * (`<tableName>_migration`). Safe to call from several processes at once. A change the table
   * already has (it was created from the printed DDL, or by a `Migrator` with another history
   * table) is recorded, not made again. With `baseline: true` nothing is changed: what the
   * table has is recorded, and anything it lacks is an `IdempotencyMigrationError`.
   */
  migrate(options?: MigrateOptions): Promise<MigrationResultSet>

  /** Deletes expired rows that no attempt holds, in batches; returns how many were deleted. */
  prune(options?: PruneOptions): Promise<number>

  /**
   * Defines a flow of atomic phases by name, so that the recovery worker ({@link recover},
   * {@link startRecovery}) can finish it after a crash without waiting for the client to retry:
   * the name is stored with each key, and the worker calls `fn` again with the stored request,
   * resuming after the last recorded phase. Define each flow once per instance, under a name
   * that stays the same across deploys (1 to 100 letters, digits, `_ . : -`, starting with a
   * letter). A framework adapter's route takes a defined flow too (`idempotentFlow(idempotency, options, flow)`).
   *
   * ### Examples
   *
   * ```ts
   * import { idempotency, insertRide, key, markCharged, payments, rideRequest, userId, type RideRequest } from './app'
   *
   * const createRide = idempotency.defineFlow('create-ride', async (flow, request: RideRequest) => {
   *   const ride = await flow.phase('ride_created', (trx) => insertRide(trx, request))
   *   const charge = await flow.step('charge_created', () =>
   *     payments.charge(ride, { idempotencyKey: flow.stepKey('charge_created') }))
   *   await flow.phase('ride_charged', (trx) => markCharged(trx, ride.id, charge.id))
   *   return { status: 201, body: ride }
   * })
   * await createRide.run({ key, scope: userId, request: rideRequest })
   * ```
   */
  defineFlow<T = never, R = unknown>(name: string, fn: FlowFunction<DB, T, R>, options?: DefineFlowOptions): DefinedFlow<T, R>
  // As for run: without type arguments the result type is inferred, and fail() needs one.
  defineFlow<Result, R>(name: string, fn: FlowFunction<DB, never, R, Result>, options?: DefineFlowOptions): DefinedFlow<Result, R>

  /**
   * One pass of the recovery worker: takes over each abandoned flow (its lock expired or was
   * released, it is not finished and not expired) whose name is defined in this instance, the
   * way a retrying client would (fenced, so a client racing it gets 409 or the replay, never a
   * second run), and runs it to its end with its stored request. Flows of other names are
   * counted as skipped and never touched; a flow that fails backs off and, after `maxFailures`,
   * is left to `abandoned()` and the client.
   */
  recover(options?: RecoverOptions): Promise<RecoveryReport>

  /**
   * Runs {@link recover} in the background, every `every` ms (default 30 s), until `stop()`.
   * Safe in every process at once: the claim of each flow is its lock. Errors go to `onEvent`
   * (`recovery_failed`), never into the event loop; the worker does not keep the process alive.
   */
  startRecovery(options?: StartRecoveryOptions): RecoveryWorker

  /**
   * Processes a queue message or a webhook delivery at most once per id (and source): `handler`
   * runs in a transaction that also stores the id, so its writes and the id commit together, and
   * a redelivery after that commit runs nothing and gives `{ duplicate: true }`: acknowledge it.
   * A redelivery while the first is still running waits `conflictWait`, then rejects with
   * `IdempotencyConflictError` (let the queue redeliver it later); with `reuse: 'reject'`, a
   * processed id rejects with `IdempotencyKeyUsedError`. Ids are remembered 7 days (or the
   * instance's `ttl` where longer) unless `ttl` says otherwise (docs: Message and webhook consumers).
   *
   * ### Examples
   *
   * ```ts
   * import { idempotency } from './app'
   *
   * const message = { MessageId: '5fea7756-0ea4-451a-a703-a558b933e274', Body: '{"item":"book"}' }
   * const { duplicate } = await idempotency.consume({ source: 'orders-queue', id: message.MessageId, body: message.Body }, (trx) =>
   *   trx.insertInto('orders').values(JSON.parse(message.Body)).returning('id').executeTakeFirstOrThrow())
   * // Processed now or before (duplicate): either way, delete the message from the queue.
   * ```
   */
  consume<T>(message: Message, handler: (trx: Transaction<DB>) => Promise<T & Storable<T>>, options?: ConsumeOptions): Promise<Delivery<T>>

  /** What the table holds for one key, for support work; `undefined` when there is nothing. */
  inspect(key: KeyReference): Promise<KeyInspection | undefined>

  /**
   * Deletes one key, so that the client's next request with it runs as new: `true` when it was
   * there, `false` when not. A key an attempt holds right now is refused with
   * `IdempotencyConflictError`; a finished key's stored answer is lost.
   */
  forget(key: KeyReference): Promise<boolean>
}
