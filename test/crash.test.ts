import { afterEach, beforeEach, describe, expect } from 'vitest'
import { gate, itWhere, openFixture, sessions, startWorker, targetsFor, type Fixture } from './support/harness.js'

for (const target of targetsFor('crashes')) {
  describe(`crashes: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target, { conflictWait: 10_000 })
    })
    afterEach(async () => {
      await fx.close()
    })

    itWhere(target, 'processes')('stores nothing when the process dies (SIGKILL) in the middle of the function', async () => {
      const worker = startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'hold', key: 'crash' })
      await worker.printed('claimed')
      worker.kill('SIGKILL')
      expect((await worker.done).signal).toBe('SIGKILL')
      const retry = await fx.idempotency.executeTransaction('crash', async (trx) => {
        await fx.effect(trx, 'crash')
        return 'retried'
      })
      expect(retry).toEqual({ value: 'retried', replayed: false })
      expect(await fx.effects('crash')).toBe(1)
      expect(await fx.rows()).toBe(1)
    })

    const session = target.database === 'sqlite' ? undefined : sessions[target.database]
    itWhere(target, 'sessions')('stores nothing when the database kills the connection in the middle of the function', async () => {
      const killed = gate()
      const first = fx.idempotency.transaction('killed', async (trx) => {
        await fx.effect(trx, 'killed')
        await session!.kill(fx.db, await session!.id(trx))
        await killed.promise
        await fx.effect(trx, 'killed')
        return 'never'
      })
      killed.open()
      await expect(first).rejects.toThrow()
      expect(await fx.rows()).toBe(0)
      expect(await fx.effects('killed')).toBe(0)
      expect(await fx.idempotency.transaction('killed', async (trx) => (await fx.effect(trx, 'killed'), 'retried'))).toBe('retried')
      expect(await fx.effects('killed')).toBe(1)
    })
  })
}
