/** Keys as callers give them, checked and fingerprinted before anything touches the database. */
import { InvalidIdempotencyKeyError } from './errors.js'
import { fingerprint } from './fingerprint.js'

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
       * another's response. Up to 255 characters (Unicode code points), no NUL. Default `''`.
       */
      scope?: string
      /**
       * What identifies the request (method, path, body...): any value the codec stores. It is
       * fingerprinted (canonical form, SHA-256); the same key with a different request is
       * refused with `IdempotencyKeyReuseError`. Default `null`.
       */
      request?: unknown
    }

/** A validated key, ready for the database. */
export interface NormalizedKey {
  readonly scope: string
  readonly key: string
  readonly fingerprint: string
  /** The request as given, kept for flows so that they can be re-driven. */
  readonly request: unknown
}

const KEY_PATTERN = /^[\x20-\x7e]{1,255}$/
const MAX_SCOPE_LENGTH = 255
/** The fingerprint of a call that names no request (the common case), hashed once. */
const NO_REQUEST = fingerprint(null)

/** Validates a key input and fingerprints its request. Throws before anything touches the database. */
export function normalizeKey(input: IdempotencyKeyInput): NormalizedKey {
  const { key, scope = '', request = null } = typeof input === 'object' && input !== null ? input : { key: input }
  if (typeof key !== 'string' || !KEY_PATTERN.test(key)) {
    throw new InvalidIdempotencyKeyError(describeBadKey(key))
  }
  // Characters as the database counts them (code points: an emoji is one), not UTF-16 units.
  if (typeof scope !== 'string' || [...scope].length > MAX_SCOPE_LENGTH || scope.includes('\0') || !scope.isWellFormed()) {
    throw new InvalidIdempotencyKeyError(
      `The idempotency scope must be a string of at most ${MAX_SCOPE_LENGTH} characters without NUL or lone surrogates.`,
    )
  }
  return { scope, key, fingerprint: request === null ? NO_REQUEST : fingerprint(request), request }
}

function describeBadKey(key: unknown): string {
  if (key === undefined || key === null) return `The idempotency key is missing (got ${key}); pass the client's key, e.g. the Idempotency-Key header.`
  if (typeof key !== 'string') return `The idempotency key must be a string, got ${typeof key}.`
  if (key.length === 0) return 'The idempotency key is empty; send 1 to 255 printable ASCII characters.'
  if (key.length > 255) return `The idempotency key is ${key.length} characters long; the limit is 255.`
  return 'The idempotency key may only contain printable ASCII characters (0x20 to 0x7E).'
}
