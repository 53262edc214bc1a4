// The test runner (vitest): every file under test/, one file at a time, each in a process of its own (the tests start
// nodes, mount FUSE file systems and loop devices, and several need the machine to themselves), tests in a file in
// order, and no time limit of vitest's own (node:test had none): a test that needs one says so.
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    fileParallelism: false,
    testTimeout: 600_000,
    hookTimeout: 600_000,
    teardownTimeout: 60_000,
    sequence: { hooks: 'list' },
    // Node's compile cache for the processes the tests start (chunkd nodes and commands): test/helpers/compile-cache.ts.
    globalSetup: ['test/helpers/compile-cache.ts'],
    setupFiles: ['test/helpers/compile-cache.ts'],
    reporters: ['verbose'],
    coverage: {
      provider: 'v8',
      include: ['src/**/*.ts'],
      reporter: ['text-summary'],
      reportOnFailure: true,
    },
  },
});
