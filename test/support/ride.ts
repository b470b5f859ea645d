/**
 * The atomic-phases flow the tests drive, in the test process and in child processes: a ride
 * is created, a payment provider is charged (a foreign call), the ride is marked charged.
 * Every database write and every foreign call leaves a row in the fixture's effects table.
 */
import type { Kysely } from 'kysely'
import type { Flow } from '../../index.js'

/** Where a test may stop or stall the flow. */
export type RidePoint = 'begun' | 'creating_ride' | 'ride_created' | 'charge_called' | 'charge_created' | 'ride_charged'

export interface Ride {
  readonly status: number
  readonly ride: { readonly id: string }
  readonly charge: { readonly id: string }
}

/** Effect names, so that tests count them the way the flow writes them. */
export const rideEffects = (key: string) => ({ ride: `${key}:ride`, charged: `${key}:charged`, call: (stepKey: string) => `${key}:call:${stepKey}` })

/**
 * The flow body for `key`. `at` runs at every point, so a test can stall there or a child
 * process can wait there to be killed.
 */
export function rideFlow(db: Kysely<any>, effectsTable: string, key: string, at: (point: RidePoint) => Promise<void> = async () => {}) {
  const names = rideEffects(key)
  return async (flow: Flow<any, Ride>): Promise<Ride> => {
    await at('begun')
    const ride = await flow.phase('ride_created', async (trx) => {
      await trx.insertInto(effectsTable).values({ k: names.ride }).execute()
      await at('creating_ride')
      return { id: `ride-${key}` }
    })
    await at('ride_created')
    const charge = await flow.step('charge_created', async () => {
      await db
        .insertInto(effectsTable)
        .values({ k: names.call(flow.stepKey('charge_created')) })
        .execute()
      await at('charge_called')
      return { id: `ch-${flow.stepKey('charge_created')}` }
    })
    await at('charge_created')
    await flow.phase('ride_charged', async (trx) => {
      await trx.insertInto(effectsTable).values({ k: names.charged }).execute()
      return true
    })
    await at('ride_charged')
    return { status: 201, ride, charge }
  }
}
