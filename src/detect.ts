import type { Kysely } from 'kysely'
import { mysqlDialect } from '../dialects/mysql.js'
import { postgresDialect } from '../dialects/postgres.js'
import { sqliteDialect } from '../dialects/sqlite.js'
import type { IdempotencyDialect } from './dialect.js'
import { IdempotencySetupError } from './errors.js'

const KNOWN: readonly IdempotencyDialect[] = [postgresDialect, mysqlDialect(), sqliteDialect]

/** The dialect module that fits a Kysely instance, judged by its adapter. */
export function detectDialect(db: Kysely<unknown>): IdempotencyDialect {
  const adapter = db.getExecutor().adapter
  const dialect = KNOWN.find((d) => d.supports(adapter))
  if (!dialect) {
    throw new IdempotencySetupError(
      `kysely-idempotency works with PostgreSQL, MySQL/MariaDB and SQLite, but this Kysely instance uses ${adapter.constructor.name}; ` +
        'if it speaks one of those, pass the matching `dialect` option (postgresDialect, mysqlDialect(), sqliteDialect).',
    )
  }
  return dialect
}

export const DEFAULT_TABLE = 'idempotency_keys'
const TABLE_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,47}$/

/** Table names are spliced into SQL as identifiers, so only plain ones are accepted. */
export function checkTableName(name: unknown): string {
  if (typeof name !== 'string' || !TABLE_NAME.test(name)) {
    throw new IdempotencySetupError(
      `The table name ${JSON.stringify(name)} is not a plain identifier: use 1 to 48 letters, digits and underscores, not starting with a digit.`,
    )
  }
  return name
}
