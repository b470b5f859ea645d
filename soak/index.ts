/**
 * `npm run soak`: many app processes, clients that retry like real SDKs, and faults on a seeded
 * schedule, then a checker over the whole history. See "Scaling out" in the docs (docs/guide/scaling-out.md).
 */
import { fork, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { sql, type Kysely } from 'kysely'
import { createIdempotency } from '../index.js'
import { locateServer, openDatabase, type DatabaseName } from '../test/support/databases.js'
import { createTables, dropTables, SOAK_TABLES, type AppArgs, type SoakDB } from './schema.js'

const usage = `npm run soak -- --db postgres|mysql|sqlite [--seconds N] [--processes P] [--clients C] [--seed S]
                     [--through-pgbouncer URL] [--json FILE]
  Starts P app servers (Express; a payments route in one transaction, a ride booking in atomic
  phases with a pretend provider), drives them with C clients that retry like SDKs (timeouts,
  dropped answers, the same key, sometimes another body), and injects faults on a schedule
  seeded by S: SIGKILL and restart a server, stall one (SIGSTOP) past its lease, terminate
  database connections, run prune and the recovery worker from processes of their own. Then it
  checks the whole history and exits 1 on any violation, printing the seed to replay it.
  KIDEM_PG_URL and KIDEM_MYSQL_URL say where the servers are (default: the local ones).`

const { values } = parseArgs({
  options: {
    db: { type: 'string' },
    seconds: { type: 'string', default: '60' },
    processes: { type: 'string', default: '3' },
    clients: { type: 'string', default: '16' },
    seed: { type: 'string' },
    'through-pgbouncer': { type: 'string' },
    json: { type: 'string' },
    help: { type: 'boolean', default: false },
  },
})
if (values.help) {
  console.log(usage)
  process.exit(0)
}
const database = values.db as DatabaseName
if (!['postgres', 'mysql', 'sqlite'].includes(database)) fail(`--db must be postgres, mysql or sqlite.\n${usage}`)
const seconds = Number(values.seconds)
const processes = Number(values.processes)
const clients = Number(values.clients)
const seed = values.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(values.seed)
for (const [name, n] of [
  ['seconds', seconds],
  ['processes', processes],
  ['clients', clients],
  ['seed', seed],
] as const) {
  if (!Number.isFinite(n) || n < (name === 'seed' ? 0 : 1)) fail(`--${name} must be a positive number.\n${usage}`)
}
const pooler = values['through-pgbouncer']
if (pooler && database !== 'postgres') fail('--through-pgbouncer goes with --db postgres.')

/** How long an attempt owns a flow: short, so that stalls and kills lead to takeovers within the run. */
const LOCK_TIMEOUT = 1500
// The faults draw from a generator of their own, so that a seed always gives the same schedule
// of faults, whatever the clients' timing does to their draws.
const random = mulberry32(seed ^ 0x5bd1e995)
const schedule = mulberry32(seed)

function fail(message: string): never {
  console.error(message)
  process.exit(2)
}

/** A small, seedable PRNG (mulberry32): the same seed gives the same schedule of choices. */
function mulberry32(state: number): () => number {
  return () => {
    state = (state + 0x6d2b79f5) | 0
    let t = Math.imul(state ^ (state >>> 15), 1 | state)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
const between = (low: number, high: number, from: () => number = random) => low + from() * (high - low)
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

// ---- the database

const dir = database === 'sqlite' ? mkdtempSync(join(tmpdir(), 'kysely-idempotency-soak-')) : undefined
const location = dir ? join(dir, 'soak.db') : await locateServer(database as Exclude<DatabaseName, 'sqlite'>)
/** Where the apps connect: through the pooler when asked, and named so that the faults find their sessions. */
const appLocation = database === 'postgres' ? withApplicationName(pooler ?? location) : location
// One connection: the checker's own session is the one the faults never end.
const db = openDatabase(database, location, 1) as Kysely<SoakDB>
await createTables(db, database)
await createIdempotency({ db, tableName: SOAK_TABLES.keys }).migrate()

function withApplicationName(url: string): string {
  const parsed = new URL(url)
  parsed.searchParams.set('application_name', 'kidem-soak')
  return parsed.toString()
}

// ---- the app servers

const script = fileURLToPath(new URL('./app.js', import.meta.url))
const appArgs: AppArgs = { database, location: appLocation, lockTimeout: LOCK_TIMEOUT }

interface Server {
  child: ChildProcess
  url: string | undefined
  stalled: boolean
}

const servers: Server[] = []

async function startServer(index: number): Promise<void> {
  const child = fork(script, [JSON.stringify(appArgs)], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })
  const server: Server = { child, url: undefined, stalled: false }
  servers[index] = server
  const [message] = (await Promise.race([once(child, 'message'), once(child, 'exit').then(() => [{ port: 0 }])])) as [{ port: number }]
  if (message.port) server.url = `http://127.0.0.1:${message.port}`
}

/** Runs the app in a mode that does one thing and exits (a prune, a recovery pass), as its own process. */
async function runOnce(mode: 'prune' | 'recover'): Promise<void> {
  const child = fork(script, [JSON.stringify({ ...appArgs, once: mode })], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })
  await once(child, 'exit')
}

const live = () => servers.filter((s) => s.url && !s.stalled && s.child.exitCode === null && s.child.signalCode === null)

// ---- the history

interface Answer {
  readonly status: number
  readonly body: string
  readonly replayed: boolean
  readonly type: string
}

interface KeyHistory {
  readonly route: 'charges' | 'rides'
  readonly client: string
  readonly key: string
  readonly body: string
  readonly successes: Answer[]
}

const keys = new Map<string, KeyHistory>()
const figures = {
  requests: 0,
  retries: 0,
  dropped: 0,
  gaveUp: 0,
  reused: 0,
  statuses: {} as Record<string, number>,
  faults: {} as Record<string, number>,
}
const violations: string[] = []
const violation = (text: string) => violations.push(text)

/** Driver errors as they read: none of them may reach a client. */
const DRIVER_TEXT =
  /SQLITE_[A-Z]+|\bER_[A-Z_]{3,}|terminating connection|Connection terminated|ECONNRESET|[Dd]eadlock|[Ll]ock wait|syntax error|relation .* does not exist/

/** One request, as a client sends it; `undefined` when the answer never came (timeout, dropped, refused). */
async function send(route: 'charges' | 'rides', client: string, key: string, body: string, drop: boolean): Promise<Answer | undefined> {
  const targets = live()
  if (!targets.length) return undefined
  const server = targets[Math.floor(random() * targets.length)]!
  const controller = new AbortController()
  const timer = setTimeout(() => controller.abort(), drop ? between(1, 40) : 4000)
  figures.requests++
  try {
    const response = await fetch(`${server.url}/${route}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-client': client, 'idempotency-key': key },
      body,
      signal: controller.signal,
    })
    const text = await response.text()
    figures.statuses[response.status] = (figures.statuses[response.status] ?? 0) + 1
    const answer = {
      status: response.status,
      body: text,
      replayed: response.headers.get('idempotency-replayed') === 'true',
      type: response.headers.get('content-type') ?? '',
    }
    checkAnswer(route, key, answer)
    return answer
  } catch {
    if (drop) figures.dropped++
    return undefined
  } finally {
    clearTimeout(timer)
  }
}

/** What no answer may be: a raw error, a problem other than the ones a retry can meet. */
function checkAnswer(route: string, key: string, answer: Answer): void {
  if (DRIVER_TEXT.test(answer.body)) violation(`${route} ${key}: a driver error reached the client (${answer.status} ${answer.body.slice(0, 200)})`)
  if (answer.status >= 400 && answer.status < 500 && !answer.type.startsWith('application/problem+json')) {
    violation(`${route} ${key}: ${answer.status} without a problem document: ${answer.body.slice(0, 200)}`)
  }
  if (answer.status >= 500 && !(answer.status === 503 && answer.body === '{"error":"unavailable"}')) {
    violation(`${route} ${key}: ${answer.status} from the library: ${answer.body.slice(0, 200)}`)
  }
}

/** Sends a request until it gets an answer to keep, as an SDK does: same key, same body, back-off. */
async function untilAnswered(history: KeyHistory, stopBy: number): Promise<void> {
  for (let attempt = 0; Date.now() < stopBy && attempt < 40; attempt++) {
    if (attempt > 0) figures.retries++
    const answer = await send(history.route, history.client, history.key, history.body, random() < 0.1)
    if (answer && answer.status >= 200 && answer.status < 300) {
      history.successes.push(answer)
      return
    }
    if (answer && (answer.status === 422 || answer.status === 400)) {
      violation(`${history.route} ${history.key}: a retry with the same body was answered ${answer.status}: ${answer.body.slice(0, 200)}`)
      return
    }
    await sleep(Math.min(1000, 25 * 2 ** attempt) * between(0.5, 1))
  }
  figures.gaveUp++
}

async function client(name: string, until: number, stopBy: number): Promise<void> {
  for (let n = 0; Date.now() < until; n++) {
    const route = random() < 0.5 ? 'charges' : 'rides'
    const history: KeyHistory = {
      route,
      client: name,
      key: `${route}-${n}`,
      body: JSON.stringify({ amount: Math.floor(between(100, 10_000)) }),
      successes: [],
    }
    keys.set(`${name}:${history.key}`, history)
    // Now and then the same key at once from several places, as a retrying client with a slow answer does.
    const copies = random() < 0.1 ? 3 : 1
    await Promise.all(Array.from({ length: copies }, () => untilAnswered(history, stopBy)))
    if (history.successes.length && random() < 0.1) {
      figures.reused++
      const other = JSON.stringify({ amount: 1 + JSON.parse(history.body).amount })
      // A 503 (a killed backend, a stalled server) is no answer about the key: sent again, as a client would.
      let reuse = await send(route, name, history.key, other, false)
      for (let attempt = 0; reuse?.status === 503 && attempt < 5; attempt++) {
        await sleep(200)
        reuse = await send(route, name, history.key, other, false)
      }
      if (reuse && reuse.status !== 422 && reuse.status !== 503)
        violation(`${route} ${history.key}: reused with another body, answered ${reuse.status}`)
    }
  }
}

// ---- the faults

const FAULTS = database === 'sqlite' ? (['kill', 'stall', 'prune', 'recover'] as const) : (['kill', 'stall', 'backend', 'prune', 'recover'] as const)

async function fault(kind: (typeof FAULTS)[number], index: number): Promise<void> {
  figures.faults[kind] = (figures.faults[kind] ?? 0) + 1
  const server = servers[index]!
  switch (kind) {
    case 'kill':
      if (server.stalled) return
      server.child.kill('SIGKILL')
      await once(server.child, 'exit')
      await sleep(between(50, 400))
      return startServer(index)
    case 'stall':
      if (server.stalled || !server.url) return
      server.stalled = true
      server.child.kill('SIGSTOP')
      await sleep(LOCK_TIMEOUT + between(200, 1000))
      server.child.kill('SIGCONT')
      server.stalled = false
      return
    case 'backend':
      return endOneSession()
    case 'prune':
    case 'recover':
      return runOnce(kind)
  }
}

async function endOneSession(): Promise<void> {
  if (database === 'postgres') {
    const named = pooler ? sql`` : sql`and application_name = 'kidem-soak'`
    const { rows } = await sql<{ pid: number }>`
      select pid from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() and backend_type = 'client backend' ${named}`.execute(
      db,
    )
    const victim = rows[Math.floor(random() * rows.length)]
    if (victim) await sql`select pg_terminate_backend(${victim.pid})`.execute(db)
  } else {
    const { rows } = await sql<{ id: number }>`
      select id from information_schema.processlist where db = database() and id <> connection_id() and command <> 'Daemon'`.execute(db)
    const victim = rows[Math.floor(random() * rows.length)]
    if (victim) await sql`kill ${sql.lit(Number(victim.id))}`.execute(db).catch(() => undefined)
  }
}

/** Injects faults until `until`: every kind once per round, in an order the seed shuffles. */
async function faults(until: number): Promise<void> {
  for (;;) {
    const round = [...FAULTS]
    for (let i = round.length - 1; i > 0; i--) {
      const j = Math.floor(schedule() * (i + 1))
      ;[round[i], round[j]] = [round[j]!, round[i]!]
    }
    for (const kind of round) {
      await sleep(between(200, 800, schedule))
      if (Date.now() >= until) return
      // Faults overlap: one runs while the next is chosen.
      void fault(kind, Math.floor(schedule() * servers.length))
    }
  }
}

// ---- the run

const started = Date.now()
console.log(`soak on ${database}${pooler ? ' through PgBouncer' : ''}: ${processes} app processes, ${clients} clients, ${seconds} s, seed ${seed}`)
await Promise.all(Array.from({ length: processes }, (_, i) => startServer(i)))
const until = started + seconds * 1000
const stopBy = until + 30_000
await Promise.all([faults(until), ...Array.from({ length: clients }, (_, i) => client(`client-${i}`, until, stopBy))])

// Every fault has ended: stalled servers go on, dead ones come back, and the recovery workers
// get a lease's time and more to finish what the faults left.
for (const [i, server] of servers.entries()) {
  if (server.stalled) server.child.kill('SIGCONT')
  if (server.child.exitCode !== null || server.child.signalCode !== null) await startServer(i)
}
await sleep(LOCK_TIMEOUT + 500)
const idempotency = createIdempotency({ db, tableName: SOAK_TABLES.keys })
for (let waited = 0; waited < 20_000; waited += 250) {
  const counts = await idempotency.counts()
  if (counts.live === 0 && counts.abandoned === 0) break
  await sleep(250)
}

// ---- the checker

// Every key a client saw succeed answers the same bytes again; keys that never did are replayed or run now.
for (const history of keys.values()) {
  if (!history.successes.length) continue
  const first = history.successes[0]!
  for (const other of history.successes) {
    if (other.body !== first.body || other.status !== first.status)
      violation(`${history.route} ${history.key}: two different successes: ${first.body} / ${other.body}`)
  }
  const again = await send(history.route, history.client, history.key, history.body, false)
  if (!again || again.status !== first.status || again.body !== first.body || !again.replayed) {
    violation(
      `${history.route} ${history.key}: the stored answer (${again?.status} ${again?.body}) is not what the client saw (${first.status} ${first.body})`,
    )
  }
}

const countBy = async (table: 'soak_charges' | 'soak_rides' | 'soak_calls') =>
  new Map(
    (
      await db
        .selectFrom(table)
        .select(['k', (eb) => eb.fn.countAll<number | string>().as('n')])
        .groupBy('k')
        .execute()
    ).map((r) => [r.k, Number(r.n)]),
  )
const charges = await countBy('soak_charges')
const rides = await countBy('soak_rides')
const stepKeys = new Map(
  (
    await db
      .selectFrom('soak_calls')
      .select(['k', (eb) => eb.fn.count<number | string>('step_key').distinct().as('n')])
      .groupBy('k')
      .execute()
  ).map((r) => [r.k, Number(r.n)]),
)
const unpaid = await db.selectFrom('soak_rides').select(['k', 'charged']).where('charged', '<>', 1).execute()
for (const history of keys.values()) {
  const k = `${history.client}:${history.key}`
  const effects = (history.route === 'charges' ? charges : rides).get(k) ?? 0
  if (history.successes.length && effects !== 1)
    violation(`${history.route} ${k}: a client saw success, and the side effect happened ${effects} times`)
  if (!history.successes.length && effects > 1) violation(`${history.route} ${k}: the side effect happened ${effects} times`)
  if ((stepKeys.get(k) ?? 0) > 1) violation(`rides ${k}: the provider was called with ${stepKeys.get(k)} different step keys`)
}
for (const ride of unpaid) violation(`rides ${ride.k}: marked charged ${ride.charged} times once all flows were finished`)
const leftovers = await idempotency.counts()
if (leftovers.live || leftovers.abandoned)
  violation(`after the recovery worker's last pass, ${leftovers.live} keys are still locked and ${leftovers.abandoned} half-done`)

// ---- the report

for (const server of servers) server.child.kill('SIGTERM')
await Promise.all(servers.map((s) => (s.child.exitCode === null && s.child.signalCode === null ? once(s.child, 'exit') : undefined)))
const report = {
  database,
  throughPgBouncer: Boolean(pooler),
  seed,
  seconds,
  processes,
  clients,
  keys: keys.size,
  succeeded: [...keys.values()].filter((k) => k.successes.length).length,
  ...figures,
  sideEffects: {
    charges: [...charges.values()].reduce((a, b) => a + b, 0),
    rides: [...rides.values()].reduce((a, b) => a + b, 0),
    providerCalls: [...stepKeys.values()].length,
  },
  violations,
  elapsedMs: Date.now() - started,
}
console.log(
  `  ${report.requests} requests (${report.retries} retries, ${report.dropped} answers dropped), ${report.keys} keys (${report.succeeded} answered, ${report.gaveUp} given up), ${report.reused} reused with another body`,
)
console.log(
  `  statuses: ${Object.entries(report.statuses)
    .map(([s, n]) => `${n}× ${s}`)
    .join(', ')}`,
)
console.log(
  `  faults: ${
    Object.entries(report.faults)
      .map(([f, n]) => `${n}× ${f}`)
      .join(', ') || 'none'
  }`,
)
console.log(`  side effects: ${report.sideEffects.charges} charges, ${report.sideEffects.rides} rides`)
if (values.json) writeFileSync(values.json, `${JSON.stringify(report, null, 2)}\n`)
await dropTables(db)
await db.destroy()
if (dir) rmSync(dirname(location), { recursive: true, force: true })
if (violations.length) {
  console.log(`  ${violations.length} VIOLATIONS (replay with --seed ${seed}):`)
  for (const v of violations.slice(0, 30)) console.log(`    ${v}`)
  process.exitCode = 1
} else {
  console.log('  no violations')
}
