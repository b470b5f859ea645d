import type { DialectAdapter, IsolationLevel, Kysely, Transaction } from 'kysely'
import { migrateTable, type MigrationResultSet } from '../migrations/index.js'
import { ValueStore, type Codec, type Storable } from './codec.js'
import { Core, type Execution, type Settings } from './core.js'
import { IdempotencyConflictError, IdempotencyLockLostError } from './errors.js'
import {
  attachInternals,
  Flows,
  type DefinedFlow,
  type DefinedFlowKey,
  type DefinedRunOptions,
  type DefineFlowOptions,
  type Definition,
  type FlowFunction,
  type RecoverOptions,
  type RecoveryReport,
  type RecoveryWorker,
  type StartRecoveryOptions,
} from './flows.js'
import { forgetKey, inspectKey, type KeyInspection, type KeyReference } from './inspect.js'
import { failureOf, Observer, type ObserveOptions } from './observe.js'
import { isFailure, NotResumable, Phases, readStarted, text, type AbandonedFlow, type Flow, type FlowSettings } from './phases.js'
import type { AbandonedRow, KeyCounts, RecoveryFailure } from './statements.js'
import type { IdempotencyDialect } from './dialect.js'
import { detectDialect } from './detect.js'
import { IdempotencySetupError } from './errors.js'
import { DEFAULT_TABLE, locateTable, qualified, type TableName } from './table.js'
import { normalizeKey, type IdempotencyKeyInput, type NormalizedKey } from './request.js'
import { SurvivedFailures, type ErrorClass } from './survived.js'

/** Settings that apply per call as well as per instance. */
export interface CallOptions {
  /**
   * How long a key stays replayable after it finished, in milliseconds; a key an attempt still
   * holds never expires. Default 24 hours; at most 10 years.
   */
  readonly ttl?: number
  /**
   * How long a duplicate waits for an in-flight attempt with the same key before giving up
   * with `IdempotencyConflictError` (`in_flight`), in milliseconds. Default 5000; at most 1
   * hour; 0 never waits (the IETF draft's 409). A duplicate in the same instance waits in
   * memory, holding no connection; one from another process waits in the database, where
   * MySQL/MariaDB round it up to whole seconds (MySQL waits at least 1 s) and SQLite waits for
   * the connection's busy timeout instead.
   */
  readonly conflictWait?: number
}

/** Options of {@link createIdempotency}. */
export interface IdempotencyOptions<DB> extends CallOptions, ObserveOptions {
  /** The Kysely instance whose database holds the idempotency table. */
  readonly db: Kysely<DB>
  /** Name of the idempotency table: a plain identifier. Default `idempotency_keys`. */
  readonly tableName?: string
  /**
   * How long an atomic-phases attempt owns a key before another attempt may take it over,
   * in milliseconds. Default 30000; at most 24 hours.
   */
  readonly lockTimeout?: number
  /**
   * How many times {@link Idempotency.transaction} runs the transaction when it fails with a
   * serialization failure, a deadlock or a race on the key. Default 5; at most 100.
   */
  readonly maxAttempts?: number
  /** The database module to use. Default: chosen from the Kysely instance's adapter. */
  readonly dialect?: IdempotencyDialect
  /**
   * How stored values (results, phase and step values) are written and read back. Default
   * {@link defaultCodec}; replace it, e.g., to encrypt stored responses (see {@link Codec}).
   */
  readonly codec?: Codec
  /**
   * Error classes of yours that atomic-phases flows catch and go on from, so that a resume
   * rethrows a recorded failure as an instance of its class (`instanceof` holds), as the first
   * attempt saw it. Without it, such a failure comes back as an `Error` with the same name,
   * message and fields. Built-in classes and the library's are always rebuilt.
   */
  readonly errorClasses?: readonly ErrorClass[]
}

/** Options of {@link Idempotency.transaction}. */
export interface TransactionOptions extends CallOptions {
  /** Isolation level of the library-owned transaction. Default: the database's. */
  readonly isolationLevel?: IsolationLevel
}

/** Options of {@link Idempotency.run}. */
export interface RunOptions extends CallOptions {
  /**
   * How long this attempt owns the key before another attempt may take it over, in
   * milliseconds; renewed at every recorded phase and step. Default: the instance's
   * `lockTimeout`; at most 24 hours.
   */
  readonly lockTimeout?: number
}

/** Options of {@link Idempotency.abandoned}. */
export interface AbandonedOptions {
  /** Only flows that recorded nothing for at least this many milliseconds. Default 0. */
  readonly olderThan?: number
  /** At most this many flows, those idle longest first. Default 100; at most 10000. */
  readonly limit?: number
}

/** Options of {@link Idempotency.prune}. */
export interface PruneOptions {
  /** Rows deleted per statement, so that no statement holds many locks. Default 1000; at most 100000. */
  readonly batchSize?: number
}

/** An idempotency store bound to one Kysely instance and one table; see {@link createIdempotency}. */
export interface Idempotency<DB> {
  /** The Kysely instance the store was created with. */
  readonly db: Kysely<DB>
  /** The table this instance uses. */
  readonly tableName: string
  /** The database module in use. */
  readonly dialect: IdempotencyDialect

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
   * const order = await db.transaction().execute((trx) =>
   *   idempotency.withIdempotency(trx, { key, scope: userId, request: body }, (trx) =>
   *     trx.insertInto('orders').values(body).returningAll().executeTakeFirstOrThrow()))
   * ```
   */
  withIdempotency<T>(trx: Transaction<DB>, key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>, options?: CallOptions): Promise<T>

  /** {@link withIdempotency}, also telling whether the value was replayed. */
  execute<T>(
    trx: Transaction<DB>,
    key: IdempotencyKeyInput,
    fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>,
    options?: CallOptions,
  ): Promise<Execution<T>>

  /**
   * Like {@link withIdempotency} in a transaction the library opens: a replay is answered by
   * one read before any transaction starts; serialization failures and deadlocks are retried
   * with jittered back-off (so `fn` may run more than once, each time in a transaction that
   * was rolled back: keep its side effects inside the database).
   *
   * ### Examples
   *
   * ```ts
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
   * table has is recorded, and anything it lacks is an {@link IdempotencyMigrationError}.
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
   * letter). HTTP routes take a defined flow too (`idempotentFlow(idempotency, options, flow)`).
   *
   * ### Examples
   *
   * ```ts
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

  /** What the table holds for one key, for support work; `undefined` when there is nothing. */
  inspect(key: KeyReference): Promise<KeyInspection | undefined>

  /**
   * Deletes one key, so that the client's next request with it runs as new: `true` when it was
   * there, `false` when not. A key an attempt holds right now is refused with
   * `IdempotencyConflictError`; a finished key's stored answer is lost.
   */
  forget(key: KeyReference): Promise<boolean>
}

/** Options of {@link Idempotency.migrate}. */
export interface MigrateOptions {
  /** Record as applied what the table already has, without changing it (for tables made from the printed DDL). */
  readonly baseline?: boolean | null
}

const DEFAULTS = {
  ttl: 24 * 60 * 60 * 1000,
  conflictWait: 5000,
  lockTimeout: 30_000,
  maxAttempts: 5,
  batchSize: 1000,
  abandonedLimit: 100,
  recoveryEvery: 30_000,
  maxFailures: 5,
}
/** How long the worker leaves a flow whose finisher is not registered here before it looks again. */
const UNBOUND_POSTPONE = 60_000

/**
 * Creates an idempotency store for one Kysely instance and table. Bad options throw here;
 * every method reports bad input as a rejected promise.
 *
 * ### Examples
 *
 * ```ts
 * import { createIdempotency } from 'kysely-idempotency'
 *
 * const idempotency = createIdempotency({ db })
 * await idempotency.migrate()
 * const result = await idempotency.transaction({ key: 'order-42', request: body }, (trx) => createOrder(trx, body))
 * ```
 */
export function createIdempotency<DB>(options: IdempotencyOptions<DB>): Idempotency<DB> {
  const db = options.db
  const plain = db as unknown as Kysely<unknown>
  const dialect = options.dialect ?? detectDialect(plain)
  const table = placeTable(plain, options.tableName ?? DEFAULT_TABLE, dialect)
  const tableName = table.name
  const core = new Core(dialect, table, new ValueStore(options.codec), plain.getExecutor().adapter)
  const observer = new Observer(options)
  const phases = new Phases(core, observer, new SurvivedFailures(core.values, options.errorClasses))
  const flows = new Flows(observer)
  const base = resolveSettings(DEFAULTS, options)
  const lockTimeout = bounded('lockTimeout', options.lockTimeout ?? DEFAULTS.lockTimeout)
  // Most calls pass no options (`undefined`, or `null` from plain JavaScript): their settings are the instance's, resolved once.
  const defaults: Settings = { ...base, isolationLevel: undefined }
  const settings = (call: TransactionOptions | undefined): Settings =>
    call == null ? defaults : { ...resolveSettings(base, call), isolationLevel: call.isolationLevel }
  // Every method is async, so that bad input (a missing key, a bad option) rejects instead of throwing.
  const outcome = <T>(result: { value: Execution<T> } | { error: unknown }) =>
    'error' in result ? failureOf(result.error) : { type: result.value.replayed ? ('replayed' as const) : ('executed' as const) }
  // In the caller's transaction the library cannot know whether the result will be committed.
  const outcomeInTransaction = <T>(result: { value: Execution<T> } | { error: unknown }) =>
    'error' in result ? failureOf(result.error) : { type: result.value.replayed ? ('replayed' as const) : ('executed_in_transaction' as const) }
  const execute = async <T>(trx: Transaction<DB>, key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T>, call?: CallOptions) => {
    const [normalized, resolved] = [normalizeKey(key), settings(call)]
    return observer.observe(
      'idempotency.withIdempotency',
      'withIdempotency',
      normalized,
      async () => {
        core.refuseNested(normalized, resolved)
        return core.execute(requireTransaction(trx), normalized, fn, resolved)
      },
      outcomeInTransaction,
    )
  }
  const executeTransaction = async <T>(key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T>, call?: TransactionOptions) => {
    const normalized = normalizeKey(key)
    const resolved = settings(call)
    return observer.observe('idempotency.transaction', 'transaction', normalized, () =>
      core.coalesced(normalized, resolved, (slot) => core.transaction(db, normalized, fn, { ...resolved, claimWait: slot.claimWait }, slot)),
      outcome,
    )
  }
  /** Runs a flow as one attempt; `flow` names a defined flow, `finisher` the finisher that makes its answer. */
  const runFlow = async <T>(
    normalized: NormalizedKey,
    body: (flow: Flow<DB, T>) => Promise<T>,
    call: DefinedRunOptions | undefined,
    how: Pick<FlowSettings, 'flow' | 'finisher'>,
  ): Promise<Execution<T>> => {
    const leased = bounded('lockTimeout', call?.lockTimeout ?? lockTimeout)
    const resolved = settings(call)
    const flowSettings: FlowSettings = { ...resolved, ...how, lockTimeout: leased, resumeOnly: false, operation: 'run' }
    return observer.observe('idempotency.run', 'run', { ...normalized, ...(how.flow ? { flowName: how.flow } : {}) }, () =>
      core.coalesced(normalized, resolved, (slot) => phases.run(db, normalized, body, flowSettings, slot)),
      (result) => ('error' in result ? failureOf(result.error) : result.value.replayed ? { type: 'replayed' } : { type: 'executed', recoveryPoint: 'finished' }),
    )
  }
  const executeRun = async <T>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T>, call?: RunOptions) =>
    runFlow(normalizeKey(key), flow, call, { flow: null, finisher: null })

  /**
   * Takes over one abandoned flow of `definition` as the recovery worker, and runs it to its end;
   * if the run fails, the flow backs off as `failure` says.
   */
  const resume = async (row: AbandonedRow, definition: Definition, failure: RecoveryFailure): Promise<'finished' | 'skipped'> => {
    const key = { scope: text(row.scope), key: text(row.key), fingerprint: String(row.fingerprint) }
    const outcome = await observer.observe(
      'idempotency.recover',
      'recover',
      { ...key, flowName: definition.name },
      async () => {
        const started = readStarted(core.values, String(row.phases), row.codec == null ? null : String(row.codec))
        // A flow served with a finisher is finished by that finisher's rules only.
        const finisher = started.finisher === undefined ? undefined : definition.finishers.get(started.finisher)
        if (started.finisher !== undefined && !finisher) return 'unbound'
        const normalized: NormalizedKey = { ...key, request: started.request }
        // The run's own lease and lifetime, which a worker with other defaults must not shorten.
        const resolved = settings({ ttl: started.ttl ?? definition.options.ttl })
        const flowSettings: FlowSettings = {
          ...resolved,
          lockTimeout: bounded('lockTimeout', started.lockTimeout ?? definition.options.lockTimeout ?? lockTimeout),
          flow: definition.name,
          finisher: finisher?.id ?? null,
          resumeOnly: true,
          failure,
          operation: 'recover',
        }
        const body = async (flow: Flow<DB, unknown>) => {
          const handle = finisher ? { ...flow, fail: (response: unknown) => flow.fail(finisher.finish(response)) } : flow
          try {
            const result = await definition.fn(handle as never, started.request)
            return finisher ? finisher.finish(result) : result
          } catch (error) {
            // Whatever the flow's own code throws is its failure, even a conflict of another key.
            if (isFailure(error)) throw error
            throw new FlowCodeError(error)
          }
        }
        // No wait for an attempt in flight: it is not abandoned. Its phases still wait on row locks as usual.
        await core.coalesced(normalized, { ...resolved, conflictWait: 0 }, (slot) => phases.run(db, normalized, body, flowSettings, slot))
        return 'finished'
      },
      (result) =>
        'value' in result
          ? result.value === 'finished'
            ? { type: 'recovered', recoveryPoint: 'finished' }
            : undefined
          : skippedBy(result.error)
            ? undefined
            : { type: 'recovery_failed', error: result.error instanceof FlowCodeError ? result.error.cause : result.error },
    ).catch((error: unknown) => {
      if (skippedBy(error)) return 'skipped' as const
      throw error
    })
    if (outcome === 'unbound') {
      // Not this process's to finish: look again later, not at every pass before the others.
      const p = plain.withoutPlugins()
      const s = await core.statements(p)
      await core.guard(undefined, () => s.postpone(p, row.id, UNBOUND_POSTPONE)).catch(touchedElsewhere)
      return 'skipped'
    }
    return outcome
  }
  const recover = async (call?: RecoverOptions, stopped = () => false): Promise<RecoveryReport> => {
    const limit = bounded('limit', call?.limit ?? DEFAULTS.abandonedLimit)
    const olderThan = bounded('olderThan', call?.olderThan ?? 0)
    const maxFailures = bounded('maxFailures', call?.maxFailures ?? DEFAULTS.maxFailures)
    const p = plain.withoutPlugins()
    const s = await core.statements(p)
    const names = flows.names
    // A SERIALIZABLE database may cancel even a read under concurrent passes and clients: read again.
    const read = <T>(statement: () => Promise<T>) => core.retrying(defaults, () => core.guard(undefined, statement))
    const rows = await read(() => s.recoverable(p, names, olderThan, limit))
    const unknown = await read(() => s.unknownFlows(p, names, olderThan))
    const failure: RecoveryFailure = { maxFailures }
    return flows.recover(
      rows,
      unknown,
      (row, definition) => resume(row, definition, failure),
      // Usually the failed attempt counted itself as it let go of the flow; this counts a failure
      // before any takeover, and does nothing if the count moved meanwhile.
      (row, failures) => read(() => s.recoveryFailed(p, row.id, failures - 1, failure)).catch(touchedElsewhere),
      stopped,
    )
  }

  return {
    db,
    tableName,
    dialect,
    execute,
    executeTransaction,
    withIdempotency: async (trx, key, fn, call) => (await execute(trx, key, fn, call)).value,
    transaction: async (key, fn, call) => (await executeTransaction(key, fn, call)).value,
    executeRun: executeRun as Idempotency<DB>['executeRun'],
    run: (async <T>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T>, call?: RunOptions) =>
      (await executeRun(key, flow, call)).value) as Idempotency<DB>['run'],
    abandoned: async (call) =>
      phases.abandoned(plain, bounded('olderThan', call?.olderThan ?? 0), bounded('limit', call?.limit ?? DEFAULTS.abandonedLimit)),
    counts: async () => {
      const s = await core.statements(plain.withoutPlugins())
      return core.guard(undefined, () => s.counts(plain.withoutPlugins()))
    },
    migrate: async (options) => migrateTable(plain, table, dialect, options?.baseline === true),
    prune: async (prune) => {
      const batchSize = bounded('batchSize', prune?.batchSize ?? DEFAULTS.batchSize)
      return observer.observe('idempotency.prune', 'prune', {}, () => core.prune(plain, batchSize), (result) =>
        'error' in result ? failureOf(result.error) : { type: 'pruned', count: result.value },
      )
    },
    defineFlow: (<T, R>(name: string, fn: FlowFunction<DB, T, R>, defineOptions: DefineFlowOptions = {}): DefinedFlow<T, R> => {
      const definition: Definition = {
        name: checkFlowName(name),
        fn: fn as unknown as Definition['fn'],
        options: checkDefineOptions(defineOptions),
        finishers: new Map(),
      }
      flows.define(definition)
      const executeDefined = async (key: DefinedFlowKey<R>, call?: DefinedRunOptions): Promise<Execution<T>> => {
        const normalized = normalizeKey(key)
        return runFlow(normalized, (flow: Flow<DB, T>) => fn(flow, key.request), { ...definition.options, ...call }, { flow: name, finisher: null })
      }
      const handle: DefinedFlow<T, R> = {
        name,
        executeRun: executeDefined,
        run: async (key, call) => (await executeDefined(key, call)).value,
      }
      return attachInternals(handle, {
        definition,
        execute: async (key, body, call, finisher) =>
          runFlow(normalizeKey(key), body as unknown as (flow: Flow<DB, unknown>) => Promise<unknown>, { ...definition.options, ...call }, { flow: name, finisher: finisher.id }),
      })
    }) as Idempotency<DB>['defineFlow'],
    recover: (call) => recover(call),
    startRecovery: (call) => {
      const every = bounded('every', call?.every ?? DEFAULTS.recoveryEvery)
      // Checked now, so that a bad option throws here rather than in every pass.
      bounded('limit', call?.limit ?? DEFAULTS.abandonedLimit)
      bounded('olderThan', call?.olderThan ?? 0)
      bounded('maxFailures', call?.maxFailures ?? DEFAULTS.maxFailures)
      return flows.start(every, (stopped) => recover(call, stopped), 'recover', (stop) => bounded('timeout', stop?.timeout ?? lockTimeout))
    },
    inspect: async (key) => inspectKey(core, plain, normalizeKey(key)),
    forget: async (key) => forgetKey(core, plain, normalizeKey(key), { ...settings(undefined), lockTimeout }),
  }
}

/**
 * A conflict on the worker's own bookkeeping of one flow (a count, a postponement) means another
 * worker or a client acted on that flow meanwhile: that flow's turn is over, not the pass.
 */
function touchedElsewhere(error: unknown): void {
  if (!(error instanceof IdempotencyConflictError)) throw error
}

/**
 * What makes the recovery worker leave a flow alone: someone else holds it, finished it or took
 * it over. (The flow's own code cannot throw these: its errors come wrapped in {@link FlowCodeError}.)
 */
function skippedBy(error: unknown): boolean {
  return error instanceof NotResumable || error instanceof IdempotencyConflictError || error instanceof IdempotencyLockLostError
}

/** An error of a defined flow's own code, as the recovery worker runs it. */
class FlowCodeError extends Error {
  constructor(cause: unknown) {
    super(cause instanceof Error ? cause.message : String(cause), { cause })
  }
}

const FLOW_NAME = /^[A-Za-z][A-Za-z0-9_.:-]{0,99}$/

function checkFlowName(name: unknown): string {
  if (typeof name !== 'string' || !FLOW_NAME.test(name)) {
    throw new TypeError(`${JSON.stringify(name)} is not a valid flow name: use 1 to 100 letters, digits, "_", ".", ":" or "-", starting with a letter.`)
  }
  return name
}

function checkDefineOptions(options: DefineFlowOptions): DefineFlowOptions {
  if (options.ttl !== undefined) bounded('ttl', options.ttl)
  if (options.lockTimeout !== undefined) bounded('lockTimeout', options.lockTimeout)
  return options
}

/** Options of the free {@link withIdempotency} function, which uses the default codec. */
export interface WithIdempotencyOptions extends CallOptions {
  /** Name of the idempotency table. Default `idempotency_keys`. */
  readonly tableName?: string
}

const shared = new WeakMap<DialectAdapter, Map<string, Core>>()

/**
 * {@link Idempotency.withIdempotency} without creating an instance first: runs `fn` at most
 * once per key inside `trx`, using the table `idempotency_keys` unless told otherwise. The
 * dialect is chosen from the transaction's adapter.
 *
 * ### Examples
 *
 * ```ts
 * import { withIdempotency } from 'kysely-idempotency'
 *
 * await db.transaction().execute((trx) =>
 *   withIdempotency(trx, { key, scope: userId, request: body }, (trx) => createOrder(trx, body)))
 * ```
 */
export async function withIdempotency<DB, T>(
  trx: Transaction<DB>,
  key: IdempotencyKeyInput,
  fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>,
  options?: WithIdempotencyOptions,
): Promise<T> {
  const adapter = requireTransaction(trx).getExecutor().adapter
  const plain = trx as unknown as Kysely<unknown>
  const dialect = detectDialect(plain)
  const table = placeTable(plain, options?.tableName ?? DEFAULT_TABLE, dialect)
  let cores = shared.get(adapter)
  if (!cores) shared.set(adapter, (cores = new Map()))
  let core = cores.get(qualified(table))
  if (!core) cores.set(qualified(table), (core = new Core(dialect, table, new ValueStore(), adapter)))
  const [normalized, resolved] = [normalizeKey(key), resolveSettings(DEFAULTS, options ?? {})]
  core.refuseNested(normalized, resolved)
  return (await core.execute(trx, normalized, fn, resolved)).value
}

/** Where `db` puts the table `name`; a schema (`withSchema`) only where the dialect has schemas. */
function placeTable(db: Kysely<unknown>, name: string, dialect: IdempotencyDialect): TableName {
  const table = locateTable(db, name)
  if (table.schema !== undefined && !dialect.schemas) {
    throw new IdempotencySetupError(
      `This Kysely instance puts tables in the schema "${table.schema}" (withSchema), which ${dialect.name} cannot hold the idempotency table in; ` +
        'create the idempotency instance from a Kysely instance without withSchema.',
    )
  }
  return table
}

function requireTransaction<DB>(trx: Transaction<DB>): Transaction<DB> {
  if (!trx?.isTransaction) {
    throw new TypeError('withIdempotency needs a transaction (db.transaction().execute((trx) => ...)); use idempotency.transaction() to let the library open one.')
  }
  return trx
}

function resolveSettings(base: Settings, options: CallOptions & { readonly maxAttempts?: number }): Settings {
  return {
    ttl: bounded('ttl', options.ttl ?? base.ttl),
    conflictWait: bounded('conflictWait', options.conflictWait ?? base.conflictWait),
    maxAttempts: bounded('maxAttempts', options.maxAttempts ?? base.maxAttempts),
  }
}

const HOUR = 60 * 60 * 1000
const DAY = 24 * HOUR
/**
 * Integer options and their ranges. The upper bounds keep every time the database computes
 * from them representable (MySQL's DATETIME ends in 9999) and catch unit mistakes (seconds
 * for milliseconds would still fit; microseconds would not).
 */
const BOUNDS = {
  ttl: { min: 1, max: 3650 * DAY, label: '10 years' },
  conflictWait: { min: 0, max: HOUR, label: '1 hour' },
  lockTimeout: { min: 1, max: DAY, label: '24 hours' },
  maxAttempts: { min: 1, max: 100, label: '' },
  batchSize: { min: 1, max: 100_000, label: '' },
  limit: { min: 1, max: 10_000, label: '' },
  olderThan: { min: 0, max: 3650 * DAY, label: '10 years' },
  maxFailures: { min: 1, max: 100, label: '' },
  every: { min: 10, max: DAY, label: '24 hours' },
  timeout: { min: 0, max: DAY, label: '24 hours' },
} as const

function bounded(name: keyof typeof BOUNDS, value: unknown): number {
  const { min, max, label } = BOUNDS[name]
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`The option ${name} must be an integer from ${min} to ${max}${label ? ` (${label})` : ''}, got ${String(value)}.`)
  }
  return value
}
