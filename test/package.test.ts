import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { inject } from 'vitest'
import { selectedTargets } from './support/harness.js'

const root = resolve(import.meta.dirname, '..')
const run = (file: string, args: string[], cwd: string) =>
  execFileSync(process.execPath, [file, ...args], { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })

/** What a user's project does with the installed package, against one database. */
const CONSUMER = `
import { Kysely, MysqlDialect, PostgresDialect, SqliteDialect } from 'kysely'
import { createIdempotency, IdempotencyKeyReuseError } from 'kysely-idempotency'
const [database, location] = process.argv.slice(2)
const dialect = {
  postgres: async () => new PostgresDialect({ pool: new (await import('pg')).default.Pool({ connectionString: location }) }),
  mysql: async () => new MysqlDialect({ pool: (await import('mysql2')).createPool({ uri: location }) }),
  sqlite: async () => new SqliteDialect({ database: new (await import('better-sqlite3')).default(location) }),
}[database]
const db = new Kysely({ dialect: await dialect() })
const tableName = 'pack_' + process.pid
const idempotency = createIdempotency({ db, tableName })
await idempotency.migrate()
const first = await idempotency.executeTransaction({ key: 'k', request: 1 }, async () => ({ ok: true }))
const again = await idempotency.executeTransaction({ key: 'k', request: 1 }, async () => ({ ok: false }))
const reuse = await idempotency.transaction({ key: 'k', request: 2 }, async () => 0).catch((e) => e instanceof IdempotencyKeyReuseError)
const flow = async (flow) => (await flow.phase('one', async () => 1)) + (await flow.step('two', async () => 2))
const phases = [await idempotency.executeRun('f', flow), await idempotency.executeRun('f', flow)]
for (const t of [tableName, tableName + '_migration', tableName + '_migration_lock']) await db.schema.dropTable(t).execute()
await db.destroy()
console.log(JSON.stringify({ first, again, reuse, phases }))
`

/** `names` and, transitively, the packages they depend on. */
function withDependencies(names: string[]): string[] {
  const found = new Set<string>()
  const visit = (name: string) => {
    if (found.has(name)) return
    found.add(name)
    const manifest = JSON.parse(readFileSync(join(root, 'node_modules', name, 'package.json'), 'utf8')) as { dependencies?: Record<string, string> }
    for (const dependency of Object.keys(manifest.dependencies ?? {})) visit(dependency)
  }
  names.forEach(visit)
  return [...found]
}

describe('the packed package', () => {
  let project: string
  beforeAll(() => {
    project = mkdtempSync(join(tmpdir(), 'kidem-pack-'))
    const tarball = execFileSync('npm', ['pack', '--silent', '--pack-destination', project], { cwd: root, encoding: 'utf8' }).trim().split('\n').at(-1)!
    const installed = join(project, 'node_modules', 'kysely-idempotency')
    mkdirSync(installed, { recursive: true })
    execFileSync('tar', ['-xzf', join(project, tarball), '-C', installed, '--strip-components=1'])
    // Installing from the registry would need the network; the peers and the runtime
    // dependencies (with theirs) are linked from this checkout.
    const { dependencies } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { dependencies: Record<string, string> }
    for (const name of new Set(['kysely', 'pg', 'mysql2', 'better-sqlite3', 'express', ...withDependencies(Object.keys(dependencies))])) {
      symlinkSync(join(root, 'node_modules', name), join(project, 'node_modules', name))
    }
    writeFileSync(join(project, 'package.json'), JSON.stringify({ type: 'module', private: true }))
    writeFileSync(join(project, 'consumer.mjs'), CONSUMER)
  }, 120_000)
  afterAll(() => rmSync(project, { recursive: true, force: true }))

  it('ships built code and type declarations, and no tests', () => {
    const files = readdirSync(join(project, 'node_modules', 'kysely-idempotency'), { recursive: true }).map(String)
    expect(files).toContain(join('dist', 'src', 'index.js'))
    expect(files).toContain(join('dist', 'src', 'index.d.ts'))
    expect(files.some((f) => f.includes('test'))).toBe(false)
  })

  it('runs the command-line tool named in bin', () => {
    const installed = join(project, 'node_modules', 'kysely-idempotency')
    const { bin } = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8')) as { bin: Record<string, string> }
    const output = run(join(installed, bin['kysely-idempotency']!), ['sql', '--dialect', 'sqlite'], project)
    expect(output).toMatch(/^create table "idempotency_keys"/)
  })

  it('runs the demo API and its self-test', () => {
    const output = run(join(project, 'node_modules', 'kysely-idempotency', 'examples', 'demo.mjs'), ['--selftest'], project)
    expect(output).toContain('selftest passed: one charge per key and customer')
  })

  it('runs the README quick start', () => {
    const output = run(join(project, 'node_modules', 'kysely-idempotency', 'examples', 'quick-start.mjs'), [], project)
    expect(output).toContain('replayed: true')
    expect(output).toContain('IdempotencyKeyReuseError 422')
    expect(output).toContain('orders in the table: 1')
  })

  const databases = [...new Set(selectedTargets().map((t) => t.database))]
  it.each(databases)('works from a consumer project on %s', (database) => {
    const location = database === 'sqlite' ? join(project, 'consumer.db') : inject('locations')[database]!
    const result = JSON.parse(run(join(project, 'consumer.mjs'), [database, location], project))
    expect(result).toEqual({
      first: { value: { ok: true }, replayed: false },
      again: { value: { ok: true }, replayed: true },
      reuse: true,
      phases: [{ value: 3, replayed: false }, { value: 3, replayed: true }],
    })
  })
})
