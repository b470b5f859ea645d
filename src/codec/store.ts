/**
 * How one instance writes values to the table's text columns and reads them back, with the
 * codec it was given, and reads what other versions and codecs wrote.
 */
import { IdempotencySetupError } from '../errors.js'
import { defaultCodec, DEFAULT_NAME, type Codec } from './codec.js'

/** The length of the `codec` column. */
const MAX_CODEC_NAME = 255

function describeName(name: unknown): string {
  return typeof name === 'string' ? `${[...name].length} characters` : typeof name
}

/** Text for a table column, and the name of the codec that wrote it. */
export interface Encoded {
  readonly text: string
  readonly codec: string
}

/**
 * How one idempotency instance writes values to the table's text columns and reads them back.
 * Every column value is JSON, because Postgres stores them in `json` columns: the default
 * codec writes JSON; a custom codec's text is stored as a JSON string. Rows written before
 * codecs existed (no codec name) hold plain JSON.
 */
export class ValueStore {
  readonly #codec: Codec
  readonly #name: string

  constructor(codec: Codec = defaultCodec) {
    if (typeof codec?.encode !== 'function' || typeof codec.decode !== 'function') {
      throw new IdempotencySetupError('The codec option needs encode(value) and decode(text) functions.')
    }
    this.#codec = codec
    this.#name = codec === defaultCodec ? DEFAULT_NAME : (codec.name ?? 'custom')
    if (codec !== defaultCodec && this.#name === DEFAULT_NAME) {
      throw new IdempotencySetupError(`The codec name "${DEFAULT_NAME}" belongs to defaultCodec; give your codec another name.`)
    }
    // It is stored with every value, in a column of 255 characters.
    if (typeof this.#name !== 'string' || this.#name.length === 0 || [...this.#name].length > MAX_CODEC_NAME || this.#name.includes('\0')) {
      throw new IdempotencySetupError(`The codec name must be 1 to ${MAX_CODEC_NAME} characters without NUL, got ${describeName(this.#name)}.`)
    }
  }

  encode(value: unknown): Encoded {
    if (this.#codec === defaultCodec) return { text: defaultCodec.encode(value), codec: DEFAULT_NAME }
    const text = this.#codec.encode(value)
    if (typeof text !== 'string')
      throw new IdempotencySetupError(`The codec "${this.#name}" returned ${typeof text} from encode; it must return a string.`)
    return { text: JSON.stringify(text), codec: this.#name }
  }

  decode(text: string, codec: string | null): unknown {
    if (codec === null) return JSON.parse(text)
    if (codec === DEFAULT_NAME) return defaultCodec.decode(text)
    if (codec !== this.#name) {
      throw new IdempotencySetupError(
        `A stored value was written by the codec "${codec}", but this instance uses "${this.#name}"; pass that codec as the codec option to read it.`,
      )
    }
    return this.#codec.decode(JSON.parse(text) as string)
  }
}
