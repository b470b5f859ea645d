/**
 * Flows defined by name: their handles, the finishers registered on them, and the registry the
 * recovery worker finds a flow's function in.
 */
import type { Execution } from '../api.js'
import type { Storable } from '../codec/values.js'
import type { IdempotencyKeyInput } from '../keys.js'
import type { Flow } from '../flow/handle.js'
import type { Reuse } from '../options.js'

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
  readonly reuse?: Reuse
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
  /**
   * The answer to store for `result`, from a run whose answer is kept `ttl` ms; throwing refuses
   * the result, and the attempt fails with nothing stored.
   */
  finish(result: unknown, ttl: number): unknown
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

/** The handle's types, given the flow function's. */
export type FlowFunction<DB, T, R, Result = T> = (flow: Flow<DB, T>, request: R) => Promise<Result & Storable<Result>>

/** The flows defined in one instance, by name. */
export class FlowRegistry {
  readonly #definitions = new Map<string, Definition>()

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

  /** The flow defined under `name`, if any. */
  get(name: string): Definition | undefined {
    return this.#definitions.get(name)
  }
}
