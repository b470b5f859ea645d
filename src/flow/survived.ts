/**
 * Failures a flow went on from (SPEC §4.3.6): what is recorded of a thrown value, and the value
 * a resume throws in its place, so that the flow's own `catch` takes the same path again.
 */
import type { ValueStore } from '../codec/store.js'
import {
  IdempotencyConflictError,
  IdempotencyError,
  IdempotencyFlowError,
  IdempotencyKeyReuseError,
  IdempotencyKeyUsedError,
  IdempotencyLockLostError,
  IdempotencyMigrationError,
  IdempotencySerializationError,
  IdempotencySetupError,
  InvalidIdempotencyKeyError,
} from '../errors.js'

/** An error class the caller throws in flows, to be rebuilt as itself on resume (`errorClasses`). */
export type ErrorClass = abstract new (...args: never[]) => Error

/**
 * What a phase or step threw, as it is recorded: an error's class, name, message, own fields
 * and cause, or a thrown value that is not an error, as the codec keeps it.
 */
export type RecordedFailure = { readonly error: RecordedError } | { readonly thrown: unknown }

interface RecordedError {
  /** The name of its class (its constructor), which a resume rebuilds it as when it can. */
  readonly class: string
  /** Its `name`, when the class does not give it. */
  readonly name?: string
  readonly message: string
  /** Its own enumerable fields the codec keeps (`code`, `status`, …), each within {@link MAX_FIELD}. */
  readonly fields?: Readonly<Record<string, unknown>>
  readonly cause?: RecordedFailure
}

/** Stored text per field, and per thrown value that is not an error: what a failure may add to the flow's state. */
const MAX_FIELD = 4096
/** How many causes deep a failure is recorded. */
const MAX_CAUSES = 4

/** Error classes every runtime has, and the library's own. */
const KNOWN: readonly ErrorClass[] = [
  Error,
  TypeError,
  RangeError,
  SyntaxError,
  ReferenceError,
  EvalError,
  URIError,
  AggregateError,
  IdempotencyError,
  InvalidIdempotencyKeyError,
  IdempotencyConflictError,
  IdempotencyKeyReuseError,
  IdempotencyKeyUsedError,
  IdempotencyLockLostError,
  IdempotencySerializationError,
  IdempotencySetupError,
  IdempotencyFlowError,
  IdempotencyMigrationError,
]

/** How one instance records failures, and the classes it rebuilds them as. */
export class SurvivedFailures {
  readonly #values: ValueStore
  readonly #classes: ReadonlyMap<string, ErrorClass>

  /** `classes` are the caller's own error classes, rebuilt as themselves besides the built-in and library ones. */
  constructor(values: ValueStore, classes: readonly ErrorClass[] = []) {
    this.#values = values
    const byName = new Map<string, ErrorClass>()
    for (const c of [...KNOWN, ...classes]) {
      if (typeof c !== 'function' || !(c.prototype instanceof Error || c === Error)) {
        throw new TypeError(`The errorClasses option takes classes that extend Error, got ${describe(c)}.`)
      }
      byName.set(c.name, c)
    }
    this.#classes = byName
  }

  /** What is recorded of `thrown`: never throws, whatever was thrown. */
  record(thrown: unknown, depth = 0): RecordedFailure {
    if (!(thrown instanceof Error)) {
      if (this.#keeps(thrown)) return { thrown }
      return { error: { class: 'Error', message: describe(thrown) } }
    }
    const own = className(thrown)
    const name = safely(() => String(thrown.name), 'Error')
    const fields: Record<string, unknown> = {}
    for (const field of safely(() => Object.keys(thrown), [])) {
      if (field === 'name' || field === 'message' || field === 'stack' || field === 'cause') continue
      const value = safely(() => (thrown as unknown as Record<string, unknown>)[field], undefined)
      if (this.#keeps(value)) fields[field] = value
    }
    const cause = safely(() => thrown.cause, undefined)
    return {
      error: {
        class: own,
        ...(name !== own ? { name } : {}),
        message: safely(() => String(thrown.message), ''),
        ...(Object.keys(fields).length ? { fields } : {}),
        ...(cause !== undefined && depth < MAX_CAUSES ? { cause: this.record(cause, depth + 1) } : {}),
      },
    }
  }

  /**
   * The value to throw again: the same value, or an error of its class (a built-in, the
   * library's, or one in `errorClasses`; else an `Error`) with its name, message, fields and cause.
   */
  replay(failure: RecordedFailure): unknown {
    // A codec that drops `undefined` members may leave `{}` of `{ thrown: undefined }`.
    if (!('error' in failure)) return failure.thrown
    const recorded = failure.error
    const known = this.#classes.get(recorded.class)
    // Built without its constructor, whose parameters are the class's own business.
    const error: Error = known ? Object.create(known.prototype as object) : new Error()
    Object.defineProperty(error, 'message', { value: recorded.message, writable: true, configurable: true })
    const name = recorded.name ?? recorded.class
    if (error.name !== name) Object.defineProperty(error, 'name', { value: name, writable: true, configurable: true })
    Object.defineProperty(error, 'stack', {
      value: `${error.name}: ${recorded.message}\n    (recorded by an earlier attempt)`,
      writable: true,
      configurable: true,
    })
    Object.assign(error, recorded.fields)
    if (recorded.cause) Object.defineProperty(error, 'cause', { value: this.replay(recorded.cause), writable: true, configurable: true })
    return error
  }

  /** Whether the codec keeps `value` within {@link MAX_FIELD}. */
  #keeps(value: unknown): boolean {
    try {
      return this.#values.encode(value).text.length <= MAX_FIELD
    } catch {
      return false
    }
  }
}

/** The name of `error`'s class, as its constructor has it. */
function className(error: Error): string {
  const name = safely(() => (Object.getPrototypeOf(error) as { constructor?: { name?: unknown } } | null)?.constructor?.name, undefined)
  return typeof name === 'string' && name !== '' ? name : 'Error'
}

/** Text for any value, even one whose conversion throws. */
function describe(value: unknown): string {
  return safely(() => String(value), Object.prototype.toString.call(value))
}

/** What `read` gives, or `fallback` if it throws (a getter, a proxy, a `toString` of the caller's). */
function safely<T, F>(read: () => T, fallback: F): T | F {
  try {
    return read()
  } catch {
    return fallback
  }
}
