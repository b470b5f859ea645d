/**
 * SPEC §5 as one table over every HTTP adapter (Express 5 and 4, Fastify, the Fetch API, Hono, Koa)
 * and every database, each over real HTTP: the adapters differ only in how they map requests
 * and answers, so each row must hold for each of them.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import type { HttpResult } from '../http/index.js'
import { ADAPTER_NAMES, defineRides, sendLines, startApp, type App } from './support/apps.js'
import { gate, itWhere, openFixture, startChild, targetsFor, type Fixture } from './support/harness.js'
import { rideEffects } from './support/ride.js'
import { sleep } from './support/util.js'

interface Order {
  readonly item?: string
  readonly hold?: boolean
  /** Answer with headers that some framework cannot send. */
  readonly unsendable?: keyof typeof UNSENDABLE
  /** Answer with a body that is not a JSON value. */
  readonly kind?: keyof typeof KINDS
  /** Throw `undefined` instead of an error. */
  readonly throwNothing?: boolean
}

/** Answers whose body is not a JSON value, and what is sent for each, first and on replay: its status, Content-Type and bytes. */
const KINDS = {
  'a string with a Content-Type': {
    result: { status: 200, body: 'hello', headers: { 'Content-Type': 'application/json' } },
    sent: { status: 200, type: 'application/json', body: Buffer.from('hello') },
  },
  bytes: {
    result: { status: 200, body: Buffer.from([0, 255, 10]), headers: { 'Content-Type': 'application/octet-stream' } },
    sent: { status: 200, type: 'application/octet-stream', body: Buffer.from([0, 255, 10]) },
  },
  'a string without one': {
    result: { status: 200, body: 'just text' },
    sent: { status: 200, type: 'application/json; charset=utf-8', body: Buffer.from('"just text"') },
  },
  'no body': { result: { status: 204, headers: { 'X-Kind': 'empty' } }, sent: { status: 204, type: null, body: Buffer.alloc(0) } },
} as const satisfies Record<string, { result: HttpResult; sent: { status: number; type: string | null; body: Buffer } }>

/** Response headers that differ between any two answers of a server, whatever was stored; Set-Cookie is never replayed. */
const PER_RESPONSE = new Set(['date', 'connection', 'keep-alive', 'idempotency-replayed', 'set-cookie'])

const headersOf = (response: Response) => Object.fromEntries([...response.headers].filter(([name]) => !PER_RESPONSE.has(name)))

/** Answers Node or the Fetch API refuse to send, by what makes them so, and the header each names. */
const UNSENDABLE = {
  'a character outside Latin-1': [{ 'Content-Disposition': 'attachment; filename="Zoë 💳.pdf"' }, 'Content-Disposition'],
  'a non-Latin-1 Location': [{ Location: '/orders/заказ' }, 'Location'],
  'CR and LF in a value': [{ 'X-Note': 'fine\r\nSet-Cookie: evil=1' }, 'X-Note'],
  'a space in a name': [{ 'X Order': '1' }, 'X Order'],
  'a wrong Content-Length': [{ 'Content-Length': '3' }, 'Content-Length'],
} as const

const conflictWait = 1000
const lockTimeout = 800

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('HTTP conformance', ['statement-paths'])) {
  for (const adapter of ADAPTER_NAMES) {
    describe(`HTTP conformance: ${adapter}, ${target.id}`, () => {
      let fx: Fixture
      let app: App
      const plan = { throws: 0, fails: 0, entered: gate(), release: gate() }

      beforeEach(async () => {
        fx = await openFixture(target)
        Object.assign(plan, { throws: 0, fails: 0, entered: gate(), release: gate() })
        app = await startApp(
          adapter,
          fx.idempotency,
          { conflictWait, lockTimeout },
          {
            orders: async (body, trx): Promise<HttpResult> => {
              const order = (body ?? {}) as Order
              await fx.effect(trx, `order:${order.item}`)
              if (order.hold) {
                plan.entered.open()
                await plan.release.promise
              }
              if (plan.throws > 0 && plan.throws--) throw new Error('the handler failed')
              if (order.throwNothing) throw undefined
              if (plan.fails > 0 && plan.fails--) return { status: 503, body: { error: 'try later' } }
              if (order.unsendable) return { status: 201, body: { item: order.item ?? null }, headers: UNSENDABLE[order.unsendable][0] }
              if (order.kind) return KINDS[order.kind].result
              return {
                status: 201,
                body: { item: order.item ?? null, at: Math.random() },
                headers: { Location: `/orders/${order.item}`, 'Set-Cookie': ['session=first', 'theme=dark'], 'X-Order': String(order.item) },
              }
            },
            rides: defineRides(fx.idempotency, fx.db, fx.effectsTable),
          },
        )
      })
      afterEach(async () => {
        plan.release.open()
        await app.close()
        await fx.close()
      })

      const post = (body: unknown, key?: string, init: RequestInit & { user?: string } = {}) =>
        fetch(`${app.url}/orders`, {
          method: 'POST',
          ...init,
          headers: {
            'content-type': 'application/json',
            ...(key === undefined ? {} : { 'idempotency-key': key }),
            ...(init.user ? { 'x-user': init.user } : {}),
          },
          body: JSON.stringify(body),
        })

      async function expectProblem(
        response: { status: number; headers: Headers } | { status: number; headers: Record<string, unknown> },
        text: string,
        status: number,
        code: string,
      ) {
        expect(response.status, text).toBe(status)
        const type = response.headers instanceof Headers ? response.headers.get('content-type') : response.headers['content-type']
        expect(type).toMatch(/^application\/problem\+json/)
        const problem = JSON.parse(text) as Record<string, unknown>
        expect(problem).toMatchObject({
          type: `urn:kysely-idempotency:${code}`,
          // The IETF draft profile's name where it has one, else ours in kebab case.
          code: code === 'key_reuse' ? 'fingerprint-mismatch' : code.replaceAll('_', '-'),
          status,
          title: expect.any(String),
          detail: expect.any(String),
        })
        return problem
      }

      it('stores the first answer and replays its status, body bytes and headers, without Set-Cookie, with Idempotency-Replayed, whatever the body (JSON, text, bytes, none)', async () => {
        const first = await post({ item: 'a' }, 'k1')
        const stored = await first.text()
        expect(first.status).toBe(201)
        expect(first.headers.get('location')).toBe('/orders/a')
        expect(first.headers.get('content-type')).toBe('application/json; charset=utf-8')
        expect(first.headers.get('idempotency-replayed')).toBeNull()
        expect(first.headers.getSetCookie()).toEqual(['session=first', 'theme=dark'])
        for (let i = 0; i < 2; i++) {
          const replay = await post({ item: 'a' }, 'k1')
          expect(replay.status).toBe(201)
          expect(await replay.text()).toBe(stored)
          expect(replay.headers.get('location')).toBe('/orders/a')
          expect(replay.headers.get('x-order')).toBe('a')
          expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'))
          expect(replay.headers.get('idempotency-replayed')).toBe('true')
          expect(replay.headers.getSetCookie()).toEqual([])
          expect(headersOf(replay)).toEqual(headersOf(first))
        }
        expect(await fx.effects('order:a')).toBe(1)
        // Answers whose body is not a JSON value are sent as they were given, and replayed the same.
        for (const [kind, { sent }] of Object.entries(KINDS)) {
          const item = `kind-${Object.keys(KINDS).indexOf(kind)}`
          const send = () => post({ item, kind }, `k-${item}`)
          const first = await send()
          const again = await send()
          expect(first.headers.get('idempotency-replayed'), kind).toBeNull()
          expect(again.headers.get('idempotency-replayed'), kind).toBe('true')
          for (const response of [first, again]) {
            expect(response.status, kind).toBe(sent.status)
            expect(response.headers.get('content-type'), kind).toBe(sent.type)
          }
          expect(headersOf(again), kind).toEqual(headersOf(first))
          expect(Buffer.from(await first.arrayBuffer()), kind).toEqual(sent.body)
          expect(Buffer.from(await again.arrayBuffer()), kind).toEqual(sent.body)
          expect(await fx.effects(`order:${item}`), kind).toBe(1)
        }
      })

      it('answers 400 problem+json to a missing, empty, too long, control-character, malformed or repeated key, and runs nothing; a quoted key is the bare one', async () => {
        const missing = await post({ item: 'a' })
        await expectProblem(missing, await missing.text(), 400, 'missing_key')
        for (const key of ['', '""', 'x'.repeat(256), 'tab\tkey', '"unterminated', '"a"b"', 'a, b']) {
          const bad = await sendLines(
            `${app.url}/orders`,
            'POST',
            [
              ['content-type', 'application/json'],
              ['idempotency-key', key],
            ],
            '{"item":"a"}',
          )
          await expectProblem({ status: bad.status, headers: bad.headers }, bad.body, 400, 'invalid_key')
        }
        const twice = await sendLines(
          `${app.url}/orders`,
          'POST',
          [
            ['content-type', 'application/json'],
            ['Idempotency-Key', 'k2'],
            ['Idempotency-Key', 'k3'],
          ],
          '{"item":"a"}',
        )
        await expectProblem({ status: twice.status, headers: twice.headers }, twice.body, 400, 'invalid_key')
        // A key with a comma is fine quoted, as a Structured-Field string.
        expect((await post({ item: 'comma' }, '"a,b"')).status).toBe(201)
        expect(await fx.effects('order:a')).toBe(0)
        // The quoted Structured-Field form and the bare form name the same key, escapes included.
        expect((await post({ item: 'quoted' }, '"quoted-key"')).status).toBe(201)
        expect((await post({ item: 'quoted' }, 'quoted-key')).headers.get('idempotency-replayed')).toBe('true')
        expect((await post({ item: 'escaped' }, '"a\\"b"')).status).toBe(201)
        expect((await post({ item: 'escaped' }, 'a"b')).headers.get('idempotency-replayed')).toBe('true')
        expect(await fx.effects('order:quoted')).toBe(1)
        expect(await fx.effects('order:escaped')).toBe(1)
      })

      it('answers 422 to the same key with another request, and the key still answers its own', async () => {
        const stored = await (await post({ item: 'a' }, 'k4')).text()
        const reuse = await post({ item: 'b' }, 'k4')
        expect((await expectProblem(reuse, await reuse.text(), 422, 'key_reuse')).detail).toMatch(/different request/)
        const again = await post({ item: 'a' }, 'k4')
        expect(await again.text()).toBe(stored)
        expect(await fx.effects('order:a')).toBe(1)
        expect(await fx.effects('order:b')).toBe(0)
        // Scopes keep clients apart: another user's same key is another request.
        const other = await post({ item: 'b' }, 'k4', { user: 'someone-else' })
        expect(other.status).toBe(201)
        expect(other.headers.get('idempotency-replayed')).toBeNull()
        expect(await fx.effects('order:b')).toBe(1)
      })

      it("with reuse: 'reject' on the route, answers a used key 409 key_used and runs nothing, while another request is still 422", async () => {
        const strict = await startApp(
          adapter,
          fx.idempotency,
          { reuse: 'reject' },
          { orders: async (body, trx) => (await fx.effect(trx, `strict:${(body as Order).item}`), { status: 201, body }) },
        )
        try {
          const send = (item: string) =>
            fetch(`${strict.url}/orders`, {
              method: 'POST',
              headers: { 'content-type': 'application/json', 'idempotency-key': 'k' },
              body: JSON.stringify({ item }),
            })
          expect((await send('a')).status).toBe(201)
          const used = await send('a')
          await expectProblem(used, await used.text(), 409, 'key_used')
          expect(used.headers.get('idempotency-replayed')).toBeNull()
          const other = await send('b')
          await expectProblem(other, await other.text(), 422, 'key_reuse')
          expect(await fx.effects('strict:a')).toBe(1)
          expect(await fx.effects('strict:b')).toBe(0)
        } finally {
          await strict.close()
        }
      })

      it("with oversized: 'omit-body', sends a large answer in full and replays its status and headers without the body, marked omitted", async () => {
        const big = 'x'.repeat(4096)
        const omitting = await startApp(
          adapter,
          fx.idempotency,
          { maxStoredBytes: 1024, oversized: 'omit-body' },
          {
            orders: async (body, trx) => (
              await fx.effect(trx, 'big'), { status: 201, body: { big, ...(body as object) }, headers: { 'X-Order': 'big' } }
            ),
          },
        )
        try {
          const send = () =>
            fetch(`${omitting.url}/orders`, {
              method: 'POST',
              headers: { 'content-type': 'application/json', 'idempotency-key': 'big' },
              body: '{"n":1}',
            })
          const first = await send()
          expect(first.status).toBe(201)
          expect(await first.json()).toEqual({ big, n: 1 })
          expect(first.headers.get('idempotency-replay')).toBeNull()
          for (let i = 0; i < 2; i++) {
            const replay = await send()
            expect(replay.status).toBe(201)
            expect(await replay.text()).toBe('')
            expect(replay.headers.get('idempotency-replay')).toBe('omitted')
            expect(replay.headers.get('content-type')).toBe(first.headers.get('content-type'))
            expect(replay.headers.get('idempotency-replayed')).toBe('true')
            expect(replay.headers.get('x-order')).toBe('big')
          }
          expect(await fx.effects('big')).toBe(1)
        } finally {
          await omitting.close()
        }
      })

      it("with expiryHeader, answers a keyed request with the key's expiry, the same on every replay, and nothing else with it", async () => {
        const dated = await startApp(
          adapter,
          fx.idempotency,
          { ttl: 60_000, expiryHeader: true },
          { orders: async () => ({ status: 201, body: { ok: true } }) },
        )
        try {
          const send = (key?: string) =>
            fetch(`${dated.url}/orders`, {
              method: 'POST',
              headers: { 'content-type': 'application/json', ...(key ? { 'idempotency-key': key } : {}) },
              body: '{}',
            })
          const before = Date.now()
          const first = await send('dated')
          const expires = first.headers.get('idempotency-key-expires')
          expect(Date.parse(expires!)).toBeGreaterThan(before + 58_000)
          expect(Date.parse(expires!)).toBeLessThanOrEqual(Date.now() + 60_000)
          expect(new Date(Date.parse(expires!)).toUTCString()).toBe(expires)
          const replay = await send('dated')
          expect(replay.headers.get('idempotency-replayed')).toBe('true')
          expect(replay.headers.get('idempotency-key-expires')).toBe(expires)
          expect((await send()).headers.get('idempotency-key-expires')).toBeNull()
        } finally {
          await dated.close()
        }
      })

      it('answers 409 with Retry-After when the same key stays in flight past conflictWait, and the first still finishes once', async () => {
        const original = post({ item: 'slow', hold: true }, 'k5')
        await plan.entered.promise
        const duplicate = await post({ item: 'slow', hold: true }, 'k5')
        await expectProblem(duplicate, await duplicate.text(), 409, 'conflict')
        expect(Number(duplicate.headers.get('retry-after'))).toBeGreaterThanOrEqual(1)
        plan.release.open()
        expect((await original).status).toBe(201)
        expect((await post({ item: 'slow', hold: true }, 'k5')).headers.get('idempotency-replayed')).toBe('true')
        expect(await fx.effects('order:slow')).toBe(1)
      })

      it('runs 20 concurrent identical requests once, and answers each with the same bytes', async () => {
        const answers = await Promise.all(
          Array.from({ length: 20 }, () => post({ item: 'storm' }, 'k6').then(async (r) => ({ status: r.status, text: await r.text() }))),
        )
        for (const a of answers) expect(a).toEqual({ status: 201, text: answers[0]!.text })
        expect(await fx.effects('order:storm')).toBe(1)
      })

      it('gives a client whose first answer was lost the stored answer when it retries', async () => {
        const client = new AbortController()
        const lost = post({ item: 'lost', hold: true }, 'k7', { signal: client.signal })
        await plan.entered.promise
        client.abort()
        await expect(lost).rejects.toThrow()
        plan.release.open()
        const retry = await post({ item: 'lost', hold: true }, 'k7')
        expect(retry.status).toBe(201)
        expect(retry.headers.get('idempotency-replayed')).toBe('true')
        expect(await fx.effects('order:lost')).toBe(1)
      })

      it('refuses an answer that some framework cannot send before anything commits: a 500 naming the header, every time, and the server lives on', async () => {
        for (const [why, [, header]] of Object.entries(UNSENDABLE)) {
          const item = `bad-${Object.keys(UNSENDABLE).indexOf(why)}`
          for (let attempt = 0; attempt < 2; attempt++) {
            const refused = await post({ item, unsendable: why }, `k-${item}`)
            const problem = await expectProblem(refused, await refused.text(), 500, 'invalid_response')
            expect(problem.detail, why).toContain(`"${header}"`)
            expect(problem.detail).toMatch(/Nothing was stored, and the request's writes were rolled back/)
          }
          expect(await fx.effects(`order:${item}`), why).toBe(0)
        }
        expect(await fx.rows()).toBe(0)
        expect((await post({ item: 'fine' }, 'k-fine')).status).toBe(201)
      })

      it('answers 400 to a body nested deeper than a fingerprint walks, without running anything', async () => {
        const deep = `${'{"a":'.repeat(2500)}1${'}'.repeat(2500)}`
        const refused = await fetch(`${app.url}/orders`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': 'deep' },
          body: deep,
        })
        const text = await refused.text()
        expect(refused.status, text).toBe(400)
        expect(await fx.rows()).toBe(0)
        expect((await post({ item: 'shallow' }, 'deep')).status).toBe(201)
      })

      it('refuses a request body over the limit the route or its framework reads (413), storing nothing', async () => {
        const huge = await fetch(`${app.url}/orders`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': 'huge' },
          body: JSON.stringify({ item: 'huge', pad: 'x'.repeat(2 * 1024 * 1024) }),
        })
        expect(huge.status).toBe(413)
        expect(await fx.rows()).toBe(0)
      })

      it('sends a returned 5xx without storing it, rolls its writes back, and lets a retry run', async () => {
        plan.fails = 1
        const failed = await post({ item: 'later' }, 'k8')
        expect(failed.status).toBe(503)
        expect(await failed.json()).toEqual({ error: 'try later' })
        expect(await fx.effects('order:later')).toBe(0)
        const retry = await post({ item: 'later' }, 'k8')
        expect(retry.status).toBe(201)
        expect(retry.headers.get('idempotency-replayed')).toBeNull()
        expect(await fx.effects('order:later')).toBe(1)
      })

      it('answers 500 to a handler that throws undefined, which no framework takes for an error, and stores nothing', async () => {
        const answered = await post({ item: 'nothing', throwNothing: true }, 'k-nothing')
        expect(answered.status).toBe(500)
        expect(await fx.rows()).toBe(0)
        expect(await fx.effects('order:nothing')).toBe(0)
      })

      it('refuses call options a route cannot run with when the route is made, not at its first request with a key', async () => {
        for (const bad of [
          { reuse: 'rejected' },
          { ttl: 0 },
          { conflictWait: -1 },
          { lockTimeout: 0 },
          { oversized: 'truncate' },
          { claimFirst: 'yes' },
        ]) {
          await expect(startApp(adapter, fx.idempotency, bad as never, { orders: async () => ({ status: 201 }) })).rejects.toThrow(RangeError)
        }
      })

      it("passes a thrown error to the framework's error handling, stores nothing, and lets a retry run", async () => {
        plan.throws = 1
        const failed = await post({ item: 'thrown' }, 'k9')
        expect(failed.status).toBe(500)
        expect(failed.headers.get('content-type') ?? '').not.toMatch(/problem/)
        expect(await fx.rows()).toBe(0)
        expect((await post({ item: 'thrown' }, 'k9')).status).toBe(201)
        expect(await fx.effects('order:thrown')).toBe(1)
      })

      itWhere(target, 'processes')(
        'finishes a defined flow whose server was killed between its phases with the recovery worker, and replays its answer to the retry',
        async () => {
          const effects = rideEffects('ride-1')
          const killed = startChild('http-app.ts', {
            adapter,
            target: target.id,
            location: fx.location,
            table: fx.table,
            lockTimeout,
            stopAt: 'charge_created',
          })
          const url = await killed.printedAfter('listening:')
          const lost = fetch(`${url}/rides`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', 'idempotency-key': 'ride-1' },
            body: JSON.stringify({ id: 'ride-1' }),
          })
          await killed.printed('at:charge_created')
          killed.kill('SIGKILL')
          await expect(lost).rejects.toThrow()
          const retry = () =>
            fetch(`${app.url}/rides`, {
              method: 'POST',
              headers: { 'content-type': 'application/json', 'idempotency-key': 'ride-1' },
              body: JSON.stringify({ id: 'ride-1' }),
            })
          // Until the dead attempt's lock runs out, the key is in flight; then the worker finishes it.
          expect((await retry()).status).toBe(409)
          await sleep(lockTimeout + 100)
          expect(await fx.idempotency.recover()).toEqual({ finished: 1, failed: 0, skipped: 0 })
          const resumed = await retry()
          expect(resumed.status).toBe(201)
          expect(resumed.headers.get('idempotency-replayed')).toBe('true')
          const body = (await resumed.json()) as { ride: { id: string }; charge: { id: string } }
          expect(body.ride).toEqual({ id: 'ride-ride-1' })
          expect(await fx.effects(effects.ride)).toBe(1)
          expect(await fx.effects(effects.charged)).toBe(1)
          // The step was recorded before the kill, so the provider was called once, with its step key.
          expect(await fx.effects(effects.call(body.charge.id.slice('ch-'.length)))).toBe(1)
          const replay = await retry()
          expect(await replay.json()).toEqual(body)
        },
      )
    })
  }
}
