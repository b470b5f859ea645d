import { defineConfig } from 'vitepress'

/** The docs site (`npm run docs`): the guides, the benchmark page and the contributor pages. */
export default defineConfig({
  title: 'kysely-idempotency',
  description: 'Safe retries for unsafe API requests: the key, your writes and the stored answer in one SQL transaction, through Kysely.',
  cleanUrls: true,
  // A link to a page that does not exist fails the build.
  ignoreDeadLinks: false,
  themeConfig: {
    nav: [
      { text: 'Guide', link: '/guide/api' },
      { text: 'Performance', link: '/performance' },
      { text: 'Developing', link: '/contributing' },
    ],
    sidebar: [
      { text: 'Introduction', items: [{ text: 'Why in the database', link: '/why' }] },
      {
        text: 'Guide',
        items: [
          { text: 'API', link: '/guide/api' },
          { text: 'Lifetimes and in-flight duplicates', link: '/guide/lifetimes' },
          { text: 'Errors', link: '/guide/errors' },
          { text: 'Values and codecs', link: '/guide/values' },
          { text: 'HTTP adapters', link: '/guide/http' },
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
      {
        text: 'Project',
        items: [
          { text: 'Performance', link: '/performance' },
          { text: 'Developing', link: '/contributing' },
        ],
      },
    ],
    search: { provider: 'local' },
  },
})
