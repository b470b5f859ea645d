/**
 * Where Fastify meets the shared HTTP route: what the route reads off a Fastify request, and
 * how its answer is written to the reply. The Fastify adapter and the NestJS adapter on its
 * Fastify platform both serve through it.
 */
import { IdempotencySetupError } from '../src/errors.js'
import { declaresBody, multipartBody, rawHeaderLines, type Answer, type RequestFacts } from '../http/index.js'

/** The parts of a request the helpers read; Fastify 5 requests have them. */
export interface IdempotentRequest {
  readonly method: string
  /** Path and query string as the client sent them (before any `rewriteUrl`). */
  readonly originalUrl: string
  /** What Fastify's content-type parsers left (parsed JSON, or what the app's own parsers return), if any. */
  readonly body?: unknown
  /** Node's request: header names and values as received, one pair per line (`IncomingMessage.rawHeaders`). */
  readonly raw: { readonly rawHeaders: readonly string[] }
}

/** The parts of a reply the helpers write; Fastify 5 replies have them. */
export interface IdempotentReply {
  code(statusCode: number): unknown
  header(name: string, value: string | readonly string[]): unknown
  send(payload?: unknown): unknown
  /** Whether an answer was already sent. */
  readonly sent: boolean
  /** Settles once the answer has been sent (Fastify's `await reply`). */
  then(fulfilled: () => void, rejected: (error: Error) => void): void
}

/** The facts of `request` for the route. */
export function facts(request: IdempotentRequest, reply: IdempotentReply): RequestFacts {
  return {
    method: request.method,
    url: request.originalUrl,
    body: () => {
      if (declaresBody(request.raw.rawHeaders) && request.body === undefined) {
        throw new IdempotencySetupError(
          `The request ${request.method} ${request.originalUrl} has a body that no content-type parser put in request.body, so its fingerprint cannot cover it. ` +
            "For multipart bodies, register @fastify/multipart with attachFieldsToBody: 'keyValues' (or true).",
        )
      }
      return multipartBody(request.body)
    },
    headerLines: (name) => rawHeaderLines(request.raw.rawHeaders, name),
    sentBy: () => (reply.sent ? 'reply.send()' : undefined),
  }
}

/** Writes the answer to the reply. */
export function send(reply: IdempotentReply, answer: Answer): void {
  reply.code(answer.status)
  for (const [name, value] of Object.entries(answer.headers)) reply.header(name, value)
  // Bytes, not a string: Fastify adds a charset to a JSON Content-Type sent with a string, and
  // passes a string through a serializer set with reply.serializer(); it sends bytes as they are.
  reply.send(answer.body === undefined ? undefined : Buffer.isBuffer(answer.body) ? answer.body : Buffer.from(answer.body))
}
