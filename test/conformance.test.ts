import { sql } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import {
  createIdempotency,
  IdempotencyConflictError,
  IdempotencyKeyReuseError,
  IdempotencyKeyUsedError,
  IdempotencySerializationError,
  IdempotencySetupError,
  InvalidIdempotencyKeyError,
  withIdempotency,
} from '../index.js'
import { gate, itIf, itWhere, openFixture, startWorker, targetsFor, type Fixture } from './support/harness.js'
import { sleep } from './support/util.js'

for (const target of targetsFor('conformance')) {
  describe(`conformance: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target)
    })
    afterEach(async () => {
      await fx.close()
    })

    const once =
      (key: string, value: unknown = { ok: key }) =>
      async (trx: Parameters<Fixture['effect']>[0]) => {
        await fx.effect(trx, key)
        return value
      }

    it('runs once and replays the stored value, telling the replay apart', async () => {
      const request = { amount: 100, currency: 'EUR' }
      const value = { id: 7, zeta: 'last', alpha: ['first', null, true, 1.5] }
      const first = await fx.idempotency.executeTransaction({ key: 'k', request }, once('k', value))
      const again = await fx.idempotency.executeTransaction({ key: 'k', request: { currency: 'EUR', amount: 100 } }, once('k'))
      const inside = await fx.db.transaction().execute((trx) => fx.idempotency.execute(trx, { key: 'k', request }, once('k')))
      expect(first).toEqual({ value, replayed: false })
      expect(again).toEqual({ value, replayed: true })
      expect(inside).toEqual({ value, replayed: true })
      expect(JSON.stringify(again.value)).toBe(JSON.stringify(value))
      expect(await fx.effects('k')).toBe(1)
    })

    it('stores a first execution inside the caller transaction and replays it there', async () => {
      const run = () => fx.db.transaction().execute((trx) => fx.idempotency.withIdempotency(trx, 'in-trx', once('in-trx', 'done')))
      expect(await run()).toBe('done')
      expect(await run()).toBe('done')
      expect(await fx.effects('in-trx')).toBe(1)
    })

    it('refuses a key reused for a different request, running nothing', async () => {
      await fx.idempotency.transaction({ key: 'reuse', request: { a: 1 } }, once('reuse'))
      const reused = fx.idempotency.transaction({ key: 'reuse', request: { a: 2 } }, once('reuse'))
      await expect(reused).rejects.toBeInstanceOf(IdempotencyKeyReuseError)
      await expect(reused).rejects.toMatchObject({ status: 422, code: 'key_reuse', name: 'IdempotencyKeyReuseError' })
      const inside = fx.db.transaction().execute((trx) => fx.idempotency.withIdempotency(trx, { key: 'reuse', request: { a: 2 } }, once('reuse')))
      await expect(inside).rejects.toBeInstanceOf(IdempotencyKeyReuseError)
      expect(await fx.effects('reuse')).toBe(1)
    })

    it("with reuse: 'reject', refuses a used key on every entry point, running nothing and returning no stored answer", async () => {
      const request = { amount: 100 }
      const reject = { reuse: 'reject' } as const
      await fx.idempotency.transaction({ key: 'used', request }, once('used', 'first'))
      const used = (call: Promise<unknown>) =>
        expect(call).rejects.toMatchObject({
          name: 'IdempotencyKeyUsedError',
          status: 409,
          code: 'key_used',
          message: expect.stringMatching(/nothing ran/),
        })
      await used(fx.idempotency.transaction({ key: 'used', request }, once('used'), reject))
      await used(fx.idempotency.executeTransaction({ key: 'used', request }, once('used'), reject))
      await used(fx.db.transaction().execute((trx) => fx.idempotency.withIdempotency(trx, { key: 'used', request }, once('used'), reject)))
      await used(
        fx.db.transaction().execute((trx) => withIdempotency(trx, { key: 'used', request }, once('used'), { tableName: fx.table, reuse: 'reject' })),
      )
      await used(fx.idempotency.run({ key: 'used', request }, (flow) => flow.phase('p', once('used')), reject))
      // Another request with the key is still the 422 it always is.
      await expect(fx.idempotency.transaction({ key: 'used', request: { amount: 200 } }, once('used'), reject)).rejects.toBeInstanceOf(
        IdempotencyKeyReuseError,
      )
      // The key is untouched: the default still replays it, and a new key runs.
      expect(await fx.idempotency.executeTransaction({ key: 'used', request }, once('used'))).toEqual({ value: 'first', replayed: true })
      expect(await fx.idempotency.executeTransaction({ key: 'fresh', request }, once('fresh', 'new'), reject)).toEqual({
        value: 'new',
        replayed: false,
      })
      expect(await fx.effects('used')).toBe(1)
    })

    it("with reuse: 'reject' on the instance, rejects by default and replays where a call asks, and one of many duplicates runs", async () => {
      const events: string[] = []
      const strict = fx.with({ reuse: 'reject', onEvent: (event) => void events.push(event.type) })
      const results = await Promise.allSettled(Array.from({ length: 8 }, () => strict.transaction('storm', once('storm', 'only'))))
      expect(results.filter((r) => r.status === 'fulfilled').map((r) => r.value)).toEqual(['only'])
      for (const r of results) if (r.status === 'rejected') expect(r.reason).toBeInstanceOf(IdempotencyKeyUsedError)
      expect(events.filter((type) => type === 'key_used')).toHaveLength(7)
      expect(events).not.toContain('replayed')
      expect(await strict.executeTransaction('storm', once('storm'), { reuse: 'replay' })).toEqual({ value: 'only', replayed: true })
      expect(await fx.effects('storm')).toBe(1)
    })

    it('refuses a reuse option that is neither replay nor reject, with a RangeError and nothing written', async () => {
      const bad = { reuse: 'ignore' } as unknown as { reuse: 'reject' }
      await expect(fx.idempotency.transaction('bad-reuse', once('bad-reuse'), bad)).rejects.toThrow(/reuse must be 'replay' or 'reject'/)
      expect(() => fx.with(bad)).toThrow(RangeError)
      expect(await fx.rows()).toBe(0)
    })

    it('keeps scopes apart: the same key in another scope runs', async () => {
      await fx.idempotency.transaction({ key: 'shared', scope: 'tenant-a' }, once('shared', 'a'))
      const b = await fx.idempotency.executeTransaction({ key: 'shared', scope: 'tenant-b' }, once('shared', 'b'))
      expect(b).toEqual({ value: 'b', replayed: false })
      expect(await fx.effects('shared')).toBe(2)
    })

    it('compares keys byte for byte: case and trailing spaces make different keys', async () => {
      for (const key of ['abc', 'ABC', 'abc ', ' abc']) {
        expect(await fx.idempotency.executeTransaction(key, once(key, key))).toEqual({ value: key, replayed: false })
      }
      expect(await fx.rows()).toBe(4)
    })

    it('stores nothing when the function throws, so a retry runs afresh', async () => {
      const failing = fx.idempotency.transaction('fails', async (trx) => {
        await fx.effect(trx, 'fails')
        throw new Error('card declined')
      })
      await expect(failing).rejects.toThrow('card declined')
      expect(await fx.rows()).toBe(0)
      expect(await fx.idempotency.executeTransaction('fails', once('fails', 1))).toEqual({ value: 1, replayed: false })
      expect(await fx.effects('fails')).toBe(1)
    })

    it.each([
      ['empty', ''],
      ['256 characters', 'x'.repeat(256)],
      ['a control character', 'abc\n'],
      ['DEL', 'abc\x7f'],
      ['non-ASCII', 'clé'],
    ])('rejects a key that is %s before touching anything', async (_, key) => {
      let ran = false
      const run = () => fx.idempotency.transaction(key, async () => (ran = true))
      await expect(run()).rejects.toBeInstanceOf(InvalidIdempotencyKeyError)
      await expect(run()).rejects.toMatchObject({ status: 400, code: 'invalid_key' })
      expect(ran).toBe(false)
      expect(await fx.rows()).toBe(0)
    })

    it('accepts a 255-character key of every printable character', async () => {
      const printable = Array.from({ length: 95 }, (_, i) => String.fromCharCode(0x20 + i)).join('')
      const key = printable.repeat(3).slice(0, 255)
      expect(await fx.idempotency.executeTransaction(key, once(key, 1))).toEqual({ value: 1, replayed: false })
      expect(await fx.idempotency.executeTransaction(key, once(key, 2))).toEqual({ value: 1, replayed: true })
    })

    it.each([
      ['a function', () => ({ callback: () => 1 })],
      ['a symbol', () => ({ tag: Symbol('x') })],
      ['a class instance', () => ({ at: new URL('https://example.com') })],
      // biome-ignore lint/suspicious/noSparseArray: a hole is what is tested.
      ['a sparse array', () => [1, , 3]],
    ])('rolls back when the result holds %s', async (_, make) => {
      const run = fx.idempotency.transaction('odd', async (trx) => {
        await fx.effect(trx, 'odd')
        return make() as unknown
      })
      await expect(run).rejects.toBeInstanceOf(IdempotencySerializationError)
      expect(await fx.rows()).toBe(0)
      expect(await fx.effects()).toBe(0)
    })

    it('runs again once the key has expired, even for another request', async () => {
      const short = fx.with({ ttl: 200 })
      await short.transaction('ttl', once('ttl', 1))
      expect(await short.executeTransaction('ttl', once('ttl', 2))).toEqual({ value: 1, replayed: true })
      await sleep(400)
      expect(await short.executeTransaction('ttl', once('ttl', 3))).toEqual({ value: 3, replayed: false })
      await sleep(400)
      const inside = await fx.db.transaction().execute((trx) => short.execute(trx, { key: 'ttl', request: 'other' }, once('ttl', 4)))
      expect(inside).toEqual({ value: 4, replayed: false })
      expect(await fx.effects('ttl')).toBe(3)
      expect(await fx.rows()).toBe(1)
    })

    it('prunes only expired rows, in batches', async () => {
      const short = fx.with({ ttl: 100 })
      for (let i = 0; i < 7; i++) await short.transaction(`old-${i}`, async () => i)
      await fx.idempotency.transaction('fresh', async () => 'kept')
      await sleep(250)
      expect(await fx.idempotency.prune({ batchSize: 3 })).toBe(7)
      expect(await fx.rows()).toBe(1)
      expect(await fx.idempotency.transaction('fresh', async () => 'new')).toBe('kept')
      expect(await fx.idempotency.prune()).toBe(0)
    })

    /** Starts a transaction that claims `key` and holds it until `release` is called. */
    const holding = async (key: string) => {
      const hold = gate()
      const claimed = gate()
      const first = fx.idempotency.transaction(key, async (trx) => {
        await fx.effect(trx, key)
        claimed.open()
        await hold.promise
        return 'first'
      })
      await claimed.promise
      return { first, release: hold.open }
    }

    itWhere(target, 'pool')('answers 409 while the same key is in flight in another transaction', async () => {
      const { first, release } = await holding('busy')
      const impatient = fx.with({ conflictWait: 300 })
      const started = Date.now()
      const second = impatient.transaction('busy', once('busy'))
      await expect(second).rejects.toBeInstanceOf(IdempotencyConflictError)
      await expect(second).rejects.toMatchObject({ status: 409, reason: 'in_flight' })
      expect(Date.now() - started).toBeLessThan(4000)
      release()
      expect(await first).toBe('first')
      expect(await fx.effects('busy')).toBe(1)
    })

    it('replays a duplicate that waited for the first attempt once it commits', async () => {
      const { first, release } = await holding('busy')
      const patient = fx.idempotency.executeTransaction('busy', once('busy'))
      await sleep(100)
      release()
      expect(await first).toBe('first')
      expect(await patient).toEqual({ value: 'first', replayed: true })
      expect(await fx.effects('busy')).toBe(1)
    })

    it('leaves the session lock-wait setting as it found it, inside the function and after a replay', async () => {
      const setting = {
        postgres: sql<{ v: string }>`select current_setting('lock_timeout') as v`,
        mysql: sql<{ v: string }>`select @@innodb_lock_wait_timeout as v`,
        sqlite: sql<{ v: string }>`select 1 as v`,
      }[target.database]
      const before = (await fx.db.transaction().execute((trx) => setting.execute(trx))).rows[0]!.v
      const inside = await fx.idempotency.transaction('setting', async (trx) => (await setting.execute(trx)).rows[0]!.v, { conflictWait: 2000 })
      expect(String(inside)).toBe(String(before))
      const afterReplay = await fx.db.transaction().execute(async (trx) => {
        await fx.idempotency.withIdempotency(trx, 'setting', async () => 'unused', { conflictWait: 2000 })
        return (await setting.execute(trx)).rows[0]!.v
      })
      expect(String(afterReplay)).toBe(String(before))
    })

    itIf(target.database === 'postgres', 'lock_timeout is a Postgres setting')(
      'puts back a lock_timeout the caller set in its transaction',
      async () => {
        const setting = sql<{ v: string }>`select current_setting('lock_timeout') as v`
        const run = () =>
          fx.db.transaction().execute(async (trx) => {
            await sql`set local lock_timeout = '7s'`.execute(trx)
            const inside = await fx.idempotency.withIdempotency(trx, 'caller-setting', async (t) => (await setting.execute(t)).rows[0]!.v)
            return [inside, (await setting.execute(trx)).rows[0]!.v]
          })
        expect(await run()).toEqual(['7s', '7s'])
        expect(await run()).toEqual(['7s', '7s'])
      },
    )

    itWhere(target, 'pool')('leaves the session lock-wait setting as it found it after a conflict', async () => {
      const setting = {
        postgres: sql<{ v: string }>`select current_setting('lock_timeout') as v`,
        mysql: sql<{ v: string }>`select @@innodb_lock_wait_timeout as v`,
      }[target.database as 'postgres' | 'mysql']
      const held = gate()
      const release = gate()
      const holder = fx.idempotency.transaction('held', async () => {
        held.open()
        await release.promise
        return 'held'
      })
      await held.promise
      const [before, after] = await fx.db.connection().execute(async (conn) => {
        const before = (await setting.execute(conn)).rows[0]!.v
        const conflict = conn.transaction().execute((trx) => fx.idempotency.withIdempotency(trx, 'held', async () => 'no', { conflictWait: 1000 }))
        await expect(conflict).rejects.toMatchObject({ reason: 'in_flight' })
        return [before, (await setting.execute(conn)).rows[0]!.v]
      })
      release.open()
      expect(await holder).toBe('held')
      expect(String(after)).toBe(String(before))
    })

    it('lets a process end by itself, cleanly, once its Kysely instance is destroyed', async () => {
      const child = startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'clean-exit' })
      const { code, signal, stdout, stderr } = await child.done
      expect({ code, signal, stderr }).toEqual({ code: 0, signal: null, stderr: '' })
      expect(stdout).toContain('done')
    })

    it('needs a transaction for withIdempotency', async () => {
      const notTrx = fx.db as unknown as Parameters<typeof fx.idempotency.withIdempotency>[0]
      await expect(fx.idempotency.withIdempotency(notTrx, 'k', async () => 1)).rejects.toBeInstanceOf(TypeError)
    })

    it('offers withIdempotency as a free function with its own table option', async () => {
      const run = () => fx.db.transaction().execute((trx) => withIdempotency(trx, 'free', once('free', 'x'), { tableName: fx.table }))
      expect(await run()).toBe('x')
      expect(await run()).toBe('x')
      expect(await fx.effects('free')).toBe(1)
    })

    it('names a missing table and a malformed table name clearly', async () => {
      const missing = createIdempotency({ db: fx.db, tableName: 'no_such_table', ...(target.dialect ? { dialect: target.dialect() } : {}) })
      await expect(missing.transaction('k', async () => 1)).rejects.toBeInstanceOf(IdempotencySetupError)
      await expect(missing.transaction('k', async () => 1)).rejects.toThrow(/no_such_table.*migrate/)
      expect(() => createIdempotency({ db: fx.db, tableName: 'keys; drop table x' })).toThrow(IdempotencySetupError)
      expect(() => createIdempotency({ db: fx.db, ttl: 0 })).toThrow(RangeError)
    })
  })
}
