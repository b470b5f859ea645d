/**
 * The composition root: an idempotency instance assembled from its parts (the table, the
 * coalescer, the single-transaction path, the flow runner, the recovery registry), and the free
 * `withIdempotency`, which shares one set of parts per database and table.
 */
import type { DialectAdapter, Kysely, Transaction } from 'kysely'
import type { Execution, Idempotency } from './api.js'
import { Coalescer } from './coalesce.js'
import { consumeMessage } from './consume.js'
import { ValueStore } from './codec/store.js'
import type { Storable } from './codec/values.js'
import type { IdempotencyDialect } from './dialect.js'
import { FlowRunner } from './flow/claim.js'
import type { Flow } from './flow/handle.js'
import { checkFlowName, type FlowSettings } from './flow/state.js'
import { SurvivedFailures } from './flow/survived.js'
import { KeyTable } from './keytable.js'
import { normalizeKey, type IdempotencyKeyInput, type NormalizedKey } from './keys.js'
import type { MigrateTable } from './migrate.js'
import { failureOf, Observer } from './observe.js'
import { forgetKey, inspectKey, pruneKeys } from './operations.js'
import {
  bounded,
  checkDefineOptions,
  DEFAULTS,
  flag,
  resolveSettings,
  type CallOptions,
  type IdempotencyOptions,
  type RunOptions,
  type TransactionOptions,
  type WithIdempotencyOptions,
} from './options.js'
import { recoveryPass } from './recovery/pass.js'
import {
  attachInternals,
  FlowRegistry,
  type DefinedFlow,
  type DefinedFlowKey,
  type DefinedRunOptions,
  type DefineFlowOptions,
  type Definition,
  type FlowFunction,
} from './recovery/registry.js'
import type { ResumeContext } from './recovery/resume.js'
import { startWorker, type RecoverOptions } from './recovery/worker.js'
import type { Settings } from './retries.js'
import { DEFAULT_TABLE, placeTable, qualified, type TableName } from './table.js'
import { TransactionPath } from './transaction.js'
import { Verdicts } from './verdict.js'

/** What the package entry gives the core: the databases it knows and the table's migrations. */
export interface Parts {
  /** The dialect module that fits a Kysely instance. */
  detect(db: Kysely<unknown>): IdempotencyDialect
  readonly migrate: MigrateTable
}

/** What every path of one table in one database shares: the table, its attempts in flight, the single-transaction path. */
interface TableParts {
  readonly table: KeyTable
  readonly coalescer: Coalescer
  readonly verdicts: Verdicts
  readonly path: TransactionPath
}

function tableParts(dialect: IdempotencyDialect, name: TableName, values: ValueStore, adapter: DialectAdapter): TableParts {
  const table = new KeyTable(dialect, name, values)
  const coalescer = new Coalescer(table.name, adapter)
  const verdicts = new Verdicts(table, coalescer)
  return { table, coalescer, verdicts, path: new TransactionPath(table, coalescer, verdicts) }
}

type Outcome<T> = { value: Execution<T> } | { error: unknown }

/** `createIdempotency` of the package entry, with the parts it gives. */
export function assembleIdempotency<DB>(options: IdempotencyOptions<DB>, parts: Parts): Idempotency<DB> {
  const db = options.db
  const plain = db as unknown as Kysely<unknown>
  const dialect = options.dialect ?? parts.detect(plain)
  const name = placeTable(plain, options.tableName ?? DEFAULT_TABLE, dialect)
  const { table, coalescer, verdicts, path } = tableParts(dialect, name, new ValueStore(options.codec), plain.getExecutor().adapter)
  const observer = new Observer(options)
  const runner = new FlowRunner(table, verdicts, observer, new SurvivedFailures(table.values, options.errorClasses))
  const registry = new FlowRegistry()
  const base = resolveSettings(DEFAULTS, options)
  const lockTimeout = bounded('lockTimeout', options.lockTimeout ?? DEFAULTS.lockTimeout)
  // Most calls pass no options (`undefined`, or `null` from plain JavaScript): their settings are the instance's, resolved once.
  const defaults: Settings = { ...base, isolationLevel: undefined, claimFirst: flag('claimFirst', options.claimFirst ?? false) }
  const settings = (call: TransactionOptions | undefined): Settings =>
    call == null
      ? defaults
      : {
          ...resolveSettings(base, call),
          isolationLevel: call.isolationLevel,
          claimFirst: flag('claimFirst', call.claimFirst ?? defaults.claimFirst),
        }
  // Every method is async, so that bad input (a missing key, a bad option) rejects instead of throwing.
  const outcome = <T>(result: Outcome<T>) =>
    'error' in result ? failureOf(result.error) : { type: result.value.replayed ? ('replayed' as const) : ('executed' as const) }
  // In the caller's transaction the library cannot know whether the result will be committed.
  const outcomeInTransaction = <T>(result: Outcome<T>) =>
    'error' in result ? failureOf(result.error) : { type: result.value.replayed ? ('replayed' as const) : ('executed_in_transaction' as const) }

  const execute = async <T>(trx: Transaction<DB>, key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T>, call?: CallOptions) => {
    const [normalized, resolved] = [normalizeKey(key), settings(call)]
    return observer.observe(
      'idempotency.withIdempotency',
      'withIdempotency',
      normalized,
      async () => {
        coalescer.refuseNested(normalized, resolved)
        return path.inTransaction(requireTransaction(trx), normalized, fn, resolved)
      },
      outcomeInTransaction,
    )
  }
  const executeTransaction = async <T>(key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T>, call?: TransactionOptions) => {
    const normalized = normalizeKey(key)
    const resolved = settings(call)
    return observer.observe(
      'idempotency.transaction',
      'transaction',
      normalized,
      () =>
        coalescer.coalesced(normalized, resolved, (slot) =>
          path.inOwnTransaction(db, normalized, fn, { ...resolved, claimWait: slot.claimWait }, slot),
        ),
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
    return observer.observe(
      'idempotency.run',
      'run',
      { ...normalized, ...(how.flow ? { flowName: how.flow } : {}) },
      () => coalescer.coalesced(normalized, resolved, (slot) => runner.run(db, normalized, body, flowSettings, slot)),
      (result) =>
        'error' in result ? failureOf(result.error) : result.value.replayed ? { type: 'replayed' } : { type: 'executed', recoveryPoint: 'finished' },
    )
  }
  const executeRun = async <T>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T>, call?: RunOptions) =>
    runFlow(normalizeKey(key), flow, call, { flow: null, finisher: null })

  const resumeContext: ResumeContext & { registry: FlowRegistry; defaults: Settings } = {
    db: plain,
    plain: plain.withoutPlugins(),
    table,
    coalescer,
    runner,
    observer,
    settings: (call) => settings({ ttl: call.ttl }),
    lockTimeout,
    registry,
    defaults,
  }
  const recover = (call: RecoverOptions | undefined, stopped: () => boolean) => recoveryPass(resumeContext, call, stopped)

  const defineFlow = <T, R>(flowName: string, fn: FlowFunction<DB, T, R>, defineOptions: DefineFlowOptions = {}): DefinedFlow<T, R> => {
    const definition: Definition = {
      name: checkFlowName(flowName),
      fn: fn as unknown as Definition['fn'],
      options: checkDefineOptions(defineOptions),
      finishers: new Map(),
    }
    registry.define(definition)
    const executeDefined = async (key: DefinedFlowKey<R>, call?: DefinedRunOptions): Promise<Execution<T>> =>
      runFlow(normalizeKey(key), (flow: Flow<DB, T>) => fn(flow, key.request), overriding(definition.options, call), {
        flow: flowName,
        finisher: null,
      })
    const handle: DefinedFlow<T, R> = {
      name: flowName,
      executeRun: executeDefined,
      run: async (key, call) => (await executeDefined(key, call)).value,
    }
    return attachInternals(handle, {
      definition,
      execute: async (key, body, call, finisher) =>
        runFlow(normalizeKey(key), body as unknown as (flow: Flow<DB, unknown>) => Promise<unknown>, overriding(definition.options, call), {
          flow: flowName,
          finisher: finisher.id,
        }),
    })
  }

  return {
    db,
    tableName: name.name,
    dialect,
    ttl: base.ttl,
    execute,
    executeTransaction,
    withIdempotency: async (trx, key, fn, call) => (await execute(trx, key, fn, call)).value,
    transaction: async (key, fn, call) => (await executeTransaction(key, fn, call)).value,
    consume: (message, handler, call) => consumeMessage(executeTransaction, message, handler, call, base.ttl),
    executeRun: executeRun as Idempotency<DB>['executeRun'],
    run: (async <T>(key: IdempotencyKeyInput, flow: (flow: Flow<DB, T>) => Promise<T>, call?: RunOptions) =>
      (await executeRun(key, flow, call)).value) as Idempotency<DB>['run'],
    abandoned: async (call) =>
      runner.abandoned(plain, bounded('olderThan', call?.olderThan ?? 0), bounded('limit', call?.limit ?? DEFAULTS.abandonedLimit)),
    counts: async () => {
      const statements = await table.statements(plain.withoutPlugins())
      return table.translated(undefined, () => statements.counts(plain.withoutPlugins()))
    },
    migrate: async (migrate) => parts.migrate(plain, name, dialect, migrate?.baseline === true),
    prune: async (prune) => {
      const batchSize = bounded('batchSize', prune?.batchSize ?? DEFAULTS.batchSize)
      return observer.observe(
        'idempotency.prune',
        'prune',
        {},
        () => pruneKeys(table, plain, batchSize),
        (result) => ('error' in result ? failureOf(result.error) : { type: 'pruned', count: result.value }),
      )
    },
    defineFlow: defineFlow as Idempotency<DB>['defineFlow'],
    recover: async (call) => recover(call, () => false),
    startRecovery: (call) => {
      const every = bounded('every', call?.every ?? DEFAULTS.recoveryEvery)
      // Checked now, so that a bad option throws here rather than in every pass.
      bounded('limit', call?.limit ?? DEFAULTS.abandonedLimit)
      bounded('olderThan', call?.olderThan ?? 0)
      bounded('maxFailures', call?.maxFailures ?? DEFAULTS.maxFailures)
      return startWorker(
        every,
        (stopped) => recover(call, stopped),
        'recover',
        (stop) => bounded('timeout', stop?.timeout ?? lockTimeout),
        observer,
      )
    },
    inspect: async (key) => inspectKey(table, plain, normalizeKey(key)),
    forget: async (key) => forgetKey(table, coalescer, plain, normalizeKey(key), { ...settings(undefined), lockTimeout }),
  }
}

/** The parts of the free `withIdempotency`, per database (its adapter) and table. */
const shared = new WeakMap<DialectAdapter, Map<string, TableParts>>()

/** The free `withIdempotency` of the package entry, with the dialect detection it gives. */
export async function withIdempotencyDetecting<DB, T>(
  detect: Parts['detect'],
  trx: Transaction<DB>,
  key: IdempotencyKeyInput,
  fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>,
  options?: WithIdempotencyOptions,
): Promise<T> {
  const adapter = requireTransaction(trx).getExecutor().adapter
  const plain = trx as unknown as Kysely<unknown>
  const dialect = detect(plain)
  const name = placeTable(plain, options?.tableName ?? DEFAULT_TABLE, dialect)
  let tables = shared.get(adapter)
  if (!tables) shared.set(adapter, (tables = new Map()))
  let found = tables.get(qualified(name))
  if (!found) tables.set(qualified(name), (found = tableParts(dialect, name, new ValueStore(), adapter)))
  const [normalized, resolved] = [normalizeKey(key), resolveSettings(DEFAULTS, options ?? {})]
  found.coalescer.refuseNested(normalized, resolved)
  return (await found.path.inTransaction(trx, normalized, fn, resolved)).value
}

/**
 * A defined flow's options with a call's on top: only those the call gives, so that `{ ttl:
 * undefined }` (an HTTP route without a ttl) leaves the definition's.
 */
function overriding(defaults: DefineFlowOptions, call: DefinedRunOptions | undefined): DefinedRunOptions {
  return { ...defaults, ...Object.fromEntries(Object.entries(call ?? {}).filter(([, value]) => value !== undefined)) }
}

function requireTransaction<DB>(trx: Transaction<DB>): Transaction<DB> {
  if (!trx?.isTransaction) {
    throw new TypeError(
      'withIdempotency needs a transaction (db.transaction().execute((trx) => ...)); use idempotency.transaction() to let the library open one.',
    )
  }
  return trx
}
