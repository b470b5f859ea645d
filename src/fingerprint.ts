/**
 * Fingerprints: the canonical text of a request (equal values, equal texts; different values,
 * different texts) and its SHA-256, which the table stores to tell a retry from a reused key.
 */
import { createHash } from 'node:crypto'
import { elementsOf, eachEntry, keysOf, kindOf, bytesOf, Path, RESULT_CLASSES, type TypedArray } from './codec/values.js'

/**
 * The SHA-256 (hex) of the canonical form of `request` ({@link canonicalJson}). Equal values
 * give the same fingerprint, whatever the order their keys were written in; values that
 * differ give different ones, including in what JSON would lose (`-0`, a `Set`'s members, a
 * `__proto__` field). Without a request, or with `undefined`, it is the fingerprint of a call
 * that names none (as `request: null`), the one the table holds for such a call.
 *
 * ### Examples
 *
 * ```ts
 * import { fingerprint } from 'kysely-idempotency'
 *
 * fingerprint({ b: 1, a: [true, null] }) === fingerprint({ a: [true, null], b: 1 }) // true
 * fingerprint({ at: new Date(0) }) === fingerprint({ at: '1970-01-01T00:00:00.000Z' }) // false
 * ```
 */
export function fingerprint(request?: unknown): string {
  // A call that names no request, or names it `undefined`, is fingerprinted as `request: null`.
  return sha256(canonicalText(request === undefined ? null : request))
}

/**
 * The canonical text that fingerprints hash: for a JSON value, its JSON with object keys sorted
 * and no whitespace (`{"a":1,"b":[true]}`); values JSON cannot hold get forms JSON never
 * produces (`12n`, `Date(0)`, `Set[1,2]`…). Functions, symbols, cycles and class instances the
 * codec cannot rebuild are refused with `IdempotencySerializationError`.
 */
export const canonicalJson: (request: unknown) => string = canonicalText

function sha256(text: string): string {
  return createHash('sha256').update(text).digest('hex')
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
function canonicalText(value: unknown): string {
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
      text = `[${elementsOf(object as unknown[], path)
        .map((item, i) => nested(item, i, path, ancestors))
        .join(',')}]`
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
