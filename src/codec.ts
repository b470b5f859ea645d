import * as kysely from 'kysely'
import SuperJSON from 'superjson'
import { IdempotencySerializationError, IdempotencySetupError } from './errors.js'

/**
 * Turns the values the library stores (results, phase and step values, `flow.fail` responses)
 * into text and back. The default, {@link defaultCodec}, keeps what JSON loses; a codec of your
 * own can wrap it, e.g. to encrypt stored responses.
 *
 * ### Examples
 *
 * ```ts
 * import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto'
 * import { createIdempotency, defaultCodec, type Codec } from 'kysely-idempotency'
 *
 * const secret = randomBytes(32) // in production: a key from your secret store
 * const encrypted: Codec = {
 *   name: 'aes-256-gcm',
 *   encode(value) {
 *     const iv = randomBytes(12)
 *     const cipher = createCipheriv('aes-256-gcm', secret, iv)
 *     const data = Buffer.concat([cipher.update(defaultCodec.encode(value), 'utf8'), cipher.final()])
 *     return [iv, cipher.getAuthTag(), data].map((part) => part.toString('base64')).join('.')
 *   },
 *   decode(text) {
 *     const [iv, tag, data] = text.split('.').map((part) => Buffer.from(part, 'base64'))
 *     const decipher = createDecipheriv('aes-256-gcm', secret, iv!)
 *     decipher.setAuthTag(tag!)
 *     return defaultCodec.decode(Buffer.concat([decipher.update(data!), decipher.final()]).toString('utf8'))
 *   },
 * }
 * const idempotency = createIdempotency({ db, codec: encrypted })
 * ```
 */
export interface Codec {
  /**
   * Stored with every value this codec writes, so that a row is always read back by the codec
   * that wrote it, and an instance without that codec says so instead of misreading it.
   * Default `custom`. The name `superjson` belongs to {@link defaultCodec}.
   */
  readonly name?: string
  /** The text to store for `value`; throws to refuse it (the transaction then rolls back). */
  encode(value: unknown): string
  /** The value `text` was made from. */
  decode(text: string): unknown
}

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

/** Values stored as they are; everything else is taken apart (or refused). */
type Atom =
  | string
  | number
  | boolean
  | bigint
  | null
  | undefined
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
type TypedArray = InstanceType<(typeof TYPED_ARRAYS)[number]>
const TYPED_BY_PROTOTYPE = new Map<object, (typeof TYPED_ARRAYS)[number]>(TYPED_ARRAYS.map((T) => [T.prototype, T]))
const TYPED_BY_NAME = new Map<string, (typeof TYPED_ARRAYS)[number]>(TYPED_ARRAYS.map((T) => [T.name, T]))

// MergeResult came with Kysely 0.28; on 0.27 there is nothing to rebuild. The names are
// written out because they are stored: a minifier may rename the classes.
type ResultClass = abstract new (...args: never[]) => object
const RESULT_CLASSES = new Map<object, { readonly name: string; readonly class: ResultClass }>()
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
class Path {
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
    const steps = this.#steps.slice(0, 12).map((step) =>
      typeof step === 'number' ? `[${step}]` : typeof step !== 'string' ? `{${step[1]} ${step[0]}}` : /^[A-Za-z_$][\w$]*$/.test(step) ? `.${step}` : `[${JSON.stringify(step)}]`,
    )
    const more = this.#steps.length > steps.length ? '…' : ''
    const where = steps.length === 0 ? 'The value' : `The value at ${steps.join('').replace(/^\./, '')}${more}`
    throw new IdempotencySerializationError(`${where} ${what}.`)
  }
}

function kindOf(value: unknown, path: Path): Kind {
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
function keysOf(value: object, path: Path): string[] {
  if (Object.getOwnPropertySymbols(value).some((s) => Object.prototype.propertyIsEnumerable.call(value, s))) {
    path.refuse('has a symbol key, which cannot be stored')
  }
  return Object.keys(value)
}

/** An array's elements; holes and extra properties cannot be stored faithfully. */
function elementsOf(value: readonly unknown[], path: Path): readonly unknown[] {
  for (let i = 0; i < value.length; i++) if (!(i in value)) path.refuse(`has a hole at index ${i} (a sparse array), which cannot be stored`)
  if (keysOf(value, path).length !== value.length) path.refuse('is an array with extra properties, which cannot be stored')
  return value
}

function bytesOf(value: TypedArray | Buffer): Buffer {
  return Buffer.from(value.buffer, value.byteOffset, value.byteLength)
}

/** Keys superjson refuses in the objects it walks, to guard against prototype pollution. */
const GUARDED_KEYS = ['__proto__', 'constructor', 'prototype']

/**
 * Throws `IdempotencySerializationError`, naming where, for anything {@link defaultCodec}
 * cannot rebuild exactly. Shared references and cycles are kept, so a visited object is not
 * walked twice; but an object stored as its entries (see {@link storedAsEntries}) has each
 * value encoded on its own, so a cycle below one (`inside`) could not be written.
 */
function checkStorable(value: unknown, path: Path, seen: Set<object>, ancestors: Set<object>, inside: boolean): void {
  const kind = kindOf(value, path)
  if (kind === 'primitive') return
  const object = value as object
  if (ancestors.has(object) && (inside || storedAsEntries(object))) {
    path.refuse('contains itself (a cycle) through an object without a prototype or with a property named __proto__, constructor or prototype, which the codec cannot keep')
  }
  if (seen.has(object)) return
  seen.add(object)
  if (kind === 'date' || kind === 'buffer' || kind === 'typed') return
  const within = inside || storedAsEntries(object)
  const visit = (item: unknown) => checkStorable(item, path, seen, ancestors, within)
  ancestors.add(object)
  switch (kind) {
    case 'object':
    case 'bare':
    case 'result':
      for (const key of keysOf(object, path)) {
        path.enter(key)
        visit((object as Record<string, unknown>)[key])
        path.leave()
      }
      break
    case 'array':
      elementsOf(object as unknown[], path).forEach((item, i) => {
        path.enter(i)
        visit(item)
        path.leave()
      })
      break
    case 'map':
    case 'set':
      eachEntry(object as ReadonlyMap<unknown, unknown> | ReadonlySet<unknown>, path, visit)
  }
  ancestors.delete(object)
}

/** Visits each key and value of a `Map`, or each member of a `Set`, with the path set to it. */
function eachEntry(container: ReadonlyMap<unknown, unknown> | ReadonlySet<unknown>, path: Path, visit: (item: unknown, part: 'key' | 'value' | 'member') => void): void {
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

/** What a superjson custom transformer hands over (superjson does not export its own name for it). */
type Json = string | number | boolean | null | undefined | Json[] | { [key: string]: Json }

const superjson = new SuperJSON()
for (const { name, class: c } of RESULT_CLASSES.values()) superjson.registerClass(c as unknown as new () => object, { identifier: `kysely.${name}` })
// Buffers and typed arrays are stored as [type, base64 of their bytes]: superjson's own rule
// writes typed arrays as number lists, which loses NaN, -0 and bigints, and a Buffer would come
// back as a plain Uint8Array.
superjson.registerCustom<TypedArray | Buffer, [string, string]>(
  {
    isApplicable: (v): v is TypedArray | Buffer => ArrayBuffer.isView(v) && !(v instanceof DataView),
    serialize: (v) => [Buffer.isBuffer(v) ? 'Buffer' : v.constructor.name, bytesOf(v).toString('base64')],
    deserialize: ([type, base64]) => {
      const bytes = Buffer.from(base64, 'base64')
      if (type === 'Buffer') return bytes
      const Typed = TYPED_BY_NAME.get(type)
      if (!Typed) throw new IdempotencySerializationError(`The stored value holds an unknown typed array "${type}".`)
      return new Typed(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength))
    },
  },
  'bytes',
)
// Objects superjson cannot walk as they are (one without a prototype would come back with one;
// a key it guards against would be refused) are stored as their list of entries, each value
// encoded on its own: superjson's references by path cannot point into such a list.
const byEntries = (name: string, applies: (prototype: unknown, v: object) => boolean, create: () => Record<string, unknown>) =>
  superjson.registerCustom<Record<string, unknown>, Array<[string, Json]>>(
    {
      isApplicable: (v): v is Record<string, unknown> => typeof v === 'object' && v !== null && applies(Object.getPrototypeOf(v), v),
      serialize: (v) => Object.entries(v).map(([key, value]) => [key, superjson.serialize(value) as unknown as Json]),
      deserialize: (entries) => {
        const object = create()
        for (const [key, encoded] of entries) {
          const value = superjson.deserialize(encoded as unknown as Parameters<typeof superjson.deserialize>[0])
          Object.defineProperty(object, key, { value, enumerable: true, writable: true, configurable: true })
        }
        return object
      },
    },
    name,
  )
byEntries('bare-object', (prototype) => prototype === null, () => Object.create(null) as Record<string, unknown>)
byEntries('guarded-object', (prototype, v) => prototype === Object.prototype && hasGuardedKey(v), () => ({}))

/** Objects that superjson is given as their list of entries. */
function storedAsEntries(object: object): boolean {
  const prototype: unknown = Object.getPrototypeOf(object)
  return prototype === null || (prototype === Object.prototype && hasGuardedKey(object))
}

function hasGuardedKey(object: object): boolean {
  return GUARDED_KEYS.some((k) => Object.hasOwn(object, k))
}
// superjson writes an invalid Date as null; it is a Date all the same (MySQL's zero dates).
superjson.registerCustom<Date, string>(
  { isApplicable: (v): v is Date => v instanceof Date && Number.isNaN(v.getTime()), serialize: () => 'Invalid Date', deserialize: () => new Date(Number.NaN) },
  'InvalidDate',
)

const DEFAULT_NAME = 'superjson'
/** The length of the `codec` column. */
const MAX_CODEC_NAME = 255

function describeName(name: unknown): string {
  return typeof name === 'string' ? `${[...name].length} characters` : typeof name
}

/**
 * Whether `value` is JSON that superjson writes without any meta, as `{"json": <its JSON>}`:
 * finite numbers other than -0, strings, booleans, null, dense arrays and plain objects of
 * those, with no key superjson guards against and no object met twice (superjson would record
 * the shared reference). Most responses are; they skip both walks of the full encoding.
 */
function isPlainJson(value: unknown, seen: Set<object>, depth = 0): boolean {
  switch (typeof value) {
    case 'string':
    case 'boolean':
      return true
    case 'number':
      return Number.isFinite(value) && !Object.is(value, -0)
    case 'object':
      break
    default:
      return false
  }
  if (value === null) return true
  // Too deep for the walks: the full encoding refuses it, naming where.
  if (seen.has(value) || depth >= MAX_DEPTH) return false
  seen.add(value)
  const prototype: unknown = Object.getPrototypeOf(value)
  if (prototype === Array.prototype) {
    const array = value as unknown[]
    if (Object.getOwnPropertyNames(array).length !== array.length + 1) return false
    for (let i = 0; i < array.length; i++) if (!isPlainData(array, String(i), seen, depth)) return false
    return true
  }
  if (prototype !== Object.prototype || Object.getOwnPropertySymbols(value).length > 0) return false
  for (const name of Object.getOwnPropertyNames(value)) {
    if (GUARDED_KEYS.includes(name) || !isPlainData(value, name, seen, depth)) return false
  }
  return true
}

/**
 * Whether `object[name]` is an enumerable data property holding plain JSON. A getter is left to
 * the full encoding: JSON.stringify would call it again and might get something else.
 */
function isPlainData(object: object, name: string, seen: Set<object>, depth: number): boolean {
  const property = Object.getOwnPropertyDescriptor(object, name)
  return property !== undefined && property.enumerable === true && 'value' in property && isPlainJson(property.value, seen, depth + 1)
}

/**
 * Whether `value` nests more than `limit` levels deep, found without recursion (the HTTP layer
 * asks it of a client's body before anything walks it).
 */
export function nestsDeeper(value: unknown, limit: number): boolean {
  const stack: Array<readonly [unknown, number]> = [[value, 0]]
  const seen = new Set<object>()
  while (stack.length) {
    const [item, depth] = stack.pop()!
    if (typeof item !== 'object' || item === null || seen.has(item)) continue
    if (depth >= limit) return true
    seen.add(item)
    const children = item instanceof Map ? [...item.keys(), ...item.values()] : item instanceof Set ? [...item] : ArrayBuffer.isView(item) ? [] : Object.values(item)
    for (const child of children) stack.push([child, depth + 1])
  }
  return false
}

/**
 * The default codec: superjson's JSON (`{"json": …, "meta": …}`, readable in the table),
 * after a check that refuses, with `IdempotencySerializationError` naming where, anything it
 * could not rebuild exactly: functions, symbols, class instances other than the kinds listed
 * in {@link Storable}, sparse arrays, arrays with extra properties, symbol keys, and cycles
 * below an object without a prototype or with a property named `__proto__`, `constructor` or
 * `prototype`. Other shared references and cycles are kept (below such an object, a shared
 * reference comes back as equal copies); objects without a prototype come back without one;
 * object keys keep their order.
 */
export const defaultCodec: Codec = {
  name: DEFAULT_NAME,
  encode(value) {
    if (isPlainJson(value, new Set())) return `{"json":${JSON.stringify(value)}}`
    checkStorable(value, new Path(), new Set(), new Set(), false)
    try {
      return superjson.stringify(value)
    } catch (error) {
      throw new IdempotencySerializationError(`The value cannot be stored: ${(error as Error).message}`, { cause: error })
    }
  },
  decode(text) {
    try {
      return superjson.parse(text)
    } catch (error) {
      throw new IdempotencySerializationError(`A stored value cannot be read back: ${(error as Error).message}`, { cause: error })
    }
  },
}

/** Text for a table column, and the name of the codec that wrote it. */
export interface Encoded {
  readonly text: string
  readonly codec: string
}

/**
 * How one idempotency instance writes values to the table's text columns and reads them back.
 * Every column value is JSON, because Postgres stores them in `json` columns: the default
 * codec writes JSON; a custom codec's text is stored as a JSON string. Rows written before
 * codecs existed (no codec name) hold plain JSON.
 */
export class ValueStore {
  readonly #codec: Codec
  readonly #name: string

  constructor(codec: Codec = defaultCodec) {
    if (typeof codec?.encode !== 'function' || typeof codec.decode !== 'function') {
      throw new IdempotencySetupError('The codec option needs encode(value) and decode(text) functions.')
    }
    this.#codec = codec
    this.#name = codec === defaultCodec ? DEFAULT_NAME : (codec.name ?? 'custom')
    if (codec !== defaultCodec && this.#name === DEFAULT_NAME) {
      throw new IdempotencySetupError(`The codec name "${DEFAULT_NAME}" belongs to defaultCodec; give your codec another name.`)
    }
    // It is stored with every value, in a column of 255 characters.
    if (typeof this.#name !== 'string' || this.#name.length === 0 || [...this.#name].length > MAX_CODEC_NAME || this.#name.includes('\0')) {
      throw new IdempotencySetupError(`The codec name must be 1 to ${MAX_CODEC_NAME} characters without NUL, got ${describeName(this.#name)}.`)
    }
  }

  encode(value: unknown): Encoded {
    if (this.#codec === defaultCodec) return { text: defaultCodec.encode(value), codec: DEFAULT_NAME }
    const text = this.#codec.encode(value)
    if (typeof text !== 'string') throw new IdempotencySetupError(`The codec "${this.#name}" returned ${typeof text} from encode; it must return a string.`)
    return { text: JSON.stringify(text), codec: this.#name }
  }

  decode(text: string, codec: string | null): unknown {
    if (codec === null) return JSON.parse(text)
    if (codec === DEFAULT_NAME) return defaultCodec.decode(text)
    if (codec !== this.#name) {
      throw new IdempotencySetupError(
        `A stored value was written by the codec "${codec}", but this instance uses "${this.#name}"; pass that codec as the codec option to read it.`,
      )
    }
    return this.#codec.decode(JSON.parse(text) as string)
  }
}

/**
 * The canonical text of a value, which fingerprints hash. A JSON value gives its JSON with
 * object keys sorted (UTF-16 code units), no whitespace; other values the codec keeps get
 * forms JSON never produces (`12n`, `-0`, `NaN`, `undefined`, `Date(ms)`, `Map{k=>v}`,
 * `Set[…]`, `Buffer(base64)`, `Float64Array(base64)`, `UpdateResult{…}`), with `Map` entries
 * and `Set` members sorted, so that equal values give equal texts and different values
 * different ones. Every own property counts, `__proto__` included; an object without a
 * prototype counts as a plain object. Cycles are refused.
 */
export function canonicalText(value: unknown): string {
  return canonical(value, new Path(), new Set())
}

function canonical(value: unknown, path: Path, ancestors: Set<object>): string {
  const kind = kindOf(value, path)
  switch (kind) {
    case 'primitive':
      return primitive(value as string | number | boolean | bigint | null | undefined)
    case 'date':
      return `Date(${(value as Date).getTime()})`
    case 'buffer':
      return `Buffer(${bytesOf(value as Buffer).toString('base64')})`
    case 'typed':
      return `${(value as TypedArray).constructor.name}(${bytesOf(value as TypedArray).toString('base64')})`
  }
  const object = value as object
  if (ancestors.has(object)) path.refuse('contains itself (a cycle), which a request cannot')
  ancestors.add(object)
  let text: string
  switch (kind) {
    case 'array':
      text = `[${elementsOf(object as unknown[], path).map((item, i) => nested(item, i, path, ancestors)).join(',')}]`
      break
    case 'map':
      text = `Map{${sortedEntries(object as ReadonlyMap<unknown, unknown>, path, ancestors).join(',')}}`
      break
    case 'set':
      text = `Set[${sortedEntries(object as ReadonlySet<unknown>, path, ancestors).join(',')}]`
      break
    default: {
      const members = keysOf(object, path)
        .sort()
        .map((key) => `${JSON.stringify(key)}:${nested((object as Record<string, unknown>)[key], key, path, ancestors)}`)
      text = `${kind === 'result' ? RESULT_CLASSES.get(Object.getPrototypeOf(object) as object)!.name : ''}{${members.join(',')}}`
    }
  }
  ancestors.delete(object)
  return text
}

function nested(value: unknown, step: string | number, path: Path, ancestors: Set<object>): string {
  path.enter(step)
  const text = canonical(value, path, ancestors)
  path.leave()
  return text
}

/** Canonical `key=>value` texts of a `Map`'s entries, or texts of a `Set`'s members, sorted. */
function sortedEntries(container: ReadonlyMap<unknown, unknown> | ReadonlySet<unknown>, path: Path, ancestors: Set<object>): string[] {
  const texts: string[] = []
  eachEntry(container, path, (item, part) => {
    const text = canonical(item, path, ancestors)
    if (part === 'value') texts[texts.length - 1] += `=>${text}`
    else texts.push(text)
  })
  return texts.sort()
}

function primitive(value: string | number | boolean | bigint | null | undefined): string {
  switch (typeof value) {
    case 'bigint':
      return `${value}n`
    case 'undefined':
      return 'undefined'
    case 'number':
      return Object.is(value, -0) ? '-0' : JSON.stringify(value) === 'null' ? String(value) : JSON.stringify(value)
    default:
      return JSON.stringify(value)
  }
}
