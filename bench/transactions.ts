import type { LogEvent } from 'kysely'
import { createIdempotency } from '../src/index.js'
import { openDatabase, type DatabaseName } from '../test/support/databases.js'
import { KEYS_TABLE, placeOrder, throughput, type Bench, type BenchDB } from './support.js'

/** The paths measured against each other, all running the same three-insert transaction. */
export const PATHS = {
  bare: 'a: bare transaction',
  first: 'b: first execution, idempotency.transaction',
  inside: "b': first execution, withIdempotency in your transaction",
  replay: 'c: replay, idempotency.transaction',
} as const
export type PathName = keyof typeof PATHS

export interface TransactionFigures {
  readonly database: DatabaseName
  readonly clients: number
  /** Calls per second, the mean over the rounds. */
  readonly opsPerSecond: Record<PathName, number>
  /** Calls per second in each round, to show how much the machine wandered. */
  readonly rounds: Record<PathName, number[]>
  readonly ratios: { readonly firstToBare: number; readonly insideToBare: number; readonly replayToBare: number }
  /** What one call of each path sends, in order. */
  readonly statements: Record<PathName, string[]>
}

/** Replayable keys made before measuring, cycled through by the replay path. */
const REPLAY_KEYS = 1000

/**
 * Measures the paths in interleaved rounds (a, b, b', c, a, b, …) so that drift of the
 * machine (autovacuum, checkpoints, a growing table) falls on all of them alike.
 */
export async function measureTransactions(bench: Bench, clients: number, seconds: number, rounds: number): Promise<TransactionFigures> {
  const { db, idempotency } = bench
  const run = Date.now().toString(36)
  await Promise.all(
    Array.from({ length: REPLAY_KEYS }, (_, i) => idempotency.transaction(`replay-${run}-${i}`, (trx) => placeOrder(trx, 'c', 100))),
  )
  const ops: Record<PathName, (client: number, n: number, round: number) => Promise<unknown>> = {
    bare: () => db.transaction().execute((trx) => placeOrder(trx, 'c', 100)),
    first: (client, n, round) => idempotency.transaction(`first-${run}-${round}-${client}-${n}`, (trx) => placeOrder(trx, 'c', 100)),
    inside: (client, n, round) =>
      db.transaction().execute((trx) => idempotency.withIdempotency(trx, `inside-${run}-${round}-${client}-${n}`, (t) => placeOrder(t, 'c', 100))),
    replay: (client, n) => idempotency.transaction(`replay-${run}-${(client * 7919 + n) % REPLAY_KEYS}`, (trx) => placeOrder(trx, 'c', 100)),
  }
  const names = Object.keys(PATHS) as PathName[]
  for (const name of names) await throughput(clients, 500, (client, n) => ops[name](client, n, -1))
  const perRound = Object.fromEntries(names.map((name) => [name, [] as number[]])) as Record<PathName, number[]>
  for (let round = 0; round < rounds; round++) {
    for (const name of names) perRound[name].push(await throughput(clients, seconds * 1000, (client, n) => ops[name](client, n, round)))
  }
  const opsPerSecond = Object.fromEntries(names.map((name) => [name, perRound[name].reduce((a, b) => a + b, 0) / rounds])) as Record<PathName, number>
  return {
    database: bench.database,
    clients,
    opsPerSecond,
    rounds: perRound,
    ratios: {
      firstToBare: opsPerSecond.first / opsPerSecond.bare,
      insideToBare: opsPerSecond.inside / opsPerSecond.bare,
      replayToBare: opsPerSecond.replay / opsPerSecond.bare,
    },
    statements: await countStatements(bench, run),
  }
}

/** Runs each path once on a logging connection and names what it sent. */
async function countStatements(bench: Bench, run: string): Promise<Record<PathName, string[]>> {
  let sent: string[] = []
  const db = openDatabase(bench.database, bench.location, 1, 5000, (event: LogEvent) => {
    sent.push(label(event.query.sql))
  })
  try {
    const idempotency = createIdempotency<BenchDB>({ db, tableName: KEYS_TABLE })
    const record = async (op: () => Promise<unknown>): Promise<string[]> => {
      sent = []
      await op()
      return sent.splice(0)
    }
    const bare = await record(() => db.transaction().execute((trx) => placeOrder(trx, 'c', 100)))
    // The first call of an instance compiles its statements (and MySQL asks the server's
    // version once); count a later call, as a running application sends it.
    await idempotency.transaction(`count-${run}-warm`, (trx) => placeOrder(trx, 'c', 100))
    const first = await record(() => idempotency.transaction(`count-${run}-first`, (trx) => placeOrder(trx, 'c', 100)))
    const inside = await record(() =>
      db.transaction().execute((trx) => idempotency.withIdempotency(trx, `count-${run}-inside`, (t) => placeOrder(t, 'c', 100))),
    )
    const replay = await record(() => idempotency.transaction(`count-${run}-first`, (trx) => placeOrder(trx, 'c', 100)))
    return { bare, first, inside, replay }
  } finally {
    await db.destroy()
  }
}

/** A statement's first keyword, marked when it touches the idempotency table. */
function label(text: string): string {
  const verb = /^\s*(\w+)/.exec(text)?.[1]?.toLowerCase() ?? '?'
  return text.includes(KEYS_TABLE) ? `${verb}[key]` : verb
}
