import type { IsolationLevel } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { expectOneOutcome, itWhere, openFixture, startWorker, targetsFor, type Fixture } from './support/harness.js'
import { answer, sleep, type Answer } from './support/util.js'

for (const target of targetsFor('concurrency')) {
  describe(`concurrency: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target, { conflictWait: 10_000 })
    })
    afterEach(async () => {
      await fx.close()
    })

    // With one connection, transactions never overlap: isolation cannot show anything there.
    const levels: Array<IsolationLevel | undefined> = target.lacks.pool ? [undefined] : ['read committed', 'repeatable read']
    for (const level of levels) {
      const label = level ?? 'default isolation'

      it(`runs 100 concurrent duplicates once through transaction() (${label})`, async () => {
        let calls = 0
        const answers = await Promise.all(
          Array.from({ length: 100 }, () =>
            answer(
              fx.idempotency.executeTransaction(
                'storm',
                async (trx) => {
                  calls++
                  await fx.effect(trx, 'storm')
                  await sleep(30)
                  return { winner: true }
                },
                level ? { isolationLevel: level } : {},
              ),
            ),
          ),
        )
        expectOneOutcome(answers, { winner: true })
        expect(await fx.effects('storm')).toBe(1)
        expect(calls).toBeGreaterThanOrEqual(1)
      })

      it(`runs 100 concurrent duplicates once inside caller transactions that read first (${label})`, async () => {
        // The winner commits only once several duplicates have read, so that some snapshots
        // predate its commit however the machine schedules them (a busy machine ran it first).
        let read = 0
        const readers = target.lacks.pool ? 0 : 10
        const answers = await Promise.all(
          Array.from({ length: 100 }, () => {
            const builder = level ? fx.db.transaction().setIsolationLevel(level) : fx.db.transaction()
            return answer(
              builder.execute(async (trx) => {
                await fx.snapshot(trx)
                read++
                return fx.idempotency.execute(trx, 'storm', async (trx) => {
                  await fx.effect(trx, 'storm')
                  for (const stop = Date.now() + 2000; read < readers && Date.now() < stop; ) await sleep(10)
                  await sleep(30)
                  return 'value'
                })
              }),
            )
          }),
        )
        // Only a Postgres snapshot that predates the winner's commit refuses to go on (40001);
        // the caller must retry its transaction. MySQL's locking read and SQLite's single writer
        // always see the committed key.
        const raced = target.database === 'postgres' && level === 'repeatable read'
        expectOneOutcome(answers, 'value', raced ? ['race'] : [])
        if (raced) expect(answers.some((a) => 'error' in a)).toBe(true)
        expect(await fx.effects('storm')).toBe(1)
      })
    }

    it('hands the key to one waiting duplicate when the first attempt rolls back', async () => {
      let first = true
      const answers = await Promise.all(
        Array.from({ length: 30 }, () =>
          answer(
            fx.idempotency.executeTransaction('rollback', async (trx) => {
              await fx.effect(trx, 'rollback')
              if (first) {
                first = false
                await sleep(100)
                throw new Error('first attempt fails')
              }
              await sleep(20)
              return 'second'
            }),
          ),
        ),
      )
      // InnoDB makes the waiters deadlock on the freed key; transaction() retries those.
      expect(answers.filter((a) => 'error' in a)).toEqual([{ error: 'Error' }])
      expectOneOutcome(
        answers.filter((a) => !('error' in a)),
        'second',
      )
      expect(await fx.effects('rollback')).toBe(1)
    })

    itWhere(target, 'processes')('runs duplicates from 4 processes at once exactly once', async () => {
      const startAt = Date.now() + 1500
      const workers = Array.from({ length: 4 }, () =>
        startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'storm', key: 'multi', count: 10, startAt }),
      )
      const results = await Promise.all(workers.map((w) => w.done))
      const answers: Answer[] = results.flatMap((r) => {
        expect(r.code, r.stderr).toBe(0)
        return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Answer[]
      })
      expect(answers).toHaveLength(40)
      const first = answers.find((a): a is { value: unknown; replayed: boolean } => 'replayed' in a && !a.replayed)
      expect(first).toBeDefined()
      expectOneOutcome(answers, first!.value)
      expect(await fx.effects('multi')).toBe(1)
    })

    it('gives a duplicate that raced a commit the stored answer when retried', async () => {
      const keys = Array.from({ length: 20 }, (_, i) => `key-${i}`)
      const answers = await Promise.all(
        keys.flatMap((key) =>
          Array.from({ length: 5 }, () =>
            answer(
              fx.idempotency.executeTransaction(key, async (trx) => {
                await fx.effect(trx, key)
                return key
              }),
            ),
          ),
        ),
      )
      expect(answers.filter((a) => 'error' in a)).toEqual([])
      expect(await fx.effects()).toBe(keys.length)
    })
  })
}
