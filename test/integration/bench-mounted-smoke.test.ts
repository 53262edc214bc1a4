// The mounted-path benchmark in smoke mode, so that it never rots: every row runs on every system, the report
// is written, and nothing stays mounted.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { runMountedBench } from '../../bench/mounted.ts';
import { makeTempDir } from '../helpers/node-process.ts';
import { loopDevicesUnder, mountsUnder } from '../helpers/mounts.ts';

test('bench/mounted.ts --quick: chunkd FUSE, nbdfuse and raw rows all measured; cleaned up', { timeout: 300_000 }, async () => {
  const target = makeTempDir('bench-mounted');
  const out = path.join(target, 'out');
  try {
    const { summary, markdown } = await runMountedBench({ target, runs: 1, runtimeS: 1, sizeMiB: 32, out, log: () => {} });
    assert.deepEqual(summary.map((row) => row.row), ['seq-read-1m', 'seq-write-1m', 'rand-read-4k', 'rand-write-4k']);
    for (const row of summary) {
      for (const system of ['chunkd-fuse', 'nbdfuse', 'raw'] as const) assert.ok((row.medians[system] ?? 0) > 0, `${row.row} on ${system}: ${row.medians[system]}`);
      assert.ok(row.fuseOverNbdfuse !== null);
    }
    assert.match(markdown, /\| 4 KiB random write, QD32 \(IOPS\) \|/);
    const json = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8'));
    assert.equal(json.samples.length, 12);
    assert.ok(Object.keys(json.fuseSizes.writes ?? {}).length > 0, 'the FUSE request sizes are reported');
    assert.ok(fs.readFileSync(path.join(out, 'results.md'), 'utf8').includes('(a)/(b)'));
    assert.deepEqual(mountsUnder(target), []);
    assert.deepEqual(loopDevicesUnder(target), []);
    assert.deepEqual(fs.readdirSync(target), ['out'], 'the work directory is removed');
  } finally {
    fs.rmSync(target, { recursive: true, force: true });
  }
});
