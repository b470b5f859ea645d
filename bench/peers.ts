import { randomUUID } from 'node:crypto'
import { DBOS } from '@dbos-inc/dbos-sdk'
import { PostgresDataSource } from '@dbos-inc/postgres-datasource'
import { Idempotency as PeerIdempotency, IdempotencyError, IdempotencyErrorCodes, type IdempotencyParams } from '@node-idempotency/core'
import { RedisStorageAdapter } from '@node-idempotency/storage-adapter-redis'
import pg from 'pg'

// The other ways of doing the same job that the benchmark runs beside the library.

/** A request the Redis peer refused (another one with its key in progress, or a different request): the HTTP status to answer. */
export class PeerRefusal extends Error {
  constructor(
    readonly status: 409 | 422,
    message: string,
  ) {
    super(message)
  }
}

/** `@node-idempotency/core` with its Redis adapter, used the way its middleware is: look up before the handler, record after it. */
export interface RedisPeer {
  /** Answers the stored body for the request's key, else runs `run` and records its body. */
  handle(request: IdempotencyParams, run: () => Promise<unknown>): Promise<{ readonly body: unknown; readonly replayed: boolean }>
  close(): Promise<void>
}

export async function openRedisPeer(url: string): Promise<RedisPeer> {
  const storage = new RedisStorageAdapter({ url })
  await storage.connect()
  const peer = new PeerIdempotency(storage, { cacheTTLMS: 24 * 3600 * 1000 })
  return {
    async handle(request, run) {
      let stored: Awaited<ReturnType<typeof peer.onRequest<unknown, unknown>>>
      try {
        stored = await peer.onRequest<unknown, unknown>(request)
      } catch (error) {
        const busy = error instanceof IdempotencyError && error.code === IdempotencyErrorCodes.REQUEST_IN_PROGRESS
        throw new PeerRefusal(busy ? 409 : 422, (error as Error).message)
      }
      if (stored) return { body: stored.body, replayed: true }
      const body = await run()
      await peer.onResponse(request, { body, additional: { status: 201 } })
      return { body, replayed: false }
    },
    close: () => storage.disconnect(),
  }
}

/** The three-insert business transaction, written for the DBOS data source's client (postgres.js). */
export interface DbosOrder {
  readonly id: string
  readonly amount: number
}

/**
 * DBOS Transact: a workflow whose ID is the idempotency key, with one transaction step on the
 * Postgres data source, which records the step's output in the same transaction as its writes.
 * A second start with the same workflow ID returns the recorded result. DBOS is one per process.
 */
export interface DbosPeer {
  order(key: string, customer: string, amount: number): Promise<DbosOrder>
  close(): Promise<void>
}

/** The database DBOS keeps its workflows in, beside the application's (created by `DBOS.launch`). */
const SYSTEM_DATABASE = 'kidem_bench_dbos'
/** The schema the data source keeps step outputs in, inside the application's database. */
const STEP_SCHEMA = 'kidem_bench_dbos'

export async function openDbosPeer(location: string, poolSize: number): Promise<DbosPeer> {
  const url = new URL(location)
  const options = {
    host: url.hostname,
    port: Number(url.port || 5432),
    user: decodeURIComponent(url.username) || 'postgres',
    password: decodeURIComponent(url.password) || undefined,
    database: url.pathname.slice(1) || 'postgres',
    max: poolSize,
    onnotice: () => {},
  }
  await PostgresDataSource.initializeDBOSSchema(options, STEP_SCHEMA)
  const source = new PostgresDataSource('bench', options, STEP_SCHEMA)
  const placeOrder = source.registerTransaction(
    async (customer: string, amount: number): Promise<DbosOrder> => {
      const id = randomUUID()
      const client = source.client
      await client`insert into bench_orders (id, customer, amount) values (${id}, ${customer}, ${amount})`
      await client`insert into bench_order_lines (order_id, sku, quantity) values (${id}, ${'sku-1'}, ${1})`
      await client`insert into bench_ledger (order_id, account, amount) values (${id}, ${customer}, ${amount})`
      return { id, amount }
    },
    { name: 'placeOrder' },
  )
  const workflow = DBOS.registerWorkflow((customer: string, amount: number) => placeOrder(customer, amount), { name: 'order' })
  const system = new URL(location)
  system.pathname = `/${SYSTEM_DATABASE}`
  DBOS.setConfig({
    name: 'kysely-idempotency-bench',
    systemDatabaseUrl: system.href,
    systemDatabasePoolSize: poolSize,
    logLevel: 'error',
    runAdminServer: false,
  })
  await DBOS.launch()
  return {
    order: (key, customer, amount) => DBOS.withNextWorkflowID(key, () => workflow(customer, amount)),
    async close() {
      await DBOS.shutdown({ deregister: true })
      const admin = new pg.Client({ connectionString: location })
      await admin.connect()
      try {
        await admin.query(`drop schema if exists ${STEP_SCHEMA} cascade`)
        await admin.query(`drop database if exists ${SYSTEM_DATABASE} with (force)`)
      } finally {
        await admin.end()
      }
    },
  }
}
