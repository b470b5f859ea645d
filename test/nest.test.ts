/**
 * What only the NestJS adapter does, on both platforms, through Nest's own testing module; the
 * shared behaviour is in test/http.test.ts, which runs Nest too.
 */
import type { IncomingHttpHeaders } from 'node:http'
import type { AddressInfo } from 'node:net'
import {
  BadRequestException,
  Body,
  type CallHandler,
  Controller,
  Header,
  HttpCode,
  Injectable,
  type INestApplication,
  Module,
  type NestInterceptor,
  Next,
  Post,
  Redirect,
  Res,
  StreamableFile,
  UploadedFile,
  UseGuards,
  UseInterceptors,
} from '@nestjs/common'
import { ExpressAdapter, FileInterceptor } from '@nestjs/platform-express'
import { FastifyAdapter } from '@nestjs/platform-fastify'
import { Test } from '@nestjs/testing'
import type { Transaction } from 'kysely'
import { map } from 'rxjs'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import type { Flow } from '../index.js'
import { answer, CurrentFlow, type HttpResult, IDEMPOTENCY, Idempotent, IdempotencyModule, IdempotentFlow, Trx } from '../nest/index.js'
import { openFixture, targetsFor, type Fixture } from './support/harness.js'

interface Order {
  readonly item?: string
}

/** A value a `ClassSerializerInterceptor` would shape. */
class Receipt {
  constructor(readonly item: string | undefined) {}
}

/** A value that says how it is JSON, as decimals and object ids do. */
class Money {
  constructor(readonly cents: number) {}
  toJSON() {
    return (this.cents / 100).toFixed(2)
  }
}

const scope = (req: { headers: IncomingHttpHeaders }) => (req.headers['x-user'] as string | undefined) ?? 'anonymous'
const options = { scope, required: true }

/** Wraps what the method returned, as an envelope interceptor does. */
@Injectable()
class Envelope implements NestInterceptor {
  intercept(_context: unknown, next: CallHandler) {
    return next.handle().pipe(map((data) => ({ data })))
  }
}

/** Lets a request through only with `x-allowed`. */
@Injectable()
class Allowed {
  canActivate(context: { switchToHttp(): { getRequest(): { headers: IncomingHttpHeaders } } }) {
    return context.switchToHttp().getRequest().headers['x-allowed'] !== undefined
  }
}

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('nest adapter', ['statement-paths'])) {
  for (const platform of ['express', 'fastify'] as const) {
    describe(`nest adapter: ${platform}, ${target.id}`, () => {
      let fx: Fixture
      let app: INestApplication
      let base: string

      @Controller()
      class Orders {
        @Post('plain')
        @Header('X-Kind', 'plain')
        @Idempotent(options)
        async plain(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `plain:${order.item}`)
          return { item: order.item, at: Math.random() }
        }

        @Post('coded')
        @HttpCode(200)
        @Idempotent(options)
        async coded(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `coded:${order.item}`)
          return `text ${order.item}`
        }

        @Post('answer')
        @Idempotent(options)
        async answered(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `answer:${order.item}`)
          return answer({ status: 202, body: { item: order.item }, headers: { Location: `/orders/${order.item}` } })
        }

        @Post('refused')
        @Idempotent(options)
        async refused(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `refused:${order.item}`)
          if (order.item === 'bad') throw new BadRequestException('no such item')
          return { item: order.item }
        }

        @Post('guarded')
        @Idempotent(options)
        @UseGuards(Allowed)
        async guarded(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `guarded:${order.item}`)
          return { item: order.item }
        }

        @Post('inside')
        @UseInterceptors(Envelope)
        @Idempotent(options)
        async inside(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `inside:${order.item}`)
          return { item: order.item, at: Math.random() }
        }

        @Post('stream')
        @Idempotent(options)
        async stream(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `stream:${order.item}`)
          return new StreamableFile(Buffer.from('bytes'))
        }

        @Post('redirect')
        @Redirect('/elsewhere')
        @Idempotent(options)
        async redirect(@Trx() trx: Transaction<any>) {
          await fx.effect(trx, 'redirect')
        }

        @Post('stray')
        async stray(@Trx() trx: Transaction<any>) {
          return { trx: typeof trx }
        }

        @Post('ride')
        @IdempotentFlow(options)
        async ride(@Body() order: Order, @CurrentFlow() flow: Flow<any, HttpResult>) {
          await flow.phase('order', (trx) => fx.effect(trx, `ride:${order.item}`))
          return answer({ status: 202, body: { item: order.item } })
        }

        @Post('upload')
        @Idempotent(options)
        @UseInterceptors(FileInterceptor('file'))
        async upload(@Body() order: Order, @UploadedFile() file: { originalname: string }, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `upload:${order.item}:${file.originalname}`)
          return { item: order.item }
        }

        @Post('instance')
        @Idempotent(options)
        async instance(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `instance:${order.item}`)
          const receipt = new Receipt(order.item)
          if (order.item === 'money') return { price: new Money(150) }
          return order.item === 'wrapped' ? answer({ status: 201, body: receipt }) : { receipts: [receipt] }
        }

        @Post('cookies')
        @Header('Set-Cookie', 'a=1')
        @Header('Set-Cookie', 'b=2')
        @Header('X-Kind', 'first')
        @Header('x-kind', 'second')
        @Idempotent(options)
        async cookies(@Trx() trx: Transaction<any>) {
          await fx.effect(trx, 'cookies')
          return { ok: true }
        }

        @Post('cyclic')
        @Idempotent(options)
        async cyclic(@Trx() trx: Transaction<any>) {
          await fx.effect(trx, 'cyclic')
          // A tree whose nodes point back at their parent: a walk that does not remember where it
          // has been visits it exponentially often.
          const root: { kids: object[] } = { kids: [] }
          for (let i = 0; i < 6; i++) root.kids.push({ parent: root, kids: [] })
          return root
        }

        @Post('count')
        @Idempotent(options)
        async count(@Trx() trx: Transaction<any>) {
          await fx.effect(trx, 'count')
          return 42
        }

        @Post('defaulted')
        @Idempotent(options)
        async defaulted(@Body() order: Order, @Trx() trx: Transaction<any>, limit = 5) {
          await fx.effect(trx, `defaulted:${order.item}`)
          return { limit }
        }

        @Post('upload-late')
        @UseInterceptors(FileInterceptor('file'))
        @Idempotent(options)
        async uploadLate(@Body() order: Order, @Trx() trx: Transaction<any>) {
          await fx.effect(trx, `late:${order.item}`)
          return { item: order.item }
        }
      }

      beforeEach(async () => {
        fx = await openFixture(target)
        // forRootAsync, with the instance from another provider, as an app that builds it from its config would.
        @Module({ providers: [{ provide: 'fixture', useValue: fx }], exports: ['fixture'] })
        class Config {}
        const moduleRef = await Test.createTestingModule({
          imports: [
            IdempotencyModule.forRootAsync({
              imports: [Config],
              inject: ['fixture'],
              useFactory: (fixture: Fixture) => ({ idempotency: fixture.idempotency }),
            }),
          ],
          controllers: [Orders],
        }).compile()
        app = moduleRef.createNestApplication(platform === 'express' ? new ExpressAdapter() : new FastifyAdapter(), { logger: false })
        await app.listen(0, '127.0.0.1')
        base = `http://127.0.0.1:${(app.getHttpServer().address() as AddressInfo).port}`
      })
      afterEach(async () => {
        app.getHttpServer().closeAllConnections()
        await app.close()
        await fx.close()
      })

      const post = (path: string, body: unknown, key?: string, headers: Record<string, string> = {}) =>
        fetch(`${base}${path}`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', ...(key ? { 'idempotency-key': key } : {}), ...headers },
          body: JSON.stringify(body),
        })

      it("sends a returned value with Nest's status and @Header() headers, and replays the same bytes", async () => {
        const first = await post('/plain', { item: 'a' }, 'k')
        expect(first.status).toBe(201)
        expect(first.headers.get('x-kind')).toBe('plain')
        expect(first.headers.get('content-type')).toBe('application/json; charset=utf-8')
        const text = await first.text()
        const again = await post('/plain', { item: 'a' }, 'k')
        expect([again.status, again.headers.get('x-kind'), again.headers.get('idempotency-replayed')]).toEqual([201, 'plain', 'true'])
        expect(await again.text()).toBe(text)
        expect(await fx.effects('plain:a')).toBe(1)
      })

      it("sends returned text with @HttpCode()'s status and the type the platform gives text", async () => {
        const type = platform === 'express' ? 'text/html; charset=utf-8' : 'text/plain; charset=utf-8'
        for (const replayed of [null, 'true']) {
          const sent = await post('/coded', { item: 't' }, 't')
          expect([sent.status, sent.headers.get('content-type'), sent.headers.get('idempotency-replayed')]).toEqual([200, type, replayed])
          expect(await sent.text()).toBe('text t')
        }
      })

      it('sends an answer() with its own status and headers, first and on replay', async () => {
        for (const replayed of [null, 'true']) {
          const sent = await post('/answer', { item: 'a' }, 'a')
          expect([sent.status, sent.headers.get('location'), sent.headers.get('idempotency-replayed')]).toEqual([202, '/orders/a', replayed])
          expect(await sent.json()).toEqual({ item: 'a' })
        }
        expect(await fx.effects('answer:a')).toBe(1)
      })

      it("passes a thrown HttpException to Nest's exception filters, rolls back, stores nothing, and lets a retry run", async () => {
        const refused = await post('/refused', { item: 'bad' }, 'r')
        expect(refused.status).toBe(400)
        expect(await refused.json()).toMatchObject({ message: 'no such item' })
        expect(await fx.effects()).toBe(0)
        expect(await fx.rows()).toBe(0)
        expect((await post('/refused', { item: 'good' }, 'r')).status).toBe(201)
      })

      it('answers a missing key with a problem document, without running the method', async () => {
        const missing = await post('/plain', { item: 'a' })
        expect(missing.status).toBe(400)
        expect(missing.headers.get('content-type')).toBe('application/problem+json')
        expect(await missing.json()).toMatchObject({ code: 'missing-key' })
        expect(await fx.effects()).toBe(0)
      })

      it('lets guards run before the key is claimed: a refused request leaves no key behind', async () => {
        expect((await post('/guarded', { item: 'g' }, 'g')).status).toBe(403)
        expect(await fx.rows()).toBe(0)
        const allowed = await post('/guarded', { item: 'g' }, 'g', { 'x-allowed': '1' })
        expect(allowed.status).toBe(201)
        expect(await fx.effects('guarded:g')).toBe(1)
      })

      it('stores what interceptors listed above @Idempotent() made of the value, and replays it', async () => {
        const first = await post('/inside', { item: 'i' }, 'i')
        const body = (await first.json()) as { data: { item: string } }
        expect(body.data.item).toBe('i')
        const again = await post('/inside', { item: 'i' }, 'i')
        expect(again.headers.get('idempotency-replayed')).toBe('true')
        expect(await again.json()).toEqual(body)
      })

      it('refuses a StreamableFile, a @Redirect() and a stray @Trx(), each a 500 with nothing stored', async () => {
        expect((await post('/stream', { item: 's' }, 's')).status).toBe(500)
        expect((await post('/redirect', {}, 'd')).status).toBe(500)
        expect((await post('/stray', {}, 'x')).status).toBe(500)
        expect(await fx.effects()).toBe(0)
        expect(await fx.rows()).toBe(0)
      })

      it('refuses a class instance anywhere in the body, which a serializer around it would have shaped; answer() sends it as it is', async () => {
        expect((await post('/instance', { item: 'bare' }, 'c')).status).toBe(500)
        expect(await fx.effects()).toBe(0)
        expect(await fx.rows()).toBe(0)
        const wrapped = await post('/instance', { item: 'wrapped' }, 'w')
        expect([wrapped.status, await wrapped.json()]).toEqual([201, { item: 'wrapped' }])
        const money = await post('/instance', { item: 'money' }, 'm')
        expect([money.status, await money.json()]).toEqual([201, { price: '1.50' }])
      })

      it('sends a returned number as the platform does: text on Express, JSON on Fastify', async () => {
        const type = platform === 'express' ? 'text/html; charset=utf-8' : 'application/json; charset=utf-8'
        for (const replayed of [null, 'true']) {
          const sent = await post('/count', {}, 'n')
          expect([sent.headers.get('content-type'), sent.headers.get('idempotency-replayed'), await sent.text()]).toEqual([type, replayed, '42'])
        }
        expect(await fx.effects('count')).toBe(1)
      })

      it('sends @Header() values as Nest set them: a Set-Cookie list stays lines, one name in two cases is one header', async () => {
        const sent = await post('/cookies', {}, 'h')
        expect(sent.status).toBe(201)
        expect(sent.headers.getSetCookie().length).toBeGreaterThan(0)
        for (const cookie of sent.headers.getSetCookie()) expect(cookie).toMatch(/^[ab]=\d$/)
        expect(sent.headers.get('x-kind')).toMatch(/^(first|second)$/)
        expect(await fx.effects('cookies')).toBe(1)
      })

      it('answers a cyclic value at once with a 500, storing nothing', async () => {
        expect((await post('/cyclic', {}, 'y')).status).toBe(500)
        expect(await fx.rows()).toBe(0)
      }, 5000)

      it('leaves a parameter with a default value to its default', async () => {
        expect(await (await post('/defaulted', { item: 'd' }, 'd')).json()).toEqual({ limit: 5 })
      })

      it('runs an atomic-phases flow once and replays its answer', async () => {
        const first = await post('/ride', { item: 'r' }, 'f')
        expect(first.status).toBe(202)
        const again = await post('/ride', { item: 'r' }, 'f')
        expect([again.status, again.headers.get('idempotency-replayed')]).toEqual([202, 'true'])
        expect(await again.json()).toEqual({ item: 'r' })
        expect(await fx.effects('ride:r')).toBe(1)
      })

      it('gives other providers the instance as IDEMPOTENCY', async () => {
        expect(app.get(IDEMPOTENCY)).toBe(fx.idempotency)
      })

      it.runIf(platform === 'express')(
        'fingerprints a file FileInterceptor() read before it, by its bytes: another file under the key is 422',
        async () => {
          const send = (path: string, content: string) => {
            const form = new FormData()
            form.append('item', 'scan')
            form.append('file', new Blob([content], { type: 'text/plain' }), 'scan.txt')
            return fetch(`${base}${path}`, { method: 'POST', headers: { 'idempotency-key': 'u' }, body: form })
          }
          expect((await send('/upload', 'page one')).status).toBe(201)
          expect((await send('/upload', 'page one')).headers.get('idempotency-replayed')).toBe('true')
          expect((await send('/upload', 'page two')).status).toBe(422)
          expect(await fx.effects('upload:scan:scan.txt')).toBe(1)
          // Listed above @Idempotent(), it reads the body only after the fingerprint was due.
          expect((await send('/upload-late', 'page one')).status).toBe(500)
          expect(await fx.effects('late:scan')).toBe(0)
        },
      )
    })
  }
}

describe('nest adapter: setup', () => {
  it("runs on the lane's Nest: 11 on the compatibility lane, 12 elsewhere", async () => {
    const { default: manifest } = await import('@nestjs/common/package.json', { with: { type: 'json' } })
    expect(manifest.version).toMatch(process.env.KIDEM_KYSELY === '0.28' ? /^11\./ : /^12\./)
  })

  it('refuses options without a scope when the controller is defined', () => {
    expect(() => Idempotent({} as never)).toThrow(/needs a scope/)
  })

  it('refuses, when the controller is defined, a method that answers by itself or has two idempotency decorators', () => {
    const define = (decorate: (prototype: object) => void) => () => {
      class Answers {
        x(..._args: unknown[]) {
          return {}
        }
      }
      decorate(Answers.prototype)
    }
    const on = (prototype: object, decorator: MethodDecorator) =>
      decorator(prototype, 'x', Object.getOwnPropertyDescriptor(prototype, 'x') as TypedPropertyDescriptor<unknown>)
    expect(
      define((prototype) => {
        Res()(prototype, 'x', 0)
        on(prototype, Idempotent(options))
      }),
    ).toThrow(/Answers\.x takes @Res\(\) or @Next\(\)/)
    expect(
      define((prototype) => {
        Res({ passthrough: true })(prototype, 'x', 1)
        on(prototype, IdempotentFlow(options))
      }),
    ).toThrow(/takes @Res\(\) or @Next\(\)/)
    expect(
      define((prototype) => {
        Next()(prototype, 'x', 0)
        on(prototype, Idempotent(options))
      }),
    ).toThrow(/takes @Res\(\) or @Next\(\)/)
    expect(
      define((prototype) => {
        on(prototype, Idempotent(options))
        on(prototype, IdempotentFlow(options))
      }),
    ).toThrow(/Answers\.x has two of @Idempotent\(\) and @IdempotentFlow\(\)/)
  })

  it('lets a subclass decorate its override of an idempotent method again', () => {
    const on = (prototype: object, decorator: MethodDecorator) =>
      decorator(prototype, 'x', Object.getOwnPropertyDescriptor(prototype, 'x') as TypedPropertyDescriptor<unknown>)
    class Base {
      x() {
        return {}
      }
    }
    on(Base.prototype, Idempotent(options))
    class Child extends Base {
      override x() {
        return { child: true }
      }
    }
    expect(() => on(Child.prototype, Idempotent(options))).not.toThrow()
  })

  it('fails at bootstrap, naming the missing provider, in an app without IdempotencyModule', async () => {
    @Controller()
    class Lone {
      @Post('x')
      @Idempotent(options)
      x() {
        return {}
      }
    }
    await expect(Test.createTestingModule({ controllers: [Lone] }).compile()).rejects.toThrow(/IdempotentInterceptor/)
  })
})
