import type { ConflictReason } from './errors.js'
import { IdempotencyConflictError, IdempotencyKeyReuseError, IdempotencyKeyUsedError, IdempotencyLockLostError } from './errors.js'

/** What happened, as the `type` of an {@link IdempotencyEvent} names it. */
export type IdempotencyEventType =
  /** The function or flow ran and its result was stored (committed, in the library's own transaction). */
  | 'executed'
  /**
   * `withIdempotency` only: the function ran in your transaction, and its result is written
   * there. It is stored once you commit; if you roll back, nothing happened and a retry runs
   * again. The library cannot see your commit, so it reports no more than this.
   */
  | 'executed_in_transaction'
  /** The stored result was returned; nothing ran. */
  | 'replayed'
  /** The function or flow threw (or a value could not be stored); nothing was stored, a retry runs again. */
  | 'failed'
  /** Another attempt holds the key (409); `reason` says how. */
  | 'conflict'
  /** The key was used before for a different request (422). */
  | 'key_reuse'
  /** The key already answered this request, and the call asked to reject a used key (`reuse: 'reject'`, 409). */
  | 'key_used'
  /** A flow's attempt found its lock taken over by another attempt and stopped. */
  | 'lock_lost'
  /** A flow's attempt took over an unfinished flow that another attempt left; `recoveryPoint` is where it resumes. */
  | 'taken_over'
  /** The recovery worker finished an abandoned flow. */
  | 'recovered'
  /** The recovery worker failed to finish a flow (`key` set), or a whole pass failed (no `key`); `error` says why. */
  | 'recovery_failed'
  /** `prune` deleted `count` expired keys. */
  | 'pruned'

/** Which method an event comes from. */
export type IdempotencyOperation = 'transaction' | 'withIdempotency' | 'run' | 'recover' | 'prune'

/**
 * What every event tells: where it comes from, about which key, and when.
 * @inline
 */
interface EventContext {
  readonly operation: IdempotencyOperation
  readonly scope?: string
  readonly key?: string
  /** Milliseconds from the call (or, for the recovery worker, from picking the flow) to this outcome. */
  readonly durationMs: number
  /** The name of a flow defined with `defineFlow`. */
  readonly flowName?: string
}

/**
 * What a call ended with, by type: the fields each type has besides its context. A flow's
 * `recoveryPoint` is where the attempt resumed from (`taken_over`) or the point it reached.
 * @inline
 */
export type Ending =
  | { readonly type: 'executed'; readonly recoveryPoint?: string }
  | { readonly type: 'executed_in_transaction' }
  | { readonly type: 'replayed' }
  | { readonly type: 'failed'; readonly error: unknown }
  | { readonly type: 'conflict'; readonly reason: ConflictReason }
  | { readonly type: 'key_reuse' }
  | { readonly type: 'key_used' }
  | { readonly type: 'lock_lost'; readonly error: unknown }
  | { readonly type: 'taken_over'; readonly recoveryPoint: string }
  | { readonly type: 'recovered'; readonly recoveryPoint: string }
  | { readonly type: 'recovery_failed'; readonly error: unknown }
  | { readonly type: 'pruned'; readonly count: number }

/**
 * One outcome, as the `onEvent` hook of `createIdempotency` receives it: narrow on `type` to
 * read the fields that type has (`reason` of a `conflict`, `error` of a `failed`, …).
 */
export type IdempotencyEvent = EventContext & Ending

/** Options of `createIdempotency` that say how the library reports what it does. */
export interface ObserveOptions {
  /**
   * Called for every outcome. It runs inline, so keep it cheap (count, log, queue); what it
   * throws or rejects with is ignored, and never reaches a request.
   */
  readonly onEvent?: (event: IdempotencyEvent) => void | Promise<void>
  /**
   * Record the key and scope as span attributes (`idempotency.key`, `idempotency.scope`) when
   * `@opentelemetry/api` is installed. Default `false`: keys and scopes can be sensitive.
   */
  readonly traceKeys?: boolean
}

/** The parts of `@opentelemetry/api` the library uses, so that the package does not depend on it. */
interface SpanLike {
  setAttribute(key: string, value: string | number | boolean): unknown
  setStatus(status: { code: number; message?: string }): unknown
  recordException(exception: Error | string): unknown
  end(): void
}
interface TracerLike {
  startActiveSpan<F extends (span: SpanLike) => unknown>(
    name: string,
    options: { attributes?: Record<string, string | number | boolean> },
    fn: F,
  ): ReturnType<F>
}
interface TracerProviderLike {
  /** The API's proxy provider: the registered SDK's tracer, `undefined` while none is registered. */
  getDelegateTracer?(name: string): TracerLike | undefined
}
interface TraceApi {
  readonly trace: { getTracer(name: string): TracerLike; getTracerProvider(): TracerProviderLike }
}

const SPAN_ERROR = 2
const TRACER_NAME = 'kysely-idempotency'
// Named through a variable, so that a bundler leaves the optional peer to be found at run time.
const OPENTELEMETRY = '@opentelemetry/api'
/** `@opentelemetry/api`'s trace API once looked up: `undefined` when it is not installed, `null` before the first call. */
let traceApi: TraceApi['trace'] | undefined | null = null
let loading: Promise<void> | undefined

function loadTraceApi(): Promise<void> {
  loading ??= import(OPENTELEMETRY).then(
    (api: TraceApi) => {
      traceApi = api.trace
    },
    () => {
      traceApi = undefined
    },
  )
  return loading
}

/**
 * The tracer of the SDK registered now, if any. Without one the API's tracer only makes no-op
 * spans, which still cost a context switch per call, so the call runs without a span; an SDK
 * registered later is found by the next call.
 */
function activeTracer(trace: TraceApi['trace']): TracerLike | undefined {
  const provider = trace.getTracerProvider()
  return typeof provider.getDelegateTracer === 'function' ? provider.getDelegateTracer(TRACER_NAME) : trace.getTracer(TRACER_NAME)
}

/** What a span and an event are told about one call. */
export interface Described {
  readonly scope?: string
  readonly key?: string
  readonly flowName?: string
  /** Attributes of the span only (e.g. the phase name). */
  readonly attributes?: Readonly<Record<string, string | number | boolean>>
}

/** Reports an instance's outcomes to its hook and its spans to OpenTelemetry. */
export class Observer {
  readonly #onEvent: ObserveOptions['onEvent']
  readonly #traceKeys: boolean

  constructor(options: ObserveOptions = {}) {
    this.#onEvent = options.onEvent
    this.#traceKeys = options.traceKeys === true
  }

  /** Sends `event` to the hook; a hook that throws or rejects is ignored. */
  emit(event: IdempotencyEvent): void {
    const hook = this.#onEvent
    if (!hook) return
    try {
      const result = hook(event)
      if (result && typeof (result as Promise<void>).catch === 'function') (result as Promise<void>).catch(() => undefined)
    } catch {
      // The hook's failure is the hook's business, never the request's.
    }
  }

  /**
   * Runs `work` in a span named `name` (when OpenTelemetry is installed) and reports its
   * outcome, as `outcome` reads it from the value or the error, to the span and, with
   * `operation`, to the hook; an outcome of `undefined` is nothing to report (a skipped flow).
   */
  async observe<T>(
    name: string,
    operation: IdempotencyOperation | undefined,
    described: Described,
    work: () => Promise<T>,
    outcome: (result: { value: T } | { error: unknown }) => Ending | undefined,
  ): Promise<T> {
    const started = performance.now()
    if (traceApi === null) await loadTraceApi()
    const tracer = traceApi ? activeTracer(traceApi) : undefined
    const report = (span: SpanLike | undefined, result: { value: T } | { error: unknown }) => {
      const ending = outcome(result)
      if (!ending) {
        span?.setAttribute('idempotency.outcome', 'skipped')
        return
      }
      if (span) toSpan(span, ending)
      if (operation) {
        this.emit({
          ...ending,
          operation,
          ...(described.scope !== undefined ? { scope: described.scope } : {}),
          ...(described.key !== undefined ? { key: described.key } : {}),
          durationMs: performance.now() - started,
          ...(described.flowName ? { flowName: described.flowName } : {}),
        })
      }
    }
    const run = async (span: SpanLike | undefined) => {
      try {
        const value = await work()
        report(span, { value })
        return value
      } catch (error) {
        report(span, { error })
        throw error
      } finally {
        span?.end()
      }
    }
    if (!tracer) return run(undefined)
    return tracer.startActiveSpan(name, { attributes: this.#attributes(described) }, run)
  }

  #attributes(described: Described): Record<string, string | number | boolean> {
    return {
      ...(this.#traceKeys && described.key !== undefined ? { 'idempotency.key': described.key } : {}),
      ...(this.#traceKeys && described.scope !== undefined ? { 'idempotency.scope': described.scope } : {}),
      ...(described.flowName ? { 'idempotency.flow': described.flowName } : {}),
      ...described.attributes,
    }
  }
}

/** The one mapping of an outcome to its span: attributes by type, and an error status for a failure. */
function toSpan(span: SpanLike, ending: Ending): void {
  span.setAttribute('idempotency.outcome', ending.type)
  switch (ending.type) {
    case 'executed':
    case 'executed_in_transaction':
    case 'replayed':
      span.setAttribute('idempotency.replayed', ending.type === 'replayed')
      if (ending.type === 'executed' && ending.recoveryPoint) span.setAttribute('idempotency.recovery_point', ending.recoveryPoint)
      return
    case 'taken_over':
    case 'recovered':
      span.setAttribute('idempotency.recovery_point', ending.recoveryPoint)
      return
    case 'conflict':
      span.setAttribute('idempotency.conflict_reason', ending.reason)
      return
    case 'pruned':
      span.setAttribute('idempotency.count', ending.count)
      return
    case 'failed':
    case 'lock_lost':
    case 'recovery_failed':
      span.recordException(ending.error instanceof Error ? ending.error : String(ending.error))
      span.setStatus({ code: SPAN_ERROR, message: ending.error instanceof Error ? ending.error.message : String(ending.error) })
      return
    case 'key_reuse':
    case 'key_used':
      return
  }
}

/** The event type of an error an entry point ended with. */
export function failureOf(error: unknown): Ending {
  if (error instanceof IdempotencyConflictError) return { type: 'conflict', reason: error.reason }
  if (error instanceof IdempotencyKeyReuseError) return { type: 'key_reuse' }
  if (error instanceof IdempotencyKeyUsedError) return { type: 'key_used' }
  if (error instanceof IdempotencyLockLostError) return { type: 'lock_lost', error }
  return { type: 'failed', error }
}
