/**
 * The dialect contract kit (`kysely-idempotency/testing`): what the core relies on a dialect
 * module for, checked one promise at a time against a real database, so that a dialect's author
 * learns "the claim does not wait for a competing insert" rather than "a retry ran twice".
 * The library's own dialects run it on every target of its suite.
 */
import { sql, type Kysely } from 'kysely'
import { detectDialect } from '../dialects/registry.js'
import type { IdempotencyDialect } from '../src/dialect.js'
import { IdempotencySetupError } from '../src/errors.js'
import { CHECKS, type CheckId } from './checks.js'
import { ContractViolation, openScratch, type Scratch } from './scratch.js'

export type { CheckId } from './checks.js'

/** The database and dialect module {@link exerciseDialect} checks. */
export interface DialectTarget<DB = unknown> {
  /**
   * A Kysely instance on a database where the kit may create and drop tables (each check makes
   * its own, named after `tablePrefix`, and drops it).
   */
  readonly db: Kysely<DB>
  /** The dialect module under test. Default: the one the package detects for `db`. */
  readonly dialect?: IdempotencyDialect
  /**
   * Where the checks of competing transactions run their second transaction: a second Kysely
   * instance on the same database, or `db` itself (the default), whose pool must then lend two
   * connections at once. `false` for a database with a single connection: those checks are then
   * not applicable.
   */
  readonly competitor?: Kysely<DB> | false
  /** Checks that cannot apply to this database, each with the reason, which the report shows. */
  readonly notApplicable?: Readonly<Partial<Record<CheckId, string>>>
  /** Prefix of the tables the checks create: a plain identifier of at most 30 characters. Default `kidem_contract`. */
  readonly tablePrefix?: string
}

/** One promise of the dialect contract, ready to run (for a test runner: `it(check.title, check.run)`). */
export interface DialectCheck {
  readonly id: CheckId
  /** What the check expects of the dialect, as a sentence. */
  readonly title: string
  /** Why the check cannot apply to this target, or `undefined` when it does. */
  readonly notApplicable: string | undefined
  /** Runs the check; rejects with an error that says what the dialect did instead. Resolves at once when not applicable. */
  run(): Promise<void>
}

/** What {@link exerciseDialect} found. */
export interface DialectReport {
  readonly passed: readonly CheckId[]
  readonly notApplicable: ReadonlyArray<{ readonly id: CheckId; readonly reason: string }>
  readonly failed: ReadonlyArray<{ readonly id: CheckId; readonly title: string; readonly error: unknown }>
}

/** The dialect broke the contract: every failed check, with what it found. */
export class DialectContractError extends AggregateError {
  override readonly name = 'DialectContractError'

  constructor(readonly report: DialectReport) {
    super(
      report.failed.map((failure) => failure.error),
      `The dialect failed ${report.failed.length} of ${report.failed.length + report.passed.length} contract checks:\n` +
        report.failed.map((f) => `- ${f.id}: ${f.title}\n  ${f.error instanceof Error ? f.error.message : String(f.error)}`).join('\n'),
    )
  }
}

/** The checks of the contract for `target`, each to run on its own (with a test runner's `it`, say). */
export function dialectChecks<DB>(target: DialectTarget<DB>): DialectCheck[] {
  const prefix = target.tablePrefix ?? 'kidem_contract'
  if (!/^[A-Za-z_][A-Za-z0-9_]{0,29}$/.test(prefix)) {
    throw new TypeError(`The tablePrefix ${JSON.stringify(prefix)} is not a plain identifier of at most 30 characters.`)
  }
  // The kit's own tables are its only business with the database, whatever tables DB describes.
  const db = target.db as unknown as Kysely<unknown>
  const competitor = target.competitor === false ? undefined : ((target.competitor ?? target.db) as unknown as Kysely<unknown>)
  return CHECKS.map((check) => {
    const notApplicable =
      target.notApplicable?.[check.id] ?? (check.competing && !competitor ? 'the target has no second connection (competitor: false)' : undefined)
    return {
      id: check.id,
      title: check.title,
      notApplicable,
      run: async () => {
        if (notApplicable !== undefined) return
        const scratch = await openScratch(db, competitor, target.dialect ?? detectDialect(db), prefix)
        try {
          if (check.competing) await secondConnection(scratch)
          await check.run(scratch)
        } finally {
          await scratch.close()
        }
      },
    }
  })
}

/**
 * Fails clearly, instead of waiting forever, when the competitor cannot run a statement while
 * `db` holds a transaction (a pool of one connection, and no second instance given).
 */
async function secondConnection(scratch: Scratch): Promise<void> {
  const held = await scratch.hold(scratch.db, async () => undefined)
  try {
    const probe = await Promise.race([
      sql`select 1`.execute(scratch.competitor).then(() => true),
      new Promise<false>((resolve) => setTimeout(() => resolve(false), 5000).unref()),
    ])
    if (!probe) {
      throw new ContractViolation(
        "The competitor could not run a statement while db held a transaction: db's pool lends one connection at a time. " +
          'Pass a second Kysely instance on the same database as competitor, or competitor: false.',
      )
    }
  } finally {
    await held.trx.rollback().execute()
  }
}

/**
 * Runs every check of the dialect contract on `target`, one after the other, and reports what
 * passed, what does not apply and what failed; rejects with {@link DialectContractError} when
 * any failed, after running them all. Rejects at once with the library's `IdempotencySetupError`
 * when the target is one the library refuses (a `withSchema` instance on SQLite, say).
 *
 * ### Examples
 *
 * ```ts
 * import { Kysely, PostgresDialect } from 'kysely'
 * import pg from 'pg'
 * import { exerciseDialect } from 'kysely-idempotency/testing'
 *
 * const db = new Kysely<unknown>({ dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: process.env.DATABASE_URL }) }) })
 * const report = await exerciseDialect({ db })
 * console.log(`${report.passed.length} checks passed`)
 * ```
 */
export async function exerciseDialect<DB>(target: DialectTarget<DB>): Promise<DialectReport> {
  const passed: CheckId[] = []
  const notApplicable: Array<{ id: CheckId; reason: string }> = []
  const failed: Array<{ id: CheckId; title: string; error: unknown }> = []
  for (const check of dialectChecks(target)) {
    if (check.notApplicable !== undefined) {
      notApplicable.push({ id: check.id, reason: check.notApplicable })
      continue
    }
    try {
      await check.run()
      passed.push(check.id)
    } catch (error) {
      // A target the library refuses (withSchema where the dialect has no schemas) fails every
      // check alike, before any of the dialect's statements run: said once, not blamed on the dialect.
      if (error instanceof IdempotencySetupError) throw error
      failed.push({ id: check.id, title: check.title, error })
    }
  }
  const report = { passed, notApplicable, failed }
  if (failed.length) throw new DialectContractError(report)
  return report
}
