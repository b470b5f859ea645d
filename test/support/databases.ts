import { Kysely, MysqlDialect, PostgresDialect, SqliteDialect, sql, type KyselyConfig } from 'kysely'
import Database from 'better-sqlite3'
import { createPool } from 'mysql2'
import pg from 'pg'
import { mysqlDialect, type IdempotencyDialect } from '../../src/index.js'

/** A database the conformance suite runs against. */
export type DatabaseName = 'postgres' | 'mysql' | 'sqlite'

/**
 * One row of the conformance matrix: a database, and optionally a dialect module forced
 * instead of the detected one (to cover the MySQL path without per-statement lock waits).
 */
export interface Target {
  readonly id: string
  readonly database: DatabaseName
  readonly dialect?: () => IdempotencyDialect
  /** Where the server is, when not where its database is usually found (a pooler in front of it). */
  readonly server?: Server
}

/** A server the tests connect to: a database, PgBouncer in front of Postgres, or a Postgres database whose default isolation is SERIALIZABLE. */
export type Server = Exclude<DatabaseName, 'sqlite'> | 'pgbouncer' | 'postgres-serializable'

export const ALL_TARGETS: readonly Target[] = [
  { id: 'postgres', database: 'postgres' },
  { id: 'mysql', database: 'mysql' },
  { id: 'mysql-session-wait', database: 'mysql', dialect: () => mysqlDialect({ statementLockWait: false }) },
  { id: 'sqlite', database: 'sqlite' },
  // Every transaction SERIALIZABLE unless it says otherwise, as CockroachDB and YugabyteDB default.
  { id: 'postgres-serializable', database: 'postgres', server: 'postgres-serializable' },
  // Only when a pooler is given: there is no default one to look for.
  ...(process.env.KIDEM_PGBOUNCER_URL ? [{ id: 'pgbouncer', database: 'postgres', server: 'pgbouncer' } as const] : []),
]

/** Where a server database is looked for: its env var, else the local default. */
export const SERVER_LOCATIONS = {
  postgres: { env: 'KIDEM_PG_URL', local: 'postgres://postgres@127.0.0.1:5432/test' },
  mysql: { env: 'KIDEM_MYSQL_URL', local: 'mysql://root@127.0.0.1:3306/test' },
} as const

/** Where each server is, as found by the global setup (SQLite needs no server). */
export type Locations = Partial<Record<Server, string>>

/**
 * Opens a Kysely instance. For SQLite, `location` is a file path; the file is put in WAL mode
 * and a writer waits `busyTimeout` ms for the write lock. `log` sees every statement, BEGIN and COMMIT included.
 */
export function openDatabase(database: DatabaseName, location: string, poolSize = 30, busyTimeout = 5000, log?: KyselyConfig['log']): Kysely<any> {
  switch (database) {
    case 'postgres': {
      const pool = new pg.Pool({ connectionString: location, max: poolSize })
      // A backend killed under a checked-out client also emits 'error' on that client; the
      // failing query already reports it, so the event only needs a listener.
      pool.on('connect', (client) => client.on('error', () => {}))
      // An idle client whose backend is terminated is reported on the pool, which drops it.
      pool.on('error', () => {})
      return new Kysely({ dialect: new PostgresDialect({ pool }), log })
    }
    case 'mysql':
      return new Kysely({ dialect: new MysqlDialect({ pool: createPool({ uri: location, connectionLimit: poolSize }) }), log })
    case 'sqlite': {
      const file = new Database(location, { timeout: busyTimeout })
      file.pragma('journal_mode = WAL')
      return new Kysely({ dialect: new SqliteDialect({ database: file }), log })
    }
  }
}

/** The env var's server, else the local default (as the tests find them, without containers), once it answers. */
export async function locateServer(database: Exclude<DatabaseName, 'sqlite'>): Promise<string> {
  const { env, local } = SERVER_LOCATIONS[database]
  const location = process.env[env] ?? local
  try {
    await ping(database, location)
  } catch (error) {
    throw new Error(`${database} did not answer at ${location}: ${(error as Error).message}. Set ${env} to a reachable server.`)
  }
  return location
}

/** Resolves to nothing when the server answers a query, else rejects with the driver's error. */
export async function ping(database: DatabaseName, location: string): Promise<void> {
  const db = openDatabase(database, location, 1)
  try {
    await sql`select 1`.execute(db)
  } finally {
    await db.destroy()
  }
}
