// A small payments API on an embedded database (no server needed): SQLite (better-sqlite3, a
// file in a temp dir), or PostgreSQL itself compiled to WebAssembly (PGlite, a folder in a temp
// dir), on the framework of your choice: Express, Fastify, or a plain Fetch API handler (what
// Hono, Next.js, Bun and Deno run).
//   npm run demo                                  serve it with Express on SQLite and print curl lines to try
//   npm run demo -- --framework fastify|fetch     the same API on another framework
//   npm run demo -- --db pglite                   the same API on PostgreSQL (PGlite, in process)
//   npm run demo -- --selftest                    fire retries, a storm and a reused key at each framework,
//                                                 then kill a process in the middle of a flow and let the
//                                                 recovery worker finish it
import { Kysely, SqliteDialect } from 'kysely'
import { createIdempotency } from 'kysely-idempotency'
import { fork } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const FRAMEWORKS = ['express', 'fastify', 'fetch']
const DATABASES = ['sqlite', 'pglite']
const selftest = process.argv.includes('--selftest')
const option = (name, choices, fallback) => {
  if (!process.argv.includes(name)) return fallback
  const value = process.argv[process.argv.indexOf(name) + 1]
  if (choices.includes(value)) return value
  console.error(`${name} must be one of ${choices.join(', ')}`)
  process.exit(1)
}
const chosen = option('--framework', FRAMEWORKS, undefined)
const database = option('--db', DATABASES, 'sqlite')

/** The demo's database, a file (SQLite) or a folder (PGlite); the driver is loaded only when used. */
const engines = {
  sqlite: {
    where: () => join(mkdtempSync(join(tmpdir(), 'kysely-idempotency-demo-')), 'payments.db'),
    async dialect(file) {
      const { default: Database } = await import('better-sqlite3')
      const sqlite = new Database(file)
      sqlite.pragma('journal_mode = WAL')
      return new SqliteDialect({ database: sqlite })
    },
  },
  pglite: {
    where: () => mkdtempSync(join(tmpdir(), 'kysely-idempotency-demo-pglite-')),
    async dialect(folder) {
      // Kysely 0.29 ships PGliteDialect; one process at a time opens the folder.
      const [{ PGlite }, { PGliteDialect }] = await Promise.all([import('@electric-sql/pglite'), import('kysely')])
      return new PGliteDialect({ pglite: new PGlite(folder) })
    },
  },
}

/** A fresh database with the idempotency table and the charges table (or the one in `existing`). */
async function open(existing) {
  const file = existing ?? engines[database].where()
  const db = new Kysely({ dialect: await engines[database].dialect(file) })
  const idempotency = createIdempotency({ db, lockTimeout: 1000 })
  if (existing) return { file, db, idempotency }
  await idempotency.migrate()
  await db.schema
    .createTable('charges')
    .addColumn('id', database === 'pglite' ? 'serial' : 'integer', (c) => c.primaryKey())
    .addColumn('customer', 'text', (c) => c.notNull())
    .addColumn('amount', 'integer', (c) => c.notNull())
    .addColumn('currency', 'text', (c) => c.notNull())
    .execute()
  return { file, db, idempotency }
}

/** The route's work, the same on every framework. */
async function createCharge(trx, customer, body) {
  const { amount, currency = 'usd' } = body ?? {}
  if (!Number.isInteger(amount) || amount <= 0) return { status: 400, body: { error: 'amount must be a positive integer (cents)' } }
  const charge = await trx.insertInto('charges').values({ customer, amount, currency }).returningAll().executeTakeFirstOrThrow()
  await new Promise((resolve) => setTimeout(resolve, 50)) // the card network takes its time
  return { status: 201, body: charge, headers: { Location: `/charges/${charge.id}` } }
}

/** Each framework serves POST /charges (idempotent) and GET /charges; returns the listening server. */
const serve = {
  async express({ db, idempotency }, port) {
    const { default: express } = await import('express')
    const { idempotent } = await import('kysely-idempotency/express')
    const app = express()
    app.use(express.json())
    const customer = (req) => req.get('X-Customer') ?? 'anonymous'
    app.post(
      '/charges',
      idempotent(idempotency, { scope: customer, required: true }, (req, trx) => createCharge(trx, customer(req), req.body)),
    )
    app.get('/charges', async (_req, res) => res.json(await db.selectFrom('charges').selectAll().execute()))
    return listen(app.listen(port, '127.0.0.1'))
  },
  async fastify({ db, idempotency }, port) {
    const { default: Fastify } = await import('fastify')
    const { idempotent } = await import('kysely-idempotency/fastify')
    const app = Fastify()
    const customer = (request) => request.headers['x-customer'] ?? 'anonymous'
    app.post(
      '/charges',
      idempotent(idempotency, { scope: customer, required: true }, (request, trx) => createCharge(trx, customer(request), request.body)),
    )
    app.get('/charges', async () => db.selectFrom('charges').selectAll().execute())
    await app.listen({ port, host: '127.0.0.1' })
    return app.server
  },
  async fetch({ db, idempotency }, port) {
    const { idempotent } = await import('kysely-idempotency/fetch')
    const customer = (request) => request.headers.get('X-Customer') ?? 'anonymous'
    const charges = idempotent(idempotency, { scope: customer, required: true }, async (request, trx) =>
      createCharge(trx, customer(request), await request.json().catch(() => undefined)),
    )
    // Bun.serve({ fetch }) or Deno.serve(fetch) would take this function as it is; Node needs a bridge.
    const fetch = async (request) =>
      request.method === 'POST' ? charges(request) : Response.json(await db.selectFrom('charges').selectAll().execute())
    return listen(
      createServer(async (req, res) => {
        const chunks = []
        for await (const chunk of req) chunks.push(chunk)
        const body = req.method === 'GET' ? undefined : Buffer.concat(chunks)
        const response = await fetch(new Request(`http://${req.headers.host}${req.url}`, { method: req.method, headers: req.headers, body }))
        res.writeHead(response.status, [...response.headers].flat())
        res.end(Buffer.from(await response.arrayBuffer()))
      }).listen(port, '127.0.0.1'),
    )
  },
}

async function listen(server) {
  await new Promise((resolve, reject) => server.once('listening', resolve).once('error', reject))
  return server
}

/**
 * A ride booking of atomic phases, defined by name so that the recovery worker can finish it:
 * the ride is written, the card is charged at a (pretend) provider with a stable key, and the
 * ride is marked paid. With `crash`, the process dies right after the provider answered.
 */
function defineBooking(idempotency, crash = false) {
  return idempotency.defineFlow('book-ride', async (flow, request) => {
    const ride = await flow.phase('ride_created', (trx) =>
      trx
        .insertInto('charges')
        .values({ customer: request.customer, amount: request.amount, currency: 'ride' })
        .returningAll()
        .executeTakeFirstOrThrow(),
    )
    const payment = await flow.step('card_charged', async () => ({ provider: 'pretend-pay', reference: flow.stepKey('card_charged') }))
    if (crash) process.kill(process.pid, 'SIGKILL')
    await flow.phase('ride_paid', (trx) => trx.updateTable('charges').set({ currency: 'ride-paid' }).where('id', '=', ride.id).execute())
    return { status: 201, body: { ride: ride.id, payment } }
  })
}

const crashChild = process.argv.includes('--crash-child') ? process.argv[process.argv.indexOf('--crash-child') + 1] : undefined
if (crashChild) {
  const { idempotency } = await open(crashChild)
  await defineBooking(idempotency, true).run({ key: 'ride-1', scope: 'alice', request: { customer: 'alice', amount: 2300 } })
} else if (!selftest) {
  const framework = chosen ?? 'express'
  const opened = await open()
  const server = await serve[framework](opened, Number(process.env.PORT ?? 3000))
  const url = `http://127.0.0.1:${server.address().port}`
  console.log(`Payments API on ${url} (${framework}; ${database === 'pglite' ? 'PGlite folder' : 'SQLite file'} ${opened.file})

Charge, then retry with the same key: the second answer is a replay (Idempotency-Replayed: true).
  curl -i -X POST ${url}/charges -H 'Content-Type: application/json' -H 'X-Customer: alice' -H 'Idempotency-Key: order-1' -d '{"amount": 1500}'
Reuse the key for another amount: 422.
  curl -i -X POST ${url}/charges -H 'Content-Type: application/json' -H 'X-Customer: alice' -H 'Idempotency-Key: order-1' -d '{"amount": 9900}'
See what was charged:
  curl ${url}/charges

Ctrl-C to stop.`)
} else {
  let failed = false
  for (const framework of chosen ? [chosen] : FRAMEWORKS) {
    const opened = await open()
    const server = await serve[framework](opened, 0)
    console.log(`${framework} on ${database}:`)
    failed = !(await check(opened.db, `http://127.0.0.1:${server.address().port}`)) || failed
    await new Promise((resolve) => server.close(resolve))
    await opened.db.destroy()
  }
  failed = !(await crashAndRecover()) || failed
  console.log(failed ? 'selftest FAILED' : 'selftest passed: one charge per key and customer, and the killed flow finished once')
  process.exitCode = failed ? 1 : 0
}

/** Kills a process in the middle of a booking, then lets the recovery worker of this one finish it. */
async function crashAndRecover() {
  // Made here, then left to the booking process (a PGlite folder is open in one process at a time).
  const made = await open()
  await made.db.destroy()
  console.log('a process dies in the middle of a flow; the recovery worker finishes it:')
  const child = fork(fileURLToPath(import.meta.url), ['--crash-child', made.file, '--db', database])
  const [, signal] = await new Promise((resolve) => child.once('exit', (...ended) => resolve(ended)))
  const { db, idempotency } = await open(made.file)
  const stopped = await idempotency.inspect({ key: 'ride-1', scope: 'alice' })
  console.log(`  ${'the booking process'.padEnd(42)} killed (${signal}) at "${stopped?.recoveryPoint}", its key ${stopped?.state}`)
  const booking = defineBooking(idempotency)
  const worker = idempotency.startRecovery({ every: 100 })
  let state = stopped?.state
  for (let waited = 0; state !== 'finished' && waited < 5000; waited += 100) {
    await new Promise((resolve) => setTimeout(resolve, 100))
    state = (await idempotency.inspect({ key: 'ride-1', scope: 'alice' }))?.state
  }
  await worker.stop()
  console.log(`  ${'after the lock ran out, the worker'.padEnd(42)} ${state === 'finished' ? 'finished it' : `left it ${state}`}`)
  const retry = await booking.executeRun({ key: 'ride-1', scope: 'alice', request: { customer: 'alice', amount: 2300 } })
  console.log(`  ${"the client's retry".padEnd(42)} ${retry.value.status}${retry.replayed ? ' (replayed)' : ''} ${JSON.stringify(retry.value.body)}`)
  const rides = await db.selectFrom('charges').selectAll().execute()
  console.log(`  rides in the database: ${rides.length}, ${rides.map((r) => r.currency).join(', ')}\n`)
  await db.destroy()
  return state === 'finished' && retry.replayed && rides.length === 1 && rides[0].currency === 'ride-paid'
}

/** Retries, a storm and a reused key against one server; whether each got what it should. */
async function check(db, url) {
  const charge = (key, amount, customer = 'alice') =>
    fetch(`${url}/charges`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Customer': customer, ...(key ? { 'Idempotency-Key': key } : {}) },
      body: JSON.stringify({ amount }),
    })
  const line = async (label, response) => {
    const replayed = response.headers.get('Idempotency-Replayed') ? ' (replayed)' : ''
    console.log(`  ${label.padEnd(42)} ${response.status}${replayed} ${await response.text()}`)
    return response.status
  }
  const outcomes = []
  outcomes.push(await line('first attempt, key order-1', await charge('order-1', 1500)))
  outcomes.push(await line('retry, key order-1', await charge('order-1', 1500)))
  outcomes.push(await line('retry again, quoted "order-1"', await charge('"order-1"', 1500)))
  const storm = await Promise.all(Array.from({ length: 20 }, () => charge('order-2', 2500)))
  const tally = {}
  for (const r of storm) {
    const outcome = `${r.status}${r.headers.get('Idempotency-Replayed') ? ' replayed' : ''}`
    tally[outcome] = (tally[outcome] ?? 0) + 1
  }
  console.log(
    `  ${'20 concurrent requests, key order-2'.padEnd(42)} ${Object.entries(tally)
      .map(([s, n]) => `${n}× ${s}`)
      .join(', ')}`,
  )
  outcomes.push(await line('same key order-1, another amount', await charge('order-1', 9900)))
  outcomes.push(await line('no Idempotency-Key', await charge(undefined, 100)))
  outcomes.push(await line('key order-1 from another customer', await charge('order-1', 1500, 'bob')))
  const charges = await db.selectFrom('charges').selectAll().execute()
  console.log(`  charges in the database: ${charges.length} (alice order-1, alice order-2, bob order-1)\n`)
  return charges.length === 3 && outcomes.join() === '201,201,201,422,400,201' && storm.every((r) => r.status === 201 || r.status === 409)
}
