import { Kysely, MysqlDialect, PostgresDialect, SqliteDialect, type Dialect, type MysqlPool } from 'kysely'
import { CliError } from './errors.js'

/** A database the CLI opened, and how to name it in messages without its password. */
export interface Connection {
  readonly db: Kysely<unknown>
  readonly label: string
  /** The URL as given, to take out of messages that quote it. */
  readonly location: string
  /** What the server should be, for messages. */
  readonly kind: 'PostgreSQL' | 'MySQL/MariaDB' | 'SQLite'
}

/** How long a connection may take before the CLI gives up, by default: a server that never answers must not hang it. */
export const CONNECT_TIMEOUT = 10_000

/**
 * Opens `url`, or `DATABASE_URL` when no URL is given: `postgres://` and `postgresql://`
 * (pg), `mysql://` and `mariadb://` (mysql2), `sqlite:PATH` or a path ending in `.db`,
 * `.sqlite` or `.sqlite3` (better-sqlite3). The driver is loaded only when it is needed, so
 * only the one in use has to be installed.
 */
export async function connect(url: string | undefined, options: { create: boolean; timeout: number }): Promise<Connection> {
  const location = url ?? process.env.DATABASE_URL
  if (!location) throw new CliError('No database given: pass --url or set DATABASE_URL.')
  const label = redact(location)
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(location)?.[1]?.toLowerCase()
  let dialect: Dialect
  let kind: Connection['kind'] = 'SQLite'
  if (scheme === 'postgres' || scheme === 'postgresql') {
    const pg = await driver<typeof import('pg')>('pg')
    kind = 'PostgreSQL'
    dialect = new PostgresDialect({ pool: new pg.default.Pool({ connectionString: location, max: 1, connectionTimeoutMillis: options.timeout }) })
  } else if (scheme === 'mysql' || scheme === 'mariadb') {
    const mysql = await driver<typeof import('mysql2')>('mysql2')
    kind = 'MySQL/MariaDB'
    const pool = mysql.createPool({ uri: location.replace(/^mariadb:/i, 'mysql:'), connectionLimit: 1, connectTimeout: options.timeout })
    // Recent mysql2 types its query values as a mutable array, which Kysely 0.27's MysqlPool
    // interface rejects; the call is the same at run time.
    dialect = new MysqlDialect({ pool: pool as unknown as MysqlPool })
  } else if (scheme === 'sqlite' || (scheme === undefined && /\.(db|sqlite3?)$/i.test(location)) || /^[a-z]:[\\/]/i.test(location)) {
    const path = scheme === 'sqlite' ? location.replace(/^sqlite:(\/\/)?/i, '') : location
    const Database = (await driver<{ default: typeof import('better-sqlite3') }>('better-sqlite3')).default
    try {
      dialect = new SqliteDialect({ database: new Database(path, { fileMustExist: !options.create }) })
    } catch (error) {
      throw new CliError(`Cannot open the SQLite file ${path}: ${(error as Error).message}.`, { cause: error })
    }
  } else {
    throw new CliError(`Unknown database URL "${label}": use postgres://, postgresql://, mysql://, mariadb://, sqlite:PATH or a *.db path.`)
  }
  return { db: new Kysely<unknown>({ dialect }), label, location, kind }
}

async function driver<T>(name: string): Promise<T> {
  try {
    return (await import(name)) as T
  } catch (error) {
    throw new CliError(`The database driver "${name}" is not installed; run npm install ${name}.`, { cause: error })
  }
}

/**
 * `text` (a stack trace, an error's properties) with every credential of `url` taken out: the
 * URL itself, its password, and the values of its password parameters, raw and decoded.
 */
export function redactText(text: string, url: string | undefined): string {
  if (!url) return text
  const secrets = new Set<string>()
  const userinfo = userinfoOf(url)
  if (userinfo?.includes(':')) secrets.add(userinfo.slice(userinfo.indexOf(':') + 1))
  for (const [, value] of url.matchAll(/[?&;][^=&#;]*(?:pass|pwd|secret|token|key)[^=&#;]*=([^&#;]*)/gi)) secrets.add(value!)
  for (const secret of [...secrets]) secrets.add(safeDecode(secret))
  let redacted = text.split(url).join(redact(url))
  for (const secret of [...secrets].filter((s) => s.length > 0).sort((a, b) => b.length - a.length)) redacted = redacted.split(secret).join('***')
  return redacted
}

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text)
  } catch {
    return text
  }
}

/**
 * The user part of a URL (`user:password`), or `undefined`. A password typed without
 * percent-encoding may hold any of `@ : / ? #`, so the user part runs from the scheme to the
 * last `@` of the whole URL: an `@` later in the query makes it longer, which hides more, never less.
 */
function userinfoOf(url: string): string | undefined {
  const scheme = /^[a-z][a-z0-9+.-]*:\/\//i.exec(url)?.[0]
  const at = url.lastIndexOf('@')
  return scheme && at > scheme.length ? url.slice(scheme.length, at) : undefined
}

/**
 * The URL without its credentials: the password of the user part (see {@link userinfoOf}), and
 * the query parameters that carry one (`password=`, `sslpassword=`, a token, a key).
 */
export function redact(url: string): string {
  let redacted = url
  const userinfo = userinfoOf(url)
  const colon = userinfo?.indexOf(':') ?? -1
  if (userinfo !== undefined && colon >= 0) {
    const scheme = url.slice(0, url.indexOf('//') + 2)
    redacted = `${scheme}${userinfo.slice(0, colon)}:***${url.slice(scheme.length + userinfo.length)}`
  }
  return redacted.replace(/([?&;][^=&#;]*(?:pass|pwd|secret|token|key)[^=&#;]*=)[^&#;]*/gi, '$1***')
}
