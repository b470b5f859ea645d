import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { sql, type Kysely, type Transaction } from 'kysely'
import { createIdempotency, type Idempotency } from '../index.js'
import { migrationTables } from '../migrations/index.js'
import { locateServer, openDatabase, type DatabaseName } from '../test/support/databases.js'

/** The idempotency table of the benchmark, apart from any table an application uses. */
export const KEYS_TABLE = 'bench_keys'
const BUSINESS_TABLES = ['bench_orders', 'bench_order_lines', 'bench_ledger'] as const

export interface BenchDB {
  bench_orders: { id: string; customer: string; amount: number }
  bench_order_lines: { order_id: string; sku: string; quantity: number }
  bench_ledger: { order_id: string; account: string; amount: number }
}

/** A database under benchmark: a fresh schema, the idempotency store, and a way to leave nothing behind. */
export interface Bench {
  readonly database: DatabaseName
  readonly location: string
  readonly db: Kysely<BenchDB>
  readonly idempotency: Idempotency<BenchDB>
  /** Counts the side effects: rows in `bench_orders`. */
  orders(): Promise<number>
  /** Empties the business tables and the idempotency table. */
  reset(): Promise<void>
  close(): Promise<void>
}

/** Finds the database (failing with the env var to set), then creates the benchmark's tables in it. */
export async function openBench(database: DatabaseName, poolSize: number): Promise<Bench> {
  const location = database === 'sqlite' ? join(mkdtempSync(join(tmpdir(), 'kysely-idempotency-bench-')), 'bench.db') : await locateServer(database)
  const db = openDatabase(database, location, poolSize) as Kysely<BenchDB>
  const idempotency = createIdempotency({ db, tableName: KEYS_TABLE })
  await dropTables(db)
  await idempotency.migrate()
  const id = sql`varchar(36)`
  await db.schema
    .createTable('bench_orders')
    .addColumn('id', id, (c) => c.primaryKey())
    .addColumn('customer', 'varchar(64)')
    .addColumn('amount', 'integer')
    .execute()
  await db.schema
    .createTable('bench_order_lines')
    .addColumn('order_id', id)
    .addColumn('sku', 'varchar(64)')
    .addColumn('quantity', 'integer')
    .execute()
  await db.schema.createTable('bench_ledger').addColumn('order_id', id).addColumn('account', 'varchar(64)').addColumn('amount', 'integer').execute()
  return {
    database,
    location,
    db,
    idempotency,
    async orders() {
      const row = await db
        .selectFrom('bench_orders')
        .select((eb) => eb.fn.countAll<number | string | bigint>().as('n'))
        .executeTakeFirstOrThrow()
      return Number(row.n)
    },
    async reset() {
      for (const table of [...BUSINESS_TABLES, KEYS_TABLE]) await db.deleteFrom(table as keyof BenchDB).execute()
    },
    async close() {
      await dropTables(db)
      await db.destroy()
      if (database === 'sqlite') rmSync(dirname(location), { recursive: true, force: true })
    },
  }
}

/** The business transaction every path runs: an order, its line and a ledger entry. */
export async function placeOrder(trx: Transaction<BenchDB>, customer: string, amount: number): Promise<{ id: string; amount: number }> {
  const id = randomUUID()
  await trx.insertInto('bench_orders').values({ id, customer, amount }).execute()
  await trx.insertInto('bench_order_lines').values({ order_id: id, sku: 'sku-1', quantity: 1 }).execute()
  await trx.insertInto('bench_ledger').values({ order_id: id, account: customer, amount }).execute()
  return { id, amount }
}

async function dropTables(db: Kysely<BenchDB>): Promise<void> {
  const { migrationTableName, migrationLockTableName } = migrationTables(KEYS_TABLE)
  for (const table of [...BUSINESS_TABLES, KEYS_TABLE, migrationTableName, migrationLockTableName]) {
    await db.schema.dropTable(table).ifExists().execute()
  }
}

/** What {@link throughput} measured: completed calls per second, and the 99th percentile of their latency. */
export interface Throughput {
  readonly perSecond: number
  readonly p99Ms: number
}

/** Calls `op` from `clients` concurrent loops for `ms` milliseconds. */
export async function throughput(clients: number, ms: number, op: (client: number, n: number) => Promise<unknown>): Promise<Throughput> {
  const until = performance.now() + ms
  const started = performance.now()
  const latencies: number[] = []
  await Promise.all(
    Array.from({ length: clients }, async (_, client) => {
      for (let n = 0; performance.now() < until; n++) {
        const start = performance.now()
        await op(client, n)
        latencies.push(performance.now() - start)
      }
    }),
  )
  latencies.sort((a, b) => a - b)
  return {
    perSecond: latencies.length / ((performance.now() - started) / 1000),
    p99Ms: latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * 0.99))] ?? 0,
  }
}
