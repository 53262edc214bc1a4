// Node's compile cache for the processes the tests start: vitest's globalSetup and setupFiles both load this file.
//
// Every chunkd process a test starts (a node, each CLI command, their worker threads, the benchmarks) loads and
// type-strips its modules at start, a third of a second of CPU or more each, and the suite starts hundreds of them.
// Node's compile cache (NODE_COMPILE_CACHE) keeps what that produced, so that a module seen before starts from the
// cache. vitest turns the cache off in its workers and in every process they start (NODE_DISABLE_COMPILE_CACHE),
// because V8's coverage needs source positions that cached scripts lack; but coverage here is the test process's
// own (vitest.config.ts), never the processes it starts, so after the test process has started (the setting is
// read once, at a process's start) this gives the cache back to what it starts. Nothing else changes: a cached
// script runs as the same module compiled afresh would.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const variable = 'CHUNKD_TEST_COMPILE_CACHE';

// In a test process (setupFiles): what it starts from now on uses the run's cache.
const directory = process.env[variable];
if (directory !== undefined) {
  process.env.NODE_COMPILE_CACHE = directory;
  delete process.env.NODE_DISABLE_COMPILE_CACHE;
}

/** In vitest's own process (globalSetup), before any test process starts: one cache for the run, removed after it. */
export function setup(): () => void {
  const made = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-compile-cache-'));
  process.env[variable] = made;
  return () => fs.rmSync(made, { recursive: true, force: true });
}
