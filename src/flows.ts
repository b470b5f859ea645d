import type { Storable } from './codec.js'
import type { Execution } from './core.js'
import type { Observer, IdempotencyOperation } from './observe.js'
import type { IdempotencyKeyInput } from './request.js'
import type { AbandonedRow } from './statements.js'
import type { Flow } from './phases.js'

/** Options of `idempotency.defineFlow`: defaults of every run of the flow, the recovery worker's included. */
export interface DefineFlowOptions {
  /** How long a finished key stays replayable, in milliseconds. Default: the instance's `ttl`. */
  readonly ttl?: number
  /** How long an attempt owns the key before another may take it over, in milliseconds. Default: the instance's `lockTimeout`. */
  readonly lockTimeout?: number
}

/** What a defined flow's `run` takes: the key, and the request the flow function receives. */
export interface DefinedFlowKey<R> {
  /** The client's key: 1 to 255 characters of printable ASCII. */
  readonly key: string
  /** Whom the key belongs to. Default `''`. */
  readonly scope?: string
  /** What the flow works on; stored with the key, fingerprinted, and handed to the flow function again by the recovery worker. */
  readonly request: R
}

/** Options of one run of a defined flow. */
export interface DefinedRunOptions {
  readonly ttl?: number
  readonly conflictWait?: number
  readonly lockTimeout?: number
}

/**
 * A flow of atomic phases with a name (see `idempotency.defineFlow`): run it like
 * `idempotency.run`, and the recovery worker can finish it after a crash.
 */
export interface DefinedFlow<T, R> {
  readonly name: string
  /** Runs the flow at most once per key, like `idempotency.run`, with `key.request` as its request. */
  run(key: DefinedFlowKey<R>, options?: DefinedRunOptions): Promise<T>
  /** {@link run}, also telling whether the value was replayed. */
  executeRun(key: DefinedFlowKey<R>, options?: DefinedRunOptions): Promise<Execution<T>>
}

/** Options of `idempotency.recover`. */
export interface RecoverOptions {
  /** At most this many flows per pass, those waiting longest first. Default 100; at most 10000. */
  readonly limit?: number
  /** Only flows idle (nothing recorded) for at least this many milliseconds. Default 0. */
  readonly olderThan?: number
  /**
   * After this many failed recoveries of a flow the worker leaves it alone (it stays listed by
   * `abandoned()`, and a client's retry still resumes it). Failures back off: 1 s, 2 s, 4 s… up
   * to 1 hour. Default 5; at most 100.
   */
  readonly maxFailures?: number
}

/** What one pass of the recovery worker did. */
export interface RecoveryReport {
  /** Flows it finished. */
  readonly finished: number
  /** Flows whose attempt failed; each is tried again after a back-off, up to `maxFailures` times. */
  readonly failed: number
  /**
   * Flows it did not touch: their name is not defined in this process, or by the time it got
   * there another attempt held, finished or dropped them.
   */
  readonly skipped: number
}

/** Options of `idempotency.startRecovery`. */
export interface StartRecoveryOptions extends RecoverOptions {
  /** Milliseconds between the end of one pass and the start of the next. Default 30000; from 10 ms to 24 hours. */
  readonly every?: number
}

/** Options of {@link RecoveryWorker.stop}. */
export interface StopOptions {
  /**
   * How long to wait for a running pass, in milliseconds. Default: the instance's
   * `lockTimeout`; from 0 to 24 hours.
   */
  readonly timeout?: number
}

/** A recovery worker running in the background (see `idempotency.startRecovery`). */
export interface RecoveryWorker {
  /**
   * Stops the worker: no pass starts any more. Resolves `true` once a running pass has ended,
   * or `false` when `timeout` ran out first: a flow of that pass hangs (a step that never
   * answers). It is left running, and holds its key only until its lease ends; then a client's
   * retry or another worker takes the flow over, and whatever the hung attempt tries to record
   * afterwards is refused by the fence (`IdempotencyLockLostError`), so it can change nothing.
   */
  stop(options?: StopOptions): Promise<boolean>
}

/**
 * What makes a defined flow's result (returned, or given to `flow.fail`) its stored answer when
 * something other than the caller of `run` serves the flow, with rules of its own (an adapter's
 * route: what may be stored, in which form). Whoever serves the flow registers its finisher on
 * it; each run it serves stores the finisher's id with the flow, and the recovery worker finishes
 * such a flow only in a process where a finisher of that id is registered.
 */
export interface Finisher {
  /** Stored with each flow the finisher serves: keep it the same across deploys. */
  readonly id: string
  /** The answer to store for `result`; throwing refuses the result, and the attempt fails with nothing stored. */
  finish(result: unknown): unknown
}

/** A flow defined in this instance, as the recovery worker and whoever serves it use it. */
export interface Definition {
  readonly name: string
  /** The flow function; its flow handle's database type is the instance's. */
  readonly fn: (flow: never, request: unknown) => Promise<unknown>
  readonly options: DefineFlowOptions
  /** The finishers registered on the flow, by id. */
  readonly finishers: Map<string, Finisher>
}

/** What whoever serves a defined flow with a finisher needs beyond its public handle. */
export interface DefinedInternals {
  readonly definition: Definition
  /**
   * Runs the flow at `key` with `body` in place of the flow function (which wraps it to make
   * its answer), storing `finisher`'s id with the flow, for the recovery worker.
   */
  execute(
    key: IdempotencyKeyInput,
    body: (flow: Flow<never, unknown>) => Promise<unknown>,
    options: DefinedRunOptions,
    finisher: Finisher,
  ): Promise<Execution<unknown>>
}

/** Where a handle keeps its internals, the same symbol in every copy of the package. */
const INTERNALS = Symbol.for('kysely-idempotency.defined-flow')

/** Attaches `internals` to a handle, out of sight of enumeration. */
export function attachInternals<H extends object>(handle: H, internals: DefinedInternals): H {
  Object.defineProperty(handle, INTERNALS, { value: internals })
  return handle
}

/** The internals of a handle from `defineFlow`, or `undefined` for anything else. */
export function internalsOf(handle: unknown): DefinedInternals | undefined {
  return typeof handle === 'object' && handle !== null ? ((handle as { [INTERNALS]?: DefinedInternals })[INTERNALS] ?? undefined) : undefined
}

/** Runs one abandoned flow to its end as the recovery worker: a takeover, fenced like any attempt. */
export type Resume = (row: AbandonedRow, definition: Definition) => Promise<'finished' | 'skipped'>

/** The flows defined in one instance, and the worker that finishes them. */
export class Flows {
  readonly #definitions = new Map<string, Definition>()
  readonly #observer: Observer

  constructor(observer: Observer) {
    this.#observer = observer
  }

  /** Registers `definition` under its name. */
  define(definition: Definition): void {
    if (this.#definitions.has(definition.name)) {
      throw new TypeError(`A flow named "${definition.name}" is already defined in this instance; each name stands for one flow function.`)
    }
    this.#definitions.set(definition.name, definition)
  }

  get names(): readonly string[] {
    return [...this.#definitions.keys()]
  }

  /**
   * One pass: each due flow of a defined name is resumed by `resume`; a failure is counted and
   * backs off through `failed`. What the pass itself cannot do (the database is down) rejects.
   * Once `stopped` says so, the pass takes no further flow.
   */
  async recover(
    rows: readonly AbandonedRow[],
    unknown: number,
    resume: Resume,
    failed: (row: AbandonedRow, failures: number) => Promise<void>,
    stopped: () => boolean,
  ): Promise<RecoveryReport> {
    let finished = 0
    let failures = 0
    let skipped = unknown
    for (const row of rows) {
      if (stopped()) break
      const definition = this.#definitions.get(String(row.flow))
      if (!definition) {
        skipped++
        continue
      }
      try {
        if ((await resume(row, definition)) === 'finished') finished++
        else skipped++
      } catch {
        // resume() reported the error to the event hook; here it only counts, and backs off.
        failures++
        await failed(row, Number(row.failures ?? 0) + 1)
      }
    }
    return { finished, failed: failures, skipped }
  }

  /**
   * Runs `pass` every `every` ms until stopped; a pass that rejects is reported, never thrown.
   * `stop` waits `stopTimeout(options)` ms at most for a running pass, which takes no further
   * flow once stopped, even when the wait ran out.
   */
  start(
    every: number,
    pass: (stopped: () => boolean) => Promise<unknown>,
    operation: IdempotencyOperation,
    stopTimeout: (options: StopOptions | undefined) => number,
  ): RecoveryWorker {
    let stopped = false
    let timer: ReturnType<typeof setTimeout> | undefined
    let running: Promise<void> = Promise.resolve()
    const tick = () => {
      running = (async () => {
        const started = performance.now()
        try {
          await pass(() => stopped)
        } catch (error) {
          this.#observer.emit({ type: 'recovery_failed', operation, durationMs: performance.now() - started, error })
        }
        // The worker never keeps the process alive by itself: the app (a server) does.
        if (!stopped) (timer = setTimeout(tick, every)).unref()
      })()
    }
    tick()
    return {
      async stop(options) {
        const timeout = stopTimeout(options)
        stopped = true
        clearTimeout(timer)
        let waited: ReturnType<typeof setTimeout> | undefined
        const ended = await Promise.race([running.then(() => true), new Promise<boolean>((resolve) => (waited = setTimeout(() => resolve(false), timeout)))])
        clearTimeout(waited)
        return ended
      },
    }
  }
}

/** The handle's types, given the flow function's. */
export type FlowFunction<DB, T, R, Result = T> = (flow: Flow<DB, T>, request: R) => Promise<Result & Storable<Result>>
