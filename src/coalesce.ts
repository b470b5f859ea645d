/**
 * In-flight attempts of this process: a duplicate of a key an attempt runs here waits for it in
 * memory, holding no connection, instead of in the database; and a call nested inside the
 * function of a call with the same key is told so, instead of waiting for itself.
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import type { DialectAdapter } from 'kysely'
import type { Execution } from './api.js'
import { IdempotencyConflictError } from './errors.js'
import type { NormalizedKey } from './keys.js'
import { retryAfter, type Settings } from './retries.js'

/** What {@link Coalescer.coalesced} gives the attempt it runs. */
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
  /**
   * Settles when the attempt's lease changes (it takes, renews or restores one, or holds the key
   * through a phase) or when the attempt ends: a duplicate waiting for it reckons its wait again.
   * A new promise after each change.
   */
  changed: Promise<void>
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
export function processWide<T>(name: string, create: () => T): T {
  const slot = Symbol.for(`kysely-idempotency.${name}`)
  const global = globalThis as { [slot]?: unknown }
  return (global[slot] ??= create()) as T
}

/**
 * Keys (table, scope, key) whose single-transaction function runs in this process right now,
 * across instances, to tell a nested call with the same key from a stranded key.
 */
const running = processWide('running', () => new Map<string, number>())
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
/**
 * The attempts of one instance on one table, by key; what a duplicate in this process waits for.
 */
export class Coalescer {
  /** The table, as entries name it. */
  readonly #table: string
  readonly #database: number
  /** The attempts this instance runs now, by key. */
  readonly #inFlight = new Map<string, Running>()

  /** `adapter` is the Kysely adapter of the database the instance works on. */
  constructor(table: string, adapter: DialectAdapter) {
    this.#table = table
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
    const entry = this.entry(key)
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
        // the read becomes a run that no other waiter may share. A lease taken after this wait
        // began (the attempt had not claimed the key yet, or held it through a phase) wakes it,
        // so that the duplicate takes over when that lease runs out, not when its own wait does.
        await within(current.changed, Math.min(deadline, current.leaseUntil) - now)
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
  async #attempt<T>(
    entry: string,
    deadline: number,
    displaced: Running | undefined,
    attempt: (slot: AttemptSlot) => Promise<Execution<T>>,
  ): Promise<Execution<T>> {
    let change!: () => void
    let decide!: () => void
    const next = () => new Promise<void>((resolve) => (change = resolve))
    const mine: Running = {
      changed: next(),
      decided: new Promise<void>((resolve) => (decide = resolve)),
      claiming: false,
      leaseUntil: Infinity,
      ended: false,
    }
    /** Sets the lease duplicates here see, and wakes the ones waiting for it. */
    const lease = (until: number) => {
      mine.leaseUntil = until
      const waiting = change
      mine.changed = next()
      waiting()
    }
    this.#inFlight.set(entry, mine)
    const slot: AttemptSlot = {
      claimWait: Math.max(0, deadline - Date.now()),
      claiming: () => {
        mine.claiming = true
        decide()
      },
      leased: (ms) => lease(Date.now() + ms + LEASE_MARGIN),
      holding: async (work) => {
        const before = mine.leaseUntil
        lease(Infinity)
        try {
          return await work()
        } catch (error) {
          lease(before)
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
      change()
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
    const entry = this.entry(key)
    return this.#inFlight.has(entry) || running.has(entry)
  }

  /**
   * Before a call in the caller's own transaction (`TransactionPath.inTransaction`): its transaction holds a
   * connection whatever happens, and may hold locks that an attempt in flight here needs, so a
   * duplicate waits in the database, which sees such deadlocks, not in memory; with
   * `conflictWait` 0 the database answers at once too (MySQL proper after its 1 s minimum). Only
   * a nested call is refused here.
   */
  refuseNested(key: NormalizedKey, settings: Settings): void {
    this.#refuseNested(this.entry(key), key, settings)
  }

  /** The key's entry: the same for the same table, key and database in every instance of this process. */
  entry(key: NormalizedKey): string {
    return `${this.#database}\0${this.#table}\0${key.scope}\0${key.key}`
  }
}

/**
 * Runs `work`, the function of a single-transaction call at `entry`, and then `store`, which
 * stores its value: until both end, the key counts as running here (its claim is not committed
 * yet, so no statement can see it), and while `work` runs a call with the same key inside it is
 * nested.
 */
export async function runningFunction<T>(entry: string, work: () => Promise<T>, store: (value: T) => Promise<void>): Promise<T> {
  running.set(entry, (running.get(entry) ?? 0) + 1)
  try {
    const value = await enclosed(entry, work)
    await store(value)
    return value
  } finally {
    const left = running.get(entry)! - 1
    if (left === 0) running.delete(entry)
    else running.set(entry, left)
  }
}

/** Whether a single-transaction function at `entry` runs in this process now. */
export function functionRunning(entry: string): boolean {
  return running.has(entry)
}

export function inFlight(key: NormalizedKey, settings: Settings): IdempotencyConflictError {
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
