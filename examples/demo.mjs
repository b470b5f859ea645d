// A small payments API on SQLite (a file in a temp dir, no server needed).
//   npm run demo                 serve it and print curl lines to try
//   npm run demo -- --selftest   fire retries, a concurrent storm and a reused key at it
import Database from 'better-sqlite3'
import express from 'express'
import { Kysely, SqliteDialect } from 'kysely'
import { createIdempotency } from 'kysely-idempotency'
import { idempotent } from 'kysely-idempotency/express'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const selftest = process.argv.includes('--selftest')
const file = join(mkdtempSync(join(tmpdir(), 'kysely-idempotency-demo-')), 'payments.db')
const sqlite = new Database(file)
sqlite.pragma('journal_mode = WAL')
const db = new Kysely({ dialect: new SqliteDialect({ database: sqlite }) })

const idempotency = createIdempotency({ db })
await idempotency.migrate()
await db.schema
  .createTable('charges')
  .addColumn('id', 'integer', (c) => c.primaryKey())
  .addColumn('customer', 'text', (c) => c.notNull())
  .addColumn('amount', 'integer', (c) => c.notNull())
  .addColumn('currency', 'text', (c) => c.notNull())
  .execute()

const app = express()
app.use(express.json())
app.post(
  '/charges',
  idempotent(idempotency, { scope: (req) => req.get('X-Customer') ?? 'anonymous', required: true }, async (req, trx) => {
    const { amount, currency = 'usd' } = req.body ?? {}
    if (!Number.isInteger(amount) || amount <= 0) return { status: 400, body: { error: 'amount must be a positive integer (cents)' } }
    const customer = req.get('X-Customer') ?? 'anonymous'
    const charge = await trx.insertInto('charges').values({ customer, amount, currency }).returningAll().executeTakeFirstOrThrow()
    await new Promise((resolve) => setTimeout(resolve, 50)) // the card network takes its time
    return { status: 201, body: charge, headers: { Location: `/charges/${charge.id}` } }
  }),
)
app.get('/charges', async (_req, res) => res.json(await db.selectFrom('charges').selectAll().execute()))

const server = app.listen(selftest ? 0 : Number(process.env.PORT ?? 3000), '127.0.0.1')
await new Promise((resolve, reject) => server.once('listening', resolve).once('error', reject))
const url = `http://127.0.0.1:${server.address().port}`

if (!selftest) {
  console.log(`Payments API on ${url} (SQLite file ${file})

Charge, then retry with the same key: the second answer is a replay (Idempotency-Replayed: true).
  curl -i -X POST ${url}/charges -H 'Content-Type: application/json' -H 'X-Customer: alice' -H 'Idempotency-Key: order-1' -d '{"amount": 1500}'
Reuse the key for another amount: 422.
  curl -i -X POST ${url}/charges -H 'Content-Type: application/json' -H 'X-Customer: alice' -H 'Idempotency-Key: order-1' -d '{"amount": 9900}'
See what was charged:
  curl ${url}/charges

Ctrl-C to stop.`)
} else {
  const charge = (key, amount, customer = 'alice') =>
    fetch(`${url}/charges`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Customer': customer, ...(key ? { 'Idempotency-Key': key } : {}) },
      body: JSON.stringify({ amount }),
    })
  const line = async (label, response) => {
    const replayed = response.headers.get('Idempotency-Replayed') ? ' (replayed)' : ''
    console.log(`${label.padEnd(44)} ${response.status}${replayed} ${await response.text()}`)
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
  console.log(`${'20 concurrent requests, key order-2'.padEnd(44)} ${Object.entries(tally).map(([s, n]) => `${n}× ${s}`).join(', ')}`)
  outcomes.push(await line('same key order-1, another amount', await charge('order-1', 9900)))
  outcomes.push(await line('no Idempotency-Key', await charge(undefined, 100)))
  outcomes.push(await line('key order-1 from another customer', await charge('order-1', 1500, 'bob')))
  const charges = await db.selectFrom('charges').selectAll().execute()
  console.log(`\ncharges in the database: ${charges.length} (alice order-1, alice order-2, bob order-1)`)
  const ok = charges.length === 3 && outcomes.join() === '201,201,201,422,400,201' && storm.every((r) => r.status === 201 || r.status === 409)
  console.log(ok ? 'selftest passed: one charge per key and customer' : 'selftest FAILED')
  process.exitCode = ok ? 0 : 1
  server.close()
  await db.destroy()
}
