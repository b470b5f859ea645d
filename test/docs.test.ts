/**
 * Docs are code: every TypeScript example in README.md, the docs site (docs/) and the doc comments of the package
 * type-checks against the package's source, each as its own module, with nothing declared for it:
 * what an example does not define it imports, from the package or from `./app`, the reader's app
 * written out in docs/snippets/app.ts (the examples are checked as files beside it); every
 * JavaScript example is an excerpt of a file in examples/, which other tests run; and the
 * examples marked `<!-- example: NAME -->` run here against SQLite.
 */
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import type { Server } from 'node:http'
import { tmpdir } from 'node:os'
import { join, relative, resolve } from 'node:path'
import Database from 'better-sqlite3'
import express, { type Express } from 'express'
import { Kysely, SqliteDialect } from 'kysely'
import { Webhook } from 'standardwebhooks'
import Stripe from 'stripe'
import ts from 'typescript'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createIdempotency } from '../index.js'

const root = resolve(import.meta.dirname, '..')
/** Where the reader's app, `./app` in the examples, is. */
const snippets = join(root, 'docs', 'snippets')
/** The package's subpaths, as package.json exports them (`./express`), and the folder of each. */
const SUBPATHS = Object.keys((JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { exports: object }).exports)
  .filter((path) => path.startsWith('./') && path !== './package.json')
  .map((path) => path.slice(2))
/** Each import path of the package, and the source file it is built from. */
const PACKAGE_PATHS: Readonly<Record<string, string>> = {
  'kysely-idempotency': 'index.ts',
  ...Object.fromEntries(SUBPATHS.map((folder) => [`kysely-idempotency/${folder}`, `${folder}/index.ts`])),
}

interface Example {
  /** Where it is, as `file:line`. */
  readonly where: string
  readonly lang: string
  readonly code: string
  /** The scenario that runs it, from a `<!-- example: NAME -->` line before the block. */
  readonly run?: string
}

/** README.md and every page of the docs site (docs/), but the API reference, generated from the doc comments. */
function markdownFiles(): string[] {
  const pages = readdirSync(join(root, 'docs'), { recursive: true })
    .map(String)
    .filter((f) => f.endsWith('.md') && !f.startsWith('reference'))
  return ['README.md', ...pages.map((page) => join('docs', page))]
}

function readmeExamples(): Example[] {
  const examples: Example[] = []
  for (const markdown of markdownFiles()) examples.push(...markdownExamples(markdown))
  return examples
}

function markdownExamples(markdown: string): Example[] {
  const lines = readFileSync(join(root, markdown), 'utf8').split('\n')
  const examples: Example[] = []
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w+)/.exec(lines[i]!)
    if (!open) continue
    const start = i
    while (!lines[++i]!.startsWith('```'));
    const marker = /^<!-- example: ([\w-]+) -->$/.exec(lines[start - 1] ?? '') ?? /^<!-- example: ([\w-]+) -->$/.exec(lines[start - 2] ?? '')
    examples.push({
      where: `${markdown}:${start + 1}`,
      lang: open[1]!,
      code: lines.slice(start + 1, i).join('\n'),
      ...(marker ? { run: marker[1] } : {}),
    })
  }
  return examples
}

function docCommentExamples(): Example[] {
  const examples: Example[] = []
  const files = ['index.ts']
  for (const dir of ['src', 'http', 'dialects', 'migrations', ...SUBPATHS]) {
    for (const file of readdirSync(join(root, dir), { recursive: true }).map(String)) if (file.endsWith('.ts')) files.push(join(dir, file))
  }
  for (const file of files) {
    const lines = readFileSync(join(root, file), 'utf8').split('\n')
    for (let i = 0; i < lines.length; i++) {
      const open = /^\s*\* ```(\w+)/.exec(lines[i]!)
      if (!open) continue
      const start = i
      while (!/^\s*\* ```\s*$/.test(lines[++i]!));
      const code = lines
        .slice(start + 1, i)
        .map((line) => line.replace(/^\s*\* ?/, ''))
        .join('\n')
      examples.push({ where: `${file}:${start + 1}`, lang: open[1]!, code })
    }
  }
  return examples
}

const examples = [...readmeExamples(), ...docCommentExamples()]
const typescript = examples.filter((e) => e.lang === 'ts' || e.lang === 'typescript')
const javascript = examples.filter((e) => e.lang === 'js' || e.lang === 'javascript')

describe('the examples in README.md and doc comments', () => {
  it('are many, and every TypeScript one compiles', () => {
    expect(typescript.length).toBeGreaterThan(20)
    const virtual = new Map(typescript.map((e, i) => [join(snippets, `example-${i}.ts`), e]))
    const config = ts.getParsedCommandLineOfConfigFile(join(root, 'tsconfig.json'), {}, { ...ts.sys, onUnRecoverableConfigFileDiagnostic: () => {} })!
    const options: ts.CompilerOptions = {
      ...config.options,
      noEmit: true,
      noUnusedLocals: false,
      noUnusedParameters: false,
      // As a bundler or tsx resolves them: `./app` without the `.js` that Node's own resolution needs.
      module: ts.ModuleKind.Preserve,
      moduleResolution: ts.ModuleResolutionKind.Bundler,
      paths: Object.fromEntries(Object.entries(PACKAGE_PATHS).map(([name, path]) => [name, [join(root, path)]])),
    }
    const host = ts.createCompilerHost(options)
    const source = (file: string) => virtual.get(resolve(file))
    const { fileExists, readFile, getSourceFile } = host
    host.fileExists = (file) => source(file) !== undefined || fileExists.call(host, file)
    host.readFile = (file) => (source(file) ? `${source(file)!.code}\nexport {}\n` : readFile.call(host, file))
    host.getSourceFile = (file, language, ...rest) => {
      const example = source(file)
      if (example) return ts.createSourceFile(file, `${example.code}\nexport {}\n`, language)
      return getSourceFile.call(host, file, language, ...rest)
    }
    const program = ts.createProgram([...virtual.keys()], options, host)
    const problems = ts.getPreEmitDiagnostics(program).map((d) => {
      const example = d.file && source(d.file.fileName)
      const line = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start).line : 0
      const where = example
        ? `${example.where.replace(/:\d+$/, '')}:${Number(example.where.split(':').at(-1)) + 1 + line}`
        : relative(root, d.file?.fileName ?? '')
      return `${where}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`
    })
    expect(problems).toEqual([])
  }, 60_000)

  it('in JavaScript are excerpts of files in examples/, which run', () => {
    expect(javascript.length).toBeGreaterThan(0)
    for (const example of javascript) {
      const named = /^\/\/ (examples\/[\w.-]+)/.exec(example.code)
      expect(named, `${example.where} must start with "// examples/<file>"`).not.toBeNull()
      const file = readFileSync(join(root, named![1]!), 'utf8')
      for (const line of example.code.split('\n').slice(1)) {
        const code = line.replace(/\s*\/\/ .*$/, '').trim()
        if (code) expect(file, `${example.where}: ${code}`).toContain(code)
      }
    }
  })
})

/**
 * Turns an example into a module whose default export runs it with what it imports from `./app`
 * (`db`, `app`, `stripe`...) taken from a context, and imports it.
 */
async function load(example: Example, dir: string): Promise<(context: Record<string, unknown>) => Promise<void>> {
  const file = ts.createSourceFile('example.ts', example.code, ts.ScriptTarget.ES2023, true)
  const imports: string[] = []
  const fromApp: string[] = []
  const body: string[] = []
  for (const statement of file.statements) {
    if (ts.isImportDeclaration(statement)) {
      const specifier = (statement.moduleSpecifier as ts.StringLiteral).text
      if (specifier === './app') {
        const names = statement.importClause?.namedBindings
        if (names && ts.isNamedImports(names) && !statement.importClause?.isTypeOnly)
          fromApp.push(...names.elements.filter((e) => !e.isTypeOnly).map((e) => e.name.text))
        continue
      }
      const target = PACKAGE_PATHS[specifier]
      const text = statement.getText(file)
      imports.push(target ? text.replace(specifier, relative(dir, join(root, target.replace(/\.ts$/, '.js')))) : text)
    } else {
      body.push(statement.getText(file))
    }
  }
  const module = join(dir, `${example.run}.ts`)
  writeFileSync(
    module,
    `${imports.join('\n')}\nexport default async function (context: any) {\n  const { ${fromApp.join(', ')} } = context\n  {\n${body.join('\n')}\n  }\n}\n`,
  )
  return ((await import(module)) as { default: (context: Record<string, unknown>) => Promise<void> }).default
}

describe('the README examples, run against SQLite', () => {
  let dir: string
  let db: Kysely<any>
  const servers: Server[] = []
  beforeAll(async () => {
    // Inside the repository, so that the example's imports resolve like the tests' own.
    mkdirSync(join(root, 'test', 'docs', '.generated'), { recursive: true })
    dir = mkdtempSync(join(root, 'test', 'docs', '.generated', 'run-'))
    const file = new Database(join(mkdtempSync(join(tmpdir(), 'kidem-docs-')), 'docs.db'))
    file.pragma('journal_mode = WAL')
    db = new Kysely({ dialect: new SqliteDialect({ database: file }) })
    await createIdempotency({ db }).migrate()
  })
  afterAll(async () => {
    for (const server of servers) server.closeAllConnections()
    await Promise.all(servers.map((server) => new Promise((done) => server.close(done))))
    await db.destroy()
    rmSync(dir, { recursive: true, force: true })
  })

  const example = (name: string) => {
    const found = readmeExamples().find((e) => e.run === name)
    if (!found) throw new Error(`No page of the docs has an example marked <!-- example: ${name} -->`)
    return found
  }

  /** An Express app whose requests are authenticated as `user`, with the example's routes, listening. */
  async function serve(register: (app: Express) => Promise<void>): Promise<string> {
    const app = express()
    // As the examples' app (docs/snippets/app.ts): every route mounts its own body parser.
    app.use((req, _res, next) => {
      Object.assign(req, { user: { id: req.get('x-user') ?? 'user-1', stripeId: 'cus_1' } })
      next()
    })
    await register(app)
    app.use((error: Error, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
      res.status(500).json({ error: error.message })
    })
    const server = app.listen(0, '127.0.0.1')
    servers.push(server)
    await new Promise((done) => server.once('listening', done))
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  }

  const post = (url: string, body: unknown, key: string) =>
    fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', 'Idempotency-Key': key }, body: JSON.stringify(body) })

  it('atomic phases: rides, with the stripe SDK against a local payments API', async () => {
    await db.schema
      .createTable('rides')
      .addColumn('id', 'integer', (c) => c.primaryKey())
      .addColumn('user_id', 'text', (c) => c.notNull())
      .addColumn('origin', 'text', (c) => c.notNull())
      .addColumn('target', 'text', (c) => c.notNull())
      .addColumn('price', 'integer', (c) => c.notNull())
      .addColumn('charge_id', 'text')
      .execute()
    // The payments API answers like Stripe: the same Idempotency-Key gets the same payment intent.
    const intents = new Map<string, { id: string; object: string; amount: number }>()
    const provider = await serve(async (app) => {
      app.use(express.urlencoded({ extended: true }))
      app.post('/v1/payment_intents', (req, res) => {
        const key = req.get('idempotency-key') ?? String(Math.random())
        if (!intents.has(key)) intents.set(key, { id: `pi_${intents.size + 1}`, object: 'payment_intent', amount: Number(req.body.amount) })
        res.json(intents.get(key))
      })
    })
    const { hostname, port } = new URL(provider)
    const stripe = new Stripe('sk_test_local', { host: hostname, port: Number(port), protocol: 'http' })
    const run = await load(example('atomic-phases'), dir)
    const url = await serve((app) => run({ db, app, stripe }))

    const ride = { origin: 'Home', target: 'Work', price: 1200 }
    const first = await post(`${url}/rides`, ride, 'ride-1')
    expect(first.status).toBe(201)
    const answer = await first.json()
    expect(answer).toMatchObject({ ...ride, user_id: 'user-1', charge_id: 'pi_1' })
    const again = await post(`${url}/rides`, ride, 'ride-1')
    expect(again.status).toBe(201)
    expect(await again.json()).toEqual(answer)
    expect(await db.selectFrom('rides').selectAll().execute()).toEqual([answer])
    expect(intents.size).toBe(1)
  })

  it('Express: charges', async () => {
    await db.schema
      .createTable('charges')
      .addColumn('id', 'integer', (c) => c.primaryKey())
      .addColumn('customer', 'text', (c) => c.notNull())
      .addColumn('amount', 'integer', (c) => c.notNull())
      .addColumn('currency', 'text', (c) => c.notNull())
      .execute()
    const run = await load(example('express'), dir)
    const url = await serve((app) => run({ db, app, idempotency: createIdempotency({ db }) }))
    const charge = { customer: 'alice', amount: 1500, currency: 'usd' }
    const first = await post(`${url}/charges`, charge, 'charge-1')
    expect(first.status).toBe(201)
    expect(first.headers.get('location')).toMatch(/^\/charges\/\d+$/)
    const again = await post(`${url}/charges`, charge, 'charge-1')
    expect(again.headers.get('idempotency-replayed')).toBe('true')
    expect(await again.text()).toBe(await first.text())
    expect(await db.selectFrom('charges').selectAll().execute()).toHaveLength(1)
  })

  it('webhooks: Standard Webhooks deliveries, signed, consumed once', async () => {
    await db.schema
      .createTable('charges')
      .ifNotExists()
      .addColumn('id', 'integer', (c) => c.primaryKey())
      .addColumn('customer', 'text', (c) => c.notNull())
      .addColumn('amount', 'integer', (c) => c.notNull())
      .addColumn('currency', 'text', (c) => c.notNull())
      .execute()
    const secret = `whsec_${Buffer.from('a secret of at least 24 bytes!').toString('base64')}`
    process.env.WEBHOOK_SECRET = secret
    const run = await load(example('webhook'), dir)
    const url = await serve((app) => run({ app, idempotency: createIdempotency({ db }) }))
    const sender = new Webhook(secret)
    const deliver = (id: string, event: unknown, signature?: string) => {
      const payload = JSON.stringify(event)
      const at = new Date()
      return fetch(`${url}/webhooks/billing`, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'webhook-id': id,
          'webhook-timestamp': String(Math.floor(at.getTime() / 1000)),
          'webhook-signature': signature ?? sender.sign(id, at, payload),
        },
        body: payload,
      })
    }
    const charges = () => db.selectFrom('charges').selectAll().where('customer', '=', 'hooked').execute()
    const event = { type: 'charge.succeeded', data: { customer: 'hooked', amount: 700 } }
    expect((await deliver('msg_1', event, 'v1,bm90IGEgc2lnbmF0dXJl')).status).toBe(400)
    expect(await charges()).toHaveLength(0)
    for (let i = 0; i < 3; i++) expect((await deliver('msg_1', event)).status).toBe(204)
    expect(await charges()).toHaveLength(1)
    expect((await deliver('msg_2', event)).status).toBe(204)
    expect(await charges()).toHaveLength(2)
  })
})
