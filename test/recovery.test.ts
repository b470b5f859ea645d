import { sql } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { IdempotentRoute, type HttpFlowRequest, type HttpResult, type RequestFacts } from '../http/index.js'
import { IdempotencyConflictError, IdempotencyLockLostError, type Flow, type Idempotency, type IdempotencyEvent } from '../index.js'
import { gate, itWhere, openFixture, startWorker, targetsFor, type Fixture } from './support/harness.js'
import { rideEffects, type Ride, type RidePoint } from './support/ride.js'
import { sleep } from './support/util.js'

const lockTimeout = 400

for (const target of targetsFor('recovery worker')) {
  describe(`recovery worker: ${target.id}`, () => {
    let fx: Fixture
    let events: IdempotencyEvent[]
    let idempotency: Idempotency<any>
    beforeEach(async () => {
      fx = await openFixture(target)
      events = []
      idempotency = fx.with({ lockTimeout, onEvent: (event) => void events.push(event) })
    })
    afterEach(async () => {
      await fx.close()
    })

    /** The ride flow, defined by name in `on`; `fail` makes its charge step throw that many times. */
    const defineRide = (on: Idempotency<any>, plan: { fail: number } = { fail: 0 }) =>
      on.defineFlow('ride', async (flow: Flow<any, Ride>, request: { key: string }) => {
        const names = rideEffects(request.key)
        const ride = await flow.phase('ride_created', async (trx) => {
          await trx.insertInto(fx.effectsTable).values({ k: names.ride }).execute()
          return { id: `ride-${request.key}` }
        })
        const charge = await flow.step('charge_created', async () => {
          await fx.db
            .insertInto(fx.effectsTable)
            .values({ k: names.call(flow.stepKey('charge_created')) })
            .execute()
          if (plan.fail > 0 && plan.fail--) throw new Error('the provider is down')
          return { id: `ch-${flow.stepKey('charge_created')}` }
        })
        await flow.phase('ride_charged', async (trx) => (await trx.insertInto(fx.effectsTable).values({ k: names.charged }).execute(), true))
        return { status: 201, ride, charge }
      })

    it('finishes a defined flow whose attempt failed, once, and the client then gets the stored answer', async () => {
      const plan = { fail: 1 }
      const ride = defineRide(idempotency, plan)
      await expect(ride.run({ key: 'r1', request: { key: 'r1' } })).rejects.toThrow('the provider is down')
      expect(await idempotency.inspect({ key: 'r1' })).toMatchObject({
        state: 'abandoned',
        recoveryPoint: 'ride_created',
        flowName: 'ride',
        attempts: 1,
      })
      expect(await idempotency.recover()).toEqual({ finished: 1, failed: 0, skipped: 0 })
      const names = rideEffects('r1')
      expect(await fx.effects(names.ride)).toBe(1)
      expect(await fx.effects(names.charged)).toBe(1)
      const answer = await ride.executeRun({ key: 'r1', request: { key: 'r1' } })
      expect(answer.replayed).toBe(true)
      expect(await fx.effects(names.call(answer.value.charge.id.slice(3)))).toBe(2)
      expect(await idempotency.recover()).toEqual({ finished: 0, failed: 0, skipped: 0 })
      expect(events.filter((e) => e.operation === 'recover').map((e) => [e.type, e.key, e.flowName])).toEqual([
        ['taken_over', 'r1', 'ride'],
        ['recovered', 'r1', 'ride'],
      ])
      expect(await idempotency.inspect({ key: 'r1' })).toMatchObject({ state: 'finished', recoveryPoint: 'finished', attempts: 2 })
    })

    it('skips flows of names it does not define, and flows run without a name, and never touches them', async () => {
      const other = fx.with({ lockTimeout })
      const elsewhere = other.defineFlow('elsewhere', async (flow: Flow<any, string>) => {
        await flow.phase('one', async () => 1)
        throw new Error('stops')
      })
      await expect(elsewhere.run({ key: 'e1', request: 1 })).rejects.toThrow('stops')
      await expect(
        idempotency.run({ key: 'plain', request: 1 }, async (flow) => (await flow.phase('one', async () => 1), flow.fail('x' as never))),
      ).resolves.toBe('x')
      await expect(
        idempotency.run({ key: 'plain2', request: 1 }, async (flow) => (await flow.phase('one', async () => 1), Promise.reject(new Error('stops')))),
      ).rejects.toThrow()
      defineRide(idempotency)
      const before = await idempotency.inspect({ key: 'e1' })
      expect(await idempotency.recover()).toEqual({ finished: 0, failed: 0, skipped: 1 })
      expect(await idempotency.inspect({ key: 'e1' })).toEqual(before)
      expect((await idempotency.abandoned()).map((f) => [f.key, f.flowName, f.recoverable]).sort()).toEqual([
        ['e1', 'elsewhere', true],
        ['plain2', null, false],
      ])
    })

    it('backs off a flow that keeps failing and leaves it alone after maxFailures, reporting each failure', async () => {
      const ride = defineRide(idempotency, { fail: 100 })
      await expect(ride.run({ key: 'bad', request: { key: 'bad' } })).rejects.toThrow()
      expect(await idempotency.recover({ maxFailures: 2 })).toEqual({ finished: 0, failed: 1, skipped: 0 })
      // Backing off: not picked again at once.
      expect(await idempotency.recover({ maxFailures: 2 })).toEqual({ finished: 0, failed: 0, skipped: 0 })
      expect(await idempotency.abandoned()).toMatchObject([{ key: 'bad', recoveryFailures: 1, recoverable: false }])
      await sleep(1100)
      expect(await idempotency.recover({ maxFailures: 2 })).toEqual({ finished: 0, failed: 1, skipped: 0 })
      await sleep(2100)
      expect(await idempotency.recover({ maxFailures: 2 })).toEqual({ finished: 0, failed: 0, skipped: 0 })
      expect(await idempotency.abandoned()).toMatchObject([{ key: 'bad', recoveryFailures: 2, recoverable: false }])
      const failures = events.filter((e) => e.type === 'recovery_failed')
      expect(failures).toHaveLength(2)
      for (const f of failures)
        expect(f).toMatchObject({
          operation: 'recover',
          key: 'bad',
          flowName: 'ride',
          error: expect.objectContaining({ message: 'the provider is down' }),
        })
      // The client's own retry still resumes it.
      await expect(ride.run({ key: 'bad', request: { key: 'bad' } })).rejects.toThrow('the provider is down')
      expect(await idempotency.inspect({ key: 'bad' })).toMatchObject({ attempts: 4, recoveryFailures: 2 })
    })

    it('never runs a flow twice when two workers and a retrying client race on the same abandoned flows', async () => {
      const keys = Array.from({ length: 8 }, (_, i) => `race-${i}`)
      const client = defineRide(idempotency, { fail: keys.length })
      for (const key of keys) await expect(client.run({ key, request: { key } })).rejects.toThrow()
      const workers = [fx.with({ lockTimeout }), fx.with({ lockTimeout })]
      for (const worker of workers) defineRide(worker)
      // The test owns its retry loops: whatever fails, they stop before the table is dropped.
      let stopped = false
      const retries = keys.map(async (key) => {
        while (!stopped) {
          try {
            return await client.executeRun({ key, request: { key } })
          } catch (error) {
            // A 409 either way: another attempt holds the key, or took it over from this one.
            if (!(error instanceof IdempotencyConflictError || error instanceof IdempotencyLockLostError)) throw error
            await sleep(50)
          }
        }
        throw new Error(`the retries of ${key} were stopped`)
      })
      let reports: Awaited<ReturnType<Idempotency<any>['recover']>>[]
      try {
        reports = await Promise.all(workers.map((w) => w.recover()))
      } finally {
        // Retries end by themselves once every flow is finished; a failed pass must not leave them running.
        const backstop = setTimeout(() => (stopped = true), 10_000)
        await Promise.allSettled(retries)
        clearTimeout(backstop)
      }
      const answers = await Promise.all(retries)
      const byWorkers = reports.reduce((n, r) => n + r.finished, 0)
      expect(byWorkers + answers.filter((a) => !a.replayed).length).toBe(keys.length)
      for (const key of keys) {
        const names = rideEffects(key)
        expect(await fx.effects(names.ride)).toBe(1)
        expect(await fx.effects(names.charged)).toBe(1)
      }
    })

    it('runs in the background until stopped, and reports a pass that fails without throwing', async () => {
      const ride = defineRide(idempotency, { fail: 1 })
      await expect(ride.run({ key: 'bg', request: { key: 'bg' } })).rejects.toThrow()
      const worker = idempotency.startRecovery({ every: 50 })
      for (let waited = 0; (await idempotency.inspect({ key: 'bg' }))?.state !== 'finished' && waited < 5000; waited += 50) await sleep(50)
      expect(await idempotency.inspect({ key: 'bg' })).toMatchObject({ state: 'finished' })
      await worker.stop()
      // A pass that cannot read the table is reported to the hook and the worker goes on.
      const broken = fx.with({ tableName: 'no_such_table', onEvent: (event) => void events.push(event) })
      broken.defineFlow('ride', async () => 'never')
      const failing = broken.startRecovery({ every: 20 })
      await sleep(200)
      await failing.stop()
      const passes = events.filter((e) => e.type === 'recovery_failed').filter((e) => e.key === undefined)
      expect(passes.length).toBeGreaterThan(1)
      expect(String((passes[0]!.error as Error).message)).toMatch(/does not exist/)
      expect(() => idempotency.startRecovery({ every: 1 })).toThrow(RangeError)
    })

    it('stops within a timeout while a flow hangs, taking no further flow; the hung attempt can change nothing once its lease ended', async () => {
      const hang = gate()
      let calls = 0
      const flaky = idempotency.defineFlow('hangs', async (flow: Flow<any, string>) => {
        await flow.phase('a', async () => 1)
        if (flow.attempt === 1) throw new Error('the first attempt fails')
        // The worker's attempt hangs in its step; the client's later one does not.
        await flow.step('call', async () => (++calls === 1 ? await hang.promise.then(() => 1) : 2))
        return 'done'
      })
      await expect(flaky.run({ key: 'hung', request: 1 })).rejects.toThrow('the first attempt fails')
      await sleep(20)
      // Due after the hung one, in the same pass: a stopped worker must not take it once the hang ends.
      await expect(flaky.run({ key: 'next', request: 1 })).rejects.toThrow('the first attempt fails')
      const worker = idempotency.startRecovery({ every: 20 })
      for (let waited = 0; calls === 0 && waited < 5000; waited += 20) await sleep(20)
      const started = Date.now()
      expect(await worker.stop({ timeout: 200 })).toBe(false)
      expect(Date.now() - started).toBeLessThan(1000)
      await expect(worker.stop({ timeout: -1 })).rejects.toThrow(RangeError)
      // Once its lease ran out, the client's retry takes the flow over and finishes it.
      await sleep(lockTimeout + 100)
      expect(await flaky.run({ key: 'hung', request: 1 })).toBe('done')
      hang.open()
      await sleep(100)
      expect(await idempotency.inspect({ key: 'hung' })).toMatchObject({ state: 'finished' })
      expect(await flaky.executeRun({ key: 'hung', request: 1 })).toEqual({ value: 'done', replayed: true })
      expect(await idempotency.inspect({ key: 'next' })).toMatchObject({ state: 'abandoned', attempts: 1 })
      expect(await idempotency.startRecovery({ every: 10_000 }).stop()).toBe(true)
    })

    it('reports every outcome to the hook, and a hook that throws breaks nothing', async () => {
      const seen: IdempotencyEvent[] = []
      const observed = fx.with({
        lockTimeout,
        conflictWait: 0,
        onEvent: (event) => {
          seen.push(event)
          throw new Error('a broken hook')
        },
      })
      await observed.transaction({ key: 't', request: 1 }, async () => 1)
      await observed.transaction({ key: 't', request: 1 }, async () => 1)
      await expect(observed.transaction({ key: 't', request: 2 }, async () => 1)).rejects.toThrow()
      await expect(observed.transaction({ key: 'f', request: 1 }, async () => Promise.reject(new Error('boom')))).rejects.toThrow('boom')
      const hold = gate()
      const held = observed.transaction({ key: 'h', request: 1 }, () => hold.promise.then(() => 1))
      await sleep(50)
      await expect(observed.transaction({ key: 'h', request: 1 }, async () => 1)).rejects.toThrow(IdempotencyConflictError)
      hold.open()
      await held
      await fx.db.transaction().execute((trx) => observed.withIdempotency(trx, { key: 'w', request: 1 }, async () => 1))
      // A flow stalls past its lock, another attempt takes it over, and the first loses its lock.
      const stall = gate()
      const stalled = observed.run({ key: 'l', request: 1 }, async (flow) => {
        await flow.step('slow', () => stall.promise.then(() => 1))
        return 1
      })
      await sleep(lockTimeout + 200)
      await fx.with({ lockTimeout }).run({ key: 'l', request: 1 }, async (flow) => (await flow.step('slow', async () => 2), 2))
      stall.open()
      await expect(stalled).rejects.toMatchObject({ code: 'lock_lost' })
      const resumed = observed.defineFlow('resumed', async (flow: Flow<any, number>) => (await flow.phase('one', async () => 1), 1))
      await fx
        .with({ lockTimeout })
        .run({ key: 'r', request: 1 }, async (flow) => (await flow.phase('one', async () => 1), Promise.reject(new Error('x'))))
        .catch(() => {})
      await expect(resumed.run({ key: 'r', request: 1 })).resolves.toBe(1)
      expect(await observed.prune()).toBe(0)
      const types = seen.map((e) => `${e.operation}:${e.type}${e.type === 'conflict' ? `:${e.reason}` : ''}`)
      expect(types).toEqual([
        'transaction:executed',
        'transaction:replayed',
        'transaction:key_reuse',
        'transaction:failed',
        'transaction:conflict:in_flight',
        'transaction:executed',
        'withIdempotency:executed_in_transaction',
        'run:lock_lost',
        'run:taken_over',
        'run:executed',
        'prune:pruned',
      ])
      for (const e of seen) expect(e.durationMs).toBeGreaterThanOrEqual(0)
      expect(seen.find((e) => e.type === 'taken_over')).toMatchObject({ key: 'r', flowName: 'resumed', recoveryPoint: 'one' })
      expect(seen.find((e) => e.type === 'pruned')).toMatchObject({ count: 0 })
    })

    it('refuses a bad flow name, a name defined twice and bad options, and rejects bad input to recover, inspect and forget', async () => {
      for (const name of ['', '1flow', 'a b', 'x'.repeat(101), undefined])
        expect(() => idempotency.defineFlow(name as string, async () => 1)).toThrow(/is not a valid flow name/)
      idempotency.defineFlow('once', async () => 1)
      expect(() => idempotency.defineFlow('once', async () => 2)).toThrow(/already defined in this instance/)
      expect(() => idempotency.defineFlow('ttl', async () => 1, { ttl: 0 })).toThrow(RangeError)
      expect(() => idempotency.defineFlow('lease', async () => 1, { lockTimeout: -1 })).toThrow(RangeError)
      await expect(idempotency.recover({ limit: 0 })).rejects.toThrow(RangeError)
      await expect(idempotency.recover({ maxFailures: 1.5 })).rejects.toThrow(RangeError)
      await expect(idempotency.inspect({ key: undefined as unknown as string })).rejects.toMatchObject({ code: 'invalid_key' })
      await expect(idempotency.forget({ key: 'k', scope: 'a\0b' })).rejects.toMatchObject({ code: 'invalid_key' })
      expect(await fx.rows()).toBe(0)
    })

    it('inspects and forgets keys, and refuses to forget one an attempt holds', async () => {
      expect(await idempotency.inspect({ key: 'none' })).toBeUndefined()
      expect(await idempotency.forget({ key: 'none' })).toBe(false)
      await idempotency.transaction({ key: 'done', scope: 'acct', request: 1 }, async () => 'first')
      const seen = await idempotency.inspect({ key: 'done', scope: 'acct' })
      expect(seen).toEqual({
        state: 'finished',
        recoveryPoint: 'finished',
        flowName: null,
        attempts: 1,
        unreadable: null,
        recoveryFailures: 0,
        createdAt: expect.any(Date),
        lastRunAt: expect.any(Date),
        expiresAt: expect.any(Date),
        lockedUntil: null,
      })
      expect(Math.abs(seen!.createdAt.getTime() - Date.now())).toBeLessThan(5000)
      // ttl from the store, plus at most the claim's slack (1% of ttl, a second at most), which a quick store keeps.
      const lived = seen!.expiresAt.getTime() - seen!.lastRunAt.getTime()
      expect(lived).toBeGreaterThanOrEqual(24 * 3600 * 1000)
      expect(lived).toBeLessThanOrEqual(24 * 3600 * 1000 + 1000)
      expect(await idempotency.inspect({ key: 'done' })).toBeUndefined()
      expect(await idempotency.forget({ key: 'done', scope: 'acct' })).toBe(true)
      expect(await idempotency.transaction({ key: 'done', scope: 'acct', request: 1 }, async () => 'again')).toBe('again')
      const hold = gate()
      const running = idempotency.run({ key: 'held', request: 1 }, async (flow) => flow.step('wait', () => hold.promise.then(() => 1)))
      await sleep(100)
      const held = await idempotency.inspect({ key: 'held' })
      expect(held).toMatchObject({ state: 'running', recoveryPoint: 'started', lockedUntil: expect.any(Date) })
      expect(held!.lockedUntil!.getTime()).toBeGreaterThan(Date.now() - 1000)
      await expect(idempotency.forget({ key: 'held' })).rejects.toMatchObject({ reason: 'in_flight', status: 409 })
      hold.open()
      await running
      await expect(idempotency.inspect({ key: '' })).rejects.toMatchObject({ code: 'invalid_key' })
    })

    it('refuses to forget a key while a transaction that claimed it is open, here or elsewhere, so that its answer is never lost', async () => {
      for (const via of ['this instance', 'another instance']) {
        const key = `open-${via === 'this instance' ? 'here' : 'there'}`
        const claimed = gate()
        const release = gate()
        const runner = via === 'this instance' ? idempotency : fx.with({})
        const attempt = runner.transaction({ key, request: 1 }, async (trx) => {
          await fx.effect(trx, key)
          claimed.open()
          await release.promise
          return 'charged once'
        })
        await claimed.promise
        const started = Date.now()
        const forgot = await idempotency.forget({ key }).catch((error: unknown) => error)
        release.open()
        expect(forgot, via).toMatchObject({ reason: 'in_flight', status: 409 })
        // It refused at once, without waiting for the attempt to end.
        expect(Date.now() - started, via).toBeLessThan(2000)
        expect(await attempt).toBe('charged once')
        expect(await fx.idempotency.executeTransaction({ key, request: 1 }, async () => 'charged twice')).toEqual({
          value: 'charged once',
          replayed: true,
        })
        expect(await fx.effects(key)).toBe(1)
      }
    })

    itWhere(target, 'processes')('refuses to forget a key while a transaction of another process holds it', async () => {
      const worker = startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'hold', key: 'held-elsewhere' })
      await worker.printed('claimed')
      const started = Date.now()
      await expect(idempotency.forget({ key: 'held-elsewhere' })).rejects.toMatchObject({ reason: 'in_flight', status: 409 })
      expect(Date.now() - started).toBeLessThan(2000)
      worker.kill('SIGKILL')
      await worker.done
    })

    it("applies the route's storage rules to what the worker stores, fail() included, and only to flows that came through the route", async () => {
      const defined = idempotency.defineFlow('http-flow', async (flow: Flow<any, HttpResult>, request: HttpFlowRequest<{ fail?: boolean }>) => {
        await flow.phase('a', async () => 1)
        if (flow.attempt === 1) throw new Error('crash')
        if (request.body?.fail) return flow.fail({ status: 503, headers: { 'Set-Cookie': 'sid=secret' }, body: { e: 1 } })
        return { status: 201, headers: { 'Set-Cookie': 'sid=secret', 'X-Kept': 'yes' }, body: { ok: true } }
      })
      const route = new IdempotentRoute<unknown>({ scope: () => 'u', required: true }).flow(idempotency, defined)
      const facts = (body: unknown, key: string): RequestFacts => ({
        method: 'POST',
        url: '/x',
        body: () => body,
        headerLines: (name) => (name === 'Idempotency-Key' ? [key] : []),
      })
      expect(await route({}, facts({ fail: true }, 'h-fail'))).toMatchObject({ error: expect.objectContaining({ message: 'crash' }) })
      expect(await route({}, facts({}, 'h-ok'))).toMatchObject({ error: expect.objectContaining({ message: 'crash' }) })
      // Called without the route, the same flow stores its value as it is.
      await expect(defined.run({ key: 'plain', request: { method: 'POST', url: '/x', body: {}, headers: {} } })).rejects.toThrow('crash')
      expect(await idempotency.recover()).toEqual({ finished: 2, failed: 1, skipped: 0 })
      expect(await idempotency.inspect({ key: 'h-fail', scope: 'u' })).toMatchObject({ state: 'abandoned', recoveryFailures: 1 })
      const replayed = await route({}, facts({}, 'h-ok'))
      expect(replayed).toMatchObject({ replayed: true, answer: { status: 201, headers: { 'X-Kept': 'yes' } } })
      expect(JSON.stringify(replayed)).not.toContain('sid=secret')
      expect(await defined.executeRun({ key: 'plain', request: { method: 'POST', url: '/x', body: {}, headers: {} } })).toEqual({
        value: { status: 201, headers: { 'Set-Cookie': 'sid=secret', 'X-Kept': 'yes' }, body: { ok: true } },
        replayed: true,
      })
    })

    it("keeps a defined flow's own ttl through a route without one, and dates its answer by the run's ttl, whoever finishes it", async () => {
      const DAY = 24 * 60 * 60 * 1000
      const defined = idempotency.defineFlow(
        'dated-flow',
        async (flow: Flow<any, HttpResult>, request: HttpFlowRequest<{ crash?: boolean }>) => {
          await flow.phase('a', async () => 1)
          if (request.body?.crash && flow.attempt === 1) throw new Error('crash')
          return { status: 201, body: { ok: true } }
        },
        { ttl: 3 * DAY },
      )
      const route = new IdempotentRoute<unknown>({ scope: () => 'u', required: true, expiryHeader: true }).flow(idempotency, defined)
      // Another route with the same rules but another ttl registers its finisher on the flow after the first.
      new IdempotentRoute<unknown>({ scope: () => 'u', required: true, expiryHeader: true, ttl: 30 * DAY }).flow(idempotency, defined)
      const facts = (body: unknown, key: string): RequestFacts => ({
        method: 'POST',
        url: '/dated',
        body: () => body,
        headerLines: (name) => (name === 'Idempotency-Key' ? [key] : []),
      })
      const dated = async (key: string) => {
        const outcome = await route({}, facts(key === 'by-worker' ? { crash: true } : {}, key))
        const header = 'answer' in outcome ? String(outcome.answer.headers['Idempotency-Key-Expires']) : 'none'
        const { expiresAt } = (await idempotency.inspect({ key, scope: 'u' }))!
        return { header: Date.parse(header), expires: expiresAt.getTime() }
      }
      const direct = await dated('direct')
      expect(direct.expires - Date.now()).toBeGreaterThan(3 * DAY - 60_000)
      expect(direct.expires - Date.now()).toBeLessThan(3 * DAY + 60_000)
      expect(direct.header).toBeLessThanOrEqual(direct.expires)
      expect(direct.expires - direct.header).toBeLessThan(2000)
      expect(await route({}, facts({ crash: true }, 'by-worker'))).toMatchObject({ error: expect.objectContaining({ message: 'crash' }) })
      expect(await idempotency.recover()).toEqual({ finished: 1, failed: 0, skipped: 0 })
      const finished = await dated('by-worker')
      expect(finished.expires - Date.now()).toBeLessThan(3 * DAY + 60_000)
      expect(finished.header).toBeLessThanOrEqual(finished.expires)
      expect(finished.expires - finished.header).toBeLessThan(2000)
    })

    it('finishes a route\'s flow stored before finishers had ids ("answer": "http") under the route\'s rules', async () => {
      let runs = 0
      const defined = idempotency.defineFlow('legacy', async (flow: Flow<any, HttpResult>) => {
        await flow.phase('a', async () => 1)
        if (++runs === 1) throw new Error('crash')
        return { status: 201, headers: { 'Set-Cookie': 'sid=secret', 'X-Kept': 'yes' }, body: { ok: true } }
      })
      const route = new IdempotentRoute<unknown>({ scope: () => 'u', required: true }).flow(idempotency, defined)
      const facts: RequestFacts = { method: 'POST', url: '/x', body: () => ({}), headerLines: (name) => (name === 'Idempotency-Key' ? ['old'] : []) }
      expect(await route({}, facts)).toMatchObject({ error: expect.objectContaining({ message: 'crash' }) })
      // The flow's state as it was written before: the finisher's id under `answer`.
      const { dialect } = idempotency
      const { state } = await fx.db
        .selectFrom(fx.table)
        .select(dialect.jsonText(sql.ref('phase_results')).as('state'))
        .where('key', '=', 'old')
        .executeTakeFirstOrThrow()
      expect(String(state)).toContain('"finisher":"http"')
      const legacy = String(state).replace('"finisher":"http"', '"answer":"http"')
      await fx.db
        .updateTable(fx.table)
        .set({ phase_results: dialect.json(sql.val(legacy)) })
        .where('key', '=', 'old')
        .execute()
      expect(await idempotency.recover()).toEqual({ finished: 1, failed: 0, skipped: 0 })
      const replayed = await route({}, facts)
      expect(replayed).toMatchObject({ replayed: true, answer: { status: 201, headers: { 'X-Kept': 'yes' } } })
      expect(JSON.stringify(replayed)).not.toContain('sid=secret')
    })

    it('puts off the flows of a route it does not serve, so that they never crowd out the others', async () => {
      const api = fx.with({ lockTimeout })
      const served = api.defineFlow(
        'served',
        async (flow: Flow<any, HttpResult>) => (await flow.phase('a', async () => 1), Promise.reject(new Error('crash'))),
      )
      const route = new IdempotentRoute<unknown>({ scope: () => 'u', required: true }).flow(api, served)
      for (const key of ['h1', 'h2'])
        await route({}, { method: 'POST', url: '/x', body: () => ({}), headerLines: (name) => (name === 'Idempotency-Key' ? [key] : []) })
      idempotency.defineFlow('served', async () => ({ status: 200 }))
      const plain = defineRide(idempotency, { fail: 1 })
      await expect(plain.run({ key: 'p1', request: { key: 'p1' } })).rejects.toThrow()
      expect(await idempotency.recover({ limit: 2 })).toEqual({ finished: 0, failed: 0, skipped: 2 })
      expect(await idempotency.recover({ limit: 2 })).toEqual({ finished: 1, failed: 0, skipped: 0 })
    })

    it('counts and backs off what the flow code throws, even a conflict, and never acts on a stale pick', async () => {
      let runs = 0
      const busy = idempotency.defineFlow('busy', async (flow: Flow<any, string>) => {
        await flow.phase('a', async () => 1)
        runs++
        // A call of the flow's own that meets a conflict: the flow's failure, not a reason to skip it.
        throw new IdempotencyConflictError('in_flight', 'another operation is busy', { retryAfter: 1 })
      })
      await expect(busy.run({ key: 'b1', request: 1 })).rejects.toThrow('busy')
      expect(await idempotency.recover()).toEqual({ finished: 0, failed: 1, skipped: 0 })
      expect(await idempotency.recover()).toEqual({ finished: 0, failed: 0, skipped: 0 })
      expect(runs).toBe(2)
      expect(await idempotency.inspect({ key: 'b1' })).toMatchObject({ recoveryFailures: 1 })
      // A second worker whose list predates the first one's failure leaves the flow alone.
      const late = fx.with({ lockTimeout })
      late.defineFlow('busy', async () => 'never')
      await sleep(1100)
      const [first, second] = await Promise.all([idempotency.recover(), late.recover()])
      expect(first.failed + second.failed).toBe(1)
      expect(runs).toBeLessThanOrEqual(3)
      expect(await idempotency.inspect({ key: 'b1' })).toMatchObject({ recoveryFailures: 2 })
    })

    it("resumes a flow with its own run's lease and lifetime, not the worker's defaults", async () => {
      let calls = 0
      const slow = idempotency.defineFlow('slow', async (flow: Flow<any, string>) => {
        await flow.phase('a', async () => 1)
        if (flow.attempt === 1) throw new Error('crash')
        await flow.step('s', async () => (calls++, await sleep(lockTimeout * 3), 1))
        return 'done'
      })
      await expect(slow.run({ key: 'lt', request: 1 }, { lockTimeout: 5000, ttl: 60_000 })).rejects.toThrow('crash')
      const pass = idempotency.recover()
      await sleep(lockTimeout + 200)
      // The worker's step outlasts the worker's default lease, but not the run's: the key is still held.
      await expect(fx.with({ lockTimeout }).run({ key: 'lt', request: 1 }, async () => 'client')).rejects.toMatchObject({ reason: 'in_flight' })
      expect(await pass).toEqual({ finished: 1, failed: 0, skipped: 0 })
      expect(calls).toBe(1)
      const seen = await idempotency.inspect({ key: 'lt' })
      expect(seen!.expiresAt.getTime() - seen!.lastRunAt.getTime()).toBe(60_000)
    })

    const points: RidePoint[] = ['creating_ride', 'ride_created', 'charge_called', 'charge_created', 'ride_charged']
    itWhere(target, 'processes')('finishes a defined flow whose process was killed (SIGKILL) at each boundary, running each phase once', async () => {
      const ride = defineRide(idempotency)
      for (const point of points) {
        const key = `killed-${point}`
        const child = startWorker({
          target: target.id,
          location: fx.location,
          table: fx.table,
          action: 'defined-ride',
          key,
          stopAt: point,
          lockTimeout,
        })
        await child.printed(`at:${point}`)
        child.kill('SIGKILL')
        await child.done
        await sleep(lockTimeout + 100)
        expect(await idempotency.recover(), point).toEqual({ finished: 1, failed: 0, skipped: 0 })
        const names = rideEffects(key)
        expect(await fx.effects(names.ride), point).toBe(1)
        expect(await fx.effects(names.charged), point).toBe(1)
        const answer = await ride.executeRun({ key, request: { key } })
        expect(answer.replayed, point).toBe(true)
        // The provider saw one step key, at most twice (a kill between its call and the record).
        const calls = await fx.effects(names.call(answer.value.charge.id.slice(3)))
        expect(calls, point).toBe(point === 'charge_called' ? 2 : 1)
      }
    })
  })
}
