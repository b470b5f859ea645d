import express, { type Request, type Response } from 'express'
import Fastify, { type FastifyRequest } from 'fastify'
import type { Kysely } from 'kysely'
import { createIdempotency } from '../index.js'
import { idempotent } from '../express/index.js'
import { idempotent as fastifyIdempotent } from '../fastify/index.js'
import { openDatabase, type DatabaseName } from '../test/support/databases.js'
import { openRedisPeer, PeerRefusal } from './peers.js'
import { KEYS_TABLE, placeOrder, type BenchDB } from './support.js'

/**
 * The HTTP side of the benchmark, run in its own process so that the load generator does not
 * share its event loop: `node server.js DATABASE LOCATION POOL [REDIS_URL]`. It serves the routes
 * with Express and with Fastify, one port each, and sends both ports to the parent over IPC.
 * Every route runs the same three-insert transaction.
 */
const [database, location, pool, redisUrl] = process.argv.slice(2) as [DatabaseName, string, string, string | undefined]
const db = openDatabase(database, location, Number(pool)) as Kysely<BenchDB>
const idempotency = createIdempotency({ db, tableName: KEYS_TABLE })
const customer = (req: Request) => req.get('X-Customer') ?? 'bench'

const app = express()
app.use(express.json())

app.post('/plain', async (req, res, next) => {
  try {
    res.status(201).json(await db.transaction().execute((trx) => placeOrder(trx, customer(req), req.body.amount)))
  } catch (error) {
    next(error)
  }
})

app.post(
  '/idempotent',
  idempotent(idempotency, { scope: customer }, async (req, trx) => ({ status: 201, body: await placeOrder(trx, customer(req), req.body.amount) })),
)

if (redisUrl) {
  // @node-idempotency/express is not on the npm registry this project can reach; the peer is
  // used the way its core package documents for a middleware.
  const peer = await openRedisPeer(redisUrl)
  app.post('/peer', async (req: Request, res: Response, next) => {
    const request = { headers: req.headers, path: req.path, body: req.body as Record<string, unknown>, method: req.method }
    try {
      const answer = await peer.handle(request, () => db.transaction().execute((trx) => placeOrder(trx, customer(req), req.body.amount)))
      res.status(201).json(answer.body)
    } catch (error) {
      if (error instanceof PeerRefusal) res.status(error.status).json({ error: error.message })
      else next(error)
    }
  })
}

const fastify = Fastify()
const fastifyCustomer = (request: FastifyRequest) => (request.headers['x-customer'] as string | undefined) ?? 'bench'
const amount = (request: FastifyRequest) => (request.body as { amount: number }).amount
fastify.post('/plain', async (request, reply) => {
  reply.code(201)
  return db.transaction().execute((trx) => placeOrder(trx, fastifyCustomer(request), amount(request)))
})
fastify.post(
  '/idempotent',
  fastifyIdempotent(idempotency, { scope: fastifyCustomer }, async (request, trx) => ({
    status: 201,
    body: await placeOrder(trx, fastifyCustomer(request), amount(request)),
  })),
)
await fastify.listen({ port: 0, host: '127.0.0.1' })

const port = (address: ReturnType<typeof fastify.server.address>) => (typeof address === 'object' && address ? address.port : 0)
const server = app.listen(0, '127.0.0.1', () => {
  process.send?.({ port: port(server.address()), fastifyPort: port(fastify.server.address()) })
})
