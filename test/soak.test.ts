import { execFile, execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { promisify } from 'node:util'
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest'
import { selectedTargets } from './support/harness.js'

const root = resolve(import.meta.dirname, '..')
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
const dir = mkdtempSync(join(tmpdir(), 'kidem-soak-'))
const exec = promisify(execFile)

// The short, seeded variant of `npm run soak`: every fault kind on every database, with the
// checker over the whole history. The long one is for humans (README, "Scaling out").
const databases = [
  ...new Set(
    selectedTargets()
      .filter((t) => !t.server)
      .map((t) => t.database),
  ),
]
describe.skipIf(databases.length === 0)('npm run soak (a short run with a fixed seed)', () => {
  beforeAll(() => {
    execFileSync(process.execPath, [tsc, '-p', 'tsconfig.tools.json'], { cwd: root, stdio: 'pipe' })
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  for (const database of databases) {
    it(`finds no violation on ${database} under kills, stalls, ${database === 'sqlite' ? '' : 'ended sessions, '}prunes and recovery passes`, async () => {
      const file = join(dir, `${database}.json`)
      const args = ['build/soak/index.js', '--db', database, '--seconds', '6', '--processes', '2', '--clients', '6', '--seed', '7', '--json', file]
      const env = { ...process.env, KIDEM_PG_URL: inject('locations').postgres, KIDEM_MYSQL_URL: inject('locations').mysql }
      const run = await exec(process.execPath, args, { cwd: root, env }).catch((error: { stdout: string; stderr: string }) => error)
      const report = JSON.parse(readFileSync(file, 'utf8'))
      expect(report.violations, run.stdout).toEqual([])
      expect(report.requests).toBeGreaterThan(100)
      expect(report.succeeded).toBeGreaterThan(20)
      for (const kind of database === 'sqlite' ? ['kill', 'stall', 'prune', 'recover'] : ['kill', 'stall', 'backend', 'prune', 'recover']) {
        expect(report.faults[kind], `${kind}: ${run.stdout}`).toBeGreaterThan(0)
      }
    }, 120_000)
  }
})
