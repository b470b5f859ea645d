/**
 * Compile-time checks, run by `tsc` in `npm test`: the types promise what a replay returns, and
 * a value the codec refuses is a type error where TypeScript can see it. Each
 * `@ts-expect-error` fails the type check if the line below it compiles.
 */
import type { InsertResult, Kysely, Transaction } from 'kysely'
import {
  IdempotencyConflictError,
  IdempotencyError,
  IdempotencyKeyReuseError,
  IdempotencyMigrationError,
  problemDetails,
  type ConflictReason,
  type Flow,
  type Idempotency,
  type IdempotencyErrorCode,
  type Execution,
} from '../index.js'

interface Database {
  orders: { id: number; item: string; created_at: Date; amount: bigint }
}
interface Order {
  readonly id: number
  readonly created_at: Date
  readonly tags?: readonly string[]
}
class WithMethods {
  readonly id = 1
  total(): number {
    return 1
  }
}

declare const idempotency: Idempotency<Database>
declare const db: Kysely<Database>
declare const trx: Transaction<Database>
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false
const expectType = <A, B>(_proof: Equal<A, B>) => undefined

export async function returnsWhatTheFunctionReturns() {
  const order = await idempotency.transaction('k', (trx) => trx.selectFrom('orders').selectAll().executeTakeFirstOrThrow())
  expectType<typeof order, { id: number; item: string; created_at: Date; amount: bigint }>(true)
  const inserted = await idempotency.transaction('k', (trx) =>
    trx.insertInto('orders').values({ id: 1, item: 'x', created_at: new Date(), amount: 1n }).executeTakeFirst(),
  )
  expectType<typeof inserted, InsertResult>(true)
  const typed = await idempotency.withIdempotency(trx, 'k', async (): Promise<Order> => ({ id: 1, created_at: new Date() }))
  expectType<typeof typed, Order>(true)
  const collections = await idempotency.transaction('k', async () => ({ m: new Map([['a', 1n]]), s: new Set([new Date()]), u: new Uint8Array(1) }))
  expectType<typeof collections, { m: Map<string, bigint>; s: Set<Date>; u: Uint8Array<ArrayBuffer> }>(true)
  const nothing = await idempotency.transaction('k', async () => undefined)
  expectType<typeof nothing, undefined>(true)
  const unknownValue = await idempotency.transaction('k', async () => JSON.parse('1') as unknown)
  expectType<typeof unknownValue, unknown>(true)

  const ride = await idempotency.run('k', async (flow: Flow<Database, { status: number; at: Date }>) => {
    const created = await flow.phase('created', async (trx) => trx.selectFrom('orders').select(['id', 'created_at']).executeTakeFirstOrThrow())
    expectType<typeof created, { id: number; created_at: Date }>(true)
    const updated = await flow.phase('updated', (trx) => trx.updateTable('orders').set({ item: 'y' }).execute())
    expectType<(typeof updated)[number]['numUpdatedRows'], bigint>(true)
    const charge = await flow.step('charge', async () => ({ id: 'ch_1', amount: 5n }))
    expectType<typeof charge, { id: string; amount: bigint }>(true)
    if (charge.amount > 10n) flow.fail({ status: 402, at: created.created_at })
    return { status: 201, at: created.created_at }
  })
  expectType<typeof ride, { status: number; at: Date }>(true)

  // Without a type argument, the result type is what the flow returns.
  const inferred = await idempotency.run('k', async (flow) => ({ status: 201, id: await flow.phase('p', async () => 1) }))
  expectType<typeof inferred, { status: number; id: number }>(true)
  const executed = await idempotency.executeRun('k', async (flow) => flow.step('s', async () => 'text'))
  expectType<typeof executed, Execution<string>>(true)
  const declined = await idempotency.run<{ status: number }>('k', async (flow) => {
    if (Math.random() > 0.5) flow.fail({ status: 402 })
    return { status: 201 }
  })
  expectType<typeof declined, { status: number }>(true)
  // @ts-expect-error fail() needs the result type, given as the type argument
  await idempotency.run('k', async (flow) => (flow.fail({ status: 402 }), { status: 201 }))
  // The same for a flow defined by name.
  const defined = idempotency.defineFlow('inferred', async (flow, request: number) => ({ id: await flow.phase('p', async () => request) }))
  expectType<Awaited<ReturnType<typeof defined.run>>, { id: number }>(true)
  const failing = idempotency.defineFlow<{ status: number }, string>('failing', async (flow, request) => {
    if (request === 'declined') flow.fail({ status: 402 })
    return { status: 201 }
  })
  expectType<Awaited<ReturnType<typeof failing.run>>, { status: number }>(true)
  return db
}

export async function refusesWhatCannotBeStored() {
  // @ts-expect-error a function cannot be stored
  await idempotency.transaction('k', async () => ({ callback: () => 1 }))
  // @ts-expect-error a symbol cannot be stored
  await idempotency.withIdempotency(trx, 'k', async () => ({ tag: Symbol('x') }))
  // @ts-expect-error an instance with methods cannot be rebuilt
  await idempotency.transaction('k', async () => new WithMethods())
  // @ts-expect-error nested in a Map
  await idempotency.transaction('k', async () => new Map([['k', () => 1]]))
  await idempotency.run('k', async (flow) => {
    // @ts-expect-error a phase value is stored too
    await flow.phase('p', async () => ({ at: () => new Date() }))
    // @ts-expect-error and a step value
    await flow.step('s', async () => Symbol('s'))
    return 1
  })
  // @ts-expect-error so is the flow's response
  await idempotency.run('k', async () => ({ render: () => 'x' }))
}

export function errorCodesAreAUnionThatEachClassNarrows(error: unknown) {
  if (error instanceof IdempotencyError) {
    expectType<typeof error.code, IdempotencyErrorCode>(true)
    // @ts-expect-error a code no error has
    if (error.code === 'no_such_code') return
  }
  if (error instanceof IdempotencyConflictError) {
    expectType<typeof error.code, 'conflict'>(true)
    expectType<typeof error.reason, ConflictReason>(true)
  }
  if (error instanceof IdempotencyKeyReuseError) expectType<typeof error.code, 'key_reuse'>(true)
  if (error instanceof IdempotencyMigrationError) expectType<typeof error.code, 'migration_failed'>(true)
  if (error instanceof IdempotencyError) {
    const problem = problemDetails(error)
    expectType<typeof problem.status, number>(true)
    expectType<typeof problem.body.detail, string | undefined>(true)
  }
}
