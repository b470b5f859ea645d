/**
 * Queue messages and webhook deliveries through `idempotency.consume`, whose id is the key, on
 * every database: once per id, a redelivery acknowledged without running, crashes on both sides
 * of the commit. The Standard Webhooks example of the docs runs over HTTP in test/docs.test.ts.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { IdempotencyConflictError, IdempotencyKeyReuseError, IdempotencyKeyUsedError, InvalidIdempotencyKeyError, type Message } from '../index.js'
import { gate, itWhere, openFixture, startWorker, targetsFor, type Fixture } from './support/harness.js'

const DAY = 24 * 60 * 60 * 1000

for (const target of targetsFor('consumers')) {
  describe(`consumers: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target)
    })
    afterEach(async () => {
      await fx.close()
    })

    const handle = (message: Message, value: unknown = { handled: message.id }) =>
      fx.idempotency.consume(message, async (trx) => {
        await fx.effect(trx, `${message.source}:${message.id}`)
        return value
      })

    it('runs the handler once per id, with its writes, and acknowledges a redelivery as a duplicate with the stored value', async () => {
      const message = { source: 'billing', id: 'msg_1', body: { type: 'invoice.paid', amount: 12n } }
      expect(await handle(message, { at: new Date(0) })).toEqual({ value: { at: new Date(0) }, duplicate: false })
      for (let i = 0; i < 2; i++)
        expect(await handle({ ...message, body: { ...message.body } })).toEqual({ value: { at: new Date(0) }, duplicate: true })
      expect(await fx.effects('billing:msg_1')).toBe(1)
      // The id is remembered a week, longer than providers redeliver.
      const kept = await fx.idempotency.inspect({ key: 'msg_1', scope: 'message:billing' })
      expect(kept!.expiresAt.getTime() - Date.now()).toBeGreaterThan(7 * DAY - 60_000)
      const shorter = await fx.idempotency.consume({ source: 'billing', id: 'msg_2' }, async () => 1, { ttl: DAY })
      expect(shorter.duplicate).toBe(false)
      expect((await fx.idempotency.inspect({ key: 'msg_2', scope: 'message:billing' }))!.expiresAt.getTime() - Date.now()).toBeLessThan(DAY + 2000)
      // An instance that keeps keys longer keeps message ids as long.
      await fx.with({ ttl: 14 * DAY }).consume({ source: 'billing', id: 'msg_3' }, async () => 1)
      expect((await fx.idempotency.inspect({ key: 'msg_3', scope: 'message:billing' }))!.expiresAt.getTime() - Date.now()).toBeGreaterThan(
        14 * DAY - 60_000,
      )
    })

    it('keeps sources apart, and apart from HTTP scopes of the same name', async () => {
      await handle({ source: 'billing', id: 'same' })
      expect((await handle({ source: 'shipping', id: 'same' })).duplicate).toBe(false)
      expect(await fx.idempotency.executeTransaction({ key: 'same', scope: 'billing' }, async () => 'a client')).toEqual({
        value: 'a client',
        replayed: false,
      })
      expect(await fx.effects()).toBe(2)
    })

    it('refuses another payload under a processed id (422), and with reuse: reject, the redelivery itself; nothing runs', async () => {
      await handle({ source: 'billing', id: 'm', body: { amount: 1 } })
      await expect(handle({ source: 'billing', id: 'm', body: { amount: 2 } })).rejects.toBeInstanceOf(IdempotencyKeyReuseError)
      const strict = fx.idempotency.consume({ source: 'billing', id: 'm', body: { amount: 1 } }, async () => 'again', { reuse: 'reject' })
      await expect(strict).rejects.toBeInstanceOf(IdempotencyKeyUsedError)
      expect(await fx.effects()).toBe(1)
    })

    it('stores nothing when the handler throws, so the redelivery runs it', async () => {
      const failing = fx.idempotency.consume({ source: 'q', id: 'f' }, async (trx) => {
        await fx.effect(trx, 'q:f')
        throw new Error('downstream is down')
      })
      await expect(failing).rejects.toThrow('downstream is down')
      expect(await fx.rows()).toBe(0)
      expect(await handle({ source: 'q', id: 'f' })).toEqual({ value: { handled: 'f' }, duplicate: false })
      expect(await fx.effects('q:f')).toBe(1)
    })

    it('runs a message delivered to 12 consumers at once once; the others acknowledge it as a duplicate', async () => {
      const deliveries = await Promise.all(Array.from({ length: 12 }, () => handle({ source: 'q', id: 'storm', body: { n: 1 } })))
      expect(deliveries.filter((d) => !d.duplicate)).toHaveLength(1)
      expect(new Set(deliveries.map((d) => JSON.stringify(d.value))).size).toBe(1)
      expect(await fx.effects('q:storm')).toBe(1)
    })

    it('answers a redelivery while the first is still running with a conflict once conflictWait is over, for the queue to redeliver', async () => {
      const entered = gate()
      const release = gate()
      const first = fx.idempotency.consume({ source: 'q', id: 'slow' }, async (trx) => {
        await fx.effect(trx, 'q:slow')
        entered.open()
        await release.promise
        return 'first'
      })
      await entered.promise
      await expect(fx.idempotency.consume({ source: 'q', id: 'slow' }, async () => 'second', { conflictWait: 0 })).rejects.toBeInstanceOf(
        IdempotencyConflictError,
      )
      release.open()
      expect(await first).toEqual({ value: 'first', duplicate: false })
      expect(await fx.effects('q:slow')).toBe(1)
    })

    it('rejects a message without a source or an id, writing nothing', async () => {
      for (const message of [{ id: 'x' }, { source: '', id: 'x' }, { source: 'q' }, { source: 'q', id: '' }, null]) {
        await expect(fx.idempotency.consume(message as unknown as Message, async () => 1)).rejects.toBeInstanceOf(InvalidIdempotencyKeyError)
      }
      expect(await fx.rows()).toBe(0)
    })

    itWhere(target, 'processes')('a consumer killed in its handler leaves nothing, and the redelivery runs the message once', async () => {
      const worker = startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'consume', key: 'crash', stopAt: 'handler' })
      await worker.printed('handling')
      worker.kill('SIGKILL')
      await worker.done
      expect(await fx.effects()).toBe(0)
      const redelivered = await fx.idempotency.consume({ source: 'queue', id: 'crash', body: { order: 'crash' } }, async (trx) => {
        await fx.effect(trx, 'crash')
        return 'redelivered'
      })
      expect(redelivered).toEqual({ value: 'redelivered', duplicate: false })
      expect(await fx.effects('crash')).toBe(1)
    })

    itWhere(target, 'processes')('a consumer killed after the commit, before it acknowledged, gets the redelivery as a duplicate', async () => {
      const worker = startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'consume', key: 'acked' })
      await worker.printed('consumed:false')
      worker.kill('SIGKILL')
      await worker.done
      const redelivered = await fx.idempotency.consume({ source: 'queue', id: 'acked', body: { order: 'acked' } }, async (trx) => {
        await fx.effect(trx, 'acked')
        return 'ran again'
      })
      expect(redelivered.duplicate).toBe(true)
      expect(redelivered.value).toMatchObject({ pid: expect.any(Number) })
      expect(await fx.effects('acked')).toBe(1)
    })
  })
}
