/**
 * How a controller method meets the shared HTTP route: the interceptor that `@Idempotent()`
 * puts on it, the request's transaction or flow for `@Trx()` and `@CurrentFlow()`, and the
 * answer built from what the method returned.
 */
import { StreamableFile, type CallHandler, type ExecutionContext, type NestInterceptor } from '@nestjs/common'
import { HEADERS_METADATA, HTTP_CODE_METADATA, REDIRECT_METADATA, RENDER_METADATA, SSE_METADATA } from '@nestjs/common/constants.js'
import type { Transaction } from 'kysely'
import { defer, lastValueFrom, type Observable } from 'rxjs'
import type { Idempotency } from '../src/api.js'
import { IdempotencySetupError } from '../src/errors.js'
import type { Flow } from '../src/flow/handle.js'
import type { Answer, HttpDefinedFlow, HttpResult, IdempotentRoute, Outcome, RequestFacts } from '../http/index.js'
import * as express from '../express/serve.js'
import * as fastify from '../fastify/serve.js'

/** One request through an idempotent method: what the route's scope and handler get. */
export interface Call {
  readonly request: object
  readonly context: ExecutionContext
  readonly next: CallHandler
}

/** What `@Idempotent()` or `@IdempotentFlow()` put on a method. */
export interface Served {
  readonly mode: 'transaction' | 'flow'
  readonly route: IdempotentRoute<Call>
  /** The flow that serves the route instead of the method. */
  readonly defined?: HttpDefinedFlow
}

/** The metadata key of {@link Served} on a method. */
export const SERVED = 'kysely-idempotency:served'

/** Nest's metadata, read the way Nest writes it (`reflect-metadata`, which every Nest app loads). */
const metadata = Reflect as unknown as {
  getMetadata(key: string, target: object, property?: string | symbol): unknown
}

export function metadataOf<T>(key: string, target: object, property?: string | symbol): T | undefined {
  return metadata.getMetadata(key, target, property) as T | undefined
}

/** The transaction or flow of each request inside an idempotent method, for the parameter decorators. */
const running = new WeakMap<object, { readonly mode: Served['mode']; readonly value: unknown }>()

/** The value `@Trx()` (`transaction`) or `@CurrentFlow()` (`flow`) gives the method. */
export function runningOf(context: ExecutionContext, mode: Served['mode']): unknown {
  const found = running.get(context.switchToHttp().getRequest())
  const wanted = mode === 'transaction' ? '@Trx()' : '@CurrentFlow()'
  const owner = mode === 'transaction' ? '@Idempotent()' : '@IdempotentFlow()'
  if (found?.mode !== mode) {
    throw new IdempotencySetupError(
      `${wanted} is a parameter of ${context.getClass().name}.${context.getHandler().name}, which has no ${owner}: put ${owner} on the method.`,
    )
  }
  return found.value
}

/** An answer with its own status and headers, returned by an idempotent method (see `answer()`). */
const answers = new WeakSet<object>()

export function branded(result: HttpResult): HttpResult {
  const copy = { ...result }
  answers.add(copy)
  return copy
}

/**
 * The interceptor of every idempotent method: it runs the method (through the interceptors
 * declared after it) inside the route's transaction or flow and sends the answer itself, so Nest
 * sends nothing more (the decorator marks the method as one that handles its response).
 */
export class IdempotentInterceptor implements NestInterceptor {
  readonly #idempotency: Idempotency<unknown>
  readonly #served = new WeakMap<object, (call: Call, facts: RequestFacts) => Promise<Outcome>>()

  constructor(idempotency: Idempotency<unknown>) {
    this.#idempotency = idempotency
  }

  intercept(context: ExecutionContext, next: CallHandler): Observable<undefined> {
    return defer(async () => {
      const serve = this.#serving(context)
      const http = context.switchToHttp()
      const request: object = http.getRequest()
      const platform = platformOf(request, http.getResponse())
      const outcome = await serve({ request, context, next }, platform.facts)
      if ('error' in outcome) throw outcome.error
      platform.send(
        outcome.answer,
        headersOf(context).map(([name]) => name),
      )
      return undefined
    })
  }

  #serving(context: ExecutionContext): (call: Call, facts: RequestFacts) => Promise<Outcome> {
    const handler = context.getHandler()
    const known = this.#served.get(handler)
    if (known) return known
    const where = `${context.getClass().name}.${handler.name}`
    if (context.getType() !== 'http')
      throw new IdempotencySetupError(`@Idempotent() serves HTTP routes; ${where} is called over ${context.getType()}.`)
    for (const [key, decorator] of [
      [SSE_METADATA, '@Sse()'],
      [REDIRECT_METADATA, '@Redirect()'],
      [RENDER_METADATA, '@Render()'],
    ] as const) {
      if (metadataOf(key, handler) !== undefined) {
        throw new IdempotencySetupError(
          `${where} has ${decorator}, whose answer Nest builds after the method returns, so it cannot be stored: return an answer() instead.`,
        )
      }
    }
    const served = metadataOf<Served>(SERVED, handler)
    if (!served)
      throw new IdempotencySetupError(`${where} uses the IdempotentInterceptor without @Idempotent() or @IdempotentFlow(); use the decorators.`)
    const run = async (call: Call, value: unknown): Promise<HttpResult> => {
      running.set(call.request, { mode: served.mode, value })
      try {
        return resultOf(await lastValueFrom(call.next.handle(), { defaultValue: undefined }), call)
      } finally {
        running.delete(call.request)
      }
    }
    const serve =
      served.mode === 'transaction'
        ? served.route.transaction(this.#idempotency, (call, trx: Transaction<unknown>) => run(call, trx))
        : served.route.flow(this.#idempotency, served.defined ?? ((call, flow: Flow<unknown, HttpResult>) => run(call, flow)))
    this.#served.set(handler, serve)
    return serve
  }
}

/** The `@Header()` headers of the method, as Nest sets them before the method runs. */
function headersOf(context: ExecutionContext): [string, string][] {
  const declared = metadataOf<{ name: string; value: string | (() => string) }[]>(HEADERS_METADATA, context.getHandler()) ?? []
  return declared.map(({ name, value }) => [name, typeof value === 'function' ? value() : value])
}

/**
 * The answer a method's return value stands for, as Nest would send it: an `answer()` as it is;
 * else the value as the body, with the `@HttpCode()` status (201 for POST, 200 otherwise) and the
 * `@Header()` headers; text as the platform sends it.
 */
function resultOf(value: unknown, call: Call): HttpResult {
  if (typeof value === 'object' && value !== null && answers.has(value)) return value as HttpResult
  const where = `${call.context.getClass().name}.${call.context.getHandler().name}`
  if (value instanceof StreamableFile) {
    throw new IdempotencySetupError(
      `${where} returned a StreamableFile, which is read only as it is sent and so cannot be stored: return answer({ status, body: buffer, headers }) instead.`,
    )
  }
  const handler = call.context.getHandler()
  const method = call.context.switchToHttp().getRequest<{ method: string }>().method
  const status = metadataOf<number>(HTTP_CODE_METADATA, handler) ?? (method === 'POST' ? 201 : 200)
  const headers = Object.fromEntries(headersOf(call.context))
  if (value === undefined || value === null) return { status, headers }
  const typed = Object.keys(headers).some((name) => name.toLowerCase() === 'content-type')
  if (typeof value === 'string' && !typed) {
    const fastifyText = 'raw' in call.request
    return { status, headers: { ...headers, 'Content-Type': fastifyText ? 'text/plain; charset=utf-8' : 'text/html; charset=utf-8' }, body: value }
  }
  return { status, headers, body: value }
}

/** What the Express or the Fastify platform reads and writes, for one request. */
interface Platform {
  readonly facts: RequestFacts
  send(answer: Answer, declared: readonly string[]): void
}

/** Multipart bodies are read by an interceptor, which must run before the idempotent one. */
const PARSERS =
  'Nest parses JSON and URL-encoded bodies unless bodyParser is false; register a parser for other types (app.useBodyParser()), ' +
  'and for uploads put FileInterceptor() in @UseInterceptors() below @Idempotent(), so that it runs first.'

function platformOf(request: object, response: object): Platform {
  // Fastify's request and reply wrap Node's (`raw`); Express's are Node's own, extended.
  if ('raw' in request) {
    const reply = response as fastify.IdempotentReply & { removeHeader(name: string): unknown }
    return {
      facts: fastify.facts(request as fastify.IdempotentRequest, reply),
      send: (answer, declared) => {
        for (const name of declared) reply.removeHeader(name)
        fastify.send(reply, answer)
      },
    }
  }
  const res = response as express.IdempotentResponse & { removeHeader(name: string): unknown }
  return {
    facts: express.facts(request as express.IdempotentRequest, PARSERS),
    send: (answer, declared) => {
      // Nest set them before the method ran; the answer carries its own, which a stored one may not.
      for (const name of declared) res.removeHeader(name)
      express.send(res, answer)
    },
  }
}
