/**
 * The Fetch API (`Request` → `Response`): Hono, Next.js route handlers, Remix, SvelteKit, Bun,
 * Deno, Elysia. Maps requests and responses onto the shared HTTP behaviour (`http/`); nothing
 * here decides what is stored or answered.
 */
import type { Transaction } from 'kysely'
import type { Idempotency } from '../src/api.js'
import type { RunOptions, TransactionOptions } from '../src/options.js'
import type { Flow } from '../src/flow/handle.js'
import { IdempotencySetupError } from '../src/errors.js'
import {
  fieldsOf,
  IdempotentRoute,
  mediaType,
  parsedBody,
  partsOf,
  readAtMost,
  type StreamBounds,
  type UNSCOPED,
  type Answer,
  type HttpDefinedFlow,
  type HttpResult,
  type IdempotentOptions,
  type Outcome,
  type RequestFacts,
} from '../http/index.js'

export { parseKeyHeader, UNSCOPED } from '../http/index.js'
export type { HttpDefinedFlow, HttpFlowRequest, HttpResult } from '../http/index.js'

/** Options of a Fetch API route: those of every framework, with `scope` reading the request and the extra arguments. */
export type FetchIdempotentOptions<Args extends readonly unknown[]> = Omit<IdempotentOptions<never>, 'scope'> & {
  /**
   * Whom the key belongs to, from the request and the arguments after it (Hono's context, a
   * Next.js route context), e.g. `(request, c) => c.get('user').id`; or {@link UNSCOPED}.
   */
  readonly scope: ((request: Request, ...args: Args) => string | number | Promise<string | number>) | typeof UNSCOPED
}

/** A handler's answer: a result the library renders, or a `Response`, stored and replayed byte for byte. */
export type FetchResult = HttpResult | Response

/** One call of the route: the request and the arguments after it. */
interface Call<Args extends readonly unknown[]> {
  readonly request: Request
  readonly args: Args
}

/**
 * A Fetch API handler that runs `handler` at most once per `Idempotency-Key` inside a
 * transaction, stores its answer in that transaction, and replays it to retries with the header
 * `Idempotency-Replayed: true`. Conflicts, key reuse and bad keys are answered as
 * `application/problem+json` (409 with `Retry-After`, 422, 400). A thrown error is thrown on to
 * the framework and nothing is stored; a returned 5xx is sent, not stored, and its writes roll
 * back. The request's body is still unread when `handler` gets it (unless something read it
 * before the route: behind Hono's `validator()`, pass the context and read the body with
 * `c.req.valid()`; the route reads Hono's copy). A returned `Response`'s body is read at most
 * `maxStoredBytes` far and `bodyTimeout` long. Arguments after the request are passed on to
 * `scope` and `handler`.
 *
 * ### Examples
 *
 * ```ts
 * import { idempotent } from 'kysely-idempotency/fetch'
 * import { idempotency } from './app'
 *
 * // Next.js (app/charges/route.ts), Bun.serve or Deno.serve: (request: Request) => Promise<Response>
 * export const POST = idempotent(idempotency, { scope: (request) => request.headers.get('x-account') ?? '', required: true },
 *   async (request, trx) => {
 *     const body = (await request.json()) as { customer: string; amount: number }
 *     const charge = await trx.insertInto('charges').values({ ...body, currency: 'usd' }).returningAll().executeTakeFirstOrThrow()
 *     return { status: 201, body: charge, headers: { Location: `/charges/${charge.id}` } }
 *   })
 * ```
 */
export function idempotent<DB, Args extends readonly unknown[] = []>(
  idempotency: Idempotency<DB>,
  options: FetchIdempotentOptions<Args> & TransactionOptions,
  handler: (request: Request, trx: Transaction<DB>, ...args: Args) => Promise<FetchResult>,
): (request: Request, ...args: Args) => Promise<Response> {
  const route = new IdempotentRoute(routeOptions(options))
  return serve(
    route,
    route.transaction(idempotency, async (call: Call<Args>, trx) =>
      result(await handler(unread(call.request), trx, ...call.args), { bytes: route.maxStoredBytes, ms: route.bodyTimeout }),
    ),
  )
}

/**
 * {@link idempotent} for an atomic-phases flow (`idempotency.run`): the handler gets the flow
 * instead of a transaction. A returned 5xx is sent and not stored; the lock is released and the
 * recorded phases are kept, so a retry resumes. An answer given with `flow.fail()` follows the
 * same rules as a returned one.
 *
 * ### Examples
 *
 * ```ts
 * import { Hono } from 'hono'
 * import { idempotentFlow } from 'kysely-idempotency/fetch'
 * import { idempotency, insertRide, payments, type RideRequest } from './app'
 *
 * const rides = idempotentFlow(idempotency, { scope: (request) => request.headers.get('x-user') ?? '' }, async (request, flow) => {
 *   const ride = await flow.phase('ride_created', async (trx) => insertRide(trx, (await request.json()) as RideRequest))
 *   const charge = await flow.step('charge_created', () => payments.charge(ride, { idempotencyKey: flow.stepKey('charge_created') }))
 *   return { status: 201, body: { ...ride, charge: charge.id } }
 * })
 * new Hono().post('/rides', (c) => rides(c.req.raw))
 * ```
 */
export function idempotentFlow<DB, Args extends readonly unknown[] = []>(
  idempotency: Idempotency<DB>,
  options: FetchIdempotentOptions<Args> & RunOptions,
  handler: ((request: Request, flow: Flow<DB, HttpResult>, ...args: Args) => Promise<FetchResult>) | HttpDefinedFlow,
): (request: Request, ...args: Args) => Promise<Response> {
  const route = new IdempotentRoute(routeOptions(options))
  const served =
    typeof handler === 'function'
      ? async (call: Call<Args>, flow: Flow<DB, HttpResult>) =>
          result(await handler(unread(call.request), flow, ...call.args), { bytes: route.maxStoredBytes, ms: route.bodyTimeout })
      : handler
  return serve(route, route.flow(idempotency, served))
}

/**
 * The request as the handler gets it: a copy whose body is unread, for each run (a transaction
 * retried after a serialization failure runs the handler again); the request itself when
 * something before the route read its body (a copy of it could not be made).
 */
function unread(request: Request): Request {
  return request.bodyUsed ? request : request.clone()
}

function routeOptions<Args extends readonly unknown[]>(options: FetchIdempotentOptions<Args>): IdempotentOptions<Call<Args>> {
  const scope = options?.scope
  return { ...options, scope: typeof scope === 'function' ? (call: Call<Args>) => scope(call.request, ...call.args) : scope }
}

function serve<Args extends readonly unknown[]>(
  route: IdempotentRoute<Call<Args>>,
  served: (call: Call<Args>, facts: RequestFacts) => Promise<Outcome>,
): (request: Request, ...args: Args) => Promise<Response> {
  return async (request, ...args) => {
    const outcome = await served({ request, args }, facts(request, args, { bytes: route.maxRequestBytes, ms: route.bodyTimeout }))
    if ('error' in outcome) throw outcome.error
    return response(outcome.answer)
  }
}

function facts(request: Request, args: readonly unknown[], limit: StreamBounds): RequestFacts {
  const url = new URL(request.url)
  return {
    method: request.method,
    url: url.pathname + url.search,
    body: async () => bodyOf(request, args, limit),
    // The Fetch API joins the lines of a header with ", " (one value per name): several lines
    // of the key header arrive as one value, which parseKeyHeader refuses for its comma.
    headerLines(name) {
      const value = request.headers.get(name)
      return value === null ? [] : [value]
    },
  }
}

/** A Hono context (`c`): its request keeps the body a validator read, as Hono caches it. */
interface HonoContext {
  readonly req: { readonly raw: Request; arrayBuffer(): Promise<ArrayBuffer>; formData(): Promise<FormData> }
}

/**
 * The body as Express's parsers would leave it (see {@link parsed}), read at most `limit` far
 * from a copy, so that the handler still finds it unread; or, when something before the route
 * already read it (Hono's `validator()`, `c.req.formData()`), from the Hono context passed after
 * the request, which keeps what it read.
 */
async function bodyOf(request: Request, args: readonly unknown[], limit: StreamBounds): Promise<unknown> {
  const contentType = request.headers.get('content-type') ?? ''
  if (!request.bodyUsed)
    return parsedBody(contentType, request.body === null ? new Uint8Array() : await readAtMost(request.clone().body!, limit, 'request'))
  const hono = args.find((arg): arg is HonoContext => (arg as Partial<HonoContext> | null)?.req?.raw === request)
  if (!hono) {
    throw new IdempotencySetupError(
      'The request body was read before the idempotent route (by a validator or a body parser), so the route cannot fingerprint it. ' +
        'With Hono, pass the context after the request: route(c.req.raw, c).',
    )
  }
  // A form Hono parsed comes back as bytes only re-encoded, under a boundary of its own each time: read its fields.
  const type = mediaType(contentType)
  if (type === 'multipart/form-data') return partsOf(await hono.req.formData())
  if (type === 'application/x-www-form-urlencoded') return fieldsOf(await hono.req.formData())
  return parsedBody(contentType, new Uint8Array(await hono.req.arrayBuffer()))
}

/**
 * A handler's `Response` as a result: its status, its headers (each `Set-Cookie` apart) and its
 * body's bytes, read within `limit` (see {@link readAtMost}).
 */
async function result(answer: FetchResult, limit: StreamBounds): Promise<HttpResult> {
  if (!(answer instanceof Response)) return answer
  const headers: Record<string, string | string[]> = {}
  answer.headers.forEach((value, name) => {
    if (name !== 'set-cookie') headers[name] = value
  })
  const cookies = answer.headers.getSetCookie()
  if (cookies.length) headers['set-cookie'] = cookies
  const body = answer.body === null ? undefined : await readAtMost(answer.body, limit, 'response')
  return body === undefined ? { status: answer.status, headers } : { status: answer.status, headers, body }
}

/** Statuses whose response has no body by definition. */
const BODILESS = new Set([204, 205, 304])

function response(answer: Answer): Response {
  const headers = new Headers()
  for (const [name, value] of Object.entries(answer.headers)) {
    for (const line of typeof value === 'string' ? [value] : value) headers.append(name, line)
  }
  const body =
    answer.body === undefined || BODILESS.has(answer.status) ? null : typeof answer.body === 'string' ? answer.body : new Uint8Array(answer.body)
  return new Response(body, { status: answer.status, headers })
}
