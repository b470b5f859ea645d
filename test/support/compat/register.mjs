// The compatibility lane's processes (vitest's workers, and the children tests spawn) load this
// with --import, so that modules Node resolves itself find Kysely 0.28 where they ask for kysely.
import { register } from 'node:module'

register('./hooks.mjs', import.meta.url)
