import { execFile, execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest'
import { createIdempotency } from '../src/index.js'
import { openDatabase, type DatabaseName } from './support/databases.js'
import { selectedTargets } from './support/harness.js'
import { sleep } from './support/util.js'

const root = join(import.meta.dirname, '..')
const bin = join(root, 'dist', 'cli', 'index.js')
const exec = promisify(execFile)

interface Outcome {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/** Runs the built CLI; never throws on a non-zero exit. */
async function cli(args: string[], env: Record<string, string> = {}): Promise<Outcome> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [bin, ...args], { env: { ...process.env, DATABASE_URL: '', NO_COLOR: '1', ...env } })
    return { code: 0, stdout, stderr }
  } catch (error) {
    const e = error as { code: number; stdout: string; stderr: string }
    return { code: e.code, stdout: e.stdout, stderr: e.stderr }
  }
}

/** A failure as the CLI must report it: one line on stderr, no stack trace, a non-zero exit. */
function expectOneLine(outcome: Outcome, pattern: RegExp): void {
  expect(outcome.code, outcome.stdout).not.toBe(0)
  const lines = outcome.stderr.trim().split('\n')
  expect(lines, outcome.stderr).toHaveLength(1)
  expect(lines[0]).toMatch(/^kysely-idempotency: /)
  expect(lines[0]).toMatch(pattern)
}

let dir: string
beforeAll(() => {
  execFileSync('npm', ['run', 'build', '--silent'], { cwd: root, stdio: 'pipe' })
  dir = mkdtempSync(join(tmpdir(), 'kidem-cli-'))
})
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const databases = [...new Set(selectedTargets().map((t) => t.database))]

describe.each(databases)('the CLI on %s', (database: DatabaseName) => {
  const url = () => (database === 'sqlite' ? `sqlite:${join(dir, 'cli.db')}` : inject('locations')[database]!)
  const location = () => (database === 'sqlite' ? join(dir, 'cli.db') : url())

  it('migrates from two processes at once, reports status and counts, prunes, lists abandoned flows and migrates down', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    const both = await Promise.all([cli(['migrate', '--url', url(), '--table', table]), cli(['migrate', '--url', url(), '--table', table])])
    for (const r of both) expect(r.code, r.stderr).toBe(0)
    expect(both.map((r) => r.stdout).join('')).toContain(`[✓] kysely_idempotency_${table}_0001_create`)
    expect(both.map((r) => r.stdout).join('')).toContain(`[✓] kysely_idempotency_${table}_0002_codec`)
    expect((await cli(['migrate', '--url', url(), '--table', table])).stdout).toContain('already up to date')

    const db = openDatabase(database, location())
    const idempotency = createIdempotency({ db, tableName: table })
    try {
      await idempotency.transaction('finished', async () => 'done')
      await idempotency.transaction('expiring', async () => 'done', { ttl: 1 })
      await expect(
        idempotency.run({ key: 'stuck', scope: 'tenant' }, async (flow) => {
          await flow.phase('first', async () => 1)
          throw new Error('stop')
        }),
      ).rejects.toThrow('stop')
      await sleep(20)
    } finally {
      await db.destroy()
    }

    const status = await cli(['status', '--url', url(), '--table', table])
    expect(status.code, status.stderr).toBe(0)
    expect(status.stdout).toMatch(new RegExp(`\\[✓\\] kysely_idempotency_${table}_0001_create +applied`))
    expect(status.stdout).toContain('keys: 0 live, 1 finished, 1 expired, 1 abandoned')

    const listed = await cli(['abandoned', '--url', url(), '--table', table])
    expect(listed.stdout).toMatch(/tenant +stuck +first +1 /)
    const json = JSON.parse((await cli(['abandoned', '--url', url(), '--table', table, '--json'])).stdout)
    expect(json).toMatchObject([{ scope: 'tenant', key: 'stuck', recoveryPoint: 'first', attempts: 1, request: null }])
    expect((await cli(['abandoned', '--url', url(), '--table', table, '--older-than', '3600'])).stdout).toContain('No abandoned flows.')

    const pruned = await cli(['prune', '--url', url(), '--table', table, '--batch', '1'])
    expect(pruned.stdout).toContain(`Deleted 1 expired key from "${table}".`)

    expect((await cli(['down', '--url', url(), '--table', table])).stdout).toContain(`[✓] kysely_idempotency_${table}_0002_codec undone`)
    const down = await cli(['down', '--url', url(), '--table', table])
    expect(down.stdout).toContain(`[✓] kysely_idempotency_${table}_0001_create undone`)
    const after = await cli(['status', '--url', url(), '--table', table])
    expect(after.stdout).toContain('pending')
    expect(after.stdout).toContain('needs migrating')
    // DATABASE_URL stands in for --url.
    expect((await cli(['status', '--table', table], { DATABASE_URL: url() })).stdout).toContain('pending')
  })

  it('reports a missing table in one line', async () => {
    for (const command of ['prune', 'abandoned']) {
      expectOneLine(await cli([command, '--url', url(), '--table', 'no_such_table']), /table "no_such_table" does not exist.*migrate/)
    }
  })
})

describe('the CLI without a database', () => {
  it('prints the DDL for each dialect without connecting', async () => {
    const dialects = {
      postgres: [/"phase_results" json/, /alter table "keys" add column "codec" varchar\(255\);\n$/],
      mysql: [/`key` varbinary\(255\)/, /alter table `keys` convert to character set utf8mb4 collate utf8mb4_bin;\n$/],
      sqlite: [/"expires_at" integer not null/, /alter table "keys" add column "codec" text;\n$/],
    }
    for (const [dialect, patterns] of Object.entries(dialects)) {
      const r = await cli(['sql', '--dialect', dialect, '--table', 'keys'])
      expect(r.code, r.stderr).toBe(0)
      expect(r.stdout).toMatch(/^create table "?`?keys/)
      expect(r.stdout).toMatch(/create index .keys_expires_at. on .keys. \(.expires_at.\);\n/)
      for (const pattern of patterns) expect(r.stdout).toMatch(pattern)
    }
  })

  it('shows help for every command', async () => {
    for (const command of [[], ['migrate'], ['status'], ['down'], ['sql'], ['prune'], ['abandoned']]) {
      const r = await cli([...command, '--help'])
      expect(r.code, command.join(' ')).toBe(0)
      expect(r.stdout).toContain('USAGE')
    }
  })

  it('answers each kind of bad input with one line and a non-zero exit, and the stack with --debug', async () => {
    expectOneLine(await cli(['status', '--url', 'foo://example']), /Unknown database URL "foo:\/\/example"/)
    expectOneLine(await cli(['status']), /pass --url or set DATABASE_URL/)
    expectOneLine(await cli(['migrate', '--url', join(dir, 'x.db'), '--table', 'x;y']), /table name "x;y" is not a plain identifier/)
    expectOneLine(await cli(['status', '--url', join(dir, 'missing.db')]), /Cannot open the SQLite file/)
    expectOneLine(await cli(['prune', '--url', join(dir, 'x.db'), '--batch', 'lots']), /--batch must be a positive integer/)
    expectOneLine(await cli(['sql']), /--dialect postgres\|mysql\|sqlite/)
    const unreachable = await cli(['status', '--url', 'postgres://postgres:secret@127.0.0.1:1/test'])
    expectOneLine(unreachable, /Cannot reach postgres:\/\/postgres:\*\*\*@127\.0\.0\.1:1\/test \(ECONNREFUSED\)/)
    expectOneLine(await cli(['status', '--url', 'mysql://root@127.0.0.1:1/test']), /Cannot reach .*ECONNREFUSED/)
    const debug = await cli(['status', '--url', 'postgres://postgres@127.0.0.1:1/test', '--debug'])
    expect(debug.code).not.toBe(0)
    expect(debug.stderr).toMatch(/\n\s+at /)
  })

  it.each(databases.filter((d) => d !== 'sqlite'))('reports bad credentials on %s in one line', async (database) => {
    const url = new URL(inject('locations')[database]!)
    url.username = database === 'postgres' ? 'no_such_role' : url.username
    url.password = database === 'mysql' ? 'wrong-password' : ''
    expectOneLine(await cli(['status', '--url', url.toString()]), /server refused the connection/)
  })
})
