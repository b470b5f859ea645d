import type { LogEvent } from 'kysely'
import { createIdempotency } from '../index.js'
import { openDatabase, type DatabaseName } from '../test/support/databases.js'
import type { DbosPeer, RedisPeer } from './peers.js'
import { rawSequences } from './raw.js'
import { KEYS_TABLE, placeOrder, throughput, type Bench, type BenchDB } from './support.js'

/** The paths measured against each other, all running the same three-insert transaction. */
export const PATHS = {
  bare: 'a: bare transaction',
  first: 'b: first execution, idempotency.transaction',
  firstClaim: 'b+: the same, claimFirst: true',
  inside: "b': first execution, withIdempotency in your transaction",
  replay: 'c: replay, idempotency.transaction',
  replayClaim: 'c+: the same, claimFirst: true',
  insideReplay: "c': replay, withIdempotency in your transaction",
  mix1: 'm1: 1% replays, 99% new keys, transaction()',
  mix1Claim: 'm1+: the same, claimFirst: true',
  mix10: 'm10: 10% replays, transaction()',
  mix10Claim: 'm10+: the same, claimFirst: true',
  mix50: 'm50: 50% replays, transaction()',
  mix50Claim: 'm50+: the same, claimFirst: true',
  rawFirst: "r: raw SQL, b's statements (claim before the writes)",
  rawLast: "r': raw SQL, claim last (writes, then finished key)",
  dbosFirst: 'DBOS workflow (ID = key), first execution',
  dbosReplay: 'DBOS workflow (ID = key), replay',
  redisFirst: '@node-idempotency/core + Redis, first execution',
  redisReplay: '@node-idempotency/core + Redis, replay',
} as const
export type PathName = keyof typeof PATHS
/** The paths whose statements the benchmark counts (the peers' go through other clients). */
type CountedPath = 'bare' | 'first' | 'firstClaim' | 'inside' | 'replay' | 'replayClaim' | 'rawFirst' | 'rawLast'

export interface PathFigures {
  /** Calls per second, the median of the rounds. */
  readonly opsPerSecond: number
  /** Calls per second in each round, to show how much the machine wandered. */
  readonly rounds: number[]
  /** The 99th percentile of a call's latency in ms, the mean over the rounds. */
  readonly p99Ms: number
  /** `opsPerSecond` divided by the bare transaction's. */
  readonly toBare: number
}

export interface TransactionFigures {
  readonly database: DatabaseName
  /** How the clients reach the server: directly, or through PgBouncer in transaction mode. */
  readonly via: 'direct' | 'PgBouncer'
  readonly clients: number
  /** The measured paths, in the order they ran in each round. */
  readonly paths: Partial<Record<PathName, PathFigures>>
  /**
   * The library's own cost: b/a divided by r/a, the same statements sent by hand (1.0 = the
   * library adds nothing to its SQL); and what the claim-last sequence would gain, r'/r.
   */
  readonly efficiency: number
  readonly claimLastGain: number
  /** What one call of each path sends, in order. */
  readonly statements: Record<CountedPath, string[]>
  /** Whether path r sends exactly the SQL text that path b does (parameters apart). */
  readonly rawIsLibrarySql: boolean
}

/** Where the benchmark measures: a database, and the library's instance on it. */
export type Target = Pick<Bench, 'database' | 'location' | 'db' | 'idempotency'> & { readonly via: TransactionFigures['via'] }

/** Replayable keys made before measuring, cycled through by the replay paths. */
const REPLAY_KEYS = 1000
const CUSTOMER = 'c'
const AMOUNT = 100

/**
 * Measures the paths in interleaved rounds (a, b, b', c, r, r', …, a, b, …) so that drift of the
 * machine (autovacuum, checkpoints, a growing table) falls on all of them alike. `peers` adds
 * their rows; `mariadb` says how a MySQL server bounds a lock wait (for the raw paths).
 */
export async function measureTransactions(
  target: Target,
  options: { clients: number; seconds: number; rounds: number; mariadb: boolean; peers?: { dbos: DbosPeer; redis: RedisPeer } },
): Promise<TransactionFigures> {
  const { db, idempotency } = target
  const { clients, seconds, rounds, peers } = options
  const run = `${target.via}-${Date.now().toString(36)}`
  const raw = rawSequences(target.database, db, options.mariadb)
  const order = (trx: Parameters<typeof placeOrder>[0]) => placeOrder(trx, CUSTOMER, AMOUNT)
  const bare = () => db.transaction().execute(order)
  const redisCall = (redis: RedisPeer, key: string) =>
    redis.handle({ headers: { 'idempotency-key': key }, path: '/orders', method: 'POST', body: { amount: AMOUNT } }, bare)
  const replayKey = (client: number, n: number) => `replay-${run}-${(client * 7919 + n) % REPLAY_KEYS}`
  const first = (key: string) => idempotency.transaction(key, order)
  const firstClaim = (key: string) => idempotency.transaction(key, order, { claimFirst: true })
  const inside = (key: string) => db.transaction().execute((trx) => idempotency.withIdempotency(trx, key, order))
  // Every (100/percent)th call of a client replays a finished key; the others use new keys, so
  // that read first (the default) and claim first meet the mixes they are chosen by.
  const mixed =
    (percent: number, sequence: (key: string) => Promise<unknown>) =>
    (key: string, client: number, n: number): Promise<unknown> =>
      sequence(n % (100 / percent) === 0 ? replayKey(client, n) : key)
  const ops: Partial<Record<PathName, (key: string, client: number, n: number) => Promise<unknown>>> = {
    bare: () => bare(),
    first,
    firstClaim,
    inside,
    replay: (_key, client, n) => first(replayKey(client, n)),
    replayClaim: (_key, client, n) => firstClaim(replayKey(client, n)),
    insideReplay: (_key, client, n) => inside(replayKey(client, n)),
    mix1: mixed(1, first),
    mix1Claim: mixed(1, firstClaim),
    mix10: mixed(10, first),
    mix10Claim: mixed(10, firstClaim),
    mix50: mixed(50, first),
    mix50Claim: mixed(50, firstClaim),
    rawFirst: (key) => raw.claimFirst(key, order),
    rawLast: (key) => raw.claimLast(key, order),
    ...(peers && {
      dbosFirst: (key: string) => peers.dbos.order(key, CUSTOMER, AMOUNT),
      dbosReplay: (_key: string, client: number, n: number) => peers.dbos.order(replayKey(client, n), CUSTOMER, AMOUNT),
      redisFirst: (key: string) => redisCall(peers.redis, key),
      redisReplay: (_key: string, client: number, n: number) => redisCall(peers.redis, replayKey(client, n)),
    }),
  }
  for (let i = 0; i < REPLAY_KEYS; i += clients) {
    const batch = Array.from({ length: Math.min(clients, REPLAY_KEYS - i) }, (_, j) => `replay-${run}-${i + j}`)
    await Promise.all(
      batch.flatMap((key) => [
        idempotency.transaction(key, order),
        ...(peers ? [peers.dbos.order(key, CUSTOMER, AMOUNT), redisCall(peers.redis, key)] : []),
      ]),
    )
  }
  const names = (Object.keys(PATHS) as PathName[]).filter((name) => ops[name])
  const call = (name: PathName, round: number) => (client: number, n: number) => ops[name]!(`${name}-${run}-${round}-${client}-${n}`, client, n)
  for (const name of names) await throughput(clients, 500, call(name, -1))
  const measured = Object.fromEntries(names.map((name) => [name, [] as Array<{ perSecond: number; p99Ms: number }>]))
  for (let round = 0; round < rounds; round++) {
    for (const name of names) measured[name]!.push(await throughput(clients, seconds * 1000, call(name, round)))
  }
  const mean = (values: number[]) => values.reduce((a, b) => a + b, 0) / values.length
  const median = (values: number[]) => {
    const sorted = [...values].sort((a, b) => a - b)
    const middle = sorted.length >> 1
    return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2
  }
  const bareOps = median(measured.bare!.map((r) => r.perSecond))
  const paths = Object.fromEntries(
    names.map((name) => {
      const perRound = measured[name]!
      const opsPerSecond = median(perRound.map((r) => r.perSecond))
      return [
        name,
        { opsPerSecond, rounds: perRound.map((r) => r.perSecond), p99Ms: mean(perRound.map((r) => r.p99Ms)), toBare: opsPerSecond / bareOps },
      ]
    }),
  ) as Partial<Record<PathName, PathFigures>>
  return {
    database: target.database,
    via: target.via,
    clients,
    paths,
    efficiency: paths.first!.opsPerSecond / paths.rawFirst!.opsPerSecond,
    claimLastGain: paths.rawLast!.opsPerSecond / paths.rawFirst!.opsPerSecond,
    ...(await countStatements(target, run, options.mariadb)),
  }
}

/** Runs each counted path once on a logging connection, names what it sent, and compares the raw path's SQL with the library's. */
async function countStatements(target: Target, run: string, mariadb: boolean): Promise<Pick<TransactionFigures, 'statements' | 'rawIsLibrarySql'>> {
  let sent: string[] = []
  const db = openDatabase(target.database, target.location, 1, 5000, (event: LogEvent) => {
    sent.push(event.query.sql.replace(/\s+/g, ' ').trim())
  })
  try {
    const idempotency = createIdempotency<BenchDB>({ db, tableName: KEYS_TABLE })
    const raw = rawSequences(target.database, db, mariadb)
    const order = (trx: Parameters<typeof placeOrder>[0]) => placeOrder(trx, CUSTOMER, AMOUNT)
    const record = async (op: () => Promise<unknown>): Promise<string[]> => {
      sent = []
      await op()
      return sent.splice(0)
    }
    const bare = await record(() => db.transaction().execute(order))
    // The first call of an instance compiles its statements (and MySQL asks the server's
    // version once); count a later call, as a running application sends it.
    await idempotency.transaction(`count-${run}-warm`, order)
    const first = await record(() => idempotency.transaction(`count-${run}-first`, order))
    const firstClaim = await record(() => idempotency.transaction(`count-${run}-first-claim`, order, { claimFirst: true }))
    const inside = await record(() => db.transaction().execute((trx) => idempotency.withIdempotency(trx, `count-${run}-inside`, order)))
    const replay = await record(() => idempotency.transaction(`count-${run}-first`, order))
    const replayClaim = await record(() => idempotency.transaction(`count-${run}-first`, order, { claimFirst: true }))
    const rawFirst = await record(() => raw.claimFirst(`count-${run}-raw-first`, order))
    const rawLast = await record(() => raw.claimLast(`count-${run}-raw-last`, order))
    const texts = { bare, first, firstClaim, inside, replay, replayClaim, rawFirst, rawLast }
    return {
      statements: Object.fromEntries(Object.entries(texts).map(([name, sent]) => [name, sent.map(label)])) as Record<CountedPath, string[]>,
      rawIsLibrarySql: rawFirst.length === first.length && rawFirst.every((text, i) => text === first[i]),
    }
  } finally {
    await db.destroy()
  }
}

/** A statement's first keyword, marked when it touches the idempotency table. */
function label(text: string): string {
  const verb = /^\s*(\w+)/.exec(text)?.[1]?.toLowerCase() ?? '?'
  return text.includes(KEYS_TABLE) ? `${verb}[key]` : verb
}
