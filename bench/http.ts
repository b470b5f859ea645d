import { fork, type ChildProcess } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import type { Bench } from './support.js'

/** A benchmark server in a child process, and how to reach it. */
export interface Server {
  /** The Express app. */
  readonly url: string
  /** The same routes (but the peer's) on Fastify. */
  readonly fastifyUrl: string
  stop(): Promise<void>
}

/** Starts `server.js` against the bench's database; with `redisUrl`, also the peer's route. */
export async function startServer(bench: Bench, pool: number, redisUrl?: string): Promise<Server> {
  const script = fileURLToPath(new URL('./server.js', import.meta.url))
  const child: ChildProcess = fork(script, [bench.database, bench.location, String(pool), ...(redisUrl ? [redisUrl] : [])], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  })
  const [message] = (await Promise.race([
    once(child, 'message'),
    once(child, 'exit').then(([code]) => Promise.reject(new Error(`The benchmark server exited with code ${code} before listening.`))),
  ])) as [{ port: number; fastifyPort: number }]
  return {
    url: `http://127.0.0.1:${message.port}`,
    fastifyUrl: `http://127.0.0.1:${message.fastifyPort}`,
    async stop() {
      child.kill()
      await once(child, 'exit')
    },
  }
}

export interface RouteFigures {
  readonly route: string
  readonly requestsPerSecond: number
  readonly p50: number
  readonly p99: number
  readonly non2xx: number
  readonly errors: number
}

/** Replayable keys made on each replay route before measuring. */
const REPLAY_KEYS = 500

/** Each route, and how its requests are keyed: a new key per request, or a key made before (replays). */
export const ROUTES = [
  { route: 'Express: plain route (bare transaction)', path: '/plain', key: 'none', on: 'express' },
  { route: 'Express: idempotent(), first executions', path: '/idempotent', key: 'fresh', on: 'express' },
  { route: 'Express: idempotent(), replays', path: '/idempotent', key: 'replay', on: 'express' },
  { route: 'Express: peer @node-idempotency/core + Redis, first executions', path: '/peer', key: 'fresh', on: 'express' },
  { route: 'Express: peer @node-idempotency/core + Redis, replays', path: '/peer', key: 'replay', on: 'express' },
  { route: 'Fastify: plain route (bare transaction)', path: '/plain', key: 'none', on: 'fastify' },
  { route: 'Fastify: idempotent(), first executions', path: '/idempotent', key: 'fresh', on: 'fastify' },
  { route: 'Fastify: idempotent(), replays', path: '/idempotent', key: 'replay', on: 'fastify' },
] as const

/**
 * Drives every route with autocannon for `seconds`, in interleaved rounds so that drift of the
 * machine falls on all routes alike; figures are the means over the rounds.
 */
export async function measureRoutes(server: Server, connections: number, seconds: number, rounds: number): Promise<RouteFigures[]> {
  const body = JSON.stringify({ amount: 1500 })
  const headers = { 'content-type': 'application/json', 'x-customer': 'bench' }
  // Replays are spread over keys made first, as retries of many clients are: replays of one key
  // at once are answered one after another (each may find the key expired and run it).
  const replayKeys = Array.from({ length: REPLAY_KEYS }, (_, i) => `replay-${randomUUID()}-${i}`)
  for (const spec of ROUTES.filter((r) => r.key === 'replay')) {
    const url = `${spec.on === 'fastify' ? server.fastifyUrl : server.url}${spec.path}`
    for (let i = 0; i < replayKeys.length; i += connections) {
      await Promise.all(
        replayKeys.slice(i, i + connections).map(async (key) => {
          const response = await fetch(url, { method: 'POST', headers: { ...headers, 'idempotency-key': key }, body })
          if (response.status !== 201) throw new Error(`Making the replay key ${key} on ${spec.route} answered ${response.status}.`)
          await response.arrayBuffer()
        }),
      )
    }
  }
  let next = 0
  const drive = (spec: (typeof ROUTES)[number], duration: number) => {
    const request: autocannon.Request = {
      method: 'POST',
      path: spec.path,
      headers,
      body,
      setupRequest: (req) => {
        if (spec.key === 'none') return req
        const key = spec.key === 'replay' ? replayKeys[next++ % replayKeys.length]! : randomUUID()
        return { ...req, headers: { ...req.headers, 'idempotency-key': key } }
      },
    }
    return autocannon({ url: spec.on === 'fastify' ? server.fastifyUrl : server.url, connections, requests: [request], duration })
  }
  for (const spec of ROUTES) await drive(spec, 1)
  const results = ROUTES.map(() => [] as autocannon.Result[])
  for (let round = 0; round < rounds; round++) {
    for (const [i, spec] of ROUTES.entries()) results[i]!.push(await drive(spec, seconds))
  }
  const mean = (values: number[]) => values.reduce((a, b) => a + b, 0) / values.length
  return ROUTES.map((spec, i) => {
    const runs = results[i]!
    return {
      route: spec.route,
      requestsPerSecond: mean(runs.map((r) => r.requests.average)),
      p50: mean(runs.map((r) => r.latency.p50)),
      p99: mean(runs.map((r) => r.latency.p99)),
      non2xx: runs.reduce((n, r) => n + r.non2xx, 0),
      errors: runs.reduce((n, r) => n + r.errors, 0),
    }
  })
}

export interface StormFigures {
  readonly database: string
  readonly requests: number
  readonly keys: number
  readonly concurrency: number
  readonly drainMs: number
  /** How many answers had each status; a 409 is retried after its Retry-After, as a client would. */
  readonly statuses: Record<string, number>
  readonly replayed: number
  readonly sideEffects: number
}

/**
 * Fires `requests` POSTs over `keys` keys (shuffled, every key `requests / keys` times) from
 * `concurrency` concurrent clients at the idempotent route, and counts the orders made.
 */
export async function storm(bench: Bench, server: Server, requests: number, keys: number, concurrency: number): Promise<StormFigures> {
  const run = randomUUID().slice(0, 8)
  const queue = Array.from({ length: requests }, (_, i) => `storm-${run}-${i % keys}`)
  for (let i = queue.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1))
    ;[queue[i], queue[j]] = [queue[j]!, queue[i]!]
  }
  const before = await bench.orders()
  const statuses: Record<string, number> = {}
  let replayed = 0
  const started = performance.now()
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      for (let key = queue.pop(); key !== undefined; key = queue.pop()) {
        for (;;) {
          const response = await fetch(`${server.url}/idempotent`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', 'x-customer': 'storm', 'idempotency-key': key },
            body: JSON.stringify({ amount: 700 }),
          })
          await response.arrayBuffer()
          statuses[response.status] = (statuses[response.status] ?? 0) + 1
          if (response.status !== 409) {
            if (response.headers.get('idempotency-replayed') === 'true') replayed++
            break
          }
          await new Promise((resolve) => setTimeout(resolve, 1000 * Number(response.headers.get('retry-after') ?? 1)))
        }
      }
    }),
  )
  const drainMs = performance.now() - started
  return { database: bench.database, requests, keys, concurrency, drainMs, statuses, replayed, sideEffects: (await bench.orders()) - before }
}
