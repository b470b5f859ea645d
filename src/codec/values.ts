/**
 * The values the library stores, as the default codec and the canonical form (fingerprints)
 * both see them: their kinds, how a walk over one reports where it refused something, and the
 * depth bound that keeps a walk's recursion out of a client's hands.
 */
import * as kysely from 'kysely'
import { IdempotencySerializationError } from '../errors.js'

/**
 * Checks at compile time that a value type holds nothing the codec refuses where TypeScript can
 * see it: a function, a symbol, an object with methods (a class instance it cannot rebuild).
 * The library's functions take `Promise<T & Storable<T>>`, so that such a value is a type error
 * where it is returned, naming what is wrong; for a value that passes, `T & Storable<T>` is `T`.
 * What TypeScript cannot see (`unknown`, a class instance without methods) is checked when the
 * value is stored.
 *
 * The default codec keeps JSON's values plus `undefined`, `bigint`, `NaN`, `±Infinity`, `-0`,
 * `Date`, `Map`, `Set`, `Buffer`, typed arrays, and Kysely's `InsertResult`, `UpdateResult`,
 * `DeleteResult` (and `MergeResult`), in arrays and objects (also without a prototype).
 */
export type Storable<T> = unknown extends T
  ? T
  : T extends Atom
    ? T
    : T extends ReadonlyMap<infer K, infer V>
      ? ReadonlyMap<Storable<K>, Storable<V>>
      : T extends ReadonlySet<infer V>
        ? ReadonlySet<Storable<V>>
        : T extends readonly unknown[]
          ? { [I in keyof T]: Storable<T[I]> }
          : T extends (...args: never[]) => unknown
            ? 'a function cannot be stored'
            : T extends symbol
              ? 'a symbol cannot be stored'
              : T extends object
                ? { [K in keyof T]: Storable<T[K]> }
                : never

/**
 * Values stored as they are; everything else is taken apart (or refused).
 * @inline
 */
type Atom =
  | string
  | number
  | boolean
  | bigint
  | null
  | undefined
  // biome-ignore lint/suspicious/noConfusingVoidType: a function typed as returning void stores undefined.
  | void
  | Date
  | Uint8Array
  | Uint8ClampedArray
  | Int8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | Float32Array
  | Float64Array
  | BigInt64Array
  | BigUint64Array
  | kysely.InsertResult
  | kysely.UpdateResult
  | kysely.DeleteResult

const TYPED_ARRAYS = [
  Int8Array,
  Uint8Array,
  Uint8ClampedArray,
  Int16Array,
  Uint16Array,
  Int32Array,
  Uint32Array,
  Float32Array,
  Float64Array,
  BigInt64Array,
  BigUint64Array,
] as const
export type TypedArray = InstanceType<(typeof TYPED_ARRAYS)[number]>
const TYPED_BY_PROTOTYPE = new Map<object, (typeof TYPED_ARRAYS)[number]>(TYPED_ARRAYS.map((T) => [T.prototype, T]))
export const TYPED_BY_NAME = new Map<string, (typeof TYPED_ARRAYS)[number]>(TYPED_ARRAYS.map((T) => [T.name, T]))

// MergeResult came with Kysely 0.28; on 0.27 there is nothing to rebuild. The names are
// written out because they are stored: a minifier may rename the classes.
type ResultClass = abstract new (...args: never[]) => object
export const RESULT_CLASSES = new Map<object, { readonly name: string; readonly class: ResultClass }>()
for (const [name, c] of [
  ['InsertResult', kysely.InsertResult],
  ['UpdateResult', kysely.UpdateResult],
  ['DeleteResult', kysely.DeleteResult],
  ['MergeResult', (kysely as { MergeResult?: ResultClass }).MergeResult],
] as Array<[string, ResultClass | undefined]>) {
  if (c) RESULT_CLASSES.set(c.prototype as object, { name, class: c })
}

/** The kinds of value the codec and the canonical form know. */
type Kind = 'primitive' | 'object' | 'bare' | 'array' | 'date' | 'map' | 'set' | 'buffer' | 'typed' | 'result'

/**
 * How deep a value may nest. The walks over a value recurse, so a limit the caller controls (a
 * client's request body) would otherwise let anyone overflow the stack; well below where they
 * would, and far above any data a request or an answer holds.
 */
export const MAX_DEPTH = 512

/** Where a walk is, for messages (`body.items[2]`); formatted only when a value is refused. */
export class Path {
  readonly #steps: Array<string | number | readonly [number, 'key' | 'value' | 'member']> = []

  enter(step: string | number): void {
    this.#deeper()
    this.#steps.push(step)
  }
  /** Into a `Map` entry's key or value, or a `Set` member. */
  enterEntry(index: number, part: 'key' | 'value' | 'member'): void {
    this.#deeper()
    this.#steps.push([index, part])
  }
  #deeper(): void {
    if (this.#steps.length >= MAX_DEPTH) this.refuse(`nests more than ${MAX_DEPTH} levels deep, which cannot be stored`)
  }
  leave(): void {
    this.#steps.pop()
  }
  refuse(what: string): never {
    // A deep path is named by its start.
    const steps = this.#steps
      .slice(0, 12)
      .map((step) =>
        typeof step === 'number'
          ? `[${step}]`
          : typeof step !== 'string'
            ? `{${step[1]} ${step[0]}}`
            : /^[A-Za-z_$][\w$]*$/.test(step)
              ? `.${step}`
              : `[${JSON.stringify(step)}]`,
      )
    const more = this.#steps.length > steps.length ? '…' : ''
    const where = steps.length === 0 ? 'The value' : `The value at ${steps.join('').replace(/^\./, '')}${more}`
    throw new IdempotencySerializationError(`${where} ${what}.`)
  }
}

export function kindOf(value: unknown, path: Path): Kind {
  switch (typeof value) {
    case 'function':
      return path.refuse('is a function, which cannot be stored')
    case 'symbol':
      return path.refuse('is a symbol, which cannot be stored')
    case 'object':
      break
    default:
      return 'primitive'
  }
  if (value === null) return 'primitive'
  const prototype: unknown = Object.getPrototypeOf(value)
  if (prototype === Object.prototype) return 'object'
  if (prototype === null) return 'bare'
  if (prototype === Array.prototype) return 'array'
  if (prototype === Date.prototype) return 'date'
  if (prototype === Map.prototype) return 'map'
  if (prototype === Set.prototype) return 'set'
  if (prototype === Buffer.prototype) return 'buffer'
  if (TYPED_BY_PROTOTYPE.has(prototype as object)) return 'typed'
  if (RESULT_CLASSES.has(prototype as object)) return 'result'
  const name = (prototype as { constructor?: { name?: unknown } }).constructor?.name
  return path.refuse(
    `is ${typeof name === 'string' && name ? `a ${name}` : 'an object with a custom prototype'}, which cannot be rebuilt; ` +
      'store its data as a plain object instead',
  )
}

/** Own enumerable string keys; symbol keys cannot be stored. */
export function keysOf(value: object, path: Path): string[] {
  if (Object.getOwnPropertySymbols(value).some((s) => Object.prototype.propertyIsEnumerable.call(value, s))) {
    path.refuse('has a symbol key, which cannot be stored')
  }
  return Object.keys(value)
}

/** An array's elements; holes and extra properties cannot be stored faithfully. */
export function elementsOf(value: readonly unknown[], path: Path): readonly unknown[] {
  for (let i = 0; i < value.length; i++) if (!(i in value)) path.refuse(`has a hole at index ${i} (a sparse array), which cannot be stored`)
  if (keysOf(value, path).length !== value.length) path.refuse('is an array with extra properties, which cannot be stored')
  return value
}

export function bytesOf(value: TypedArray | Buffer): Buffer {
  return Buffer.from(value.buffer, value.byteOffset, value.byteLength)
}

/** Keys superjson refuses in the objects it walks, to guard against prototype pollution. */
export const GUARDED_KEYS = ['__proto__', 'constructor', 'prototype']

/** Visits each key and value of a `Map`, or each member of a `Set`, with the path set to it. */
export function eachEntry(
  container: ReadonlyMap<unknown, unknown> | ReadonlySet<unknown>,
  path: Path,
  visit: (item: unknown, part: 'key' | 'value' | 'member') => void,
): void {
  let i = 0
  if (container instanceof Set) {
    for (const member of container) {
      path.enterEntry(i++, 'member')
      visit(member, 'member')
      path.leave()
    }
    return
  }
  for (const [key, item] of container as ReadonlyMap<unknown, unknown>) {
    path.enterEntry(i, 'key')
    visit(key, 'key')
    path.leave()
    path.enterEntry(i++, 'value')
    visit(item, 'value')
    path.leave()
  }
}

/** Objects that superjson is given as their list of entries. */
export function storedAsEntries(object: object): boolean {
  const prototype: unknown = Object.getPrototypeOf(object)
  return prototype === null || (prototype === Object.prototype && hasGuardedKey(object))
}

export function hasGuardedKey(object: object): boolean {
  return GUARDED_KEYS.some((k) => Object.hasOwn(object, k))
}
/**
 * Whether `value` nests more than `limit` levels deep, found without recursion (asked of a
 * client's input before anything walks it).
 */
export function nestsDeeper(value: unknown, limit: number): boolean {
  const stack: Array<readonly [unknown, number]> = [[value, 0]]
  const seen = new Set<object>()
  while (stack.length) {
    const [item, depth] = stack.pop()!
    if (typeof item !== 'object' || item === null || seen.has(item)) continue
    if (depth >= limit) return true
    seen.add(item)
    const children =
      item instanceof Map ? [...item.keys(), ...item.values()] : item instanceof Set ? [...item] : ArrayBuffer.isView(item) ? [] : Object.values(item)
    for (const child of children) stack.push([child, depth + 1])
  }
  return false
}
