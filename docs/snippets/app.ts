/**
 * The app that the examples in these docs import from `./app`: its database and tables, its
 * Express app and idempotency instance, one request's key and body, and its own business
 * functions. Examples in doc comments and in the README that show no import of their own use
 * nothing from here.
 */
import express from 'express'
import { type Generated, Kysely, PostgresDialect, type Transaction } from 'kysely'
import { createIdempotency } from 'kysely-idempotency'
import pg from 'pg'
import Stripe from 'stripe'

export interface Database {
  orders: { id: Generated<number>; item: string; created_at: Generated<Date> }
  stock: { item: string; available: number }
  charges: { id: Generated<number>; customer: string; amount: number; currency: string }
  rides: { id: Generated<number>; user_id: string; origin: string; target: string; price: number; charge_id: string | null }
  /** Messages written with the business rows, for a relay to publish (docs: Exactly-once enqueue). */
  outbox: { id: Generated<number>; topic: string; payload: string }
}

export const db = new Kysely<Database>({
  dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: process.env.DATABASE_URL }) }),
})
export const idempotency = createIdempotency({ db })
export const stripe = new Stripe(process.env.STRIPE_SECRET_KEY ?? '')

declare global {
  namespace Express {
    interface Request {
      /** Who sent the request, set by `authenticate`. */
      user: { id: string; stripeId: string }
    }
  }
}

/** Stands for the app's authentication: every request comes from one user. */
function authenticate(req: express.Request, _res: express.Response, next: express.NextFunction): void {
  req.user = { id: 'user-1', stripeId: 'cus_1' }
  next()
}

// Body parsers go on each route: a webhook route needs the raw bytes its signature covers.
export const app = express()
app.use(authenticate)

// One request, for the examples that are not inside a route: its Idempotency-Key, the body and
// who sent it (the scope of the key).
export const key = 'order-7f3a'
export const body = { item: 'book' }
export const userId = 'user-1'
export const accountId = 'account-1'

export async function createOrder(trx: Transaction<Database>, order: { item: string }): Promise<{ id: number }> {
  return trx.insertInto('orders').values({ item: order.item }).returning('id').executeTakeFirstOrThrow()
}

/** Takes one item off the shelf; throws when none is left. */
export async function reserveStock(trx: Transaction<Database>, order: { item: string }): Promise<void> {
  const taken = await trx
    .updateTable('stock')
    .set((eb) => ({ available: eb('available', '-', 1) }))
    .where('item', '=', order.item)
    .where('available', '>', 0)
    .executeTakeFirst()
  if (taken.numUpdatedRows === 0n) throw new Error(`${order.item} is out of stock`)
}

export interface RideRequest {
  user_id: string
  origin: string
  target: string
  price: number
}
export const rideRequest: RideRequest = { user_id: userId, origin: 'Home', target: 'Work', price: 1200 }

export async function insertRide(trx: Transaction<Database>, request: RideRequest) {
  return trx.insertInto('rides').values(request).returningAll().executeTakeFirstOrThrow()
}

export async function markCharged(trx: Transaction<Database>, rideId: number, chargeId: string): Promise<void> {
  await trx.updateTable('rides').set({ charge_id: chargeId }).where('id', '=', rideId).execute()
}

/** The payment provider, called with a key of its own so that a resumed flow charges once. */
export const payments = {
  async charge(ride: { price: number }, options: { idempotencyKey: string }): Promise<{ id: string }> {
    const intent = await stripe.paymentIntents.create({ amount: ride.price, currency: 'usd' }, options)
    return { id: intent.id }
  },
}
