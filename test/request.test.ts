import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import {
  canonicalJson,
  fingerprint,
  IdempotencyConflictError,
  IdempotencyError,
  IdempotencyKeyReuseError,
  IdempotencyLockLostError,
  IdempotencySerializationError,
  InvalidIdempotencyKeyError,
} from '../src/index.js'
import { normalizeKey } from '../src/request.js'

const printable = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).map((c) => String.fromCharCode(c)), minLength: 1, maxLength: 255 })

/** Rebuilds a JSON value with every object's keys in a shuffled order. */
function shuffleKeys(value: unknown, seed: number): unknown {
  if (Array.isArray(value)) return value.map((v) => shuffleKeys(v, seed))
  if (value === null || typeof value !== 'object') return value
  const entries = Object.entries(value)
  const order = entries.map((_, i) => i).sort((a, b) => ((a * 7919 + seed) % 97) - ((b * 7919 + seed) % 97))
  return Object.fromEntries(order.map((i) => [entries[i]![0], shuffleKeys(entries[i]![1], seed)]))
}

describe('keys', () => {
  it('accepts every string of 1 to 255 printable ASCII characters', () => {
    fc.assert(
      fc.property(printable, (key) => {
        expect(normalizeKey(key).key).toBe(key)
      }),
    )
  })

  it('rejects every string with a character outside printable ASCII', () => {
    const outside = fc.integer({ min: 0, max: 0xffff }).filter((c) => c < 0x20 || c > 0x7e).map((c) => String.fromCharCode(c))
    fc.assert(
      fc.property(fc.string({ maxLength: 100 }), outside, fc.string({ maxLength: 100 }), (before, bad, after) => {
        expect(() => normalizeKey(before + bad + after)).toThrow(InvalidIdempotencyKeyError)
      }),
    )
  })

  it('rejects empty, too long and non-string keys, and bad scopes, with a 400', () => {
    for (const key of ['', 'k'.repeat(256), 42 as unknown as string]) {
      expect(() => normalizeKey(key)).toThrow(InvalidIdempotencyKeyError)
    }
    for (const scope of ['s'.repeat(256), 'a\0b', '\ud800']) {
      expect(() => normalizeKey({ key: 'k', scope })).toThrow(InvalidIdempotencyKeyError)
    }
    expect(normalizeKey({ key: 'k', scope: 'ü'.repeat(255) }).scope).toHaveLength(255)
  })
})

describe('fingerprints', () => {
  it('are equal for equal JSON values whatever the key order', () => {
    fc.assert(
      fc.property(fc.jsonValue(), fc.nat(), (value, seed) => {
        expect(fingerprint(shuffleKeys(value, seed))).toBe(fingerprint(value))
      }),
    )
  })

  it('are canonical JSON that parses back to the same value (as JSON knows it: -0 is 0)', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (value) => {
        expect(JSON.parse(canonicalJson(value))).toStrictEqual(JSON.parse(JSON.stringify(value)))
      }),
    )
  })

  it('differ for different values', () => {
    fc.assert(
      fc.property(fc.jsonValue(), fc.jsonValue(), (a, b) => {
        fc.pre(canonicalJson(a) !== canonicalJson(b))
        expect(fingerprint(a)).not.toBe(fingerprint(b))
      }),
    )
  })

  it('are SHA-256 hex of sorted, compact JSON', () => {
    expect(canonicalJson({ b: [1, { d: 1, c: 2 }], a: 'x' })).toBe('{"a":"x","b":[1,{"c":2,"d":1}]}')
    expect(fingerprint(null)).toBe('74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b')
  })

  it('refuse requests JSON cannot hold', () => {
    expect(() => fingerprint({ n: 1n })).toThrow(IdempotencySerializationError)
    expect(() => fingerprint({ n: Infinity })).toThrow(IdempotencySerializationError)
  })
})

describe('errors', () => {
  it('carry their class name, a stable code and an HTTP status', () => {
    const errors = [
      [new InvalidIdempotencyKeyError('m'), 'invalid_key', 400],
      [new IdempotencyConflictError('in_flight', 'm', { retryAfter: 1 }), 'conflict', 409],
      [new IdempotencyKeyReuseError('m'), 'key_reuse', 422],
      [new IdempotencyLockLostError('m'), 'lock_lost', 409],
    ] as const
    for (const [error, code, status] of errors) {
      expect(error).toBeInstanceOf(IdempotencyError)
      expect(error.name).toBe(error.constructor.name)
      expect(error).toMatchObject({ code, status })
    }
  })
})
