import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'

const root = resolve(import.meta.dirname, '..')
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
const dir = mkdtempSync(join(tmpdir(), 'kidem-bench-'))

// Speed is not asserted here (it is what `npm run bench` reports); this keeps the benchmark
// running and checks what it counts: the statements of each path and the storm's side effects.
describe('npm run bench (a short run on SQLite)', () => {
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('counts the statements of each path and one order per key in the duplicate storm', () => {
    execFileSync(process.execPath, [tsc, '-p', 'tsconfig.tools.json'], { cwd: root, stdio: 'pipe' })
    const file = join(dir, 'figures.json')
    const args = ['build/bench/index.js', '--only', 'sqlite', '--seconds', '0.2', '--rounds', '1', '--json', file]
    execFileSync(process.execPath, args, { cwd: root, stdio: 'pipe' })
    const figures = JSON.parse(readFileSync(file, 'utf8'))
    const { statements, paths, efficiency, claimLastGain, rawIsLibrarySql } = figures.transactions[0]
    expect(statements).toEqual({
      bare: ['begin', 'insert', 'insert', 'insert', 'commit'],
      first: ['select[key]', 'begin', 'insert[key]', 'insert', 'insert', 'insert', 'update[key]', 'commit'],
      firstClaim: ['begin', 'insert[key]', 'insert', 'insert', 'insert', 'update[key]', 'commit'],
      inside: ['begin', 'insert[key]', 'insert', 'insert', 'insert', 'update[key]', 'commit'],
      replay: ['select[key]'],
      // SQLite's claim returns no row when the key exists: the key is read after it.
      replayClaim: ['begin', 'insert[key]', 'select[key]', 'commit'],
      // The raw path is the yardstick of the library's efficiency only while it sends what the library sends.
      rawFirst: ['select[key]', 'begin', 'insert[key]', 'insert', 'insert', 'insert', 'update[key]', 'commit'],
      rawLast: ['select[key]', 'begin', 'insert', 'insert', 'insert', 'insert[key]', 'commit'],
    })
    expect(Object.keys(paths)).toEqual([
      'bare',
      'first',
      'firstClaim',
      'inside',
      'replay',
      'replayClaim',
      'insideReplay',
      'mix1',
      'mix1Claim',
      'mix10',
      'mix10Claim',
      'mix50',
      'mix50Claim',
      'rawFirst',
      'rawLast',
    ])
    for (const path of Object.values<{ opsPerSecond: number; p99Ms: number }>(paths)) {
      expect(path.opsPerSecond).toBeGreaterThan(0)
      expect(path.p99Ms).toBeGreaterThan(0)
    }
    expect(rawIsLibrarySql).toBe(true)
    expect(efficiency).toBeGreaterThan(0)
    expect(claimLastGain).toBeGreaterThan(0)
    expect(figures.storms[0]).toMatchObject({ requests: 1000, keys: 100, sideEffects: 100, replayed: 900 })
  }, 120_000)
})
