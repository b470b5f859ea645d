import { inject, describe, expect, it } from 'vitest'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Kysely } from 'kysely'
import { DialectContractError, dialectChecks, exerciseDialect, type CheckId, type DialectTarget } from '../testing/index.js'
import { ALL_TARGETS, openDatabase, PGLITE_LOCATION, type Target } from './support/databases.js'
import { targetsFor } from './support/harness.js'

const ONE_WRITER = 'SQLite has one writer at a time: a second writer waits for the write lock, so rows are never locked one by one'
const BUSY_TIMEOUT = "SQLite waits for the connection's busy timeout, not for the statement's own wait (SPEC §4.2)"
const SYNCHRONOUS =
  'better-sqlite3 waits for a lock synchronously, blocking the process: a holder in the same process cannot end while its competitor waits'

/** What each target cannot show of the contract, and why. */
function notApplicable(target: Target): Partial<Record<CheckId, string>> {
  if (target.database !== 'sqlite') return {}
  return {
    'claim-waits': SYNCHRONOUS,
    'lock-wait-restored': SYNCHRONOUS,
    'claim-wait-zero': BUSY_TIMEOUT,
    'claim-wait-bounded': BUSY_TIMEOUT,
    'lock-wait-bounded': BUSY_TIMEOUT,
    'classify-deadlock': ONE_WRITER,
    'prune-skips-locked': ONE_WRITER,
  }
}

/** The target's database, and a second instance on it where its pool cannot lend two connections (SQLite: the same file). */
function open(target: Target): { target: DialectTarget; close(): Promise<void> } {
  const dir = target.driver === 'better-sqlite3' ? mkdtempSync(join(tmpdir(), 'kidem-contract-')) : undefined
  const location = dir
    ? join(dir, 'contract.db')
    : target.driver === 'pglite'
      ? PGLITE_LOCATION
      : inject('locations')[target.server ?? (target.database as 'postgres' | 'mysql')]!
  const db: Kysely<any> = openDatabase(target.driver, location)
  const second: Kysely<any> | undefined = dir ? openDatabase(target.driver, location) : undefined
  return {
    target: {
      db,
      ...(target.dialect ? { dialect: target.dialect() } : {}),
      competitor: target.driver === 'pglite' ? false : (second ?? db),
      notApplicable: notApplicable(target),
    },
    async close() {
      await second?.destroy()
      await db.destroy()
      if (dir) rmSync(dir, { recursive: true, force: true })
    },
  }
}

for (const target of targetsFor('dialect contract')) {
  describe(`dialect contract: ${target.id}`, () => {
    // Listing the checks opens nothing; each check opens its own instances, since a failed check
    // may leave a connection waiting.
    const listing: DialectTarget = {
      db: {} as Kysely<unknown>,
      competitor: target.driver === 'pglite' ? false : undefined,
      notApplicable: notApplicable(target),
    }
    for (const check of dialectChecks(listing)) {
      const test = check.notApplicable === undefined ? it : it.skip
      test(check.notApplicable === undefined ? check.title : `${check.title} (N/A: ${check.notApplicable})`, async () => {
        const opened = open(target)
        try {
          await dialectChecks(opened.target)
            .find((c) => c.id === check.id)!
            .run()
        } finally {
          await opened.close()
        }
      }, 60_000)
    }
  })
}

describe('the dialect contract kit', () => {
  it('reports every check that failed, after running them all, and names what the dialect did', async () => {
    const opened = open(ALL_TARGETS.find((t) => t.id === 'sqlite')!)
    const { dialect: _, ...rest } = opened.target
    const broken = { ...(await import('../index.js')).sqliteDialect, classify: () => undefined }
    try {
      const failure = await exerciseDialect({ ...rest, dialect: broken }).catch((error: unknown) => error)
      expect(failure).toBeInstanceOf(DialectContractError)
      const report = (failure as DialectContractError).report
      expect(report.failed.map((f) => f.id).sort()).toEqual(['classify-serialization', 'classify-undefined-table', 'lock-latest'])
      expect((failure as Error).message).toMatch(/classify-undefined-table: .*\n.*maps to undefined instead of 'undefined_table'/)
      expect(report.passed.length + report.notApplicable.length + report.failed.length).toBe(dialectChecks(opened.target).length)
    } finally {
      await opened.close()
    }
  }, 120_000)

  it('fails a competing check with what to do, instead of hanging, when the target lends one connection and names no competitor', async () => {
    const opened = open(ALL_TARGETS.find((t) => t.id === 'sqlite')!)
    const { competitor: _, ...alone } = opened.target
    try {
      const check = dialectChecks(alone).find((c) => c.id === 'lock-latest')!
      expect(check.notApplicable).toBeUndefined()
      await expect(check.run()).rejects.toThrow(/lends one connection at a time\. Pass a second Kysely instance on the same database as competitor/)
    } finally {
      await opened.close()
    }
  }, 60_000)

  it('refuses a table prefix that is not a plain identifier', () => {
    expect(() => dialectChecks({ db: {} as Kysely<unknown>, dialect: {} as never, tablePrefix: 'x; drop table y' })).toThrow(TypeError)
  })
})
