import { IdempotencyConflictError, type IdempotencyError, type IdempotencyErrorCode } from '../src/errors.js'

/** An RFC 9457 problem document. */
export interface ProblemDocument {
  /** `urn:kysely-idempotency:<code>`. */
  readonly type: string
  /**
   * The same kind, as a stable kebab-case name a client can switch on: the names of the IETF
   * draft's profile where it has one (`missing-key`, `invalid-key`, `fingerprint-mismatch`,
   * `conflict`), else this library's own (`lock-lost`, `response-too-large`, …).
   */
  readonly code: string
  readonly title: string
  readonly status: number
  /** What happened, for the client; absent on a 5xx, whose message is for the server's log only. */
  readonly detail?: string
}

/** An error as an HTTP answer: status, headers (`Content-Type`, `Retry-After`) and problem body. */
export interface ProblemDetails {
  readonly status: number
  readonly headers: Readonly<Record<string, string>>
  readonly body: ProblemDocument
}

const TITLES: Record<IdempotencyErrorCode, string> = {
  invalid_key: 'Invalid idempotency key',
  key_reuse: 'Idempotency key reused',
  key_used: 'Idempotency key already used',
  conflict: 'Request with this idempotency key in progress',
  lock_lost: 'Request taken over by a retry',
  unserializable: 'Response cannot be stored',
  setup: 'Idempotency misconfigured on the server',
  invalid_flow: 'Request flow cannot be resumed',
  migration_failed: 'Idempotency table migration failed',
}

/**
 * How to answer an error of this library over HTTP, for routes that do not use an adapter:
 * its status, an `application/problem+json` body (RFC 9457) and, for a 409, `Retry-After`.
 * A 5xx body names only the kind of failure; the message stays on the server.
 *
 * ### Examples
 *
 * ```ts
 * import { IdempotencyError, problemDetails } from 'kysely-idempotency'
 * import { createOrder, idempotency } from './app'
 *
 * export async function POST(request: Request): Promise<Response> {
 *   const body = (await request.json()) as { item: string }
 *   try {
 *     const key = request.headers.get('Idempotency-Key') ?? ''
 *     return Response.json(await idempotency.transaction({ key, request: body }, (trx) => createOrder(trx, body)), { status: 201 })
 *   } catch (error) {
 *     if (!(error instanceof IdempotencyError)) throw error
 *     const problem = problemDetails(error)
 *     return Response.json(problem.body, { status: problem.status, headers: problem.headers })
 *   }
 * }
 * ```
 */
export function problemDetails(error: IdempotencyError): ProblemDetails {
  const retryAfter = error instanceof IdempotencyConflictError ? error.retryAfter : error.code === 'lock_lost' ? 1 : undefined
  return problem(error.status, error.code, TITLES[error.code], error.status < 500 ? error.message : undefined, retryAfter)
}

/** The IETF draft profile's names for the kinds it has; every other code is only made kebab-case. */
const PROFILE_CODES: Readonly<Record<string, string>> = { key_reuse: 'fingerprint-mismatch' }

/** A problem answer for `code`, which may also be one of an HTTP layer's own (e.g. `missing_key`). */
export function problem(status: number, code: string, title: string, detail?: string, retryAfter?: number): ProblemDetails {
  const headers: Record<string, string> = { 'Content-Type': 'application/problem+json' }
  if (retryAfter !== undefined) headers['Retry-After'] = String(retryAfter)
  const body: ProblemDocument = {
    type: `urn:kysely-idempotency:${code}`,
    code: PROFILE_CODES[code] ?? code.replaceAll('_', '-'),
    title,
    status,
    ...(detail === undefined ? {} : { detail }),
  }
  return { status, headers, body }
}
