/**
 * `npm test` after the type check: the suite on every supported runtime and Kysely, one lane
 * after the other, each on its own Node binary from the registry's `node` packages (devDependencies:
 * `node` is Node 24, which npm scripts run on; `node22` and `node26` beside it).
 *
 *   main    Node 24 LTS, Kysely 0.29: every test file.
 *   compat  the oldest supported stack, Node 22.12, Kysely 0.28 and NestJS 11: the conformance files
 *           and the Nest adapter's.
 *   newest  the newest line, Node 26, Kysely 0.29: the core conformance file.
 *
 * KIDEM_LANES=main,compat picks lanes; arguments after `--` go to vitest (file filters, -t).
 * After each lane comes its target table (which target ran each file's tests, and which were N/A
 * and why); at the end each lane's time and result. Any failed lane fails the run.
 */
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { ALL_TARGETS } from './support/databases.js'

interface Lane {
  readonly name: string
  /** The Node binary, relative to the repository. */
  readonly node: string
  /** `0.28` runs the library and the tests on the `kysely028` package, and on NestJS 11 (see vitest.config.ts). */
  readonly kysely: '0.28' | '0.29'
  /** Test files; empty for all. */
  readonly files: readonly string[]
}

/** The files that state the contract itself: the core, HTTP and migrations conformance tables. */
const CONFORMANCE = ['test/conformance.test.ts', 'test/http.test.ts', 'test/migrations.test.ts']

const LANES: readonly Lane[] = [
  { name: 'main', node: 'node_modules/node/bin/node', kysely: '0.29', files: [] },
  { name: 'compat', node: 'node_modules/node22/bin/node', kysely: '0.28', files: [...CONFORMANCE, 'test/nest.test.ts'] },
  { name: 'newest', node: 'node_modules/node26/bin/node', kysely: '0.29', files: ['test/conformance.test.ts'] },
]

const root = join(import.meta.dirname, '..')

/**
 * On Kysely 0.28, every process of the lane (vitest's workers, and the children tests spawn)
 * resolves `kysely` to `kysely028` (vitest.config.ts does the same for the modules vite resolves).
 */
function nodeOptions(lane: Lane): string {
  const own = process.env.NODE_OPTIONS ?? ''
  if (lane.kysely !== '0.28') return own
  return `${own} --import=${pathToFileURL(join(root, 'test/support/compat/register.mjs')).href}`.trim()
}
const wanted = process.env.KIDEM_LANES?.split(',')
  .map((s) => s.trim())
  .filter(Boolean)
const unknown = wanted?.filter((name) => !LANES.some((lane) => lane.name === name)) ?? []
if (unknown.length) {
  console.error(`KIDEM_LANES names no lane ${unknown.join(', ')}; lanes: ${LANES.map((lane) => lane.name).join(', ')}.`)
  process.exit(1)
}
const extra = process.argv.slice(2)
const reports = mkdtempSync(join(tmpdir(), 'kidem-lanes-'))
const results: Array<{ lane: Lane; seconds: number; ok: boolean }> = []
for (const lane of LANES.filter((l) => !wanted || wanted.includes(l.name))) {
  const node = join(root, lane.node)
  if (!existsSync(node)) {
    console.error(`The ${lane.name} lane's Node binary ${lane.node} is missing: run npm ci (the node devDependencies install it).`)
    process.exit(1)
  }
  const version = spawnSync(node, ['--version'], { encoding: 'utf8' }).stdout.trim()
  console.log(
    `\n=== lane ${lane.name}: Node ${version}, Kysely ${lane.kysely}${lane.files.length ? `, ${lane.files.join(' ')}` : ', every test file'}\n`,
  )
  const report = join(reports, `${lane.name}.json`)
  const started = performance.now()
  const run = spawnSync(
    node,
    [
      join(root, 'node_modules/vitest/vitest.mjs'),
      'run',
      '--reporter=default',
      '--reporter=json',
      `--outputFile.json=${report}`,
      ...lane.files,
      ...extra,
    ],
    { cwd: root, stdio: 'inherit', env: { ...process.env, KIDEM_LANE: lane.name, KIDEM_KYSELY: lane.kysely, NODE_OPTIONS: nodeOptions(lane) } },
  )
  results.push({ lane, seconds: (performance.now() - started) / 1000, ok: run.status === 0 })
  if (existsSync(report)) console.log(`\n=== targets of lane ${lane.name}\n${targetTable(report)}`)
}
rmSync(reports, { recursive: true, force: true })
console.log('\n=== lanes')
for (const { lane, seconds, ok } of results) console.log(`${ok ? 'passed' : 'FAILED'}  ${lane.name.padEnd(7)} ${seconds.toFixed(0).padStart(5)} s`)
process.exit(results.every((r) => r.ok) ? 0 : 1)

/**
 * Which target ran the tests of each file, from a vitest JSON report: the tests that ran (passed
 * or failed), and the ones reported N/A, with their reasons. Files without targets are left out.
 */
function targetTable(report: string): string {
  const { testResults } = JSON.parse(readFileSync(report, 'utf8')) as {
    testResults: Array<{ name: string; assertionResults: Array<{ ancestorTitles: string[]; title: string; status: string }> }>
  }
  const ids = new Set(ALL_TARGETS.map((t) => t.id))
  const cells = new Map<string, Map<string, { ran: number; na: number; marks: Set<string> }>>()
  const reasons = new Map<string, string>()
  for (const file of testResults) {
    for (const test of file.assertionResults) {
      const target = test.ancestorTitles.flatMap((title) => title.split(/[:,]\s*/)).find((token) => ids.has(token))
      if (!target) continue
      const row = cells.get(target) ?? new Map<string, { ran: number; na: number; marks: Set<string> }>()
      cells.set(target, row)
      const cell = row.get(basename(file.name, '.test.ts')) ?? { ran: 0, na: 0, marks: new Set<string>() }
      row.set(basename(file.name, '.test.ts'), cell)
      const na = /\(?N\/A: (.*?)\)?$/.exec(test.title)
      if (na) {
        cell.na++
        const reason = na[1]!
        if (!reasons.has(reason)) reasons.set(reason, `[${reasons.size + 1}]`)
        cell.marks.add(reasons.get(reason)!)
      } else if (test.status !== 'skipped' && test.status !== 'pending') cell.ran++
    }
  }
  const files = [...new Set([...cells.values()].flatMap((row) => [...row.keys()]))].sort()
  const lines = [`| target | ${files.join(' | ')} |`, `| --- | ${files.map(() => '---').join(' | ')} |`]
  for (const [target, row] of [...cells].sort(([a], [b]) => a.localeCompare(b))) {
    const cell = (file: string) => {
      const c = row.get(file)
      if (!c) return ''
      const marks = [...c.marks].join('')
      if (c.ran === 0) return `N/A ${marks}`
      return c.na ? `${c.ran} (+${c.na} N/A ${marks})` : String(c.ran)
    }
    lines.push(`| ${target} | ${files.map(cell).join(' | ')} |`)
  }
  lines.push('', 'N/A reasons:', ...[...reasons].map(([reason, mark]) => `${mark} ${reason}`))
  return lines.join('\n')
}
