/**
 * Base class of every error this library throws on purpose.
 *
 * `code` is stable and safe to branch on; `status` is the status code a server should
 * answer with. Errors from the database or from your own function are never wrapped
 * into this class unless the library can say something more useful about them; the
 * original error is then kept as `cause`.
 *
 * ### Examples
 *
 * ```ts
 * import { IdempotencyError } from 'kysely-idempotency'
 * import { app, createOrder, idempotency, key } from './app'
 *
 * app.post('/orders', async (req, res, next) => {
 *   try {
 *     res.status(201).json(await idempotency.transaction({ key, scope: req.user.id, request: req.body }, (trx) => createOrder(trx, req.body)))
 *   } catch (err) {
 *     if (err instanceof IdempotencyError) res.status(err.status).json({ error: err.code })
 *     else next(err)
 *   }
 * })
 * ```
 */
export class IdempotencyError extends Error {
  readonly code: IdempotencyErrorCode
  readonly status: number

  constructor(code: IdempotencyErrorCode, status: number, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
    this.status = status
    this.name = className(new.target)
    const classes: string[] = []
    for (let c: unknown = new.target; c !== Error && typeof c === 'function'; c = Object.getPrototypeOf(c)) classes.push(className(c))
    Object.defineProperty(this, BRAND, { value: classes })
  }

  /**
   * The CommonJS and the ES module builds of this package are two copies of each class; an
   * error thrown by one is still an instance, for `instanceof`, of the other's same class.
   */
  // `this` is the class `instanceof` asks about (a subclass too), not this base class.
  static override [Symbol.hasInstance](value: unknown): boolean {
    // biome-ignore lint/complexity/noThisInStatic: see above.
    if (Function.prototype[Symbol.hasInstance].call(this, value)) return true
    const classes = (value as { [BRAND]?: unknown } | null | undefined)?.[BRAND]
    // biome-ignore lint/complexity/noThisInStatic: see above.
    return typeof value === 'object' && Array.isArray(classes) && classes.includes(className(this))
  }
}

/** Marks an error of this library with the names of its classes, whichever copy threw it. */
const BRAND = Symbol.for('kysely-idempotency.error')

/**
 * The library's classes under names written out, as a minifier cannot rename them; a class of
 * the caller's that extends one goes by its own name.
 */
const CLASS_NAMES = new Map<unknown, string>()

function className(c: unknown): string {
  return CLASS_NAMES.get(c) ?? (c as { name: string }).name
}

/** `code` of each {@link IdempotencyError}, one per class. */
export type IdempotencyErrorCode =
  | 'invalid_key'
  | 'conflict'
  | 'key_reuse'
  | 'key_used'
  | 'lock_lost'
  | 'unserializable'
  | 'setup'
  | 'invalid_flow'
  | 'migration_failed'

/** The idempotency key or scope is malformed (status 400). Nothing was run or stored. */
export class InvalidIdempotencyKeyError extends IdempotencyError {
  declare readonly code: 'invalid_key'
  constructor(message: string) {
    super('invalid_key', 400, message)
  }
}

/** Why an {@link IdempotencyConflictError} was raised. */
export type ConflictReason =
  /** Another attempt with the same key is still running and did not finish within `conflictWait`. */
  | 'in_flight'
  /**
   * A concurrent attempt with the same key committed while this transaction was running, and
   * the database refused to continue (serialization failure, deadlock, SQLITE_BUSY). The
   * transaction is lost; a retry gets the stored response.
   */
  | 'race'
  /** The key belongs to an unfinished atomic-phases flow; resume it with `run` and the same key. */
  | 'unfinished_flow'
  /**
   * The key is claimed by an enclosing call in the same transaction: a call with the same key is
   * nested inside its own function. Give the inner call a key of its own.
   */
  | 'nested'
  /**
   * A transaction committed the key's claim without a response (it was committed after
   * `withIdempotency` or its function threw, instead of rolled back). The key cannot be used
   * until it expires; `retryAfter` says when.
   */
  | 'stranded'

/**
 * Another attempt holds the same key (status 409). Retry later; nothing of this attempt was
 * stored. When it is thrown inside your own transaction, roll that transaction back.
 */
export class IdempotencyConflictError extends IdempotencyError {
  declare readonly code: 'conflict'
  readonly reason: ConflictReason
  /** Seconds after which a retry is likely to succeed (for a `Retry-After` header). */
  readonly retryAfter: number

  constructor(reason: ConflictReason, message: string, options: { retryAfter: number; cause?: unknown }) {
    super('conflict', 409, message, { cause: options.cause })
    this.reason = reason
    this.retryAfter = options.retryAfter
  }
}

/** The key was already used with a different request (status 422). Nothing was run. */
export class IdempotencyKeyReuseError extends IdempotencyError {
  declare readonly code: 'key_reuse'
  constructor(message: string) {
    super('key_reuse', 422, message)
  }
}

/**
 * The key already answered this same request, and the call was made with `reuse: 'reject'`
 * (status 409): nothing ran and the stored answer was not returned. The key stays as it was.
 */
export class IdempotencyKeyUsedError extends IdempotencyError {
  declare readonly code: 'key_used'
  constructor(message: string) {
    super('key_used', 409, message)
  }
}

/**
 * Atomic phases: this attempt's lock expired and another attempt took the key over (status
 * 409). The phase that noticed rolled back; the attempt stops, and the one that took over goes on.
 */
export class IdempotencyLockLostError extends IdempotencyError {
  declare readonly code: 'lock_lost'
  constructor(message: string) {
    super('lock_lost', 409, message)
  }
}

/**
 * A result or request that JSON cannot represent faithfully (BigInt, function, symbol,
 * cycle, NaN or Infinity) was given to the library (status 500: a bug in the calling code).
 * When it is a result, the transaction is rolled back and nothing is stored.
 */
export class IdempotencySerializationError extends IdempotencyError {
  declare readonly code: 'unserializable'
  constructor(message: string, options?: { cause?: unknown }) {
    super('unserializable', 500, message, options)
  }
}

/**
 * The library cannot work with the database as configured (status 500): the table is missing,
 * the table name is not a plain identifier, or the Kysely dialect is not supported.
 */
export class IdempotencySetupError extends IdempotencyError {
  declare readonly code: 'setup'
  constructor(message: string, options?: { cause?: unknown }) {
    super('setup', 500, message, options)
  }
}

/**
 * An atomic-phases flow was called in a way that cannot be resumed safely (status 500: a bug or
 * a deploy that changed the flow): an invalid or repeated phase name, phases called in a
 * different order than the recorded ones, phases called concurrently, or used after the flow
 * ended. The lock is released and the recorded phases are kept.
 */
export class IdempotencyFlowError extends IdempotencyError {
  declare readonly code: 'invalid_flow'
  constructor(message: string) {
    super('invalid_flow', 500, message)
  }
}

/**
 * Migrating the idempotency table failed (status 500): the database refused a statement, or the
 * table found in place is not one this library made. `cause` holds the database's error.
 */
export class IdempotencyMigrationError extends IdempotencyError {
  declare readonly code: 'migration_failed'

  constructor(message: string, options?: { cause?: unknown }) {
    super('migration_failed', 500, message, options)
  }
}

for (const [c, name] of [
  [IdempotencyError, 'IdempotencyError'],
  [InvalidIdempotencyKeyError, 'InvalidIdempotencyKeyError'],
  [IdempotencyConflictError, 'IdempotencyConflictError'],
  [IdempotencyKeyReuseError, 'IdempotencyKeyReuseError'],
  [IdempotencyKeyUsedError, 'IdempotencyKeyUsedError'],
  [IdempotencyLockLostError, 'IdempotencyLockLostError'],
  [IdempotencySerializationError, 'IdempotencySerializationError'],
  [IdempotencySetupError, 'IdempotencySetupError'],
  [IdempotencyFlowError, 'IdempotencyFlowError'],
  [IdempotencyMigrationError, 'IdempotencyMigrationError'],
] as const) {
  CLASS_NAMES.set(c, name)
}
