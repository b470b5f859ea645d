import { execFile, execFileSync, spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { promisify } from 'node:util'
import { publint } from 'publint'
import { formatMessage } from 'publint/utils'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { inject } from 'vitest'
import { selectedTargets } from './support/harness.js'

const root = resolve(import.meta.dirname, '..')
/** The package's subpaths (`express`, `nest`, `testing`…), as its exports name them. */
const SUBPATHS = Object.keys((JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { exports: Record<string, unknown> }).exports)
  .filter((entry) => entry !== '.' && entry !== './package.json')
  .map((entry) => entry.slice(2))
const run = (file: string, args: string[], cwd: string) =>
  execFileSync(process.execPath, [file, ...args], { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })

/** What a user's project does with the installed package, against one database. */
const CONSUMER = `
import { Kysely, MysqlDialect, PostgresDialect, SqliteDialect } from 'kysely'
import { createIdempotency, IdempotencyKeyReuseError } from 'kysely-idempotency'
import { exerciseDialect } from 'kysely-idempotency/testing'
const [driver, location] = process.argv.slice(2)
const dialect = {
  pg: async () => new PostgresDialect({ pool: new (await import('pg')).default.Pool({ connectionString: location }) }),
  'postgres-js': async () => new (await import('kysely-postgres-js')).PostgresJSDialect({ postgres: (await import('postgres')).default(location, { onnotice() {} }) }),
  pglite: async () => new (await import('kysely')).PGliteDialect({ pglite: new (await import('@electric-sql/pglite')).PGlite() }),
  mysql2: async () => new MysqlDialect({ pool: (await import('mysql2')).createPool({ uri: location }) }),
  'better-sqlite3': async () => new SqliteDialect({ database: new (await import('better-sqlite3')).default(location) }),
}[driver]
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
// The dialect contract kit from the packed package, once, on a server with a pool (test/contract.test.ts runs it on every target).
const contract = driver === 'pg' ? await exerciseDialect({ db }) : undefined
await db.destroy()
console.log(JSON.stringify({ first, again, reuse, phases, ...(contract ? { contract: contract.passed.length } : {}) }))
`

/**
 * A CommonJS project: `require` of both entry points, a transaction on SQLite and its replay
 * (values only superjson restores, so its ES module is loaded right through require(esm)), an
 * Express route, and `import()` of the same package in the same process: two copies of each
 * error class, each recognising the other's errors.
 */
const CJS_CONSUMER = `
'use strict'
const { Kysely, SqliteDialect } = require('kysely')
const Database = require('better-sqlite3')
const express = require('express')
const cjs = require('kysely-idempotency')
const cjsExpress = require('kysely-idempotency/express')
const cjsNest = require('kysely-idempotency/nest')

async function main() {
  const esm = await import('kysely-idempotency')
  const esmExpress = await import('kysely-idempotency/express')
  const esmNest = await import('kysely-idempotency/nest')
  const db = new Kysely({ dialect: new SqliteDialect({ database: new Database(process.argv[2]) }) })
  const idempotency = cjs.createIdempotency({ db })
  await idempotency.migrate()
  await db.schema.createTable('orders').addColumn('id', 'integer', (c) => c.primaryKey()).addColumn('item', 'text').execute()
  const insert = async (trx, item) => (await trx.insertInto('orders').values({ item }).returning('id').executeTakeFirstOrThrow()).id
  const place = (key, item) => idempotency.executeTransaction({ key, request: { item } }, async (trx) => ({ id: await insert(trx, item), at: new Date(0), big: 10n }))
  const first = await place('k1', 'book')
  const again = await place('k1', 'book')

  const app = express()
  app.use(express.json())
  app.post('/orders', cjsExpress.idempotent(idempotency, { scope: () => 'customer-1' }, async (req, trx) => ({ status: 201, body: { id: await insert(trx, req.body.item) } })))
  const server = await new Promise((ok) => { const s = app.listen(0, '127.0.0.1', () => ok(s)) })
  const post = async () => {
    const response = await fetch('http://127.0.0.1:' + server.address().port + '/orders', {
      method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': 'e1' }, body: JSON.stringify({ item: 'pen' }),
    })
    return { status: response.status, replayed: response.headers.get('idempotency-replayed'), body: await response.json() }
  }
  const http = [await post(), await post()]
  await new Promise((ok) => server.close(ok))

  const fromCjs = await place('k1', 'other').catch((e) => e)
  // Each copy gets a Kysely of its own kind: its dialect is recognised by Kysely's adapter classes.
  const kysely = await import('kysely')
  const esmDb = new kysely.Kysely({ dialect: new kysely.SqliteDialect({ database: new Database(':memory:') }) })
  const fromEsm = await esm.createIdempotency({ db: esmDb }).transaction({ key: '', request: 1 }, async () => 1).catch((e) => e)
  await esmDb.destroy()
  const conflict = new esm.IdempotencyConflictError('in_flight', 'held', { retryAfter: 1 })
  const orders = (await db.selectFrom('orders').select('id').execute()).length
  await db.destroy()
  console.log(JSON.stringify({
    first: { ...first, value: { id: first.value.id } },
    again: { replayed: again.replayed, id: again.value.id, date: again.value.at instanceof Date && again.value.at.getTime(), bigint: again.value.big === 10n },
    http,
    orders,
    resolved: [require.resolve('kysely-idempotency'), require.resolve('kysely-idempotency/express')].map((f) => f.slice(f.indexOf('dist'))),
    // superjson is an ES module; require(esm) hands the compiled require() its namespace.
    superjson: (({ __esModule, default: d }) => ({ __esModule, default: typeof d }))(require('superjson')),
    copies: {
      distinct: cjs.IdempotencyError !== esm.IdempotencyError && cjsExpress.idempotent !== esmExpress.idempotent,
      requireKinds: [typeof cjs.createIdempotency, typeof cjsExpress.idempotent, typeof cjsExpress.idempotentFlow, typeof cjsNest.Idempotent],
      importKinds: [typeof esm.createIdempotency, typeof esmExpress.idempotent, typeof esmExpress.idempotentFlow, typeof esmNest.Idempotent],
    },
    fromCjs: {
      name: fromCjs.name,
      own: fromCjs instanceof cjs.IdempotencyKeyReuseError,
      esmClass: fromCjs instanceof esm.IdempotencyKeyReuseError,
      esmBase: fromCjs instanceof esm.IdempotencyError,
      esmOther: fromCjs instanceof esm.IdempotencyConflictError,
    },
    fromEsm: {
      name: fromEsm.name,
      own: fromEsm instanceof esm.InvalidIdempotencyKeyError,
      cjsClass: fromEsm instanceof cjs.InvalidIdempotencyKeyError,
      cjsBase: fromEsm instanceof cjs.IdempotencyError,
      cjsOther: fromEsm instanceof cjs.IdempotencyKeyReuseError,
    },
    conflict: conflict instanceof cjs.IdempotencyConflictError && conflict instanceof cjs.IdempotencyError && !(conflict instanceof cjs.IdempotencyKeyReuseError),
    plain: new Error('x') instanceof cjs.IdempotencyError || null instanceof cjs.IdempotencyError,
  }))
}
main().catch((error) => { console.error(error); process.exitCode = 1 })
`

/**
 * A TypeScript consumer, compiled (not run) under each module resolution mode. The
 * `@ts-expect-error` lines fail the compilation if the package's types resolve to `any`.
 */
const TYPES_CONSUMER = `
import { createIdempotency, IdempotencyConflictError, type Idempotency } from 'kysely-idempotency'
import { idempotent } from 'kysely-idempotency/express'
import { idempotent as fetchIdempotent } from 'kysely-idempotency/fetch'
import { Kysely, type Generated, type Transaction } from 'kysely'

interface DB { orders: { id: Generated<number>; item: string } }
declare const db: Kysely<DB>

const idempotency: Idempotency<DB> = createIdempotency({ db, tableName: 'idempotency_keys' })
const transaction: Idempotency<DB>['transaction'] = idempotency.transaction
export const placed: Promise<{ value: number; replayed: boolean }> = idempotency.executeTransaction({ key: 'k' }, async (trx: Transaction<DB>) => {
  const { id } = await trx.insertInto('orders').values({ item: 'book' }).returning('id').executeTakeFirstOrThrow()
  return id
})
// @ts-expect-error tableName is a string
createIdempotency({ db, tableName: 42 })
// @ts-expect-error the function returns a number
export const wrong: Promise<string> = transaction({ key: 'k' }, async () => 1)

export function code(err: unknown): 'conflict' | undefined {
  if (!(err instanceof IdempotencyConflictError)) return undefined
  const c: 'conflict' = err.code
  const seconds: number = err.retryAfter
  // @ts-expect-error code is the literal 'conflict'
  const other: 'key_reuse' = err.code
  return seconds >= 0 && other ? c : c
}

export const route: (req: any, res: any, next: (error?: unknown) => void) => void = idempotent(
  idempotency,
  { scope: (req) => req.get('x-customer') ?? 'anonymous' },
  async (req, trx) => ({ status: 201, body: { method: req.method, id: (await trx.selectFrom('orders').select('id').executeTakeFirst())?.id } }),
)
// @ts-expect-error scope is required
idempotent(idempotency, {}, async () => ({ status: 200 }))
export const handler: (request: Request, context: { params: Promise<{ id: string }> }) => Promise<Response> = fetchIdempotent(
  idempotency,
  { scope: async (_request, context: { params: Promise<{ id: string }> }) => (await context.params).id },
  async (request, trx, context) => new Response(JSON.stringify({ url: request.url, id: (await context.params).id, trx: trx.isTransaction }), { status: 201 }),
)
// @ts-expect-error the handler answers a Response or a result, not a string
fetchIdempotent(idempotency, { scope: () => 'a' }, async () => 'text')
`

/**
 * Each TypeScript resolution mode a consumer may use: its compiler options and its files. Kysely
 * 0.29 is an ES module only, so a CommonJS file reaches its types (and ours, which name them)
 * under `nodenext` (require of ES modules, TypeScript 5.8+), not under `node16`, which refuses
 * Kysely itself there.
 */
const TYPE_MODES: Record<string, { compilerOptions: Record<string, string>; files: string[] }> = {
  node10: { compilerOptions: { module: 'commonjs', moduleResolution: 'node10' }, files: ['node10.ts'] },
  node16: { compilerOptions: { module: 'node16', moduleResolution: 'node16' }, files: ['node16.mts'] },
  nodenext: { compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext' }, files: ['nodenext.cts', 'nodenext.mts'] },
  bundler: { compilerOptions: { module: 'esnext', moduleResolution: 'bundler' }, files: ['bundler.ts'] },
}

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
  let tarballPath: string
  beforeAll(() => {
    project = mkdtempSync(join(tmpdir(), 'kidem-pack-'))
    const tarball = execFileSync('npm', ['pack', '--silent', '--pack-destination', project], { cwd: root, encoding: 'utf8' })
      .trim()
      .split('\n')
      .at(-1)!
    tarballPath = join(project, tarball)
    const installed = join(project, 'node_modules', 'kysely-idempotency')
    mkdirSync(installed, { recursive: true })
    execFileSync('tar', ['-xzf', tarballPath, '-C', installed, '--strip-components=1'])
    // Installing from the registry would need the network; the peers and the runtime
    // dependencies (with theirs) are linked from this checkout.
    const { dependencies } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { dependencies: Record<string, string> }
    // ...and the type declarations a TypeScript consumer would have installed.
    const types = withDependencies(['@types/node', '@types/express', '@types/better-sqlite3'])
    const drivers = ['pg', 'postgres', '@electric-sql/pglite', 'mysql2', 'better-sqlite3']
    const frameworks = withDependencies(['fastify', '@nestjs/common', 'rxjs'])
    for (const name of new Set(['kysely', ...drivers, 'express', ...frameworks, ...withDependencies(Object.keys(dependencies)), ...types])) {
      mkdirSync(dirname(join(project, 'node_modules', name)), { recursive: true })
      symlinkSync(join(root, 'node_modules', name), join(project, 'node_modules', name))
    }
    // kysely-postgres-js 5 is installed here under another name, beside the 3 that kysely-ctl accepts.
    symlinkSync(join(root, 'node_modules', 'kysely-postgres-js5'), join(project, 'node_modules', 'kysely-postgres-js'))
    writeFileSync(join(project, 'package.json'), JSON.stringify({ type: 'module', private: true }))
    writeFileSync(join(project, 'consumer.mjs'), CONSUMER)
    writeFileSync(join(project, 'consumer.cjs'), CJS_CONSUMER)
    for (const [mode, { compilerOptions, files }] of Object.entries(TYPE_MODES)) {
      for (const file of files) writeFileSync(join(project, file), TYPES_CONSUMER)
      const options = { ...compilerOptions, target: 'es2022', lib: ['es2023'], types: ['node'], strict: true, noEmit: true, skipLibCheck: false }
      writeFileSync(join(project, `tsconfig.${mode}.json`), JSON.stringify({ compilerOptions: options, files }))
    }
  }, 120_000)
  afterAll(() => rmSync(project, { recursive: true, force: true }))

  it('ships built code and type declarations, and no tests', () => {
    const files = readdirSync(join(project, 'node_modules', 'kysely-idempotency'), { recursive: true }).map(String)
    for (const build of ['esm', 'cjs']) {
      for (const entry of ['', ...SUBPATHS]) {
        expect(files).toContain(join('dist', build, entry, 'index.js'))
        expect(files).toContain(join('dist', build, entry, 'index.d.ts'))
      }
    }
    expect(files).toContain(join('dist', 'esm', 'cli', 'index.js'))
    expect(files.some((f) => f.startsWith(join('dist', 'cjs', 'cli')))).toBe(false)
    expect(JSON.parse(readFileSync(join(project, 'node_modules', 'kysely-idempotency', 'dist', 'cjs', 'package.json'), 'utf8'))).toEqual({
      type: 'commonjs',
    })
    // No test file or test folder (`testing/` is the dialect contract kit, a subpath of the package).
    expect(files.filter((f) => /\.test\.|(^|[\\/])test([\\/]|$)/.test(f))).toEqual([])
  })

  it('has types that resolve under every module resolution (attw)', () => {
    const attw = join(root, 'node_modules', '@arethetypeswrong', 'cli', 'dist', 'index.js')
    // --format json exits 1 when there are problems; the report is on stdout either way.
    const { stdout, status, stderr } = spawnSync(process.execPath, [attw, tarballPath, '--format', 'json', '--profile', 'strict'], {
      cwd: project,
      encoding: 'utf8',
    })
    const { analysis, problems } = JSON.parse(stdout) as {
      analysis: {
        types: { kind: string }
        problems: unknown[]
        entrypoints: Record<string, { resolutions: Record<string, { resolution?: { fileName: string } }> }>
      }
      problems: Record<string, unknown[]>
    }
    expect(analysis.problems, stdout).toEqual([])
    expect(problems).toEqual({})
    expect(status, stderr).toBe(0)
    expect(analysis.types.kind).toBe('included')
    const resolved = Object.fromEntries(
      Object.entries(analysis.entrypoints).map(([entry, { resolutions }]) => [
        entry,
        Object.fromEntries(Object.entries(resolutions).map(([mode, r]) => [mode, r.resolution?.fileName])),
      ]),
    )
    const cjs = (entry: string) => `/node_modules/kysely-idempotency/dist/cjs/${entry && `${entry}/`}index.d.ts`
    const esm = (entry: string) => `/node_modules/kysely-idempotency/dist/esm/${entry && `${entry}/`}index.d.ts`
    expect(resolved).toEqual({
      '.': { node10: cjs(''), 'node16-cjs': cjs(''), 'node16-esm': esm(''), bundler: esm('') },
      ...Object.fromEntries(
        SUBPATHS.map((entry) => [`./${entry}`, { node10: cjs(entry), 'node16-cjs': cjs(entry), 'node16-esm': esm(entry), bundler: esm(entry) }]),
      ),
      './package.json': expect.anything(),
    })
  })

  it('installs beside Kysely 0.29 and 0.28 with plain npm install (its peer range), and not beside 0.27', () => {
    const install = (kysely: string) => {
      const dir = mkdtempSync(join(tmpdir(), 'kidem-peer-'))
      try {
        writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'peer-check', private: true, type: 'module' }))
        // Resolution only: the registry's metadata (from npm's cache when it has it), nothing written.
        return spawnSync('npm', ['install', '--dry-run', '--prefer-offline', '--no-audit', '--no-fund', tarballPath, `kysely@${kysely}`], {
          cwd: dir,
          encoding: 'utf8',
        })
      } finally {
        rmSync(dir, { recursive: true, force: true })
      }
    }
    for (const version of ['0.29', '0.28']) {
      const { status, stderr } = install(version)
      expect(stderr).not.toMatch(/ERESOLVE/)
      expect(status, stderr).toBe(0)
    }
    expect(install('0.27').stderr).toMatch(/ERESOLVE[\s\S]*peer kysely@"\^0\.28\.0 \|\| \^0\.29\.0"/)
  })

  it('passes publint with no errors, warnings or suggestions', async () => {
    const data = readFileSync(tarballPath)
    const { messages, pkg } = await publint({
      pack: { tarball: data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) as ArrayBuffer },
      level: 'suggestion',
    })
    expect(messages.map((m) => `${m.type}: ${formatMessage(m, pkg, { color: false }) ?? m.code}`)).toEqual([])
  })

  it('works from CommonJS, next to its ES module copy in the same process', () => {
    const { stdout, stderr, status } = spawnSync(process.execPath, [join(project, 'consumer.cjs'), join(project, 'cjs.db')], {
      cwd: project,
      encoding: 'utf8',
    })
    expect(status, stderr).toBe(0)
    expect(stderr).toBe('')
    expect(JSON.parse(stdout)).toEqual({
      first: { value: { id: 1 }, replayed: false },
      again: { replayed: true, id: 1, date: 0, bigint: true },
      http: [
        { status: 201, replayed: null, body: { id: 2 } },
        { status: 201, replayed: 'true', body: { id: 2 } },
      ],
      orders: 2,
      resolved: [join('dist', 'cjs', 'index.js'), join('dist', 'cjs', 'express', 'index.js')],
      superjson: { __esModule: true, default: 'function' },
      copies: {
        distinct: true,
        requireKinds: ['function', 'function', 'function', 'function'],
        importKinds: ['function', 'function', 'function', 'function'],
      },
      fromCjs: { name: 'IdempotencyKeyReuseError', own: true, esmClass: true, esmBase: true, esmOther: false },
      fromEsm: { name: 'InvalidIdempotencyKeyError', own: true, cjsClass: true, cjsBase: true, cjsOther: false },
      conflict: true,
      plain: false,
    })
  })

  it.each(Object.keys(TYPE_MODES))('type-checks a TypeScript consumer under moduleResolution %s', async (mode) => {
    const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc')
    const outcome = await promisify(execFile)(process.execPath, [tsc, '-p', `tsconfig.${mode}.json`, '--pretty', 'false'], {
      cwd: project,
      encoding: 'utf8',
    }).then(
      () => '',
      (error: { stdout: string; stderr: string }) => error.stdout + error.stderr || String(error),
    )
    expect(outcome).toBe('')
  })

  it('runs the command-line tool named in bin', () => {
    const installed = join(project, 'node_modules', 'kysely-idempotency')
    const { bin } = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8')) as { bin: Record<string, string> }
    const output = run(join(installed, bin['kysely-idempotency']!), ['sql', '--dialect', 'sqlite'], project)
    expect(output).toMatch(/^-- kysely_idempotency_idempotency_keys_0001_create\ncreate table "idempotency_keys"/)
  })

  it.each([['sqlite'], ['pglite']])('runs the demo API and its self-test on %s', (database) => {
    const output = run(join(project, 'node_modules', 'kysely-idempotency', 'examples', 'demo.mjs'), ['--selftest', '--db', database], project)
    expect(output).toContain(`express on ${database}:`)
    expect(output).toContain('selftest passed: one charge per key and customer')
  })

  it('runs the README quick start', () => {
    const output = run(join(project, 'node_modules', 'kysely-idempotency', 'examples', 'quick-start.mjs'), [], project)
    expect(output).toContain('replayed: true')
    expect(output).toContain('IdempotencyKeyReuseError 422')
    expect(output).toContain('orders in the table: 1')
  })

  const drivers = [...new Set(selectedTargets().map((t) => t.driver))]
  it.each(drivers)('works from a consumer project through %s', (driver) => {
    const target = selectedTargets().find((t) => t.driver === driver)!
    const location = { sqlite: join(project, 'consumer.db'), postgres: inject('locations').postgres!, mysql: inject('locations').mysql! }[
      target.database
    ]
    const result = JSON.parse(run(join(project, 'consumer.mjs'), [driver, location], project))
    expect(result).toEqual({
      first: { value: { ok: true }, replayed: false },
      again: { value: { ok: true }, replayed: true },
      reuse: true,
      phases: [
        { value: 3, replayed: false },
        { value: 3, replayed: true },
      ],
      ...(driver === 'pg' ? { contract: 17 } : {}),
    })
  })
})
