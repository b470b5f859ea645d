// @ts-check
/**
 * TypeDoc plugin (typedoc.config.mjs): names each entry point's module after the path it is imported
 * by (`index.ts` is `kysely-idempotency`, `express/index.ts` is `kysely-idempotency/express`), not
 * after its folder, without an `@module` tag in the source.
 */
import { readFileSync } from 'node:fs'
import { Converter, ReflectionKind } from 'typedoc'

const { name: pkg } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8'))

/** @param {import('typedoc').Application} app */
export function load(app) {
  app.converter.on(Converter.EVENT_CREATE_DECLARATION, (_context, reflection) => {
    if (!reflection.kindOf(ReflectionKind.Module)) return
    reflection.name = reflection.name === 'index' ? pkg : `${pkg}/${reflection.name}`
  })
}
