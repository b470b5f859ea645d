import { createServer, type IncomingMessage, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { Hono, type Context } from 'hono'
import type { Transaction } from 'kysely'
import Stripe from 'stripe'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { idempotent, idempotentFlow, UNSCOPED } from '../fetch/index.js'
import { openFixture, targetsFor, type Fixture } from './support/harness.js'

/** A Node HTTP server in front of a Fetch API handler (what Bun.serve or @hono/node-server do). */
async function serveFetch(handler: (request: Request) => Promise<Response>, drop: (request: Request) => boolean): Promise<Server> {
  const server = createServer(async (req: IncomingMessage, res) => {
    const chunks: Buffer[] = []
    for await (const chunk of req) chunks.push(chunk as Buffer)
    const headers = new Headers()
    for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) headers.append(req.rawHeaders[i]!, req.rawHeaders[i + 1]!)
    const body = chunks.length ? Buffer.concat(chunks) : undefined
    const request = new Request(`http://${req.headers.host}${req.url}`, { method: req.method, headers, ...(body ? { body } : {}) })
    const response = await handler(request)
    if (drop(request)) return req.socket.destroy()
    res.writeHead(response.status, [...response.headers].flat())
    res.end(Buffer.from(await response.arrayBuffer()))
  })
  server.listen(0, '127.0.0.1')
  await new Promise((resolve) => server.once('listening', resolve))
  return server
}

type Env = { Variables: { account: string } }

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('fetch helper', ['statement-paths'])) {
  describe(`fetch helper: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target, { conflictWait: 500 })
    })
    afterEach(async () => {
      await fx.close()
    })

    const post = (body: unknown, headers: Record<string, string> = {}, path = '/charges') =>
      new Request(`http://app.test${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', ...headers },
        body: JSON.stringify(body),
      })

    it('stores a returned Response and replays it byte for byte, reading the body the handler still gets', async () => {
      let calls = 0
      const route = idempotent(fx.idempotency, { scope: (request) => request.headers.get('x-user') ?? '', required: true }, async (request, trx) => {
        calls++
        const { id } = (await request.json()) as { id: string }
        await fx.effect(trx, id)
        const headers = new Headers({ 'Content-Type': 'text/csv; charset=latin1', Location: `/charges/${id}` })
        headers.append('Set-Cookie', 'a=1')
        headers.append('Set-Cookie', 'b=2')
        return new Response(new Uint8Array([0xe9, 0x2c, 0x0a, 0xff]), { status: 201, headers })
      })
      const first = await route(post({ id: 'c1' }, { 'idempotency-key': 'k1', 'x-user': 'u' }))
      expect(first.status).toBe(201)
      expect(first.headers.getSetCookie()).toEqual(['a=1', 'b=2'])
      expect([...new Uint8Array(await first.arrayBuffer())]).toEqual([0xe9, 0x2c, 0x0a, 0xff])
      const again = await route(post({ id: 'c1' }, { 'idempotency-key': '"k1"', 'x-user': 'u' }))
      expect(again.status).toBe(201)
      expect(again.headers.get('idempotency-replayed')).toBe('true')
      expect(again.headers.get('content-type')).toBe('text/csv; charset=latin1')
      expect(again.headers.get('location')).toBe('/charges/c1')
      // Set-Cookie is sent once and never stored, so a replay cannot hand a session on.
      expect(again.headers.getSetCookie()).toEqual([])
      expect([...new Uint8Array(await again.arrayBuffer())]).toEqual([0xe9, 0x2c, 0x0a, 0xff])
      expect(calls).toBe(1)
      const reused = await route(post({ id: 'c2' }, { 'idempotency-key': 'k1', 'x-user': 'u' }))
      expect(reused.status).toBe(422)
      expect(reused.headers.get('content-type')).toBe('application/problem+json')
    })

    it('passes the arguments after the request, typed, to scope and handler (Hono), and runs 20 concurrent duplicates once', async () => {
      const app = new Hono<Env>()
      app.use(async (c, next) => {
        c.set('account', c.req.header('authorization') ?? 'nobody')
        await next()
      })
      const charges = idempotent(
        fx.idempotency,
        { scope: (_request, c: Context<Env>) => c.get('account'), required: true },
        async (request, trx, c) => {
          const body = (await request.json()) as { id: string }
          await fx.effect(trx, `${c.get('account')}:${body.id}`)
          return { status: 201, body: { id: body.id, account: c.get('account'), at: Math.random() } }
        },
      )
      app.post('/charges', (c) => charges(c.req.raw, c))
      const send = (account: string) => app.request(post({ id: 'x' }, { 'idempotency-key': 'same', authorization: account }))
      const answers = await Promise.all(Array.from({ length: 20 }, () => send('acct_1')))
      const bodies = await Promise.all(answers.map((a) => a.text()))
      expect(answers.map((a) => a.status)).toEqual(Array(20).fill(201))
      expect(new Set(bodies).size).toBe(1)
      expect(answers.filter((a) => a.headers.get('idempotency-replayed') === null)).toHaveLength(1)
      expect(await fx.effects('acct_1:x')).toBe(1)
      // Another account's key of the same name is its own.
      expect(JSON.parse(await (await send('acct_2')).text())).toMatchObject({ account: 'acct_2' })
      expect(await fx.effects('acct_2:x')).toBe(1)
    })

    it('refuses a key header the Fetch API joined from two lines, and throws what the handler throws to the caller', async () => {
      const route = idempotent(fx.idempotency, { scope: UNSCOPED, required: true }, async (request, trx) => {
        const body = (await request.json()) as { behave?: string }
        await fx.effect(trx, 'effect')
        if (body.behave === 'throw') throw new Error('handler failed')
        return { status: 200, body: {} }
      })
      const twice = new Headers({ 'content-type': 'application/json' })
      twice.append('idempotency-key', 'a')
      twice.append('idempotency-key', 'b')
      const repeated = await route(new Request('http://app.test/charges', { method: 'POST', headers: twice, body: '{}' }))
      expect(repeated.status).toBe(400)
      expect(await repeated.json()).toMatchObject({
        type: 'urn:kysely-idempotency:invalid_key',
        detail: expect.stringMatching(/several header lines joined into one/),
      })
      await expect(route(post({ behave: 'throw' }, { 'idempotency-key': 't' }))).rejects.toThrow('handler failed')
      expect(await fx.effects()).toBe(0)
      expect(await fx.rows()).toBe(0)
    })

    it('runs atomic-phases flows: replay, a 5xx resumes later, fail() is replayed', async () => {
      let provider = 0
      const rides = idempotentFlow(fx.idempotency, { scope: UNSCOPED }, async (request, flow) => {
        const body = (await request.json()) as { id: string; behave?: string }
        const ride = await flow.phase('ride_created', async (trx: Transaction<any>) => (await fx.effect(trx, `ride:${body.id}`), { id: body.id }))
        const paid = await flow.step('charge_created', async () => (provider++, { charge: flow.stepKey('charge_created') }))
        if (body.behave === '503') return { status: 503, body: { error: 'provider down' } }
        if (body.behave === 'decline') flow.fail({ status: 402, body: { error: 'card declined' } })
        return new Response(JSON.stringify({ ...ride, ...paid }), { status: 201, headers: { 'content-type': 'application/json' } })
      })
      const first = await rides(post({ id: 'r1', behave: '503' }, { 'idempotency-key': 'r1' }))
      expect(first.status).toBe(503)
      const resumed = await rides(post({ id: 'r1', behave: '503' }, { 'idempotency-key': 'r1' }))
      expect(resumed.status).toBe(503)
      const declined = await rides(post({ id: 'r2', behave: 'decline' }, { 'idempotency-key': 'r2' }))
      expect(declined.status).toBe(402)
      expect((await rides(post({ id: 'r2', behave: 'decline' }, { 'idempotency-key': 'r2' }))).headers.get('idempotency-replayed')).toBe('true')
      const done = await rides(post({ id: 'r3' }, { 'idempotency-key': 'r3' }))
      const replay = await rides(post({ id: 'r3' }, { 'idempotency-key': 'r3' }))
      expect(await replay.text()).toBe(await done.text())
      expect(await fx.effects('ride:r1')).toBe(1)
      expect(provider).toBe(3)
    })

    it('gives one side effect per call of the official stripe SDK against a Hono route, which retries dropped connections and 409s', async () => {
      const app = new Hono()
      const customers = idempotent(fx.idempotency, { scope: (request) => request.headers.get('authorization') ?? '' }, async (request, trx) => {
        const email = new URLSearchParams(await request.text()).get('email')!
        await fx.effect(trx, `customer:${email}`)
        return { status: 200, body: { id: `cus_${Math.random().toString(36).slice(2)}`, object: 'customer', email } }
      })
      app.post('/v1/customers', (c) => customers(c.req.raw))
      const dropped = new Set<string>()
      const server = await serveFetch(
        async (request) => app.fetch(request),
        (request) => {
          const key = request.headers.get('idempotency-key')
          if (!key || dropped.has(key)) return false
          dropped.add(key)
          return true
        },
      )
      try {
        const { port } = server.address() as AddressInfo
        const stripe = new Stripe('sk_test_local', { host: '127.0.0.1', port, protocol: 'http', maxNetworkRetries: 3 })
        const emails = Array.from({ length: 6 }, (_, i) => `c${i}@example.com`)
        const created = await Promise.all(emails.map((email) => stripe.customers.create({ email })))
        expect(created.map((c) => c.email)).toEqual(emails)
        for (const email of emails) expect(await fx.effects(`customer:${email}`)).toBe(1)
      } finally {
        server.closeAllConnections()
        await new Promise((resolve) => server.close(resolve))
      }
    })

    it('reads a streamed Response no further than maxStoredBytes: an endless stream is cancelled, a 500, nothing stored', async () => {
      let pulled = 0
      let cancelled = false
      const endless = () =>
        new ReadableStream<Uint8Array>({
          pull(controller) {
            pulled += 64 * 1024
            controller.enqueue(new Uint8Array(64 * 1024))
          },
          cancel() {
            cancelled = true
          },
        })
      const route = idempotent(fx.idempotency, { scope: UNSCOPED, maxStoredBytes: 256 * 1024 }, async (_request, trx) => {
        await fx.effect(trx, 'stream')
        return new Response(endless(), { status: 200, headers: { 'content-type': 'application/octet-stream' } })
      })
      for (const key of ['s1', 's1']) {
        const refused = await route(post({ id: 'stream' }, { 'idempotency-key': key }))
        expect(refused.status).toBe(500)
        expect(await refused.json()).toMatchObject({ type: 'urn:kysely-idempotency:response_too_large' })
      }
      expect(cancelled).toBe(true)
      // Each attempt read the limit and at most one chunk more, of a stream that never ends.
      expect(pulled).toBeLessThanOrEqual(2 * (256 * 1024 + 3 * 64 * 1024))
      expect(await fx.effects('stream')).toBe(0)
      expect(await fx.rows()).toBe(0)
    })

    it('gives up on a body that stalls after bodyTimeout: a stalled Response is cancelled, a 500, nothing stored; a stalled request is a 408', async () => {
      let cancelled = false
      const stalled = () =>
        new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(new Uint8Array(16))
          },
          cancel() {
            cancelled = true
          },
        })
      const route = idempotent(fx.idempotency, { scope: UNSCOPED, bodyTimeout: 200 }, async (_request, trx) => {
        await fx.effect(trx, 'stalled')
        return new Response(stalled(), { status: 200, headers: { 'content-type': 'application/octet-stream' } })
      })
      const refused = await route(post({ id: 'stalled' }, { 'idempotency-key': 'st1' }))
      expect(refused.status).toBe(500)
      expect(await refused.json()).toMatchObject({ type: 'urn:kysely-idempotency:response_timeout', detail: expect.stringMatching(/rolled back/) })
      expect(cancelled).toBe(true)
      expect(await fx.effects('stalled')).toBe(0)
      expect(await fx.rows()).toBe(0)
      const slowClient = new Request('http://app.test/x', {
        method: 'POST',
        headers: { 'idempotency-key': 'st2' },
        body: stalled(),
        duplex: 'half',
      } as RequestInit)
      expect((await route(slowClient)).status).toBe(408)
      expect(() => idempotent(fx.idempotency, { scope: UNSCOPED, bodyTimeout: 0 }, async () => ({ status: 200 }))).toThrow(RangeError)
    })

    it("works behind Hono's validator, which read the body first: its copy is fingerprinted, and the handler reads c.req.valid()", async () => {
      const { validator } = await import('hono/validator')
      const app = new Hono()
      const charges = idempotent(fx.idempotency, { scope: UNSCOPED, required: true }, async (_request, trx, c: Context) => {
        const { amount } = (c.req as unknown as { valid(target: 'json'): { amount: number } }).valid('json')
        await fx.effect(trx, `validated:${amount}`)
        return { status: 201, body: { amount, at: Math.random() } }
      })
      app.post(
        '/charges',
        validator('json', (value) => value as { amount: number }),
        (c) => charges(c.req.raw, c),
      )
      const send = (amount: number, key: string) =>
        app.request('/charges', {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': key },
          body: JSON.stringify({ amount }),
        })
      const first = await send(5, 'v1')
      expect(first.status).toBe(201)
      const body = await first.text()
      const again = await send(5, 'v1')
      expect(again.headers.get('idempotency-replayed')).toBe('true')
      expect(await again.text()).toBe(body)
      expect((await send(6, 'v1')).status).toBe(422)
      expect(await fx.effects('validated:5')).toBe(1)
      expect(await fx.effects('validated:6')).toBe(0)
    })

    it('fingerprints the parts of a multipart body, not the boundary each client picks anew', async () => {
      let runs = 0
      const route = idempotent(fx.idempotency, { scope: UNSCOPED }, async (request, trx) => {
        runs++
        const form = await request.formData()
        await fx.effect(trx, `upload:${String(form.get('title'))}`)
        return { status: 201, body: { title: form.get('title') } }
      })
      const upload = (title: string, file: string) => {
        const form = new FormData()
        form.append('title', title)
        form.append('file', new Blob([file], { type: 'text/plain' }), 'notes.txt')
        return route(new Request('http://app.test/uploads', { method: 'POST', headers: { 'idempotency-key': 'm1' }, body: form }))
      }
      expect((await upload('first', 'abc')).status).toBe(201)
      const retry = await upload('first', 'abc')
      expect(retry.status).toBe(201)
      expect(retry.headers.get('idempotency-replayed')).toBe('true')
      expect((await upload('second', 'abc')).status).toBe(422)
      expect((await upload('first', 'abd')).status).toBe(422)
      expect(runs).toBe(1)
    })

    it('fingerprints a form that Hono parsed before the route by its fields, not by a re-encoding under a new boundary', async () => {
      let runs = 0
      const app = new Hono()
      const route = idempotent(fx.idempotency, { scope: UNSCOPED }, async (_request, trx, c: Context) => {
        runs++
        const form = await c.req.formData()
        await fx.effect(trx, `hono-form:${String(form.get('title'))}`)
        return { status: 201, body: { title: form.get('title'), at: Math.random() } }
      })
      app.post(
        '/uploads',
        async (c, next) => (await c.req.formData(), next()),
        (c) => route(c.req.raw, c),
      )
      const send = (key: string, body: FormData | URLSearchParams) =>
        app.request('/uploads', { method: 'POST', headers: { 'idempotency-key': key }, body })
      const multipart = (title: string) => {
        const form = new FormData()
        form.append('title', title)
        form.append('file', new Blob(['abc'], { type: 'text/plain' }), 'notes.txt')
        return form
      }
      for (const [key, body] of [
        ['hf1', multipart],
        ['hf2', (title: string) => new URLSearchParams({ title })],
      ] as const) {
        const first = await send(key, body('first'))
        expect(first.status).toBe(201)
        const retry = await send(key, body('first'))
        expect(retry.headers.get('idempotency-replayed')).toBe('true')
        expect(await retry.text()).toBe(await first.text())
        expect((await send(key, body('other'))).status).toBe(422)
      }
      expect(runs).toBe(2)
    })
  })
}
