import type { AddressInfo } from 'node:net'
import multipart from '@fastify/multipart'
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify'
import Stripe from 'stripe'
import { afterEach, beforeEach, describe, expect, expectTypeOf, it } from 'vitest'
import { idempotent, idempotentFlow, UNSCOPED, type HttpResult } from '../fastify/index.js'
import type { Idempotency } from '../index.js'
import { openFixture, targetsFor, type Fixture } from './support/harness.js'

// What an app's authentication adds to every request; the helpers must see it without generics.
declare module 'fastify' {
  interface FastifyRequest {
    user?: { id: string }
  }
}

interface Charge {
  readonly id?: string
  readonly amount?: number
}

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('fastify helper', ['statement-paths'])) {
  describe(`fastify helper: ${target.id}`, () => {
    let fx: Fixture
    let app: FastifyInstance
    let base: string

    /** The test API: its routes record each side effect in the fixture's effects table. */
    function build(idempotency: Idempotency<any>): FastifyInstance {
      // An old path the app still serves: the fingerprint sees the URL as the client sent it.
      const app = Fastify({ rewriteUrl: (request) => (request.url === '/v0/charges' ? '/charges' : request.url!) })
      // Forms as the stripe SDK sends them, and raw bytes; JSON and text are Fastify's own parsers.
      app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string' }, (_request, body, done) =>
        done(null, Object.fromEntries(new URLSearchParams(body as string))),
      )
      app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (_request, body, done) => done(null, body))
      app.decorateRequest('user', undefined)
      app.addHook('onRequest', async (request) => {
        const user = request.headers['x-user']
        if (typeof user === 'string') request.user = { id: user }
      })
      // The stripe SDK's calls lose their first answer: the response is committed, then the
      // socket dies, and the SDK retries with the same key.
      const dropped = new Set<string>()
      app.addHook('onSend', async (request, _reply, payload) => {
        const sdkKey = request.url === '/v1/customers' ? request.headers['idempotency-key'] : undefined
        const drop = typeof sdkKey === 'string' && !dropped.has(sdkKey)
        if (typeof sdkKey === 'string') dropped.add(sdkKey)
        if (drop) request.raw.socket.destroy()
        return payload
      })

      const charge = async (request: FastifyRequest, trx: Parameters<Fixture['effect']>[0]): Promise<HttpResult> => {
        const body = (request.body ?? {}) as Charge
        await fx.effect(trx, `charge:${body.id}`)
        if (request.headers['x-behave'] === 'throw') throw new Error('handler failed')
        return {
          status: 201,
          body: { id: body.id ?? null, amount: body.amount ?? null, at: Math.random() },
          headers: { Location: `/charges/${body.id}` },
        }
      }
      const scope = (request: FastifyRequest) => request.user?.id ?? 'anonymous'

      // Typed as Fastify's own request, augmentations included, without naming a type.
      app.post(
        '/charges',
        idempotent(
          idempotency,
          {
            scope: (request) => {
              expectTypeOf(request).toEqualTypeOf<FastifyRequest>()
              expectTypeOf(request.user).toEqualTypeOf<{ id: string } | undefined>()
              return request.user?.id ?? 'anonymous'
            },
            required: true,
          },
          async (request, trx) => {
            expectTypeOf(request).toEqualTypeOf<FastifyRequest>()
            expectTypeOf(request.body).toEqualTypeOf<FastifyRequest['body']>()
            return charge(request, trx)
          },
        ),
      )
      // A route generic types the body for the handler too.
      app.post<{ Body: Charge }>(
        '/typed',
        idempotent(idempotency, { scope: UNSCOPED }, async (request, trx) => {
          expectTypeOf(request.body).toEqualTypeOf<Charge>()
          return charge(request, trx)
        }),
      )
      app.post('/numeric', idempotent(idempotency, { scope: (request) => Number(request.headers['x-user-id']) }, charge))
      app.post('/no-user', idempotent(idempotency, { scope: (request) => request.user?.id as string }, charge))
      app.post(
        '/echo',
        idempotent(idempotency, { scope: UNSCOPED }, async (request, trx) => {
          await fx.effect(trx, 'echo')
          return { status: 200, body: { body: Buffer.isBuffer(request.body) ? [...request.body] : request.body } }
        }),
      )
      app.post(
        '/rides',
        idempotentFlow(idempotency, { scope }, async (request, flow) => {
          const body = request.body as { id: string; behave?: string }
          const ride = await flow.phase('ride_created', async (trx) => (await fx.effect(trx, `ride:${body.id}`), { id: body.id }))
          const paid = await flow.step('charge_created', async () => ({ charge: flow.stepKey('charge_created') }))
          if (body.behave === '503') return { status: 503, body: { error: 'provider down' } }
          if (body.behave === 'decline') flow.fail({ status: 402, body: { error: 'card declined' }, headers: { 'Set-Cookie': 'session=abc' } })
          return { status: 201, body: { ...ride, ...paid, at: Math.random() } }
        }),
      )
      app.post(
        '/v1/customers',
        idempotent(idempotency, { scope: (request) => request.headers.authorization ?? '' }, async (request, trx) => {
          const { email } = request.body as { email: string }
          await fx.effect(trx, `customer:${email}`)
          return { status: 200, body: { id: `cus_${Math.random().toString(36).slice(2)}`, object: 'customer', email } }
        }),
      )
      return app
    }

    beforeEach(async () => {
      fx = await openFixture(target, { conflictWait: 500 })
      app = build(fx.idempotency)
      await app.listen({ port: 0, host: '127.0.0.1' })
      base = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
    })
    afterEach(async () => {
      app.server.closeAllConnections()
      await app.close()
      await fx.close()
    })

    const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
      fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) })

    async function expectProblem(response: Response, status: number, code: string) {
      expect(response.status).toBe(status)
      expect(response.headers.get('content-type')).toBe('application/problem+json')
      const problem = (await response.json()) as Record<string, unknown>
      expect(problem).toMatchObject({ type: `urn:kysely-idempotency:${code}`, status })
      expect(problem.title).toEqual(expect.any(String))
      expect(problem.detail).toEqual(expect.any(String))
      return problem
    }

    it('answers 422 to the same key with another body or URL', async () => {
      await post('/charges', { id: 'r', amount: 1 }, { 'Idempotency-Key': 'reuse' })
      await expectProblem(await post('/charges', { id: 'r', amount: 2 }, { 'Idempotency-Key': 'reuse' }), 422, 'key_reuse')
      await expectProblem(await post('/charges?test=1', { id: 'r', amount: 1 }, { 'Idempotency-Key': 'reuse' }), 422, 'key_reuse')
      await expectProblem(await post('/v0/charges', { id: 'r', amount: 1 }, { 'Idempotency-Key': 'reuse' }), 422, 'key_reuse')
      expect(await fx.effects('charge:r')).toBe(1)
    })

    it("passes a thrown error to Fastify's error handler and stores nothing, so a retry runs", async () => {
      const failed = await post('/charges', { id: 't' }, { 'Idempotency-Key': 'throws', 'x-behave': 'throw' })
      expect(failed.status).toBe(500)
      expect(await failed.json()).toMatchObject({ statusCode: 500, message: 'handler failed' })
      expect(await fx.effects('charge:t')).toBe(0)
      expect(await fx.rows()).toBe(0)
      const retry = await post('/charges', { id: 't' }, { 'Idempotency-Key': 'throws' })
      expect(retry.status).toBe(201)
      expect(retry.headers.get('idempotency-replayed')).toBeNull()
      expect(await fx.effects('charge:t')).toBe(1)
    })

    it('fingerprints multipart parts @fastify/multipart attaches, files by their bytes, and refuses a body it left unread', async () => {
      const uploads = Fastify()
      let runs = 0
      const route = idempotent(fx.idempotency, { scope: UNSCOPED }, async (request, trx) => {
        runs++
        await fx.effect(trx, `fastify-upload:${request.url}`)
        return { status: 201, body: { at: Math.random() } }
      })
      for (const attach of [true, 'keyValues', false] as const) {
        await uploads.register(async (scoped) => {
          await scoped.register(multipart, { attachFieldsToBody: attach })
          scoped.post(`/uploads/${String(attach)}`, route)
        })
      }
      await uploads.listen({ port: 0, host: '127.0.0.1' })
      try {
        const url = `http://127.0.0.1:${(uploads.server.address() as AddressInfo).port}`
        const send = (attach: boolean | string, content: string) => {
          const form = new FormData()
          form.append('title', 'notes')
          form.append('file', new Blob([content], { type: 'text/plain' }), 'notes.txt')
          return fetch(`${url}/uploads/${attach}`, { method: 'POST', headers: { 'Idempotency-Key': `up-${attach}` }, body: form })
        }
        for (const attach of ['true', 'keyValues']) {
          const first = await send(attach, 'abc')
          expect(first.status, attach).toBe(201)
          const retry = await send(attach, 'abc')
          expect(retry.headers.get('idempotency-replayed'), attach).toBe('true')
          expect(await retry.text()).toBe(await first.text())
          expect((await send(attach, 'abd')).status, attach).toBe(422)
        }
        // Parts left for the handler to stream: the route cannot see them, so it refuses to guess.
        const unread = await send('false', 'abc')
        expect(unread.status).toBe(500)
        expect(runs).toBe(2)
        expect(await fx.rows()).toBe(2)
      } finally {
        await uploads.close()
      }
    })

    it('keeps scopes apart, takes a numeric scope as its decimal text, and answers a missing one with a 500 that names the option', async () => {
      const a = await post('/charges', { id: 's' }, { 'Idempotency-Key': 'shared', 'x-user': 'alice' })
      const b = await post('/charges', { id: 's' }, { 'Idempotency-Key': 'shared', 'x-user': 'bob' })
      expect(b.headers.get('idempotency-replayed')).toBeNull()
      expect(await a.text()).not.toBe(await b.text())

      expect((await post('/numeric', { id: 'n' }, { 'Idempotency-Key': 'n', 'x-user-id': '42' })).status).toBe(201)
      expect((await post('/numeric', { id: 'n' }, { 'Idempotency-Key': 'n', 'x-user-id': '42' })).headers.get('idempotency-replayed')).toBe('true')
      expect((await post('/numeric', { id: 'n' }, { 'Idempotency-Key': 'n', 'x-user-id': '43' })).headers.get('idempotency-replayed')).toBeNull()
      const scopes = await fx.db.selectFrom(fx.table).select('scope').where('key', '=', 'n').orderBy('scope').execute()
      expect(scopes.map((row) => String(row.scope))).toEqual(['42', '43'])

      const anonymous = await post('/no-user', { id: 'a' }, { 'Idempotency-Key': 'a' })
      expect(anonymous.status).toBe(500)
      expect(((await anonymous.json()) as { message: string }).message).toMatch(/scope option returned undefined/)
      expect(await fx.effects('charge:a')).toBe(0)
    })

    it("fingerprints what Fastify's parsers left: forms, text and bytes", async () => {
      const send = (type: string, body: string | Uint8Array, key: string) =>
        fetch(`${base}/echo`, { method: 'POST', headers: { 'content-type': type, 'Idempotency-Key': key }, body })
      const cases: Array<[string, string | Uint8Array, string | Uint8Array, unknown]> = [
        ['application/x-www-form-urlencoded', 'id=f&amount=1', 'id=f&amount=2', { id: 'f', amount: '1' }],
        ['text/plain', 'some text', 'other text', 'some text'],
        ['application/octet-stream', new Uint8Array([1, 2, 3]), new Uint8Array([1, 2, 4]), [1, 2, 3]],
      ]
      for (const [type, body, other, seen] of cases) {
        const first = await send(type, body, type)
        expect(await first.json()).toEqual({ body: seen })
        expect((await send(type, body, type)).headers.get('idempotency-replayed')).toBe('true')
        await expectProblem(await send(type, other, type), 422, 'key_reuse')
      }
      expect(await fx.effects('echo')).toBe(3)
    })

    it('runs atomic-phase flows: replay, a 5xx resumes later, fail() is replayed without its Set-Cookie', async () => {
      const ride = (id: string, behave?: string) => post('/rides', { id, behave }, { 'Idempotency-Key': `ride-${id}` })
      const first = await ride('r1')
      expect(first.status).toBe(201)
      const again = await ride('r1')
      expect(again.headers.get('idempotency-replayed')).toBe('true')
      expect(await again.text()).toBe(await first.text())

      expect((await ride('r2', '503')).status).toBe(503)
      const resumed = await ride('r2', '503')
      expect(resumed.status).toBe(503)
      expect(resumed.headers.get('idempotency-replayed')).toBeNull()
      expect(await fx.effects('ride:r2')).toBe(1)

      const declined = await ride('r3', 'decline')
      expect(declined.status).toBe(402)
      expect(declined.headers.get('set-cookie')).toBe('session=abc')
      const replayed = await ride('r3', 'decline')
      expect(replayed.status).toBe(402)
      expect(replayed.headers.get('idempotency-replayed')).toBe('true')
      expect(replayed.headers.get('set-cookie')).toBeNull()
      expect(await replayed.text()).toBe(await declined.text())
    })

    it('gives one side effect per call of the official stripe SDK, which retries dropped connections and 409s', async () => {
      const { port } = app.server.address() as AddressInfo
      const stripe = new Stripe('sk_test_local', { host: '127.0.0.1', port, protocol: 'http', maxNetworkRetries: 3 })
      const emails = Array.from({ length: 6 }, (_, i) => `c${i}@example.com`)
      const customers = await Promise.all(emails.map((email) => stripe.customers.create({ email })))
      expect(customers.map((c) => c.email)).toEqual(emails)
      for (const email of emails) expect(await fx.effects(`customer:${email}`)).toBe(1)
    })
  })
}
