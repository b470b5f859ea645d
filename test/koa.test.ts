/**
 * What only the Koa adapter does; the shared behaviour is in test/http.test.ts, which runs Koa too.
 */
import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { bodyParser } from '@koa/bodyparser'
import multer from '@koa/multer'
import Koa, { type Context } from 'koa'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { IdempotencySetupError } from '../index.js'
import { idempotent, idempotentFlow, type HttpResult } from '../koa/index.js'
import { openFixture, targetsFor, type Fixture } from './support/harness.js'

interface Order {
  readonly item?: string
  readonly behave?: 'throw' | 'self' | 'empty'
}

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('koa adapter', ['statement-paths'])) {
  describe(`koa adapter: ${target.id}`, () => {
    let fx: Fixture
    let server: Server
    let base: string
    /** What reached the app's own error handling, the middleware upstream of the routes. */
    let caught: unknown[]

    beforeEach(async () => {
      fx = await openFixture(target)
      caught = []
      const app = new Koa()
      app.silent = true
      app.use(async (ctx, next) => {
        try {
          await next()
        } catch (error) {
          caught.push(error)
          ctx.status = 500
          ctx.body = { caught: error instanceof Error ? error.constructor.name : String(error) }
        }
      })
      const order = async (ctx: Context, body: unknown, trx: Parameters<Fixture['effect']>[0]): Promise<HttpResult> => {
        const { item, behave } = (body ?? {}) as Order
        await fx.effect(trx, `order:${item}`)
        if (behave === 'throw') throw new Error('the handler failed')
        if (behave === 'self') ctx.body = { answered: 'by itself' }
        if (behave === 'empty') return { status: 201, headers: { 'X-Item': String(item), 'Set-Cookie': 'seen=1' } }
        return { status: 201, body: { item, at: Math.random() } }
      }
      const options = { scope: (ctx: Context) => ctx.get('x-user') || 'anonymous', required: true }
      const parsed = idempotent(idempotency(), options, (ctx, trx) => order(ctx, ctx.request.body, trx))
      const upload = multer().single('file')
      const uploaded = idempotent(idempotency(), options, (ctx, trx) =>
        order(ctx, { item: `${(ctx.request.body as Order).item}:${ctx.file?.originalname}` }, trx),
      )
      const flow = idempotentFlow(idempotency(), options, async (ctx, flow) => {
        const item = (ctx.request.body as Order).item
        await flow.phase('order', (trx) => fx.effect(trx, `ride:${item}`))
        return { status: 202, body: { item } }
      })
      const parser = bodyParser()
      app.use(async (ctx, next) => {
        if (ctx.path === '/orders') return parser(ctx, () => parsed(ctx, next))
        if (ctx.path === '/unparsed') return parsed(ctx, next)
        if (ctx.path === '/upload') return upload(ctx, () => uploaded(ctx, next))
        if (ctx.path === '/rides') return parser(ctx, () => flow(ctx, next))
        if (ctx.path === '/typed') {
          // Middleware before the route that set a JSON type and a cookie of its own.
          ctx.type = 'json'
          ctx.append('Set-Cookie', 'csrf=token')
          return parser(ctx, () => parsed(ctx, next))
        }
        return next()
      })
      server = app.listen(0, '127.0.0.1')
      await new Promise((resolve) => server.once('listening', resolve))
      base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
    })
    afterEach(async () => {
      server.closeAllConnections()
      await new Promise((resolve) => server.close(resolve))
      await fx.close()
    })

    const idempotency = () => fx.idempotency
    const post = (path: string, body: unknown, key: string) =>
      fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': key }, body: JSON.stringify(body) })

    it("passes a thrown error to the app's own error handling, stores nothing, and lets a retry run", async () => {
      const failed = await post('/orders', { item: 'a', behave: 'throw' }, 'k')
      expect(failed.status).toBe(500)
      expect(caught).toHaveLength(1)
      expect((caught[0] as Error).message).toBe('the handler failed')
      expect(await fx.rows()).toBe(0)
      expect((await post('/orders', { item: 'a' }, 'k')).status).toBe(201)
      expect(await fx.effects('order:a')).toBe(1)
    })

    it('refuses a body that no body parser read, naming the parser to mount, and runs nothing', async () => {
      const refused = await post('/unparsed', { item: 'a' }, 'k')
      expect(refused.status).toBe(500)
      expect(caught[0]).toBeInstanceOf(IdempotencySetupError)
      expect((caught[0] as Error).message).toMatch(/no body parser read .* @koa\/bodyparser/)
      expect(await fx.effects()).toBe(0)
      expect(await fx.rows()).toBe(0)
    })

    it('refuses a handler that sets ctx.body itself, before anything commits', async () => {
      const refused = await post('/orders', { item: 'a', behave: 'self' }, 'k')
      expect(refused.status).toBe(500)
      expect(await refused.json()).toEqual({ caught: 'IdempotencySetupError' })
      expect((caught[0] as Error).message).toMatch(/sent the response itself \(ctx\.body = …\)/)
      expect(await fx.effects()).toBe(0)
      expect(await fx.rows()).toBe(0)
    })

    it('sends an answer without a body with its own status and headers, first and on replay (Koa would make it a 204)', async () => {
      for (const replayed of [null, 'true']) {
        const answer = await post('/orders', { item: 'a', behave: 'empty' }, 'k')
        expect(answer.status).toBe(201)
        expect(answer.headers.get('x-item')).toBe('a')
        expect(answer.headers.get('idempotency-replayed')).toBe(replayed)
        expect(await answer.text()).toBe('')
      }
      expect(await fx.effects('order:a')).toBe(1)
    })

    it('keeps a JSON type and cookies that middleware before it set from turning a bodiless answer into `null` or losing the cookies', async () => {
      const answer = await post('/typed', { item: 't', behave: 'empty' }, 't')
      expect(answer.status).toBe(201)
      expect(await answer.text()).toBe('')
      expect(answer.headers.getSetCookie()).toEqual(['csrf=token', 'seen=1'])
    })

    it('fingerprints a file @koa/multer kept, by its bytes: another file under the key is 422', async () => {
      const send = (content: string) => {
        const form = new FormData()
        form.append('item', 'scan')
        form.append('file', new Blob([content], { type: 'text/plain' }), 'scan.txt')
        return fetch(`${base}/upload`, { method: 'POST', headers: { 'idempotency-key': 'u' }, body: form })
      }
      const first = await send('page one')
      expect(first.status).toBe(201)
      expect(await first.json()).toMatchObject({ item: 'scan:scan.txt' })
      expect((await send('page one')).headers.get('idempotency-replayed')).toBe('true')
      expect((await send('page two')).status).toBe(422)
      expect(await fx.effects('order:scan:scan.txt')).toBe(1)
    })

    it('runs an atomic-phases flow once and replays its answer', async () => {
      const first = await post('/rides', { item: 'r' }, 'f')
      expect(first.status).toBe(202)
      const again = await post('/rides', { item: 'r' }, 'f')
      expect(again.status).toBe(202)
      expect(await again.text()).toBe(JSON.stringify({ item: 'r' }))
      expect(await fx.effects('ride:r')).toBe(1)
    })
  })
}
