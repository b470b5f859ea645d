import { writeFileSync } from 'node:fs'
import { availableParallelism, cpus, totalmem } from 'node:os'
import { parseArgs } from 'node:util'
import { sql, type Kysely } from 'kysely'
import { createIdempotency } from '../index.js'
import { openDatabase } from '../test/support/databases.js'
import { measureCodecs, printCodecs } from './codec.js'
import { measureRoutes, startServer, storm, type RouteFigures, type StormFigures } from './http.js'
import { KEYS_TABLE, openBench, type Bench, type BenchDB } from './support.js'
import { openDbosPeer, openRedisPeer } from './peers.js'
import { startPooler } from './pooler.js'
import { measureTransactions, PATHS, type PathName, type TransactionFigures } from './transactions.js'

const usage = `npm run bench -- [--json FILE] [--seconds N] [--rounds N] [--only codec,postgres,mysql,sqlite] [--skip-http] [--skip-peers]
  Measures the value codecs (superjson, devalue, JSON: fidelity, time, size), then, on each
  database: a bare three-insert transaction against the same transaction through
  kysely-idempotency (first executions and replays) and against the library's statements sent
  by hand (raw SQL, claim first and claim last); on Postgres also the peers (a DBOS Transact
  workflow and @node-idempotency/core with Redis) and, when PgBouncer is installed, the rows
  through it; then the Express and Fastify routes against plain ones and the Redis peer
  (Postgres), and a duplicate storm. KIDEM_PG_URL, KIDEM_MYSQL_URL, KIDEM_REDIS_URL and
  KIDEM_PGBOUNCER_URL say where the servers are (default: the local ones, and a PgBouncer of
  its own).`

const { values } = parseArgs({
  options: {
    json: { type: 'string' },
    seconds: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '3' },
    only: { type: 'string', default: 'codec,postgres,mysql,sqlite' },
    'skip-http': { type: 'boolean', default: false },
    'skip-peers': { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
})
if (values.help) {
  console.log(usage)
  process.exit(0)
}
const seconds = Number(values.seconds)
const rounds = Number(values.rounds)
const only = values.only.split(',').map((name) => name.trim())
for (const name of only) {
  if (!['codec', 'postgres', 'mysql', 'sqlite'].includes(name))
    throw new Error(`--only takes codec, postgres, mysql and sqlite, not "${name}".\n${usage}`)
}
const selected = only.filter((name) => name !== 'codec') as Array<'postgres' | 'mysql' | 'sqlite'>
const redisUrl = process.env.KIDEM_REDIS_URL ?? 'redis://127.0.0.1:6379'

const fmt = (n: number, digits = 0) => n.toFixed(digits).padStart(8)
const machine = {
  cpus: availableParallelism(),
  cpu: cpus()[0]?.model ?? 'unknown',
  memoryGiB: Math.round(totalmem() / 2 ** 30),
  node: process.version,
  servers: {} as Record<string, string>,
}
const transactions: TransactionFigures[] = []
const http: RouteFigures[] = []
const storms: StormFigures[] = []

console.log(`kysely-idempotency benchmark: ${machine.cpus} cores (${machine.cpu}), Node ${machine.node}, ${seconds} s × ${rounds} rounds per path\n`)
const codecs = only.includes('codec') ? measureCodecs() : undefined
if (codecs) printCodecs(codecs)
for (const database of selected) {
  // SQLite has one writer: more clients would only queue on its lock.
  const clients = database === 'sqlite' ? 1 : 8
  const bench = await openBench(database, clients)
  try {
    machine.servers[database] = await serverVersion(bench)
    const mariadb = machine.servers[database].includes('MariaDB')
    const measure = { clients, seconds, rounds, mariadb }
    if (database === 'postgres' && !values['skip-peers']) {
      const dbos = await openDbosPeer(bench.location, clients)
      const redis = await openRedisPeer(redisUrl)
      try {
        report(await measureTransactions({ ...bench, via: 'direct' }, { ...measure, peers: { dbos, redis } }))
      } finally {
        await redis.close()
        await dbos.close()
      }
    } else {
      report(await measureTransactions({ ...bench, via: 'direct' }, measure))
    }
    if (database === 'postgres') {
      const pooler = await startPooler(bench.location)
      if (!pooler) console.log('PgBouncer is not installed (apt-get install pgbouncer, or set KIDEM_PGBOUNCER_URL): no rows through it.\n')
      else {
        machine.servers.pgbouncer = pooler.origin
        const db = openDatabase('postgres', pooler.url, clients) as Kysely<BenchDB>
        try {
          const idempotency = createIdempotency({ db, tableName: KEYS_TABLE })
          report(await measureTransactions({ database, location: pooler.url, db, idempotency, via: 'PgBouncer' }, measure))
        } finally {
          await db.destroy()
          await pooler.stop()
        }
      }
    }

    if (!values['skip-http']) {
      await bench.reset()
      const server = await startServer(bench, clients, database === 'postgres' ? redisUrl : undefined)
      try {
        if (database === 'postgres') {
          console.log(`Express and Fastify on ${database}, autocannon with 8 connections, ${seconds} s × ${rounds} rounds per route`)
          for (const r of await measureRoutes(server, 8, seconds, rounds)) {
            http.push(r)
            const failures = r.non2xx + r.errors ? `  (${r.non2xx} non-2xx, ${r.errors} errors)` : ''
            console.log(`  ${r.route.padEnd(66)}${fmt(r.requestsPerSecond)} req/s  p50 ${fmt(r.p50, 1)} ms  p99 ${fmt(r.p99, 1)} ms${failures}`)
          }
          console.log()
        }
        const s = await storm(bench, server, 1000, 100, 50)
        storms.push(s)
        const statuses = Object.entries(s.statuses)
          .map(([status, n]) => `${n}× ${status}`)
          .join(', ')
        const verdict = s.sideEffects === s.keys ? 'one per key' : `EXPECTED ${s.keys}`
        console.log(`Duplicate storm on ${database}: ${s.requests} requests over ${s.keys} keys at concurrency ${s.concurrency}`)
        console.log(`  drained in ${s.drainMs.toFixed(0)} ms; ${statuses}; ${s.replayed} replayed; ${s.sideEffects} orders (${verdict})\n`)
      } finally {
        await server.stop()
      }
    }
  } finally {
    await bench.close()
  }
}

if (values.json) {
  writeFileSync(
    values.json,
    `${JSON.stringify({ date: new Date().toISOString(), machine, seconds, rounds, codecs, transactions, http, storms }, null, 2)}\n`,
  )
  console.log(`Figures written to ${values.json}`)
}
if (storms.some((s) => s.sideEffects !== s.keys)) {
  console.error('A duplicate storm made a different number of orders than it had keys.')
  process.exitCode = 1
}

/** Prints one target's paths and ratios, and keeps its figures. */
function report(figures: TransactionFigures): void {
  transactions.push(figures)
  const { database, via, clients, paths, statements } = figures
  console.log(`${database} ${machine.servers[database]}${via === 'direct' ? '' : ` through ${via}`}, ${clients} client${clients > 1 ? 's' : ''}`)
  console.log(`  ${'path'.padEnd(58)}${'ops/s'.padStart(8)} ${'rounds'.padStart(13)} ${'p99 ms'.padStart(7)} ${'/a'.padStart(5)}  statements`)
  for (const name of Object.keys(PATHS) as PathName[]) {
    const path = paths[name]
    if (!path) continue
    const spread = `${Math.round(Math.min(...path.rounds))}–${Math.round(Math.max(...path.rounds))}`.padStart(13)
    const sent =
      name in statements ? `${statements[name as keyof typeof statements].length}: ${statements[name as keyof typeof statements].join(' ')}` : ''
    console.log(
      `  ${PATHS[name].padEnd(58)}${fmt(path.opsPerSecond)} ${spread} ${path.p99Ms.toFixed(1).padStart(7)} ${path.toBare.toFixed(2).padStart(5)}  ${sent}`,
    )
  }
  const same = figures.rawIsLibrarySql ? 'r sends the same SQL as b' : 'r DIFFERS from the SQL of b'
  console.log(`  efficiency (b/a ÷ r/a) ${figures.efficiency.toFixed(2)}   claim-last gain (r'/r) ${figures.claimLastGain.toFixed(2)}   (${same})\n`)
}

async function serverVersion(bench: Bench): Promise<string> {
  const query =
    bench.database === 'sqlite' ? sql<{ v: string }>`select 'SQLite ' || sqlite_version() as v` : sql<{ v: string }>`select version() as v`
  const { rows } = await query.execute(bench.db)
  const text = rows[0]?.v ?? ''
  return bench.database === 'postgres' ? (/PostgreSQL [\d.]+/.exec(text)?.[0] ?? text) : bench.database === 'mysql' ? `MySQL/MariaDB ${text}` : text
}
