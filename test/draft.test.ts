/**
 * The normative statements of draft-ietf-httpapi-idempotency-key-header-07, as a table run over
 * every HTTP adapter and every database. Each row quotes what the draft asks and checks it with
 * real requests; the server follows the draft to the letter with `conflictWait: 0`.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { ADAPTER_NAMES, startApp, type App } from './support/apps.js'
import { gate, openFixture, targetsFor, type Fixture } from './support/harness.js'
import { sleep } from './support/util.js'

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('draft-ietf-httpapi-idempotency-key-header-07', ['statement-paths'])) {
  for (const adapter of ADAPTER_NAMES) {
    describe(`draft-ietf-httpapi-idempotency-key-header-07: ${adapter}, ${target.id}`, () => {
      let fx: Fixture
      let server: App
      let release = gate()
      let entered = gate()
      const ttl = 1500

      beforeEach(async () => {
        fx = await openFixture(target)
        release = gate()
        entered = gate()
        server = await startApp(
          adapter,
          fx.idempotency,
          { ttl, conflictWait: 0 },
          {
            orders: async (body, trx) => {
              const order = (body ?? {}) as { item?: string; slow?: boolean }
              await fx.effect(trx, `order:${order.item}`)
              if (order.slow) {
                entered.open()
                await release.promise
              }
              return { status: 201, body: { item: order.item ?? null, id: Math.random() }, headers: { Location: `/orders/${order.item}` } }
            },
          },
        )
      })
      afterEach(async () => {
        release.open()
        await server.close()
        await fx.close()
      })

      const send = (body: unknown, key?: string, method = 'POST') =>
        fetch(`${server.url}/orders`, {
          method,
          headers: { 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }) },
          ...(method === 'GET' ? {} : { body: JSON.stringify(body) }),
        })

      /** A problem document, with the `code` the draft's profile names the case by. */
      async function problem(response: Response, status: number, code: string) {
        expect(response.status).toBe(status)
        expect(response.headers.get('content-type')).toMatch(/^application\/problem\+json/)
        const document = (await response.json()) as { type: string; code: string; title: string; status: number; detail: string }
        expect(document).toMatchObject({ type: expect.stringMatching(/^urn:kysely-idempotency:/), code, title: expect.any(String), status })
        return document
      }

      it('§2.7 a request without the key to an operation that requires it: 400, and nothing runs', async () => {
        await problem(await send({ item: 'a' }), 400, 'missing-key')
        expect(await fx.effects()).toBe(0)
      })

      it('§2.2 a key that is not a Structured Field string: 400, and nothing runs', async () => {
        await problem(await send({ item: 'a' }, '"unterminated'), 400, 'invalid-key')
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
        const reuse = await problem(await send({ item: 'b' }, 'key-2'), 422, 'fingerprint-mismatch')
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
        await problem(concurrent, 409, 'conflict')
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
