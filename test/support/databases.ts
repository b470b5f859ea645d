import * as kysely from 'kysely'
import { Kysely, MysqlDialect, PostgresDialect, SqliteDialect, sql, type KyselyConfig, type PGlite as KyselyPGlite } from 'kysely'
import Database from 'better-sqlite3'
import { PostgresJSDialect } from 'kysely-postgres-js5'
import { createPool } from 'mysql2'
import pg from 'pg'
import postgres from 'postgres'
import { mysqlDialect, type IdempotencyDialect } from '../../index.js'

/** A database the conformance suite runs against: what the library's dialect modules tell apart. */
export type DatabaseName = 'postgres' | 'mysql' | 'sqlite'

/** How a target reaches its database: the driver and the Kysely dialect around it. */
export type DriverName = 'pg' | 'postgres-js' | 'pglite' | 'mysql2' | 'better-sqlite3'

/**
 * What a test may need of its target beyond the contract itself. A test that needs what its
 * target lacks is not run there, and is reported as N/A with the target's reason.
 */
export type Capability =
  /** Several connections in one process, so that a transaction can hold a key while another claims it. */
  | 'pool'
  /** Other processes can open the same database (duplicates from several processes, crashes). */
  | 'processes'
  /** A session can be ended from outside, as an operator or a failover does. */
  | 'sessions'
  /** Per-statement lock waits on MySQL/MariaDB (only the targets that force another module lack it). */
  | 'statement-paths'
  /** What a session holds (an advisory lock) lasts from one transaction to the next. */
  | 'session-state'

/**
 * One row of the conformance matrix: a database through one driver, and optionally a dialect
 * module forced instead of the detected one (to cover the MySQL path without per-statement lock waits).
 */
export interface Target {
  readonly id: string
  readonly database: DatabaseName
  readonly driver: DriverName
  readonly dialect?: () => IdempotencyDialect
  /** Where the server is, when not where its database is usually found (a pooler in front of it). */
  readonly server?: Server
  /** What it cannot show, and why. */
  readonly lacks: Partial<Record<Capability, string>>
  /** Why it cannot run at all on this lane's Kysely, if it cannot. */
  readonly unavailable?: string
}

/** A server the tests connect to: a database, PgBouncer in front of Postgres, or a Postgres database whose default isolation is SERIALIZABLE. */
export type Server = Exclude<DatabaseName, 'sqlite'> | 'pgbouncer' | 'postgres-serializable'

const ONE_CONNECTION =
  'one connection per Kysely instance: every query of the instance waits its turn, so no transaction can hold a key while another claims it'
const IN_PROCESS = 'the database lives inside one process: no other process can open it'
const NO_SESSIONS = 'an in-process database has no session to end from outside'
const FORCED_MODULE = 'forces another dialect module on a database another target covers; only statement-level tests run on it'

/** Kysely 0.29 ships PGliteDialect; the compatibility lane's 0.28 does not. */
const { PGliteDialect } = kysely as Partial<typeof import('kysely')>

export const ALL_TARGETS: readonly Target[] = [
  { id: 'postgres', database: 'postgres', driver: 'pg', lacks: {} },
  {
    id: 'postgres-js',
    database: 'postgres',
    driver: 'postgres-js',
    lacks: {
      sessions:
        "postgres.js 3.4 (the range kysely-postgres-js accepts) never settles a query on a reserved connection whose backend was terminated, so Kysely's rollback waits forever",
    },
  },
  {
    id: 'pglite',
    database: 'postgres',
    driver: 'pglite',
    lacks: { pool: ONE_CONNECTION, processes: IN_PROCESS, sessions: NO_SESSIONS },
    ...(PGliteDialect ? {} : { unavailable: 'Kysely 0.28 has no PGliteDialect' }),
  },
  { id: 'mysql', database: 'mysql', driver: 'mysql2', lacks: {} },
  {
    id: 'mysql-session-wait',
    database: 'mysql',
    driver: 'mysql2',
    dialect: () => mysqlDialect({ statementLockWait: false }),
    lacks: { 'statement-paths': FORCED_MODULE },
  },
  { id: 'sqlite', database: 'sqlite', driver: 'better-sqlite3', lacks: { pool: ONE_CONNECTION, sessions: NO_SESSIONS } },
  // Every transaction SERIALIZABLE unless it says otherwise, as CockroachDB defaults.
  { id: 'postgres-serializable', database: 'postgres', driver: 'pg', server: 'postgres-serializable', lacks: {} },
  // Only when a pooler is given: there is no default one to look for.
  ...(process.env.KIDEM_PGBOUNCER_URL
    ? [
        {
          id: 'pgbouncer',
          database: 'postgres',
          driver: 'pg',
          server: 'pgbouncer',
          lacks: { 'session-state': 'PgBouncer in transaction mode hands the session to another client after each transaction' },
        } as const,
      ]
    : []),
]

/** The driver a test that only names a database uses. */
export const DEFAULT_DRIVER: Readonly<Record<DatabaseName, DriverName>> = { postgres: 'pg', mysql: 'mysql2', sqlite: 'better-sqlite3' }

/** Where a server database is looked for: its env var, else the local default. */
export const SERVER_LOCATIONS = {
  postgres: { env: 'KIDEM_PG_URL', local: 'postgres://postgres@127.0.0.1:5432/test' },
  mysql: { env: 'KIDEM_MYSQL_URL', local: 'mysql://root@127.0.0.1:3306/test' },
} as const

/** Where each server is, as found by the global setup (SQLite and PGlite need no server). */
export type Locations = Partial<Record<Server, string>>

/** Where an in-process PGlite target's database is: the one every fixture of a test file shares. */
export const PGLITE_LOCATION = 'pglite:memory'

/**
 * Opens a Kysely instance through `via`, a driver or a database (its default driver). For SQLite,
 * `location` is a file path; the file is put in WAL mode and a writer waits `busyTimeout` ms for
 * the write lock. For PGlite, it is {@link PGLITE_LOCATION}. `log` sees every statement, BEGIN and
 * COMMIT included.
 */
export function openDatabase(
  via: DriverName | DatabaseName,
  location: string,
  poolSize = 30,
  busyTimeout = 5000,
  log?: KyselyConfig['log'],
): Kysely<any> {
  const driver = Object.hasOwn(DEFAULT_DRIVER, via) ? DEFAULT_DRIVER[via as DatabaseName] : (via as DriverName)
  switch (driver) {
    case 'pg': {
      const pool = new pg.Pool({ connectionString: location, max: poolSize })
      // A backend killed under a checked-out client also emits 'error' on that client; the
      // failing query already reports it, so the event only needs a listener.
      pool.on('connect', (client) => client.on('error', () => {}))
      // An idle client whose backend is terminated is reported on the pool, which drops it.
      pool.on('error', () => {})
      return new Kysely({ dialect: new PostgresDialect({ pool }), log })
    }
    case 'postgres-js':
      return new Kysely({ dialect: new PostgresJSDialect({ postgres: postgres(location, { max: poolSize, onnotice: () => {} }) }), log })
    case 'pglite':
      if (!PGliteDialect) throw new Error('PGlite needs Kysely 0.29 (PGliteDialect).')
      return new Kysely({ dialect: new PGliteDialect({ pglite: sharedPglite }), log })
    case 'mysql2':
      return new Kysely({ dialect: new MysqlDialect({ pool: createPool({ uri: location, connectionLimit: poolSize }) }), log })
    case 'better-sqlite3': {
      const file = new Database(location, { timeout: busyTimeout })
      file.pragma('journal_mode = WAL')
      return new Kysely({ dialect: new SqliteDialect({ database: file }), log })
    }
  }
}

let pglite: Promise<import('@electric-sql/pglite').PGlite> | undefined

/**
 * The in-memory PGlite of this process (a test file), shared by its fixtures: starting one takes
 * seconds. Each Kysely instance gets a view whose `close()` does nothing, so that `db.destroy()`
 * ends the instance and leaves the database to the next fixture (each has tables of its own).
 */
async function sharedPglite(): Promise<KyselyPGlite> {
  pglite ??= import('@electric-sql/pglite').then(async ({ PGlite }) => {
    const instance = new PGlite()
    await instance.waitReady
    return instance
  })
  const shared = await pglite
  return {
    close: async () => {},
    get closed() {
      return shared.closed
    },
    get ready() {
      return shared.ready
    },
    waitReady: shared.waitReady,
    query: (query, params, options) => shared.query(query, params, options),
    transaction: (callback) => shared.transaction(callback),
  }
}

/**
 * Closes this process's PGlite, if it started one: a child process that opened a PGlite target
 * calls it after `db.destroy()`, which leaves the shared instance open (PGlite would keep the
 * process alive for seconds).
 */
export async function closeSharedPglite(): Promise<void> {
  await (await pglite)?.close()
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
  const db = openDatabase(DEFAULT_DRIVER[database], location, 1)
  try {
    await sql`select 1`.execute(db)
  } finally {
    await db.destroy()
  }
}
