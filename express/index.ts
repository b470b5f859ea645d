/**
 * Express 4 and 5: maps Express's request and response onto the shared HTTP behaviour
 * (`http/`); nothing here decides what is stored or answered.
 */
import type { NextFunction as ExpressNext, Request } from 'express'
import type { Transaction } from 'kysely'
import type { Idempotency } from '../src/api.js'
import type { RunOptions, TransactionOptions } from '../src/options.js'
import type { Flow } from '../src/flow/handle.js'
import { IdempotentRoute, type HttpDefinedFlow, type HttpResult, type IdempotentOptions, type Outcome, type RequestFacts } from '../http/index.js'
import { facts, send, type IdempotentRequest, type IdempotentResponse } from './serve.js'

export { parseKeyHeader, UNSCOPED } from '../http/index.js'
export type { HttpDefinedFlow, HttpFlowRequest, HttpResult, IdempotentOptions } from '../http/index.js'
export type { IdempotentRequest, IdempotentResponse } from './serve.js'

export type NextFunction = ExpressNext

const PARSERS = 'Mount a parser for that type before the route: express.json(), express.urlencoded(), express.text() or express.raw().'

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
    route(req, facts(req, PARSERS)).then((outcome) => {
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
