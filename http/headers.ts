/** The key header: its lines as the client sent them, and the key a line holds. */
import { InvalidIdempotencyKeyError } from '../src/errors.js'

/**
 * Every line of the header `name` in Node's `rawHeaders` (name, value, name, value…): Node joins
 * repeated lines of most headers into one value, and the raw list keeps them apart.
 */
export function rawHeaderLines(rawHeaders: readonly string[], name: string): string[] {
  const lower = name.toLowerCase()
  const lines: string[] = []
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) if (rawHeaders[i]!.toLowerCase() === lower) lines.push(rawHeaders[i + 1]!)
  return lines
}

/**
 * Whether the request declares a body (a Transfer-Encoding, or a Content-Length other than 0),
 * from Node's `rawHeaders`: a body no parser read must be refused, never taken as none.
 */
export function declaresBody(rawHeaders: readonly string[]): boolean {
  return (
    rawHeaderLines(rawHeaders, 'transfer-encoding').length > 0 || rawHeaderLines(rawHeaders, 'content-length').some((length) => length.trim() !== '0')
  )
}

/**
 * Reads the key from a header value: bare (`abc`) or a Structured-Field string (`"abc"`, with
 * `\"` and `\\` escapes), which denote the same key. A bare value with a comma is refused:
 * HTTP lets proxies and the Fetch API join repeated header lines with commas (RFC 9110 §5.3),
 * so it cannot be told from several keys; a key with a comma is sent quoted (`"a,b"`).
 */
export function parseKeyHeader(value: string): string {
  const text = value.trim()
  if (!text.startsWith('"')) {
    if (!text.includes(',')) return text
    throw new InvalidIdempotencyKeyError(
      'The idempotency key header holds a comma outside quotes: several header lines joined into one, or a bare key with a comma. ' +
        'Send exactly one key, and a key with a comma as a Structured-Field string ("...").',
    )
  }
  if (!/^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"$/.test(text)) {
    throw new InvalidIdempotencyKeyError('The idempotency key header is neither a bare key nor a valid Structured-Field string ("...").')
  }
  return text.slice(1, -1).replace(/\\(["\\])/g, '$1')
}
