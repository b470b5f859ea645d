import type { DialectAdapter, IsolationLevel, Kysely, MigrationResultSet, Transaction } from 'kysely'
import { migrateTable } from '../migrations/index.js'
import { ValueStore, type Codec, type Storable } from './codec.js'
import { Core, type Execution, type Settings } from './core.js'
import { Phases, type AbandonedFlow, type Flow } from './phases.js'
import type { KeyCounts } from './statements.js'
import type { IdempotencyDialect } from './dialect.js'
import { checkTableName, DEFAULT_TABLE, detectDialect } from './detect.js'
import { normalizeKey, type IdempotencyKeyInput } from './request.js'

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
export interface IdempotencyOptions<DB> extends CallOptions {
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
  run<T>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T & Storable<T>>, options?: RunOptions): Promise<T>

  /** {@link run}, also telling whether the value was replayed. */
  executeRun<T>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T & Storable<T>>, options?: RunOptions): Promise<Execution<T>>

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
}

/** Options of {@link Idempotency.migrate}. */
export interface MigrateOptions {
  /** Record as applied what the table already has, without changing it (for tables made from the printed DDL). */
  readonly baseline?: boolean | null
}

const DEFAULTS = { ttl: 24 * 60 * 60 * 1000, conflictWait: 5000, lockTimeout: 30_000, maxAttempts: 5, batchSize: 1000, abandonedLimit: 100 }

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
  const tableName = checkTableName(options.tableName ?? DEFAULT_TABLE)
  const dialect = options.dialect ?? detectDialect(plain)
  const core = new Core(dialect, tableName, new ValueStore(options.codec), plain.getExecutor().adapter)
  const phases = new Phases(core)
  const base = resolveSettings(DEFAULTS, options)
  const lockTimeout = bounded('lockTimeout', options.lockTimeout ?? DEFAULTS.lockTimeout)
  const settings = (call: TransactionOptions | undefined): Settings => ({ ...resolveSettings(base, call ?? {}), isolationLevel: call?.isolationLevel })
  // Every method is async, so that bad input (a missing key, a bad option) rejects instead of throwing.
  const execute = async <T>(trx: Transaction<DB>, key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T>, call?: CallOptions) => {
    const [normalized, resolved] = [normalizeKey(key), settings(call)]
    core.refuseNested(normalized, resolved)
    return core.execute(requireTransaction(trx), normalized, fn, resolved)
  }
  const executeTransaction = async <T>(key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T>, call?: TransactionOptions) => {
    const normalized = normalizeKey(key)
    const resolved = settings(call)
    return core.coalesced(normalized, resolved, (slot) => core.transaction(db, normalized, fn, { ...resolved, claimWait: slot.claimWait }, slot))
  }
  const executeRun = async <T>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T>, call?: RunOptions) => {
    const normalized = normalizeKey(key)
    const leased = bounded('lockTimeout', call?.lockTimeout ?? lockTimeout)
    const resolved = settings(call)
    return core.coalesced(normalized, resolved, (slot) => phases.run(db, normalized, flow, { ...resolved, lockTimeout: leased, flow: null }, slot))
  }

  return {
    db,
    tableName,
    dialect,
    execute,
    executeTransaction,
    withIdempotency: async (trx, key, fn, call) => (await execute(trx, key, fn, call)).value,
    transaction: async (key, fn, call) => (await executeTransaction(key, fn, call)).value,
    executeRun,
    run: async (key, flow, call) => (await executeRun(key, flow, call)).value,
    abandoned: async (call) =>
      phases.abandoned(plain, bounded('olderThan', call?.olderThan ?? 0), bounded('limit', call?.limit ?? DEFAULTS.abandonedLimit)),
    counts: async () => {
      const s = await core.statements(plain.withoutPlugins())
      return core.guard(undefined, () => s.counts(plain.withoutPlugins()))
    },
    migrate: async (options) => migrateTable(plain, tableName, dialect, options?.baseline === true),
    prune: async (prune) => core.prune(plain, bounded('batchSize', prune?.batchSize ?? DEFAULTS.batchSize)),
  }
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
  const tableName = checkTableName(options?.tableName ?? DEFAULT_TABLE)
  let cores = shared.get(adapter)
  if (!cores) shared.set(adapter, (cores = new Map()))
  let core = cores.get(tableName)
  if (!core) cores.set(tableName, (core = new Core(detectDialect(trx as unknown as Kysely<unknown>), tableName, new ValueStore(), adapter)))
  const [normalized, resolved] = [normalizeKey(key), resolveSettings(DEFAULTS, options ?? {})]
  core.refuseNested(normalized, resolved)
  return (await core.execute(trx, normalized, fn, resolved)).value
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
} as const

function bounded(name: keyof typeof BOUNDS, value: unknown): number {
  const { min, max, label } = BOUNDS[name]
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`The option ${name} must be an integer from ${min} to ${max}${label ? ` (${label})` : ''}, got ${String(value)}.`)
  }
  return value
}
