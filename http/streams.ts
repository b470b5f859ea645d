/** Bodies the route reads itself, as streams: never further or longer than its bounds. */
import { problem } from './problem.js'
import { Refused, tooLarge } from './answer.js'

/** How far and how long a body stream is read. */
export interface StreamBounds {
  readonly bytes: number
  readonly ms: number
}

/**
 * Reads a body stream (a Fetch `Request`'s or `Response`'s) to its end, but never past
 * `bounds`: beyond `bytes` or `ms` the stream is cancelled and refused (a request as 413 or
 * 408, an answer as too large or too slow to store), so that neither an endless stream nor one
 * that stalls can hold a transaction open or grow memory, and a client cannot decide how much
 * the route buffers.
 */
export async function readAtMost(stream: ReadableStream<Uint8Array>, bounds: StreamBounds, of: 'request' | 'response'): Promise<Buffer> {
  const reader = stream.getReader()
  // Not awaited: cancelling one copy of a teed stream (a cloned request) settles only once the other is cancelled too.
  const stop = () => void reader.cancel().catch(() => undefined)
  const chunks: Uint8Array[] = []
  let total = 0
  let timer: ReturnType<typeof setTimeout> | undefined
  const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), bounds.ms)))
  try {
    for (;;) {
      const read = await Promise.race([reader.read(), late])
      if (read === 'late') {
        stop()
        throw of === 'request'
          ? new Refused(
              problem(408, 'request_timeout', 'Request body too slow', `The request body did not end within bodyTimeout (${bounds.ms} ms).`),
            )
          : new Refused(
              problem(
                500,
                'response_timeout',
                'Response too slow to store',
                `The response body did not end within bodyTimeout (${bounds.ms} ms); it was read no further.`,
              ),
              true,
            )
      }
      if (read.done) return Buffer.concat(chunks)
      total += read.value.byteLength
      if (total > bounds.bytes) {
        stop()
        throw of === 'request'
          ? new Refused(
              problem(413, 'request_too_large', 'Request body too large', `The request body is more than maxRequestBytes (${bounds.bytes}) bytes.`),
            )
          : tooLarge(`The response body is more than maxStoredBytes (${bounds.bytes}) bytes; it was read no further.`)
      }
      chunks.push(read.value)
    }
  } finally {
    clearTimeout(timer)
  }
}
