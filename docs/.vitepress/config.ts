import { existsSync, readFileSync } from 'node:fs'
import { defineConfig, type DefaultTheme } from 'vitepress'

/**
 * The API reference's pages, as TypeDoc wrote them into docs/reference/ (`npm run docs:api`,
 * typedoc.config.mjs); none before it ran, and the reference is then not there at all.
 */
const referenceSidebar = new URL('../reference/typedoc-sidebar.json', import.meta.url)
const referenceItems: DefaultTheme.SidebarItem[] = existsSync(referenceSidebar) ? JSON.parse(readFileSync(referenceSidebar, 'utf8')) : []

/** The docs site (`npm run docs`): the guides, the API reference, the benchmark page and the contributor pages. */
export default defineConfig({
  title: 'kysely-idempotency',
  description: 'Safe retries for unsafe API requests: the key, your writes and the stored answer in one SQL transaction, through Kysely.',
  cleanUrls: true,
  // A link to a page that does not exist fails the build.
  ignoreDeadLinks: false,
  themeConfig: {
    nav: [
      { text: 'Guide', link: '/guide/api' },
      { text: 'API reference', link: '/reference/' },
      { text: 'Performance', link: '/performance' },
      { text: 'Developing', link: '/contributing' },
    ],
    sidebar: {
      // Its own sidebar: a page for every exported name, by module (the package's import paths).
      '/reference/': [{ text: 'API reference', link: '/reference/', items: referenceItems }],
      '/': [
        { text: 'Introduction', items: [{ text: 'Why in the database', link: '/why' }] },
        {
          text: 'Guide',
          items: [
            { text: 'API', link: '/guide/api' },
            { text: "The examples' app", link: '/guide/examples-app' },
            { text: 'Lifetimes and in-flight duplicates', link: '/guide/lifetimes' },
            { text: 'Errors', link: '/guide/errors' },
            { text: 'Values and codecs', link: '/guide/values' },
            {
              text: 'HTTP routes',
              link: '/guide/http',
              items: [
                { text: 'Express', link: '/guide/express' },
                { text: 'Fastify', link: '/guide/fastify' },
                { text: 'Koa', link: '/guide/koa' },
                { text: 'NestJS', link: '/guide/nest' },
                { text: 'Fetch API, Hono', link: '/guide/fetch' },
              ],
            },
            { text: 'Message and webhook consumers', link: '/guide/consumers' },
            { text: 'Exactly-once enqueue', link: '/guide/enqueue' },
            { text: 'Atomic phases', link: '/guide/atomic-phases' },
            { text: 'Recovery', link: '/guide/recovery' },
            { text: 'Observability', link: '/guide/observability' },
            { text: 'The table, migrations, command line', link: '/guide/operations' },
            { text: 'Scaling out and poolers', link: '/guide/scaling-out' },
          ],
        },
        {
          text: 'Databases',
          items: [
            { text: 'How each database does it', link: '/guide/databases' },
            { text: 'Adding a database', link: '/guide/adding-a-database' },
          ],
        },
        { text: 'API reference', items: [{ text: 'Every export, by module', link: '/reference/' }] },
        {
          text: 'Project',
          items: [
            { text: 'Performance', link: '/performance' },
            { text: 'Developing', link: '/contributing' },
          ],
        },
      ],
    },
    search: { provider: 'local' },
  },
})
