/**
 * What the examples in README.md and in doc comments take for granted: the reader's database,
 * app and helpers. Every example is type-checked against these declarations (test/docs.test.ts),
 * as its own module, so an example that declares one of these names shadows it.
 */
import type { Generated, Kysely, Transaction } from 'kysely'
import type { Express } from 'express'
import type Stripe from 'stripe'
import type { Flow, Idempotency } from 'kysely-idempotency'

declare global {
  interface Database {
    orders: { id: Generated<number>; item: string; created_at: Generated<Date> }
    charges: { id: Generated<number>; customer: string; amount: number; currency: string }
    rides: {
      id: Generated<number>
      user_id: string
      origin: string
      target: string
      price: number
      charge_id: string | null
    }
  }

  interface RideRequest {
    origin: string
    target: string
    price: number
  }

  const db: Kysely<Database>
  const trx: Transaction<Database>
  const app: Express
  const idempotency: Idempotency<Database>
  const stripe: Stripe
  /** A request body and the client's key, as a route has them. */
  const body: { item: string }
  const key: string
  const userId: string
  const rideRequest: RideRequest
  const accountId: string
  const payments: { charge(ride: { price: number }, options: { idempotencyKey: string }): Promise<{ id: string }> }

  function createOrder(trx: Transaction<Database>, body: { item: string }): Promise<{ id: number }>
  /** Throws when the item is out of stock. */
  function reserveStock(trx: Transaction<Database>, body: { item: string }): Promise<void>
  function insertRide(trx: Transaction<Database>, request: RideRequest): Promise<{ id: number; price: number }>
  function createRide(trx: Transaction<Database>, request: RideRequest): Promise<{ id: number; price: number }>
  function markCharged(trx: Transaction<Database>, rideId: number, chargeId: string): Promise<unknown>
  function chargeCard(ride: { price: number }, idempotencyKey: string): Promise<{ id: string }>
  /** A flow defined once, re-driven with a stored request. */
  function rideFlow(request: unknown): (flow: Flow<Database, { status: number }>) => Promise<{ status: number }>

  // biome-ignore lint/suspicious/noRedeclare: Express's own namespace, augmented.
  namespace Express {
    interface Request {
      /** Set by the app's authentication middleware. */
      user: { id: string; stripeId: string }
    }
  }
}

declare module 'fastify' {
  interface FastifyRequest {
    /** What the reader's authentication hook sets. */
    user: { id: string }
  }
}
