/**
 * What a route stores of an answer, by its options: the one place that decides it, for an
 * answer returned, given to `flow.fail()`, or made when the recovery worker finishes a flow.
 */
import { tooLarge, type Answer } from './answer.js'

/** The route options that decide what is stored (see `IdempotentOptions`). */
export interface StorageOptions {
  readonly persistSetCookie?: boolean
  readonly oversized?: 'refuse' | 'omit-body'
  readonly expiryHeader?: boolean
}

/** The response header that carries the key's expiry, with `expiryHeader: true`. */
export const EXPIRY_HEADER = 'Idempotency-Key-Expires'
/** The response header that marks a replay whose body was not stored (the IETF draft's profile). */
export const OMITTED_HEADER = 'Idempotency-Replay'

export class StorageRules {
  readonly #maxBytes: number
  readonly #options: StorageOptions

  constructor(maxBytes: number, options: StorageOptions) {
    if (options.oversized !== undefined && options.oversized !== 'refuse' && options.oversized !== 'omit-body') {
      throw new RangeError(`The option oversized must be 'refuse' or 'omit-body', got ${String(options.oversized)}.`)
    }
    this.#maxBytes = maxBytes
    this.#options = options
  }

  /** The rules as one comparable text: a defined flow serves routes of one set of rules only. */
  get id(): string {
    const { persistSetCookie, oversized, expiryHeader } = this.#options
    return JSON.stringify([this.#maxBytes, persistSetCookie === true, oversized ?? 'refuse', expiryHeader === true])
  }

  /**
   * The answer as it is sent and stored: with `expiryHeader`, the key's expiry as an HTTP date,
   * `ttl` from now, rounded down (the database counts from its commit, a moment later), so that
   * a client retrying before it is sure to be answered from storage.
   */
  dated(answer: Answer, ttl: number): Answer {
    if (this.#options.expiryHeader !== true) return answer
    const expires = new Date(Math.floor((Date.now() + ttl) / 1000) * 1000).toUTCString()
    return { ...answer, headers: { ...without(answer.headers, EXPIRY_HEADER), [EXPIRY_HEADER]: expires } }
  }

  /**
   * What is stored of an answer: without `Set-Cookie` (unless `persistSetCookie`), within
   * `maxStoredBytes`. A larger one is refused, or with `oversized: 'omit-body'` stored as its
   * status and headers only, marked `Idempotency-Replay: omitted` for the replays.
   */
  kept(answer: Answer): Answer {
    const headers = this.#options.persistSetCookie === true ? answer.headers : without(answer.headers, 'set-cookie')
    const kept = { ...answer, headers }
    if (size(kept) <= this.#maxBytes) return kept
    const limit = `more than maxStoredBytes (${this.#maxBytes})`
    if (this.#options.oversized !== 'omit-body') throw tooLarge(`The response is ${size(kept)} bytes, ${limit}.`)
    const bare = { status: answer.status, headers: { ...without(headers, 'content-length'), [OMITTED_HEADER]: 'omitted' } }
    if (size(bare) > this.#maxBytes) throw tooLarge(`The response's status and headers alone are ${size(bare)} bytes, ${limit}.`)
    return bare
  }
}

function size(answer: Answer): number {
  return (
    Buffer.byteLength(JSON.stringify({ status: answer.status, headers: answer.headers })) +
    (answer.body === undefined ? 0 : Buffer.byteLength(answer.body))
  )
}

function without(headers: Answer['headers'], name: string): Answer['headers'] {
  return Object.fromEntries(Object.entries(headers).filter(([header]) => header.toLowerCase() !== name.toLowerCase()))
}
