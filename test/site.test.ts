/**
 * The docs site builds (`npm run docs`: TypeDoc writes the API reference into docs/reference/, then
 * VitePress fails on a link to a page that does not exist), and every link inside it, the
 * reference's included, anchors included, lands on something.
 */
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, posix, resolve } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

const root = resolve(import.meta.dirname, '..')

describe('the docs site', () => {
  let out: string
  beforeAll(() => {
    out = mkdtempSync(join(tmpdir(), 'kidem-site-'))
    // The API reference (typedoc.config.mjs): an error or a warning (a public type naming an unexported one, a broken {@link}) fails here.
    try {
      execFileSync(process.execPath, [join(root, 'node_modules', 'typedoc', 'bin', 'typedoc')], { cwd: root, stdio: 'pipe' })
    } catch (error) {
      const { stdout, stderr } = error as { stdout?: Buffer; stderr?: Buffer }
      throw new Error(`typedoc failed:\n${stdout ?? ''}${stderr ?? ''}`)
    }
    execFileSync(process.execPath, [join(root, 'node_modules', 'vitepress', 'bin', 'vitepress.js'), 'build', 'docs', '--outDir', out], {
      cwd: root,
      stdio: 'pipe',
    })
  }, 240_000)
  afterAll(() => rmSync(out, { recursive: true, force: true }))

  it('has a page for every guide and public module, and no link to a page or an anchor that is not there', () => {
    const pages = new Map<string, string>()
    for (const file of readdirSync(out, { recursive: true }).map(String)) {
      if (file.endsWith('.html') && file !== '404.html')
        pages.set(`/${file.replace(/\.html$/, '').replace(/(^|\/)index$/, '')}`, readFileSync(join(out, file), 'utf8'))
    }
    const { exports } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { exports: object }
    const subpaths = Object.keys(exports).filter((path) => path !== './package.json')
    // A page per module the package exports (`.` and `./express` are /reference/kysely-idempotency and …/express).
    const reference = subpaths.map((path) => `/reference/kysely-idempotency${path.slice(1)}`)
    expect([...pages.keys()]).toEqual(
      expect.arrayContaining([
        '/',
        '/why',
        '/guide/api',
        '/guide/http',
        '/guide/express',
        '/guide/fastify',
        '/guide/koa',
        '/guide/nest',
        '/guide/fetch',
        '/guide/adding-a-database',
        '/performance',
        '/reference',
        ...reference,
      ]),
    )
    const broken: string[] = []
    for (const [page, html] of pages) {
      const base = page.endsWith('/') ? page : dirname(`${page}.html`)
      for (const [, href] of html.matchAll(/<a [^>]*href="([^"]+)"/g)) {
        if (/^(https?:|mailto:)/.test(href!) || href === '#VPContent') continue
        const [path, anchor] = href!.split('#') as [string, string | undefined]
        const target = path === '' ? page : posix.normalize(path.startsWith('/') ? path : posix.join(base, path)).replace(/\.html$/, '')
        const text = pages.get(target) ?? pages.get(target.replace(/\/$/, '')) ?? pages.get(`${target}/`)
        if (text === undefined) broken.push(`${page}: ${href} (no page)`)
        else if (anchor && !text.includes(`id="${anchor}"`)) broken.push(`${page}: ${href} (no #${anchor} there)`)
      }
    }
    expect(broken).toEqual([])
  })
})
