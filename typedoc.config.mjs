// @ts-check
/**
 * The API reference of the docs site (`npm run docs:api`, run by `npm run docs`): Markdown pages
 * in docs/reference/ (generated, not committed) and their sidebar, typedoc-sidebar.json, which
 * docs/.vitepress/config.ts reads.
 */
import { readFileSync } from 'node:fs'

const { exports } = JSON.parse(readFileSync(new URL('package.json', import.meta.url), 'utf8'))

/** @type {Partial<import('typedoc').TypeDocOptions & import('typedoc-plugin-markdown').PluginOptions>} */
export default {
  name: 'API reference',
  // Every module the package exports (`.` is index.ts, `./express` express/index.ts), named by its
  // import path (`kysely-idempotency/express`) by docs/.vitepress/typedoc-modules.mjs.
  entryPoints: Object.keys(exports)
    .filter((path) => path !== './package.json')
    .map((path) => (path === '.' ? 'index.ts' : `${path.slice(2)}/index.ts`)),
  tsconfig: 'tsconfig.build.json',
  plugin: ['./docs/.vitepress/typedoc-modules.mjs', 'typedoc-plugin-markdown', 'typedoc-vitepress-theme'],
  out: 'docs/reference',
  docsRoot: 'docs',
  readme: 'none',
  // Links from the site root, not relative: a relative link on a folder's index page breaks when
  // the page is reached without the trailing slash (/reference), which test/site.test.ts checks.
  publicPath: '/reference/',
  navigation: { includeFolders: false, includeGroups: true },
  indexFormat: 'table',
  // No "Defined in" line under every member, and no members inherited from Node's `Error`.
  disableSources: true,
  excludeExternals: true,
  // A public type that names an unexported one, or a {@link} that resolves nowhere, fails the build.
  treatWarningsAsErrors: true,
}
