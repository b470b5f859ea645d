import { execFile, execFileSync } from 'node:child_process'
import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { promisify } from 'node:util'
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest'
import { sql, type Kysely } from 'kysely'
import { Migrator } from './support/migrator.js'
import { createIdempotency, idempotencyMigrations, migrationTables, type Codec } from '../index.js'
import { detectDialect } from '../dialects/registry.js'
import { openDatabase, type DatabaseName } from './support/databases.js'
import { selectedTargets } from './support/harness.js'
import { sleep } from './support/util.js'

const root = join(import.meta.dirname, '..')
const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string; bin: Record<string, string> }
const bin = join(root, manifest.bin['kysely-idempotency']!)
const exec = promisify(execFile)

interface Outcome {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

/** Runs the built CLI; never throws on a non-zero exit. */
async function cli(args: string[], env: Record<string, string | undefined> = {}): Promise<Outcome> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [bin, ...args], { env: { ...process.env, DATABASE_URL: '', NO_COLOR: '1', ...env } })
    return { code: 0, stdout, stderr }
  } catch (error) {
    const e = error as { code: number; stdout: string; stderr: string }
    return { code: e.code, stdout: e.stdout, stderr: e.stderr }
  }
}

/** The DDL `sql` prints, migration by migration (each follows a `-- <name>` line). */
async function printedMigrations(dialect: string, table: string): Promise<Array<[string, string[]]>> {
  const printed = await cli(['sql', '--dialect', dialect, '--table', table])
  expect(printed.code, printed.stderr).toBe(0)
  return printed.stdout
    .split(/^-- /m)
    .filter(Boolean)
    .map((part) => {
      const [name, ...rest] = part.split('\n')
      return [
        name!,
        rest
          .join('\n')
          .split(';\n')
          .filter((statement) => statement.trim()),
      ]
    })
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

    const refused = await cli(['down', '--url', url(), '--table', table])
    expectOneLine(refused, new RegExp(`down drops the table "${table}" with its 2 keys, and its migration history; pass --yes to confirm`))
    expect((await cli(['status', '--url', url(), '--table', table])).code).toBe(0)
    const down = await cli(['down', '--url', url(), '--table', table, '--yes'])
    expect(down.stdout).toContain(`Dropped the table "${table}" with its 2 keys, and its migration history.`)
    const after = await cli(['status', '--url', url(), '--table', table, '--json'])
    expect(after.code).toBe(2)
    expect(JSON.parse(after.stdout)).toEqual({
      table,
      upToDate: false,
      tableExists: false,
      migrations: [
        { name: `kysely_idempotency_${table}_0001_create`, appliedAt: null },
        { name: `kysely_idempotency_${table}_0002_codec`, appliedAt: null },
        { name: `kysely_idempotency_${table}_0003_recovery`, appliedAt: null },
      ],
      keys: null,
    })
    const db2 = openDatabase(database, location())
    try {
      // The history tables went with the table.
      for (const name of [table, `${table}_migration`, `${table}_migration_lock`]) expect(await hasTable(db2, name)).toBe(false)
    } finally {
      await db2.destroy()
    }
    // DATABASE_URL stands in for --url.
    const text = await cli(['status', '--table', table], { DATABASE_URL: url() })
    expect(text.code).toBe(2)
    expect(text.stdout).toContain('needs migrating')
  })

  it('down asks on a terminal, and drops only on yes', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    expect((await cli(['migrate', '--url', url(), '--table', table])).code).toBe(0)
    const onTerminal = (answer: string) =>
      execFileSync(
        'script',
        ['-qec', [process.execPath, bin, 'down', '--url', url(), '--table', table].map((a) => JSON.stringify(a)).join(' '), '/dev/null'],
        {
          encoding: 'utf8',
          input: `${answer}\n`,
          env: { ...process.env, NO_COLOR: '1' },
        },
      )
    const declined = onTerminal('n')
    expect(declined).toContain(`Drop the table "${table}" with its 0 keys, and its migration history? Replays of those keys are lost. [y/N]`)
    expect(declined).toContain('Nothing dropped.')
    expect((await cli(['status', '--url', url(), '--table', table])).code).toBe(0)
    expect(onTerminal('y')).toContain(`Dropped the table "${table}" with its 0 keys, and its migration history.`)
    expect((await cli(['status', '--url', url(), '--table', table])).code).toBe(2)
  })

  it('status exits 0 up to date and 2 pending, and --json says which, with the counts', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    expect((await cli(['status', '--url', url(), '--table', table])).code).toBe(2)
    expect((await cli(['migrate', '--url', url(), '--table', table])).code).toBe(0)
    const up = await cli(['status', '--url', url(), '--table', table, '--json'])
    expect(up.code, up.stderr).toBe(0)
    const report = JSON.parse(up.stdout)
    expect(report).toMatchObject({ table, upToDate: true, tableExists: true, keys: { live: 0, finished: 0, expired: 0, abandoned: 0 } })
    expect(report.migrations.map((m: { appliedAt: string }) => Number.isNaN(Date.parse(m.appliedAt)))).toEqual([false, false, false])
    expect((await cli(['down', '--url', url(), '--table', table, '--yes'])).code).toBe(0)
  })

  it('records a table made from the printed DDL with migrate --baseline, without changing it, and refuses a table that lacks a change', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    const dialect = { postgres: 'postgresql', mysql: 'mariadb', sqlite: 'sqlite' }[database]
    const printed = await printedMigrations(dialect, table)
    const db = openDatabase(database, location())
    try {
      // What Flyway or Prisma would do with the printed DDL, short of its last migration.
      for (const [, statements] of printed.slice(0, -1)) for (const statement of statements) await sql.raw(statement).execute(db)
      const before = await cli(['status', '--url', url(), '--table', table, '--json'])
      expect(before.code).toBe(2)
      expect(JSON.parse(before.stdout)).toMatchObject({ upToDate: false, tableExists: true })
      expect((await cli(['status', '--url', url(), '--table', table])).stdout).toContain('exists without a record of these migrations')

      expectOneLine(
        await cli(['migrate', '--url', url(), '--table', table, '--baseline']),
        new RegExp(`"${table}" predates migration 0003_recovery \\(it lacks flow_name, recovery_failures, recover_after\\)`),
      )
      expect(await hasTable(db, `${table}_migration`)).toBe(true)
      expect((await cli(['status', '--url', url(), '--table', table, '--json'])).code).toBe(2)

      for (const statement of printed.at(-1)![1]) await sql.raw(statement).execute(db)
      const baseline = await cli(['migrate', '--url', url(), '--table', table, '--baseline'])
      expect(baseline.code, baseline.stderr).toBe(0)
      expect(baseline.stdout).toContain(`[✓] kysely_idempotency_${table}_0003_recovery recorded`)
      const after = await cli(['status', '--url', url(), '--table', table])
      expect(after.code, after.stdout).toBe(0)
      expect(after.stdout).toContain('keys: 0 live')
      expect((await cli(['migrate', '--url', url(), '--table', table])).stdout).toContain('already up to date')
      const idempotency = createIdempotency({ db, tableName: table })
      expect(await idempotency.transaction('k', async () => new Date(7))).toEqual(new Date(7))
      expect(await idempotency.transaction('k', async () => new Date(8))).toEqual(new Date(7))
    } finally {
      await db.destroy()
    }
    expect((await cli(['down', '--url', url(), '--table', table, '--yes'])).stdout).toContain('with its 1 key')
    expectOneLine(await cli(['migrate', '--url', url(), '--table', table, '--baseline']), new RegExp(`no table "${table}" to record as migrated`))
  })

  it.skipIf(database === 'sqlite')("works on the table in the schema --schema names, as the app's withSchema does", async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    const schema = `${table}_s`
    const db = openDatabase(database, location())
    try {
      const migrated = await cli(['migrate', '--url', url(), '--table', table, '--schema', schema])
      expect(migrated.code, migrated.stderr).toBe(0)
      expect(migrated.stdout).toContain(`The table "${schema}.${table}" is up to date.`)
      await createIdempotency({ db: db.withSchema(schema), tableName: table }).transaction('k', async () => 1)
      expect((await cli(['status', '--url', url(), '--table', table, '--schema', schema])).stdout).toContain('keys: 0 live, 1 finished')
      // The connection's own schema has no such table.
      expect((await cli(['status', '--url', url(), '--table', table])).code).toBe(2)
      expect((await cli(['inspect', '--url', url(), '--table', table, '--schema', schema, '--key', 'k'])).stdout).toContain('finished')
    } finally {
      await (database === 'mysql' ? sql`drop database if exists ${sql.id(schema)}` : sql`drop schema if exists ${sql.id(schema)} cascade`).execute(db)
      await db.destroy()
    }
  })

  it('reads flows the app stored through its own codec with --codec, and lists them all, marked, without it', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    const module = join(dir, `${table}-codec.mjs`)
    // A codec as an app might write one: here it reverses the text, so the default codec cannot read it.
    writeFileSync(
      module,
      "export const codec = { name: 'reversed', encode: (v) => [...JSON.stringify(v)].reverse().join(''), decode: (t) => JSON.parse([...t].reverse().join('')) }\n",
    )
    const { codec } = (await import(pathToFileURL(module).href)) as { codec: Codec }
    const db = openDatabase(database, location())
    try {
      const app = createIdempotency({ db, tableName: table, codec })
      await app.migrate()
      await expect(
        app.run({ key: 'mine', request: { amount: 5 } }, async (flow) => (await flow.phase('one', async () => 1), Promise.reject(new Error('stop')))),
      ).rejects.toThrow('stop')
      const without = await cli(['abandoned', '--url', url(), '--table', table])
      expect(without.code, without.stderr).toBe(0)
      expect(without.stdout).toMatch(/mine +one +\? /)
      expect(without.stdout).toMatch(/1 of these cannot be read here .*codec "reversed".*Pass the app's codec with --codec\./)
      const listed = await cli(['abandoned', '--url', url(), '--table', table, '--codec', module, '--json'])
      expect(JSON.parse(listed.stdout)).toMatchObject([{ key: 'mine', attempts: 1, request: { amount: 5 }, unreadable: null }])
      expect((await cli(['inspect', '--url', url(), '--table', table, '--key', 'mine', '--codec', module])).stdout).toMatch(/attempts +1/)
      expectOneLine(
        await cli(['abandoned', '--url', url(), '--table', table, '--codec', join(dir, 'missing.mjs')]),
        /Cannot load the codec module .*missing\.mjs/,
      )
      await db.schema.dropTable(table).execute()
      for (const history of Object.values(migrationTables(table))) await db.schema.dropTable(history).execute()
    } finally {
      await db.destroy()
    }
  })

  it('status tells a table migrated by 0.1.0 (0001 recorded, 0002 pending) to migrate, not that it lacks a record', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    const db = openDatabase(database, location())
    try {
      const first = `kysely_idempotency_${table}_0001_create`
      const old = new Migrator({
        db,
        provider: { getMigrations: async () => ({ [first]: (await idempotencyMigrations({ tableName: table }).getMigrations())[first]! }) },
        ...migrationTables(table),
      })
      expect((await old.migrateToLatest()).error).toBeUndefined()
      const status = await cli(['status', '--url', url(), '--table', table])
      expect(status.code).toBe(2)
      expect(status.stdout).toContain(`[✓] ${first}`)
      expect(status.stdout).toContain(`The table "${table}" needs migrating: run kysely-idempotency migrate.`)
      expect(status.stdout).not.toContain('without a record')
      expect(JSON.parse((await cli(['status', '--url', url(), '--table', table, '--json'])).stdout)).toMatchObject({
        upToDate: false,
        tableExists: true,
      })
      expectOneLine(await cli(['migrate', '--url', url(), '--table', table, '--baseline']), new RegExp(`"${table}" predates migration 0002_codec`))
      expect((await cli(['migrate', '--url', url(), '--table', table])).code).toBe(0)
      expect((await cli(['status', '--url', url(), '--table', table])).code).toBe(0)
    } finally {
      await db.destroy()
    }
    await cli(['down', '--url', url(), '--table', table, '--yes'])
  })

  it('inspects and forgets one key, and refuses to forget a key an attempt holds', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    expect((await cli(['migrate', '--url', url(), '--table', table])).code).toBe(0)
    const db = openDatabase(database, location())
    try {
      const idempotency = createIdempotency({ db, tableName: table, lockTimeout: 60_000 })
      await idempotency.transaction({ key: 'order-1', scope: 'acct_1', request: 1 }, async () => 'stored')
      const json = await cli(['inspect', '--url', url(), '--table', table, '--key', 'order-1', '--scope', 'acct_1', '--json'])
      expect(json.code, json.stderr).toBe(0)
      expect(JSON.parse(json.stdout)).toMatchObject({ state: 'finished', recoveryPoint: 'finished', flowName: null, attempts: 1, lockedUntil: null })
      expect(Date.parse(JSON.parse(json.stdout).expiresAt)).toBeGreaterThan(Date.now())
      const text = await cli(['inspect', '--url', url(), '--table', table, '--key', 'order-1', '--scope', 'acct_1'])
      expect(text.stdout).toMatch(/^state +finished\nrecovery point +finished\n/)
      expect((await cli(['inspect', '--url', url(), '--table', table, '--key', 'order-1', '--json'])).stdout.trim()).toBe('null')
      expect((await cli(['forget', '--url', url(), '--table', table, '--key', 'order-1', '--scope', 'acct_1'])).stdout).toContain(
        'Forgot the key "order-1" in scope "acct_1".',
      )
      expect((await cli(['forget', '--url', url(), '--table', table, '--key', 'order-1', '--scope', 'acct_1'])).stdout).toContain('nothing to forget')
      expect(await idempotency.transaction({ key: 'order-1', scope: 'acct_1', request: 1 }, async () => 'again')).toBe('again')

      // A flow that stops in a step holds its lock until it runs out.
      let held!: () => void
      const running = idempotency.run({ key: 'held', request: 1 }, (flow) =>
        flow.step('wait', () => new Promise<number>((resolve) => (held = () => resolve(1)))),
      )
      await sleep(200)
      expect(JSON.parse((await cli(['inspect', '--url', url(), '--table', table, '--key', 'held', '--json'])).stdout)).toMatchObject({
        state: 'running',
      })
      expectOneLine(await cli(['forget', '--url', url(), '--table', table, '--key', 'held']), /"held" is held by a running attempt/)
      held()
      await running
      expectOneLine(await cli(['inspect', '--url', url(), '--table', table]), /Give the key with --key/)
    } finally {
      await db.destroy()
    }
    await cli(['down', '--url', url(), '--table', table, '--yes'])
  })

  it('migrate adopts a table that is in place without its history, making only what it lacks', async () => {
    const table = `cli_${Math.random().toString(36).slice(2, 8)}`
    const db = openDatabase(database, location())
    try {
      // The first migration only: the others are made by migrate.
      for (const statement of (await printedMigrations(database, table))[0]![1]) await sql.raw(statement).execute(db)
      const migrated = await cli(['migrate', '--url', url(), '--table', table])
      expect(migrated.code, migrated.stderr).toBe(0)
      expect((await cli(['status', '--url', url(), '--table', table])).code).toBe(0)
      const idempotency = createIdempotency({ db, tableName: table })
      expect(await idempotency.transaction('k', async () => 1n)).toBe(1n)
      expect(await idempotency.transaction('k', async () => 2n)).toBe(1n)

      const other = `${table}_x`
      await db.schema.createTable(other).addColumn('id', 'integer').addColumn('scope', 'text').execute()
      try {
        expectOneLine(
          await cli(['migrate', '--url', url(), '--table', other]),
          new RegExp(`"${other}" exists but lacks the columns key, fingerprint,.* not an idempotency table`),
        )
      } finally {
        await cli(['down', '--url', url(), '--table', other, '--yes'])
      }
    } finally {
      await db.destroy()
    }
    await cli(['down', '--url', url(), '--table', table, '--yes'])
  })

  it('reports a missing table in one line', async () => {
    for (const command of ['prune', 'abandoned']) {
      expectOneLine(await cli([command, '--url', url(), '--table', 'no_such_table']), /table "no_such_table" does not exist.*migrate/)
    }
  })
})

describe('the CLI without a database', () => {
  it('prints its version', async () => {
    for (const flag of ['--version', '-v']) {
      const r = await cli([flag])
      expect(r.code, r.stderr).toBe(0)
      expect(r.stdout.trim()).toBe(manifest.version)
    }
  })

  it('colours its help only on a terminal, and never with NO_COLOR', async () => {
    // citty would colour these; it must not when stdout is a pipe, whatever the environment.
    const plain = await cli(['--help'], { NO_COLOR: undefined, TEST: undefined, CI: undefined, VITEST: undefined, TERM: 'xterm-256color' })
    expect(plain.stdout).toContain('USAGE')
    // biome-ignore lint/suspicious/noControlCharactersInRegex: the escape that starts a color.
    expect(plain.stdout).not.toMatch(/\u001b\[/)
    const terminal = (noColor: string) =>
      execFileSync('script', ['-qec', `${JSON.stringify(process.execPath)} ${JSON.stringify(bin)} --help`, '/dev/null'], {
        encoding: 'utf8',
        env: { PATH: process.env.PATH, TERM: 'xterm-256color', ...(noColor ? { NO_COLOR: noColor } : {}) },
      })
    // biome-ignore lint/suspicious/noControlCharactersInRegex: the escape that starts a color.
    expect(terminal('')).toMatch(/\u001b\[/)
    // biome-ignore lint/suspicious/noControlCharactersInRegex: the escape that starts a color.
    expect(terminal('true')).not.toMatch(/\u001b\[/)
  })

  it('takes the URL schemes as --dialect names', async () => {
    for (const [alias, name] of [
      ['postgresql', 'postgres'],
      ['mariadb', 'mysql'],
      ['SQLite', 'sqlite'],
    ]) {
      const [a, b] = await Promise.all([cli(['sql', '--dialect', alias!]), cli(['sql', '--dialect', name!])])
      expect(a.code, a.stderr).toBe(0)
      expect(a.stdout).toBe(b.stdout)
    }
    expectOneLine(await cli(['sql', '--dialect', 'toString']), /--dialect postgres\|postgresql\|mysql\|mariadb\|sqlite, got "toString"/)
  })

  it('prints the DDL for each dialect without connecting', async () => {
    const dialects = {
      postgres: [/"phase_results" json/, /alter table "keys" add column "codec" varchar\(255\);\n/],
      mysql: [/`key` varbinary\(255\)/, /alter table `keys` convert to character set utf8mb4 collate utf8mb4_bin;\n/],
      sqlite: [/"expires_at" integer not null/, /alter table "keys" add column "codec" text;\n/],
    }
    for (const [dialect, patterns] of Object.entries(dialects)) {
      const r = await cli(['sql', '--dialect', dialect, '--table', 'keys'])
      expect(r.code, r.stderr).toBe(0)
      expect(r.stdout).toMatch(/^-- kysely_idempotency_keys_0001_create\ncreate table "?`?keys/)
      expect(r.stdout).toMatch(
        /\n-- kysely_idempotency_keys_0003_recovery\n(alter table .keys. add column .+;\n){3}create index .keys_recover_after. on .keys. \(.recover_after.\);\n$/,
      )
      expect(r.stdout).toMatch(/create index .keys_expires_at. on .keys. \(.expires_at.\);\n/)
      for (const pattern of patterns) expect(r.stdout).toMatch(pattern)
    }
  })

  it('shows help for every command', async () => {
    for (const command of [[], ['migrate'], ['status'], ['down'], ['sql'], ['prune'], ['abandoned'], ['inspect'], ['forget']]) {
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
    expectOneLine(await cli(['sql']), /--dialect postgres\|postgresql\|mysql\|mariadb\|sqlite\./)
    const unreachable = await cli(['status', '--url', 'postgres://postgres:secret@127.0.0.1:1/test'])
    expectOneLine(unreachable, /Cannot reach postgres:\/\/postgres:\*\*\*@127\.0\.0\.1:1\/test \(ECONNREFUSED\)/)
    expectOneLine(await cli(['status', '--url', 'mysql://root@127.0.0.1:1/test']), /Cannot reach .*ECONNREFUSED/)
    const debug = await cli(['status', '--url', 'postgres://postgres@127.0.0.1:1/test', '--debug'])
    expect(debug.code).not.toBe(0)
    expect(debug.stderr).toMatch(/\n\s+at /)
  })

  it('never prints a credential: a password with a raw @, password parameters, and DATABASE_URL', async () => {
    const url = 'postgres://app:p@ss/w0rd@127.0.0.1:1/test?sslpassword=keypass&password=s3cret&application_name=cli'
    for (const outcome of [
      await cli(['status', '--url', url]),
      await cli(['status'], { DATABASE_URL: url }),
      await cli(['status', '--url', url, '--debug']),
    ]) {
      expect(outcome.code).not.toBe(0)
      expect(outcome.stderr.split('\n')[0]).toContain('postgres://app:***@127.0.0.1:1/test?sslpassword=***&password=***&application_name=cli')
      // The stack trace --debug adds included.
      for (const secret of ['p@ss', 'ss/w0rd', 'w0rd', 'keypass', 's3cret']) expect(outcome.stderr + outcome.stdout).not.toContain(secret)
    }
    expectOneLine(
      await cli(['status', '--url', 'mysql://root:my@secret@127.0.0.1:1/test']),
      /^kysely-idempotency: Cannot reach mysql:\/\/root:\*\*\*@127\.0\.0\.1:1\/test /,
    )
    // Raw # and ? in a password: the URL cannot be read, and says so without the password.
    for (const url of [
      'postgres://app:s3cr#t@127.0.0.1:1/test',
      'postgres://app:s3cr?t@127.0.0.1:1/test',
      'mysql://app:p@ss#w0rd@127.0.0.1:1/test',
    ]) {
      const outcome = await cli(['status', '--url', url])
      expectOneLine(outcome, /:\/\/app:\*\*\*@127\.0\.0\.1:1\/test /)
      for (const secret of ['s3cr', 'w0rd', 'ss#']) expect(outcome.stderr + outcome.stdout).not.toContain(secret)
    }
    expectOneLine(await cli(['status', '--url', 'postgres://app:s3cr#t@127.0.0.1:1/test']), /is not a URL the driver can read; percent-encode/)
  })

  it("gives up on a server that never answers, and names a port that is another database's, in one line", async () => {
    const silent = createServer(() => {}).listen(0, '127.0.0.1')
    await new Promise((resolve) => silent.once('listening', resolve))
    try {
      const port = (silent.address() as AddressInfo).port
      for (const scheme of ['postgres', 'mysql']) {
        const started = Date.now()
        expectOneLine(
          await cli(['status', '--url', `${scheme}://u:pw@127.0.0.1:${port}/test`, '--connect-timeout', '1']),
          /did not answer within 1 s; is the server up/,
        )
        expect(Date.now() - started).toBeLessThan(8000)
      }
    } finally {
      silent.close()
    }
    if (databases.includes('mysql')) {
      const mysql = new URL(inject('locations').mysql!)
      expectOneLine(
        await cli(['status', '--url', `postgres://postgres@${mysql.host}/test`, '--connect-timeout', '3']),
        /did not answer as a PostgreSQL server does \(.*\); is that the port of a PostgreSQL server\?/,
      )
    }
  })

  it('names a mistyped command or option in one line, with the likely one, instead of help or nothing', async () => {
    expectOneLine(
      await cli(['migrat', '--url', join(dir, 'x.db')]),
      /^kysely-idempotency: Unknown command "migrat"; did you mean "migrate"\?; the commands are migrate, status/,
    )
    expectOneLine(await cli(['migrate', '--urll', join(dir, 'x.db')]), /Unknown option "--urll" for migrate; did you mean "--url"\?/)
    expectOneLine(await cli(['status', '--url', join(dir, 'x.db'), '--jsn']), /Unknown option "--jsn" for status; did you mean "--json"\?/)
    expectOneLine(await cli(['status', join(dir, 'x.db')]), /Unexpected argument ".*x\.db" for status/)
    expectOneLine(await cli(['--frobnicate']), /Unknown option "--frobnicate"/)
    // What is right still works: values after options, --opt=value, --no-flag, help.
    expect((await cli(['sql', '--dialect=sqlite', '--table', 'keys'])).code).toBe(0)
    expect((await cli(['migrate', '--help'])).code).toBe(0)
    expect((await cli(['status', '--no-json', '--url', join(dir, 'absent.db')])).stderr).toMatch(/Cannot open the SQLite file/)
  })

  it.each(databases.filter((d) => d !== 'sqlite'))('reports bad credentials on %s in one line', async (database) => {
    const url = new URL(inject('locations')[database]!)
    url.username = database === 'postgres' ? 'no_such_role' : url.username
    url.password = database === 'mysql' ? 'wrong-password' : ''
    expectOneLine(await cli(['status', '--url', url.toString()]), /server refused the connection/)
  })
})

/** Asks for this one table: listing them all races with other tests dropping theirs. */
async function hasTable(db: Kysely<unknown>, name: string): Promise<boolean> {
  return (await detectDialect(db).upgrades.columns(db, { schema: undefined, name })).length > 0
}
