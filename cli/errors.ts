import { IdempotencyError } from '../src/errors.js'

/** Exit codes, documented in docs/guide/operations.md: `status` exits `pending` while migrations are pending. */
export const EXIT = { ok: 0, error: 1, pending: 2 } as const

/** An error whose message is all the user needs to see. */
export class CliError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'CliError'
  }
}

const UNREACHABLE = new Set(['ECONNREFUSED', 'ENOTFOUND', 'ETIMEDOUT', 'EHOSTUNREACH', 'ECONNRESET', 'EAI_AGAIN'])
/** Postgres SQLSTATEs and MySQL errnos that mean the server refused who we are or what we asked for. */
const REFUSED = new Set<unknown>(['28P01', '28000', '3D000', 1044, 1045, 1049])

/** One line that says what went wrong, for any error a command can meet. */
export function describe(error: unknown, database?: string): string {
  if (error instanceof CliError || error instanceof IdempotencyError) return error.message
  const e = error as { code?: unknown; errno?: unknown; message?: unknown; errors?: unknown[] }
  const code = e?.code ?? (e?.errors?.[0] as { code?: unknown } | undefined)?.code
  const where = database ? ` ${database}` : ' the database'
  if (typeof code === 'string' && UNREACHABLE.has(code)) return `Cannot reach${where} (${code}); is the server running and the URL right?`
  const message = firstLine(e?.message)
  if (REFUSED.has(code) || REFUSED.has(e?.errno)) return `The server refused the connection to${where}: ${message}`
  return message || String(error)
}

/**
 * One line for a server that the first statement could not reach: not there, not answering, or
 * refusing who we are, or one that answered as another kind of database does (a MySQL port in a
 * postgres:// URL), which the driver reports as an odd protocol error.
 */
export function unreachable(error: unknown, database: string, kind: string, timeout: number): string {
  const e = error as { code?: unknown; errno?: unknown; message?: unknown } | null
  const message = firstLine(e?.message)
  if (e?.code === 'ERR_INVALID_URL') {
    return `${database} is not a URL the driver can read; percent-encode the special characters of the password (# ? @ / : as %23 %3F %40 %2F %3A).`
  }
  if (e?.code === 'ETIMEDOUT' || /timeout|timed out/i.test(message)) {
    return `${database} did not answer within ${timeout / 1000} s; is the server up, and is that the port of a ${kind} server?`
  }
  const known = (typeof e?.code === 'string' && (UNREACHABLE.has(e.code) || /^[0-9A-Z]{5}$/.test(e.code))) || typeof e?.errno === 'number'
  if (known || e?.code === 'SQLITE_CANTOPEN') return describe(error, database)
  return `${database} did not answer as a ${kind} server does (${message || String(error)}); is that the port of a ${kind} server?`
}

function firstLine(message: unknown): string {
  return typeof message === 'string' ? (message.split('\n')[0] ?? '').trim() : ''
}
