// The micro benchmarks in smoke mode (a few iterations of each task), so that they never rot: every module runs
// to completion and reports a positive rate for each of its tasks. The figures themselves are not checked.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { runModule } from '../../bench/micro/harness.ts';
import { microModules } from '../../bench/micro/run.ts';

test('the micro benchmark modules are nbd-codec, extents, checksum, worker, io-stats and paged-map', () => {
  assert.deepEqual(microModules.map((module) => module.name), ['nbd-codec', 'extents', 'checksum', 'worker', 'io-stats', 'paged-map']);
});

for (const module of microModules) {
  test(`micro benchmark ${module.name} runs in smoke mode`, { timeout: 60_000 }, async () => {
    const results = await runModule(module, { smoke: true });
    assert.ok(results.length >= 2, `${module.name} has tasks`);
    for (const result of results) {
      assert.ok(Number.isFinite(result.opsPerSecond) && result.opsPerSecond > 0, `${result.task}: ops/s`);
      assert.ok(Number.isFinite(result.latencyNsP99) && result.latencyNsP99 >= result.latencyNsP50, `${result.task}: p99 >= p50`);
      assert.ok(result.samples >= 8, `${result.task}: samples`);
    }
  });
}
