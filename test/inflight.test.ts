import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { IdempotencyConflictError, IdempotencyKeyReuseError, createIdempotency, type Flow, type Idempotency } from '../index.js'
import { openDatabase } from './support/databases.js'
import { gate, itIf, itWhere, openFixture, targetsFor, type Fixture } from './support/harness.js'
import { sleep } from './support/util.js'

/** When a promise settled, relative to `since`, and how. */
async function timed<T>(since: number, call: Promise<T>): Promise<{ at: number; value?: T; error?: unknown }> {
  try {
    const value = await call
    return { at: Date.now() - since, value }
  } catch (error) {
    return { at: Date.now() - since, error }
  }
}

// Both sequences of transaction(): in-flight duplicates must be answered alike (SPEC §4).
for (const [target, claimFirst] of targetsFor('in-flight duplicates').flatMap((t) => [[t, false] as const, [t, true] as const])) {
  const serverPool = target.lacks.pool === undefined

  describe(`in-flight duplicates: ${target.id}${claimFirst ? ', claimFirst' : ''}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target, { claimFirst })
    })
    afterEach(async () => {
      await fx.close()
    })

    /** An instance on a pool of `size` connections, as a small app server has. */
    const onPool = (size: number, options: { conflictWait?: number } = {}) => {
      const db = openDatabase(target.driver, fx.location, size)
      const idempotency = createIdempotency({
        db,
        tableName: fx.table,
        claimFirst,
        ...(target.dialect ? { dialect: target.dialect() } : {}),
        ...options,
      })
      return { db, idempotency }
    }

    const slowCharge = (idempotency: Idempotency<any>, key: string, runs: { n: number }, ms = 1500, request: unknown = 'charge') =>
      idempotency.executeTransaction({ key, request }, async (trx) => {
        runs.n++
        await fx.effect(trx, key)
        await sleep(ms)
        return { charge: key, at: new Date(5) }
      })

    it('waits for the running attempt in memory: one execution, 50 replays, and the pool stays free for other requests', async () => {
      const { db, idempotency } = onPool(2)
      try {
        const runs = { n: 0 }
        const start = Date.now()
        const first = timed(start, slowCharge(idempotency, 'slow', runs))
        await sleep(100)
        const duplicates = Array.from({ length: 50 }, () => timed(start, slowCharge(idempotency, 'slow', runs)))
        await sleep(200)
        // Another key, another request: it needs the pool's second connection.
        const other = timed(
          start,
          idempotency.transaction({ key: 'other', request: 1 }, async (trx) => fx.effect(trx, 'other').then(() => 'done')),
        )
        const [firstDone, otherDone, ...duplicatesDone] = await Promise.all([first, other, ...duplicates])
        expect(firstDone.value).toEqual({ value: { charge: 'slow', at: new Date(5) }, replayed: false })
        for (const d of duplicatesDone) {
          expect(d.error).toBeUndefined()
          expect(d.value).toEqual({ value: { charge: 'slow', at: new Date(5) }, replayed: true })
          expect(d.at).toBeLessThan(100 + 5000 + 2000)
        }
        expect(runs.n).toBe(1)
        expect(await fx.effects('slow')).toBe(1)
        expect(otherDone.value).toBe('done')
        // With one connection (SQLite's, PGlite's), the other request waits for the slow
        // transaction whatever the duplicates do (README).
        if (serverPool) expect(otherDone.at).toBeLessThan(firstDone.at)
      } finally {
        await db.destroy()
      }
    })

    it('with conflictWait 0, answers every duplicate 409 at once, from memory', async () => {
      const { db, idempotency } = onPool(2, { conflictWait: 0 })
      try {
        const runs = { n: 0 }
        const start = Date.now()
        const first = timed(start, slowCharge(idempotency, 'now', runs))
        await sleep(100)
        const duplicates = await Promise.all(Array.from({ length: 50 }, () => timed(start, slowCharge(idempotency, 'now', runs))))
        const firstDone = await first
        for (const d of duplicates) {
          expect(d.error).toBeInstanceOf(IdempotencyConflictError)
          expect(d.error).toMatchObject({ reason: 'in_flight', retryAfter: 1, status: 409 })
          expect(d.at).toBeLessThan(firstDone.at)
        }
        expect(runs.n).toBe(1)
        expect(await slowCharge(idempotency, 'now', runs)).toMatchObject({ replayed: true })
      } finally {
        await db.destroy()
      }
    })

    // Across SQLite processes a writer waits for the write lock (any writer's) for the busy timeout.
    itWhere(target, 'pool')(
      'with conflictWait 0, answers a duplicate from another process (another instance) 409 without waiting for the first',
      async () => {
        const here = onPool(2)
        const there = onPool(2, { conflictWait: 0 })
        try {
          const runs = { n: 0 }
          const start = Date.now()
          const first = timed(start, slowCharge(here.idempotency, 'elsewhere', runs, 3000))
          await sleep(300)
          const duplicate = await timed(start, slowCharge(there.idempotency, 'elsewhere', runs))
          expect(duplicate.error).toBeInstanceOf(IdempotencyConflictError)
          expect(duplicate.error).toMatchObject({ reason: 'in_flight' })
          // MySQL proper cannot wait less than 1 s; MariaDB and Postgres do not wait at all.
          expect(duplicate.at).toBeLessThan(300 + 1500)
          expect((await first).value).toMatchObject({ replayed: false })
          expect(runs.n).toBe(1)
        } finally {
          await Promise.all([here.db.destroy(), there.db.destroy()])
        }
      },
    )

    it('lets one waiting duplicate run when the first rolls back, and replays its answer to the others', async () => {
      const runs = { n: 0 }
      const hold = gate()
      const first = fx.idempotency.transaction({ key: 'retry', request: 1 }, async (trx) => {
        runs.n++
        await fx.effect(trx, 'retry')
        await hold.promise
        throw new Error('the first attempt fails')
      })
      await sleep(50)
      const duplicates = Array.from({ length: 10 }, (_, i) =>
        fx.idempotency.executeTransaction({ key: 'retry', request: 1 }, async (trx) => {
          runs.n++
          await fx.effect(trx, 'retry')
          return `ran in duplicate ${i}`
        }),
      )
      hold.open()
      await expect(first).rejects.toThrow('the first attempt fails')
      const answers = await Promise.all(duplicates)
      expect(runs.n).toBe(2)
      expect(answers.filter((a) => !a.replayed)).toHaveLength(1)
      expect(new Set(answers.map((a) => a.value)).size).toBe(1)
      expect(await fx.effects('retry')).toBe(1)
    })

    it('answers a waiting duplicate with another request 422 once the first has finished', async () => {
      const hold = gate()
      const first = fx.idempotency.transaction({ key: 'k', request: { amount: 1 } }, async () => {
        await hold.promise
        return 'first'
      })
      await sleep(50)
      const other = fx.idempotency.transaction({ key: 'k', request: { amount: 2 } }, async () => 'second')
      await sleep(50)
      hold.open()
      expect(await first).toBe('first')
      await expect(other).rejects.toBeInstanceOf(IdempotencyKeyReuseError)
    })

    it('answers 409 when the wait runs out, and the first attempt still finishes once', async () => {
      const runs = { n: 0 }
      const first = slowCharge(fx.idempotency, 'late', runs, 1200)
      await sleep(50)
      const start = Date.now()
      const waited = await timed(
        start,
        fx.idempotency.executeTransaction({ key: 'late', request: 'charge' }, async () => 'never', { conflictWait: 300 }),
      )
      expect(waited.error).toMatchObject({ reason: 'in_flight' })
      expect(waited.at).toBeGreaterThanOrEqual(280)
      expect(waited.at).toBeLessThan(1200)
      expect(await first).toMatchObject({ replayed: false })
      expect(runs.n).toBe(1)
    })

    it('refuses a call nested in its own function at once, naming it', async () => {
      const start = Date.now()
      const nested = fx.idempotency.transaction({ key: 'outer', request: 1 }, () =>
        fx.idempotency.transaction({ key: 'outer', request: 1 }, async () => 'inner'),
      )
      await expect(nested).rejects.toMatchObject({ reason: 'nested' })
      // Another instance on the same table is the same key: it must not wait for its caller either.
      const other = fx.with({ claimFirst })
      const across = fx.idempotency.transaction({ key: 'across', request: 1 }, () =>
        other.transaction({ key: 'across', request: 1 }, async () => 'inner'),
      )
      await expect(across).rejects.toMatchObject({ reason: 'nested' })
      expect(Date.now() - start).toBeLessThan(2000)
      const inFlow = fx.idempotency.run({ key: 'flow', request: 1 }, (flow) =>
        flow.phase('one', async (trx) => fx.idempotency.withIdempotency(trx, { key: 'flow', request: 1 }, async () => 1)),
      )
      await expect(inFlow).rejects.toMatchObject({ reason: 'nested' })
    })

    it('with conflictWait 0, replays a finished key to concurrent retries, and answers another request 422, never 409', async () => {
      const idempotency = fx.with({ claimFirst, conflictWait: 0 })
      const runs = { n: 0 }
      const charge = (request: unknown) =>
        idempotency.executeTransaction({ key: 'done', request }, async () => {
          runs.n++
          return { charged: new Date(7) }
        })
      expect(await charge('a')).toEqual({ value: { charged: new Date(7) }, replayed: false })
      const retries = await Promise.allSettled(Array.from({ length: 20 }, () => charge('a')))
      for (const r of retries) expect(r).toEqual({ status: 'fulfilled', value: { value: { charged: new Date(7) }, replayed: true } })
      const others = await Promise.allSettled(Array.from({ length: 10 }, () => charge('b')))
      for (const r of others) expect(r).toMatchObject({ status: 'rejected', reason: expect.any(IdempotencyKeyReuseError) })
      const flows = await Promise.allSettled(
        Array.from({ length: 10 }, () => idempotency.executeRun({ key: 'flow-done', request: 1 }, async (f) => f.phase('only', async () => 'ran'))),
      )
      expect(
        flows.filter((r) => r.status === 'fulfilled' && !r.value.replayed),
        JSON.stringify(flows.map((r) => (r.status === 'fulfilled' ? r.value : String(r.reason)))),
      ).toHaveLength(1)
      for (const r of flows) {
        if (r.status === 'rejected') expect(r.reason).toMatchObject({ reason: 'in_flight' })
      }
      expect(await idempotency.run({ key: 'flow-done', request: 1 }, async () => 'again')).toBe('ran')
      expect(runs.n).toBe(1)
    })

    it('stops waiting for a flow of its own instance whose lease ran out, and takes it over as another process would', async () => {
      const hung = gate()
      const runs: string[] = []
      const settings = { lockTimeout: 300, conflictWait: 3000 }
      const first = fx.idempotency.run(
        { key: 'hung', request: 1 },
        async (f) => {
          await f.phase('write', async (trx) => {
            runs.push('write')
            await fx.effect(trx, 'hung')
          })
          await f.step('call', async () => {
            runs.push('call by first')
            await hung.promise
          })
          return 'first'
        },
        settings,
      )
      await sleep(100)
      const start = Date.now()
      const second = await fx.idempotency.executeRun(
        { key: 'hung', request: 1 },
        async (f) => {
          await f.phase('write', async () => {
            runs.push('write again')
          })
          await f.step('call', async () => {
            runs.push('call by second')
          })
          return 'second'
        },
        settings,
      )
      expect(second).toEqual({ value: 'second', replayed: false })
      expect(Date.now() - start).toBeLessThan(2500)
      hung.open()
      await expect(first).rejects.toMatchObject({ code: 'lock_lost' })
      expect(runs).toEqual(['write', 'call by first', 'call by second'])
      expect(await fx.effects('hung')).toBe(1)
      expect(await fx.idempotency.run({ key: 'hung', request: 1 }, async () => 'third')).toBe('second')
    })

    // SQLite has no row locks to hold.
    itWhere(target, 'pool')('gives the phases of a duplicate that waited its whole conflictWait in memory the full wait on their rows', async () => {
      const conflictWait = 3000
      const first = fx.idempotency.run(
        { key: 'budget', request: 1 },
        async () => {
          await sleep(conflictWait - 400)
          throw new Error('the first attempt stops')
        },
        { conflictWait },
      )
      await sleep(50)
      const second = fx.idempotency.run(
        { key: 'budget', request: 1 },
        async (f) => {
          // Another transaction holds the key's row for longer than what was left of conflictWait.
          const locked = gate()
          const holder = fx.db.transaction().execute(async (trx) => {
            await trx.selectFrom(fx.table).select('id').where('key', '=', 'budget').forUpdate().execute()
            locked.open()
            await sleep(1500)
          })
          await locked.promise
          const written = await f.phase('write', async (trx) => fx.effect(trx, 'budget').then(() => 'written'))
          await holder
          return written
        },
        { conflictWait },
      )
      await expect(first).rejects.toThrow('the first attempt stops')
      expect(await second).toBe('written')
      expect(await fx.effects('budget')).toBe(1)
    })

    it('refuses a call nested in the function of withIdempotency at once, in any transaction', async () => {
      const start = Date.now()
      const inTransaction = fx.db
        .transaction()
        .execute((trx) =>
          fx.idempotency.withIdempotency(trx, { key: 'own-nest', request: 1 }, () =>
            fx.idempotency.transaction({ key: 'own-nest', request: 1 }, async () => 'inner'),
          ),
        )
      await expect(inTransaction).rejects.toMatchObject({ reason: 'nested' })
      const inRun = fx.db
        .transaction()
        .execute((trx) =>
          fx.idempotency.withIdempotency(trx, { key: 'own-run', request: 1 }, () =>
            fx.idempotency.run({ key: 'own-run', request: 1 }, async () => 'inner'),
          ),
        )
      await expect(inRun).rejects.toMatchObject({ reason: 'nested' })
      expect(Date.now() - start).toBeLessThan(2000)
      expect(await fx.rows()).toBe(0)
    })

    it('with conflictWait 0, replays a finished flow to 20 concurrent retries', async () => {
      const idempotency = fx.with({ claimFirst, conflictWait: 0 })
      await idempotency.run({ key: 'finished-flow', request: 1 }, async (f) => f.phase('only', async () => 'ran'))
      const retries = await Promise.allSettled(
        Array.from({ length: 20 }, () => idempotency.executeRun({ key: 'finished-flow', request: 1 }, async () => 'again')),
      )
      for (const r of retries) expect(r).toEqual({ status: 'fulfilled', value: { value: 'ran', replayed: true } })
    })

    it('lets one of many waiters take over a flow whose lease ran out; the others get its answer', async () => {
      const hung = gate()
      const calls: string[] = []
      const settings = { lockTimeout: 300, conflictWait: 3000 }
      const body = (name: string) => async (f: Flow<any, string>) => {
        await f.step('call', async () => {
          calls.push(name)
          if (name === 'first') await hung.promise
        })
        return name
      }
      const first = fx.idempotency.executeRun({ key: 'herd', request: 1 }, body('first'), settings)
      await sleep(50)
      const waiters = await Promise.all(
        Array.from({ length: 8 }, (_, i) => fx.idempotency.executeRun({ key: 'herd', request: 1 }, body(`waiter ${i}`), settings)),
      ).finally(() => hung.open())
      await expect(first).rejects.toMatchObject({ code: 'lock_lost' })
      const ran = waiters.filter((w) => !w.replayed)
      expect(ran).toHaveLength(1)
      for (const w of waiters) expect(w.value).toBe(ran[0]!.value)
      expect(calls).toEqual(['first', ran[0]!.value])
    })

    it('lets waiters that came before the flow took its lease take it over once that lease ran out, not when their wait does', async () => {
      const hung = gate()
      const calls: string[] = []
      // A wait far longer than the lease: a waiter that slept through the lease until its own wait
      // ran out would take over with no time left, and the others would get 409 in_flight.
      const settings = { lockTimeout: 1000, conflictWait: 10_000 }
      const body = (name: string) => async (f: Flow<any, string>) => {
        await f.step('call', async () => {
          calls.push(name)
          // The winner's call takes a moment, as a real one does: on an in-process database it would
          // otherwise finish before the timers of the other waiters fire, and they would replay it.
          await (name === 'first' ? hung.promise : sleep(100))
        })
        return name
      }
      // All in the same turn: the waiters find the first attempt before it has even read the key,
      // so it holds no lease yet when they start waiting.
      const first = fx.idempotency.executeRun({ key: 'unleased', request: 1 }, body('first'), settings)
      const waiters = await Promise.all(
        Array.from({ length: 4 }, (_, i) => fx.idempotency.executeRun({ key: 'unleased', request: 1 }, body(`waiter ${i}`), settings)),
      ).finally(() => hung.open())
      await expect(first).rejects.toMatchObject({ code: 'lock_lost' })
      const ran = waiters.filter((w) => !w.replayed)
      expect(ran).toHaveLength(1)
      for (const w of waiters) expect(w.value).toBe(ran[0]!.value)
      expect(calls).toEqual(['first', ran[0]!.value])
    })

    // SQLite has no row lock for a phase to hold while it renews the lease.
    itWhere(target, 'pool')('keeps waiting in memory for a flow that renewed its lease while a waiter tried to take it over', async () => {
      const settings = { lockTimeout: 600, conflictWait: 5000 }
      const first = fx.idempotency.executeRun(
        { key: 'renewed', request: 1 },
        async (f: Flow<any, string>) => {
          await f.phase('a', async () => 1)
          await sleep(200)
          // Longer than what is left of the lease: the phase's fence renews it before it commits.
          await f.phase('b', async () => (await sleep(500), 2))
          await f.step('c', async () => (await sleep(400), 3))
          return 'first'
        },
        settings,
      )
      await sleep(50)
      const early = fx.idempotency.executeRun({ key: 'renewed', request: 1 }, async () => 'early', settings)
      await sleep(600)
      const late = fx.idempotency.executeRun({ key: 'renewed', request: 1 }, async () => 'late', settings)
      await sleep(200)
      const later = fx.idempotency.executeRun({ key: 'renewed', request: 1 }, async () => 'later', settings)
      expect(await first).toEqual({ value: 'first', replayed: false })
      for (const d of await Promise.all([early, late, later])) expect(d).toEqual({ value: 'first', replayed: true })
    })

    it('does not count a call that work left behind by a function makes later as nested', async () => {
      const later = gate()
      let deferred: Promise<string> | undefined
      await fx.db.transaction().execute((trx) =>
        fx.idempotency.withIdempotency(trx, { key: 'defer', request: 1 }, async () => {
          setTimeout(() => {
            deferred = fx.idempotency.transaction({ key: 'defer', request: 1 }, async () => 'again')
            later.open()
          }, 200)
          return 'outer'
        }),
      )
      await later.promise
      expect(await deferred).toBe('outer')
    })

    // Two SQLite files are two databases with the same table name; two server tables could not be.
    itIf(target.driver === 'better-sqlite3', 'two databases with one table name need two SQLite files')(
      'does not count a call with the same key and table on another database as nested',
      async () => {
        const elsewhere = await openFixture(target, { claimFirst })
        try {
          const other = createIdempotency({ db: elsewhere.db, tableName: fx.table })
          await other.migrate()
          const inner = await fx.idempotency.transaction({ key: 'x', request: 1 }, async () =>
            other.transaction({ key: 'x', request: 1 }, async () => 'inner'),
          )
          expect(inner).toBe('inner')
        } finally {
          await elsewhere.db.schema.dropTable(fx.table).execute()
          await elsewhere.close()
        }
      },
    )

    it('coalesces duplicates of an atomic-phases flow: they wait, then get its answer', async () => {
      const hold = gate()
      const runs = { n: 0 }
      const flow = (name: string) => async (f: Flow<any, string>) => {
        runs.n++
        await f.phase('write', (trx) => fx.effect(trx, 'ride'))
        await hold.promise
        return name
      }
      const first = fx.idempotency.executeRun({ key: 'ride', request: 1 }, flow('first'))
      await sleep(50)
      const duplicates = Array.from({ length: 5 }, (_, i) => fx.idempotency.executeRun({ key: 'ride', request: 1 }, flow(`dup ${i}`)))
      await sleep(50)
      hold.open()
      expect(await first).toEqual({ value: 'first', replayed: false })
      for (const d of await Promise.all(duplicates)) expect(d).toEqual({ value: 'first', replayed: true })
      expect(runs.n).toBe(1)
      expect(await fx.effects('ride')).toBe(1)
    })

    // With one connection the caller's own transaction cannot even begin while the first one is open.
    itWhere(target, 'pool')(
      'withIdempotency in your own transaction: a duplicate waits in the database, or with conflictWait 0 gets 409 at once',
      async () => {
        const hold = gate()
        const first = fx.idempotency.transaction({ key: 'own', request: 1 }, async () => {
          await hold.promise
          return 'first'
        })
        await sleep(50)
        const start = Date.now()
        const refused = fx.db
          .transaction()
          .execute((trx) => fx.idempotency.withIdempotency(trx, { key: 'own', request: 1 }, async () => 'second', { conflictWait: 0 }))
        await expect(refused).rejects.toMatchObject({ reason: 'in_flight' })
        // MySQL proper waits at least 1 s for a row lock; MariaDB and Postgres do not wait.
        expect(Date.now() - start).toBeLessThan(1500)
        hold.open()
        expect(await first).toBe('first')
        const replay = await fx.db
          .transaction()
          .execute((trx) => fx.idempotency.withIdempotency(trx, { key: 'own', request: 1 }, async () => 'third'))
        expect(replay).toBe('first')
      },
    )
  })
}
