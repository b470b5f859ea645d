import { randomUUID } from 'node:crypto'
import type { Transaction } from 'kysely'
import {
  IdempotencyConflictError,
  IdempotencyKeyReuseError,
  IdempotencyLockLostError,
  InvalidIdempotencyKeyError,
  type IdempotencyError,
} from '../src/errors.js'
import type { Idempotency, RunOptions, TransactionOptions } from '../src/idempotency.js'
import type { Execution } from '../src/core.js'
import type { Flow } from '../src/phases.js'
import { serializeResult, type JsonValue } from '../src/request.js'

/** The parts of a request the helpers read; Express 4 and 5 requests have them. */
export interface IdempotentRequest {
  readonly method: string
  /** Path and query string as the client sent them. */
  readonly originalUrl: string
  /** What a body parser (`express.json()`, `urlencoded()`, `raw()`, `text()`) left, if any. */
  readonly body?: unknown
  get(name: string): string | undefined
}

/** The parts of a response the helpers write; Express 4 and 5 responses have them. */
export interface IdempotentResponse {
  status(code: number): unknown
  setHeader(name: string, value: string | number | readonly string[]): unknown
  json(body: unknown): unknown
  send(body: unknown): unknown
  end(): unknown
}

export type NextFunction = (error?: unknown) => void

/** A route's answer: stored with the key in the same transaction, then sent. */
export interface HttpResult {
  readonly status: number
  /**
   * Sent as JSON, and stored as JSON (a BigInt, function or cycle is an error before commit);
   * a string is sent as it is when `headers` set a `Content-Type`.
   */
  readonly body?: unknown
  readonly headers?: Readonly<Record<string, string | readonly string[]>>
}

/**
 * Passed as `scope` to say that keys are global to the route. Any client that guesses or
 * reuses another client's key then receives that client's stored response: use it only
 * when there is a single client or keys are unguessable and never shared.
 */
export const UNSCOPED: unique symbol = Symbol('kysely-idempotency/unscoped')

/** Options of {@link idempotent} and {@link idempotentFlow}. */
export interface IdempotentOptions<Req extends IdempotentRequest> {
  /**
   * Whom the key belongs to, e.g. `(req) => req.user.id`, so that one client can never replay
   * another's response; or {@link UNSCOPED}. Required.
   */
  readonly scope: ((req: Req) => string | Promise<string>) | typeof UNSCOPED
  /** Answer 400 when the request has no key. Default `false`: the handler then runs without one. */
  readonly required?: boolean
  /** Methods that are made idempotent; others run the handler as it is. Default `['POST', 'PATCH']`. */
  readonly methods?: readonly string[]
  /** Name of the request header. Default `Idempotency-Key`. */
  readonly header?: string
  /** Request headers that are part of the fingerprint, besides method, URL and body. Default none. */
  readonly fingerprintHeaders?: readonly string[]
  /** Top-level body fields left out of the fingerprint (e.g. a client timestamp). Default none. */
  readonly ignoreBodyFields?: readonly string[]
  /**
   * Largest stored response (JSON of status, headers and body) in bytes. A larger one is not
   * stored: the request fails with 500 and its writes roll back. Default 1 MiB.
   */
  readonly maxStoredBytes?: number
  /** Store `Set-Cookie` headers too, so replays send them again. Default `false`. */
  readonly persistSetCookie?: boolean
}

const DEFAULT_METHODS = ['POST', 'PATCH']
const MIB = 1024 * 1024

/**
 * An Express handler that runs `handler` at most once per `Idempotency-Key` inside a
 * transaction, stores its answer in that transaction, and replays it to retries with the
 * header `Idempotency-Replayed: true`. Conflicts, key reuse and bad keys are answered as
 * `application/problem+json` (409 with `Retry-After`, 422, 400). A thrown error goes to
 * `next(err)` and nothing is stored; a returned 5xx is sent, not stored, and its writes roll back.
 *
 * ### Examples
 *
 * ```ts
 * import { idempotent } from 'kysely-idempotency/express'
 *
 * app.post('/charges', express.json(),
 *   idempotent(idempotency, { scope: (req) => req.user.id, required: true }, async (req, trx) => {
 *     const charge = await trx.insertInto('charges').values(req.body).returningAll().executeTakeFirstOrThrow()
 *     return { status: 201, body: charge, headers: { Location: `/charges/${charge.id}` } }
 *   }))
 * ```
 */
export function idempotent<DB, Req extends IdempotentRequest = IdempotentRequest>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Req> & TransactionOptions,
  handler: (req: Req, trx: Transaction<DB>) => Promise<HttpResult>,
): (req: Req, res: IdempotentResponse, next: NextFunction) => void {
  const { ttl, conflictWait, isolationLevel } = options
  const settings = { ttl, conflictWait, isolationLevel }
  const route = configure(options)
  return route.handle(
    (req) => idempotency.db.transaction().execute(async (trx) => route.sendable(await handler(req, trx))),
    (req, key) => route.once((fn) => idempotency.executeTransaction(key, fn, settings), (trx: Transaction<DB>) => handler(req, trx)),
  )
}

/**
 * {@link idempotent} for an atomic-phases flow (`idempotency.run`): the handler gets the
 * flow instead of a transaction. A returned 5xx is sent and not stored; the lock is released
 * and the recorded phases are kept, so a retry resumes.
 *
 * ### Examples
 *
 * ```ts
 * app.post('/rides', express.json(), idempotentFlow(idempotency, { scope: (req) => req.user.id }, async (req, flow) => {
 *   const ride = await flow.phase('ride_created', (trx) => createRide(trx, req.body))
 *   const charge = await flow.step('charge_created', () => charge(ride, flow.stepKey('charge_created')))
 *   return { status: 201, body: { ...ride, charge: charge.id } }
 * }))
 * ```
 */
export function idempotentFlow<DB, Req extends IdempotentRequest = IdempotentRequest>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Req> & RunOptions,
  handler: (req: Req, flow: Flow<DB, HttpResult>) => Promise<HttpResult>,
): (req: Req, res: IdempotentResponse, next: NextFunction) => void {
  const { ttl, conflictWait, lockTimeout } = options
  const settings = { ttl, conflictWait, lockTimeout }
  const route = configure(options)
  return route.handle(
    async (req) => route.sendable(await handler(req, directFlow(idempotency))),
    (req, key) => route.once((fn) => idempotency.executeRun(key, fn, settings), (flow: Flow<DB, HttpResult>) => handler(req, flow)),
  )
}

/**
 * Reads the key from a header value: bare (`abc`) or a Structured-Field string (`"abc"`, with
 * `\"` and `\\` escapes), which denote the same key.
 */
export function parseKeyHeader(value: string): string {
  const text = value.trim()
  if (!text.startsWith('"')) return text
  if (!/^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"$/.test(text)) {
    throw new InvalidIdempotencyKeyError('The idempotency key header is neither a bare key nor a valid Structured-Field string ("...").')
  }
  return text.slice(1, -1).replace(/\\(["\\])/g, '$1')
}

/** The answer of an attempt that must not be stored (a 5xx): thrown to roll back, then sent. */
class Unstored extends Error {
  constructor(readonly result: HttpResult) {
    super(`The handler answered ${result.status}; the answer is sent but not stored.`)
  }
}

type KeyInput = { key: string; scope: string; request: JsonValue }

function configure<Req extends IdempotentRequest>(options: IdempotentOptions<Req>) {
  const scope = options.scope
  if (scope !== UNSCOPED && typeof scope !== 'function') {
    throw new TypeError('The idempotent route needs a scope: a function of the request, or UNSCOPED (see the README before using it).')
  }
  const methods = new Set((options.methods ?? DEFAULT_METHODS).map((m) => m.toUpperCase()))
  const header = options.header ?? 'Idempotency-Key'
  const fingerprintHeaders = (options.fingerprintHeaders ?? []).map((h) => h.toLowerCase())
  const ignored = new Set(options.ignoreBodyFields ?? [])
  const maxStoredBytes = options.maxStoredBytes ?? MIB
  const persistSetCookie = options.persistSetCookie ?? false

  const describeRequest = (req: Req): JsonValue => ({
    method: req.method.toUpperCase(),
    url: req.originalUrl,
    body: bodyOf(req.body, ignored),
    headers: Object.fromEntries(fingerprintHeaders.map((h) => [h, req.get(h) ?? null])),
  })

  /** Validates a handler's answer; a 5xx is thrown so that its writes roll back, and is then sent. */
  const sendable = (result: HttpResult): HttpResult => {
    if (typeof result !== 'object' || result === null || !Number.isInteger(result.status) || result.status < 100 || result.status > 599) {
      throw new TypeError('An idempotent handler must return { status, body?, headers? } with an HTTP status code.')
    }
    if (result.status >= 500) throw new Unstored(result)
    return result
  }

  /** What is kept for replays: the result without `Set-Cookie` (unless allowed), within the size limit. */
  const stored = (result: HttpResult): HttpResult => {
    const headers = Object.fromEntries(
      Object.entries(result.headers ?? {}).filter(([name]) => persistSetCookie || name.toLowerCase() !== 'set-cookie'),
    )
    const kept = { status: result.status, headers, ...(result.body === undefined ? {} : { body: result.body }) }
    const bytes = Buffer.byteLength(serializeResult(kept))
    if (bytes > maxStoredBytes) {
      throw new ResponseTooLarge(`The response is ${bytes} bytes, more than maxStoredBytes (${maxStoredBytes}); it was not stored and the request's writes were rolled back.`)
    }
    return kept
  }

  return {
    sendable,
    /**
     * Runs `handler` through `execute` (a keyed transaction or flow) and returns what to send:
     * the stored answer on a replay, else the handler's own (its Set-Cookie included).
     */
    async once<C>(
      execute: (fn: (context: C) => Promise<HttpResult>) => Promise<Execution<HttpResult>>,
      handler: (context: C) => Promise<HttpResult>,
    ): Promise<{ result: HttpResult; replayed: boolean }> {
      let sent: HttpResult | undefined
      const execution = await execute(async (context) => {
        sent = sendable(await handler(context))
        return stored(sent)
      })
      return { result: execution.replayed || !sent ? execution.value : sent, replayed: execution.replayed }
    },
    handle(
      direct: (req: Req) => Promise<HttpResult>,
      keyed: (req: Req, key: KeyInput) => Promise<{ result: HttpResult; replayed: boolean }>,
    ): (req: Req, res: IdempotentResponse, next: NextFunction) => void {
      const answer = async (req: Req, res: IdempotentResponse): Promise<void> => {
        const raw = methods.has(req.method.toUpperCase()) ? req.get(header) : undefined
        if (raw === undefined) {
          if (options.required && methods.has(req.method.toUpperCase())) {
            return problem(res, 400, 'missing_key', 'Idempotency key required', `This request needs an ${header} header.`)
          }
          return send(res, await direct(req), false)
        }
        const key = parseKeyHeader(raw)
        const owner = scope === UNSCOPED ? '' : await scope(req)
        const { result, replayed } = await keyed(req, { key, scope: owner, request: describeRequest(req) })
        send(res, result, replayed)
      }
      return (req, res, next) => {
        answer(req, res).catch((error: unknown) => {
          if (error instanceof Unstored) return send(res, error.result, false)
          if (error instanceof ResponseTooLarge) return problem(res, 500, 'response_too_large', 'Response too large to store', error.message)
          const mapped = problemOf(error)
          if (mapped) return problem(res, mapped.status, mapped.code, mapped.title, mapped.error.message, mapped.retryAfter)
          next(error)
        })
      }
    },
  }
}

class ResponseTooLarge extends Error {}

function problemOf(error: unknown): { error: IdempotencyError; status: number; code: string; title: string; retryAfter?: number } | undefined {
  if (error instanceof InvalidIdempotencyKeyError) return { error, status: 400, code: error.code, title: 'Invalid idempotency key' }
  if (error instanceof IdempotencyKeyReuseError) return { error, status: 422, code: error.code, title: 'Idempotency key reused' }
  if (error instanceof IdempotencyConflictError) {
    return { error, status: 409, code: error.code, title: 'Request with this idempotency key in progress', retryAfter: error.retryAfter }
  }
  if (error instanceof IdempotencyLockLostError) return { error, status: 409, code: error.code, title: 'Request taken over by a retry', retryAfter: 1 }
  return undefined
}

/** An RFC 9457 problem document. */
function problem(res: IdempotentResponse, status: number, code: string, title: string, detail: string, retryAfter?: number): void {
  res.status(status)
  res.setHeader('Content-Type', 'application/problem+json')
  if (retryAfter !== undefined) res.setHeader('Retry-After', String(retryAfter))
  res.send(JSON.stringify({ type: `urn:kysely-idempotency:${code}`, title, status, detail }))
}

function send(res: IdempotentResponse, result: HttpResult, replayed: boolean): void {
  res.status(result.status)
  let typed = false
  for (const [name, value] of Object.entries(result.headers ?? {})) {
    res.setHeader(name, value)
    typed ||= name.toLowerCase() === 'content-type'
  }
  if (replayed) res.setHeader('Idempotency-Replayed', 'true')
  if (result.body === undefined) res.end()
  else if (typeof result.body === 'string' && typed) res.send(result.body)
  else res.json(result.body)
}

/** The body as the fingerprint sees it: parsed JSON or form fields, raw bytes as base64, text as is. */
function bodyOf(body: unknown, ignored: ReadonlySet<string>): JsonValue {
  if (body === undefined || body === null) return null
  if (body instanceof Uint8Array) return { base64: Buffer.from(body).toString('base64') }
  if (ignored.size && typeof body === 'object' && !Array.isArray(body)) {
    return Object.fromEntries(Object.entries(body).filter(([field]) => !ignored.has(field))) as JsonValue
  }
  return body as JsonValue
}

/** A flow for a request without a key: phases are plain transactions, steps plain calls. */
function directFlow<DB>(idempotency: Idempotency<DB>): Flow<DB, HttpResult> {
  const id = randomUUID()
  return {
    key: '',
    scope: '',
    attempt: 1,
    resumedFrom: 'started',
    phase: (_name, fn) => idempotency.db.transaction().execute(fn),
    step: (_name, fn) => fn(),
    stepKey: (name) => `${id}.${name}`,
    fail: (response) => {
      throw new Unstored(response)
    },
  }
}
