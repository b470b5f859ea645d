/**
 * The databases the package knows, in one list: their names and the URL schemes that name them,
 * how a Kysely instance is matched to one, how the command line opens one from a URL, and the
 * Kysely classes that compile statements for one without a connection. The package entry, the
 * command line and `sql` all look databases up here; adding a database adds its module here.
 */
import type { Kysely } from 'kysely'
import type { IdempotencyDialect } from '../src/dialect.js'
import { IdempotencySetupError } from '../src/errors.js'
import { mysqlSupport } from './mysql.js'
import { postgresSupport } from './postgres.js'
import { sqliteSupport } from './sqlite.js'
import type { DatabaseSupport } from './support.js'

export type { DatabaseSupport, OpenOptions } from './support.js'
export { OpenError } from './support.js'

export const DATABASES: readonly DatabaseSupport[] = [postgresSupport, mysqlSupport, sqliteSupport]

/** Every name `--dialect` and URL schemes take. */
export const DATABASE_NAMES: readonly string[] = DATABASES.flatMap((d) => d.names)

/** The databases by name, for help texts: `postgres (postgresql), mysql (mariadb) or sqlite`. */
export const DATABASES_IN_WORDS = inWords(
  DATABASES.map((d) => (d.names.length > 1 ? `${d.names[0]} (${d.names.slice(1).join(', ')})` : d.names[0]!)),
  'or',
)

/** The URL forms the command line opens, for messages: `postgres://, …, sqlite:PATH or a *.db path`. */
export const URLS_IN_WORDS = inWords(
  DATABASES.flatMap((d) => d.urls),
  'or',
)

/** `a, b and c`. */
export function inWords(items: readonly string[], conjunction: 'and' | 'or'): string {
  return items.length < 2 ? (items[0] ?? '') : `${items.slice(0, -1).join(', ')} ${conjunction} ${items.at(-1)}`
}

/** The database called `name` (any of its names, in any case), or `undefined`. */
export function databaseNamed(name: string): DatabaseSupport | undefined {
  const lower = name.toLowerCase()
  return DATABASES.find((d) => d.names.includes(lower))
}

/** The database a URL or path names: by its scheme, else by what it looks like (a `.db` file). */
export function databaseAt(location: string): DatabaseSupport | undefined {
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(location)?.[1]
  return (scheme !== undefined ? databaseNamed(scheme) : undefined) ?? DATABASES.find((d) => d.owns?.(location))
}

/** The dialect module that fits a Kysely instance, judged by its adapter. */
export function detectDialect(db: Kysely<unknown>): IdempotencyDialect {
  const adapter = db.getExecutor().adapter
  const found = DATABASES.find((d) => d.dialect.supports(adapter))
  if (!found) {
    throw new IdempotencySetupError(
      `kysely-idempotency works with ${inWords(
        DATABASES.map((d) => d.label),
        'and',
      )}, but this Kysely instance uses ${adapter.constructor.name}; ` +
        `if it speaks one of those, pass the matching \`dialect\` option (${DATABASES.map((d) => d.code).join(', ')}).`,
    )
  }
  return found.dialect
}
