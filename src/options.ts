/**
 * The options of every call, their defaults and their bounds: an option out of range is a
 * `RangeError` that names the bound.
 */
import type { IsolationLevel, Kysely } from 'kysely'
import type { Codec } from './codec/codec.js'
import type { IdempotencyDialect } from './dialect.js'
import type { ObserveOptions } from './observe.js'
import type { DefineFlowOptions } from './recovery/registry.js'
import type { Settings } from './retries.js'
import type { ErrorClass } from './flow/survived.js'

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
  /**
   * What a call gets when its key already answered the same request: `'replay'` (the default)
   * returns the stored answer without running anything; `'reject'` throws
   * `IdempotencyKeyUsedError` instead, for callers to whom a used key is a fault they must see
   * (an internal call that should never repeat, a consumer that must not take a redelivery
   * silently). Nothing runs either way. A key another attempt holds is waited for, as always,
   * and a key used for another request is `IdempotencyKeyReuseError` whatever this says.
   */
  readonly reuse?: Reuse
}

/** See {@link CallOptions.reuse}. */
export type Reuse = 'replay' | 'reject'

/** Options of `createIdempotency`. */
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
   * How many times `Idempotency.transaction` runs the transaction when it fails with a
   * serialization failure, a deadlock or a race on the key. Default 5; at most 100.
   */
  readonly maxAttempts?: number
  /** The database module to use. Default: chosen from the Kysely instance's adapter. */
  readonly dialect?: IdempotencyDialect
  /**
   * How stored values (results, phase and step values) are written and read back. Default
   * `defaultCodec`; replace it, e.g., to encrypt stored responses (see {@link Codec}).
   */
  readonly codec?: Codec
  /**
   * Error classes of yours that atomic-phases flows catch and go on from, so that a resume
   * rethrows a recorded failure as an instance of its class (`instanceof` holds), as the first
   * attempt saw it. Without it, such a failure comes back as an `Error` with the same name,
   * message and fields. Built-in classes and the library's are always rebuilt.
   */
  readonly errorClasses?: readonly ErrorClass[]
  /**
   * `Idempotency.transaction` (and the HTTP routes) claim the key first, in the transaction, and
   * read it only when it exists, instead of reading it before the transaction opens: a first
   * execution sends one statement less, and a replay opens a short transaction (claim, read,
   * commit) instead of being one read (SPEC §4.2). The faster choice while replays are rare
   * (measured: faster at 1% and 10% of calls, slower at 50%; "Claim first" on the docs'
   * performance page). Default `false`.
   *
   * Every call gets the answer it gets without it; what differs is waiting. A replay takes the
   * claim's locks: on SQLite the write lock (it queues behind writers of other processes for the
   * busy timeout), on MySQL/MariaDB a shared lock on the key's row (it waits up to
   * `conflictWait` for a flow in the middle of a phase), and under `SERIALIZABLE` it can fail as
   * a `race` conflict after `maxAttempts`. A duplicate in this instance with no wait left waits
   * for the first attempt's claim, which may itself wait for a holder in another process.
   */
  readonly claimFirst?: boolean
}

/** Options of `Idempotency.transaction`. */
export interface TransactionOptions extends CallOptions {
  /** Isolation level of the library-owned transaction. Default: the database's. */
  readonly isolationLevel?: IsolationLevel
  /** Claim the key before reading it (see {@link IdempotencyOptions.claimFirst}). Default: the instance's. */
  readonly claimFirst?: boolean
}

/** Options of `Idempotency.run`. */
export interface RunOptions extends CallOptions {
  /**
   * How long this attempt owns the key before another attempt may take it over, in
   * milliseconds; renewed at every recorded phase and step. Default: the instance's
   * `lockTimeout`; at most 24 hours.
   */
  readonly lockTimeout?: number
}

/** Options of `Idempotency.abandoned`. */
export interface AbandonedOptions {
  /** Only flows that recorded nothing for at least this many milliseconds. Default 0. */
  readonly olderThan?: number
  /** At most this many flows, those idle longest first. Default 100; at most 10000. */
  readonly limit?: number
}

/** Options of `Idempotency.prune`. */
export interface PruneOptions {
  /** Rows deleted per statement, so that no statement holds many locks. Default 1000; at most 100000. */
  readonly batchSize?: number
}

/** Options of `Idempotency.migrate`. */
export interface MigrateOptions {
  /** Record as applied what the table already has, without changing it (for tables made from the printed DDL). */
  readonly baseline?: boolean | null
}

/** Options of the free `withIdempotency` function, which uses the default codec. */
export interface WithIdempotencyOptions extends CallOptions {
  /** Name of the idempotency table. Default `idempotency_keys`. */
  readonly tableName?: string
}

export const DEFAULTS = {
  ttl: 24 * 60 * 60 * 1000,
  conflictWait: 5000,
  lockTimeout: 30_000,
  maxAttempts: 5,
  batchSize: 1000,
  abandonedLimit: 100,
  recoveryEvery: 30_000,
  maxFailures: 5,
  reuse: 'replay' as Reuse,
}

/** Checks the options given to `defineFlow` now, so that a bad one throws there rather than at every run. */
export function checkDefineOptions(options: DefineFlowOptions): DefineFlowOptions {
  if (options.ttl !== undefined) bounded('ttl', options.ttl)
  if (options.lockTimeout !== undefined) bounded('lockTimeout', options.lockTimeout)
  return options
}

export function resolveSettings(base: Settings, options: CallOptions & { readonly maxAttempts?: number }): Settings {
  return {
    ttl: bounded('ttl', options.ttl ?? base.ttl),
    conflictWait: bounded('conflictWait', options.conflictWait ?? base.conflictWait),
    maxAttempts: bounded('maxAttempts', options.maxAttempts ?? base.maxAttempts),
    reuse: oneOf('reuse', options.reuse ?? base.reuse, ['replay', 'reject']),
  }
}

function oneOf<const V extends string>(name: string, value: unknown, allowed: readonly V[]): V {
  if (!allowed.includes(value as V)) {
    throw new RangeError(`The option ${name} must be ${allowed.map((v) => `'${v}'`).join(' or ')}, got ${given(value)}.`)
  }
  return value as V
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

export function bounded(name: keyof typeof BOUNDS, value: unknown): number {
  const { min, max, label } = BOUNDS[name]
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`The option ${name} must be an integer from ${min} to ${max}${label ? ` (${label})` : ''}, got ${given(value)}.`)
  }
  return value
}

/** A boolean option, checked: a string or a number is refused rather than taken for true. */
export function flag(name: string, value: unknown): boolean {
  if (typeof value !== 'boolean') throw new RangeError(`The option ${name} must be true or false, got ${given(value)}.`)
  return value
}

/** An option's value as a message shows it; not String(value), which throws for an object without a prototype. */
function given(value: unknown): string {
  if (typeof value === 'string') return `'${value}'`
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean' || value === undefined || value === null)
    return String(value)
  return typeof value
}
