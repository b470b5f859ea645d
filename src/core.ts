import { AsyncLocalStorage } from 'node:async_hooks'
import type { DialectAdapter, IsolationLevel, Kysely, Transaction } from 'kysely'
import type { ValueStore } from './codec.js'
import { FINISHED, STARTED, type ClaimValues, type IdempotencyDialect, type KeyRow } from './dialect.js'
import { IdempotencyConflictError, IdempotencyKeyReuseError, IdempotencySetupError } from './errors.js'
import type { NormalizedKey } from './request.js'
import { prepareStatements, type Statements } from './statements.js'
import { qualified, type TableName } from './table.js'

/** What an idempotent execution gave: the value, and whether it was replayed from storage. */
export interface Execution<T> {
  /** `fn`'s value on a first execution; on a replay, the stored value, decoded: an equal value of the same types. */
  readonly value: T
  /** `true` when `fn` did not run because the key was already finished. */
  readonly replayed: boolean
}

/** Per-call settings, resolved from the options with their defaults. */
export interface Settings {
  readonly ttl: number
  readonly conflictWait: number
  /**
   * How long a claim waits for a holder of the key in another process, when less than
   * `conflictWait` is left (a duplicate already waited in memory). Default `conflictWait`.
   */
  readonly claimWait?: number
  readonly maxAttempts: number
  readonly isolationLevel?: IsolationLevel
}

export const EXPIRED = Symbol('expired')

/** What {@link Core.coalesced} gives the attempt it runs. */
export interface AttemptSlot {
  /** How long the attempt's claim may wait for a holder in another process: what is left of `conflictWait`. */
  readonly claimWait: number
  /** Tells duplicates in this instance that the key is not finished and the attempt goes on to claim it. */
  claiming(): void
  /** Tells duplicates in this instance that the attempt holds its key's lock for `ms` from now, and no longer. */
  leased(ms: number): void
  /**
   * Runs `work` (a phase's transaction, which may extend the lock before it commits) with no
   * end to the lease for duplicates here; if it fails, the lease is what it was before.
   */
  holding<T>(work: () => Promise<T>): Promise<T>
}

/** An attempt in this instance's registry. */
interface Running {
  /** Settles when the attempt ends. */
  readonly settled: Promise<void>
  /** Settles when the attempt has read the key and goes on to claim it, or when it ends. */
  readonly decided: Promise<void>
  /** The attempt found the key unfinished and claims it: a duplicate out of time gets 409. */
  claiming: boolean
  /** Local time by which the attempt's lease has surely run out; `Infinity` while it holds no lease. */
  leaseUntil: number
  /** The attempt has ended. */
  ended: boolean
}

/** A call whose function runs in this async context, and whether it still runs. */
interface Enclosing {
  readonly entry: string
  active: boolean
}
/**
 * State the CommonJS and ES module builds of this file share when a process loads both: what a
 * call in one build runs must be seen by a call in the other.
 */
function processWide<T>(name: string, create: () => T): T {
  const slot = Symbol.for(`kysely-idempotency.${name}`)
  const global = globalThis as { [slot]?: unknown }
  return (global[slot] ??= create()) as T
}

/** A single-transaction claim committed without its response (see {@link Core.judge}). */
const STRANDED = Symbol('stranded')
/** Claim rounds before giving up when rows keep vanishing or being reclaimed under us. */
const CLAIM_ROUNDS = 3
/**
 * Keys (table, scope, key) whose single-transaction function runs in this process right now,
 * across instances, to tell a nested call with the same key from a stranded key.
 */
const running = processWide('running', () => new Map<string, number>())
/**
 * Keys (table, scope, key) that a call claimed in a transaction and then failed: the claim
 * stays until that transaction ends, so a second call in it must not blame a commit.
 */
const failedClaims = processWide('failedClaims', () => new WeakMap<object, Set<string>>())
/**
 * The calls enclosing this async context, to tell a call nested inside its own function from a
 * duplicate, which waits. Work the function leaves behind (a timer) still sees them, ended.
 */
const enclosing = processWide('enclosing', () => new AsyncLocalStorage<readonly Enclosing[]>())
/** A number per Kysely adapter (one per Kysely instance and its transactions), so that keys of two databases never meet. */
const databases = processWide('databases', () => ({ ids: new WeakMap<DialectAdapter, number>(), next: 1 }))
/**
 * Milliseconds added to an attempt's lease before a duplicate here takes it over, for the clocks
 * of the app and the database to disagree by (SQLite's is read through a float).
 */
const LEASE_MARGIN = 20
/** How soon a duplicate that found a lease not yet run out in the database looks again. */
const LEASE_RECHECK = 50
/** Attempts at one prune batch that the database aborts (deadlock with requests on the same rows). */
const PRUNE_ATTEMPTS = 5

/**
 * The idempotency algorithm for one table, independent of the database: every difference
 * between databases is asked of the dialect.
 */
export class Core {
  readonly #dialect: IdempotencyDialect
  /** The table as statements and messages name it: `schema.name` when it has a schema. */
  readonly #table: string
  /** How this instance stores values. */
  readonly values: ValueStore
  #statements: Promise<Statements> | undefined
  /** The attempts this instance runs now, by key. */
  readonly #inFlight = new Map<string, Running>()

  readonly #database: number

  /** `adapter` is the Kysely adapter of the database the instance works on. */
  constructor(dialect: IdempotencyDialect, table: TableName, values: ValueStore, adapter: DialectAdapter) {
    this.#dialect = dialect
    this.#table = qualified(table)
    this.values = values
    let id = databases.ids.get(adapter)
    if (id === undefined) databases.ids.set(adapter, (id = databases.next++))
    this.#database = id
  }

  /**
   * Runs `attempt` (a transaction or a flow the library owns) as this instance's only attempt at
   * `key`. A duplicate arriving meanwhile waits for it in memory, holding no connection, up to
   * `conflictWait`, and then makes its own attempt, which reads what the first left: the stored
   * answer (or 422 for another request) if the key finished, else a run of its own. When the wait
   * runs out (at once when `conflictWait` is 0) while the first claims the key, the duplicate gets
   * 409 `in_flight`; while the first only reads it, the duplicate waits for that read, so that a
   * finished key is replayed, never refused. A flow whose lease ran out is not waited for any more:
   * the duplicate takes it over, as one from another process would. A duplicate in another
   * process meets the key in the database instead.
   */
  async coalesced<T>(key: NormalizedKey, settings: Settings, attempt: (slot: AttemptSlot) => Promise<Execution<T>>): Promise<Execution<T>> {
    const entry = this.#runningEntry(key)
    const deadline = Date.now() + settings.conflictWait
    this.#refuseNested(entry, key, settings)
    for (;;) {
      // No await between finding no attempt running and registering this one (in #attempt's
      // synchronous start): another duplicate would find none too.
      let displaced: Running | undefined
      for (let current = this.#inFlight.get(entry); current; current = this.#inFlight.get(entry)) {
        const now = Date.now()
        if (now >= current.leaseUntil) {
          displaced = current
          break
        }
        if (now >= deadline) {
          if (current.claiming) throw inFlight(key, settings)
          // It is still reading the key, which may be finished: its answer is ours, not a 409.
          await current.decided
          continue
        }
        // A finished key is read in a turn of its own too: it may have expired meanwhile, and then
        // the read becomes a run that no other waiter may share.
        await within(current.settled, Math.min(deadline, current.leaseUntil) - now)
      }
      try {
        return await this.#attempt(entry, deadline, displaced, attempt)
      } catch (error) {
        // The database still saw the lock it meant to take over (the clocks' last millisecond):
        // the attempt gave the entry back, and the duplicate waits on while it has time.
        const early = displaced && error instanceof IdempotencyConflictError && error.reason === 'in_flight'
        if (!early || Date.now() + LEASE_RECHECK >= deadline) throw error
        await new Promise((resolve) => setTimeout(resolve, LEASE_RECHECK))
      }
    }
  }

  /** Runs `attempt` as the instance's attempt at `entry`, in place of `displaced` if its lease ran out. */
  async #attempt<T>(entry: string, deadline: number, displaced: Running | undefined, attempt: (slot: AttemptSlot) => Promise<Execution<T>>): Promise<Execution<T>> {
    let settle!: () => void
    let decide!: () => void
    const mine: Running = {
      settled: new Promise<void>((resolve) => (settle = resolve)),
      decided: new Promise<void>((resolve) => (decide = resolve)),
      claiming: false,
      leaseUntil: Infinity,
      ended: false,
    }
    this.#inFlight.set(entry, mine)
    const slot: AttemptSlot = {
      claimWait: Math.max(0, deadline - Date.now()),
      claiming: () => {
        mine.claiming = true
        decide()
      },
      leased: (ms) => {
        mine.leaseUntil = Date.now() + ms + LEASE_MARGIN
      },
      holding: async (work) => {
        const before = mine.leaseUntil
        mine.leaseUntil = Infinity
        try {
          return await work()
        } catch (error) {
          mine.leaseUntil = before
          throw error
        }
      },
    }
    try {
      return await enclosed(entry, () => attempt(slot))
    } finally {
      // A duplicate that took over after this attempt's lease ran out owns the entry now. One
      // that tried and never got the lease (the attempt had renewed it) gives the entry back.
      if (this.#inFlight.get(entry) === mine) {
        if (displaced && !displaced.ended && mine.leaseUntil === Infinity) this.#inFlight.set(entry, displaced)
        else this.#inFlight.delete(entry)
      }
      mine.ended = true
      decide()
      settle()
    }
  }

  /** A call inside the function of a call with the same key (in any instance) would wait for itself. */
  #refuseNested(entry: string, key: NormalizedKey, settings: Settings): void {
    if (!enclosing.getStore()?.some((call) => call.active && call.entry === entry)) return
    throw new IdempotencyConflictError(
      'nested',
      `The idempotency key "${key.key}" is already in use by an enclosing call: a call with the same key is nested inside its own function. Give the inner call a key of its own.`,
      { retryAfter: retryAfter(settings) },
    )
  }

  /**
   * Whether an attempt at `key` runs in this process now (through this instance, or a
   * single-transaction function through any instance of the table): its claim may not be
   * committed yet, so no statement can see it, and with one connection (SQLite, PGlite) none
   * could even run before it ends.
   */
  runsHere(key: NormalizedKey): boolean {
    const entry = this.#runningEntry(key)
    return this.#inFlight.has(entry) || running.has(entry)
  }

  /**
   * Before a call in the caller's own transaction ({@link execute}): its transaction holds a
   * connection whatever happens, and may hold locks that an attempt in flight here needs, so a
   * duplicate waits in the database, which sees such deadlocks, not in memory; with
   * `conflictWait` 0 the database answers at once too (MySQL proper after its 1 s minimum). Only
   * a nested call is refused here.
   */
  refuseNested(key: NormalizedKey, settings: Settings): void {
    this.#refuseNested(this.#runningEntry(key), key, settings)
  }

  /** Runs `fn` once per key inside `trx`, or returns the stored result. */
  async execute<T, DB>(trx: Transaction<DB>, key: NormalizedKey, fn: (trx: Transaction<DB>) => Promise<T>, settings: Settings): Promise<Execution<T>> {
    const db = trx.withoutPlugins() as unknown as Kysely<unknown>
    const s = await this.statements(db)
    const wait = claimWait(settings)
    const values: ClaimValues = { ...key, expiresIn: settings.ttl, wait, token: null, lease: null, phases: null, codec: null, flow: null, recoverIn: null }
    for (let round = 1; ; round++) {
      const claim = await this.waiting(settings, () => s.claim(db, values))
      let id = claim.claimed
      if (claim.claimed === null) {
        const row = claim.row ?? (await this.waiting(settings, () => s.latest(db, key.scope, key.key, wait)))
        if (row) {
          const verdict = await this.judge(db, s, row, key, settings, trx)
          if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
          if (await this.waiting(settings, () => s.reclaim(db, row.id, values))) id = row.id
        }
      }
      if (id !== null) {
        const entry = this.#runningEntry(key)
        running.set(entry, (running.get(entry) ?? 0) + 1)
        try {
          const value = await enclosed(entry, () => fn(trx))
          await s.finish(db, id, this.values.encode(value), settings.ttl)
          return { value, replayed: false }
        } catch (error) {
          let failed = failedClaims.get(trx)
          if (!failed) failedClaims.set(trx, (failed = new Set()))
          failed.add(entry)
          throw error
        } finally {
          const left = running.get(entry)! - 1
          if (left === 0) running.delete(entry)
          else running.set(entry, left)
        }
      }
      if (round === CLAIM_ROUNDS) {
        throw new IdempotencyConflictError('race', 'The key kept changing under concurrent requests; retry the request.', {
          retryAfter: retryAfter(settings),
        })
      }
    }
  }

  /**
   * Answers a replay with one read, else opens a transaction and runs {@link execute} in it,
   * retrying races (serialization failures, deadlocks) with jittered back-off.
   */
  async transaction<T, DB>(
    db: Kysely<DB>,
    key: NormalizedKey,
    fn: (trx: Transaction<DB>) => Promise<T>,
    settings: Settings,
    slot: Pick<AttemptSlot, 'claiming'>,
  ): Promise<Execution<T>> {
    const plain = db.withoutPlugins() as unknown as Kysely<unknown>
    const s = await this.statements(plain)
    const row = await this.guard(settings, () => s.lookup(plain, key.scope, key.key))
    if (row) {
      const verdict = await this.judge(plain, s, row, key, settings)
      if (verdict !== EXPIRED) return { value: verdict.value as T, replayed: true }
    }
    slot.claiming()
    return this.retrying(settings, () => {
      const builder = settings.isolationLevel ? db.transaction().setIsolationLevel(settings.isolationLevel) : db.transaction()
      return builder.execute((trx) => this.execute(trx, key, fn, settings))
    })
  }

  /**
   * Runs `attempt` (a whole transaction) again while it fails with a race (serialization
   * failure, deadlock, a key changing under it), up to `maxAttempts` times, with jittered back-off.
   */
  async retrying<T>(settings: Settings, attempt: () => Promise<T>): Promise<T> {
    for (let n = 1; ; n++) {
      try {
        return await attempt()
      } catch (error) {
        if (!this.#retryable(error)) throw error
        if (n >= settings.maxAttempts) {
          // What the database said goes in `cause`; the caller gets the answer a client can act on.
          if (error instanceof IdempotencyConflictError) throw error
          throw new IdempotencyConflictError(
            'race',
            `Concurrent requests kept conflicting with this one in the database (${n} attempts); retry the request.`,
            { retryAfter: retryAfter(settings), cause: error },
          )
        }
        await backOff(n)
      }
    }
  }

  /**
   * Deletes expired, unlocked rows in batches of `batchSize`; returns how many. A batch the
   * database aborts because requests lock the same rows (a deadlock, a lock wait) is tried again.
   */
  async prune(db: Kysely<unknown>, batchSize: number): Promise<number> {
    const plain = db.withoutPlugins()
    const s = await this.statements(plain)
    let total = 0
    for (;;) {
      const deleted = await this.#pruneBatch(plain, s, batchSize)
      total += deleted
      if (deleted < batchSize) return total
    }
  }

  async #pruneBatch(db: Kysely<unknown>, s: Statements, batchSize: number): Promise<number> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.guard(undefined, () => s.pruneBatch(db, batchSize))
      } catch (error) {
        if (!(error instanceof IdempotencyConflictError)) throw error
        if (attempt < PRUNE_ATTEMPTS) {
          await backOff(attempt)
          continue
        }
        throw new IdempotencyConflictError(
          'race',
          `Pruning "${this.#table}" was stopped by the database ${attempt} times in a row while requests were using the same rows (${(error.cause as Error | undefined)?.message ?? 'lock conflict'}); run prune again later.`,
          { retryAfter: 1, cause: error.cause },
        )
      }
    }
  }

  /** The table's statements, compiled on first use. */
  statements(db: Kysely<unknown>): Promise<Statements> {
    this.#statements ??= this.guard(undefined, () => prepareStatements(db, this.#dialect, this.#table)).catch((error: unknown) => {
      this.#statements = undefined
      throw error
    })
    return this.#statements
  }

  /**
   * What an existing row means for a new attempt: its stored response, {@link EXPIRED} when
   * the key may start over, or the error the caller gets.
   */
  async judge(
    db: Kysely<unknown>,
    s: Statements,
    row: KeyRow,
    key: NormalizedKey,
    settings: Settings,
    trx?: object,
  ): Promise<{ value: unknown } | typeof EXPIRED> {
    const verdict = this.#decide(row, key, settings)
    if (verdict !== STRANDED) return verdict
    if (trx && failedClaims.get(trx)?.has(this.#runningEntry(key))) {
      throw new IdempotencyConflictError(
        'stranded',
        `An earlier call with the idempotency key "${key.key}" in this same transaction claimed the key and then threw; the claim stays ` +
          'until the transaction ends. Roll the transaction back, and retry it, instead of calling again in it.',
        { retryAfter: 1 },
      )
    }
    const remaining = await this.guard(settings, () => s.remaining(db, row.id))
    throw new IdempotencyConflictError(
      'stranded',
      `The idempotency key "${key.key}" was claimed by a transaction that committed without storing a response (withIdempotency or its ` +
        `function threw, and the transaction was committed instead of rolled back), so the key cannot be used until it expires in ` +
        `${Math.ceil(remaining / 1000)} s. Roll the transaction back whenever withIdempotency throws.`,
      { retryAfter: Math.max(1, Math.ceil(remaining / 1000)) },
    )
  }

  #decide(row: KeyRow, key: NormalizedKey, settings: Settings): { value: unknown } | typeof EXPIRED | typeof STRANDED {
    if (row.expired && !row.locked) return EXPIRED
    if (row.fingerprint !== key.fingerprint) {
      throw new IdempotencyKeyReuseError(
        `The idempotency key "${key.key}" was already used for a different request; send a new key for a new request.`,
      )
    }
    if (row.recoveryPoint === FINISHED) return { value: this.values.decode(row.response ?? 'null', row.codec) }
    if (row.phases === null && !row.locked && row.recoveryPoint === STARTED) {
      // A single-transaction claim is visible before its response only to its own transaction,
      // or after a commit that should have been a rollback.
      if (!running.has(this.#runningEntry(key))) return STRANDED
      throw new IdempotencyConflictError(
        'nested',
        `The idempotency key "${key.key}" is already in use by an enclosing call in this transaction: a call with the same key is nested inside its own function. Give the inner call a key of its own.`,
        { retryAfter: retryAfter(settings) },
      )
    }
    if (row.locked) {
      throw inFlight(key, settings)
    }
    throw new IdempotencyConflictError(
      'unfinished_flow',
      `The idempotency key "${key.key}" belongs to an unfinished flow stopped at "${row.recoveryPoint}"; resume it with idempotency.run() and the same key.`,
      { retryAfter: retryAfter(settings) },
    )
  }

  #runningEntry(key: NormalizedKey): string {
    return `${this.#database}\0${this.#table}\0${key.scope}\0${key.key}`
  }

  /** Turns the database errors the library understands into errors that say what happened. */
  guard<T>(settings: Settings | undefined, statement: () => Promise<T>): Promise<T> {
    return this.#translated(settings, statement, false)
  }

  /**
   * {@link guard} for a statement that may wait for a key another transaction holds (a claim, a
   * locking read, a fence): a statement timeout the caller set on the session that ends it is
   * the end of that wait, a conflict. Elsewhere it is the database's own error.
   */
  waiting<T>(settings: Settings | undefined, statement: () => Promise<T>): Promise<T> {
    return this.#translated(settings, statement, true)
  }

  async #translated<T>(settings: Settings | undefined, statement: () => Promise<T>, waits: boolean): Promise<T> {
    try {
      return await statement()
    } catch (error) {
      const kind = this.#dialect.classify(error)
      const after = settings ? retryAfter(settings) : 1
      switch (kind) {
        case 'statement_timeout':
          if (!waits) throw error
        // falls through: it ended a wait for the key
        case 'lock_timeout':
          throw new IdempotencyConflictError('in_flight', 'A request with the same idempotency key is still in progress; retry later.', {
            retryAfter: after,
            cause: error,
          })
        case 'serialization_failure':
        case 'deadlock':
          throw new IdempotencyConflictError(
            'race',
            'A concurrent request with the same idempotency key committed first; roll this transaction back and retry to get its response.',
            { retryAfter: after, cause: error },
          )
        case 'undefined_table':
          throw new IdempotencySetupError(
            `The table "${this.#table}" does not exist; create it with idempotency.migrate() or \`npx kysely-idempotency migrate\`.`,
            { cause: error },
          )
        default:
          throw error
      }
    }
  }

  #retryable(error: unknown): boolean {
    if (error instanceof IdempotencyConflictError) return error.reason === 'race'
    const kind = this.#dialect.classify(error)
    return kind === 'serialization_failure' || kind === 'deadlock'
  }
}

function inFlight(key: NormalizedKey, settings: Settings): IdempotencyConflictError {
  return new IdempotencyConflictError('in_flight', `A request with the idempotency key "${key.key}" is still in progress; retry later.`, {
    retryAfter: retryAfter(settings),
  })
}

/** Whether `promise` settles within `ms`. */
async function within(promise: Promise<void>, ms: number): Promise<boolean> {
  if (ms <= 0) return false
  let timer: ReturnType<typeof setTimeout> | undefined
  const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)))
  try {
    return await Promise.race([promise.then(() => true), timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Runs `work` as the function of the call at `entry`, which counts as enclosing only until `work` settles. */
async function enclosed<T>(entry: string, work: () => Promise<T>): Promise<T> {
  const call: Enclosing = { entry, active: true }
  try {
    return await enclosing.run([...(enclosing.getStore() ?? []), call], work)
  } finally {
    call.active = false
  }
}

/** How long a claim waits for a holder of the key in another process. */
export function claimWait(settings: Settings): number {
  return settings.claimWait ?? settings.conflictWait
}

function retryAfter(settings: Settings): number {
  return Math.max(1, Math.ceil(settings.conflictWait / 1000))
}

/** Full jitter: a random delay up to 10 ms × 2^attempt, capped at 500 ms. */
function backOff(attempt: number): Promise<void> {
  const ceiling = Math.min(500, 10 * 2 ** attempt)
  return new Promise((resolve) => setTimeout(resolve, Math.random() * ceiling))
}
