// The NBD benchmark in smoke mode (--quick: one short run per row), so that it never rots: it must exit 0, measure
// every row on chunkd and on qemu-nbd, write well-formed JSON and Markdown, and leave nothing behind on the target.
// The figures themselves are not checked: a loaded test machine says nothing about speed.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { haveTool, makeTempDir, nodeBinary, repoRoot, runTool } from '../helpers/node-process.ts';
import { rows, systemNames, type RowSummary, type Sample } from '../../bench/report.ts';

const missing = ['fio', 'qemu-nbd'].filter((tool) => !haveTool(tool));

test('npm run bench -- --quick measures every row on chunkd and qemu-nbd', { skip: missing.length > 0 ? `needs ${missing.join(', ')}` : false, timeout: 180_000 }, async () => {
  const scratch = makeTempDir('bench');
  try {
    const target = path.join(scratch, 'target');
    const out = path.join(scratch, 'out');
    fs.mkdirSync(target);
    const result = await runTool(nodeBinary, [path.join(repoRoot, 'bench', 'nbd-fio.ts'), '--quick', '--target', target, '--out', out], { timeoutMs: 170_000 });
    assert.equal(result.code, 0, `bench exited ${result.code}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`);
    assert.deepEqual(fs.readdirSync(target), [], 'the bench leaves nothing on the target');

    const report = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8')) as {
      machine: Record<string, unknown>;
      systems: { name: string; skipped: string | null }[];
      rows: { id: string }[];
      samples: Sample[];
      summaries: RowSummary[];
    };
    for (const key of ['nproc', 'cpuModel', 'kernel', 'node', 'fio', 'qemuNbd', 'gitCommit']) assert.ok(report.machine[key], `machine.${key}`);
    assert.deepEqual(report.systems.map((system) => [system.name, system.skipped]), systemNames.map((name) => [name, null]));
    assert.deepEqual(report.rows.map((row) => row.id), rows.map((row) => row.id));
    for (const row of rows) {
      for (const system of systemNames) {
        const samples = report.samples.filter((sample) => sample.rowId === row.id && sample.system === system);
        assert.equal(samples.length, 1, `${row.id} on ${system}: one run in quick mode`);
        const sample = samples[0]!;
        assert.equal(sample.error, null, `${row.id} on ${system}`);
        for (const field of ['iops', 'mbps', 'latencyUsP50', 'latencyUsP99', 'ioBytes', 'serverCpuSeconds', 'serverCpuSecondsPerGB'] as const) {
          assert.ok(Number.isFinite(sample[field]), `${row.id} on ${system}: ${field} is a number`);
        }
      }
      const summary = report.summaries.find((entry) => entry.rowId === row.id);
      assert.ok(summary, `summary of ${row.id}`);
      assert.ok(Number.isFinite(summary.ratio), `${row.id}: ratio`);
      assert.match(summary.verdict, /^(PASS|MISS)$/);
    }

    // Every Markdown table line has as many cells as its header, and every row appears in both tables.
    const markdown = fs.readFileSync(path.join(out, 'results.md'), 'utf8');
    const tableLines = markdown.split('\n').filter((line) => line.startsWith('|'));
    const cellCount = (line: string): number => line.split('|').length - 2;
    assert.equal(tableLines.length, 2 * (rows.length + 2), 'two tables, header + separator + one line per row');
    for (const table of [tableLines.slice(0, rows.length + 2), tableLines.slice(rows.length + 2)]) {
      for (const line of table) assert.equal(cellCount(line), cellCount(table[0]!), line);
      for (const row of rows) assert.ok(table.some((line) => line.startsWith(`| ${row.title} |`)), `${row.title} in ${table[0]}`);
    }
    assert.match(markdown, /chunkd \/ qemu-nbd/);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
