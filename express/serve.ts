/**
 * Where Express meets the shared HTTP route: what the route reads off an Express request, and
 * how its answer is written to the response. The Express adapter and the NestJS adapter on its
 * Express platform both serve through it.
 */
import { IdempotencySetupError } from '../src/errors.js'
import { declaresBody, multerFiles, rawHeaderLines, type Answer, type RequestFacts } from '../http/index.js'

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

/**
 * The facts of `req` for the route. `parsers` says where the body parser for a body no parser
 * read belongs, in the words of the framework serving the route.
 */
export function facts(req: IdempotentRequest, parsers: string): RequestFacts {
  return {
    method: req.method,
    url: req.originalUrl,
    body: async () => {
      const body = parsed(req, parsers)
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
function parsed(req: IdempotentRequest, parsers: string): unknown {
  if (declaresBody(req.rawHeaders) && (!req.readableEnded || req.body === undefined)) {
    throw new IdempotencySetupError(
      `The request ${req.method} ${req.originalUrl} has a body (${req.get('content-type') ?? 'no Content-Type'}) that no body parser read before the idempotent route, ` +
        `so its fingerprint cannot cover it. ${parsers}`,
    )
  }
  return req.body
}

/** Writes the answer to the response. */
export function send(res: IdempotentResponse, answer: Answer): void {
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
