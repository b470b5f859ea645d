/**
 * The same small API on every HTTP adapter, served over real HTTP, so that one table of tests
 * runs over all of them: `POST|GET /orders` through `idempotent`, `POST /rides` through
 * `idempotentFlow`. Both take the scope from the `x-user` header and require a key.
 */
import { createServer, request as httpRequest, type IncomingMessage, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import express5 from 'express'
import express4 from 'express4'
import Fastify, { type FastifyRequest } from 'fastify'
import { bodyParser } from '@koa/bodyparser'
import { Hono } from 'hono'
import Koa, { type Context as KoaContext } from 'koa'
import type { Kysely, Transaction } from 'kysely'
import * as forExpress from '../../express/index.js'
import * as forFastify from '../../fastify/index.js'
import * as forFetch from '../../fetch/index.js'
import * as forKoa from '../../koa/index.js'
import type { HttpDefinedFlow, HttpFlowRequest, HttpResult } from '../../http/index.js'
import { startNest } from './nest.js'
import { rideFlow, type Ride, type RidePoint } from './ride.js'
import type { Flow, Idempotency } from '../../index.js'

/** What a route does, whatever the framework: the parsed JSON body in (`undefined` without one), an answer out. */
export interface Routes {
  readonly orders: (body: unknown, trx: Transaction<any>) => Promise<HttpResult>
  /** A flow function of the body, or a flow defined with `defineFlow` (which gets the request as stored). */
  readonly rides?: ((body: unknown, flow: Flow<any, HttpResult>) => Promise<HttpResult>) | HttpDefinedFlow
}

export interface RouteSettings {
  readonly ttl?: number
  readonly conflictWait?: number
  readonly lockTimeout?: number
  readonly reuse?: 'replay' | 'reject'
  readonly maxStoredBytes?: number
  readonly oversized?: 'refuse' | 'omit-body'
  readonly expiryHeader?: boolean
}

/** An app listening on loopback. */
export interface App {
  /** `http://127.0.0.1:<port>` */
  readonly url: string
  close(): Promise<void>
}

export const ADAPTER_NAMES = ['express 5', 'express 4', 'fastify', 'fetch', 'hono', 'koa', 'nest express', 'nest fastify'] as const
export type AdapterName = (typeof ADAPTER_NAMES)[number]

const user = (value: string | null | undefined) => value ?? 'anonymous'

/**
 * The ride flow (test/support/ride.ts) defined as `ride` for the `/rides` route: the body's `id`
 * names the ride, and `at` runs at every point of it.
 */
export function defineRides(
  idempotency: Idempotency<any>,
  db: Kysely<any>,
  effects: string,
  at?: (point: RidePoint) => Promise<void>,
): HttpDefinedFlow {
  return idempotency.defineFlow('ride', async (flow, request: HttpFlowRequest<{ id: string }>) => {
    // The ride flow never calls fail(), the one member whose type differs.
    const { status, ...answer } = await rideFlow(db, effects, request.body.id, at)(flow as unknown as Flow<any, Ride>)
    return { status, body: answer }
  })
}

/** Starts the API on `adapter`, on a free port. */
export async function startApp(adapter: AdapterName, idempotency: Idempotency<any>, settings: RouteSettings, routes: Routes): Promise<App> {
  const { lockTimeout, ...common } = settings
  const orders = { ...common, required: true }
  const rides = { ...common, lockTimeout, required: true }
  const noRides = async (): Promise<HttpResult> => ({ status: 404 })
  const ridesOf = <Req>(body: (req: Req) => unknown) => {
    const rides = routes.rides ?? noRides
    return typeof rides === 'function' ? async (req: Req, flow: Flow<any, HttpResult>) => rides(await body(req), flow) : rides
  }
  switch (adapter) {
    case 'express 5':
    case 'express 4': {
      const express = adapter === 'express 5' ? express5 : (express4 as unknown as typeof express5)
      const { idempotent, idempotentFlow } = forExpress
      const app = express()
      app.use(express.json())
      const scope = (req: { get(name: string): string | undefined }) => user(req.get('x-user'))
      const route = idempotent(idempotency, { ...orders, scope }, (req, trx) => routes.orders(req.body, trx))
      app.post('/orders', route)
      app.get('/orders', route)
      app.post(
        '/rides',
        idempotentFlow(
          idempotency,
          { ...rides, scope },
          ridesOf((req: express5.Request) => req.body),
        ),
      )
      return listening(app.listen(0, '127.0.0.1'))
    }
    case 'fastify': {
      const { idempotent, idempotentFlow } = forFastify
      const app = Fastify()
      const scope = (request: FastifyRequest) => user(request.headers['x-user'] as string | undefined)
      const route = idempotent(idempotency, { ...orders, scope }, (request, trx) => routes.orders(request.body, trx))
      app.post('/orders', route)
      app.get('/orders', route)
      app.post(
        '/rides',
        idempotentFlow(
          idempotency,
          { ...rides, scope },
          ridesOf((request: FastifyRequest) => request.body),
        ),
      )
      await app.listen({ port: 0, host: '127.0.0.1' })
      return {
        url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`,
        close: async () => {
          app.server.closeAllConnections()
          await app.close()
        },
      }
    }
    case 'fetch': {
      const { idempotent, idempotentFlow } = forFetch
      const scope = (request: Request) => user(request.headers.get('x-user'))
      const route = idempotent(idempotency, { ...orders, scope }, async (request, trx) => routes.orders(await jsonOf(request), trx))
      const ride = idempotentFlow(idempotency, { ...rides, scope }, ridesOf(jsonOf))
      return serveFetch((request) => {
        const path = new URL(request.url).pathname
        if (path === '/orders') return route(request)
        if (path === '/rides' && request.method === 'POST') return ride(request)
        return Promise.resolve(new Response(null, { status: 404 }))
      })
    }
    case 'hono': {
      const { idempotent, idempotentFlow } = forFetch
      type Env = { Variables: { user: string } }
      const app = new Hono<Env>()
      app.use(async (c, next) => {
        c.set('user', user(c.req.header('x-user')))
        await next()
      })
      type Context = { get(name: 'user'): string }
      const scope = (_request: Request, c: Context) => c.get('user')
      const route = idempotent(idempotency, { ...orders, scope }, async (request, trx) => routes.orders(await jsonOf(request), trx))
      const ride = idempotentFlow<any, [Context]>(idempotency, { ...rides, scope }, ridesOf(jsonOf))
      app.on(['GET', 'POST'], '/orders', (c) => route(c.req.raw, c))
      app.post('/rides', (c) => ride(c.req.raw, c))
      return serveFetch((request) => Promise.resolve(app.fetch(request)))
    }
    case 'koa': {
      const { idempotent, idempotentFlow } = forKoa
      const app = new Koa()
      // A thrown error answers 500 without a stack trace on the test's output.
      app.silent = true
      app.use(bodyParser())
      const scope = (ctx: KoaContext) => user(ctx.get('x-user') || undefined)
      const route = idempotent(idempotency, { ...orders, scope }, (ctx, trx) => routes.orders(ctx.request.body, trx))
      const ride = idempotentFlow(
        idempotency,
        { ...rides, scope },
        ridesOf((ctx: KoaContext) => ctx.request.body),
      )
      app.use(async (ctx, next) => {
        if (ctx.path === '/orders' && (ctx.method === 'POST' || ctx.method === 'GET')) return route(ctx, next)
        if (ctx.path === '/rides' && ctx.method === 'POST') return ride(ctx, next)
        return next()
      })
      return listening(app.listen(0, '127.0.0.1'))
    }
    case 'nest express':
      return startNest('express', idempotency, settings, routes)
    case 'nest fastify':
      return startNest('fastify', idempotency, settings, routes)
  }
}

async function jsonOf(request: Request): Promise<unknown> {
  const text = await request.text()
  return text ? JSON.parse(text) : undefined
}

async function listening(server: Server): Promise<App> {
  await new Promise((resolve) => server.once('listening', resolve))
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: async () => {
      server.closeAllConnections()
      await new Promise((resolve) => server.close(resolve))
    },
  }
}

/** Headers Node's HTTP server manages itself; the rest go to the Fetch handler as sent, repeated lines joined as the Fetch API joins them. */
const HOP = new Set(['host', 'connection', 'content-length', 'transfer-encoding', 'keep-alive'])

/** Serves a Fetch API handler with Node's HTTP server, as @hono/node-server and Next.js do. */
function serveFetch(handle: (request: Request) => Promise<Response>): Promise<App> {
  const server = createServer(async (req, res) => {
    try {
      const response = await handle(await toRequest(req))
      const lines: string[] = []
      response.headers.forEach((value, name) => {
        if (name !== 'set-cookie') lines.push(name, value)
      })
      for (const cookie of response.headers.getSetCookie()) lines.push('set-cookie', cookie)
      res.writeHead(response.status, lines)
      res.end(Buffer.from(await response.arrayBuffer()))
    } catch {
      res.writeHead(500, { 'content-type': 'text/plain' })
      res.end('Internal Server Error')
    }
  })
  return listening(server.listen(0, '127.0.0.1'))
}

async function toRequest(req: IncomingMessage): Promise<Request> {
  const headers = new Headers()
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    if (!HOP.has(req.rawHeaders[i]!.toLowerCase())) headers.append(req.rawHeaders[i]!, req.rawHeaders[i + 1]!)
  }
  const chunks: Buffer[] = []
  for await (const chunk of req) chunks.push(chunk as Buffer)
  const body = chunks.length ? Buffer.concat(chunks) : undefined
  return new Request(`http://${req.headers.host}${req.url}`, { method: req.method, headers, ...(body ? { body } : {}) })
}

/** A response read off the wire: status, headers (repeated lines kept apart), body text. */
export interface RawResponse {
  readonly status: number
  readonly headers: Readonly<Record<string, string | string[] | undefined>>
  readonly body: string
}

/** Sends a request with exactly these header lines (`fetch` would join repeated ones into one). */
export function sendLines(url: string, method: string, lines: ReadonlyArray<readonly [string, string]>, body?: string): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const target = new URL(url)
    // An array value is sent as one line per element.
    const headers: Record<string, string[]> = {}
    for (const [name, value] of lines) (headers[name.toLowerCase()] ??= []).push(value)
    const req = httpRequest({ host: target.hostname, port: target.port, path: target.pathname + target.search, method, headers }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => (text += chunk))
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: text }))
    })
    req.on('error', reject)
    req.end(body)
  })
}
