import { describe, expect, it } from 'vitest'
import {
  IdempotencyConflictError,
  IdempotencyError,
  IdempotencyFlowError,
  IdempotencyKeyReuseError,
  IdempotencyLockLostError,
  IdempotencyMigrationError,
  IdempotencySerializationError,
  IdempotencySetupError,
  InvalidIdempotencyKeyError,
  mysqlDialect,
  postgresDialect,
  problemDetails,
  sqliteDialect,
} from '../index.js'

describe('problemDetails', () => {
  it('answers each 4xx with its status, an RFC 9457 body that says what happened, and Retry-After on a 409', () => {
    // The codes the IETF draft's profile names, and ours where it has none.
    const cases: Array<[IdempotencyError, number, string, string, Record<string, string>]> = [
      [new InvalidIdempotencyKeyError('The key is empty.'), 400, 'invalid-key', 'Invalid idempotency key', {}],
      [new IdempotencyKeyReuseError('Used with another request.'), 422, 'fingerprint-mismatch', 'Idempotency key reused', {}],
      [
        new IdempotencyConflictError('in_flight', 'Still running.', { retryAfter: 3 }),
        409,
        'conflict',
        'Request with this idempotency key in progress',
        { 'Retry-After': '3' },
      ],
      [new IdempotencyLockLostError('Taken over.'), 409, 'lock-lost', 'Request taken over by a retry', { 'Retry-After': '1' }],
    ]
    for (const [error, status, code, title, extra] of cases) {
      expect(problemDetails(error)).toEqual({
        status,
        headers: { 'Content-Type': 'application/problem+json', ...extra },
        body: { type: `urn:kysely-idempotency:${error.code}`, code, title, status, detail: error.message },
      })
    }
  })

  it('keeps the message of a 5xx on the server', () => {
    const secrets = 'relation "secret_schema.idempotency_keys" does not exist'
    for (const error of [
      new IdempotencySetupError(secrets),
      new IdempotencySerializationError(secrets),
      new IdempotencyFlowError(secrets),
      new IdempotencyMigrationError(secrets),
    ]) {
      const problem = problemDetails(error)
      expect(problem.status).toBe(500)
      expect(problem.body).toEqual({
        type: `urn:kysely-idempotency:${error.code}`,
        code: error.code.replaceAll('_', '-'),
        title: expect.any(String),
        status: 500,
      })
      expect(JSON.stringify(problem)).not.toContain('secret')
    }
  })
})

describe('error classes', () => {
  it('are recognised by instanceof across two copies of the module (the CommonJS and ES module builds)', async () => {
    // A query string makes the module loader evaluate the file again: a second copy.
    const copy = '../src/errors.js?another-copy'
    const other = (await import(copy)) as typeof import('../src/errors.js')
    expect(other.IdempotencyConflictError).not.toBe(IdempotencyConflictError)
    const theirs = new other.IdempotencyConflictError('race', 'Lost a race.', { retryAfter: 1 })
    expect(theirs).toBeInstanceOf(IdempotencyConflictError)
    expect(theirs).toBeInstanceOf(IdempotencyError)
    expect(theirs).toBeInstanceOf(Error)
    expect(theirs).not.toBeInstanceOf(IdempotencyKeyReuseError)
    expect(new IdempotencyKeyReuseError('x')).toBeInstanceOf(other.IdempotencyError)
    expect(new IdempotencyKeyReuseError('x')).not.toBeInstanceOf(other.IdempotencyConflictError)
    expect(new Error('plain')).not.toBeInstanceOf(IdempotencyError)
    for (const value of [null, undefined, 'IdempotencyError', { [Symbol.for('kysely-idempotency.error')]: 'IdempotencyError' }]) {
      expect(value instanceof IdempotencyError).toBe(false)
    }
    expect(theirs.name).toBe('IdempotencyConflictError')
    expect(Object.keys(theirs)).not.toContain(Symbol.for('kysely-idempotency.error'))
  })

  it('keep their names and are recognised across copies when a minifier renamed the classes', async () => {
    const copy = '../src/errors.js?minified-copy'
    const minified = (await import(copy)) as typeof import('../src/errors.js')
    const classes = Object.values(minified).filter((c): c is typeof IdempotencyError => typeof c === 'function')
    expect(classes.length).toBeGreaterThan(8)
    for (const [i, c] of classes.entries()) Object.defineProperty(c, 'name', { value: String.fromCharCode(97 + i) })
    const theirs = new minified.IdempotencyLockLostError('Taken over.')
    expect(theirs.name).toBe('IdempotencyLockLostError')
    expect(theirs).toBeInstanceOf(IdempotencyLockLostError)
    expect(theirs).toBeInstanceOf(IdempotencyError)
    expect(theirs).not.toBeInstanceOf(IdempotencyConflictError)
    expect(new IdempotencyConflictError('race', 'Lost.', { retryAfter: 1 })).toBeInstanceOf(minified.IdempotencyConflictError)
    expect(new IdempotencyConflictError('race', 'Lost.', { retryAfter: 1 })).not.toBeInstanceOf(minified.IdempotencyLockLostError)
    class PaymentDeclined extends minified.IdempotencyError {}
    const own = new PaymentDeclined('setup', 500, 'Declined.')
    expect(own.name).toBe('PaymentDeclined')
    expect(own).toBeInstanceOf(IdempotencyError)
    expect(own).not.toBeInstanceOf(IdempotencySetupError)
  })
})

describe('dialect detection', () => {
  it('recognises the adapters of another copy of Kysely (0.28, CommonJS, beside 0.29), and no other database', async () => {
    const { createRequire } = await import('node:module')
    const other = createRequire(import.meta.url)('kysely028') as typeof import('kysely')
    const { SqliteAdapter } = await import('kysely')
    expect(other.SqliteAdapter).not.toBe(SqliteAdapter)
    expect(sqliteDialect.supports(new other.SqliteAdapter())).toBe(true)
    expect(postgresDialect.supports(new other.SqliteAdapter())).toBe(false)
    expect(mysqlDialect().supports(new other.PostgresAdapter())).toBe(false)
    expect(postgresDialect.supports(new other.PostgresAdapter())).toBe(true)
    class Custom extends other.MysqlAdapter {}
    expect(mysqlDialect().supports(new Custom())).toBe(true)
  })

  it("takes PGlite (Kysely 0.29's PGliteAdapter extends PostgresAdapter) for Postgres", async () => {
    const { PGliteAdapter } = await import('kysely')
    expect(postgresDialect.supports(new PGliteAdapter())).toBe(true)
    expect(sqliteDialect.supports(new PGliteAdapter())).toBe(false)
  })
})
