/**
 * The comparison that chose the value codec: superjson (what the library uses, behind its own
 * check) against devalue and plain JSON, on fidelity (does a value come back deep-strict-equal),
 * time per encode and decode, and stored size.
 */
import { isDeepStrictEqual } from 'node:util'
import * as devalue from 'devalue'
import { InsertResult, UpdateResult } from 'kysely'
import SuperJSON from 'superjson'
import { defaultCodec } from '../src/codec/codec.js'

interface Candidate {
  readonly name: string
  encode(value: unknown): string
  decode(text: string): unknown
}

const CANDIDATES: readonly Candidate[] = [
  { name: 'JSON', encode: (v) => JSON.stringify(v) ?? 'null', decode: (t) => JSON.parse(t) },
  { name: 'superjson 2 (bare)', encode: (v) => SuperJSON.stringify(v), decode: (t) => SuperJSON.parse(t) },
  { name: 'devalue 6', encode: (v) => devalue.stringify(v), decode: (t) => devalue.parse(t) },
  { name: 'kysely-idempotency (checked superjson)', encode: (v) => defaultCodec.encode(v), decode: (t) => defaultCodec.decode(t) },
]

/** Values a replay must give back; each kind the issue names. */
const KINDS: Record<string, () => unknown> = {
  bigint: () => 10n ** 20n,
  Date: () => new Date(0),
  Buffer: () => Buffer.from('hi'),
  Uint8Array: () => new Uint8Array([1, 2]),
  'Float64Array with NaN, -0': () => new Float64Array([Number.NaN, -0]),
  Map: () => new Map([[{ k: 1 }, 'v']]),
  Set: () => new Set([1, 'a']),
  'undefined member': () => ({ a: undefined }),
  '-0, NaN, Infinity': () => [-0, Number.NaN, Infinity],
  InsertResult: () => new InsertResult(1n, 1n),
  'UpdateResult[]': () => [new UpdateResult(2n, undefined)],
  'key named constructor': () => ({ constructor: 'x' }),
  'object without prototype': () => Object.assign(Object.create(null) as object, { a: 1 }),
  cycle: () => {
    const o: Record<string, unknown> = {}
    o.self = o
    return o
  },
}

/** What the library stores most: an HTTP answer, a database row, a flow's state. */
const SAMPLES: Record<string, unknown> = {
  'HTTP answer (JSON text body)': {
    status: 201,
    headers: { Location: '/charges/ch_1', 'Content-Type': 'application/json; charset=utf-8' },
    body: JSON.stringify({ id: 'ch_1', amount: 1500, currency: 'usd', customer: 'cus_9', metadata: { order: 'o-17' } }),
  },
  'Kysely row (Date, bigint)': { id: 17n, customer: 'alice', amount: 1500, currency: 'usd', created_at: new Date(0), paid: true, note: null },
  'flow state, 3 phases': flowState({ changed: 1n }),
  'flow state, an UpdateResult': flowState([new UpdateResult(1n, undefined)]),
}

function flowState(lastPhase: unknown): unknown {
  return {
    flow: 'abcdefghijklmnopqrstuv',
    attempt: 2,
    request: { method: 'POST', url: '/rides', body: { origin: 'a', target: 'b', price: 1200 }, headers: {} },
    phases: [
      ['ride_created', { id: 9, origin: 'a', target: 'b', price: 1200, created_at: new Date(0) }],
      ['charge_created', { id: 'pi_1', status: 'succeeded' }],
      ['ride_charged', lastPhase],
    ],
  }
}

export interface CodecFigures {
  readonly fidelity: Record<string, Record<string, boolean | 'refused'>>
  readonly samples: Record<string, Record<string, { encodeMicros: number; decodeMicros: number; bytes: number } | 'refused'>>
}

function roundTrips(candidate: Candidate, value: unknown): boolean | 'refused' {
  try {
    return isDeepStrictEqual(candidate.decode(candidate.encode(value)), value)
  } catch {
    return 'refused'
  }
}

/** Mean microseconds per call of `fn`, over about `ms` milliseconds after a warm-up. */
function micros(fn: () => unknown, ms: number): number {
  for (let i = 0; i < 2000; i++) fn()
  let calls = 0
  const start = process.hrtime.bigint()
  const end = start + BigInt(ms) * 1_000_000n
  let now = start
  while (now < end) {
    for (let i = 0; i < 200; i++) fn()
    calls += 200
    now = process.hrtime.bigint()
  }
  return Number(now - start) / 1000 / calls
}

export function measureCodecs(ms = 300): CodecFigures {
  const fidelity: CodecFigures['fidelity'] = {}
  for (const [kind, make] of Object.entries(KINDS)) {
    fidelity[kind] = Object.fromEntries(CANDIDATES.map((c) => [c.name, roundTrips(c, make())]))
  }
  const samples: CodecFigures['samples'] = {}
  for (const [name, value] of Object.entries(SAMPLES)) {
    samples[name] = {}
    for (const c of CANDIDATES) {
      let text: string
      try {
        text = c.encode(value)
      } catch {
        samples[name][c.name] = 'refused'
        continue
      }
      samples[name][c.name] = {
        encodeMicros: micros(() => c.encode(value), ms),
        decodeMicros: micros(() => c.decode(text), ms),
        bytes: Buffer.byteLength(text),
      }
    }
  }
  return { fidelity, samples }
}

export function printCodecs(figures: CodecFigures): void {
  const names = CANDIDATES.map((c) => c.name)
  console.log('Value codecs: fidelity (✓ equal after a round trip, ✗ changed, – refused)')
  console.log(`  ${''.padEnd(28)}${names.map((n) => n.slice(0, 18).padStart(20)).join('')}`)
  for (const [kind, results] of Object.entries(figures.fidelity)) {
    console.log(`  ${kind.padEnd(28)}${names.map((n) => (results[n] === 'refused' ? '–' : results[n] ? '✓' : '✗').padStart(20)).join('')}`)
  }
  console.log('\nValue codecs: µs per encode / decode, stored bytes')
  for (const [sample, results] of Object.entries(figures.samples)) {
    console.log(`  ${sample}`)
    for (const n of names) {
      const r = results[n]!
      console.log(
        `    ${n.padEnd(40)}${r === 'refused' ? '   refused' : `${r.encodeMicros.toFixed(1).padStart(8)} / ${r.decodeMicros.toFixed(1).padStart(6)} µs ${String(r.bytes).padStart(6)} B`}`,
      )
    }
  }
  console.log()
}
