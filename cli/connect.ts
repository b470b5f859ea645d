import { Kysely, MysqlDialect, PostgresDialect, SqliteDialect, type Dialect, type MysqlPool } from 'kysely'
import { CliError } from './errors.js'

/** A database the CLI opened, and how to name it in messages without its password. */
export interface Connection {
  readonly db: Kysely<unknown>
  readonly label: string
}

/**
 * Opens `url`, or `DATABASE_URL` when no URL is given: `postgres://` and `postgresql://`
 * (pg), `mysql://` and `mariadb://` (mysql2), `sqlite:PATH` or a path ending in `.db`,
 * `.sqlite` or `.sqlite3` (better-sqlite3). The driver is loaded only when it is needed, so
 * only the one in use has to be installed.
 */
export async function connect(url: string | undefined, options: { create: boolean }): Promise<Connection> {
  const location = url ?? process.env.DATABASE_URL
  if (!location) throw new CliError('No database given: pass --url or set DATABASE_URL.')
  const label = redact(location)
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(location)?.[1]?.toLowerCase()
  let dialect: Dialect
  if (scheme === 'postgres' || scheme === 'postgresql') {
    const pg = await driver<typeof import('pg')>('pg')
    dialect = new PostgresDialect({ pool: new pg.default.Pool({ connectionString: location, max: 1 }) })
  } else if (scheme === 'mysql' || scheme === 'mariadb') {
    const mysql = await driver<typeof import('mysql2')>('mysql2')
    const pool = mysql.createPool({ uri: location.replace(/^mariadb:/i, 'mysql:'), connectionLimit: 1 })
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
  return { db: new Kysely<unknown>({ dialect }), label }
}

async function driver<T>(name: string): Promise<T> {
  try {
    return (await import(name)) as T
  } catch (error) {
    throw new CliError(`The database driver "${name}" is not installed; run npm install ${name}.`, { cause: error })
  }
}

/** The URL without its password. */
export function redact(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/[^:/@]*):[^@/]*@/i, '$1:***@')
}
