/**
 * What one contract check works on: a fresh idempotency table of its own (made by the package's
 * migrations, dropped afterwards), the dialect's statements for it, and transactions held open
 * on either connection while the other competes.
 */
import { inspect } from 'node:util'
import { sql, type ControlledTransaction, type Kysely } from 'kysely'
import { dropTable, migrateTable } from '../migrations/index.js'
import {
  aliased,
  decodeKeyRow,
  keyRowColumns,
  plainClaim,
  type ClaimValues,
  type DialectStatements,
  type IdempotencyDialect,
  type KeyRow,
} from '../src/dialect.js'
import { placeTable, qualified, type TableName } from '../src/table.js'

/** How long a step that should settle may take before the check calls it stuck. */
export const STUCK_MS = 15_000

export interface Scratch {
  /** The target's own instance, plugins (`withSchema`) and all, as migrations take it. */
  readonly origin: Kysely<unknown>
  /** The target's instance, without plugins (the library's statements never run through them). */
  readonly db: Kysely<unknown>
  /** Where competing transactions run: `db`, or the target's second instance. */
  readonly competitor: Kysely<unknown>
  readonly dialect: IdempotencyDialect
  /** The check's table, as `sql.table()` takes it. */
  readonly table: string
  readonly where: TableName
  readonly statements: DialectStatements
  /** Claim values for `key` in the scope `contract`: a single-transaction claim unless overridden. */
  values(key: string, overrides?: Partial<ClaimValues>): ClaimValues
  /** The key's row as a plain read sees it now. */
  read(key: string): Promise<KeyRow | undefined>
  /** A statement that takes the key's row lock (an update that changes nothing). */
  touch(db: Kysely<unknown>, key: string): Promise<void>
  /** Opens a transaction on `db` and runs `work` in it, leaving it open: the caller commits or rolls it back. */
  hold<T>(
    db: Kysely<unknown>,
    work: (trx: Kysely<unknown>) => Promise<T>,
  ): Promise<{ readonly value: T; readonly trx: ControlledTransaction<unknown> }>
  close(): Promise<void>
}

export async function openScratch(
  target: Kysely<unknown>,
  competitor: Kysely<unknown> | undefined,
  dialect: IdempotencyDialect,
  prefix: string,
): Promise<Scratch> {
  const name = `${prefix}_${Math.random().toString(36).slice(2, 10)}`
  // Refused as the library refuses it: otherwise every check would fail on the migration (SQLite:
  // `near "schema": syntax error`), blamed on the dialect for a target the library does not run on.
  const where = placeTable(target, name, dialect)
  const db = (target as Kysely<unknown>).withoutPlugins()
  await migrateTable(target, where, dialect, false)
  const table = qualified(where)
  const statements = await dialect.prepare(db, table)
  const opened: Array<ControlledTransaction<unknown>> = []
  const columns = keyRowColumns(dialect)
  return {
    origin: target,
    db,
    competitor: (competitor ?? target).withoutPlugins(),
    dialect,
    table,
    where,
    statements,
    values: (key, overrides) => ({ ...plainClaim({ scope: 'contract', key, fingerprint: `fingerprint of ${key}` }, 60_000, 5000), ...overrides }),
    async read(key) {
      const { rows } = await sql<
        Record<string, unknown>
      >`select ${columns} from ${aliased(table)} where k.scope = 'contract' and k.${sql.ref('key')} = ${key}`.execute(db)
      return rows[0] && decodeKeyRow(rows[0])
    },
    async touch(on, key) {
      await sql`update ${sql.table(table)} set fingerprint = fingerprint where scope = 'contract' and ${sql.ref('key')} = ${key}`.execute(on)
    },
    async hold(on, work) {
      const trx = await on.startTransaction().execute()
      opened.push(trx)
      try {
        return { value: await work(trx), trx }
      } catch (error) {
        await trx.rollback().execute()
        throw error
      }
    },
    async close() {
      // A check that failed half-way may leave a transaction open, which would block the drop.
      // A rollback queued behind a statement that is still stuck is given up after STUCK_MS.
      for (const trx of opened)
        if (!trx.isCommitted && !trx.isRolledBack) await settled(trx.rollback().execute(), 'a rollback after the check').catch(() => undefined)
      await dropTable(target, where)
    },
  }
}

/** A broken promise of the contract: says what was expected and what the dialect did. */
export class ContractViolation extends Error {
  override readonly name = 'ContractViolation'
}

export function expectThat(condition: boolean, message: string): asserts condition {
  if (!condition) throw new ContractViolation(message)
}

/** How a value looks in a message. */
export function shown(value: unknown): string {
  return inspect(value, { depth: 3, breakLength: Infinity })
}

/** The error `promise` rejects with, and how long it took; a violation when it resolves instead. */
export async function rejection(promise: Promise<unknown>, what: string): Promise<{ error: unknown; ms: number }> {
  const started = performance.now()
  const outcome = await settled(promise, what)
  const ms = performance.now() - started
  if ('value' in outcome)
    throw new ContractViolation(`${what} was expected to fail, and returned ${shown(outcome.value)} after ${Math.round(ms)} ms.`)
  return { error: outcome.error, ms }
}

/** `promise`'s outcome, or a violation when it takes longer than {@link STUCK_MS}. */
export async function settled<T>(promise: Promise<T>, what: string): Promise<{ value: T } | { error: unknown }> {
  let timer: ReturnType<typeof setTimeout> | undefined
  const stuck = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new ContractViolation(`${what} did not settle within ${STUCK_MS / 1000} s.`)), STUCK_MS)
  })
  try {
    return await Promise.race([
      promise.then(
        (value) => ({ value }),
        (error: unknown) => ({ error }),
      ),
      stuck,
    ])
  } finally {
    clearTimeout(timer)
  }
}

/** Checks that `error` is classified as one of `kinds`. */
export function expectClassified(dialect: IdempotencyDialect, error: unknown, kinds: readonly string[], what: string): void {
  const kind = dialect.classify(error)
  expectThat(
    kind !== undefined && kinds.includes(kind),
    `${what} failed with ${describeError(error)}, which classify() maps to ${shown(kind)} instead of ${kinds.map((k) => `'${k}'`).join(' or ')}.`,
  )
}

export function describeError(error: unknown): string {
  if (!(error instanceof Error)) return shown(error)
  const code = (error as { code?: unknown }).code
  const errno = (error as { errno?: unknown }).errno
  return `${error.name}${code !== undefined ? ` (code ${shown(code)}${errno !== undefined ? `, errno ${shown(errno)}` : ''})` : ''}: ${error.message}`
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}
