/**
 * The HTTP behaviour every framework adapter shares (SPEC §5): reading the key, the scope and
 * the fingerprint, what is stored and replayed, and how errors are answered. An adapter maps its
 * framework's request onto {@link RequestFacts} and sends the {@link Answer}s it gets back.
 */
import { randomUUID } from 'node:crypto'
import { validateHeaderName, validateHeaderValue } from 'node:http'
import type { Transaction } from 'kysely'
import type { Execution } from '../src/api.js'
import { MAX_DEPTH, nestsDeeper } from '../src/codec/values.js'
import { IdempotencyError, IdempotencySerializationError, IdempotencySetupError, InvalidIdempotencyKeyError } from '../src/errors.js'
import type { Idempotency } from '../src/api.js'
import type { RunOptions, TransactionOptions } from '../src/options.js'
import { internalsOf, type DefinedFlow, type DefinedRunOptions, type Finisher } from '../src/recovery/registry.js'
import type { Flow } from '../src/flow/handle.js'
import { problem, problemDetails, type ProblemDetails } from './problem.js'

/** A route's answer: stored with the key in the same transaction, then sent. */
export interface HttpResult {
  readonly status: number
  /**
   * The body: a `Buffer`/`Uint8Array` is sent as it is; a string too when `headers` set a
   * `Content-Type`; anything else is sent as JSON (`application/json; charset=utf-8`). A
   * replay sends the same bytes.
   */
  readonly body?: unknown
  readonly headers?: Readonly<Record<string, string | readonly string[]>>
}

/** An answer as it is sent and stored: status, headers, and the body's exact bytes. */
export interface Answer {
  readonly status: number
  readonly headers: Readonly<Record<string, string | readonly string[]>>
  /** Text (UTF-8) when the handler gave text or JSON, bytes otherwise; absent without a body. */
  readonly body?: string | Buffer
}

/**
 * Passed as `scope` to say that keys are global to the route. Any client that guesses or
 * reuses another client's key then receives that client's stored response: use it only
 * when there is a single client or keys are unguessable and never shared.
 */
export const UNSCOPED: unique symbol = Symbol('kysely-idempotency/unscoped')

/** Options of an idempotent route, in every framework. */
export interface IdempotentOptions<Req> {
  /**
   * Whom the key belongs to, e.g. `(req) => req.user.id`, so that one client can never replay
   * another's response; or {@link UNSCOPED}. Required. A number is used as its decimal text;
   * anything but a string or a number is a server error (500) naming this option.
   */
  readonly scope: ((req: Req) => string | number | Promise<string | number>) | typeof UNSCOPED
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
   * Largest stored answer (status, headers and body) in bytes. A larger one is not stored:
   * the request fails with 500 and its writes roll back. Default 1 MiB.
   */
  readonly maxStoredBytes?: number
  /**
   * Largest request body the route reads itself for the fingerprint, in bytes, where no
   * framework has parsed it (the Fetch API adapter); a larger one is answered 413. Default 1 MiB.
   */
  readonly maxRequestBytes?: number
  /**
   * How long the route waits for a body it reads as a stream to end, in milliseconds, where no
   * framework has read it (the Fetch API adapter: the request's body, and a returned
   * `Response`'s, read inside the open transaction). A request body that takes longer is
   * answered 408; a response body, 500, and nothing is stored. Default 30000.
   */
  readonly bodyTimeout?: number
  /** Store `Set-Cookie` headers too, so replays send them again. Default `false`. */
  readonly persistSetCookie?: boolean
}

/**
 * What a flow defined with `defineFlow` receives as its request when an HTTP route serves it:
 * what the fingerprint covers, as stored with the key, so that the recovery worker can run the
 * flow again without the original request.
 */
export interface HttpFlowRequest<Body = unknown> {
  /** Upper case. */
  readonly method: string
  /** Path and query string as the client sent them. */
  readonly url: string
  /** The body as the framework's parsers left it (JSON, form fields, text; bytes as `{ base64 }`; multipart parts as `{ multipart: [name, text or { file, type, sha256 }][] }`), minus `ignoreBodyFields`; `null` without one. */
  readonly body: Body
  /** The `fingerprintHeaders`, by lower-case name; `null` for one the request lacks. */
  readonly headers: Readonly<Record<string, string | null>>
}

/** A flow defined with `defineFlow` that answers an HTTP route. */
export type HttpDefinedFlow<Body = never> = DefinedFlow<HttpResult, HttpFlowRequest<Body>>

/** What the shared behaviour reads of a request, whatever the framework. */
export interface RequestFacts {
  readonly method: string
  /** Path and query string as the client sent them. */
  readonly url: string
  /**
   * The body as the fingerprint sees it: what the framework's body parsing left (parsed JSON,
   * form fields, a `Buffer`, text), if anything. Read only for a request with a key.
   */
  body(): unknown
  /** Every line of the header `name` as the client sent it (several lines are not merged). */
  headerLines(name: string): readonly string[]
}

/** What to send for a request, or an error for the framework's own error handling. */
export type Outcome = { readonly answer: Answer; readonly replayed: boolean } | { readonly error: unknown }

/**
 * Every line of the header `name` in Node's `rawHeaders` (name, value, name, value…): Node joins
 * repeated lines of most headers into one value, and the raw list keeps them apart.
 */
export function rawHeaderLines(rawHeaders: readonly string[], name: string): string[] {
  const lower = name.toLowerCase()
  const lines: string[] = []
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) if (rawHeaders[i]!.toLowerCase() === lower) lines.push(rawHeaders[i + 1]!)
  return lines
}

/**
 * Reads the key from a header value: bare (`abc`) or a Structured-Field string (`"abc"`, with
 * `\"` and `\\` escapes), which denote the same key. A bare value with a comma is refused:
 * HTTP lets proxies and the Fetch API join repeated header lines with commas (RFC 9110 §5.3),
 * so it cannot be told from several keys; a key with a comma is sent quoted (`"a,b"`).
 */
export function parseKeyHeader(value: string): string {
  const text = value.trim()
  if (!text.startsWith('"')) {
    if (!text.includes(',')) return text
    throw new InvalidIdempotencyKeyError(
      'The idempotency key header holds a comma outside quotes: several header lines joined into one, or a bare key with a comma. ' +
        'Send exactly one key, and a key with a comma as a Structured-Field string ("...").',
    )
  }
  if (!/^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"$/.test(text)) {
    throw new InvalidIdempotencyKeyError('The idempotency key header is neither a bare key nor a valid Structured-Field string ("...").')
  }
  return text.slice(1, -1).replace(/\\(["\\])/g, '$1')
}

/**
 * Builds the answer a result stands for: its status and headers, and its body as the exact
 * bytes to send, once it is sure that every framework can send it (see {@link checkSendable}).
 * Applied to a stored answer it gives the same answer back, and it reads the answers stored
 * before bodies were kept as bytes (a JSON value) the way they were sent then.
 */
export function render(result: HttpResult): Answer {
  return checkSendable(build(result))
}

/**
 * {@link render} for a stored answer. One stored before headers differing only in case were
 * refused is sent with the last of them, as Node sends such headers, rather than refused on
 * every replay.
 */
function renderStored(stored: HttpResult): Answer {
  const headers = Object.entries(stored.headers ?? {})
  const last = new Map(headers.map(([name], i) => [name.toLowerCase(), i]))
  return render({ ...stored, headers: Object.fromEntries(headers.filter(([name], i) => last.get(name.toLowerCase()) === i)) })
}

function build(result: HttpResult): Answer {
  // A 1xx is never a final answer, so it cannot be one to store either.
  if (typeof result !== 'object' || result === null || !Number.isInteger(result.status) || result.status < 200 || result.status > 599) {
    throw new Refused(
      invalid('An idempotent handler must return { status, body?, headers? } with an HTTP status code from 200 to 599 (a Response with the Fetch adapter).'),
      true,
    )
  }
  const headers = { ...result.headers }
  const typed = Object.keys(headers).some((name) => name.toLowerCase() === 'content-type')
  const body = result.body
  if (body === undefined) return { status: result.status, headers }
  if (Buffer.isBuffer(body)) return { status: result.status, headers: typed ? headers : { ...headers, 'Content-Type': 'application/octet-stream' }, body }
  if (body instanceof Uint8Array) return build({ ...result, body: Buffer.from(body.buffer, body.byteOffset, body.byteLength) })
  if (typeof body === 'string' && typed) return { status: result.status, headers, body }
  let json: string | undefined
  try {
    json = JSON.stringify(body)
  } catch (error) {
    throw new IdempotencySerializationError(`The response body cannot be sent as JSON: ${(error as Error).message}`, { cause: error })
  }
  if (json === undefined) throw new IdempotencySerializationError(`The response body is a ${typeof body}, which cannot be sent as JSON.`)
  return { status: result.status, headers: typed ? headers : { ...headers, 'Content-Type': 'application/json; charset=utf-8' }, body: json }
}

/**
 * Refuses an answer that some framework could not send as it is, before anything is stored:
 * a header name or value Node refuses (a character outside Latin-1, CR or LF, a space in a
 * name), a header given twice under names that differ only in case (frameworks disagree on
 * which one wins), a header value that is not text, or a `Content-Length` that is not the
 * body's length. Sent anyway, it would throw after the commit, and every retry would replay it.
 */
export function checkSendable(answer: Answer): Answer {
  const seen = new Set<string>()
  for (const [name, value] of Object.entries(answer.headers)) {
    const lines: unknown[] = Array.isArray(value) ? value : [value]
    try {
      validateHeaderName(name)
      for (const line of lines) {
        if (typeof line !== 'string') throw new TypeError(`its value is ${line === null ? 'null' : typeof line}, not text`)
        validateHeaderValue(name, line)
      }
    } catch (error) {
      throw new Refused(invalid(`The handler's answer has a header that cannot be sent, ${JSON.stringify(name)}: ${(error as Error).message}.`), true)
    }
    if (seen.has(name.toLowerCase())) throw new Refused(invalid(`The handler's answer gives the header "${name}" twice, under names that differ only in case.`), true)
    seen.add(name.toLowerCase())
    if (name.toLowerCase() === 'content-length') {
      const bytes = answer.body === undefined ? 0 : Buffer.byteLength(answer.body)
      if (lines.length !== 1 || String(lines[0]).trim() !== String(bytes)) {
        throw new Refused(invalid(`The handler's answer gives the header "${name}" as ${lines.join(', ')}, but its body has ${bytes} bytes.`), true)
      }
    }
  }
  return answer
}

/** The 500 for an answer that cannot be stored or sent; the route says what it left behind. */
function invalid(detail: string): ProblemDetails {
  return problem(500, 'invalid_response', 'Response cannot be sent', detail)
}

/**
 * What a route leaves behind when it refuses the handler's answer, said at the end of the
 * problem's detail: a transaction rolls back, but the phases of a flow have committed.
 */
export const LEFT_BEHIND = {
  transaction: "Nothing was stored, and the request's writes were rolled back.",
  flow: "Nothing was stored as the key's answer; the phases and steps the flow recorded stay, and a retry with the same key resumes after them.",
  unkeyedFlow: 'Nothing was stored; the phases that ran before it committed.',
} as const
type LeftBehind = (typeof LEFT_BEHIND)[keyof typeof LEFT_BEHIND]

/** An answer to send without storing it (a 5xx, or `flow.fail` without a key): thrown to roll back, then sent. */
class Unstored extends Error {
  constructor(readonly answer: Answer) {
    super(`The handler answered ${answer.status}; the answer is sent but not stored.`)
  }
}

/**
 * A request or an answer the route refuses with a problem of its own (a body it cannot see or
 * read within its bounds, an answer it cannot store or send): thrown to roll back, then answered.
 * For an answer, the route adds to the detail what it leaves behind ({@link LEFT_BEHIND}).
 */
export class Refused extends Error {
  constructor(
    readonly details: ProblemDetails,
    readonly answer = false,
  ) {
    super(details.body.detail ?? details.body.title)
  }

  /** The problem to send, from a route that leaves `left` behind. */
  problem(left: LeftBehind): ProblemDetails {
    if (!this.answer) return this.details
    return { ...this.details, body: { ...this.details.body, detail: `${this.details.body.detail} ${left}` } }
  }
}

type KeyInput = { key: string; scope: string; request: unknown }

/** The id the routes' finisher is stored under with every flow a route serves (flows stored it as `answer` before finishers had ids). */
const ROUTE_FINISHER = 'http'

/** A route's finisher, with the storage rules it applies: one flow serves routes of one set of rules. */
interface RouteFinisher extends Finisher {
  readonly rules: string
}

const DEFAULT_METHODS = ['POST', 'PATCH']
const MIB = 1024 * 1024
const HOUR = 60 * 60 * 1000
const DEFAULT_BODY_TIMEOUT = 30_000
/** How deep a request body may nest: what the codec takes, less the levels of {@link HttpFlowRequest} around it. */
const BODY_DEPTH = MAX_DEPTH - 4

function bytesOption(name: string, value: number | undefined): number {
  const bytes = value ?? MIB
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new RangeError(`The option ${name} must be a positive integer of bytes, got ${String(value)}.`)
  return bytes
}

/** The shared behaviour of one route, configured by its options. */
export class IdempotentRoute<Req> {
  readonly #options: IdempotentOptions<Req>
  readonly #methods: ReadonlySet<string>
  readonly #header: string
  readonly #fingerprintHeaders: readonly string[]
  readonly #ignored: ReadonlySet<string>
  readonly #maxStoredBytes: number
  /** See {@link IdempotentOptions.maxRequestBytes}. */
  readonly maxRequestBytes: number
  /** See {@link IdempotentOptions.bodyTimeout}. */
  readonly bodyTimeout: number

  constructor(options: IdempotentOptions<Req>) {
    if (options?.scope !== UNSCOPED && typeof options?.scope !== 'function') {
      throw new TypeError('The idempotent route needs a scope: a function of the request, or UNSCOPED (see the README before using it).')
    }
    this.#options = options
    this.#methods = new Set((options.methods ?? DEFAULT_METHODS).map((m) => m.toUpperCase()))
    this.#header = options.header ?? 'Idempotency-Key'
    this.#fingerprintHeaders = (options.fingerprintHeaders ?? []).map((h) => h.toLowerCase())
    this.#ignored = new Set(options.ignoreBodyFields ?? [])
    this.#maxStoredBytes = bytesOption('maxStoredBytes', options.maxStoredBytes)
    this.maxRequestBytes = bytesOption('maxRequestBytes', options.maxRequestBytes)
    this.bodyTimeout = options.bodyTimeout ?? DEFAULT_BODY_TIMEOUT
    if (!Number.isSafeInteger(this.bodyTimeout) || this.bodyTimeout <= 0 || this.bodyTimeout > HOUR) {
      throw new RangeError(`The option bodyTimeout must be an integer of milliseconds from 1 to ${HOUR} (1 hour), got ${String(options.bodyTimeout)}.`)
    }
  }

  /** See {@link IdempotentOptions.maxStoredBytes}. */
  get maxStoredBytes(): number {
    return this.#maxStoredBytes
  }

  /** A route whose handler runs in a transaction that stores its answer (`idempotency.transaction`). */
  transaction<DB>(
    idempotency: Idempotency<DB>,
    settings: TransactionOptions,
    handler: (req: Req, trx: Transaction<DB>) => Promise<HttpResult>,
  ): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    return this.#route(
      'transaction',
      (req) => idempotency.db.transaction().execute(async (trx) => this.#sendable(render(await handler(req, trx)))),
      (req, key) => this.#once((fn) => idempotency.executeTransaction(key, fn, settings), (trx: Transaction<DB>) => handler(req, trx)),
    )
  }

  /**
   * A route served by a flow defined with `defineFlow`: the flow gets the request as the
   * fingerprint describes it ({@link HttpFlowRequest}), so that the recovery worker can finish
   * it, and its answers, whoever finishes it, go through this route's storage rules.
   */
  #definedFlow<DB>(idempotency: Idempotency<DB>, settings: DefinedRunOptions, defined: HttpDefinedFlow): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    const internals = internalsOf(defined)
    if (!internals) throw new TypeError('idempotentFlow takes a flow function, or a flow defined with idempotency.defineFlow().')
    const { definition } = internals
    const served = definition.finishers.get(ROUTE_FINISHER) as RouteFinisher | undefined
    if (served && served.rules !== this.#rules()) {
      throw new TypeError(`The flow "${definition.name}" already serves a route with other storage rules; define one flow per set of rules.`)
    }
    const finisher: RouteFinisher = { id: ROUTE_FINISHER, rules: this.#rules(), finish: (result) => this.#kept(this.#sendable(render(result as HttpResult))) }
    definition.finishers.set(ROUTE_FINISHER, finisher)
    const run = definition.fn as unknown as (flow: Flow<DB, HttpResult>, request: HttpFlowRequest) => Promise<HttpResult>
    return this.#route(
      'flow',
      async (_req, facts) => this.#sendable(render(await run(directFlow(idempotency), this.#describe(facts, await facts.body())))),
      (_req, key) =>
        this.#once<Flow<DB, Answer>>(
          (fn) => internals.execute(key, fn as unknown as (flow: Flow<never, unknown>) => Promise<unknown>, settings, finisher) as Promise<Execution<Answer>>,
          (flow, keep) => run({ ...flow, fail: (response) => flow.fail(keep(response)) }, key.request as HttpFlowRequest),
        ),
    )
  }

  /** The options that decide what is stored, as one comparable text. */
  #rules(): string {
    return JSON.stringify([this.#maxStoredBytes, this.#options.persistSetCookie === true])
  }

  /**
   * A route whose handler runs an atomic-phases flow (`idempotency.run`). An answer given with
   * `flow.fail()` goes through the same rules as a returned one.
   */
  flow<DB>(
    idempotency: Idempotency<DB>,
    settings: RunOptions,
    handler: ((req: Req, flow: Flow<DB, HttpResult>) => Promise<HttpResult>) | HttpDefinedFlow,
  ): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    if (typeof handler !== 'function') return this.#definedFlow(idempotency, settings, handler)
    return this.#route(
      'flow',
      async (req) => this.#sendable(render(await handler(req, directFlow(idempotency)))),
      (req, key) =>
        this.#once<Flow<DB, Answer>>(
          (fn) => idempotency.executeRun(key, fn, settings),
          (flow: Flow<DB, Answer>, keep) => handler(req, { ...flow, fail: (response) => flow.fail(keep(response)) }),
        ),
    )
  }

  #route(
    mode: 'transaction' | 'flow',
    direct: (req: Req, facts: RequestFacts) => Promise<Answer>,
    keyed: (req: Req, key: KeyInput) => Promise<{ answer: Answer; replayed: boolean }>,
  ): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    const answer = async (req: Req, facts: RequestFacts, state: { keyed: boolean }): Promise<{ answer: Answer; replayed: boolean }> => {
      const idempotent = this.#methods.has(facts.method.toUpperCase())
      const lines = idempotent ? facts.headerLines(this.#header) : []
      if (lines.length > 1) throw new InvalidIdempotencyKeyError(`The request has ${lines.length} ${this.#header} header lines; send exactly one.`)
      if (lines.length === 0) {
        if (idempotent && this.#options.required) {
          return { answer: sent(problem(400, 'missing_key', 'Idempotency key required', `This request needs an ${this.#header} header.`)), replayed: false }
        }
        return { answer: await direct(req, facts), replayed: false }
      }
      const key = parseKeyHeader(lines[0]!)
      state.keyed = true
      return keyed(req, { key, scope: await this.#scope(req, facts), request: this.#describe(facts, await facts.body()) })
    }
    return async (req, facts) => {
      const state = { keyed: false }
      try {
        return await answer(req, facts, state)
      } catch (error) {
        if (error instanceof Unstored) return { answer: error.answer, replayed: false }
        if (error instanceof Refused) {
          const left = mode === 'transaction' ? LEFT_BEHIND.transaction : state.keyed ? LEFT_BEHIND.flow : LEFT_BEHIND.unkeyedFlow
          return { answer: sent(error.problem(left)), replayed: false }
        }
        const mapped = problemOf(error)
        return mapped ? { answer: mapped, replayed: false } : { error }
      }
    }
  }

  async #scope(req: Req, facts: RequestFacts): Promise<string> {
    const scope = this.#options.scope
    if (scope === UNSCOPED) return ''
    const owner: unknown = await scope(req)
    if (typeof owner === 'string') return owner
    if ((typeof owner === 'number' && Number.isFinite(owner)) || typeof owner === 'bigint') return String(owner)
    throw new IdempotencySetupError(
      `The scope option returned ${owner === null ? 'null' : typeof owner} for ${facts.method} ${facts.url}; it must return a string or a number ` +
        '(such as the authenticated user id). Is the request authenticated before this route?',
    )
  }

  /** What the fingerprint covers: method, URL, body (minus ignored fields) and chosen headers. */
  #describe(facts: RequestFacts, body: unknown): HttpFlowRequest {
    // The canonical form and the codec walk the body: a client must not decide how deep they recurse.
    if (nestsDeeper(body, BODY_DEPTH)) {
      throw new Refused(problem(400, 'invalid_request', 'Request body nested too deeply', `The request body nests more than ${BODY_DEPTH} levels deep; this route refuses it.`))
    }
    return {
      method: facts.method.toUpperCase(),
      url: facts.url,
      body: bodyOf(body, this.#ignored),
      headers: Object.fromEntries(
        this.#fingerprintHeaders.map((h) => {
          const lines = facts.headerLines(h)
          return [h, lines.length === 0 ? null : lines.join(', ')]
        }),
      ),
    }
  }

  /** An answer that may be sent: a 5xx is thrown so that its writes roll back, and is then sent. */
  #sendable(answer: Answer): Answer {
    if (answer.status >= 500) throw new Unstored(answer)
    return answer
  }

  /**
   * The one place that decides what is stored for a handler's answer, returned or given to
   * `flow.fail()`: a sendable answer, without `Set-Cookie` (unless allowed), within the size limit.
   */
  #kept(answer: Answer): Answer {
    const headers = Object.fromEntries(
      Object.entries(answer.headers).filter(([name]) => this.#options.persistSetCookie || name.toLowerCase() !== 'set-cookie'),
    )
    const kept = { ...answer, headers }
    const bytes = Buffer.byteLength(JSON.stringify({ status: kept.status, headers })) + (kept.body === undefined ? 0 : Buffer.byteLength(kept.body))
    if (bytes > this.#maxStoredBytes) throw tooLarge(`The response is ${bytes} bytes, more than maxStoredBytes (${this.#maxStoredBytes}).`)
    return kept
  }

  /**
   * Runs `handler` through `execute` (a keyed transaction or flow) and returns what to send:
   * the stored answer on a replay, else the handler's own (its Set-Cookie included).
   */
  async #once<C>(
    execute: (fn: (context: C) => Promise<Answer>) => Promise<Execution<Answer>>,
    handler: (context: C, keep: (result: HttpResult) => Answer) => Promise<HttpResult>,
  ): Promise<{ answer: Answer; replayed: boolean }> {
    let sent: Answer | undefined
    const keep = (result: HttpResult): Answer => {
      sent = this.#sendable(render(result))
      return this.#kept(sent)
    }
    const execution = await execute(async (context) => keep(await handler(context, keep)))
    return { answer: execution.replayed || !sent ? renderStored(execution.value) : sent, replayed: execution.replayed }
  }
}

/** The 500 for an answer over `maxStoredBytes`; the route says what it left behind. */
function tooLarge(detail: string): Refused {
  return new Refused(problem(500, 'response_too_large', 'Response too large to store', detail), true)
}

/** The answer for an error the library raised about the key or the request (a 4xx); others go to the framework. */
function problemOf(error: unknown): Answer | undefined {
  return error instanceof IdempotencyError && error.status < 500 ? sent(problemDetails(error)) : undefined
}

function sent(details: ProblemDetails): Answer {
  return { status: details.status, headers: details.headers, body: JSON.stringify(details.body) }
}

/** How far and how long a body stream is read. */
export interface StreamBounds {
  readonly bytes: number
  readonly ms: number
}

/**
 * Reads a body stream (a Fetch `Request`'s or `Response`'s) to its end, but never past
 * `bounds`: beyond `bytes` or `ms` the stream is cancelled and refused (a request as 413 or
 * 408, an answer as too large or too slow to store), so that neither an endless stream nor one
 * that stalls can hold a transaction open or grow memory, and a client cannot decide how much
 * the route buffers.
 */
export async function readAtMost(stream: ReadableStream<Uint8Array>, bounds: StreamBounds, of: 'request' | 'response'): Promise<Buffer> {
  const reader = stream.getReader()
  // Not awaited: cancelling one copy of a teed stream (a cloned request) settles only once the other is cancelled too.
  const stop = () => void reader.cancel().catch(() => undefined)
  const chunks: Uint8Array[] = []
  let total = 0
  let timer: ReturnType<typeof setTimeout> | undefined
  const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), bounds.ms)))
  try {
    for (;;) {
      const read = await Promise.race([reader.read(), late])
      if (read === 'late') {
        stop()
        throw of === 'request'
          ? new Refused(problem(408, 'request_timeout', 'Request body too slow', `The request body did not end within bodyTimeout (${bounds.ms} ms).`))
          : new Refused(problem(500, 'response_timeout', 'Response too slow to store', `The response body did not end within bodyTimeout (${bounds.ms} ms); it was read no further.`), true)
      }
      if (read.done) return Buffer.concat(chunks)
      total += read.value.byteLength
      if (total > bounds.bytes) {
        stop()
        throw of === 'request'
          ? new Refused(problem(413, 'request_too_large', 'Request body too large', `The request body is more than maxRequestBytes (${bounds.bytes}) bytes.`))
          : tooLarge(`The response body is more than maxStoredBytes (${bounds.bytes}) bytes; it was read no further.`)
      }
      chunks.push(read.value)
    }
  } finally {
    clearTimeout(timer)
  }
}

/** The body as the fingerprint sees it: parsed JSON or form fields, raw bytes as base64, text as is. */
function bodyOf(body: unknown, ignored: ReadonlySet<string>): unknown {
  if (body === undefined || body === null) return null
  if (body instanceof Uint8Array) return { base64: Buffer.from(body).toString('base64') }
  if (ignored.size && typeof body === 'object' && !Array.isArray(body)) {
    return Object.fromEntries(Object.entries(body).filter(([field]) => !ignored.has(field)))
  }
  return body
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
      throw new Unstored(render(response))
    },
  }
}
