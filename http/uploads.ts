/**
 * Uploaded files as the fingerprint sees them. Multipart parsers keep files apart from the
 * fields they put in the body (multer's `req.file`/`req.files`, @fastify/multipart's parts), so
 * a fingerprint of the body alone would take two uploads of different files for one request.
 */
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { IdempotencySetupError } from '../src/errors.js'

/** A file as the fingerprint covers it: its field, its name and type as the client sent them, and its bytes' SHA-256. */
export interface UploadedFile {
  readonly field: string
  readonly file: string
  readonly type: string
  readonly sha256: string
}

/** A file as multer leaves it: in memory (`buffer`) or on disk (`path`). */
interface MulterFile {
  readonly fieldname: string
  readonly originalname: string
  readonly mimetype: string
  readonly buffer?: Buffer
  readonly path?: string
}

/** A part as @fastify/multipart attaches it to the body (`attachFieldsToBody: true`). */
interface MultipartPart {
  readonly type: 'file' | 'field'
  readonly fieldname: string
  readonly filename?: string
  readonly mimetype?: string
  readonly value?: unknown
  toBuffer?(): Promise<Buffer>
}

/**
 * The files multer put on the request (`req.file`, and `req.files` as an array or by field), or
 * `undefined` when there are none.
 */
export async function multerFiles(file: unknown, files: unknown): Promise<UploadedFile[] | undefined> {
  const found = [file, ...(Array.isArray(files) ? files : typeof files === 'object' && files !== null ? Object.values(files).flat() : [])].filter(
    (f): f is MulterFile => typeof (f as Partial<MulterFile> | undefined)?.fieldname === 'string',
  )
  if (found.length === 0) return undefined
  return Promise.all(
    found.map(async (f) => ({ field: f.fieldname, file: f.originalname, type: f.mimetype, sha256: await digest(f.fieldname, f.buffer ?? f.path) })),
  )
}

/**
 * A body as @fastify/multipart attaches its parts (`attachFieldsToBody: true`): each field as its
 * value and each file as an {@link UploadedFile}; any other body as it is.
 */
export async function multipartBody(body: unknown): Promise<unknown> {
  if (typeof body !== 'object' || body === null || !Object.values(body).some((v) => isPart(v) || (Array.isArray(v) && v.some(isPart)))) return body
  const part = async (p: unknown): Promise<unknown> => {
    if (!isPart(p)) return p
    if (p.type === 'field') return p.value
    return { field: p.fieldname, file: p.filename ?? '', type: p.mimetype ?? '', sha256: await digest(p.fieldname, await p.toBuffer?.()) }
  }
  return Object.fromEntries(
    await Promise.all(Object.entries(body).map(async ([name, v]) => [name, Array.isArray(v) ? await Promise.all(v.map(part)) : await part(v)])),
  )
}

function isPart(value: unknown): value is MultipartPart {
  const p = value as Partial<MultipartPart> | null
  return typeof p === 'object' && p !== null && (p.type === 'file' || p.type === 'field') && typeof p.fieldname === 'string'
}

/** The SHA-256 of a file's bytes, in memory or read from disk a chunk at a time. */
async function digest(field: string, bytes: Buffer | string | undefined): Promise<string> {
  const hash = createHash('sha256')
  if (Buffer.isBuffer(bytes)) return hash.update(bytes).digest('hex')
  if (typeof bytes === 'string') {
    for await (const chunk of createReadStream(bytes)) hash.update(chunk as Buffer)
    return hash.digest('hex')
  }
  throw new IdempotencySetupError(
    `The uploaded file of the field "${field}" has neither its bytes nor a path to them, so the fingerprint cannot cover it; ` +
      'use a storage that keeps them (multer: memoryStorage() or diskStorage()).',
  )
}
