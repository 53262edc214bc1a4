// The snapshot benchmark in smoke mode (--quick), so that it never rots: it must exit 0 and report every figure.
// The figures are not held to the goals here (a loaded test machine says nothing about speed), only checked to
// be measurements: positive, finite, and the exact ones (space given back, bytes differing) exact.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { makeTempDir, nodeBinary, repoRoot, runTool } from '../helpers/node-process.ts';

test('npm run bench:snapshots -- --quick reports every figure', { timeout: 240_000 }, async () => {
  const scratch = makeTempDir('snapbench');
  try {
    const out = path.join(scratch, 'results.json');
    const result = await runTool(nodeBinary, [path.join(repoRoot, 'bench', 'snapshots.ts'), '--quick', '--target', scratch, '--out', out], { timeoutMs: 230_000 });
    assert.equal(result.code, 0, `${result.stdout}\n${result.stderr}`);
    const report = JSON.parse(fs.readFileSync(out, 'utf8'));
    for (const value of Object.values(report.createLatencyMsMedian as Record<string, number>)) assert.ok(value > 0 && Number.isFinite(value));
    assert.ok(report.poolBytesPerClientByte >= 1, 'every client byte reaches the pool at least once');
    for (const value of Object.values(report.randReadIopsBySnapshots as Record<string, number>)) assert.ok(value > 0);
    assert.equal(report.diff.changedBytes, 64 * 1024 * 1024);
    assert.equal(report.snapshotRemove.uniqueBytes, 64 * 1024 * 1024);
    assert.ok(report.snapshotRemove.poolBytesFreed >= 0.9 * 64 * 1024 * 1024);
    assert.deepEqual(fs.readdirSync(scratch).filter((name) => name.startsWith('.chunkd-snapbench-')), [], 'nothing left behind');
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
