/**
 * The HTTP behaviour every framework adapter shares (SPEC §5): reading the key, the scope and
 * the fingerprint, what is stored and replayed, and how errors are answered. An adapter maps its
 * framework's request onto {@link RequestFacts} and sends the {@link Answer}s it gets back.
 */
import { randomUUID } from 'node:crypto'
import type { Transaction } from 'kysely'
import type { Execution, Idempotency } from '../src/api.js'
import { MAX_DEPTH, nestsDeeper } from '../src/codec/values.js'
import { IdempotencySetupError, InvalidIdempotencyKeyError } from '../src/errors.js'
import type { Flow } from '../src/flow/handle.js'
import { bounded, DEFAULTS, flag, resolveSettings, type RunOptions, type TransactionOptions } from '../src/options.js'
import { internalsOf, type DefinedFlow, type DefinedRunOptions, type Finisher } from '../src/recovery/registry.js'
import { LEFT_BEHIND, markedReplayed, problemOf, Refused, render, renderStored, sent, Unstored, type Answer, type HttpResult } from './answer.js'
import { parseKeyHeader } from './headers.js'
import { StorageRules } from './storage.js'
import { problem } from './problem.js'

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
   * the request fails with 500 and its writes roll back (see {@link oversized}). Default 1 MiB.
   */
  readonly maxStoredBytes?: number
  /**
   * What to do with an answer over `maxStoredBytes`. `'refuse'` (the default): answer 500
   * `response_too_large` and roll the writes back. `'omit-body'`: send it in full, and store its
   * status and headers only, so that a replay sends them without a body and with
   * `Idempotency-Replay: omitted` (the IETF draft's profile). A `Response` returned to the Fetch
   * adapter is read as a stream no further than the limit, so one over it is refused either way:
   * return `{ status, body, headers }` for answers that may be large.
   */
  readonly oversized?: 'refuse' | 'omit-body'
  /**
   * Send the key's expiry with every answer the handler gave to a keyed request, first and
   * replayed, as the header `Idempotency-Key-Expires` (an HTTP date, by the application's clock,
   * rounded down): until then a retry with the key is answered from storage. Default `false`.
   */
  readonly expiryHeader?: boolean
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
  /**
   * How the handler sent the framework's response itself (`res.json()`), when it did instead
   * of returning its answer; `undefined` when it did not, or where a handler cannot.
   */
  sentBy?(): string | undefined
}

/**
 * An idempotent route's options as the adapters take them: the HTTP options, and the call options
 * of the mode it runs in (a transaction's isolation level, a flow's lock timeout).
 */
export type RouteOptions<Req> = IdempotentOptions<Req> & TransactionOptions & RunOptions

/**
 * What to send for a request (a replay already carries `Idempotency-Replayed: true`), or an
 * error for the framework's own error handling.
 */
export type Outcome = { readonly answer: Answer; readonly replayed: boolean } | { readonly error: unknown }

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
  if (!Number.isSafeInteger(bytes) || bytes <= 0)
    throw new RangeError(`The option ${name} must be a positive integer of bytes, got ${String(value)}.`)
  return bytes
}

/** The shared behaviour of one route, configured by its options. */
export class IdempotentRoute<Req> {
  readonly #options: RouteOptions<Req>
  readonly #methods: ReadonlySet<string>
  readonly #header: string
  readonly #fingerprintHeaders: readonly string[]
  readonly #ignored: ReadonlySet<string>
  readonly #maxStoredBytes: number
  readonly #storage: StorageRules
  /** See {@link IdempotentOptions.maxRequestBytes}. */
  readonly maxRequestBytes: number
  /** See {@link IdempotentOptions.bodyTimeout}. */
  readonly bodyTimeout: number

  constructor(options: RouteOptions<Req>) {
    if (options?.scope !== UNSCOPED && typeof options?.scope !== 'function') {
      throw new TypeError(
        'The idempotent route needs a scope: a function of the request, or UNSCOPED (read what it allows in the docs, docs/guide/http.md, before using it).',
      )
    }
    this.#options = options
    this.#methods = new Set((options.methods ?? DEFAULT_METHODS).map((m) => m.toUpperCase()))
    this.#header = options.header ?? 'Idempotency-Key'
    this.#fingerprintHeaders = (options.fingerprintHeaders ?? []).map((h) => h.toLowerCase())
    this.#ignored = new Set(options.ignoreBodyFields ?? [])
    this.#maxStoredBytes = bytesOption('maxStoredBytes', options.maxStoredBytes)
    this.#storage = new StorageRules(this.#maxStoredBytes, options)
    // The call options, checked now: a mistake must not wait for the first request with a key.
    resolveSettings(DEFAULTS, options)
    if (options.lockTimeout !== undefined) bounded('lockTimeout', options.lockTimeout)
    if (options.claimFirst !== undefined) flag('claimFirst', options.claimFirst)
    this.maxRequestBytes = bytesOption('maxRequestBytes', options.maxRequestBytes)
    this.bodyTimeout = options.bodyTimeout ?? DEFAULT_BODY_TIMEOUT
    if (!Number.isSafeInteger(this.bodyTimeout) || this.bodyTimeout <= 0 || this.bodyTimeout > HOUR) {
      throw new RangeError(
        `The option bodyTimeout must be an integer of milliseconds from 1 to ${HOUR} (1 hour), got ${String(options.bodyTimeout)}.`,
      )
    }
  }

  /** See {@link IdempotentOptions.maxStoredBytes}. */
  get maxStoredBytes(): number {
    return this.#maxStoredBytes
  }

  /** A route whose handler runs in a transaction that stores its answer (`idempotency.transaction`). */
  transaction<DB>(
    idempotency: Idempotency<DB>,
    handler: (req: Req, trx: Transaction<DB>) => Promise<HttpResult>,
  ): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    const { ttl, conflictWait, isolationLevel, reuse, claimFirst } = this.#options
    const settings: TransactionOptions = { ttl, conflictWait, isolationLevel, reuse, claimFirst }
    const left = LEFT_BEHIND.transaction
    return this.#route(
      'transaction',
      (req, facts) => idempotency.db.transaction().execute(async (trx) => this.#sendable(render(returned(facts, await handler(req, trx), left)))),
      (req, key, facts) =>
        this.#once(
          ttl ?? idempotency.ttl,
          (fn) => idempotency.executeTransaction(key, fn, settings),
          async (trx: Transaction<DB>) => returned(facts, await handler(req, trx), left),
        ),
    )
  }

  /**
   * A route served by a flow defined with `defineFlow`: the flow gets the request as the
   * fingerprint describes it ({@link HttpFlowRequest}), so that the recovery worker can finish
   * it, and its answers, whoever finishes it, go through this route's storage rules.
   */
  #definedFlow<DB>(
    idempotency: Idempotency<DB>,
    settings: DefinedRunOptions,
    defined: HttpDefinedFlow,
  ): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    const internals = internalsOf(defined)
    if (!internals) throw new TypeError('idempotentFlow takes a flow function, or a flow defined with idempotency.defineFlow().')
    const { definition } = internals
    // The ttl a run of this flow from this route stores its answer with, for the expiry header.
    const ttl = settings.ttl ?? definition.options.ttl ?? idempotency.ttl
    const served = definition.finishers.get(ROUTE_FINISHER) as RouteFinisher | undefined
    if (served && served.rules !== this.#storage.id) {
      throw new TypeError(`The flow "${definition.name}" already serves a route with other storage rules; define one flow per set of rules.`)
    }
    const finisher: RouteFinisher = {
      id: ROUTE_FINISHER,
      rules: this.#storage.id,
      // The worker gives the run's own ttl: another route may have registered this finisher since.
      finish: (result, runTtl) => this.#storage.kept(this.#storage.dated(this.#sendable(render(result as HttpResult)), runTtl)),
    }
    definition.finishers.set(ROUTE_FINISHER, finisher)
    const run = definition.fn as unknown as (flow: Flow<DB, HttpResult>, request: HttpFlowRequest) => Promise<HttpResult>
    return this.#route(
      'flow',
      async (_req, facts) =>
        this.#sendable(
          render(returned(facts, await run(directFlow(idempotency), this.#describe(facts, await facts.body())), LEFT_BEHIND.unkeyedFlow)),
        ),
      (_req, key, facts) =>
        this.#once<Flow<DB, Answer>>(
          ttl,
          (fn) =>
            internals.execute(key, fn as unknown as (flow: Flow<never, unknown>) => Promise<unknown>, settings, finisher) as Promise<
              Execution<Answer>
            >,
          async (flow, keep) =>
            returned(facts, await run({ ...flow, fail: (response) => flow.fail(keep(response)) }, key.request as HttpFlowRequest), LEFT_BEHIND.flow),
        ),
    )
  }

  /**
   * A route whose handler runs an atomic-phases flow (`idempotency.run`). An answer given with
   * `flow.fail()` goes through the same rules as a returned one.
   */
  flow<DB>(
    idempotency: Idempotency<DB>,
    handler: ((req: Req, flow: Flow<DB, HttpResult>) => Promise<HttpResult>) | HttpDefinedFlow,
  ): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    const { ttl, conflictWait, lockTimeout, reuse } = this.#options
    const settings: RunOptions = { ttl, conflictWait, lockTimeout, reuse }
    if (typeof handler !== 'function') return this.#definedFlow(idempotency, settings, handler)
    return this.#route(
      'flow',
      async (req, facts) => this.#sendable(render(returned(facts, await handler(req, directFlow(idempotency)), LEFT_BEHIND.unkeyedFlow))),
      (req, key, facts) =>
        this.#once<Flow<DB, Answer>>(
          ttl ?? idempotency.ttl,
          (fn) => idempotency.executeRun(key, fn, settings),
          async (flow: Flow<DB, Answer>, keep) =>
            returned(facts, await handler(req, { ...flow, fail: (response) => flow.fail(keep(response)) }), LEFT_BEHIND.flow),
        ),
    )
  }

  #route(
    mode: 'transaction' | 'flow',
    direct: (req: Req, facts: RequestFacts) => Promise<Answer>,
    keyed: (req: Req, key: KeyInput, facts: RequestFacts) => Promise<{ answer: Answer; replayed: boolean }>,
  ): (req: Req, facts: RequestFacts) => Promise<Outcome> {
    const answer = async (req: Req, facts: RequestFacts, state: { keyed: boolean }): Promise<{ answer: Answer; replayed: boolean }> => {
      const idempotent = this.#methods.has(facts.method.toUpperCase())
      const lines = idempotent ? facts.headerLines(this.#header) : []
      if (lines.length > 1) throw new InvalidIdempotencyKeyError(`The request has ${lines.length} ${this.#header} header lines; send exactly one.`)
      if (lines.length === 0) {
        if (idempotent && this.#options.required) {
          return {
            answer: sent(problem(400, 'missing_key', 'Idempotency key required', `This request needs an ${this.#header} header.`)),
            replayed: false,
          }
        }
        return { answer: await direct(req, facts), replayed: false }
      }
      const key = parseKeyHeader(lines[0]!)
      state.keyed = true
      return keyed(req, { key, scope: await this.#scope(req, facts), request: this.#describe(facts, await facts.body()) }, facts)
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
        if (mapped) return { answer: mapped, replayed: false }
        // Frameworks take `undefined` for no error: Express's next(undefined) runs the next route, Koa leaves the request hanging.
        return { error: error ?? new Error(`The idempotent handler of ${facts.method} ${facts.url} threw ${error}; nothing was stored.`) }
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
      throw new Refused(
        problem(
          400,
          'invalid_request',
          'Request body nested too deeply',
          `The request body nests more than ${BODY_DEPTH} levels deep; this route refuses it.`,
        ),
      )
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
   * Runs `handler` through `execute` (a keyed transaction or flow) and returns what to send:
   * the stored answer on a replay, else the handler's own (its Set-Cookie included).
   */
  async #once<C>(
    ttl: number,
    execute: (fn: (context: C) => Promise<Answer>) => Promise<Execution<Answer>>,
    handler: (context: C, keep: (result: HttpResult) => Answer) => Promise<HttpResult>,
  ): Promise<{ answer: Answer; replayed: boolean }> {
    let sent: Answer | undefined
    const keep = (result: HttpResult): Answer => {
      sent = this.#storage.dated(this.#sendable(render(result)), ttl)
      return this.#storage.kept(sent)
    }
    const execution = await execute(async (context) => keep(await handler(context, keep)))
    if (!execution.replayed && sent) return { answer: sent, replayed: false }
    const stored = renderStored(execution.value)
    return { answer: execution.replayed ? markedReplayed(stored) : stored, replayed: execution.replayed }
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

/**
 * The handler's answer, unless it sent the framework's response itself: then nothing can be
 * stored (or sent again), and the route refuses it before anything commits.
 */
function returned(facts: RequestFacts, result: HttpResult, left: string): HttpResult {
  const how = facts.sentBy?.()
  if (how === undefined) return result
  throw new IdempotencySetupError(
    `The handler of ${facts.method} ${facts.url} sent the response itself (${how}) instead of returning it, so it cannot be stored. ` +
      `${left} Return { status, body, headers } and let the route send it.`,
  )
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
