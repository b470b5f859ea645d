import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { sql, type Kysely, type Transaction } from 'kysely'
import { describe, expect, inject, it } from 'vitest'
import { createIdempotency, IdempotencyConflictError, migrationTables, type Idempotency, type IdempotencyOptions } from '../../index.js'
import { ALL_TARGETS, openDatabase, PGLITE_LOCATION, type Capability, type Target } from './databases.js'
import type { Answer, WorkerArgs } from './util.js'

/** The targets of this run (all, or those picked with KIDEM_TARGETS) that this lane's Kysely can run. */
export function selectedTargets(): readonly Target[] {
  const ids = inject('targets')
  return ALL_TARGETS.filter((t) => ids.includes(t.id) && t.unavailable === undefined)
}

/**
 * The targets of this run (all, or those picked with KIDEM_TARGETS) for the suite `suite`, whose
 * tests need `needs` of their target. A target that lacks one of them, or cannot run on this
 * lane's Kysely, is reported as N/A with its reason (a skipped test named for it), never left
 * out silently.
 */
export function targetsFor(suite: string, needs: readonly Capability[] = []): readonly Target[] {
  const ids = inject('targets')
  const selected = ALL_TARGETS.filter((t) => ids.includes(t.id))
  for (const target of selected) {
    const reason = target.unavailable ?? needs.map((need) => target.lacks[need]).find((r) => r !== undefined)
    if (reason !== undefined) describe(`${suite}: ${target.id}`, () => it.skip(`N/A: ${reason}`))
  }
  return selected.filter((t) => t.unavailable === undefined && needs.every((need) => t.lacks[need] === undefined))
}

type Test = (name: string, fn: () => Promise<unknown>, timeout?: number) => void

/** `it`, or where `target` lacks one of `capabilities`, a test reported as N/A with the target's reason. */
export function itWhere(target: Target, ...capabilities: Capability[]): Test {
  const reason = capabilities.map((capability) => target.lacks[capability]).find((r) => r !== undefined)
  return itIf(reason === undefined, reason ?? '')
}

/** `it` when `applies`, else a test reported as N/A because of `reason`. */
export function itIf(applies: boolean, reason: string): Test {
  if (applies) return (name, fn, timeout) => it(name, fn, timeout)
  return (name) => it.skip(`${name} (N/A: ${reason})`)
}

/** One database and a fresh idempotency table (with a side-effect table beside it) for one test. */
export interface Fixture {
  readonly target: Target
  /** Connection string, or the SQLite file path. */
  readonly location: string
  readonly db: Kysely<any>
  readonly table: string
  /** The side-effect table: one column `k`. */
  readonly effectsTable: string
  readonly idempotency: Idempotency<any>
  /** Records one side effect of `key` in the transaction. */
  effect(trx: Transaction<any>, key: string): Promise<void>
  /** Reads from the database in `trx`, so that its snapshot is taken before what follows. */
  snapshot(trx: Transaction<any>): Promise<void>
  /** How many side effects of `key` are committed. */
  effects(key?: string): Promise<number>
  /** How many rows the idempotency table holds. */
  rows(): Promise<number>
  /** Another idempotency instance on the same database and table. */
  with(options: Omit<IdempotencyOptions<any>, 'db'>): Idempotency<any>
  close(): Promise<void>
}

export async function openFixture(target: Target, options: Omit<IdempotencyOptions<any>, 'db'> = {}): Promise<Fixture> {
  const dir = target.driver === 'better-sqlite3' ? mkdtempSync(join(tmpdir(), 'kidem-')) : undefined
  const location = dir
    ? join(dir, 'test.db')
    : target.driver === 'pglite'
      ? PGLITE_LOCATION
      : inject('locations')[target.server ?? (target.database as 'postgres' | 'mysql')]!
  const db = openDatabase(target.driver, location)
  const table = `t_${Math.random().toString(36).slice(2, 10)}`
  const effectsTable = `${table}_fx`
  const make = (more: Omit<IdempotencyOptions<any>, 'db'>) =>
    createIdempotency({ db, tableName: table, ...(target.dialect ? { dialect: target.dialect() } : {}), ...more })
  const idempotency = make(options)
  // Through the target itself, a pooler in transaction mode included: the migrations lock a row
  // of their history in their transaction, not the session.
  await idempotency.migrate()
  await db.schema
    .createTable(effectsTable)
    .addColumn('k', 'varchar(255)', (c) => c.notNull())
    .execute()
  return {
    target,
    location,
    db,
    table,
    effectsTable,
    idempotency,
    with: make,
    async effect(trx, key) {
      await trx.insertInto(effectsTable).values({ k: key }).execute()
    },
    async snapshot(trx) {
      await trx.selectFrom(effectsTable).select('k').limit(1).execute()
    },
    async effects(key) {
      let query = db.selectFrom(effectsTable).select((eb) => eb.fn.countAll<number | string>().as('n'))
      if (key !== undefined) query = query.where('k', '=', key)
      return Number((await query.executeTakeFirstOrThrow()).n)
    },
    async rows() {
      const { n } = await db
        .selectFrom(table)
        .select((eb) => eb.fn.countAll<number | string>().as('n'))
        .executeTakeFirstOrThrow()
      return Number(n)
    },
    async close() {
      await Promise.all([...children].map((child) => new Promise((resolve) => child.once('exit', resolve).kill('SIGKILL'))))
      const { migrationTableName, migrationLockTableName } = migrationTables(table)
      for (const t of [table, effectsTable, migrationTableName, migrationLockTableName]) {
        await db.schema.dropTable(t).ifExists().execute()
      }
      await db.destroy()
      if (dir) rmSync(dir, { recursive: true, force: true })
    },
  }
}

/** A promise with its resolver, to hold a function open until the test lets it go. */
export function gate(): { promise: Promise<void>; open(): void } {
  let open!: () => void
  const promise = new Promise<void>((resolve) => (open = resolve))
  return { promise, open }
}

export interface Worker {
  /** Resolves with everything the child printed once it exits. */
  readonly done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>
  /** Resolves when the child prints `line`. */
  printed(line: string): Promise<void>
  /** Resolves with the rest of the first line the child prints that starts with `prefix`. */
  printedAfter(prefix: string): Promise<string>
  kill(signal: NodeJS.Signals): void
}

/** Children still running; a fixture kills them when it closes, so a failed test leaves none behind. */
const children = new Set<ReturnType<typeof spawn>>()

export function startWorker(args: WorkerArgs): Worker {
  return startChild('worker.ts', args)
}

/** Runs `test/fixtures/<script>` in a child process with `args` as JSON. */
export function startChild(script: string, args: unknown): Worker {
  const child = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '../fixtures', script), JSON.stringify(args)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stdout = ''
  let stderr = ''
  const waiters: Array<{ line: string; resolve: () => void }> = []
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString()
    for (const w of waiters) if (stdout.split('\n').includes(w.line)) w.resolve()
  })
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
  children.add(child)
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) =>
    child.on('exit', (code, signal) => {
      children.delete(child)
      resolve({ code, signal, stdout, stderr })
    }),
  )
  return {
    done,
    printed: (line) =>
      new Promise<void>((resolve, reject) => {
        if (stdout.split('\n').includes(line)) resolve()
        waiters.push({ line, resolve })
        void done.then((r) => reject(new Error(`worker exited (${r.code ?? r.signal}) before printing ${line}: ${r.stderr}`)))
      }),
    printedAfter: async (prefix) => {
      for (;;) {
        const line = stdout.split('\n').find((l) => l.startsWith(prefix))
        if (line !== undefined) return line.slice(prefix.length)
        const exited = await Promise.race([done.then(() => true), new Promise<false>((resolve) => child.stdout.once('data', () => resolve(false)))])
        if (exited && !stdout.split('\n').some((l) => l.startsWith(prefix))) throw new Error(`worker exited before printing ${prefix}: ${stderr}`)
      }
    },
    kill: (signal) => child.kill(signal),
  }
}

/** The database session id of the connection `trx` runs on, and how to end it from elsewhere. */
export const sessions = {
  postgres: {
    id: async (trx: Transaction<any>) => (await sql<{ id: number }>`select pg_backend_pid() as id`.execute(trx)).rows[0]!.id,
    kill: (db: Kysely<any>, id: number) => sql`select pg_terminate_backend(${id})`.execute(db),
  },
  mysql: {
    id: async (trx: Transaction<any>) => Number((await sql<{ id: number }>`select connection_id() as id`.execute(trx)).rows[0]!.id),
    kill: (db: Kysely<any>, id: number) => sql`kill ${sql.lit(id)}`.execute(db),
  },
}

/**
 * Exactly one answer is the first execution, and every other is a replay of its value; the
 * only errors tolerated are 409s for the `reasons` given (none unless a test says so).
 */
export function expectOneOutcome(answers: Answer[], value: unknown, reasons: string[] = []): void {
  for (const a of answers) {
    if ('error' in a) {
      expect(a.error, JSON.stringify(a)).toBe(IdempotencyConflictError.name)
      expect(reasons, JSON.stringify(a)).toContain(a.reason)
    } else {
      expect(a.value).toEqual(value)
    }
  }
  expect(answers.filter((a) => 'replayed' in a && !a.replayed)).toHaveLength(1)
}
