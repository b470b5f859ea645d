/**
 * Consumers of queue messages and webhook deliveries, whose id is the key: the handler's writes
 * and the id commit together, and a redelivery after the commit runs nothing.
 */
import type { Transaction } from 'kysely'
import type { Execution } from './api.js'
import { InvalidIdempotencyKeyError } from './errors.js'
import type { IdempotencyKeyInput } from './keys.js'
import type { TransactionOptions } from './options.js'

/** One message or webhook delivery, as its sender identifies it on every redelivery. */
export interface Message {
  /**
   * This consumer's name for what it reads: the webhook endpoint, or the queue or topic and the
   * consumer group (`'billing-webhooks'`, `'orders/shipping'`). Ids are kept apart by source,
   * under the scope `message:<source>`: two consumers of one topic that both must process each
   * message need sources of their own, or the second would take every message as a duplicate.
   */
  readonly source: string
  /**
   * The id the sender keeps on every redelivery: Standard Webhooks' `webhook-id`, Stripe's
   * event id, an SQS `MessageId`, a Kafka `topic/partition/offset`. 1 to 255 printable ASCII
   * characters.
   */
  readonly id: string
  /**
   * The payload, fingerprinted: a redelivery carries the same one, and another payload under
   * the same id is refused with `IdempotencyKeyReuseError` (two messages given one id is a bug
   * to see, not to drop). Default: none, only the id counts.
   */
  readonly body?: unknown
}

/** What a consumed message gave: the handler's value, and whether this delivery was a duplicate. */
export interface Delivery<T> {
  /** The handler's value; for a duplicate, the value the first delivery stored. */
  readonly value: T
  /** `true` when the message was already processed and the handler did not run: acknowledge it. */
  readonly duplicate: boolean
}

/** Options of `Idempotency.consume`: those of `transaction()`, with a longer default `ttl`. */
export interface ConsumeOptions extends TransactionOptions {
  /**
   * How long a processed id is remembered, in milliseconds: longer than the sender redelivers
   * (webhook providers retry for up to days, a queue for its retention). Default 7 days, or the
   * instance's `ttl` where that is longer.
   */
  readonly ttl?: number
}

/** How long a processed message id is remembered unless the call says otherwise. */
export const MESSAGE_TTL = 7 * 24 * 60 * 60 * 1000

/** The scope of a source's ids, apart from the scopes other callers give (`user-1`) in a shared table. */
export function messageKey(message: Message): IdempotencyKeyInput {
  if (typeof message?.source !== 'string' || message.source === '') {
    throw new InvalidIdempotencyKeyError(`A message needs a source (the queue or webhook endpoint it comes from), got ${describe(message?.source)}.`)
  }
  return { key: message.id, scope: `message:${message.source}`, request: message.body ?? null }
}

export async function consumeMessage<DB, T>(
  transaction: (key: IdempotencyKeyInput, fn: (trx: Transaction<DB>) => Promise<T>, options: TransactionOptions) => Promise<Execution<T>>,
  message: Message,
  handler: (trx: Transaction<DB>) => Promise<T>,
  options: ConsumeOptions | undefined,
  instanceTtl: number,
): Promise<Delivery<T>> {
  const ttl = options?.ttl ?? Math.max(instanceTtl, MESSAGE_TTL)
  const { value, replayed } = await transaction(messageKey(message), handler, { ...options, ttl })
  return { value, duplicate: replayed }
}

function describe(value: unknown): string {
  return typeof value === 'string' ? 'an empty string' : value === undefined || value === null ? String(value) : typeof value
}
