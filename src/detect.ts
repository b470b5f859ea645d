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
