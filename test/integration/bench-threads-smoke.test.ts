// Smoke test of bench/threads.ts (the worker-thread issue's benchmark), so that it never rots: a tiny run of
// three rows on every system; the report must be produced and well formed, whatever the figures.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { makeTempDir, nodeBinary, repoRoot, runTool } from '../helpers/node-process.ts';

test('bench:threads --quick produces a table for every system and row, with the event loop of each chunkd', { timeout: 600_000 }, async () => {
  const scratch = makeTempDir('bench-threads');
  try {
    const out = path.join(scratch, 'threads.json');
    const rows = ['randread-4k-qd32', 'write-1m-qd8', 'randwrite-4k-qd8-c2'];
    // 16 MiB per system, not --quick's 128: each of the six systems is filled first, and no
    // check here depends on the size.
    const result = await runTool(nodeBinary, [path.join(repoRoot, 'bench', 'threads.ts'), '--quick', '--size-mib', '16', '--target', scratch, '--out', out, '--rows', rows.join(',')], { timeoutMs: 600_000 });
    assert.equal(result.code, 0, result.stderr);
    const report = JSON.parse(fs.readFileSync(out, 'utf8'));
    assert.deepEqual(report.rows.map((row: { id: string }) => row.id), rows);
    for (const system of report.systems) {
      for (const row of rows) {
        if (system.onlyRows !== null && !system.onlyRows.includes(row)) continue;
        const cell = report.table[row][system.id];
        assert.ok(cell !== null && cell.median > 0, `${system.id} ${row}: ${JSON.stringify(cell)}`);
        if (system.chunkdArgs !== null) assert.ok(cell.eventLoop > 0 && cell.eventLoop <= 1, `${system.id} ${row} event loop ${cell.eventLoop}`);
      }
    }
    assert.ok(report.systems.some((system: { id: string }) => system.id === 'chunkd-nt2'));
    assert.match(result.stdout, /\| randread-4k-qd32 \|/);
    assert.equal(fs.readdirSync(scratch).filter((name) => name.startsWith('.chunkd-threads-')).length, 0, 'the workspace is removed');
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
