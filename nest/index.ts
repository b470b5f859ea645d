/**
 * NestJS 11 and 12, on the Express and the Fastify platform: a module that holds the
 * idempotency instance, and method decorators that serve a controller method through the shared
 * HTTP route (`http/`) as the other adapters do.
 */
import {
  createParamDecorator,
  Inject,
  Injectable,
  Module,
  Res,
  SetMetadata,
  UseInterceptors,
  type DynamicModule,
  type ExecutionContext,
  type FactoryProvider,
  type InjectionToken,
} from '@nestjs/common'
import { ROUTE_ARGS_METADATA } from '@nestjs/common/constants.js'
import { RouteParamtypes } from '@nestjs/common/enums/route-paramtypes.enum.js'
import type { Idempotency } from '../src/api.js'
import { IdempotencySetupError } from '../src/errors.js'
import type { RunOptions, TransactionOptions } from '../src/options.js'
import { IdempotentRoute, type HttpDefinedFlow, type HttpResult, type IdempotentOptions } from '../http/index.js'
import { branded, IdempotentInterceptor, metadataOf, runningOf, SERVED, type Call, type Served } from './route.js'

export { parseKeyHeader, UNSCOPED } from '../http/index.js'
export type { HttpDefinedFlow, HttpFlowRequest, HttpResult, IdempotentOptions } from '../http/index.js'

/** The injection token of the idempotency instance the module holds. */
export const IDEMPOTENCY: InjectionToken = Symbol('kysely-idempotency')

/** What {@link IdempotencyModule.forRoot} takes. */
export interface IdempotencyModuleOptions<DB> {
  /** The instance idempotent methods run on (`createIdempotency(db, …)`). */
  readonly idempotency: Idempotency<DB>
}

/** What {@link IdempotencyModule.forRootAsync} takes: a factory of the options, with its dependencies. */
export interface IdempotencyModuleAsyncOptions<DB> {
  readonly imports?: DynamicModule['imports']
  readonly inject?: FactoryProvider['inject']
  readonly useFactory: (...dependencies: never[]) => IdempotencyModuleOptions<DB> | Promise<IdempotencyModuleOptions<DB>>
}

/**
 * Holds the idempotency instance for the decorators, in every module of the app (it is global):
 * import it once, in the root module.
 *
 * ### Examples
 *
 * ```ts
 * import { Module } from '@nestjs/common'
 * import { IdempotencyModule } from 'kysely-idempotency/nest'
 * import { idempotency } from './app'
 *
 * @Module({ imports: [IdempotencyModule.forRoot({ idempotency })] })
 * export class AppModule {}
 * ```
 */
// biome-ignore lint/complexity/noStaticOnlyClass: Nest's modules are classes, configured by their static forRoot().
export class IdempotencyModule {
  static forRoot<DB>(options: IdempotencyModuleOptions<DB>): DynamicModule {
    return IdempotencyModule.#holding([{ provide: IDEMPOTENCY, useValue: options.idempotency }])
  }

  /** {@link forRoot} with the instance built by a factory, e.g. from a Kysely instance another module provides. */
  static forRootAsync<DB>(options: IdempotencyModuleAsyncOptions<DB>): DynamicModule {
    return IdempotencyModule.#holding(
      [
        {
          provide: IDEMPOTENCY,
          inject: options.inject ?? [],
          useFactory: async (...dependencies: never[]) => (await options.useFactory(...dependencies)).idempotency,
        },
      ],
      options.imports,
    )
  }

  static #holding(providers: NonNullable<DynamicModule['providers']>, imports?: DynamicModule['imports']): DynamicModule {
    return {
      module: IdempotencyModule,
      global: true,
      ...(imports ? { imports } : {}),
      providers: [...providers, IdempotentInterceptor],
      exports: [IDEMPOTENCY, IdempotentInterceptor],
    }
  }
}
Module({})(IdempotencyModule)
Injectable()(IdempotentInterceptor)
Inject(IDEMPOTENCY)(IdempotentInterceptor, undefined, 0)

/**
 * Runs the method at most once per `Idempotency-Key`, inside a transaction that stores its
 * answer, and replays that answer to retries with `Idempotency-Replayed: true`; the method gets
 * the transaction with {@link Trx}. It behaves as the other adapters do (docs: HTTP adapters):
 * errors of the key are `application/problem+json`, a thrown error (an `HttpException` too)
 * goes on to Nest's exception filters with nothing stored, and a 5xx answer is sent, not stored,
 * with its writes rolled back.
 *
 * The answer is what the method returns: the body, with the `@HttpCode()` status (201 for POST,
 * 200 otherwise) and the `@Header()` headers; or {@link answer} for a status and headers of its
 * own. The interceptor sends it itself, so that retries get the same bytes. Interceptors listed
 * above `@Idempotent()` run inside it, around the method, and shape what is stored; those that
 * run before it (global and controller-wide ones, a `ClassSerializerInterceptor`, those listed
 * below `@Idempotent()`) wrap the send and cannot change the body, so a returned class instance
 * is refused rather than stored unshaped.
 *
 * Guards run first. Interceptors that read the request must run before this one: list
 * `FileInterceptor()` below `@Idempotent()`, so that the files it reads are part of the
 * fingerprint. A method with `@Res()` or `@Next()` answers by itself and is refused when the
 * controller is defined. Needs {@link IdempotencyModule} in the app.
 *
 * ### Examples
 *
 * ```ts
 * import { Body, Controller, Post } from '@nestjs/common'
 * import type { Transaction } from 'kysely'
 * import { Idempotent, Trx } from 'kysely-idempotency/nest'
 * import type { Database } from './app'
 *
 * @Controller('charges')
 * export class ChargesController {
 *   @Post()
 *   @Idempotent({ scope: (req: { user: { id: string } }) => req.user.id, required: true })
 *   async create(@Body() body: { customer: string; amount: number }, @Trx() trx: Transaction<Database>) {
 *     return trx.insertInto('charges').values({ ...body, currency: 'usd' }).returningAll().executeTakeFirstOrThrow()
 *   }
 * }
 * ```
 */
export function Idempotent<Req extends object>(options: IdempotentOptions<Req> & TransactionOptions): MethodDecorator {
  return serving('transaction', options)
}

/**
 * {@link Idempotent} for an atomic-phases flow (`idempotency.run`): the method gets the flow with
 * {@link CurrentFlow}. A 5xx answer is sent and not stored; the lock is released and the
 * recorded phases are kept, so a retry resumes. An answer given with `flow.fail()` follows the
 * same rules as a returned one.
 *
 * Given a flow defined with `idempotency.defineFlow()` (see `HttpFlowRequest`), the route runs
 * that flow instead of the method, so that the recovery worker can finish a run the process left;
 * the method's body is never called.
 *
 * ### Examples
 *
 * ```ts
 * import { Body, Controller, Post } from '@nestjs/common'
 * import type { Flow } from 'kysely-idempotency'
 * import { CurrentFlow, IdempotentFlow, type HttpResult } from 'kysely-idempotency/nest'
 * import { insertRide, payments, type Database, type RideRequest } from './app'
 *
 * @Controller('rides')
 * export class RidesController {
 *   @Post()
 *   @IdempotentFlow({ scope: (req: { user: { id: string } }) => req.user.id })
 *   async create(@Body() body: RideRequest, @CurrentFlow() flow: Flow<Database, HttpResult>) {
 *     const ride = await flow.phase('ride_created', (trx) => insertRide(trx, body))
 *     const charge = await flow.step('charge_created', () => payments.charge(ride, { idempotencyKey: flow.stepKey('charge_created') }))
 *     return { ...ride, charge: charge.id }
 *   }
 * }
 * ```
 */
export function IdempotentFlow<Req extends object>(options: IdempotentOptions<Req> & RunOptions, defined?: HttpDefinedFlow): MethodDecorator {
  return serving('flow', options, defined)
}

/** The transaction of an {@link Idempotent} method: its writes commit with the stored answer. */
export function Trx(): ParameterDecorator {
  return trxParameter()
}

/** The flow of an {@link IdempotentFlow} method. */
export function CurrentFlow(): ParameterDecorator {
  return flowParameter()
}

const trxParameter = createParamDecorator((_data: unknown, context: ExecutionContext) => runningOf(context, 'transaction'))
const flowParameter = createParamDecorator((_data: unknown, context: ExecutionContext) => runningOf(context, 'flow'))

/**
 * An answer with a status and headers of the method's own, instead of its `@HttpCode()` and
 * `@Header()` ones: `return answer({ status: 200, body: existing })`.
 */
export function answer(result: HttpResult): HttpResult {
  return branded(result)
}

function serving<Req extends object>(
  mode: Served['mode'],
  options: IdempotentOptions<Req> & TransactionOptions & RunOptions,
  defined?: HttpDefinedFlow,
): MethodDecorator {
  const scope = options?.scope
  // Built now, so that a mistake in the options fails when the controller is defined.
  const route = new IdempotentRoute<Call>({
    ...options,
    scope: typeof scope === 'function' ? (call: Call) => scope(call.request as Req) : scope,
  })
  const served: Served = { mode, route, ...(defined ? { defined } : {}) }
  return (target, property, descriptor) => {
    const where = `${target.constructor.name}.${String(property)}`
    if (metadataOf(SERVED, descriptor.value as object) !== undefined) {
      throw new IdempotencySetupError(`${where} has two of @Idempotent() and @IdempotentFlow(): keep one.`)
    }
    const declared = Object.entries(metadataOf<Record<string, object>>(ROUTE_ARGS_METADATA, target.constructor, property) ?? {})
      .filter(([, entry]) => !hiddenResponses.has(entry))
      .map(([key]) => key)
    if (declared.some((key) => answersItself(key))) {
      throw new IdempotencySetupError(
        `${where} takes @Res() or @Next(), so it answers by itself and its answer cannot be stored: return the body, or answer({ status, body, headers }).`,
      )
    }
    SetMetadata(SERVED, served)(target, property, descriptor)
    UseInterceptors(IdempotentInterceptor)(target, property, descriptor)
    // A response parameter tells Nest that the method answers by itself, so that Nest does not
    // send the value the interceptor hands back after it sent the answer. It goes after every
    // parameter the method has: past the last decorated one, and past any the method declares
    // (a parameter with a default value is not counted by `length`, hence the floor).
    const last = Math.max(-1, ...declared.map((key) => Number(key.slice(key.lastIndexOf(':') + 1))))
    const method = descriptor.value as unknown as (...args: unknown[]) => unknown
    const index = Math.max(last + 1, method.length, HIDDEN_RESPONSE)
    Res()(target, property, index)
    const entry = metadataOf<Record<string, object>>(ROUTE_ARGS_METADATA, target.constructor, property)?.[`${RouteParamtypes.RESPONSE}:${index}`]
    if (entry) hiddenResponses.add(entry)
    return descriptor
  }
}

/**
 * The response parameters the decorators added, told apart from a method's own `@Res()`: a
 * subclass that decorates an override again sees its parent's (Nest copies the entries).
 */
const hiddenResponses = new WeakSet<object>()

/** The least index of the hidden response parameter: past any parameter list written by hand. */
const HIDDEN_RESPONSE = 32

/** Whether a route argument key (`${type}:${index}`) is `@Res()` or `@Next()`, which answer by themselves. */
function answersItself(key: string): boolean {
  const type = key.slice(0, key.indexOf(':'))
  return type === String(RouteParamtypes.RESPONSE) || type === String(RouteParamtypes.NEXT)
}
