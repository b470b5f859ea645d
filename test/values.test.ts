import { deepStrictEqual } from 'node:assert/strict'
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto'
import { sql, type Transaction } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { defaultCodec, IdempotencySerializationError, IdempotencySetupError, type Codec, type Flow } from '../index.js'
import { IdempotentRoute, type RequestFacts } from '../http/index.js'
import { openFixture, targetsFor, type Fixture } from './support/harness.js'

/** Values a replay must give back exactly: deep-strict-equal, same prototypes. */
function storableValues(): Record<string, () => unknown> {
  const shared = { id: 1 }
  return {
    bigint: () => ({ amount: 12345678901234567890n, negative: -1n }),
    Date: () => ({ created_at: new Date('2026-01-02T03:04:05.678Z') }),
    Buffer: () => ({ avatar: Buffer.from([0, 1, 254, 255]) }),
    'typed arrays': () => [new Uint8Array([1, 2, 3]), new Float64Array([Number.NaN, -0, Infinity]), new BigInt64Array([-5n]), new Int16Array([-2])],
    Map: () =>
      new Map<unknown, unknown>([
        ['a', 1],
        [{ composite: true }, new Date(0)],
        [2n, [1, 2]],
      ]),
    Set: () => new Set<unknown>(['x', 1, { nested: new Set([1n]) }]),
    'undefined at the top': () => undefined,
    'undefined as a member': () => ({ present: undefined, list: [undefined, 1] }),
    'numbers JSON loses': () => [-0, Number.NaN, Infinity, -Infinity],
    'key order': () => ({ zeta: 1, alpha: { y: 2, b: 3 }, mid: [{ d: 4, c: 5 }] }),
    'an object without prototype': () => Object.assign(Object.create(null) as object, { a: 1 }),
    'fields named __proto__ and constructor': () => JSON.parse('{"__proto__": {"admin": true}, "constructor": "x", "prototype": 1}') as unknown,
    'an object shared inside an object without prototype': () =>
      Object.assign(Object.create(null) as object, { a: shared, b: [shared], n: 1n, m: 1n }),
    'shared references and a cycle': () => {
      const cycle: Record<string, unknown> = { shared, again: shared }
      cycle.self = cycle
      return cycle
    },
    'plain JSON': () => ({ status: 201, body: { id: 7, items: ['a', null, true, 1.5], name: '漢字 💳' } }),
  }
}

/** Values the codec refuses: a typed error, nothing stored. */
const refusedValues: Record<string, () => unknown> = {
  'a function': () => ({ callback: () => 1 }),
  'a symbol': () => ({ tag: Symbol('x') }),
  'a class instance it cannot rebuild': () => ({ at: new URL('https://example.com') }),
  // biome-ignore lint/suspicious/noSparseArray: a hole is what is tested.
  'a sparse array': () => [1, , 3],
  'a symbol key': () => ({ [Symbol('k')]: 1 }),
  // A value walked by recursion would overflow the stack here: refused with a typed error, never a RangeError.
  'a value nested 10 000 levels deep': () => {
    let value: unknown = 1n
    for (let i = 0; i < 10_000; i++) value = i % 2 ? [value] : { next: value }
    return value
  },
  'a cycle through a field named constructor': () => {
    const value: Record<string, unknown> = JSON.parse('{"constructor": "x"}') as Record<string, unknown>
    value.self = value
    return value
  },
}

type Mode = 'withIdempotency' | 'transaction' | 'phase' | 'step' | 'run'
const MODES: readonly Mode[] = ['withIdempotency', 'transaction', 'phase', 'step', 'run']

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('values', ['statement-paths'])) {
  describe(`values: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target)
    })
    afterEach(async () => {
      await fx.close()
    })

    /**
     * Runs `make` once under `key` in `mode` and then again as a replay (a resume, for phases
     * and steps); returns what the function produced, and what the first and the second call
     * gave back. Each call records one side effect when it runs.
     */
    async function twice(mode: Mode, key: string, make: () => unknown) {
      let produced: unknown
      const value = () => (produced = make())
      const call = async (n: number): Promise<unknown> => {
        const inTrx = async (trx: Transaction<any>) => (await fx.effect(trx, key), value())
        switch (mode) {
          case 'withIdempotency':
            return fx.db.transaction().execute((trx) => fx.idempotency.withIdempotency(trx, key, inTrx))
          case 'transaction':
            return fx.idempotency.transaction(key, inTrx)
          case 'run':
            return fx.idempotency.run(key, async (flow) => flow.phase('p', inTrx))
          case 'phase':
          case 'step': {
            let seen: unknown
            const body = async (flow: Flow<any, string>) => {
              seen =
                mode === 'phase'
                  ? await flow.phase('p', inTrx)
                  : await flow.step('s', async () => (await fx.db.insertInto(fx.effectsTable).values({ k: key }).execute(), value()))
              if (n === 1) throw new Error('stop after the first attempt')
              return 'done'
            }
            await fx.idempotency.run(key, body).catch((error: Error) => {
              if (error.message !== 'stop after the first attempt') throw error
            })
            return seen
          }
        }
      }
      const first = await call(1)
      const original = produced
      const second = await call(2)
      return { original, first, second }
    }

    for (const mode of MODES) {
      for (const [name, make] of Object.entries(storableValues())) {
        it(`${mode}: gives back ${name} exactly, first and on replay, with one side effect`, async () => {
          const { original, first, second } = await twice(mode, 'v', make)
          deepStrictEqual(first, original)
          deepStrictEqual(second, original)
          expect(await fx.effects('v')).toBe(1)
        })
      }

      for (const [name, make] of Object.entries(refusedValues)) {
        it(`${mode}: refuses ${name} with a typed error, writes nothing and leaves the key usable`, async () => {
          await expect(twice(mode, 'r', make)).rejects.toBeInstanceOf(IdempotencySerializationError)
          // A step's call has happened by the time its value is refused; only its record is missing.
          expect(await fx.effects('r')).toBe(mode === 'step' ? 1 : 0)
          if (mode === 'withIdempotency' || mode === 'transaction') expect(await fx.rows()).toBe(0)
          expect(await fx.idempotency.run('r', async () => 'usable')).toBe('usable')
        })
      }
    }

    it("replays Kysely's InsertResult, UpdateResult and DeleteResult as instances of the installed classes", async () => {
      const write = async (trx: Transaction<any>) => ({
        inserted: await trx.insertInto(fx.effectsTable).values({ k: 'kysely' }).executeTakeFirst(),
        updated: await trx.updateTable(fx.effectsTable).set({ k: 'kysely' }).where('k', '=', 'kysely').execute(),
        deleted: await trx.deleteFrom(fx.effectsTable).where('k', '=', 'nothing').executeTakeFirst(),
      })
      const first = await fx.idempotency.transaction('results', write)
      const again = await fx.idempotency.transaction('results', write)
      deepStrictEqual(again, first)
      expect(again.updated[0]!.numUpdatedRows).toBe(1n)
      const flow = async (flow: Flow<any, unknown>) => flow.phase('write', async (trx) => (await write(trx)).updated)
      deepStrictEqual(await fx.idempotency.run('results-flow', flow), await fx.idempotency.run('results-flow', flow))
    })

    it('keeps an invalid Date a Date', async () => {
      await fx.idempotency.transaction('invalid-date', async () => new Date(Number.NaN))
      const again = await fx.idempotency.transaction('invalid-date', async () => new Date(0))
      expect(again).toBeInstanceOf(Date)
      expect(again.getTime()).toBeNaN()
    })

    it('stores readable JSON that names its codec', async () => {
      await fx.idempotency.transaction('readable', async () => ({ id: 7, at: new Date(0) }))
      const row = await fx.db
        .selectFrom(fx.table)
        .select(['codec', fx.idempotency.dialect.jsonText(sql.ref('response')).as('response')])
        .executeTakeFirstOrThrow()
      expect(row.codec).toBe('superjson')
      expect(JSON.parse(String(row.response))).toEqual({ json: { id: 7, at: '1970-01-01T00:00:00.000Z' }, meta: { values: { at: ['Date'] }, v: 1 } })
    })

    it('replays rows written before codecs existed (plain JSON, no codec)', async () => {
      const { dialect } = fx.idempotency
      const row = (key: string, values: Record<string, unknown>) =>
        fx.db
          .insertInto(fx.table)
          .values({
            scope: '',
            key,
            fingerprint: '74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b',
            recovery_point: 'finished',
            created_at: dialect.clock,
            last_run_at: dialect.clock,
            expires_at: dialect.later(sql.lit(60_000)),
            ...values,
          })
          .execute()
      // JSON text as 0.1.0 stored it, whatever the driver makes of a JSON parameter (postgres.js would encode a string).
      const json = (text: string) => dialect.json(sql.val(text))
      await row('old-result', { response: json('{"status":201,"orderId":1,"at":"2026-01-02T03:04:05.678Z"}') })
      expect(await fx.idempotency.executeTransaction('old-result', async () => 'not run')).toEqual({
        value: { status: 201, orderId: 1, at: '2026-01-02T03:04:05.678Z' },
        replayed: true,
      })

      // An unfinished flow of the old version: its phase values sit beside the $ members.
      await row('old-flow', { recovery_point: 'p1', phase_results: json('{"$flow":"old-flow-id","$attempt":1,"$request":null,"p1":{"x":1}}') })
      const listed = (await fx.idempotency.abandoned()).find((f) => f.key === 'old-flow')
      expect(listed).toMatchObject({ recoveryPoint: 'p1', attempts: 1, request: null })
      const resumed = await fx.idempotency.run('old-flow', async (flow) => {
        const p1 = await flow.phase('p1', async () => ({ x: 2 }))
        const p2 = await flow.phase('p2', async (trx) => (await fx.effect(trx, 'old-flow'), 'new'))
        return { p1, p2, attempt: flow.attempt, stepKey: flow.stepKey('charge') }
      })
      expect(resumed).toEqual({ p1: { x: 1 }, p2: 'new', attempt: 2, stepKey: 'old-flow-id.charge' })
      expect(await fx.idempotency.run('old-flow', async () => ({ p1: {}, p2: 'again', attempt: 0, stepKey: '' }))).toEqual(resumed)
    })

    it('replays an HTTP answer stored before headers that differ only in case were refused, with the last of them', async () => {
      const request = { method: 'POST', url: '/x', body: { item: 1 }, headers: {} }
      // What a route stored then: its answer as it is kept, headers and body's exact text.
      const stored = { status: 201, headers: { 'Content-Type': 'application/json', 'X-Order': '1', 'x-order': '2' }, body: '{"ok":true}' }
      await fx.idempotency.transaction({ key: 'old-answer', scope: 'u', request }, async () => stored)
      const route = new IdempotentRoute<unknown>({ scope: () => 'u' }).transaction(fx.idempotency, async () => ({ status: 500 }))
      const facts: RequestFacts = {
        method: 'POST',
        url: '/x',
        body: () => ({ item: 1 }),
        headerLines: (name) => (name === 'Idempotency-Key' ? ['old-answer'] : []),
      }
      expect(await route({}, facts)).toEqual({
        replayed: true,
        answer: { status: 201, headers: { 'Content-Type': 'application/json', 'x-order': '2', 'Idempotency-Replayed': 'true' }, body: '{"ok":true}' },
      })
    })

    it('stores through a codec of your own, here encrypting, and reads rows of the default codec', async () => {
      const secret = randomBytes(32)
      const encrypted: Codec = {
        name: 'aes-256-gcm',
        encode(value) {
          const iv = randomBytes(12)
          const cipher = createCipheriv('aes-256-gcm', secret, iv)
          const data = Buffer.concat([cipher.update(defaultCodec.encode(value), 'utf8'), cipher.final()])
          return [iv, cipher.getAuthTag(), data].map((part) => part.toString('base64')).join('.')
        },
        decode(text) {
          const [iv, tag, data] = text.split('.').map((part) => Buffer.from(part, 'base64'))
          const decipher = createDecipheriv('aes-256-gcm', secret, iv!)
          decipher.setAuthTag(tag!)
          return defaultCodec.decode(Buffer.concat([decipher.update(data!), decipher.final()]).toString('utf8'))
        },
      }
      const plain = fx.idempotency
      const private_ = fx.with({ codec: encrypted })
      await plain.transaction('written-plain', async () => ({ card: '4242', at: new Date(1) }))
      expect(await private_.transaction('written-plain', async () => ({ card: '', at: new Date(0) }))).toStrictEqual({
        card: '4242',
        at: new Date(1),
      })

      const secretValue = { card: '4111 1111 1111 1111', amount: 5n }
      expect(await private_.transaction('secret', async () => secretValue)).toBe(secretValue)
      expect(await private_.transaction('secret', async () => ({ card: '', amount: 0n }))).toStrictEqual(secretValue)
      const stored = await fx.db
        .selectFrom(fx.table)
        .select(['codec', fx.idempotency.dialect.jsonText(sql.ref('response')).as('response')])
        .where('key', '=', 'secret')
        .executeTakeFirstOrThrow()
      expect(stored.codec).toBe('aes-256-gcm')
      expect(String(stored.response)).not.toContain('4111')
      const flow = async (flow: Flow<any, bigint>) => flow.step('charge', async () => 42n)
      expect(await private_.run('secret-flow', flow)).toBe(42n)
      expect(await private_.run('secret-flow', flow)).toBe(42n)

      await expect(plain.transaction('secret', async () => secretValue)).rejects.toThrow(IdempotencySetupError)
      await expect(plain.transaction('secret', async () => secretValue)).rejects.toThrow(/"aes-256-gcm"/)
    })

    it('lists every abandoned flow, marking the one another codec wrote instead of failing the whole list', async () => {
      const other = fx.with({ codec: { name: 'other', encode: (value) => JSON.stringify(value), decode: (text) => JSON.parse(text) as unknown } })
      const stop = async (flow: Flow<any, string>) => {
        await flow.phase('one', async () => 1)
        throw new Error('stops')
      }
      await expect(fx.idempotency.run({ key: 'readable', request: { n: 1 } }, stop)).rejects.toThrow('stops')
      await expect(other.run({ key: 'written-elsewhere', request: { n: 2 } }, stop)).rejects.toThrow('stops')
      const listed = await fx.idempotency.abandoned()
      expect(listed.find((f) => f.key === 'readable')).toMatchObject({ request: { n: 1 }, attempts: 1, unreadable: null })
      expect(listed.find((f) => f.key === 'written-elsewhere')).toMatchObject({
        recoveryPoint: 'one',
        request: undefined,
        attempts: null,
        unreadable: expect.stringMatching(/codec "other"/),
      })
      expect(await fx.idempotency.inspect({ key: 'written-elsewhere' })).toMatchObject({
        state: 'abandoned',
        attempts: null,
        unreadable: expect.stringMatching(/codec "other"/),
      })
      expect(await other.inspect({ key: 'written-elsewhere' })).toMatchObject({ attempts: 1, unreadable: null })
    })

    it('refuses a codec name longer than the column that stores it, when the instance is created', () => {
      const named = (name: string) => () =>
        fx.with({ codec: { name, encode: (value) => JSON.stringify(value), decode: (text) => JSON.parse(text) as unknown } })
      expect(named('💳'.repeat(255))).not.toThrow()
      for (const name of ['💳'.repeat(256), '', 'a\0b']) {
        expect(named(name)).toThrow(IdempotencySetupError)
        expect(named(name)).toThrow(/The codec name must be 1 to 255 characters without NUL/)
      }
    })
  })
}
