/**
 * The default codec (superjson, with the checks and transformers that make it rebuild values
 * exactly) and the interface of codecs of your own.
 */
import SuperJSON from 'superjson'
import { IdempotencySerializationError } from '../errors.js'
import {
  bytesOf,
  eachEntry,
  elementsOf,
  GUARDED_KEYS,
  hasGuardedKey,
  keysOf,
  kindOf,
  MAX_DEPTH,
  Path,
  RESULT_CLASSES,
  storedAsEntries,
  TYPED_BY_NAME,
  type TypedArray,
} from './values.js'

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
 * import { db } from './app'
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
    path.refuse(
      'contains itself (a cycle) through an object without a prototype or with a property named __proto__, constructor or prototype, which the codec cannot keep',
    )
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
byEntries(
  'bare-object',
  (prototype) => prototype === null,
  () => Object.create(null) as Record<string, unknown>,
)
byEntries(
  'guarded-object',
  (prototype, v) => prototype === Object.prototype && hasGuardedKey(v),
  () => ({}),
)

// superjson writes an invalid Date as null; it is a Date all the same (MySQL's zero dates).
superjson.registerCustom<Date, string>(
  {
    isApplicable: (v): v is Date => v instanceof Date && Number.isNaN(v.getTime()),
    serialize: () => 'Invalid Date',
    deserialize: () => new Date(Number.NaN),
  },
  'InvalidDate',
)

/** The name stored with the values the default codec writes. */
export const DEFAULT_NAME = 'superjson'

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
