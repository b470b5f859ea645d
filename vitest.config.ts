import { join } from 'node:path'
import { defineConfig } from 'vitest/config'

/** Tests that build the package or spawn its built tools: one at a time, after the others, as they share `dist/` and `build/`. */
const TOOLS = ['test/cli.test.ts', 'test/package.test.ts', 'test/bench.test.ts', 'test/soak.test.ts', 'test/site.test.ts']

/**
 * The compatibility lane (test/lanes.ts) runs the library and its tests on the oldest supported
 * stack: Kysely 0.28, installed beside 0.29 as `kysely028`, so every `kysely` import that vite
 * resolves (the code under test, the tests) goes there; kysely-postgres-js 3, which serves 0.28
 * (5 needs 0.29); better-sqlite3 12; NestJS 11, installed in the test/support/nest11 workspace.
 * What Node resolves itself is redirected the same way by test/support/compat/hooks.mjs.
 */
const kysely028 = process.env.KIDEM_KYSELY === '0.28'

export default defineConfig({
  resolve: kysely028
    ? {
        alias: [
          { find: /^kysely$/, replacement: join(import.meta.dirname, 'node_modules/kysely028/dist/esm/index.js') },
          // Subpaths 0.28 does not have (kysely/migration) stay unresolvable, as for a user of 0.28.
          { find: /^kysely\/(.*)$/, replacement: 'kysely028/$1' },
          { find: /^kysely-postgres-js5$/, replacement: 'kysely-postgres-js' },
          // better-sqlite3 13 needs Node-API 10 (Node 22.14+); 12 is built for this lane's Node 22.12 at install (.npmrc).
          { find: /^better-sqlite3$/, replacement: 'better-sqlite3-node22' },
          { find: /^@nestjs\/(.*)$/, replacement: join(import.meta.dirname, 'test/support/nest11/node_modules/@nestjs/$1') },
        ],
      }
    : {},
  test: {
    globalSetup: ['test/global-setup.ts'],
    // `npm run coverage`: the library's own code, as the main lane runs it (code the tests run in
    // child processes, the CLI and the crash and soak apps, is not counted).
    coverage: {
      provider: 'v8',
      include: [
        'index.ts',
        'src/**',
        'dialects/**',
        'migrations/**',
        'http/**',
        'express/**',
        'fastify/**',
        'fetch/**',
        'koa/**',
        'testing/**',
        'cli/**',
      ],
      reporter: ['text-summary', 'text'],
    },
    testTimeout: 60_000,
    hookTimeout: 60_000,
    projects: [
      {
        extends: true,
        // Each test has tables of its own, so three files at a time share the servers safely (their
        // tests mostly wait on locks and timers; the two cores are not the limit).
        test: { name: 'library', include: ['test/**/*.test.ts'], exclude: TOOLS, fileParallelism: true, maxWorkers: 3, sequence: { groupOrder: 0 } },
      },
      { extends: true, test: { name: 'tools', include: TOOLS, fileParallelism: false, sequence: { groupOrder: 1 } } },
    ],
  },
})
