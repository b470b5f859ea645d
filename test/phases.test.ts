import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import {
  IdempotencyConflictError,
  IdempotencyFlowError,
  IdempotencyKeyReuseError,
  IdempotencyLockLostError,
  IdempotencySerializationError,
  type Flow,
} from '../index.js'
import { sql } from 'kysely'
import { createIdempotency } from '../index.js'
import { openDatabase } from './support/databases.js'
import { expectOneOutcome, gate, itWhere, openFixture, sessions, startWorker, targetsFor, type Fixture } from './support/harness.js'
import { rideEffects, rideFlow, type Ride, type RidePoint } from './support/ride.js'
import { answer, sleep, type Answer } from './support/util.js'

for (const target of targetsFor('atomic phases')) {
  describe(`atomic phases: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target, { conflictWait: 2000 })
    })
    afterEach(async () => {
      await fx.close()
    })

    const ride = (key: string, at?: (point: RidePoint) => Promise<void>) => rideFlow(fx.db, fx.effectsTable, key, at)

    /** How often each effect of the ride flow for `key` happened, and the step keys the charge was called with. */
    async function rideCounts(key: string) {
      const names = rideEffects(key)
      const rows = await fx.db.selectFrom(fx.effectsTable).select('k').execute()
      const ks = rows.map((r) => r.k as string)
      const calls = ks.filter((k) => k.startsWith(names.call('')))
      return { ride: ks.filter((k) => k === names.ride).length, charged: ks.filter((k) => k === names.charged).length, calls }
    }

    async function row(key: string) {
      return fx.db.selectFrom(fx.table).select(['recovery_point', 'lock_token', 'locked_until']).where('key', '=', key).executeTakeFirstOrThrow()
    }

    /** One answer ran the flow, the others replayed it or met it in flight; each effect happened once. */
    async function expectRideOnce(answers: Answer[], key: string) {
      const first = answers.find((a): a is { value: unknown; replayed: boolean } => 'replayed' in a && !a.replayed)
      // Under SERIALIZABLE a race the database aborted, retried until it gave up, is a 409 too.
      expectOneOutcome(answers, first?.value, target.server === 'postgres-serializable' ? ['in_flight', 'race'] : ['in_flight'])
      const counts = await rideCounts(key)
      expect(counts).toMatchObject({ ride: 1, charged: 1 })
      expect(counts.calls).toHaveLength(1)
    }

    /** Waits until `abandoned()` lists `key`, that is until its lock has expired. */
    async function abandonedEntry(key: string) {
      for (let i = 0; i < 100; i++) {
        const found = (await fx.idempotency.abandoned()).find((f) => f.key === key)
        if (found) return found
        await sleep(100)
      }
      throw new Error(`${key} was never listed as abandoned`)
    }

    it('lets go of the key at once whatever the flow, a phase or a step throws, undefined included', async () => {
      const slow = fx.with({ lockTimeout: 30_000, conflictWait: 2000 })
      const bodies: Record<string, (flow: Flow<any, string>) => Promise<string>> = {
        flow: async (flow) => {
          await flow.phase('p', async () => 1)
          throw undefined
        },
        phase: async (flow) =>
          flow.phase('p', async () => {
            throw undefined
          }),
        step: async (flow) => {
          await flow.phase('p', async () => 1)
          return flow.step('s', () => Promise.reject(undefined))
        },
      }
      for (const [where, body] of Object.entries(bodies)) {
        await expect(slow.run(`undefined-${where}`, body), where).rejects.toBeUndefined()
        expect(await slow.inspect({ key: `undefined-${where}` }), where).toMatchObject({ state: 'abandoned', lockedUntil: null })
        const started = Date.now()
        expect(await slow.run(`undefined-${where}`, async (flow) => (await flow.phase('p', async () => 1), 'resumed'))).toBe('resumed')
        expect(Date.now() - started, where).toBeLessThan(1500)
      }
    })

    itWhere(target, 'sessions')('lets go of the key when the session of its final store was killed, on another connection', async () => {
      const session = sessions[target.database as 'postgres' | 'mysql']
      // One connection, so that the flow's statements, the final store included, share its session.
      const db = openDatabase(target.driver, fx.location, 1)
      const instance = createIdempotency({ db, tableName: fx.table, lockTimeout: 30_000, ...(target.dialect ? { dialect: target.dialect() } : {}) })
      const locked = gate()
      let blocker: Promise<unknown> = Promise.resolve()
      try {
        const run = instance.run('killed-store', async (flow) => {
          const pid = await flow.phase('p', (trx) => session.id(trx))
          // The final store waits for this lock; its session is killed while it waits.
          blocker = fx.db.transaction().execute(async (trx) => {
            await sql`select id from ${sql.table(fx.table)} where ${sql.ref('key')} = 'killed-store' for update`.execute(trx)
            locked.open()
            await sleep(300)
            await session.kill(fx.db, pid)
            await sleep(100)
          })
          await locked.promise
          return 'stored'
        })
        await expect(run).rejects.toThrow()
        await blocker
        expect(await fx.idempotency.inspect({ key: 'killed-store' })).toMatchObject({ state: 'abandoned', recoveryPoint: 'p', lockedUntil: null })
        expect(await fx.idempotency.run('killed-store', async (flow) => (await flow.phase('p', async () => 0), 'resumed'))).toBe('resumed')
      } finally {
        locked.open()
        await blocker.catch(() => undefined)
        await db.destroy()
      }
    })

    it('records a failure the flow went on from, so that a resume takes the same path without running it (SPEC §4.3.6)', async () => {
      const runs = { reserve: 0, hold: 0, order: 0, ship: 0 }
      let carrierDown = true
      const tolerant = async (flow: Flow<any, string>) => {
        let reserved = 'reserved'
        try {
          await flow.phase('reserve', async (trx) => {
            runs.reserve++
            await fx.effect(trx, 'reserve')
            throw new RangeError('out of stock')
          })
        } catch (error) {
          reserved = `fallback after ${(error as Error).name}: ${(error as Error).message}${error instanceof RangeError ? '' : ' (another class)'}`
        }
        // A second failure the flow goes on from, thrown as a value that is not an error.
        const held = await flow.step('hold', () => (runs.hold++, Promise.reject('no hold'))).catch((thrown: unknown) => `then ${String(thrown)}`)
        const order = await flow.phase('order', async (trx) => (runs.order++, await fx.effect(trx, 'order'), `${reserved}, ${held}`))
        await flow.step('ship', async () => {
          runs.ship++
          if (carrierDown) throw new Error('carrier down')
          return 1
        })
        return order
      }
      // The last failure ends the attempt: it is not recorded, and runs again on resume.
      await expect(fx.idempotency.run('tolerant', tolerant)).rejects.toThrow('carrier down')
      carrierDown = false
      expect(await fx.idempotency.run('tolerant', tolerant)).toBe('fallback after RangeError: out of stock, then no hold')
      expect(runs).toEqual({ reserve: 1, hold: 1, order: 1, ship: 2 })
      expect(await fx.effects('reserve')).toBe(0)
      expect(await fx.effects('order')).toBe(1)
      expect(await fx.idempotency.run('tolerant', tolerant)).toBe('fallback after RangeError: out of stock, then no hold')
    })

    it('rethrows a recorded failure as the first attempt saw it: its class, name, fields, cause, or the value itself', async () => {
      class CardDeclined extends Error {
        constructor(readonly declineCode: string) {
          super('card declined')
        }
      }
      class Unlisted extends Error {
        override name = 'UnlistedError'
        readonly status = 503
      }
      const unprintable = {
        toString: () => {
          throw new Error('no text')
        },
      }
      const thrown: Record<string, unknown> = {
        listed: new CardDeclined('insufficient_funds'),
        unlisted: new Unlisted('provider down'),
        library: new IdempotencyConflictError('in_flight', 'busy elsewhere', { retryAfter: 3 }),
        caused: new Error('fetch failed', { cause: Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }) }),
        object: { code: 'declined', amount: 12n },
        unprintable,
        nothing: undefined,
      }
      const idempotency = fx.with({ errorClasses: [CardDeclined] })
      const seen: Record<string, unknown>[] = []
      let crash = true
      const flow = async (flow: Flow<any, string>) => {
        const caught: Record<string, unknown> = {}
        for (const [name, value] of Object.entries(thrown)) {
          caught[name] = await flow.step(name, () => Promise.reject(value)).catch((error: unknown) => error)
        }
        await flow.phase('after', async () => 1)
        seen.push(caught)
        if (crash) throw new Error('stops')
        return 'done'
      }
      await expect(idempotency.run('failures', flow)).rejects.toThrow('stops')
      crash = false
      expect(await idempotency.run('failures', flow)).toBe('done')
      const [first, resumed] = seen as [Record<string, any>, Record<string, any>]
      expect(first.unprintable).toBe(unprintable)
      expect(resumed.listed).toBeInstanceOf(CardDeclined)
      expect(resumed.listed).toMatchObject({ message: 'card declined', declineCode: 'insufficient_funds' })
      expect(resumed.unlisted).toBeInstanceOf(Error)
      expect(resumed.unlisted).toMatchObject({ name: 'UnlistedError', message: 'provider down', status: 503 })
      expect(resumed.library).toBeInstanceOf(IdempotencyConflictError)
      expect(resumed.library).toMatchObject({ name: 'IdempotencyConflictError', code: 'conflict', reason: 'in_flight', retryAfter: 3, status: 409 })
      expect(resumed.caused.cause).toMatchObject({ message: 'socket hang up', code: 'ECONNRESET' })
      expect(resumed.object).toEqual({ code: 'declined', amount: 12n })
      expect(resumed.unprintable).toMatchObject({ message: '[object Object]' })
      expect(resumed.nothing).toBeUndefined()
      expect('nothing' in resumed).toBe(true)
      expect(() => fx.with({ errorClasses: [Object as never] })).toThrow(/extend Error/)
    })

    it('lets the recovery worker finish a flow that went on from a failure, along the same path', async () => {
      const runs = { risky: 0, after: 0 }
      let attempt = 0
      const tolerant = fx.idempotency.defineFlow('tolerant', async (flow: Flow<any, string>) => {
        attempt++
        const first = await flow
          .phase('risky', async () => (runs.risky++, Promise.reject(new TypeError(`attempt ${attempt}`))))
          .catch((error: Error) => error.message)
        await flow.phase('after', async () => (runs.after++, first))
        if (attempt === 1) throw new Error('the process stops here')
        return first
      })
      await expect(tolerant.run({ key: 'tolerant-worker', request: 1 })).rejects.toThrow('the process stops here')
      expect(await fx.idempotency.recover()).toEqual({ finished: 1, failed: 0, skipped: 0 })
      expect(await tolerant.run({ key: 'tolerant-worker', request: 1 })).toBe('attempt 1')
      expect(runs).toEqual({ risky: 1, after: 1 })
    })

    it('runs every phase and step once, then replays the response', async () => {
      const first = await fx.idempotency.executeRun('r1', ride('r1'))
      expect(first.replayed).toBe(false)
      expect(first.value).toMatchObject({ status: 201, ride: { id: 'ride-r1' } })
      const again = await fx.idempotency.executeRun('r1', ride('r1'))
      expect(again).toEqual({ value: first.value, replayed: true })
      const counts = await rideCounts('r1')
      expect(counts).toMatchObject({ ride: 1, charged: 1 })
      expect(counts.calls).toHaveLength(1)
      expect(await row('r1')).toMatchObject({ recovery_point: 'finished', lock_token: null, locked_until: null })
      expect(await fx.idempotency.transaction('r1', async () => 'not run')).toEqual(first.value)
    })

    it('resumes at once after the flow throws, without running what was recorded', async () => {
      const boom = new Error('provider timed out')
      const failing = ride('r2', async (point) => {
        if (point === 'charge_created') throw boom
      })
      await expect(fx.idempotency.run('r2', failing)).rejects.toBe(boom)
      expect(await row('r2')).toMatchObject({ recovery_point: 'charge_created', lock_token: null })
      let seen: Pick<Flow<any, Ride>, 'attempt' | 'resumedFrom'> | undefined
      const resumed = await fx.idempotency.run('r2', (flow: Flow<any, Ride>) => {
        seen = { attempt: flow.attempt, resumedFrom: flow.resumedFrom }
        return ride('r2')(flow)
      })
      expect(seen).toEqual({ attempt: 2, resumedFrom: 'charge_created' })
      expect(resumed.status).toBe(201)
      const counts = await rideCounts('r2')
      expect(counts).toMatchObject({ ride: 1, charged: 1 })
      expect(counts.calls).toHaveLength(1)
    })

    it('returns the recorded values of phases and steps on a resume, as the same values', async () => {
      const values: unknown[] = []
      const body = (stop: boolean) => async (flow: Flow<any, string>) => {
        values.push(await flow.phase('dated', async () => ({ at: new Date(0), n: 1n })))
        values.push(await flow.step('called', async () => new Map([['x', new Set([2])]])))
        if (stop) throw new Error('stop')
        return 'done'
      }
      await expect(fx.idempotency.run('values', body(true))).rejects.toThrow('stop')
      expect(await fx.idempotency.run('values', body(false))).toBe('done')
      const expected = [{ at: new Date(0), n: 1n }, new Map([['x', new Set([2])]])]
      expect(values).toStrictEqual([...expected, ...expected])
    })

    it('finishes the key with fail() so that retries replay the failure', async () => {
      let runs = 0
      const declined = async (flow: Flow<any, { status: number; declined?: boolean }>) => {
        runs++
        await flow.phase('ride_created', async (trx) => {
          await fx.effect(trx, 'declined:ride')
          return 1
        })
        await flow.step('charge_created', async () => flow.fail({ status: 402, declined: true }))
        return { status: 201 }
      }
      expect(await fx.idempotency.executeRun('r3', declined)).toEqual({ value: { status: 402, declined: true }, replayed: false })
      expect(await fx.idempotency.executeRun('r3', declined)).toEqual({ value: { status: 402, declined: true }, replayed: true })
      expect(runs).toBe(1)
      expect(await fx.effects('declined:ride')).toBe(1)
      expect((await row('r3')).recovery_point).toBe('finished')

      const insidePhase = await fx.idempotency.run('r4', async (flow: Flow<any, string>) =>
        flow.phase('p', async (trx) => {
          await fx.effect(trx, 'r4')
          return flow.fail('refused')
        }),
      )
      expect(insidePhase).toBe('refused')
      expect(await fx.effects('r4')).toBe(0)
    })

    it('refuses a resume that calls phases in another order, and keeps what was recorded', async () => {
      const phase = (flow: Flow<any, string>, name: string) =>
        flow.phase(name, async (trx) => {
          await fx.effect(trx, `order:${name}`)
          return name
        })
      await expect(
        fx.idempotency.run('order', async (flow) => {
          await phase(flow, 'a')
          throw new Error('stop')
        }),
      ).rejects.toThrow('stop')
      await expect(fx.idempotency.run('order', async (flow) => (await phase(flow, 'b'), 'x'))).rejects.toThrow(IdempotencyFlowError)
      await expect(fx.idempotency.run('order', async () => 'skipped a')).rejects.toThrow(IdempotencyFlowError)
      expect(await fx.effects('order:b')).toBe(0)
      const done = await fx.idempotency.run('order', async (flow) => (await phase(flow, 'a')) + (await phase(flow, 'b')))
      expect(done).toBe('ab')
      expect(await fx.effects('order:a')).toBe(1)
      expect(await fx.effects('order:b')).toBe(1)
    })

    it('refuses invalid, repeated and concurrent phase names', async () => {
      for (const name of ['', 'started', 'finished', '1st', 'a b', 'x'.repeat(101), '$flow']) {
        await expect(fx.idempotency.run(`name-${name.length}-${name.slice(0, 3)}`, (flow) => flow.phase(name, async () => 1))).rejects.toThrow(
          IdempotencyFlowError,
        )
      }
      await expect(
        fx.idempotency.run('twice', async (flow) => {
          await flow.phase('a', async () => 1)
          return flow.step('a', async () => 2)
        }),
      ).rejects.toThrow(IdempotencyFlowError)
      await expect(
        fx.idempotency.run('parallel', (flow) => Promise.all([flow.phase('a', async () => sleep(20)), flow.phase('b', async () => 2)])),
      ).rejects.toThrow(IdempotencyFlowError)
      let kept: Flow<any, unknown> | undefined
      await fx.idempotency.run('after', async (flow) => {
        kept = flow
        return 1
      })
      await expect(kept!.phase('late', async () => 1)).rejects.toThrow(IdempotencyFlowError)
    })

    it('rejects a phase value the codec cannot store, rolls the phase back and releases the key', async () => {
      await expect(
        fx.idempotency.run('big', (flow) =>
          flow.phase('p', async (trx) => {
            await fx.effect(trx, 'big')
            return { at: new URL('https://example.com') } as unknown
          }),
        ),
      ).rejects.toThrow(IdempotencySerializationError)
      expect(await fx.effects('big')).toBe(0)
      expect(await fx.idempotency.run('big', (flow) => flow.phase('p', async () => 'fine'))).toBe('fine')
    })

    it('answers single-transaction calls on a flow key with conflicts until it finishes', async () => {
      const held = gate()
      const release = gate()
      const running = fx.idempotency.run(
        'mixed',
        ride('mixed', async (point) => {
          if (point !== 'ride_created') return
          held.open()
          await release.promise
          throw new Error('stop')
        }),
      )
      await held.promise
      const inFlight = { name: IdempotencyConflictError.name, reason: 'in_flight' }
      await expect(fx.idempotency.transaction('mixed', async () => 'no')).rejects.toMatchObject(inFlight)
      await expect(fx.db.transaction().execute((trx) => fx.idempotency.withIdempotency(trx, 'mixed', async () => 'no'))).rejects.toMatchObject(
        inFlight,
      )
      await expect(fx.idempotency.run('mixed', ride('mixed'))).rejects.toMatchObject(inFlight)
      release.open()
      await expect(running).rejects.toThrow('stop')
      await expect(fx.idempotency.transaction('mixed', async () => 'no')).rejects.toMatchObject({ reason: 'unfinished_flow' })
      const done = await fx.idempotency.run('mixed', ride('mixed'))
      expect(await fx.idempotency.executeTransaction('mixed', async () => 'no')).toEqual({ value: done, replayed: true })

      await fx.idempotency.transaction('single', async () => 'from a transaction')
      expect(await fx.idempotency.executeRun('single', ride('single'))).toEqual({ value: 'from a transaction', replayed: true })
    })

    it('refuses the key with a different request (422) and runs nothing', async () => {
      await fx.idempotency.run({ key: 'reuse', request: { amount: 1 } }, ride('reuse'))
      await expect(fx.idempotency.run({ key: 'reuse', request: { amount: 2 } }, ride('reuse'))).rejects.toThrow(IdempotencyKeyReuseError)
      expect((await rideCounts('reuse')).ride).toBe(1)
    })

    it('starts over with new step keys once an unfinished flow has expired', async () => {
      const stepKeys: string[] = []
      const body = (stop: boolean) => async (flow: Flow<any, string>) => {
        stepKeys.push(flow.stepKey('charge'))
        await flow.phase('p', async (trx) => (await fx.effect(trx, 'expiring'), 1))
        if (stop) throw new Error('stop')
        return `attempt ${flow.attempt}`
      }
      await expect(fx.idempotency.run('expiring', body(true), { ttl: 200 })).rejects.toThrow('stop')
      await sleep(300)
      expect(await fx.idempotency.run('expiring', body(false))).toBe('attempt 1')
      expect(stepKeys[0]).not.toBe(stepKeys[1])
      expect(await fx.effects('expiring')).toBe(2)
    })

    it('lists abandoned flows with their request once the lock has expired, and lets a live attempt go on', async () => {
      const held = gate()
      const release = gate()
      const request = { rider: 7, route: ['a', 'b'] }
      const running = fx.idempotency.run(
        { key: 'lost', scope: 'tenant-1', request },
        ride('lost', async (point) => {
          if (point !== 'ride_created') return
          held.open()
          await release.promise
        }),
        { lockTimeout: 300 },
      )
      await held.promise
      expect(await fx.idempotency.abandoned()).toEqual([])
      const entry = await abandonedEntry('lost')
      expect(entry).toMatchObject({ scope: 'tenant-1', key: 'lost', recoveryPoint: 'ride_created', request, attempts: 1 })
      expect(entry.idle).toBeGreaterThanOrEqual(300)
      expect(entry.age).toBeGreaterThanOrEqual(entry.idle)
      expect(await fx.idempotency.abandoned({ olderThan: 60_000 })).toEqual([])
      // Nobody took the key over, so the attempt whose lock expired may still finish.
      release.open()
      expect((await running).status).toBe(201)
      expect(await fx.idempotency.abandoned()).toEqual([])
    })

    it('runs every phase once under 50 concurrent calls with one key', async () => {
      const slow = (key: string) => ride(key, () => sleep(10))
      const answers = await Promise.all(Array.from({ length: 50 }, () => answer(fx.idempotency.executeRun('storm', slow('storm')))))
      await expectRideOnce(answers, 'storm')
    })

    it('resumes a stopped flow once under 50 concurrent retries', async () => {
      await expect(
        fx.idempotency.run(
          'resume-storm',
          ride('resume-storm', async (point) => {
            if (point === 'ride_created') throw new Error('stop')
          }),
        ),
      ).rejects.toThrow('stop')
      const slow = ride('resume-storm', () => sleep(10))
      const answers = await Promise.all(Array.from({ length: 50 }, () => answer(fx.idempotency.executeRun('resume-storm', slow))))
      await expectRideOnce(answers, 'resume-storm')
    })

    itWhere(target, 'processes')('runs every phase once when 4 processes run the same key at once', async () => {
      const startAt = Date.now() + 1500
      const workers = Array.from({ length: 4 }, () =>
        startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'ride', key: 'multi', count: 10, startAt }),
      )
      const answers: Answer[] = (await Promise.all(workers.map((w) => w.done))).flatMap((r) => {
        expect(r.code, r.stderr).toBe(0)
        return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Answer[]
      })
      await expectRideOnce(answers, 'multi')
    })

    const recoveryPoints: Record<RidePoint, string> = {
      begun: 'started',
      creating_ride: 'started',
      ride_created: 'ride_created',
      charge_called: 'ride_created',
      charge_created: 'charge_created',
      ride_charged: 'ride_charged',
    }

    itWhere(target, 'processes')('completes exactly once after a process is killed (SIGKILL) at each phase boundary', async () => {
      // Each process is killed where it stopped; a retry while its lease lasts gets a 409.
      const kill = async (points: RidePoint[]) => {
        const workers = points.map((point) => {
          const key = `kill-${point}`
          return {
            point,
            key,
            worker: startWorker({ target: target.id, location: fx.location, table: fx.table, action: 'ride', key, stopAt: point, lockTimeout: 3000 }),
          }
        })
        for (const { point, worker } of workers) await worker.printed(`at:${point}`)
        for (const { worker } of workers) worker.kill('SIGKILL')
        for (const { point, key, worker } of workers) {
          expect((await worker.done).signal).toBe('SIGKILL')
          await expect(fx.idempotency.run(key, ride(key)), `${point}: a retry during the lease`).rejects.toMatchObject({ reason: 'in_flight' })
        }
        return workers
      }
      // A process stopped inside a phase holds its transaction open; on SQLite that blocks
      // every other writer, so it goes first, alone.
      const workers = [
        ...(await kill(['creating_ride'])),
        ...(await kill(['begun', 'ride_created', 'charge_called', 'charge_created', 'ride_charged'])),
      ]
      for (const { point, key } of workers) {
        expect((await abandonedEntry(key)).recoveryPoint, point).toBe(recoveryPoints[point])
        const resumed = await fx.idempotency.executeRun(key, ride(key))
        expect(resumed.replayed, point).toBe(false)
        expect(await fx.idempotency.executeRun(key, ride(key))).toEqual({ value: resumed.value, replayed: true })
        const counts = await rideCounts(key)
        expect(counts, point).toMatchObject({ ride: 1, charged: 1 })
        // The foreign call runs again only when the process died between it and its record,
        // and then with the same step key, so the provider can tell it is a retry.
        expect(counts.calls, point).toHaveLength(point === 'charge_called' ? 2 : 1)
        expect(new Set(counts.calls).size, point).toBe(1)
      }
    })

    itWhere(target, 'processes')('lets another process take over a stalled attempt, which then loses its lock and writes nothing', async () => {
      const stalls: RidePoint[] = ['ride_created', 'charge_created']
      const workers = stalls.map((point) => {
        const key = `stall-${point}`
        const worker = startWorker({
          target: target.id,
          location: fx.location,
          table: fx.table,
          action: 'ride',
          key,
          stopAt: point,
          stall: 3000,
          lockTimeout: 1000,
        })
        return { point, key, worker }
      })
      for (const { point, worker } of workers) await worker.printed(`at:${point}`)
      for (const { point, key } of workers) {
        await abandonedEntry(key)
        const taken = await fx.idempotency.executeRun(key, ride(key))
        expect(taken.replayed, point).toBe(false)
      }
      for (const { point, key, worker } of workers) {
        const result = await worker.done
        expect(result.code, result.stderr).toBe(0)
        expect(JSON.parse(result.stdout.trim().split('\n').at(-1)!), point).toEqual([{ error: IdempotencyLockLostError.name }])
        const counts = await rideCounts(key)
        expect(counts, point).toMatchObject({ ride: 1, charged: 1 })
        expect(counts.calls, point).toHaveLength(1)
      }
    })
  })
}
