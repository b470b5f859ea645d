/**
 * The exactly-once enqueue recipes of the docs (docs/guide/enqueue.md): a job written in the
 * transaction of the key, the business rows and the stored answer, to graphile-worker on
 * PostgreSQL and to an outbox table on every database. Whatever boundary a crash hits, there is
 * never a job without its answer nor an answer without its job, and a retry never enqueues twice.
 */
import { Logger, runMigrations, runOnce } from 'graphile-worker'
import { sql, type Kysely, type Transaction } from 'kysely'
import { afterEach, beforeAll, beforeEach, describe, expect, inject } from 'vitest'
import type { Target } from './support/databases.js'
import { itIf, itWhere, openFixture, startWorker, targetsFor, type Fixture } from './support/harness.js'

type Queue = 'graphile' | 'outbox'

/** Where graphile-worker runs: it connects to a PostgreSQL server with pg. */
const GRAPHILE = ['postgres', 'postgres-js', 'postgres-serializable']
function graphileMissing(target: Target): string {
  if (target.database !== 'postgres') return 'graphile-worker is a PostgreSQL queue; the outbox rows cover this database'
  if (target.driver === 'pglite') return 'graphile-worker connects to a PostgreSQL server with pg; PGlite runs in the process'
  return 'graphile-worker installs its schema and runs its workers on session connections, which a pooler in transaction mode does not keep'
}

for (const target of targetsFor('exactly-once enqueue')) {
  describe(`exactly-once enqueue: ${target.id}`, () => {
    let fx: Fixture
    const graphile = GRAPHILE.includes(target.id)
    beforeAll(async () => {
      if (graphile) await runMigrations({ connectionString: inject('locations')[target.server ?? 'postgres']!, logger: quiet })
    }, 60_000)
    beforeEach(async () => {
      fx = await openFixture(target)
      await createOutbox(fx.db, `${fx.table}_outbox`, target)
    })
    afterEach(async () => {
      await fx.db.schema.dropTable(`${fx.table}_outbox`).ifExists().execute()
      if (graphile) {
        // graphile-worker's own tables (its public view has no payload and cannot be deleted from).
        const tasks = sql`select id from graphile_worker._private_tasks where identifier = ${task()}`
        await sql`delete from graphile_worker._private_jobs where task_id in (${tasks})`.execute(fx.db)
        await sql`delete from graphile_worker._private_tasks where identifier = ${task()}`.execute(fx.db)
      }
      await fx.close()
    })

    const task = () => `${fx.table}_receipt`
    /** The recipe's handler: the business row, then the job, in the key's transaction. */
    const enqueue = (queue: Queue, key: string, fail?: 'after-enqueue') => async (trx: Transaction<any>) => {
      await fx.effect(trx, key)
      if (queue === 'graphile') await sql`select graphile_worker.add_job(${task()}, json_build_object('key', ${key}::text))`.execute(trx)
      else
        await trx
          .insertInto(`${fx.table}_outbox`)
          .values({ topic: 'receipt', payload: JSON.stringify({ key }) })
          .execute()
      if (fail) throw new Error('the handler failed after enqueuing')
      return { enqueued: key }
    }
    const jobs = async (queue: Queue, key: string): Promise<number> => {
      type Count = { n: string | number }
      const table = sql.table(`${fx.table}_outbox`)
      const query =
        queue === 'graphile'
          ? // graphile-worker's own tables: its public view has no payload.
            sql<Count>`select count(*) as n from graphile_worker._private_jobs j join graphile_worker._private_tasks t on t.id = j.task_id
              where t.identifier = ${task()} and j.payload->>'key' = ${key}`
          : sql<Count>`select count(*) as n from ${table} where payload = ${JSON.stringify({ key })}`
      const { rows } = await query.execute(fx.db)
      return Number(rows[0]!.n)
    }

    for (const queue of ['outbox', 'graphile'] as const) {
      const where = queue === 'graphile' ? itIf(graphile, graphileMissing(target)) : itIf(true, '')
      const crash = (name: string, fn: () => Promise<unknown>) =>
        queue === 'graphile' && !graphile ? where(name, fn) : itWhere(target, 'processes')(name, fn, 60_000)

      where(`${queue}: a first call enqueues one job with its answer; sequential and 10 concurrent retries enqueue nothing`, async () => {
        expect(await fx.idempotency.executeTransaction({ key: 'k', request: 1 }, enqueue(queue, 'k'))).toEqual({
          value: { enqueued: 'k' },
          replayed: false,
        })
        await Promise.all(Array.from({ length: 10 }, () => fx.idempotency.transaction({ key: 'k', request: 1 }, enqueue(queue, 'k'))))
        expect(await fx.idempotency.executeTransaction({ key: 'k', request: 1 }, enqueue(queue, 'k'))).toEqual({
          value: { enqueued: 'k' },
          replayed: true,
        })
        expect(await jobs(queue, 'k')).toBe(1)
        expect(await fx.effects('k')).toBe(1)
        if (queue === 'graphile') {
          // The job is one graphile-worker runs, once.
          const ran: unknown[] = []
          await runOnce({ connectionString: fx.location, logger: quiet, taskList: { [task()]: async (payload) => void ran.push(payload) } })
          expect(ran).toEqual([{ key: 'k' }])
          expect(await jobs(queue, 'k')).toBe(0)
        }
      })

      where(`${queue}: a handler that throws after enqueuing leaves no job and no answer`, async () => {
        await expect(fx.idempotency.transaction('t', enqueue(queue, 't', 'after-enqueue'))).rejects.toThrow('after enqueuing')
        expect(await jobs(queue, 't')).toBe(0)
        expect(await fx.rows()).toBe(0)
      })

      crash(`${queue}: a process killed after enqueuing, before the commit, leaves neither job nor answer, and the retry enqueues once`, async () => {
        const worker = startWorker({
          target: target.id,
          location: fx.location,
          table: fx.table,
          action: 'enqueue',
          key: 'c1',
          queue,
          stopAt: 'before-commit',
        })
        await worker.printed('enqueued')
        worker.kill('SIGKILL')
        await worker.done
        expect(await jobs(queue, 'c1')).toBe(0)
        expect(await fx.rows()).toBe(0)
        expect(await fx.idempotency.executeTransaction({ key: 'c1', request: { order: 'c1' } }, enqueue(queue, 'c1'))).toMatchObject({
          replayed: false,
        })
        expect(await jobs(queue, 'c1')).toBe(1)
      })

      crash(`${queue}: a process killed after the commit, before answering, leaves both, and the retry replays without enqueuing`, async () => {
        const worker = startWorker({
          target: target.id,
          location: fx.location,
          table: fx.table,
          action: 'enqueue',
          key: 'c2',
          queue,
          stopAt: 'after-commit',
        })
        await worker.printed('committed')
        worker.kill('SIGKILL')
        await worker.done
        expect(await jobs(queue, 'c2')).toBe(1)
        const retry = await fx.idempotency.executeTransaction({ key: 'c2', request: { order: 'c2' } }, enqueue(queue, 'c2'))
        expect(retry).toEqual({ value: { enqueued: 'c2' }, replayed: true })
        expect(await jobs(queue, 'c2')).toBe(1)
        expect(await fx.effects('c2')).toBe(1)
      })
    }
  })
}

/** The outbox table of the recipe: an auto-increment id, a topic, a payload. */
async function createOutbox(db: Kysely<any>, name: string, target: Target): Promise<void> {
  await db.schema
    .createTable(name)
    .addColumn('id', target.database === 'postgres' ? 'serial' : 'integer', (c) =>
      target.database === 'mysql' ? c.primaryKey().autoIncrement() : c.primaryKey(),
    )
    .addColumn('topic', 'varchar(255)', (c) => c.notNull())
    .addColumn('payload', 'text', (c) => c.notNull())
    .execute()
}

/** graphile-worker's logger, silenced: its job logs are not the test's output. */
const quiet = new Logger(() => () => {})
