/**
 * One app server of the soak: `node app.js ARGS_JSON`, forked by the soak so that it can be
 * killed, stalled and restarted. It serves a payments-like route in single-transaction mode and
 * a ride booking in atomic phases (a flow defined by name, with a pretend provider that records
 * every call it gets), runs the recovery worker, and sends its port to the parent over IPC.
 */
import express, { type NextFunction, type Request, type Response } from 'express'
import type { Kysely } from 'kysely'
import { idempotent, idempotentFlow, type HttpFlowRequest, type HttpResult } from '../express/index.js'
import { createIdempotency, type Flow } from '../index.js'
import { openDatabase } from '../test/support/databases.js'
import { SOAK_TABLES, type AppArgs, type SoakDB } from './schema.js'

const args = JSON.parse(process.argv[2]!) as AppArgs
const db = openDatabase(args.database, args.location, 8) as Kysely<SoakDB>
const idempotency = createIdempotency({ db, tableName: SOAK_TABLES.keys, lockTimeout: args.lockTimeout, conflictWait: 1000 })
const pause = () => new Promise((resolve) => setTimeout(resolve, Math.random() * 30))
const client = (req: Request) => req.get('x-client') ?? 'anonymous'

const ride = idempotency.defineFlow('ride', async (flow: Flow<SoakDB, HttpResult>, _request: HttpFlowRequest<{ amount: number }>) => {
  const k = `${flow.scope}:${flow.key}`
  const ride = await flow.phase('ride_created', async (trx) => {
    await trx.insertInto('soak_rides').values({ k, charged: 0 }).execute()
    await pause()
    const created = await trx
      .selectFrom('soak_rides')
      .select((eb) => eb.fn.max('id').as('id'))
      .where('k', '=', k)
      .executeTakeFirstOrThrow()
    return { id: Number(created.id) }
  })
  // The provider: it records every call with the key it was given, as a real one keeps them.
  const stepKey = flow.stepKey('charge')
  await flow.step('charge', async () => {
    await db.insertInto('soak_calls').values({ k, step_key: stepKey }).execute()
    await pause()
    return stepKey
  })
  await flow.phase('ride_charged', async (trx) => {
    await trx
      .updateTable('soak_rides')
      .set((eb) => ({ charged: eb('charged', '+', 1) }))
      .where('id', '=', ride.id)
      .execute()
  })
  return { status: 201, body: { ride: ride.id, charge: stepKey } }
})

const app = express()
app.use(express.json())
app.post(
  '/charges',
  idempotent(idempotency, { scope: client, required: true }, async (req, trx) => {
    const k = `${client(req)}:${req.get('idempotency-key')}`
    await trx
      .insertInto('soak_charges')
      .values({ k, amount: Number(req.body.amount) })
      .execute()
    await pause()
    return { status: 201, body: { charged: k, amount: Number(req.body.amount), at: Date.now() } }
  }),
)
app.post('/rides', idempotentFlow(idempotency, { scope: client, required: true }, ride))
// What the database or the process threw reaches no client: a client sees 503 and retries.
app.use((_error: unknown, _req: Request, res: Response, _next: NextFunction) => {
  res.status(503).set('Retry-After', '1').json({ error: 'unavailable' })
})

if (args.once) {
  // The route above is made all the same: the worker finishes its flow under the route's rules.
  await (args.once === 'prune' ? idempotency.prune() : idempotency.recover()).catch(() => undefined)
  await db.destroy()
  process.exit(0)
}
const worker = idempotency.startRecovery({ every: 300 })
const server = app.listen(0, '127.0.0.1', () => {
  const address = server.address()
  process.send?.({ port: typeof address === 'object' && address ? address.port : 0 })
})
process.on('SIGTERM', () => {
  void worker
    .stop()
    .then(() => db.destroy())
    .finally(() => process.exit(0))
})
