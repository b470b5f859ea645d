import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { sql, type Kysely } from 'kysely'
import type { Codec } from '../src/codec/codec.js'
import { checkTableName, locateTable, qualified, type TableName } from '../src/table.js'
import { createIdempotency } from '../index.js'
import type { Idempotency } from '../src/api.js'
import { connect, CONNECT_TIMEOUT } from './connect.js'
import { CliError, describe, unreachable } from './errors.js'

/** Arguments every command that connects takes. */
export const connectionArgs = {
  url: {
    type: 'string',
    description: 'Database URL: postgres://…, mysql://…, mariadb://…, sqlite:PATH or a *.db path (default: $DATABASE_URL)',
    valueHint: 'url',
  },
  table: { type: 'string', description: 'Name of the idempotency table', default: 'idempotency_keys', valueHint: 'name' },
  codec: {
    type: 'string',
    description: "A module exporting the app's codec (as its default export, or as `codec`), to read values the app stored through it",
    valueHint: 'path',
  },
  schema: {
    type: 'string',
    description: "Schema the table is in, as the app's withSchema() names it (Postgres schema, MySQL database; default: the connection's)",
    valueHint: 'name',
  },
  'connect-timeout': { type: 'string', description: 'Seconds to wait for the database to answer before giving up', default: '10', valueHint: 's' },
  debug: { type: 'boolean', description: 'Show the stack trace of an error', default: false },
} as const

/** Arguments of the commands that work on one key. */
export const keyArgs = {
  key: { type: 'string', description: "The client's idempotency key (required)", valueHint: 'key' },
  scope: { type: 'string', description: 'Whom the key belongs to (the scope the app gave it)', default: '', valueHint: 'scope' },
} as const

/** The `--key` of a command that works on one key, which must be given. */
export function requiredKey(args: { key?: string | undefined }): string {
  if (args.key === undefined) throw new CliError('Give the key with --key (and its scope with --scope, when the app scopes keys).')
  return args.key
}

/** What a command gets once connected. */
export interface Opened {
  /** The database, in the schema given with `--schema`. */
  readonly db: Kysely<unknown>
  /** The table for messages: `schema.name` with a schema. */
  readonly table: string
  readonly where: TableName
  readonly idempotency: Idempotency<unknown>
}

/**
 * Checks the table name before connecting, connects, runs `command` and always closes the
 * connection; database errors come out as one line naming the database. `create`: a SQLite
 * file may be created (only `migrate` should).
 */
export async function withDatabase<T>(
  args: { url?: string | undefined; table: string; schema?: string | undefined; codec?: string | undefined; 'connect-timeout'?: string | undefined },
  options: { create: boolean },
  command: (opened: Opened) => Promise<T>,
): Promise<T> {
  const table = checkTableName(args.table)
  const codec = args.codec === undefined ? undefined : await loadCodec(args.codec)
  const seconds = Number(args['connect-timeout'] ?? CONNECT_TIMEOUT / 1000)
  if (!Number.isFinite(seconds) || seconds <= 0)
    throw new CliError(`--connect-timeout must be a number of seconds, got "${args['connect-timeout']}".`)
  const timeout = Math.round(seconds * 1000)
  const { db: connected, label, location, kind } = await connect(args.url, { ...options, timeout })
  try {
    await sql`select 1`.execute(connected).catch((error: unknown) => {
      throw new CliError(unreachable(error, label, kind, timeout), { cause: error })
    })
    const db = args.schema === undefined ? connected : connected.withSchema(args.schema)
    const idempotency = createIdempotency({ db, tableName: table, ...(codec ? { codec } : {}) })
    const where = locateTable(db, table)
    return await command({ db, table: qualified(where), where, idempotency })
  } catch (error) {
    // A driver's message may quote the URL it was given, password and all.
    throw new CliError(describe(error, label).split(location).join(label), { cause: error })
  } finally {
    await connected.destroy().catch(() => undefined)
  }
}

/** The codec a module exports (`export default codec`, or `export const codec`), checked before connecting. */
async function loadCodec(path: string): Promise<Codec> {
  let loaded: { default?: unknown; codec?: unknown }
  try {
    loaded = (await import(pathToFileURL(resolve(path)).href)) as typeof loaded
  } catch (error) {
    throw new CliError(`Cannot load the codec module ${path}: ${(error as Error).message}`, { cause: error })
  }
  const codec = (loaded.codec ?? loaded.default) as Partial<Codec> | undefined
  if (typeof codec?.encode !== 'function' || typeof codec.decode !== 'function') {
    throw new CliError(`The module ${path} exports no codec: export one with encode(value) and decode(text), as its default export or as codec.`)
  }
  return codec as Codec
}
