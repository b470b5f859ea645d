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
  readonly platform: Platform
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

const PARAMETERS = { transaction: '@Trx()', flow: '@CurrentFlow()' } as const
const DECORATORS = { transaction: '@Idempotent()', flow: '@IdempotentFlow()' } as const

/** The value `@Trx()` (`transaction`) or `@CurrentFlow()` (`flow`) gives the method. */
export function runningOf(context: ExecutionContext, mode: Served['mode']): unknown {
  const found = running.get(context.switchToHttp().getRequest())
  if (found?.mode === mode) return found.value
  const where = `${context.getClass().name}.${context.getHandler().name}`
  const served = metadataOf<Served>(SERVED, context.getHandler())
  throw new IdempotencySetupError(
    served
      ? `${PARAMETERS[mode]} is a parameter of ${where}, which has ${DECORATORS[served.mode]}: take its ${served.mode === 'flow' ? 'flow with @CurrentFlow() and write in flow.phase()' : 'transaction with @Trx()'} instead.`
      : `${PARAMETERS[mode]} is a parameter of ${where}, which has no ${DECORATORS[mode]}: put ${DECORATORS[mode]} on the method.`,
  )
}

/** An answer with its own status and headers, returned by an idempotent method (see `answer()`). */
const answers = new WeakSet<object>()

export function branded(result: HttpResult): HttpResult {
  const copy = { ...result }
  answers.add(copy)
  return copy
}

/**
 * The interceptor of every idempotent method, put there by its decorator: it runs the method
 * (through the method's interceptors listed above the decorator) inside the route's transaction
 * or flow and sends the answer itself; the decorator marks the method as one that answers by
 * itself, so that Nest sends nothing more.
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
      const platform = platformOf(request, http.getResponse(), declaredHeaders(context))
      const outcome = await serve({ request, platform, context, next }, platform.facts)
      if ('error' in outcome) throw outcome.error
      platform.send(outcome.answer)
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
    // Only the decorators apply this interceptor (it is not exported), and they set this first.
    const served = metadataOf<Served>(SERVED, handler)!
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

/** The names of the method's `@Header()` headers (once each, as headers are named in any case), which Nest set before the method ran. */
function declaredHeaders(context: ExecutionContext): readonly string[] {
  const names = (metadataOf<{ name: string }[]>(HEADERS_METADATA, context.getHandler()) ?? []).map(({ name }) => name.toLowerCase())
  return [...new Set(names)]
}

/**
 * The answer a method's return value stands for, as Nest would send it: an `answer()` as it is;
 * else the value as the body, with the `@HttpCode()` status (201 for POST, 200 otherwise) and the
 * `@Header()` headers as Nest set them; text (and on Express, numbers and booleans) as the
 * platform sends them.
 */
function resultOf(value: unknown, call: Call): HttpResult {
  if (typeof value === 'object' && value !== null && answers.has(value)) return value as HttpResult
  const where = `${call.context.getClass().name}.${call.context.getHandler().name}`
  if (value instanceof StreamableFile) {
    throw new IdempotencySetupError(
      `${where} returned a StreamableFile, which is read only as it is sent and so cannot be stored: return answer({ status, body: buffer, headers }) instead.`,
    )
  }
  const shaped = classOf(value, 0)
  if (shaped !== undefined) {
    throw new IdempotencySetupError(
      `${where} returned ${shaped}, which interceptors around @Idempotent() (a ClassSerializerInterceptor) would shape after the answer is stored and sent. ` +
        'Return plain data (instanceToPlain() of class-transformer), or answer({ status, body }) to send the value as JSON as it is.',
    )
  }
  const method = call.context.switchToHttp().getRequest<{ method: string }>().method
  const status = metadataOf<number>(HTTP_CODE_METADATA, call.context.getHandler()) ?? (method === 'POST' ? 201 : 200)
  const headers = call.platform.declared()
  if (value === undefined || value === null) return { status, headers }
  const typed = Object.keys(headers).some((name) => name.toLowerCase() === 'content-type')
  const text = call.platform.text(value)
  if (text !== undefined && !typed) return { status, headers: { ...headers, 'Content-Type': text.type }, body: text.body }
  return { status, headers, body: value }
}

/** The depth {@link classOf} looks to: deeper values are left to JSON. */
const SHAPE_DEPTH = 32

/**
 * The kind of the first value in `value` that is an instance of a class a serializer would
 * shape, if any. Values that say how they are JSON (`toJSON`: dates, decimals, object ids) and
 * binary ones pass; each object is looked at once, so shared and cyclic values cost no more.
 */
function classOf(value: unknown, depth: number, seen = new WeakSet<object>()): string | undefined {
  if (typeof value !== 'object' || value === null || depth > SHAPE_DEPTH || seen.has(value)) return undefined
  seen.add(value)
  if (ArrayBuffer.isView(value) || typeof (value as { toJSON?: unknown }).toJSON === 'function') return undefined
  const prototype: unknown = Object.getPrototypeOf(value)
  if (!Array.isArray(value) && prototype !== Object.prototype && prototype !== null) {
    return `an instance of ${(value as { constructor?: { name?: string } }).constructor?.name || 'a class'}`
  }
  for (const item of Object.values(value)) {
    const found = classOf(item, depth + 1, seen)
    if (found !== undefined) return found
  }
  return undefined
}

/** What the Express or the Fastify platform reads and writes, for one request. */
interface Platform {
  readonly facts: RequestFacts
  /** The `@Header()` headers, with the values Nest set. */
  declared(): Record<string, string | readonly string[]>
  /** A value the platform sends as text, as that text and its type; `undefined` for one it sends as JSON. */
  text(value: unknown): { readonly body: string; readonly type: string } | undefined
  /** Sends the answer, in place of the `@Header()` headers: a stored answer carries its own. */
  send(answer: Answer): void
}

/** Multipart bodies are read by an interceptor, which must run before the idempotent one. */
const PARSERS =
  'Nest parses JSON and URL-encoded bodies unless bodyParser is false; register a parser for other types (app.useBodyParser()), ' +
  'and for uploads list FileInterceptor() below @Idempotent(), so that it runs first.'

/** A response of either platform, as far as the `@Header()` headers go. */
interface Headed {
  getHeader(name: string): unknown
  removeHeader(name: string): unknown
}

function platformOf(request: object, response: object, declared: readonly string[]): Platform {
  const headed = response as Headed
  const common = {
    declared: () =>
      Object.fromEntries(
        declared.flatMap((name) => {
          const value = headed.getHeader(name)
          if (value === undefined) return []
          // Set-Cookie given twice, or once more than a hook set it, is a list of lines.
          return [[name, Array.isArray(value) ? value.map(String) : String(value)]]
        }),
      ),
    unset: () => {
      for (const name of declared) headed.removeHeader(name)
    },
  }
  // Fastify's request and reply wrap Node's (`raw`); Express's are Node's own, extended.
  if ('raw' in request) {
    const reply = response as fastify.IdempotentReply
    return {
      facts: fastify.facts(request as fastify.IdempotentRequest, reply),
      declared: common.declared,
      text: (value) => (typeof value === 'string' ? { body: value, type: 'text/plain; charset=utf-8' } : undefined),
      send: (answer) => {
        common.unset()
        fastify.send(reply, answer)
      },
    }
  }
  const res = response as express.IdempotentResponse
  return {
    facts: express.facts(request as express.IdempotentRequest, PARSERS),
    declared: common.declared,
    // Nest's Express platform sends anything but an object with res.send(String(value)).
    text: (value) => (typeof value !== 'object' ? { body: String(value), type: 'text/html; charset=utf-8' } : undefined),
    send: (answer) => {
      common.unset()
      express.send(res, answer)
    },
  }
}
