/**
 * Request bodies as the fingerprint sees them, where the route reads the bytes itself: parsed the
 * way the common body parsers would, with a form's parts in place of its encoding.
 */
import { createHash } from 'node:crypto'

export function mediaType(contentType: string): string {
  return contentType.split(';')[0]!.trim().toLowerCase()
}

/** The body as Express's parsers would leave it: JSON parsed, form fields (multipart: its parts), text, or bytes. */
export async function parsedBody(contentType: string, bytes: Uint8Array): Promise<unknown> {
  if (bytes.byteLength === 0) return undefined
  const type = mediaType(contentType)
  const text = () => new TextDecoder().decode(bytes)
  if (type === 'application/json' || type.endsWith('+json')) {
    try {
      return JSON.parse(text())
    } catch {
      return bytes
    }
  }
  if (type === 'application/x-www-form-urlencoded') return Object.fromEntries(new URLSearchParams(text()))
  if (type === 'multipart/form-data') {
    // A body that does not parse is taken as its bytes.
    const form = await new Response(bytes, { headers: { 'Content-Type': contentType } }).formData().catch(() => undefined)
    return form ? partsOf(form) : bytes
  }
  if (type.startsWith('text/')) return text()
  return bytes
}

/** Form fields as `URLSearchParams` gives them: each name's last value. */
export function fieldsOf(form: FormData): Record<string, unknown> {
  return Object.fromEntries([...form].map(([name, value]) => [name, typeof value === 'string' ? value : value.name]))
}

/**
 * A multipart body as its parts, in order, without the boundary (every client picks a new one
 * for each request, a retry included): a field's text, or a file's name, type and SHA-256.
 */
export async function partsOf(form: FormData): Promise<unknown> {
  const parts: Array<[string, unknown]> = []
  for (const [name, value] of form) {
    if (typeof value === 'string') parts.push([name, value])
    else
      parts.push([
        name,
        {
          file: value.name,
          type: value.type,
          sha256: createHash('sha256')
            .update(new Uint8Array(await value.arrayBuffer()))
            .digest('hex'),
        },
      ])
  }
  return { multipart: parts }
}
