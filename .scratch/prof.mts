import { Kysely, SqliteDialect, PostgresDialect } from 'kysely'
import Database from 'better-sqlite3'
import pg from 'pg'
import { createIdempotency } from '../index.js'
const which = process.argv[2] ?? 'sqlite'
const path = process.argv[3] ?? 'replay'
const db = which === 'sqlite'
  ? new Kysely<any>({ dialect: new SqliteDialect({ database: new Database('/tmp/prof.db') }) })
  : new Kysely<any>({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:5432/test', max: 8 }) }) })
const idem = createIdempotency<any>({ db, tableName: 'prof_keys' })
await idem.migrate()
await db.schema.createTable('prof_orders').ifNotExists().addColumn('id', 'integer').addColumn('v', 'text').execute()
const work = async (trx: any) => { await trx.insertInto('prof_orders').values({ id: 1, v: 'x' }).execute(); return { id: 1, amount: 42, items: ['a', 'b'] } }
const run = `${Date.now()}`
for (let i = 0; i < 200; i++) await idem.transaction(`r-${run}-${i}`, work)
const N = which === 'sqlite' ? 20000 : 8000
const t0 = performance.now()
const clients = which === 'sqlite' ? 1 : 8
await Promise.all(Array.from({ length: clients }, async (_, c) => {
  for (let i = 0; i < N / clients; i++) {
    if (path === 'replay') await idem.transaction(`r-${run}-${i % 200}`, work)
    else if (path === 'first') await idem.transaction(`f-${run}-${c}-${i}`, work)
    else await db.transaction().execute((trx) => idem.withIdempotency(trx, `w-${run}-${c}-${i}`, work))
  }
}))
console.log(which, path, Math.round(N / ((performance.now() - t0) / 1000)), 'ops/s')
await db.destroy()
