/**
 * The shared HTTP table's API (test/support/apps.ts) as a NestJS app, on the Express or the Fastify
 * platform: `POST|GET /orders` through `@Idempotent()`, `POST /rides` through `@IdempotentFlow()`.
 */
import type { IncomingHttpHeaders } from 'node:http'
import type { AddressInfo } from 'node:net'
import { Body, Controller, Get, Module, Post, type INestApplication } from '@nestjs/common'
import { NestFactory } from '@nestjs/core'
import { ExpressAdapter } from '@nestjs/platform-express'
import { FastifyAdapter } from '@nestjs/platform-fastify'
import type { Transaction } from 'kysely'
import type { Flow, Idempotency } from '../../index.js'
import { answer, CurrentFlow, Idempotent, IdempotencyModule, IdempotentFlow, Trx } from '../../nest/index.js'
import type { HttpResult } from '../../http/index.js'
import type { App, RouteSettings, Routes } from './apps.js'

type Platform = 'express' | 'fastify'

/** Starts the API as a Nest app on `platform`, on a free port. */
export async function startNest(platform: Platform, idempotency: Idempotency<any>, settings: RouteSettings, routes: Routes): Promise<App> {
  const { lockTimeout, ...common } = settings
  const scope = (req: { headers: IncomingHttpHeaders }) => (req.headers['x-user'] as string | undefined) ?? 'anonymous'
  const orders = { ...common, scope, required: true }
  const rides = { ...common, lockTimeout, scope, required: true }
  const ridden = routes.rides ?? (async (): Promise<HttpResult> => ({ status: 404 }))

  @Controller()
  class Api {
    @Post('orders')
    @Idempotent(orders)
    post(@Body() body: unknown, @Trx() trx: Transaction<any>) {
      return routes.orders(body, trx).then(answer)
    }

    @Get('orders')
    @Idempotent(orders)
    get(@Trx() trx: Transaction<any>) {
      return routes.orders(undefined, trx).then(answer)
    }

    @Post('rides')
    @(typeof ridden === 'function' ? IdempotentFlow(rides) : IdempotentFlow(rides, ridden))
    ride(@Body() body: unknown, @CurrentFlow() flow: Flow<any, HttpResult>) {
      if (typeof ridden !== 'function') throw new Error('A defined flow serves this route; the method never runs.')
      return ridden(body, flow).then(answer)
    }
  }

  @Module({ imports: [IdempotencyModule.forRoot({ idempotency })], controllers: [Api] })
  class AppModule {}

  const app: INestApplication = await NestFactory.create(AppModule, platform === 'express' ? new ExpressAdapter() : new FastifyAdapter(), {
    logger: false,
  })
  await app.listen(0, '127.0.0.1')
  const server = app.getHttpServer()
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: async () => {
      server.closeAllConnections()
      await app.close()
    },
  }
}
