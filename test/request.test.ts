import { deepStrictEqual } from 'node:assert/strict'
import { isDeepStrictEqual } from 'node:util'
import fc from 'fast-check'
import { InsertResult, UpdateResult } from 'kysely'
import SuperJSON from 'superjson'
import { describe, expect, it } from 'vitest'
import {
  canonicalJson,
  defaultCodec,
  fingerprint,
  IdempotencyConflictError,
  IdempotencyError,
  IdempotencyKeyReuseError,
  IdempotencyLockLostError,
  IdempotencySerializationError,
  InvalidIdempotencyKeyError,
} from '../index.js'
import { normalizeKey } from '../src/keys.js'

const printable = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).map((c) => String.fromCharCode(c)), minLength: 1, maxLength: 255 })

describe('keys', () => {
  it('accepts every string of 1 to 255 printable ASCII characters', () => {
    fc.assert(
      fc.property(printable, (key) => {
        expect(normalizeKey(key).key).toBe(key)
      }),
    )
  })

  it('rejects every string with a character outside printable ASCII', () => {
    const outside = fc
      .integer({ min: 0, max: 0xffff })
      .filter((c) => c < 0x20 || c > 0x7e)
      .map((c) => String.fromCharCode(c))
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
    for (const scope of ['s'.repeat(256), '💳'.repeat(256), 'a\0b', '\ud800']) {
      expect(() => normalizeKey({ key: 'k', scope })).toThrow(InvalidIdempotencyKeyError)
    }
    expect(normalizeKey({ key: 'k', scope: 'ü'.repeat(255) }).scope).toHaveLength(255)
    // Characters are code points, as the README and the database count them: 255 emoji fit.
    expect(normalizeKey({ key: 'k', scope: '💳'.repeat(255) }).scope).toBe('💳'.repeat(255))
  })
})

/** Values of every kind the codec keeps, nested; `bare` adds objects without a prototype. */
function values(options: { bare: boolean; unit?: 'grapheme-ascii' | 'binary' }) {
  const text = fc.string({ unit: options.unit ?? 'grapheme-ascii', maxLength: 8 })
  const leaf = fc.oneof(
    text,
    fc.double(),
    fc.integer(),
    fc.boolean(),
    fc.constant(null),
    fc.constant(undefined),
    fc.bigInt(),
    fc.date({ noInvalidDate: true }),
    fc.uint8Array({ maxLength: 4 }).map((a) => Buffer.from(a)),
    fc.uint8Array({ maxLength: 4 }),
    fc.float64Array({ maxLength: 3 }),
    fc.bigInt64Array({ maxLength: 2 }),
    fc.tuple(fc.bigInt(), fc.option(fc.bigInt(), { nil: undefined })).map(([a, b]) => new UpdateResult(a, b)),
    fc.tuple(fc.option(fc.bigInt(), { nil: undefined }), fc.option(fc.bigInt(), { nil: undefined })).map(([a, b]) => new InsertResult(a, b)),
  )
  return fc.letrec((tie) => ({
    value: fc.oneof({ depthSize: 'small', withCrossShrink: true }, leaf, tie('array'), tie('object'), tie('map'), tie('set')),
    array: fc.array(tie('value'), { maxLength: 4 }),
    object: fc.dictionary(fc.oneof(text, fc.constantFrom('__proto__', 'constructor', 'prototype')), tie('value'), {
      maxKeys: 4,
      noNullPrototype: !options.bare,
    }),
    map: fc.array(fc.tuple(tie('value'), tie('value')), { maxLength: 3 }).map((entries) => new Map(entries)),
    set: fc.array(tie('value'), { maxLength: 3 }).map((members) => new Set(members)),
  })).value
}

/** An equal value built differently: object keys, Map entries and Set members in another order. */
function reorder(value: unknown, seed: number): unknown {
  const shuffle = <T>(items: T[]): T[] =>
    items
      .map((item, i) => ({ item, rank: (i * 7919 + seed) % 97 }))
      .sort((a, b) => a.rank - b.rank)
      .map((x) => x.item)
  if (Array.isArray(value)) return value.map((v) => reorder(v, seed))
  if (value instanceof Map) return new Map(shuffle([...value].map(([k, v]) => [reorder(k, seed), reorder(v, seed)] as const)))
  if (value instanceof Set) return new Set(shuffle([...value].map((v) => reorder(v, seed))))
  if (value === null || typeof value !== 'object' || Object.getPrototypeOf(value) !== Object.prototype) return value
  const copy: Record<string, unknown> = {}
  for (const [k, v] of shuffle(Object.entries(value)))
    Object.defineProperty(copy, k, { value: reorder(v, seed), enumerable: true, writable: true, configurable: true })
  return copy
}

/** Asserts that the codec gives `value` back equal, or refuses it with its typed error. */
function keptOrRefused(value: unknown): void {
  let text: string
  try {
    text = defaultCodec.encode(value)
  } catch (error) {
    expect(error).toBeInstanceOf(IdempotencySerializationError)
    return
  }
  deepStrictEqual(defaultCodec.decode(text), value)
}

describe('the codec', () => {
  it('gives back an equal value of the same types for every value it keeps', () => {
    fc.assert(
      fc.property(values({ bare: true, unit: 'binary' }), (value) => {
        deepStrictEqual(defaultCodec.decode(defaultCodec.encode(value)), value)
      }),
      { numRuns: 500 },
    )
  })

  it('keeps shared references and cycles, or refuses them, never giving back something else', () => {
    fc.assert(
      fc.property(values({ bare: true }), fc.boolean(), (shared, wrap) => {
        const bare = Object.assign(Object.create(null) as object, { x: shared, y: [shared] })
        const guarded = JSON.parse('{"constructor": 1}') as Record<string, unknown>
        guarded.y = shared
        guarded.z = shared
        const cycle: Record<string, unknown> = { shared }
        cycle.self = wrap ? [cycle] : cycle
        for (const value of [
          [shared, shared],
          { a: shared, b: [shared] },
          [bare, bare],
          { bare, shared },
          [guarded, shared],
          new Map([[shared, bare]]),
          cycle,
        ]) {
          keptOrRefused(value)
        }
      }),
      { numRuns: 300 },
    )
  })

  it("writes superjson's own text for JSON values, shared objects and -0 included", () => {
    fc.assert(
      fc.property(
        fc.jsonValue().filter((v) => !/"(__proto__|constructor|prototype)":/.test(JSON.stringify(v))),
        fc.boolean(),
        (value, share) => {
          // Plain JSON skips superjson's walk; what it writes must not change for it.
          const candidate = share ? { a: value, b: [value] } : value
          expect(defaultCodec.encode(candidate)).toBe(SuperJSON.stringify(candidate))
        },
      ),
      { numRuns: 500 },
    )
  })

  it('keeps what plain JSON would lose, at the top and deep inside', () => {
    const shared = { s: 1 }
    // biome-ignore lint/suspicious/noSparseArray: a hole is what is tested.
    const sparse = [1, , 3]
    const extra = Object.assign([1, 2], { note: 'x' })
    const hidden = Object.defineProperty({ a: 1 }, 'b', { value: 2, enumerable: false })
    const edges: unknown[] = [-0, Number.NaN, Number.POSITIVE_INFINITY, undefined, { a: undefined }, { a: shared, b: shared }, [shared, shared]]
    edges.push(
      Object.assign(Object.create(null) as object, { a: 1 }),
      JSON.parse('{"__proto__": 1, "a": 2}'),
      { s: Symbol.for('k') },
      sparse,
      extra,
      hidden,
    )
    edges.push(
      Object.defineProperty({}, 'when', { get: () => new Date(0), enumerable: true }),
      Object.defineProperty([1], 0, { get: () => 2n, enumerable: true }),
    )
    for (const edge of edges) {
      for (const value of [edge, { deep: [edge] }]) keptOrRefused(value)
    }
  })

  it('writes JSON, the value itself when it is plain JSON', () => {
    fc.assert(
      // Keys superjson guards (__proto__, constructor, prototype) are stored as a list of entries.
      fc.property(
        fc.jsonValue().filter((v) => !hasNegativeZero(v) && !/"(__proto__|constructor|prototype)":/.test(JSON.stringify(v))),
        (value) => {
          expect(JSON.parse(defaultCodec.encode(value))).toStrictEqual({ json: JSON.parse(JSON.stringify(value)) })
        },
      ),
    )
  })

  it('names where a value it refuses sits', () => {
    expect(() => defaultCodec.encode({ order: { items: [1, () => 2] } })).toThrow(/^The value at order\.items\[1\] is a function/)
    expect(() => defaultCodec.encode(new Map([['k', Symbol('s')]]))).toThrow(/^The value at \{value 0\} is a symbol/)
    expect(() => defaultCodec.encode({ 'a b': new URL('https://x') })).toThrow(/^The value at \["a b"\] is a URL, which cannot be rebuilt/)
  })
})

function hasNegativeZero(value: unknown): boolean {
  if (Object.is(value, -0)) return true
  if (Array.isArray(value)) return value.some(hasNegativeZero)
  return value !== null && typeof value === 'object' && Object.values(value).some(hasNegativeZero)
}

describe('fingerprints', () => {
  it('are equal for equal values, whatever the order of keys, entries and members', () => {
    fc.assert(
      fc.property(values({ bare: false }), fc.nat(), (value, seed) => {
        expect(fingerprint(reorder(value, seed))).toBe(fingerprint(value))
      }),
    )
  })

  it('differ whenever the values differ', () => {
    fc.assert(
      fc.property(values({ bare: false }), values({ bare: false }), (a, b) => {
        // At the top, undefined is no request, as null is (see below); nested, they differ.
        fc.pre(!isDeepStrictEqual(a, b) && !(a == null && b == null))
        expect(fingerprint(a)).not.toBe(fingerprint(b))
      }),
      { numRuns: 500 },
    )
    const pairs: Array<[unknown, unknown]> = [
      [JSON.parse('{"__proto__": {"admin": true}}'), {}],
      [JSON.parse('{"__proto__": 1}'), JSON.parse('{"__proto__": 2}')],
      [new Set([1]), new Set([2])],
      [new Map([['a', 1]]), new Map([['a', 2]])],
      [new Map([['a', 1]]), {}],
      [-0, 0],
      [{ a: undefined }, {}],
      [1n, 1],
      [new Date(0), '1970-01-01T00:00:00.000Z'],
      [Buffer.from('a'), new Uint8Array([97])],
      [{ a: '1' }, { a: 1 }],
    ]
    for (const [a, b] of pairs) expect(fingerprint(a), `${canonicalJson(a)} vs ${canonicalJson(b)}`).not.toBe(fingerprint(b))
  })

  it('are unchanged for JSON values: SHA-256 of sorted, compact JSON', () => {
    fc.assert(
      fc.property(
        fc.jsonValue().filter((v) => !hasNegativeZero(v)),
        (value) => {
          expect(JSON.parse(canonicalJson(value))).toStrictEqual(JSON.parse(JSON.stringify(value)))
        },
      ),
    )
    expect(canonicalJson({ b: [1, { d: 1, c: 2 }], a: 'x' })).toBe('{"a":"x","b":[1,{"c":2,"d":1}]}')
    expect(fingerprint(null)).toBe('74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b')
    expect(canonicalJson(Object.assign(Object.create(null) as object, { b: 1, a: 2 }))).toBe('{"a":2,"b":1}')
  })

  it('of no request, or of undefined, are those of a call that names none', () => {
    expect(fingerprint()).toBe(fingerprint(null))
    expect(fingerprint(undefined)).toBe(fingerprint(null))
    expect(normalizeKey('k').fingerprint).toBe(fingerprint())
    expect(normalizeKey({ key: 'k', request: undefined }).fingerprint).toBe(fingerprint())
    expect(fingerprint([undefined])).not.toBe(fingerprint([null]))
  })

  it('refuse a request nested deeper than 512 levels with a typed error, at any depth, and take one at 512', () => {
    const nested = (depth: number) => {
      let value: unknown = 1
      for (let i = 0; i < depth; i++) value = i % 2 ? [value] : { a: value }
      return value
    }
    expect(() => fingerprint(nested(512))).not.toThrow()
    for (const depth of [513, 2_500, 100_000]) {
      expect(() => fingerprint(nested(depth))).toThrow(IdempotencySerializationError)
      expect(() => fingerprint(nested(depth))).toThrow(/nests more than 512 levels deep/)
      expect(() => normalizeKey({ key: 'k', request: nested(depth) })).toThrow(IdempotencySerializationError)
      expect(() => defaultCodec.encode(nested(depth))).toThrow(IdempotencySerializationError)
    }
  })

  it('refuse requests the codec cannot keep, and cycles', () => {
    const cycle: Record<string, unknown> = {}
    cycle.self = cycle
    for (const request of [{ f: () => 1 }, { s: Symbol('s') }, new URL('https://x'), cycle]) {
      expect(() => fingerprint(request)).toThrow(IdempotencySerializationError)
      expect(() => normalizeKey({ key: 'k', request })).toThrow(IdempotencySerializationError)
    }
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
