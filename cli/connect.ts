import { Kysely } from 'kysely'
import { databaseAt, OpenError, URLS_IN_WORDS } from '../dialects/registry.js'
import { CliError } from './errors.js'

/** A database the CLI opened, and how to name it in messages without its password. */
export interface Connection {
  readonly db: Kysely<unknown>
  readonly label: string
  /** The URL as given, to take out of messages that quote it. */
  readonly location: string
  /** What the server should be, for messages: `PostgreSQL`. */
  readonly kind: string
}

/** How long a connection may take before the CLI gives up, by default: a server that never answers must not hang it. */
export const CONNECT_TIMEOUT = 10_000

/**
 * Opens `url`, or `DATABASE_URL` when no URL is given, as the database registry reads it
 * (`postgres://`, `mysql://`, `sqlite:PATH` or a `*.db` path, …). Only the driver in use is loaded.
 */
export async function connect(url: string | undefined, options: { create: boolean; timeout: number }): Promise<Connection> {
  const location = url ?? process.env.DATABASE_URL
  if (!location) throw new CliError('No database given: pass --url or set DATABASE_URL.')
  const label = redact(location)
  const database = databaseAt(location)
  if (!database) {
    throw new CliError(`Unknown database URL "${label}": use ${URLS_IN_WORDS}.`)
  }
  try {
    return { db: new Kysely<unknown>({ dialect: await database.open(location, options) }), label, location, kind: database.label }
  } catch (error) {
    if (error instanceof OpenError) throw new CliError(error.message, { cause: error.cause })
    throw error
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
