// The scale benchmark with tiny steps, so that it never rots: it must exit 0, write its JSON and Markdown, and
// report every figure of every step. The figures are not held to the goals here (a loaded test machine says
// nothing about speed), only checked to be measurements, and the exact ones (bytes written, snapshots) exact.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { makeTempDir, nodeBinary, repoRoot, runTool } from '../helpers/node-process.ts';

const MiB = 1024 * 1024;

test('npm run bench:scale with tiny steps and snapshots reports every figure', { timeout: 240_000 }, async () => {
  const scratch = makeTempDir('scalebench');
  try {
    const out = path.join(scratch, 'out');
    const args = ['--steps', '4MiB,8MiB', '--volume-size', '1GiB', '--snapshots', '4', '--runtime', '1', '--target', scratch, '--out', out];
    const result = await runTool(nodeBinary, [path.join(repoRoot, 'bench', 'scale.ts'), ...args], { timeoutMs: 230_000 });
    assert.equal(result.code, 0, `${result.stdout}\n${result.stderr}`);
    const report = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8'));
    assert.deepEqual(report.steps.map((s: { writtenBytes: number }) => s.writtenBytes), [0, 4 * MiB, 8 * MiB]);
    assert.deepEqual(report.steps.map((s: { snapshots: number }) => s.snapshots), [0, 2, 4]);
    for (const step of report.steps) {
      for (const [figure, value] of Object.entries(step)) {
        if ((figure === 'writeIops' || figure === 'writeCpuMicros') && step.writtenBytes === 0) assert.equal(value, null);
        else if (figure === 'memoryBeforeRestart') {
          // The RSS by kind of mapping (smaps) and the peak: every part a count of bytes, the peak at least the RSS.
          for (const [part, number] of Object.entries(value as object)) assert.ok(typeof number === 'number' && Number.isFinite(number) && number >= 0, `${figure}.${part} = ${number}`);
          assert.ok((value as { peakBytes: number }).peakBytes >= step.rssBytesBeforeRestart, 'the peak RSS is at least the RSS');
        }
        else if (figure === 'startPhases' || figure === 'startPhasesAgain') {
          // The start's own account, from the node's debug lines: where the pool's open and the rest went.
          assert.ok(Array.isArray(value) && value.some((line) => /^node started [\d.]+ s after its process/.test(line)), `${figure} = ${JSON.stringify(value)}`);
        } else if (figure === 'snapshotSeconds' || figure === 'diff') {
          // The step's snapshots timed (none before the first write); a diff of the last two once there are two.
          const expected = figure === 'diff' ? step.snapshots >= 2 : step.writtenBytes > 0;
          if (!expected) assert.equal(value, null, figure);
          else for (const [part, number] of Object.entries(value as object)) assert.ok(typeof number === 'number' && Number.isFinite(number) && number >= 0, `${figure}.${part} = ${number}`);
        } else if (figure === 'longestPauseWriting' || figure === 'smallWritesWriting') {
          // The event loop's longest gap over the writes with its split (loop-pauses.ts), and the small writes'
          // counts (chunk-writer.ts): every part a number.
          for (const [part, number] of Object.entries(value as object)) assert.ok(typeof number === 'number' && Number.isFinite(number) && number >= 0, `${figure}.${part} = ${number}`);
          if (figure === 'longestPauseWriting') {
            const pause = value as { gapSeconds: number; onCpuSeconds: number; runQueueSeconds: number; elsewhereSeconds: number };
            assert.ok(pause.gapSeconds > 0 && pause.onCpuSeconds + pause.runQueueSeconds + pause.elsewhereSeconds >= pause.gapSeconds - 1e-6, JSON.stringify(pause));
          } else if (step.writtenBytes > 0) {
            const counts = value as { inline: number; thread: number };
            assert.ok(counts.inline + counts.thread > 0, `the chunk writer took writes: ${JSON.stringify(counts)}`);
          }
        } else if (figure === 'longGapsWriting') {
          // The node's logged gaps over 50 ms while writing, as it said them (often none).
          assert.ok(Array.isArray(value) && value.every((line) => /^\d+ ms \(\d+ on CPU, .* elsewhere; \d+ in collections(?: \(\d+ full\))?; other threads \d+ ms of CPU\)$/.test(line)), `${figure} = ${JSON.stringify(value)}`);
        } else if (figure === 'machineWriting') {
          // The machine's CPU over the writes (/proc/stat): stolen and idle shares, percent; none for the baseline.
          if (step.writtenBytes === 0) assert.equal(value, null);
          else for (const [part, number] of Object.entries(value as object)) assert.ok(typeof number === 'number' && number >= 0 && number <= 100, `${figure}.${part} = ${number}`);
        } else if ((figure === 'snapshotListSeconds' || figure === 'snapshotListAgainSeconds') && step.snapshots === 0) assert.equal(value, null);
        else assert.ok(typeof value === 'number' && Number.isFinite(value) && value >= 0, `${figure} = ${value}`);
      }
      for (const figure of ['startSeconds', 'startSecondsAgain', 'startCpuSeconds', 'rssBytesAfterStart', 'rssBytesAfterReads', 'metadataBytes', 'checkpointBytes', 'coldReadIops', 'warmReadIops', 'coldReadCpuMicros', 'warmReadCpuMicros']) {
        assert.ok(step[figure] > 0, `${figure} is measured`);
      }
    }
    assert.ok(report.steps[2].checkpointBytes > report.steps[0].checkpointBytes, 'the checkpoint holds the maps written');
    assert.ok(report.steps[1].writeIops > 0);
    assert.deepEqual(report.steps.map((s: { snapshotSeconds: { count: number } | null }) => s.snapshotSeconds?.count ?? 0), [0, 2, 2]);
    assert.equal(report.steps[2].diff.changedBytes > 0, true, 'two snapshots 2 MiB of random writes apart differ');
    assert.equal(report.projections.length, 5);
    const markdown = fs.readFileSync(path.join(out, 'results.md'), 'utf8');
    assert.match(markdown, /^\| 8 MiB \| 4 \|/m);
    assert.match(markdown, /16 TiB written/);
    assert.deepEqual(fs.readdirSync(scratch).filter((name) => name.startsWith('.chunkd-scalebench-')), [], 'nothing left behind');
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
