// Runs with no database server: SQLite in a file. `npm run quickstart` in this repository,
// or `node quick-start.mjs` in a project with kysely-idempotency, kysely and better-sqlite3.
import Database from 'better-sqlite3'
import { Kysely, SqliteDialect } from 'kysely'
import { createIdempotency } from 'kysely-idempotency'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const file = new Database(join(mkdtempSync(join(tmpdir(), 'quick-start-')), 'shop.db'))
file.pragma('journal_mode = WAL')
const db = new Kysely({ dialect: new SqliteDialect({ database: file }) })

const idempotency = createIdempotency({ db })
await idempotency.migrate()
await db.schema
  .createTable('orders')
  .addColumn('id', 'integer', (c) => c.primaryKey())
  .addColumn('item', 'text')
  .execute()

// What a POST /orders handler would do with the client's Idempotency-Key header.
const placeOrder = (key, body) =>
  idempotency.executeTransaction({ key, scope: 'customer-1', request: body }, async (trx) => {
    const order = await trx.insertInto('orders').values({ item: body.item }).returning('id').executeTakeFirstOrThrow()
    return { status: 201, orderId: order.id }
  })

console.log('first call:  ', await placeOrder('order-7f3a', { item: 'book' }))
console.log('client retry:', await placeOrder('order-7f3a', { item: 'book' }))
await placeOrder('order-7f3a', { item: 'pen' }).catch((err) => console.log('reused key:  ', err.name, err.status))
console.log('orders in the table:', (await db.selectFrom('orders').selectAll().execute()).length)
await db.destroy()
