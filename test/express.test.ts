import type { AddressInfo } from 'node:net'
import type { Server } from 'node:http'
import express5 from 'express'
import express4 from 'express4'
import multer from 'multer'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Stripe from 'stripe'
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest'
import { idempotent, idempotentFlow, UNSCOPED, type HttpResult, type IdempotentRequest } from '../express/index.js'
import { sql } from 'kysely'
import { createIdempotency, fingerprint, type Idempotency } from '../index.js'
import { openDatabase } from './support/databases.js'
import { gate, itWhere, openFixture, targetsFor, type Fixture } from './support/harness.js'

const EXPRESS = { 'express 5': express5, 'express 4': express4 }

interface Charge {
  readonly id?: string
  readonly amount?: number
  readonly behave?: 'throw' | 'hold' | 'huge'
}

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('express helper', ['statement-paths'])) {
  for (const [version, express] of Object.entries(EXPRESS)) {
    describe(`express helper: ${target.id}, ${version}`, () => {
      let fx: Fixture
      let server: Server
      let base: string
      const uploads = mkdtempSync(join(tmpdir(), 'kidem-uploads-'))
      afterAll(() => rmSync(uploads, { recursive: true, force: true }))
      const held = { entered: gate(), release: gate() }

      /** The test API: its routes record each side effect in the fixture's effects table. */
      function build(idempotency: Idempotency<any>) {
        const app = express()
        app.use(express.json(), express.urlencoded({ extended: true }))
        // The stripe SDK's calls lose their first answer: the response is committed, then the
        // socket dies, and the SDK retries with the same key.
        const dropped = new Set<string>()
        app.use((req, res, next) => {
          const sdkKey = req.path === '/v1/customers' ? req.get('idempotency-key') : undefined
          const drop = sdkKey !== undefined && !dropped.has(sdkKey)
          if (sdkKey) dropped.add(sdkKey)
          if (drop) res.send = () => (req.socket.destroy(), res)
          next()
        })
        const charge = async (req: IdempotentRequest, trx: Parameters<Fixture['effect']>[0]): Promise<HttpResult> => {
          const body = (req.body ?? {}) as Charge
          await fx.effect(trx, `charge:${body.id}`)
          if (body.behave === 'throw') throw new Error('handler failed')
          if (body.behave === 'hold') {
            held.entered.open()
            await held.release.promise
          }
          if (body.behave === 'huge') return { status: 201, body: { padding: 'x'.repeat(2048) } }
          return {
            status: 201,
            body: { id: body.id ?? null, amount: body.amount ?? null, at: Math.random() },
            headers: { Location: `/charges/${body.id}` },
          }
        }
        const scope = (req: { get(name: string): string | undefined }) => req.get('x-user') ?? 'anonymous'
        app.post('/charges', idempotent(idempotency, { scope, required: true }, charge))
        app.post('/optional', idempotent(idempotency, { scope }, charge))
        app.get('/charges', idempotent(idempotency, { scope, required: true }, charge))
        app.post('/small', idempotent(idempotency, { scope, maxStoredBytes: 1024 }, charge))
        app.post(
          '/fingerprint',
          idempotent(idempotency, { scope: UNSCOPED, ignoreBodyFields: ['sentAt'], fingerprintHeaders: ['X-Currency'] }, charge),
        )
        const rides = idempotentFlow(idempotency, { scope, maxStoredBytes: 1024 }, async (req, flow) => {
          const body = req.body as { id: string; behave?: string }
          const ride = await flow.phase('ride_created', async (trx) => (await fx.effect(trx, `ride:${body.id}`), { id: body.id }))
          const paid = await flow.step('charge_created', async () => ({ charge: flow.stepKey('charge_created') }))
          if (body.behave === '503') return { status: 503, body: { error: 'provider down' } }
          if (body.behave === 'decline') flow.fail({ status: 402, body: { error: 'card declined' } })
          if (body.behave === 'fail-cookie') flow.fail({ status: 402, body: { error: 'declined' }, headers: { 'Set-Cookie': 'session=abc' } })
          if (body.behave === 'fail-503') flow.fail({ status: 503, body: { error: 'provider down' } })
          if (body.behave === 'fail-huge') flow.fail({ status: 402, body: { padding: 'x'.repeat(2048) } })
          if (body.behave === 'fail-status') flow.fail({ status: 42, body: {} })
          return { status: 201, body: { ...ride, ...paid } }
        })
        app.post('/rides', rides)
        app.post('/numeric', idempotent(idempotency, { scope: (req) => Number(req.get('x-user-id')) }, charge))
        app.post(
          '/answers-itself',
          idempotent(idempotency, { scope: UNSCOPED }, async (req, trx) => {
            await fx.effect(trx, 'answered-itself')
            req.res!.status(200).json({ sent: 'by the handler' })
            return { status: 201, body: { sent: 'by the route' } }
          }),
        )
        // Files beside the fields: multer in memory and on disk.
        const uploaded =
          (storage: string) =>
          async (req: IdempotentRequest, trx: Parameters<Fixture['effect']>[0]): Promise<HttpResult> => {
            await fx.effect(trx, `upload:${storage}:${(req.body as { title: string }).title}`)
            return { status: 201, body: { title: (req.body as { title: string }).title, at: Math.random() } }
          }
        app.post(
          '/uploads/memory',
          multer({ storage: multer.memoryStorage() }).single('file'),
          idempotent(idempotency, { scope: UNSCOPED }, uploaded('memory')),
        )
        app.post('/uploads/disk', multer({ dest: uploads }).array('files'), idempotent(idempotency, { scope: UNSCOPED }, uploaded('disk')))
        app.post('/no-user', idempotent(idempotency, { scope: (req) => (req as { user?: { id: string } }).user?.id as string }, charge))
        app.post(
          '/v1/customers',
          idempotent(idempotency, { scope: (req) => req.get('authorization') ?? '' }, async (req, trx) => {
            const { email } = req.body as { email: string }
            await fx.effect(trx, `customer:${email}`)
            return { status: 200, body: { id: `cus_${Math.random().toString(36).slice(2)}`, object: 'customer', email } }
          }),
        )
        app.use((err: Error, _req: unknown, res: { status(n: number): { json(b: unknown): void } }, _next: unknown) => {
          res.status(500).json({ error: err.message })
        })
        return app
      }

      async function listen(app: ReturnType<typeof build>): Promise<Server> {
        const server = app.listen(0, '127.0.0.1')
        await new Promise((resolve) => server.once('listening', resolve))
        return server
      }

      beforeEach(async () => {
        fx = await openFixture(target, { conflictWait: 500 })
        held.entered = gate()
        held.release = gate()
        server = await listen(build(fx.idempotency))
        base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
      })
      afterEach(async () => {
        held.release.open()
        server.closeAllConnections()
        await new Promise((resolve) => server.close(resolve))
        await fx.close()
      })

      const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
        fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) })

      async function expectProblem(response: Response, status: number, code: string) {
        expect(response.status).toBe(status)
        expect(response.headers.get('content-type')).toMatch(/^application\/problem\+json/)
        const problem = (await response.json()) as Record<string, unknown>
        expect(problem).toMatchObject({ type: `urn:kysely-idempotency:${code}`, status })
        expect(problem.title).toEqual(expect.any(String))
        expect(problem.detail).toEqual(expect.any(String))
        return problem
      }

      it('refuses a handler that sends its answer itself, before anything commits, and never crashes', async () => {
        for (let i = 0; i < 2; i++) {
          const answered = await post('/answers-itself', {}, { 'Idempotency-Key': 'self' })
          // The client has what the handler sent; the route stored nothing and rolled its writes back.
          expect(answered.status).toBe(200)
          expect(await answered.json()).toEqual({ sent: 'by the handler' })
        }
        expect(await fx.effects('answered-itself')).toBe(0)
        expect(await fx.rows()).toBe(0)
        expect((await post('/charges', { id: 'after' }, { 'Idempotency-Key': 'after' })).status).toBe(201)
      })

      it('fingerprints the files multer keeps beside the fields, in memory and on disk: another file is another request', async () => {
        for (const [storage, field] of [
          ['memory', 'file'],
          ['disk', 'files'],
        ] as const) {
          const send = (title: string, content: string) => {
            const form = new FormData()
            form.append('title', title)
            form.append(field, new Blob([content], { type: 'text/plain' }), 'notes.txt')
            return fetch(`${base}/uploads/${storage}`, { method: 'POST', headers: { 'Idempotency-Key': `up-${storage}` }, body: form })
          }
          const first = await send('first', 'abc')
          expect(first.status, storage).toBe(201)
          const retry = await send('first', 'abc')
          expect(retry.headers.get('idempotency-replayed'), storage).toBe('true')
          expect(await retry.text()).toBe(await first.text())
          expect((await send('first', 'abd')).status, storage).toBe(422)
          expect(await fx.effects(`upload:${storage}:first`)).toBe(1)
        }
      })

      it('keeps the cookies that middleware before the route set beside those of the answer', async () => {
        const app = express()
        app.use((_req, res, next) => (res.append('Set-Cookie', 'csrf=token'), next()))
        app.post(
          '/cookies',
          idempotent(
            fx.idempotency,
            { scope: UNSCOPED },
            async (_req, trx) => (await fx.effect(trx, 'cookies'), { status: 201, headers: { 'Set-Cookie': 'seen=1' } }),
          ),
        )
        const server = await listen(app as unknown as ReturnType<typeof build>)
        try {
          const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/cookies`
          const answer = await fetch(url, { method: 'POST', headers: { 'Idempotency-Key': 'cookies' } })
          expect(answer.status).toBe(201)
          expect(answer.headers.getSetCookie()).toEqual(['csrf=token', 'seen=1'])
          // The replay has the middleware's cookie, and not the answer's, which is not stored.
          expect((await fetch(url, { method: 'POST', headers: { 'Idempotency-Key': 'cookies' } })).headers.getSetCookie()).toEqual(['csrf=token'])
        } finally {
          server.closeAllConnections()
          await new Promise((resolve) => server.close(resolve))
        }
      })

      it('refuses a body that no body parser read, instead of leaving it out of the fingerprint', async () => {
        // No parser for text/plain before the route: another amount must never be replayed the first answer.
        const text = (amount: string) =>
          fetch(`${base}/charges`, { method: 'POST', headers: { 'content-type': 'text/plain', 'Idempotency-Key': 'unparsed' }, body: amount })
        for (const amount of ['100', '999']) {
          const refused = await text(amount)
          expect(refused.status).toBe(500)
          expect(((await refused.json()) as { error: string }).error).toMatch(
            /has a body \(text\/plain\) that no body parser read before the idempotent route.*express\.text\(\)/,
          )
        }
        // And with no parser mounted at all.
        const bare = express()
        bare.post(
          '/charges',
          idempotent(
            fx.idempotency,
            { scope: UNSCOPED },
            async (req, trx) => (await fx.effect(trx, 'bare'), { status: 201, body: req.body ?? null }),
          ),
        )
        bare.use((err: Error, _req: unknown, res: { status(n: number): { json(b: unknown): void } }, _next: unknown) =>
          res.status(500).json({ error: err.message }),
        )
        const server = await listen(bare as unknown as ReturnType<typeof build>)
        try {
          const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/charges`
          const refused = await fetch(url, {
            method: 'POST',
            headers: { 'content-type': 'application/json', 'Idempotency-Key': 'bare' },
            body: '{"amount":1}',
          })
          expect(refused.status).toBe(500)
          expect(((await refused.json()) as { error: string }).error).toMatch(/no body parser read/)
          // A request without a body needs no parser.
          expect((await fetch(url, { method: 'POST', headers: { 'Idempotency-Key': 'empty' } })).status).toBe(201)
        } finally {
          server.closeAllConnections()
          await new Promise((resolve) => server.close(resolve))
        }
        expect(await fx.effects('charge:undefined')).toBe(0)
        expect(await fx.effects('bare')).toBe(1)
      })

      itWhere(target, 'processes')('answers 409 with Retry-After while the same key is in flight', async () => {
        // A second app process with its own connection (SQLite: its own handle on the file).
        const db = openDatabase(target.driver, fx.location, 2, 300)
        const other = await listen(
          build(createIdempotency({ db, tableName: fx.table, conflictWait: 500, ...(target.dialect ? { dialect: target.dialect() } : {}) })),
        )
        try {
          const first = post('/charges', { id: 'slow', behave: 'hold' }, { 'Idempotency-Key': 'slow' })
          await held.entered.promise
          const url = `http://127.0.0.1:${(other.address() as AddressInfo).port}/charges`
          const second = await fetch(url, {
            method: 'POST',
            headers: { 'content-type': 'application/json', 'Idempotency-Key': 'slow' },
            body: JSON.stringify({ id: 'slow', behave: 'hold' }),
          })
          expect(second.headers.get('retry-after')).toBe('1')
          await expectProblem(second, 409, 'conflict')
          held.release.open()
          expect((await first).status).toBe(201)
        } finally {
          other.closeAllConnections()
          await new Promise((resolve) => other.close(resolve))
          await db.destroy()
        }
      })

      it('passes a thrown error to Express and stores nothing, so a retry runs', async () => {
        const failed = await post('/charges', { id: 't', behave: 'throw' }, { 'Idempotency-Key': 'throws' })
        expect(failed.status).toBe(500)
        expect(await failed.json()).toEqual({ error: 'handler failed' })
        expect(await fx.effects('charge:t')).toBe(0)
        expect(await fx.rows()).toBe(0)
      })

      it('leaves other methods and key-less optional requests alone', async () => {
        for (let i = 0; i < 2; i++) {
          const r = await fetch(`${base}/charges`, { headers: { 'Idempotency-Key': 'get' } })
          expect(r.status).toBe(201)
          expect((await post('/optional', { id: 'o' })).headers.get('idempotency-replayed')).toBeNull()
        }
        expect(await fx.effects('charge:undefined')).toBe(2)
        expect(await fx.effects('charge:o')).toBe(2)
        expect(await fx.rows()).toBe(0)
      })

      it('refuses to store a response over maxStoredBytes', async () => {
        await expectProblem(await post('/small', { id: 'huge', behave: 'huge' }, { 'Idempotency-Key': 'huge' }), 500, 'response_too_large')
        expect(await fx.effects('charge:huge')).toBe(0)
      })

      it('fingerprints form bodies, chosen headers and all but ignored fields', async () => {
        const form = (amount: string) =>
          fetch(`${base}/fingerprint`, { method: 'POST', headers: { 'Idempotency-Key': 'form' }, body: new URLSearchParams({ id: 'f', amount }) })
        expect((await form('1')).status).toBe(201)
        expect((await form('1')).headers.get('idempotency-replayed')).toBe('true')
        expect((await form('2')).status).toBe(422)

        const json = (sentAt: number, currency: string) =>
          post('/fingerprint', { id: 'g', sentAt }, { 'Idempotency-Key': 'json', 'X-Currency': currency })
        expect((await json(1, 'eur')).status).toBe(201)
        expect((await json(2, 'eur')).headers.get('idempotency-replayed')).toBe('true')
        expect((await json(3, 'usd')).status).toBe(422)
      })

      it('runs atomic-phase flows: replay, 5xx resumes later, fail() is replayed', async () => {
        const ride = (id: string, behave?: string) => post('/rides', { id, behave }, { 'Idempotency-Key': `ride-${id}` })
        const first = await ride('r1')
        expect(first.status).toBe(201)
        const again = await ride('r1')
        expect(again.headers.get('idempotency-replayed')).toBe('true')
        expect(await again.json()).toEqual(await first.json())

        expect((await ride('r2', '503')).status).toBe(503)
        expect((await ride('r2', '503')).headers.get('idempotency-replayed')).toBeNull()
        expect(await fx.effects('ride:r2')).toBe(1)

        expect((await ride('r3', 'decline')).status).toBe(402)
        const declined = await ride('r3', 'decline')
        expect(declined.status).toBe(402)
        expect(declined.headers.get('idempotency-replayed')).toBe('true')
      })

      it('applies the storage rules to answers given with flow.fail(), as to returned ones', async () => {
        const ride = (id: string, behave: string) => post('/rides', { id, behave }, { 'Idempotency-Key': `ride-${id}` })
        const declined = await ride('c', 'fail-cookie')
        expect(declined.status).toBe(402)
        expect(declined.headers.get('set-cookie')).toBe('session=abc')
        const replayed = await ride('c', 'fail-cookie')
        expect(replayed.headers.get('idempotency-replayed')).toBe('true')
        expect(replayed.headers.get('set-cookie')).toBeNull()

        // A 5xx is sent, not stored: the lock is released and the recorded phases stay.
        expect((await ride('u', 'fail-503')).status).toBe(503)
        const retried = await ride('u', 'fail-503')
        expect(retried.status).toBe(503)
        expect(retried.headers.get('idempotency-replayed')).toBeNull()
        expect(await fx.effects('ride:u')).toBe(1)

        // Refused after its phase and step committed: the problem says they stay, and a retry resumes after them.
        for (let attempt = 0; attempt < 2; attempt++) {
          const huge = await ride('h', 'fail-huge')
          expect(huge.headers.get('idempotency-replayed')).toBeNull()
          const problem = await expectProblem(huge, 500, 'response_too_large')
          expect(problem.detail).toMatch(/the phases and steps the flow recorded stay, and a retry with the same key resumes after them/)
          expect(problem.detail).not.toMatch(/rolled back/)
        }
        expect(await fx.effects('ride:h')).toBe(1)

        expect((await ride('s', 'fail-status')).status).toBe(500)
        expect((await ride('s', 'fail-status')).headers.get('idempotency-replayed')).toBeNull()
        const finished = await fx.db.selectFrom(fx.table).select('key').where('recovery_point', '=', 'finished').execute()
        expect(finished).toHaveLength(1)
      })

      it('takes a numeric scope as its decimal text, and answers a missing one with a 500 that names the option', async () => {
        const first = await post('/numeric', { id: 'n' }, { 'Idempotency-Key': 'n', 'x-user-id': '42' })
        expect(first.status).toBe(201)
        expect((await post('/numeric', { id: 'n' }, { 'Idempotency-Key': 'n', 'x-user-id': '42' })).headers.get('idempotency-replayed')).toBe('true')
        expect((await post('/numeric', { id: 'n' }, { 'Idempotency-Key': 'n', 'x-user-id': '43' })).headers.get('idempotency-replayed')).toBeNull()
        expect(await fx.db.selectFrom(fx.table).select('scope').execute()).toEqual(
          target.database === 'mysql' ? [{ scope: Buffer.from('42') }, { scope: Buffer.from('43') }] : [{ scope: '42' }, { scope: '43' }],
        )

        const anonymous = await post('/no-user', { id: 'a' }, { 'Idempotency-Key': 'a' })
        expect(anonymous.status).toBe(500)
        expect(((await anonymous.json()) as { error: string }).error).toMatch(/scope option returned undefined/)
        expect(await fx.effects('charge:a')).toBe(0)
      })

      it('tells bodies apart by a __proto__ field', async () => {
        const raw = (body: string) =>
          fetch(`${base}/charges`, { method: 'POST', headers: { 'content-type': 'application/json', 'Idempotency-Key': 'proto' }, body })
        expect((await raw('{"id":"p","__proto__":{"amount":1}}')).status).toBe(201)
        expect((await raw('{"id":"p","__proto__":{"amount":1}}')).headers.get('idempotency-replayed')).toBe('true')
        await expectProblem(await raw('{"id":"p","__proto__":{"amount":2}}'), 422, 'key_reuse')
      })

      it('replays answers stored before bodies were kept as bytes', async () => {
        const request = { method: 'POST', url: '/charges', body: { id: 'legacy' }, headers: {} }
        await fx.db
          .insertInto(fx.table)
          .values({
            scope: 'anonymous',
            key: 'legacy',
            fingerprint: fingerprint(request),
            recovery_point: 'finished',
            // As JSON text whatever the driver makes of a JSON parameter (postgres.js would encode a string).
            response: fx.idempotency.dialect.json(
              sql.val(JSON.stringify({ status: 201, headers: { Location: '/charges/legacy' }, body: { id: 'legacy', amount: null } })),
            ),
            created_at: fx.idempotency.dialect.clock,
            last_run_at: fx.idempotency.dialect.clock,
            expires_at: fx.idempotency.dialect.later(sql.lit(60_000)),
          })
          .execute()
        const replay = await post('/charges', { id: 'legacy' }, { 'Idempotency-Key': 'legacy' })
        expect(replay.status).toBe(201)
        expect(replay.headers.get('idempotency-replayed')).toBe('true')
        expect(replay.headers.get('location')).toBe('/charges/legacy')
        expect(replay.headers.get('content-type')).toMatch(/^application\/json/)
        expect(await replay.json()).toEqual({ id: 'legacy', amount: null })
        expect(await fx.effects()).toBe(0)
      })

      it('gives one side effect per call of the official stripe SDK, which retries dropped connections and 409s', async () => {
        const { port } = server.address() as AddressInfo
        const stripe = new Stripe('sk_test_local', { host: '127.0.0.1', port, protocol: 'http', maxNetworkRetries: 3 })
        const emails = Array.from({ length: 6 }, (_, i) => `c${i}@example.com`)
        const customers = await Promise.all(emails.map((email) => stripe.customers.create({ email })))
        expect(customers.map((c) => c.email)).toEqual(emails)
        for (const email of emails) expect(await fx.effects(`customer:${email}`)).toBe(1)
      })
    })
  }
}
