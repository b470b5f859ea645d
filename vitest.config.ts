import { defineConfig } from 'vitest/config'

/** Tests that build the package or spawn its built tools: one at a time, after the others, as they share `dist/` and `build/`. */
const TOOLS = ['test/cli.test.ts', 'test/package.test.ts', 'test/bench.test.ts', 'test/soak.test.ts']

export default defineConfig({
  test: {
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    projects: [
      {
        extends: true,
        // Each test has tables of its own, so two files at a time share the servers safely.
        test: { name: 'library', include: ['test/**/*.test.ts'], exclude: TOOLS, fileParallelism: true, maxWorkers: 2, sequence: { groupOrder: 0 } },
      },
      { extends: true, test: { name: 'tools', include: TOOLS, fileParallelism: false, sequence: { groupOrder: 1 } } },
    ],
  },
})
