import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { gate, openFixture, selectedTargets, sessions, startWorker, type Fixture } from './support/harness.js'

for (const target of selectedTargets()) {
  describe(`crashes: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target, { conflictWait: 10_000 })
    })
    afterEach(async () => {
      await fx.close()
    })

    it('stores nothing when the process dies (SIGKILL) in the middle of the function', async () => {
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
    // SQLite has no server to drop the connection; the SIGKILL test above is its crash.
    if (session) it('stores nothing when the database kills the connection in the middle of the function', async () => {
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
