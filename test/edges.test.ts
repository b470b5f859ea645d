/**
 * What ordinary, imperfect calling code does around the library: try/catch around phases,
 * conditions that skip them, slow functions, keys that are missing, calls nested in
 * themselves, transactions committed after an error, prune running beside requests.
 */
import { type Kysely, sql } from 'kysely'
import { Migrator } from './support/migrator.js'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import {
  createIdempotency,
  idempotencyMigrations,
  IdempotencyConflictError,
  IdempotencyFlowError,
  InvalidIdempotencyKeyError,
  migrationTables,
  withIdempotency,
  type Flow,
} from '../index.js'
import { idempotent, UNSCOPED } from '../fetch/index.js'
import { openDatabase } from './support/databases.js'
import { gate, itIf, openFixture, targetsFor, type Fixture } from './support/harness.js'
import { sleep } from './support/util.js'

for (const target of targetsFor('edges')) {
  describe(`edges: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target, { conflictWait: 3000 })
    })
    afterEach(async () => {
      await fx.close()
    })

    /** The key's row: where it stands and whether an attempt holds it. */
    const row = (key: string) => fx.db.selectFrom(fx.table).select(['recovery_point', 'lock_token']).where('key', '=', key).executeTakeFirstOrThrow()

    /** A phase that records one side effect named `name` per run. */
    const phase = (flow: Flow<any, unknown>, name: string) =>
      flow.phase(name, async (trx) => {
        await fx.effect(trx, name)
        return `${name} done`
      })

    /** Attempt 1 records `phases` in order, then fails. */
    async function recordThenFail(key: string, phases: string[]) {
      const stop = new Error('attempt 1 fails after its phases')
      await expect(
        fx.idempotency.run(key, async (flow) => {
          for (const name of phases) await phase(flow, name)
          throw stop
        }),
      ).rejects.toBe(stop)
    }

    /** The resumed attempt broke the recorded order: it ended, released the key unfinished, ran nothing recorded twice. */
    async function expectBrokenResume(resume: Promise<unknown>, key: string, effects: Record<string, number>) {
      await expect(resume).rejects.toBeInstanceOf(IdempotencyFlowError)
      for (const [name, count] of Object.entries(effects)) expect(await fx.effects(name), name).toBe(count)
      const after = await row(key)
      expect(after.recovery_point).not.toBe('finished')
      expect(after.lock_token).toBeNull()
    }

    describe('a recorded phase or step never runs again', () => {
      it('when a best-effort call in try/catch failed before it: the failure is replayed on resume, nothing runs again (SPEC §4.3.6)', async () => {
        let audits = 0
        const audit = async (flow: Flow<any, unknown>) => {
          try {
            await flow.step('audit', async () => {
              audits++
              if (flow.attempt === 1) throw new Error('audit service down')
              return 'audited'
            })
          } catch {
            // Best effort: the order goes on without an audit record.
          }
        }
        await expect(
          fx.idempotency.run('best-effort', async (flow) => {
            await audit(flow)
            await phase(flow, 'create_order')
            throw new Error('provider timeout')
          }),
        ).rejects.toThrow('provider timeout')
        const resume = fx.idempotency.run('best-effort', async (flow) => {
          await audit(flow)
          await phase(flow, 'create_order')
          return { status: 201 }
        })
        await expect(resume).resolves.toEqual({ status: 201 })
        expect(audits).toBe(1)
        expect(await fx.effects('create_order')).toBe(1)
      })

      it('when the flow swallows the order error and returns as if it succeeded', async () => {
        await recordThenFail('swallowed', ['create_order'])
        let later: unknown
        const resume = fx.idempotency.run('swallowed', async (flow) => {
          try {
            await phase(flow, 'send_receipt')
            await phase(flow, 'create_order')
          } catch {
            // Ordinary code that logs and answers anyway.
          }
          later = await phase(flow, 'notify').catch((error: unknown) => error)
          return { status: 200 }
        })
        await expectBrokenResume(resume, 'swallowed', { create_order: 1, send_receipt: 0, notify: 0 })
        expect(later).toBeInstanceOf(IdempotencyFlowError)
        await expect(fx.idempotency.run('swallowed', async (flow) => phase(flow, 'create_order'))).resolves.toBe('create_order done')
        expect(await fx.effects('create_order')).toBe(1)
      })

      it('when a condition skips it on resume', async () => {
        await recordThenFail('skipped', ['create_order'])
        const resume = fx.idempotency.run('skipped', async (flow) => {
          if (flow.attempt === 1) await phase(flow, 'create_order')
          try {
            await phase(flow, 'reserve_stock')
          } catch {
            // Stock is reserved again later by a job; the order goes on.
          }
          return 'done'
        })
        await expectBrokenResume(resume, 'skipped', { create_order: 1, reserve_stock: 0 })
      })

      it('when its name is called at another position', async () => {
        await recordThenFail('reordered', ['a'])
        const resume = fx.idempotency.run('reordered', async (flow) => {
          await phase(flow, 'b').catch(() => undefined)
          await phase(flow, 'a')
          return 'done'
        })
        await expectBrokenResume(resume, 'reordered', { a: 1, b: 0 })
      })

      it('when it is a step inside try/catch, before and after the order breaks', async () => {
        let calls = 0
        const charge = (flow: Flow<any, unknown>) =>
          flow.step('charge', async () => {
            calls++
            return `charged with ${flow.stepKey('charge')}`
          })
        await expect(
          fx.idempotency.run('step', async (flow) => {
            await charge(flow)
            await flow.phase('mark_paid', async () => {
              throw new Error('database hiccup')
            })
          }),
        ).rejects.toThrow('database hiccup')
        // A resume in the same order gets the recorded charge back, without a second call.
        const resumed = await fx.idempotency.run('step', async (flow) => {
          let charged: unknown
          try {
            charged = await charge(flow)
          } catch {
            charged = 'not charged'
          }
          await phase(flow, 'mark_paid')
          return charged
        })
        expect(resumed).toMatch(/^charged with /)
        expect(calls).toBe(1)

        await expect(
          fx.idempotency.run('step-2', async (flow) => {
            await charge(flow)
            throw new Error('stop')
          }),
        ).rejects.toThrow('stop')
        const resume = fx.idempotency.run('step-2', async (flow) => {
          await flow.step('fraud_check', async () => 'ok').catch(() => undefined)
          await charge(flow).catch(() => undefined)
          return 'done'
        })
        await expectBrokenResume(resume, 'step-2', {})
        expect(calls).toBe(2)
      })
    })

    describe('what the flow code does to its values stays out of the flow', () => {
      it('records what a phase returned, not what the code later made of it or of the request', async () => {
        const request = { amount: 5 }
        await expect(
          fx.idempotency.run({ key: 'mutated', request }, async (flow) => {
            const ride = await flow.phase('ride', async () => ({ status: 'new' }))
            ride.status = 'changed afterwards'
            request.amount = 999
            await flow.phase('charge', async () => 1)
            throw new Error('crash')
          }),
        ).rejects.toThrow('crash')
        const listed = (await fx.idempotency.abandoned()).find((f) => f.key === 'mutated')
        expect(listed?.request).toEqual({ amount: 5 })
        const resumed = await fx.idempotency.run({ key: 'mutated', request: listed!.request }, async (flow) => {
          const ride = await flow.phase('ride', async () => ({ status: 'rerun' }))
          ride.status = 'changed on resume'
          await flow.phase('charge', async () => 2)
          return flow.phase('done', async () => 'done')
        })
        expect(resumed).toBe('done')
      })

      it('ends the attempt, unfinished, when the flow returns before a phase or step it started', async () => {
        let calls = 0
        let late: Promise<unknown> | undefined
        const run = fx.idempotency.run('unawaited', async (flow) => {
          late = flow.step('email', async () => {
            calls++
            await sleep(50)
            return 'sent'
          })
          late.catch(() => undefined)
          return 'ok'
        })
        await expect(run).rejects.toThrow(/ended while "email" was still running/)
        await expect(late).rejects.toBeInstanceOf(IdempotencyFlowError)
        expect((await row('unawaited')).recovery_point).toBe('started')
        expect(calls).toBe(1)
      })

      it("releases its own key when a nested flow of another key loses that key's lock", async () => {
        const outer = fx.idempotency.run(
          'outer',
          () =>
            fx.idempotency.run(
              'inner',
              async (flow) => {
                await flow.step('s', async () => {
                  await sleep(150)
                  await fx.idempotency.run('inner', async () => 'taken over', { lockTimeout: 100 })
                  return 1
                })
                return 'inner'
              },
              { lockTimeout: 100 },
            ),
          { lockTimeout: 60_000 },
        )
        await expect(outer).rejects.toThrow(/"inner"/)
        expect(await fx.idempotency.run('outer', async () => 'retried at once')).toBe('retried at once')
      })
    })

    describe('a held key never expires under a live attempt', () => {
      it('run: a ttl shorter than a step does not let another attempt in', async () => {
        const slow = fx.with({ lockTimeout: 10_000 })
        const inStep = gate()
        const release = gate()
        const stepKeys: string[] = []
        const first = slow.run(
          'slow-step',
          async (flow) => {
            const charge = await flow.step('charge', async () => {
              stepKeys.push(flow.stepKey('charge'))
              inStep.open()
              await release.promise
              return 'ch_1'
            })
            return { charge }
          },
          { ttl: 100 },
        )
        await inStep.promise
        await sleep(400)
        await expect(slow.run('slow-step', async () => ({ charge: 'second' }), { ttl: 100 })).rejects.toMatchObject({ reason: 'in_flight' })
        release.open()
        expect(await first).toEqual({ charge: 'ch_1' })
        expect(stepKeys).toHaveLength(1)
        expect(await slow.run('slow-step', async () => ({ charge: 'third' }), { ttl: 100 })).toEqual({ charge: 'ch_1' })
      })

      it('transaction: a function slower than ttl is replayed to the duplicate that waited, and lives ttl after it finished', async () => {
        const short = fx.with({ ttl: 500, conflictWait: 5000 })
        const claimed = gate()
        const slow = (label: string) => async (trx: Parameters<Fixture['effect']>[0]) => {
          await fx.effect(trx, 'slow')
          claimed.open()
          await sleep(1000)
          return label
        }
        const first = short.transaction('slow', slow('first'))
        await claimed.promise
        const duplicate = short.executeTransaction('slow', slow('duplicate'))
        expect(await first).toBe('first')
        expect(await duplicate).toEqual({ value: 'first', replayed: true })
        expect(await short.executeTransaction('slow', slow('third'))).toEqual({ value: 'first', replayed: true })
        expect(await fx.effects('slow')).toBe(1)
      })

      it('takes the longest allowed ttl (10 years) on every database, and refuses longer ones and lock timeouts by name', async () => {
        const tenYears = 3650 * 24 * 60 * 60 * 1000
        expect(await fx.idempotency.transaction('long', async () => 'kept', { ttl: tenYears })).toBe('kept')
        expect(await fx.idempotency.executeTransaction('long', async () => 'again', { ttl: tenYears })).toEqual({ value: 'kept', replayed: true })
        expect(
          await fx.idempotency.run('long-flow', async (flow) => flow.step('s', async () => 1), { ttl: tenYears, lockTimeout: 24 * 3600_000 }),
        ).toBe(1)
        expect(await fx.idempotency.executeRun('long-flow', async () => 2, { ttl: tenYears })).toEqual({ value: 1, replayed: true })
        expect((await fx.idempotency.counts()).expired).toBe(0)

        await expect(fx.idempotency.transaction('longer', async () => 1, { ttl: tenYears + 1 })).rejects.toThrow(
          /ttl must be an integer from 1 to \d+ \(10 years\)/,
        )
        await expect(fx.idempotency.run('longer', async () => 1, { lockTimeout: 24 * 3600_000 + 1 })).rejects.toThrow(/lockTimeout .* \(24 hours\)/)
        await expect(fx.idempotency.transaction('longer', async () => 1, { conflictWait: 3600_001 })).rejects.toThrow(/conflictWait .* \(1 hour\)/)
        expect(() => fx.with({ ttl: 1e15 })).toThrow(RangeError)
        expect(await fx.rows()).toBe(2)
      })
    })

    describe("transaction()'s sequence", () => {
      it('answers a replay with one read before any transaction; with claimFirst, claims first in the transaction', async () => {
        const sent: string[] = []
        const logged = openDatabase(target.driver, fx.location, 2, 5000, (event) => {
          sent.push(/^\s*(\w+)/.exec(event.query.sql)?.[1]?.toLowerCase() ?? '?')
        })
        try {
          const make = (claimFirst: boolean) =>
            createIdempotency({ db: logged, tableName: fx.table, claimFirst, ...(target.dialect ? { dialect: target.dialect() } : {}) })
          const [readFirst, claimFirst] = [make(false), make(true)]
          // The first call of an instance compiles its statements (and asks MySQL its version).
          await readFirst.transaction('warm', async () => 0)
          await claimFirst.transaction('warm-too', async () => 0)
          const call = async (idempotency: typeof readFirst, key: string, value: string) => {
            sent.length = 0
            const execution = await idempotency.executeTransaction(key, async () => value)
            return { execution, sent: [...sent] }
          }
          // postgres.js opens and ends transactions itself, out of Kysely's log: count statements alone.
          const statements = (sent: string[]) => sent.filter((verb) => verb !== 'begin' && verb !== 'commit')
          const first = await call(readFirst, 'read', 'a')
          expect(first.execution).toEqual({ value: 'a', replayed: false })
          expect(first.sent[0]).toBe('select')
          const replay = await call(readFirst, 'read', 'b')
          expect(replay).toEqual({ execution: { value: 'a', replayed: true }, sent: ['select'] })
          const claimed = await call(claimFirst, 'claim', 'a')
          expect(claimed.execution).toEqual({ value: 'a', replayed: false })
          expect(statements(claimed.sent)[0]).not.toBe('select')
          expect(statements(claimed.sent)).toHaveLength(statements(first.sent).length - 1)
          const claimedReplay = await call(claimFirst, 'claim', 'b')
          expect(claimedReplay.execution).toEqual({ value: 'a', replayed: true })
          expect(statements(claimedReplay.sent)[0]).not.toBe('select')
          await expect(claimFirst.transaction('claim', async () => 'c', { claimFirst: 'yes' as never })).rejects.toThrow(
            /claimFirst must be true or false/,
          )
          // An HTTP route passes the option on (the Fetch adapter: no server needed).
          const route = idempotent(readFirst, { scope: UNSCOPED, claimFirst: true }, async () => ({ status: 201, body: { ok: true } }))
          const request = () => new Request('http://x/orders', { method: 'POST', headers: { 'idempotency-key': 'route' } })
          sent.length = 0
          expect((await route(request())).status).toBe(201)
          expect(statements(sent)[0]).not.toBe('select')
          sent.length = 0
          expect((await route(request())).headers.get('idempotency-replayed')).toBe('true')
          expect(statements(sent)[0]).not.toBe('select')
        } finally {
          await logged.destroy()
        }
      })
    })

    describe('a finished key lives ttl from when it finished', () => {
      it('is replayed until ttl has passed and is new soon after: the claim outlives ttl by 1% of it at most', async () => {
        const short = fx.with({ ttl: 1000 })
        expect(await short.transaction('ttl', async () => 'first')).toBe('first')
        await sleep(500)
        expect(await short.executeTransaction('ttl', async () => 'second')).toEqual({ value: 'first', replayed: true })
        await sleep(700)
        expect(await short.executeTransaction('ttl', async () => 'third')).toEqual({ value: 'third', replayed: false })
      })

      it('counts ttl from the store, not the claim, when the function ran longer than the slack', async () => {
        const short = fx.with({ ttl: 1000 })
        expect(
          await short.transaction('slow-ttl', async () => {
            await sleep(600)
            return 'first'
          }),
        ).toBe('first')
        await sleep(700)
        expect(await short.executeTransaction('slow-ttl', async () => 'second')).toEqual({ value: 'first', replayed: true })
      })

      itIf(target.database === 'postgres', 'only Postgres has heap-only updates and counts them per transaction')(
        'stores the answer without rewriting an index: a heap-only update',
        async () => {
          await fx.db.transaction().execute(async (trx) => {
            await withIdempotency(trx, 'hot', async () => 'kept', { tableName: fx.table })
            const { rows } = await sql<{ hot: string }>`select pg_stat_get_xact_tuples_hot_updated(${fx.table}::text::regclass) as hot`.execute(trx)
            expect(Number(rows[0]!.hot)).toBe(1)
          })
        },
      )
    })

    describe('errors say what happened', () => {
      it('rejects, never throws, on a missing key or a bad option, in every entry point', async () => {
        const fn = async () => 1
        const calls: Array<[string, () => Promise<unknown>, new (...args: never[]) => Error]> = [
          ['transaction(undefined)', () => fx.idempotency.transaction(undefined as unknown as string, fn), InvalidIdempotencyKeyError],
          ['executeTransaction(null)', () => fx.idempotency.executeTransaction(null as unknown as string, fn), InvalidIdempotencyKeyError],
          ['run({ key: undefined })', () => fx.idempotency.run({ key: undefined as unknown as string }, fn), InvalidIdempotencyKeyError],
          ['executeRun(42)', () => fx.idempotency.executeRun(42 as unknown as string, fn), InvalidIdempotencyKeyError],
          [
            'execute(trx, undefined)',
            () => fx.db.transaction().execute((trx) => fx.idempotency.execute(trx, undefined as unknown as string, fn)),
            InvalidIdempotencyKeyError,
          ],
          [
            'withIdempotency(trx, null)',
            () => fx.db.transaction().execute((trx) => withIdempotency(trx, null as unknown as string, fn, { tableName: fx.table })),
            InvalidIdempotencyKeyError,
          ],
          ['executeTransaction ttl 0', () => fx.idempotency.executeTransaction('k', fn, { ttl: 0 }), RangeError],
          ['executeRun lockTimeout -1', () => fx.idempotency.executeRun('k', fn, { lockTimeout: -1 }), RangeError],
          [
            'execute conflictWait NaN',
            () => fx.db.transaction().execute((trx) => fx.idempotency.execute(trx, 'k', fn, { conflictWait: Number.NaN })),
            RangeError,
          ],
          ['abandoned limit 0', () => fx.idempotency.abandoned({ limit: 0 }), RangeError],
          ['prune batchSize 0', () => fx.idempotency.prune({ batchSize: 0 }), RangeError],
        ]
        for (const [label, call, type] of calls) {
          let promise: Promise<unknown> | undefined
          expect(() => (promise = call()), label).not.toThrow()
          await expect(promise, label).rejects.toBeInstanceOf(type)
        }
        await expect(fx.idempotency.transaction(undefined as unknown as string, fn)).rejects.toThrow(/key is missing/)
        expect(await fx.rows()).toBe(0)
      })

      it('names a key nested inside its own call, instead of calling it a flow to resume', async () => {
        const nested = fx.db
          .transaction()
          .execute((trx) =>
            fx.idempotency.withIdempotency(trx, 'nest', async (trx) => fx.idempotency.withIdempotency(trx, 'nest', async () => 'inner')),
          )
        await expect(nested).rejects.toBeInstanceOf(IdempotencyConflictError)
        await expect(nested).rejects.toMatchObject({ reason: 'nested', message: expect.stringContaining('nested inside its own function') })
        await expect(nested).rejects.not.toThrow(/run\(\)/)
        expect(await fx.rows()).toBe(0)
      })

      it('tells a caller who committed after a failed call that the key is stranded until it expires', async () => {
        await fx.db.transaction().execute(async (trx) => {
          await fx.idempotency.withIdempotency(trx, 'stranded', async () => Promise.reject(new Error('card declined'))).catch(() => undefined)
          // ...and the transaction commits anyway.
        })
        const retry = fx.idempotency.transaction('stranded', async () => 'again')
        await expect(retry).rejects.toMatchObject({ reason: 'stranded', message: expect.stringContaining('committed without storing a response') })
        await expect(retry).rejects.not.toThrow(/run\(\)/)
        const error = (await retry.catch((e: unknown) => e)) as IdempotencyConflictError
        expect(error.retryAfter).toBeGreaterThan(86_000)
        await expect(fx.idempotency.run('stranded', async () => 'again')).rejects.toMatchObject({ reason: 'stranded' })
      })

      it('tells a caller who calls again in the transaction of a failed call what happened', async () => {
        await fx.db.transaction().execute(async (trx) => {
          await expect(fx.idempotency.withIdempotency(trx, 'again', async () => Promise.reject(new Error('validation')))).rejects.toThrow(
            'validation',
          )
          const again = fx.idempotency.withIdempotency(trx, 'again', async () => 'second')
          await expect(again).rejects.toMatchObject({
            reason: 'stranded',
            retryAfter: 1,
            message: expect.stringContaining('in this same transaction'),
          })
          await expect(again).rejects.not.toThrow(/committed/)
        })
      })

      it('takes null for options as no options', async () => {
        expect(await fx.idempotency.transaction('null-options', async () => 1, null as unknown as undefined)).toBe(1)
        expect(await fx.idempotency.run('null-run', async () => 2, null as unknown as undefined)).toBe(2)
        expect(await fx.idempotency.prune(null as unknown as undefined)).toBe(0)
        expect(await fx.idempotency.abandoned(null as unknown as undefined)).toEqual([])
      })

      it('prunes while requests reclaim the same expired keys, retrying what the database aborts', async () => {
        const expiring = fx.with({ ttl: 1 })
        const failures: unknown[] = []
        for (let round = 0; round < 10; round++) {
          // SERIALIZABLE keeps a record of every read/write conflict; 60 at once while other test files
          // run can exhaust the server's pool of them (53200), which says nothing about the library.
          const keys = Array.from({ length: target.server === 'postgres-serializable' ? 20 : 60 }, (_, i) => `race-${round}-${i}`)
          // Under SERIALIZABLE, 60 first executions at once abort one another more often than retried.
          if (target.server === 'postgres-serializable') for (const key of keys) await expiring.transaction(key, async () => 'old')
          else await Promise.all(keys.map((key) => expiring.transaction(key, async () => 'old')))
          await sleep(5)
          const prune = () => fx.idempotency.prune({ batchSize: 3 })
          const results = await Promise.allSettled([
            prune(),
            ...keys.map((key) => fx.idempotency.transaction(key, async () => 'new')),
            prune(),
            prune(),
          ])
          for (const result of results) if (result.status === 'rejected') failures.push(result.reason)
        }
        // Under SERIALIZABLE the database may abort a request more often than it is retried: a 409 to retry, never a raw error.
        const tolerated = (f: unknown) => target.server === 'postgres-serializable' && f instanceof IdempotencyConflictError && f.reason === 'race'
        expect(failures.filter((f) => !tolerated(f))).toEqual([])
      })
    })

    if (target.database === 'mysql') {
      it('never relies on IGNORE, which would turn a bad value into a warning and store something else', async () => {
        const sent: string[] = []
        const logged = openDatabase('mysql2', fx.location, 5, 5000, (event) => void sent.push(event.query.sql))
        try {
          const idempotency = createIdempotency({ db: logged, tableName: fx.table, ...(target.dialect ? { dialect: target.dialect() } : {}) })
          await idempotency.transaction('ignore', async () => 1)
          await idempotency.transaction('ignore', async () => 2)
          await logged.transaction().execute((trx) => idempotency.withIdempotency(trx, 'ignore', async () => 3))
          await idempotency.run('ignore-flow', async (flow) => flow.phase('p', async () => 4))
          await idempotency.prune()
        } finally {
          await logged.destroy()
        }
        expect(sent.some((statement) => /\binsert\b/i.test(statement))).toBe(true)
        expect(sent.filter((statement) => /\bignore\b/i.test(statement))).toEqual([])
      })

      describe('a latin1 MySQL database', () => {
        let latin1: Kysely<any>
        beforeEach(async () => {
          await sql`create database if not exists kidem_latin1 character set latin1 collate latin1_swedish_ci`.execute(fx.db)
          const url = new URL(fx.location)
          url.pathname = '/kidem_latin1'
          latin1 = openDatabase('mysql2', url.toString(), 5)
        })
        afterEach(async () => {
          await latin1.destroy()
        })

        const open = (table: string) => createIdempotency({ db: latin1, tableName: table, ...(target.dialect ? { dialect: target.dialect() } : {}) })
        const drop = async (table: string) => {
          const { migrationTableName, migrationLockTableName } = migrationTables(table)
          for (const t of [table, migrationTableName, migrationLockTableName]) await latin1.schema.dropTable(t).ifExists().execute()
        }

        it('stores any Unicode text in a new table, and keeps keys byte-exact', async () => {
          const table = `${fx.table}_l1`
          try {
            const idempotency = open(table)
            await idempotency.migrate()
            const value = { note: '漢字 💳 ñ', scope: 'tenant-ü' }
            expect(await idempotency.transaction({ key: 'k', scope: 'tenant-ü', request: { item: '☕' } }, async () => value)).toEqual(value)
            expect(await idempotency.executeTransaction({ key: 'k', scope: 'tenant-ü', request: { item: '☕' } }, async () => 'no')).toEqual({
              value,
              replayed: true,
            })
            expect(await idempotency.executeTransaction({ key: 'K', scope: 'tenant-ü', request: { item: '☕' } }, async () => 'other')).toEqual({
              value: 'other',
              replayed: false,
            })
            expect(await idempotency.run({ key: 'f', request: '💳' }, async (flow) => flow.phase('p', async () => '漢字'))).toBe('漢字')
            const { rows } = await sql<{
              c: string
            }>`select table_collation as c from information_schema.tables where table_schema = 'kidem_latin1' and table_name = ${table}`.execute(
              latin1,
            )
            expect(rows[0]?.c).toBe('utf8mb4_bin')
          } finally {
            await drop(table)
          }
        })

        it('converts a table created by the first migration, keeping its rows', async () => {
          const table = `${fx.table}_l2`
          try {
            const { migrationTableName, migrationLockTableName } = migrationTables(table)
            const migrator = new Migrator({
              db: latin1,
              provider: idempotencyMigrations({ tableName: table }),
              migrationTableName,
              migrationLockTableName,
            })
            expect((await migrator.migrateTo(`kysely_idempotency_${table}_0001_create`)).error).toBeUndefined()
            await latin1
              .insertInto(table)
              .values({
                scope: '',
                key: 'old',
                fingerprint: '74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b',
                recovery_point: 'finished',
                response: '"café"',
                created_at: sql`utc_timestamp(3)`,
                last_run_at: sql`utc_timestamp(3)`,
                expires_at: sql`utc_timestamp(3) + interval 1 hour`,
              })
              .execute()
            const idempotency = open(table)
            await idempotency.migrate()
            expect(await idempotency.executeTransaction('old', async () => 'new')).toEqual({ value: 'café', replayed: true })
            expect(await idempotency.transaction('new', async () => '漢字 💳')).toBe('漢字 💳')
            expect(await idempotency.transaction('new', async () => '')).toBe('漢字 💳')
          } finally {
            await drop(table)
          }
        })
      })
    } else {
      it.skip('MySQL statements and a latin1 MySQL database (N/A: MySQL only)')
    }
  })
}
