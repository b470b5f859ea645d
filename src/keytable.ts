/**
 * The idempotency table of one instance, as every path uses it: its statements, compiled once,
 * how values are stored in it, and its database's errors translated (see `retries.ts`).
 */
import type { Kysely } from 'kysely'
import type { ValueStore } from './codec/store.js'
import type { IdempotencyDialect } from './dialect.js'
import { DatabaseErrors, type Settings } from './retries.js'
import { prepareStatements, type Statements } from './statements.js'
import { qualified, type TableName } from './table.js'

export class KeyTable {
  /** The table as statements and messages name it: `schema.name` when it has a schema. */
  readonly name: string
  readonly dialect: IdempotencyDialect
  /** How this instance stores values. */
  readonly values: ValueStore
  readonly #errors: DatabaseErrors
  #statements: Promise<Statements> | undefined

  constructor(dialect: IdempotencyDialect, table: TableName, values: ValueStore) {
    this.name = qualified(table)
    this.dialect = dialect
    this.values = values
    this.#errors = new DatabaseErrors(dialect, this.name)
  }

  /** The table's statements, compiled on first use (again after a failure). */
  statements(db: Kysely<unknown>): Promise<Statements> {
    this.#statements ??= this.translated(undefined, () => prepareStatements(db, this.dialect, this.name)).catch((error: unknown) => {
      this.#statements = undefined
      throw error
    })
    return this.#statements
  }

  /** See {@link DatabaseErrors.translated}. */
  translated<T>(settings: Settings | undefined, statement: () => Promise<T>): Promise<T> {
    return this.#errors.translated(settings, statement)
  }

  /** See {@link DatabaseErrors.waiting}. */
  waiting<T>(settings: Settings | undefined, statement: () => Promise<T>): Promise<T> {
    return this.#errors.waiting(settings, statement)
  }

  /** See {@link DatabaseErrors.retrying}. */
  retrying<T>(settings: Settings, attempt: () => Promise<T>): Promise<T> {
    return this.#errors.retrying(settings, attempt)
  }
}
