/**
 * Fastify 5: maps Fastify's request and reply onto the shared HTTP behaviour (`http/`); nothing
 * here decides what is stored or answered.
 */
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Transaction } from 'kysely'
import type { Idempotency } from '../src/api.js'
import type { RunOptions, TransactionOptions } from '../src/options.js'
import type { Flow } from '../src/flow/handle.js'
import {
  IdempotentRoute,
  type HttpDefinedFlow,
  type HttpResult,
  type IdempotentOptions,
  type Outcome,
  type RequestFacts,
  type RouteOptions,
} from '../http/index.js'
import { facts, send, type IdempotentReply, type IdempotentRequest } from './serve.js'

export { parseKeyHeader, UNSCOPED } from '../http/index.js'
export type { HttpDefinedFlow, HttpFlowRequest, HttpResult, IdempotentOptions } from '../http/index.js'
export type { IdempotentReply, IdempotentRequest } from './serve.js'

/** One call of the route: the request, and the reply it answers through. */
interface Call<Req, Reply> {
  readonly request: Req
  readonly reply: Reply
}

/**
 * A Fastify route handler that runs `handler` at most once per `Idempotency-Key` inside a
 * transaction, stores its answer in that transaction, and replays it to retries with the
 * header `Idempotency-Replayed: true`. Conflicts, key reuse and bad keys are answered as
 * `application/problem+json` (409 with `Retry-After`, 422, 400). A thrown error is thrown on to
 * Fastify's error handler and nothing is stored; a returned 5xx is sent, not stored, and its
 * writes roll back. `request` is Fastify's own `FastifyRequest`, with your augmentations
 * (`request.user`) and the route's generic (`app.post<{ Body: … }>` types `request.body`).
 * Answers are sent as bytes, so Fastify neither serializes them again nor adds a charset. The
 * handler returns its answer and never sends it itself: one that calls `reply.send()` is refused
 * before anything commits, its writes rolled back.
 *
 * ### Examples
 *
 * ```ts
 * import Fastify from 'fastify'
 * import { idempotent } from 'kysely-idempotency/fastify'
 * import { idempotency } from './app'
 *
 * declare module 'fastify' {
 *   interface FastifyRequest { user: { id: string } } // set by your authentication hook
 * }
 *
 * const app = Fastify()
 * app.post<{ Body: { customer: string; amount: number } }>('/charges',
 *   idempotent(idempotency, { scope: (request) => request.user.id, required: true }, async (request, trx) => {
 *     const charge = await trx.insertInto('charges').values({ ...request.body, currency: 'usd' }).returningAll().executeTakeFirstOrThrow()
 *     return { status: 201, body: charge, headers: { Location: `/charges/${charge.id}` } }
 *   }))
 * ```
 */
export function idempotent<DB, Req extends IdempotentRequest = FastifyRequest, Reply extends IdempotentReply = FastifyReply>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Req> & TransactionOptions,
  handler: (request: Req, trx: Transaction<DB>) => Promise<HttpResult>,
): (request: Req, reply: Reply) => Promise<void> {
  return fastify(new IdempotentRoute(routeOptions<Req, Reply>(options)).transaction(idempotency, (call, trx) => handler(call.request, trx)))
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
 * import Fastify from 'fastify'
 * import { idempotentFlow } from 'kysely-idempotency/fastify'
 * import { idempotency, insertRide, payments, type RideRequest } from './app'
 *
 * declare module 'fastify' {
 *   interface FastifyRequest { user: { id: string } } // set by your authentication hook
 * }
 *
 * const app = Fastify()
 * app.post<{ Body: RideRequest }>('/rides', idempotentFlow(idempotency, { scope: (request) => request.user.id }, async (request, flow) => {
 *   const ride = await flow.phase('ride_created', (trx) => insertRide(trx, request.body))
 *   const charge = await flow.step('charge_created', () => payments.charge(ride, { idempotencyKey: flow.stepKey('charge_created') }))
 *   return { status: 201, body: { ...ride, charge: charge.id } }
 * }))
 * ```
 */
export function idempotentFlow<DB, Req extends IdempotentRequest = FastifyRequest, Reply extends IdempotentReply = FastifyReply>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Req> & RunOptions,
  handler: ((request: Req, flow: Flow<DB, HttpResult>) => Promise<HttpResult>) | HttpDefinedFlow,
): (request: Req, reply: Reply) => Promise<void> {
  const served = typeof handler === 'function' ? (call: Call<Req, Reply>, flow: Flow<DB, HttpResult>) => handler(call.request, flow) : handler
  return fastify(new IdempotentRoute(routeOptions<Req, Reply>(options)).flow(idempotency, served))
}

function routeOptions<Req extends IdempotentRequest, Reply>(options: RouteOptions<Req>): RouteOptions<Call<Req, Reply>> {
  const scope = options?.scope
  return { ...options, scope: typeof scope === 'function' ? (call: Call<Req, Reply>) => scope(call.request) : scope }
}

function fastify<Req extends IdempotentRequest, Reply extends IdempotentReply>(
  route: (call: Call<Req, Reply>, facts: RequestFacts) => Promise<Outcome>,
): (request: Req, reply: Reply) => Promise<void> {
  return async (request, reply) => {
    const outcome = await route({ request, reply }, facts(request, reply))
    if ('error' in outcome) throw outcome.error
    send(reply, outcome.answer)
    // Settles once the answer is sent, so Fastify leaves the reply alone (its `await reply`).
    await reply
  }
}
