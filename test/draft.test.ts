/**
 * The normative statements of draft-ietf-httpapi-idempotency-key-header-07, as a table run over
 * every HTTP adapter and every database. Each row quotes what the draft asks and checks it with
 * real requests; the server follows the draft to the letter with `conflictWait: 0`.
 */
import type { AddressInfo } from 'node:net'
import type { Server } from 'node:http'
import express5 from 'express'
import express4 from 'express4'
import type { Transaction } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { Hono, type Context } from 'hono'
import { idempotent } from '../express/index.js'
import { idempotent as fetchIdempotent } from '../fetch/index.js'
import type { HttpResult } from '../http/index.js'
import type { Idempotency } from '../src/index.js'
import { gate, openFixture, selectedTargets, type Fixture } from './support/harness.js'
import { sleep } from './support/util.js'

/** What the route does, whatever the framework: its body in, an answer out. */
type Handler = (body: unknown, trx: Transaction<any>) => Promise<HttpResult>

/** A running app with one idempotent `POST /orders` (and the same route for `GET`), asked through the Fetch API. */
interface Running {
  fetch(request: Request): Promise<Response>
  close(): Promise<void>
}

interface Adapter {
  readonly name: string
  start(idempotency: Idempotency<any>, options: { ttl: number; conflictWait: number }, handler: Handler): Promise<Running>
}

const expressAdapter = (name: string, express: typeof express5): Adapter => ({
  name,
  async start(idempotency, options, handler) {
    const app = express()
    app.use(express.json())
    const route = idempotent(idempotency, { scope: (req) => req.get('x-user') ?? 'anonymous', required: true, ...options }, (req, trx) =>
      handler(req.body, trx),
    )
    app.post('/orders', route)
    app.get('/orders', route)
    const server: Server = app.listen(0, '127.0.0.1')
    await new Promise((resolve) => server.once('listening', resolve))
    const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
    return {
      fetch: (request) => {
        const url = new URL(request.url)
        return fetch(new Request(base + url.pathname + url.search, request))
      },
      close: async () => {
        server.closeAllConnections()
        await new Promise((resolve) => server.close(resolve))
      },
    }
  },
})

const fetchAdapter: Adapter = {
  name: 'fetch',
  async start(idempotency, options, handler) {
    const route = fetchIdempotent(idempotency, { scope: (request) => request.headers.get('x-user') ?? 'anonymous', required: true, ...options }, async (request, trx) =>
      handler(request.method === 'GET' ? undefined : await request.json(), trx),
    )
    return { fetch: route, close: async () => {} }
  },
}

const honoAdapter: Adapter = {
  name: 'hono',
  async start(idempotency, options, handler) {
    const app = new Hono<{ Variables: { user: string } }>()
    app.use(async (c, next) => {
      c.set('user', c.req.header('x-user') ?? 'anonymous')
      await next()
    })
    const route = fetchIdempotent(idempotency, { scope: (_request, c: Context<{ Variables: { user: string } }>) => c.get('user'), required: true, ...options }, async (request, trx, c) =>
      handler(c.req.method === 'GET' ? undefined : await request.json(), trx),
    )
    app.on(['GET', 'POST'], '/orders', (c) => route(c.req.raw, c))
    return { fetch: (request) => Promise.resolve(app.fetch(request)), close: async () => {} }
  },
}

const ADAPTERS: readonly Adapter[] = [
  expressAdapter('express 5', express5),
  expressAdapter('express 4', express4 as unknown as typeof express5),
  fetchAdapter,
  honoAdapter,
]

for (const target of selectedTargets()) {
  for (const adapter of ADAPTERS) {
    describe(`draft-ietf-httpapi-idempotency-key-header-07: ${adapter.name}, ${target.id}`, () => {
      let fx: Fixture
      let server: Running
      let release = gate()
      let entered = gate()
      const ttl = 1500

      beforeEach(async () => {
        fx = await openFixture(target)
        release = gate()
        entered = gate()
        server = await adapter.start(fx.idempotency, { ttl, conflictWait: 0 }, async (body, trx) => {
          const order = (body ?? {}) as { item?: string; slow?: boolean }
          await fx.effect(trx, `order:${order.item}`)
          if (order.slow) {
            entered.open()
            await release.promise
          }
          return { status: 201, body: { item: order.item ?? null, id: Math.random() }, headers: { Location: `/orders/${order.item}` } }
        })
      })
      afterEach(async () => {
        release.open()
        await server.close()
        await fx.close()
      })

      const send = (body: unknown, key?: string, method = 'POST') =>
        server.fetch(new Request('http://app.test/orders', {
          method,
          headers: { 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }) },
          ...(method === 'GET' ? {} : { body: JSON.stringify(body) }),
        }))

      async function problem(response: Response, status: number) {
        expect(response.status).toBe(status)
        expect(response.headers.get('content-type')).toMatch(/^application\/problem\+json/)
        const document = (await response.json()) as { type: string; title: string; status: number; detail: string }
        expect(document).toMatchObject({ type: expect.stringMatching(/^urn:kysely-idempotency:/), title: expect.any(String), status })
        return document
      }

      it('§2.7 a request without the key to an operation that requires it: 400, and nothing runs', async () => {
        await problem(await send({ item: 'a' }), 400)
        expect(await fx.effects()).toBe(0)
      })

      it('§2.6 a retry after the first request completed: the stored answer, and the operation ran once', async () => {
        const first = await send({ item: 'a' }, 'key-1')
        expect(first.status).toBe(201)
        const stored = await first.text()
        const retry = await send({ item: 'a' }, 'key-1')
        expect(retry.status).toBe(201)
        expect(retry.headers.get('location')).toBe('/orders/a')
        expect(await retry.text()).toBe(stored)
        expect(await fx.effects('order:a')).toBe(1)
      })

      it('§2.7 the key reused with a different payload: 422, and the key still answers its own request', async () => {
        const first = await send({ item: 'a' }, 'key-2')
        const stored = await first.text()
        const reuse = await problem(await send({ item: 'b' }, 'key-2'), 422)
        expect(reuse.detail).toMatch(/different request/)
        expect(await fx.effects('order:b')).toBe(0)
        const again = await send({ item: 'a' }, 'key-2')
        expect(again.status).toBe(201)
        expect(await again.text()).toBe(stored)
      })

      it('§2.7 a retry while the original is still being processed: 409 at once, with Retry-After', async () => {
        const original = send({ item: 'a', slow: true }, 'key-3')
        await entered.promise
        const started = Date.now()
        const concurrent = await send({ item: 'a', slow: true }, 'key-3')
        expect(Date.now() - started).toBeLessThan(1000)
        await problem(concurrent, 409)
        expect(Number(concurrent.headers.get('retry-after'))).toBeGreaterThanOrEqual(1)
        release.open()
        expect((await original).status).toBe(201)
        expect(await fx.effects('order:a')).toBe(1)
      })

      it('§2.2 the key as a Structured Field string and as a bare token name the same key', async () => {
        const bare = await send({ item: 'a' }, 'key-4')
        const quoted = await send({ item: 'a' }, '"key-4"')
        expect(await quoted.text()).toBe(await bare.text())
        expect(await fx.effects('order:a')).toBe(1)
      })

      it('§1 an idempotent method (GET) is left alone: the key is not required, read or stored', async () => {
        for (let i = 0; i < 2; i++) expect((await send(undefined, undefined, 'GET')).status).toBe(201)
        expect((await send(undefined, 'key-5', 'GET')).status).toBe(201)
        expect(await fx.rows()).toBe(0)
      })

      it('§2.3 once the key has expired, the same key is a new request and runs again', async () => {
        const first = await (await send({ item: 'a' }, 'key-6')).json()
        await sleep(ttl + 300)
        const later = await send({ item: 'a' }, 'key-6')
        expect(later.status).toBe(201)
        expect(await later.json()).not.toEqual(first)
        expect(await fx.effects('order:a')).toBe(2)
      })
    })
  }
}
