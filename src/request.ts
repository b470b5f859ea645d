import { createHash } from 'node:crypto'
import { IdempotencySerializationError, InvalidIdempotencyKeyError } from './errors.js'

/** A JSON value: what a request descriptor and a stored response may contain. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue }

/**
 * Identifies one idempotent request: the client's key, whom it belongs to, and what was asked.
 *
 * A plain string is shorthand for `{ key }` with the default scope `''` and no request.
 */
export type IdempotencyKeyInput =
  | string
  | {
      /** The client's key: 1 to 255 characters of printable ASCII (0x20 to 0x7E). */
      key: string
      /**
       * Whom the key belongs to (user, account or API-key id), so one tenant can never replay
       * another's response. Up to 255 characters, no NUL. Default `''`.
       */
      scope?: string
      /**
       * Any JSON value that identifies the request (method, path, body...). It is fingerprinted
       * with canonical JSON and SHA-256; the same key with a different request is refused with
       * `IdempotencyKeyReuseError`. Default `null`.
       */
      request?: unknown
    }

/** A validated key, ready for the database. */
export interface NormalizedKey {
  readonly scope: string
  readonly key: string
  readonly fingerprint: string
  /** The canonical JSON text of the request. */
  readonly request: string
}

const KEY_PATTERN = /^[\x20-\x7e]{1,255}$/
const MAX_SCOPE_LENGTH = 255

/** Validates a key input and fingerprints its request. Throws before anything touches the database. */
export function normalizeKey(input: IdempotencyKeyInput): NormalizedKey {
  const { key, scope = '', request = null } = typeof input === 'string' ? { key: input } : input
  if (typeof key !== 'string' || !KEY_PATTERN.test(key)) {
    throw new InvalidIdempotencyKeyError(describeBadKey(key))
  }
  if (typeof scope !== 'string' || scope.length > MAX_SCOPE_LENGTH || scope.includes('\0') || !scope.isWellFormed()) {
    throw new InvalidIdempotencyKeyError(
      `The idempotency scope must be a string of at most ${MAX_SCOPE_LENGTH} characters without NUL or lone surrogates.`,
    )
  }
  const canonical = canonicalJson(request)
  return { scope, key, fingerprint: sha256(canonical), request: canonical }
}

function describeBadKey(key: unknown): string {
  if (typeof key !== 'string') return `The idempotency key must be a string, got ${typeof key}.`
  if (key.length === 0) return 'The idempotency key is empty; send 1 to 255 printable ASCII characters.'
  if (key.length > 255) return `The idempotency key is ${key.length} characters long; the limit is 255.`
  return 'The idempotency key may only contain printable ASCII characters (0x20 to 0x7E).'
}

/**
 * The SHA-256 (hex) of the canonical JSON of `request`: object keys sorted by UTF-16 code
 * units, no whitespace, numbers as JavaScript prints them. Equal JSON values always give the
 * same fingerprint, whatever the order their keys were written in.
 *
 * ### Examples
 *
 * ```ts
 * fingerprint({ b: 1, a: [true, null] }) === fingerprint({ a: [true, null], b: 1 }) // true
 * ```
 */
export function fingerprint(request: unknown): string {
  return sha256(canonicalJson(request))
}

function sha256(text: string): string {
  return createHash('sha256').update(text).digest('hex')
}

/** Canonical JSON text of a value, with the same strictness as stored results. */
export function canonicalJson(value: unknown): string {
  return toJson(value, (_key, v: unknown) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return v
    const sorted: Record<string, unknown> = {}
    for (const k of Object.keys(v).sort()) sorted[k] = (v as Record<string, unknown>)[k]
    return sorted
  })
}

/**
 * JSON text of a result, refusing what JSON would silently change or cannot hold, so that a
 * replay returns what the first execution returned. `undefined` at the top level is stored as
 * `null`; `toJSON` (e.g. on `Date`) is honoured.
 */
export function serializeResult(value: unknown): string {
  return toJson(value, (_key, v: unknown) => v)
}

function toJson(value: unknown, transform: (key: string, value: unknown) => unknown): string {
  let text: string | undefined
  try {
    text = JSON.stringify(value, function (key, v: unknown) {
      switch (typeof v) {
        case 'bigint':
        case 'function':
        case 'symbol':
          throw new IdempotencySerializationError(`${where(key)} is a ${typeof v}, which JSON cannot represent.`)
        case 'number':
          if (!Number.isFinite(v)) throw new IdempotencySerializationError(`${where(key)} is ${v}, which JSON cannot represent.`)
      }
      return transform(key, v)
    })
  } catch (err) {
    if (err instanceof IdempotencySerializationError) throw err
    throw new IdempotencySerializationError(`The value cannot be stored as JSON: ${(err as Error).message}`, { cause: err })
  }
  return text ?? 'null'
}

function where(key: string): string {
  return key === '' ? 'The value' : `The property "${key}"`
}
