/**
 * Koa 3 middleware for idempotent routes: maps a Koa context onto the shared HTTP route
 * (`http/`) and sends its answer through the context.
 */
import type { Context } from 'koa'
import type { Transaction } from 'kysely'
import type { Idempotency } from '../src/api.js'
import { IdempotencySetupError } from '../src/errors.js'
import type { Flow } from '../src/flow/handle.js'
import type { RunOptions, TransactionOptions } from '../src/options.js'
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

/** The parts of a context the middleware reads and writes; Koa 3 contexts have them. */
export interface IdempotentContext {
  readonly method: string
  /** Path and query string as the client sent them. */
  readonly originalUrl: string
  /** Node's request: header lines as received, and whether a body parser read the body to its end. */
  readonly req: { readonly rawHeaders: readonly string[]; readonly readableEnded: boolean }
  /** Where a body parser (`@koa/bodyparser`, `koa-body`) leaves the body, and `@koa/multer` the files. */
  readonly request: object
  /** Whether the response's headers were already sent. */
  readonly headerSent: boolean
  body: unknown
  status: number
  get(name: string): string
  set(name: string, value: string | string[]): void
  append(name: string, value: string | string[]): void
  remove(name: string): void
}

/**
 * Koa middleware that runs `handler` at most once per idempotency key, inside the transaction
 * that stores its answer (`idempotency.transaction`), and sends that answer; a retry gets the
 * stored status, headers and bytes with `Idempotency-Replayed: true`. It behaves as the Express
 * adapter does (docs: HTTP adapters): errors of the key are `application/problem+json`, a
 * thrown error is thrown on to Koa's error handling with nothing stored, and a returned 5xx is
 * sent, not stored, with its writes rolled back.
 *
 * Mount a body parser before it (`@koa/bodyparser`): a request whose body no parser read is
 * refused (500, `IdempotencySetupError`), since its fingerprint could not cover the body. The
 * handler returns its answer: one that sets `ctx.body` itself is refused before anything
 * commits.
 *
 * ### Examples
 *
 * ```ts
 * import { bodyParser } from '@koa/bodyparser'
 * import Koa from 'koa'
 * import { idempotent } from 'kysely-idempotency/koa'
 * import { idempotency } from './app'
 *
 * const app = new Koa<{ accountId: string }>()
 * app.use(bodyParser())
 * app.use(
 *   idempotent(idempotency, { scope: (ctx) => ctx.state.accountId, required: true }, async (ctx, trx) => {
 *     const body = ctx.request.body as { customer: string; amount: number }
 *     const charge = await trx.insertInto('charges').values({ ...body, currency: 'usd' }).returningAll().executeTakeFirstOrThrow()
 *     return { status: 201, body: charge, headers: { Location: `/charges/${charge.id}` } }
 *   }),
 * )
 * ```
 */
export function idempotent<DB, Ctx extends IdempotentContext = Context>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Ctx> & TransactionOptions,
  handler: (ctx: Ctx, trx: Transaction<DB>) => Promise<HttpResult>,
): (ctx: Ctx, next: () => Promise<unknown>) => Promise<void> {
  return koa(new IdempotentRoute(options).transaction(idempotency, handler))
}

/**
 * {@link idempotent} for an atomic-phases flow (`idempotency.run`): the handler gets the flow
 * instead of a transaction. A returned 5xx is sent and not stored; the lock is released and the
 * recorded phases are kept, so a retry resumes.
 */
export function idempotentFlow<DB, Ctx extends IdempotentContext = Context>(
  idempotency: Idempotency<DB>,
  options: IdempotentOptions<Ctx> & RunOptions,
  handler: ((ctx: Ctx, flow: Flow<DB, HttpResult>) => Promise<HttpResult>) | HttpDefinedFlow,
): (ctx: Ctx, next: () => Promise<unknown>) => Promise<void> {
  return koa(new IdempotentRoute(options).flow(idempotency, handler))
}

function koa<Ctx extends IdempotentContext>(route: (ctx: Ctx, facts: RequestFacts) => Promise<Outcome>): (ctx: Ctx) => Promise<void> {
  return async (ctx) => {
    const outcome = await route(ctx, facts(ctx, ctx.body))
    if ('error' in outcome) throw outcome.error
    send(ctx, outcome.answer)
  }
}

/** What body parsers add to Koa's request; Koa's own type has none of it unless a parser's types augment it. */
interface Parsed {
  readonly body?: unknown
  readonly file?: unknown
  readonly files?: unknown
}

function facts(ctx: IdempotentContext, before: unknown): RequestFacts {
  const request: Parsed = ctx.request
  return {
    method: ctx.method,
    url: ctx.originalUrl,
    body: async () => {
      const body = parsed(ctx, request)
      const files = await multerFiles(request.file, request.files)
      return files ? { fields: body, files } : body
    },
    headerLines: (name) => rawHeaderLines(ctx.req.rawHeaders, name),
    // Nothing is sent before the middleware returns, but an answer set on the context would be lost.
    sentBy: () => (ctx.headerSent ? 'ctx.res.end()' : ctx.body !== before ? 'ctx.body = …' : undefined),
  }
}

/** What a body parser left; a body no parser read is refused, never taken as no body. */
function parsed(ctx: IdempotentContext, request: Parsed): unknown {
  if (declaresBody(ctx.req.rawHeaders) && (!ctx.req.readableEnded || request.body === undefined)) {
    throw new IdempotencySetupError(
      `The request ${ctx.method} ${ctx.originalUrl} has a body (${ctx.get('content-type') || 'no Content-Type'}) that no body parser read before the idempotent middleware, ` +
        'so its fingerprint cannot cover it. Mount a parser for that type before it: bodyParser() from @koa/bodyparser, or koa-body.',
    )
  }
  return request.body
}

function send(ctx: IdempotentContext, answer: Answer): void {
  ctx.status = answer.status
  // Before the body, so that Koa keeps the answer's Content-Type instead of guessing one.
  for (const [name, value] of Object.entries(answer.headers)) {
    const lines = typeof value === 'string' ? value : [...value]
    // Cookies that middleware before the route set stay beside the answer's.
    if (name.toLowerCase() === 'set-cookie') ctx.append(name, lines)
    else ctx.set(name, lines)
  }
  if (answer.body !== undefined) ctx.body = Buffer.isBuffer(answer.body) ? answer.body : Buffer.from(answer.body)
  // No body but a Content-Type (an omitted replay): empty bytes, since Koa drops the type of a null body.
  else if (Object.keys(answer.headers).some((name) => name.toLowerCase() === 'content-type')) ctx.body = Buffer.alloc(0)
  else {
    // A null body is a 204 to Koa, and the JSON type that middleware may have set makes it `null`.
    ctx.remove('Content-Type')
    ctx.body = null
    ctx.status = answer.status
  }
}
