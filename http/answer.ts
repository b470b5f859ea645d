/**
 * A route's answer: what a handler returns, the exact answer built from it (status, headers,
 * body bytes), the checks that it can be sent and stored, and the refusals a route answers with.
 */
import { validateHeaderName, validateHeaderValue } from 'node:http'
import { IdempotencyError, IdempotencySerializationError } from '../src/errors.js'
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
export function renderStored(stored: HttpResult): Answer {
  const headers = Object.entries(stored.headers ?? {})
  const last = new Map(headers.map(([name], i) => [name.toLowerCase(), i]))
  return render({ ...stored, headers: Object.fromEntries(headers.filter(([name], i) => last.get(name.toLowerCase()) === i)) })
}

function build(result: HttpResult): Answer {
  // A 1xx is never a final answer, so it cannot be one to store either.
  if (typeof result !== 'object' || result === null || !Number.isInteger(result.status) || result.status < 200 || result.status > 599) {
    throw new Refused(
      invalid(
        'An idempotent handler must return { status, body?, headers? } with an HTTP status code from 200 to 599 (a Response with the Fetch adapter).',
      ),
      true,
    )
  }
  const headers = { ...result.headers }
  const typed = Object.keys(headers).some((name) => name.toLowerCase() === 'content-type')
  const body = result.body
  if (body === undefined) return { status: result.status, headers }
  if (Buffer.isBuffer(body))
    return { status: result.status, headers: typed ? headers : { ...headers, 'Content-Type': 'application/octet-stream' }, body }
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
    if (seen.has(name.toLowerCase()))
      throw new Refused(invalid(`The handler's answer gives the header "${name}" twice, under names that differ only in case.`), true)
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
export class Unstored extends Error {
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

/** The 500 for an answer over `maxStoredBytes`; the route says what it left behind. */
export function tooLarge(detail: string): Refused {
  return new Refused(problem(500, 'response_too_large', 'Response too large to store', detail), true)
}

/** The answer for an error the library raised about the key or the request (a 4xx); others go to the framework. */
export function problemOf(error: unknown): Answer | undefined {
  return error instanceof IdempotencyError && error.status < 500 ? sent(problemDetails(error)) : undefined
}

export function sent(details: ProblemDetails): Answer {
  return { status: details.status, headers: details.headers, body: JSON.stringify(details.body) }
}

/** A stored answer as a replay sends it: with `Idempotency-Replayed: true`, whatever the handler set under that name. */
export function markedReplayed(answer: Answer): Answer {
  const headers = Object.fromEntries(Object.entries(answer.headers).filter(([name]) => name.toLowerCase() !== 'idempotency-replayed'))
  return { ...answer, headers: { ...headers, 'Idempotency-Replayed': 'true' } }
}
