/**
 * What a database module gives the registry (`registry.ts`) besides its dialect: its names, how
 * the command line opens it, and Kysely's classes for it.
 */
import type { Dialect, DialectAdapter, DatabaseIntrospector, Kysely, QueryCompiler } from 'kysely'
import type { IdempotencyDialect } from '../src/dialect.js'

/** How a URL is opened: by the command line, which gives up on a server after `timeout` ms. */
export interface OpenOptions {
  /** Create a SQLite file that does not exist yet. */
  readonly create: boolean
  readonly timeout: number
}

/** One database the package supports. */
export interface DatabaseSupport {
  /** Its name in messages: `PostgreSQL`. */
  readonly label: string
  /** The names `--dialect` takes and the URL schemes that name it, first the one it is known by. */
  readonly names: readonly [string, ...string[]]
  readonly dialect: IdempotencyDialect
  /** How code names its dialect module, for messages: `postgresDialect`. */
  readonly code: string
  /** How its locations are written, for messages: `postgres://`. */
  readonly urls: readonly string[]
  /** Whether `location` (a URL or a path, not one of `names`' schemes) is a database of this kind. */
  readonly owns?: (location: string) => boolean
  /**
   * Opens `location` with its driver, loaded only now so that only the one in use has to be
   * installed. Throws an {@link OpenError} for what the user must fix.
   */
  open(location: string, options: OpenOptions): Promise<Dialect>
  /** Kysely's classes for this database, to compile statements without connecting. */
  readonly kysely: {
    readonly adapter: new () => DialectAdapter
    readonly compiler: new () => QueryCompiler
    readonly introspector: new (db: Kysely<unknown>) => DatabaseIntrospector
  }
}

/** What keeps a database from opening that the user can fix (a driver to install, a file missing). */
export class OpenError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'OpenError'
  }
}

/** Loads a driver package, or says which one to install. */
export async function driver<T>(name: string): Promise<T> {
  try {
    return (await import(name)) as T
  } catch (error) {
    throw new OpenError(`The database driver "${name}" is not installed; run npm install ${name}.`, { cause: error })
  }
}
