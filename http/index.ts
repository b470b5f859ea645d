/**
 * The HTTP behaviour every framework adapter shares (SPEC §5), as an adapter uses it: an
 * {@link IdempotentRoute} decides everything (the key, the scope, the fingerprint, what is
 * stored, replayed and answered); the adapter maps its framework's request onto
 * {@link RequestFacts}, reads its body as the framework left it, and sends the {@link Answer}.
 *
 *   route.ts    the route: options, modes (transaction, flow, defined flow), the key's answer
 *   answer.ts   a handler's result, the answer built from it, what can be sent and stored
 *   storage.ts  what is stored of an answer: Set-Cookie, the size limit, an omitted body, the expiry header
 *   headers.ts  the key header
 *   body.ts     bodies the route reads itself (JSON, forms, multipart parts)
 *   uploads.ts  files a framework's upload middleware kept (multer, @fastify/multipart)
 *   streams.ts  streamed bodies, read within bounds
 *   problem.ts  problem documents (RFC 9457) for the library's errors
 */
export { checkSendable, LEFT_BEHIND, Refused, render, type Answer, type HttpResult } from './answer.js'
export { fieldsOf, mediaType, parsedBody, partsOf } from './body.js'
export { declaresBody, parseKeyHeader, rawHeaderLines } from './headers.js'
export {
  IdempotentRoute,
  UNSCOPED,
  type HttpDefinedFlow,
  type HttpFlowRequest,
  type IdempotentOptions,
  type Outcome,
  type RequestFacts,
  type RouteOptions,
} from './route.js'
export { readAtMost, type StreamBounds } from './streams.js'
export { multerFiles, multipartBody } from './uploads.js'
