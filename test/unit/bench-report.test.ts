// The benchmark suite's pure half: row selection, medians and spreads, ratios to the raw disk and to the best peer,
// and the Markdown tables (bench/report.ts), on hand-made samples.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { allRows, defaultRowIds, formatMarkdownTables, selectRows, summariseRow, type Sample, type SystemInfo } from '../../bench/report.ts';
import { rowArgs } from '../../bench/fio.ts';
import { formatProjectionTable, project, snapshotPoints, type ScaleStep } from '../../bench/scale-report.ts';
import { machineCpuShares, machineCpuTicks, parseMachineCpuTicks } from '../../bench/processes.ts';
import { parseVariant } from '../../bench/systems.ts';

function system(id: string, kind: SystemInfo['kind'], multiConn = true): SystemInfo {
  return { id, title: id, kind, multiConn, command: null, skipped: null, preparation: null };
}

function sample(rowId: string, systemId: string, run: number, iops: number): Sample {
  return {
    rowId, system: systemId, run, iops, mbps: (iops * 4096) / 1e6, latencyUsP50: 10, latencyUsP99: 20, latencyUsP999: 30, writeLatencyUsP99: null,
    ioBytes: iops * 4096, serverCpuSeconds: 1, serverCpuSecondsPerGB: 2, clientCpuPercent: 50, error: null,
  };
}

test('rows: every workload at 1 and 4 connections; the default set; --only by id, prefix or all', () => {
  assert.equal(allRows.length, 16);
  assert.equal(new Set(allRows.map((row) => row.id)).size, 16);
  assert.deepEqual(selectRows(undefined).map((row) => row.id), defaultRowIds);
  assert.equal(selectRows('all').length, 16);
  assert.deepEqual(selectRows('randread-4k-qd32').map((row) => row.id), ['randread-4k-qd32-c1', 'randread-4k-qd32-c4']);
  assert.deepEqual(selectRows('write').map((row) => row.id), ['write-1m-qd8-c1', 'write-1m-qd8-c4']);
  assert.throws(() => selectRows('randfoo'), /no row "randfoo"/);
  const mixed = allRows.find((row) => row.id === 'randrw-4k-qd32-c4')!;
  assert.equal(mixed.readPercent, 70);
  assert.equal(mixed.title, '4 KiB random 70/30 read/write, QD32, 4 conns');
});

test('fio arguments: numjobs per connection, the mix, and flushes only where the row writes', () => {
  const options = { runtimeSeconds: 3, rampSeconds: 1, sizeBytes: 2 ** 30, flushEveryBytes: 4 * 2 ** 20 };
  const mixed = rowArgs(allRows.find((row) => row.id === 'randrw-4k-qd32-c4')!, options);
  assert.ok(mixed.includes('--numjobs=4') && mixed.includes('--rwmixread=70') && mixed.includes('--fsync=1024') && mixed.includes('--group_reporting'));
  assert.ok(!rowArgs(allRows.find((row) => row.id === 'randread-4k-qd1-c1')!, options).some((arg) => arg.startsWith('--fsync')));
  assert.ok(rowArgs(allRows.find((row) => row.id === 'write-1m-qd8-c1')!, options).includes('--fsync=4'));
  assert.ok(!rowArgs(allRows.find((row) => row.id === 'write-1m-qd8-c1')!, { ...options, flushEveryBytes: null }).some((arg) => arg.startsWith('--fsync')));
});

test('summaries: median and spread, ratio to raw and to the best peer, a row a system cannot run', () => {
  const systems = [system('raw', 'raw'), system('peer-a', 'peer'), system('peer-b', 'peer', false), system('chunkd', 'chunkd')];
  const single = allRows.find((row) => row.id === 'randread-4k-qd32-c1')!;
  const samples = [
    ...[100, 300, 200].map((iops, index) => sample(single.id, 'raw', index + 1, iops)),
    ...[50, 40, 60].map((iops, index) => sample(single.id, 'peer-a', index + 1, iops)),
    ...[80, 80, 90].map((iops, index) => sample(single.id, 'peer-b', index + 1, iops)),
    ...[100, 120, 110].map((iops, index) => sample(single.id, 'chunkd', index + 1, iops)),
    { ...sample(single.id, 'chunkd', 4, 0), iops: null, mbps: null, error: 'fio exited 1' },
  ];
  const summary = summariseRow(single, systems, samples);
  assert.equal(summary.bestPeer, 'peer-b');
  assert.deepEqual(summary.systems.raw!.value, { median: 200, min: 100, max: 300, count: 3 });
  assert.equal(summary.systems.chunkd!.ratioToRaw, 110 / 200);
  assert.equal(summary.systems.chunkd!.ratioToBestPeer, 110 / 80);
  assert.equal(summary.systems.chunkd!.failedRuns, 1);
  assert.equal(summary.systems['peer-b']!.ratioToBestPeer, 80 / 50, 'a peer against the best other peer');
  assert.equal(summary.systems.raw!.ratioToBestPeer, null);

  const multi = allRows.find((row) => row.id === 'randread-4k-qd32-c4')!;
  const blocked = summariseRow(multi, systems, [sample(multi.id, 'raw', 1, 10), sample(multi.id, 'peer-a', 1, 5), sample(multi.id, 'chunkd', 1, 6)]);
  assert.equal(blocked.systems['peer-b']!.notRun, 'no multi-conn');
  assert.equal(blocked.systems['peer-b']!.value, null);
  assert.equal(blocked.bestPeer, 'peer-a');

  const markdown = formatMarkdownTables([summary, blocked], systems, { runs: 3, runtimeSeconds: 3, rampSeconds: 1, volumeBytes: 2 ** 30, cache: 'warm', flushEveryBytes: null });
  const lines = markdown.split('\n').filter((line) => line.startsWith('|'));
  assert.equal(lines.length, 4 * 4, 'four tables of header, separator and two rows');
  assert.ok(markdown.includes('| 4 KiB random read, QD32 | IOPS | 200 (100–300) | 50.0 (40.0–60.0) | 80.0 (80.0–90.0) | 110 (100–120) |'));
  assert.ok(markdown.includes('n/a (no multi-conn)'));
  assert.ok(markdown.includes('0.55x / 1.38x'));
});

test('--chunkd-variant NAME=ARGS', () => {
  assert.deepEqual(parseVariant('w4=--workers 4'), { name: 'w4', args: ['--workers', '4'] });
  assert.deepEqual(parseVariant('plain'), { name: 'plain', args: [] });
  assert.throws(() => parseVariant('bad name=--x'), /not a name/);
  // NAME@DIR: another checkout's chunkd (made absolute), so that an old and a new tree run interleaved.
  assert.deepEqual(parseVariant('old@/tmp/old-tree=--workers 2'), { name: 'old', args: ['--workers', '2'], checkout: '/tmp/old-tree' });
  assert.deepEqual(parseVariant('old@rel/tree'), { name: 'old', args: [], checkout: path.resolve('rel/tree') });
  assert.throws(() => parseVariant('old@=--workers 2'), /names no checkout/);
  assert.throws(() => parseVariant('bad name@/tmp/x'), /not a name/);
});

test('scale: snapshots evenly spaced on 4 KiB boundaries; projection from the slope of the last two steps', () => {
  assert.deepEqual(snapshotPoints(16 * 2 ** 20, 4), [4, 8, 12, 16].map((m) => m * 2 ** 20));
  assert.ok(snapshotPoints(2 ** 30, 3).every((at) => at % 4096 === 0));
  assert.deepEqual(snapshotPoints(2 ** 30, 0), []);
  const GiB = 2 ** 30;
  const TiB = 2 ** 40;
  const step = (gib: number, rss: number, start: number): ScaleStep => ({
    writtenBytes: gib * GiB, snapshots: 0, writeIops: 1, rssBytesBeforeRestart: 0, eventLoopDelayMaxWritingSeconds: 0, checkpointsWhileWriting: 0,
    startSeconds: start, startSecondsAgain: start, rssBytesAfterStart: 0, metadataBytes: gib * 2 ** 20, checkpointBytes: 0, checkpointSeconds: 0,
    checkpointEncodeSeconds: 0, eventLoopDelayMaxCheckpointSeconds: 0, coldReadIops: 1, warmReadIops: 1, rssBytesAfterReads: rss,
  });
  assert.deepEqual(project([step(0, 50, 1), step(1, 100, 1)]), [], 'one step has no slope');
  assert.deepEqual(project([step(1, 100, 1), step(2, 100, 1)]), [], 'no baseline, no average');
  const projections = project([step(0, 100, 1), step(1, 999, 9), step(2, 100, 1), step(4, 300, 2)], [8 * GiB]);
  const rss = projections.find((p) => p.figure === 'rssBytesAfterReads')!;
  assert.equal(rss.perGiB, 100, 'the last two steps only');
  assert.equal(rss.perGiBAverage, 50, 'from the baseline to the last step');
  assert.deepEqual(rss.at, [{ writtenBytes: 8 * GiB, value: 700, valueAverage: 500 }]);
  assert.deepEqual(projections.find((p) => p.figure === 'startSeconds')!.at, [{ writtenBytes: 8 * GiB, value: 4, valueAverage: 3 }]);
  assert.match(formatProjectionTable(projections), /\| start time \| 500 ms – 250 ms \| 4 s – 3 s \|/);
  assert.throws(() => project([step(0, 0, 0), step(2, 0, 0), step(2, 0, 0)]), /must write more/);
  // A figure that fell between the last two steps (start time within its noise) projects flat, never below the last step.
  const falling = project([step(0, 100, 0.2), step(4, 300, 0.5), step(16, 400, 0.4)], [TiB]).find((p) => p.figure === 'startSeconds')!;
  assert.ok(falling.perGiB < 0, 'the measured slope is still reported');
  assert.equal(falling.at[0]!.value, 0.4);
  assert.ok(falling.at[0]!.valueAverage > 0.4, 'the average slope from nothing still rises');
});

test("scale: the machine's CPU shares from /proc/stat: steal and idle in percent of all CPU time between two readings", () => {
  const text = (user: number, idle: number, iowait: number, steal: number): string =>
    `cpu  ${user} 10 200 ${idle} ${iowait} 0 30 ${steal} 7 0\ncpu0 1 2 3 4 5 6 7 8 9 0\nintr 1 2 3\n`;
  const before = parseMachineCpuTicks(text(1000, 5000, 100, 50))!;
  // guest (7) is already in user: not counted twice.
  assert.deepEqual(before, { total: 1000 + 10 + 200 + 5000 + 100 + 30 + 50, idle: 5100, steal: 50 });
  const after = parseMachineCpuTicks(text(1600, 5200, 100, 250))!;
  // 1,000 ticks more in all: 200 stolen, 200 idle.
  assert.deepEqual(machineCpuShares(before, after), { stealPercent: 20, idlePercent: 20 });
  assert.equal(machineCpuShares(before, before), null, 'no time between the readings');
  assert.equal(machineCpuShares(null, after), null);
  // A kernel before steal was counted (fewer than eight fields) or something else is not read.
  assert.equal(parseMachineCpuTicks('cpu  1 2 3 4\n'), null);
  assert.equal(parseMachineCpuTicks('nothing'), null);
  const real = machineCpuTicks();
  if (fs.existsSync('/proc/stat')) assert.ok(real !== null && real.total > 0 && real.steal >= 0 && real.idle <= real.total);
});
