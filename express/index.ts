/**
 * Express 4 and 5: maps Express's request and response onto the shared HTTP behaviour
 * (`http/`); nothing here decides what is stored or answered.
 */
import type { NextFunction as ExpressNext, Request } from 'express'
import type { Transaction } from 'kysely'
import { IdempotencySetupError } from '../src/errors.js'
import type { Idempotency } from '../src/api.js'
import type { RunOptions, TransactionOptions } from '../src/options.js'
import type { Flow } from '../src/flow/handle.js'
import {
  declaresBody,
  IdempotentRoute,
  multerFiles,
  rawHeaderLines,
  type Answer,
  type HttpDefinedFlow,
  type HttpResult,
  type IdempotentOptions,
  type Outcome,
  type RequestFacts,
} from '../http/index.js'

export { parseKeyHeader, UNSCOPED } from '../http/index.js'
export type { HttpDefinedFlow, HttpFlowRequest, HttpResult, IdempotentOptions } from '../http/index.js'

/** The parts of a request the helpers read; Express 4 and 5 requests have them. */
export interface IdempotentRequest {
  readonly method: string
  /** Path and query string as the client sent them. */
  readonly originalUrl: string
  /** What a body parser (`express.json()`, `urlencoded()`, `raw()`, `text()`) left, if any. */
  readonly body?: unknown
  /** Header names and values as received, one pair per line (Node's `IncomingMessage.rawHeaders`). */
  readonly rawHeaders: readonly string[]
  /** Whether the body stream was read to its end (by a body parser). */
  readonly readableEnded: boolean
  /** Uploaded files multer put beside the body's fields (`upload.single()`, `.array()`, `.fields()`, `.any()`). */
  readonly file?: unknown
  readonly files?: unknown
  /** The response (Express sets it), to tell whether the handler already answered by itself. */
  readonly res?: { readonly headersSent: boolean }
  get(name: string): string | undefined
}

/** The parts of a response the helpers write; Express 4 and 5 responses have them. */
export interface IdempotentResponse {
  status(code: number): unknown
  setHeader(name: string, value: string | number | readonly string[]): unknown
  append(name: string, value: string | string[]): unknown
  send(body: unknown): unknown
  end(): unknown
  readonly headersSent: boolean
}

export type NextFunction = ExpressNext

/**
 * An Express handler that runs `handler` at most once per `Idempotency-Key` inside a
 * transaction, stores its answer in that transaction, and replays it to retries with the
 * header `Idempotency-Replayed: true`. Conflicts, key reuse and bad keys are answered as
 * `application/problem+json` (409 with `Retry-After`, 422, 400). A thrown error goes to
 * `next(err)` and nothing is stored; a returned 5xx is sent, not stored, and its writes roll back.
 * `req` is Express's own `Request`, with your augmentations (`req.user`).
 *
 * Mount a body parser before the route (`express.json()` and the like): a request whose body no
 * parser read is refused (500, `IdempotencySetupError`), since its fingerprint could not cover
 * the body. The handler returns its answer and never sends it itself: one that calls
 * `res.json()`/`res.send()` is refused before anything commits, its writes rolled back (the
 * client has what it sent, and the error goes to `next`).
 *
 * ### Examples
 *
 * ```ts
 * import express from 'express'
 * import { idempotent } from 'kysely-idempotency/express'
 * import { app, idempotency } from './app'
 *
 * app.post('/charges', express.json(),
 *   idempotent(idempotency, { scope: (req) => req.user.id, required: true }, async (req, trx) => {
 *     const charge = await trx.insertInto('charges').values(req.body).returningAll().executeTakeFirstOrThrow()
 *     return { status: 201, body: charge, headers: { Location: `/charges/${charge.id}` } }
 *   }))
 * ```
 */
export function idempotent<DB, Req extends IdempotentRequest = Request>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Req> & TransactionOptions,
  handler: (req: Req, trx: Transaction<DB>) => Promise<HttpResult>,
): (req: Req, res: IdempotentResponse, next: (error?: unknown) => void) => void {
  return express(new IdempotentRoute(options).transaction(idempotency, handler))
}

/**
 * {@link idempotent} for an atomic-phases flow (`idempotency.run`): the handler gets the
 * flow instead of a transaction. A returned 5xx is sent and not stored; the lock is released
 * and the recorded phases are kept, so a retry resumes. An answer given with `flow.fail()`
 * follows the same rules as a returned one.
 *
 * ### Examples
 *
 * ```ts
 * import express from 'express'
 * import { idempotentFlow } from 'kysely-idempotency/express'
 * import { app, idempotency, insertRide, payments } from './app'
 *
 * app.post('/rides', express.json(), idempotentFlow(idempotency, { scope: (req) => req.user.id }, async (req, flow) => {
 *   const ride = await flow.phase('ride_created', (trx) => insertRide(trx, req.body))
 *   const charge = await flow.step('charge_created', () => payments.charge(ride, { idempotencyKey: flow.stepKey('charge_created') }))
 *   return { status: 201, body: { ...ride, charge: charge.id } }
 * }))
 * ```
 */
export function idempotentFlow<DB, Req extends IdempotentRequest = Request>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Req> & RunOptions,
  handler: ((req: Req, flow: Flow<DB, HttpResult>) => Promise<HttpResult>) | HttpDefinedFlow,
): (req: Req, res: IdempotentResponse, next: (error?: unknown) => void) => void {
  return express(new IdempotentRoute(options).flow(idempotency, handler))
}

function express<Req extends IdempotentRequest>(
  route: (req: Req, facts: RequestFacts) => Promise<Outcome>,
): (req: Req, res: IdempotentResponse, next: (error?: unknown) => void) => void {
  return (req, res, next) => {
    route(req, facts(req)).then((outcome) => {
      if ('error' in outcome) return next(outcome.error)
      try {
        send(res, outcome.answer)
      } catch (error) {
        // The answer was checked before anything was stored; this is a response already sent.
        next(error)
      }
    }, next)
  }
}

function facts(req: IdempotentRequest): RequestFacts {
  return {
    method: req.method,
    url: req.originalUrl,
    body: async () => {
      const body = parsed(req)
      const files = await multerFiles(req.file, req.files)
      return files ? { fields: body, files } : body
    },
    headerLines: (name) => rawHeaderLines(req.rawHeaders, name),
    sentBy: () => (req.res?.headersSent ? 'res.json(), res.send()…' : undefined),
  }
}

/**
 * What a body parser left of the request's body. A body that no parser read (none mounted, or
 * none for its Content-Type) cannot be fingerprinted: the request is refused, never taken as one
 * without a body, which would replay another request's answer to it.
 */
function parsed(req: IdempotentRequest): unknown {
  if (declaresBody(req.rawHeaders) && (!req.readableEnded || req.body === undefined)) {
    throw new IdempotencySetupError(
      `The request ${req.method} ${req.originalUrl} has a body (${req.get('content-type') ?? 'no Content-Type'}) that no body parser read before the idempotent route, ` +
        'so its fingerprint cannot cover it. Mount a parser for that type before the route: express.json(), express.urlencoded(), express.text() or express.raw().',
    )
  }
  return req.body
}

function send(res: IdempotentResponse, answer: Answer): void {
  res.status(answer.status)
  for (const [name, value] of Object.entries(answer.headers)) {
    // Cookies that middleware before the route set stay beside the answer's.
    if (name.toLowerCase() === 'set-cookie') res.append(name, typeof value === 'string' ? value : [...value])
    else res.setHeader(name, value)
  }
  // Bytes, not a string: Express would add a charset to the Content-Type of a string.
  if (answer.body === undefined) res.end()
  else res.send(Buffer.isBuffer(answer.body) ? answer.body : Buffer.from(answer.body))
}
