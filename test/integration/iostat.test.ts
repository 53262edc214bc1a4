// Per-volume metrics and chunkd iostat (issue 18): under fio load through NBD, /metrics scraped over TCP with real
// HTTP shows each volume's requests, bytes and latency histogram by operation, and every stage's, moving (and nothing for a volume
// left idle); chunkd iostat reports the interval's IOPS, MB/s and latency percentiles while fio runs. The pure
// parts (buckets, quantiles, interval rows) are checked exactly.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, test } from 'vitest';
import { iostatRows } from '../../src/cli/iostat.ts';
import { latencyBucketsSeconds, quantileSeconds } from '../../src/core/latency-histogram.ts';
import type { BlockDevice } from '../../src/core/block-device.ts';
import { emptyIoStats, MeasuredDevice, observe } from '../../src/node/io-stats.ts';
import { haveTool, makeTempDir, runTool, startNode } from '../helpers/node-process.ts';

const scratch = makeTempDir('iostat');
afterAll(() => fs.rmSync(scratch, { recursive: true, force: true }));

test('a measured device counts its requests in flight while they run', async () => {
  const stats = emptyIoStats();
  const release = Promise.withResolvers<void>();
  const device = new MeasuredDevice({ name: 'v', sizeBytes: 4096, readOnly: false, read: () => release.promise } as unknown as BlockDevice, stats);
  const pending = [device.read(0, Buffer.alloc(512)), device.read(512, Buffer.alloc(512))];
  assert.equal(stats.read.inFlight, 2);
  release.resolve();
  await Promise.all(pending);
  assert.equal(stats.read.inFlight, 0);
  assert.equal(stats.read.count, 2);
});

test('latency buckets, quantiles and an interval\'s rows', () => {
  const stats = emptyIoStats();
  for (let i = 0; i < 98; i++) observe(stats.read, 4096, 0.0002, false);
  observe(stats.read, 4096, 0.02, false);
  observe(stats.read, 0, 20, true);
  assert.equal(stats.read.count, 100);
  assert.equal(stats.read.bytes, 99 * 4096);
  assert.equal(stats.read.errors, 1);
  assert.equal(stats.read.buckets[latencyBucketsSeconds.indexOf(0.00025)], 98);
  assert.equal(stats.read.buckets.at(-1), 1, 'past the last bound: +Inf');
  assert.equal(quantileSeconds(stats.read.buckets, 0.5), 0.00025);
  assert.equal(quantileSeconds(stats.read.buckets, 0.99), 0.025);
  assert.equal(quantileSeconds(stats.read.buckets, 1), Number.POSITIVE_INFINITY);
  assert.equal(quantileSeconds(emptyIoStats().read.buckets, 0.5), null);
  const before = { atMs: 1000, exports: { vol: emptyIoStats(), idle: emptyIoStats() } };
  const later = structuredClone(before);
  later.atMs = 3000;
  for (let i = 0; i < 400; i++) observe(later.exports.vol.write, 1 << 20, 0.004, false);
  const rows = iostatRows(before, later, null);
  assert.deepEqual(rows.map((row) => [row.export, row.writesPerSecond, row.writeMBps, row.writeP50Ms, row.readP50Ms, row.queueDepth]), [['vol', 200, 209.7, 5, null, 0.8]], '400 writes of 4 ms in 2 s: 0.8 in flight on average');
  assert.deepEqual(iostatRows(before, later, 'idle').map((row) => row.export), ['idle'], 'a named volume is shown even when idle');
});

test('under fio: per-volume counters and histograms move on /metrics over TCP, and chunkd iostat shows the load', { skip: !haveTool('fio') }, async () => {
  const node = await startNode(path.join(scratch, 'pool'), ['--metrics-listen', '127.0.0.1:0']);
  try {
    for (const name of ['busy', 'idle']) assert.equal((await node.cli('volume', 'create', name, '--size', '256MiB')).code, 0);
    const address = /, metrics (127\.0\.0\.1:\d+)/.exec(node.readyLine)![1];
    const scrape = async (): Promise<Map<string, number>> => {
      const text = await (await fetch(`http://${address}/metrics`)).text();
      return new Map([...text.matchAll(/^(chunkd_(?:volume|stage)_\S+) (\S+)$/gm)].map((m) => [m[1]!, Number(m[2])]));
    };
    const fio = runTool('fio', ['--name=load', '--ioengine=nbd', `--uri=${node.uri('busy')}`, '--rw=randrw', '--bs=4k,2m', '--iodepth=16', '--size=64M', '--time_based', '--runtime=8', '--randrepeat=0']);
    // The first scrape once fio's load is there (every counter compared below has moved), not after a fixed second:
    // fio may take longer to start on a loaded machine.
    const moved = ['read', 'write'].map((op) => `chunkd_volume_request_seconds_count{volume="busy",op="${op}"}`)
      .concat(['receive', 'worker_wait', 'chunk_read', 'chunk_write', 'reply'].map((stage) => `chunkd_stage_seconds_count{stage="${stage}"}`));
    let first = await scrape();
    for (const deadline = performance.now() + 30_000; !moved.every((name) => (first.get(name) ?? 0) > 0); first = await scrape()) {
      assert.ok(performance.now() < deadline, `fio's load not seen in 30 s: ${moved.map((name) => `${name} ${first.get(name)}`).join(', ')}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const [iostat, text] = await Promise.all([node.cli('iostat', 'busy', '1', '--count', '2', '--json'), node.cli('iostat', '1', '--count', '1')]);
    const second = await scrape();
    const run = await fio;
    assert.equal(run.code, 0, run.stderr);
    // Queue depth: a gauge per volume and operation, back to zero once the load is gone.
    const third = await scrape();
    for (const op of ['read', 'write', 'trim', 'zero', 'flush']) {
      const depth = `chunkd_volume_requests_in_flight{volume="busy",op="${op}"}`;
      assert.ok(second.has(depth), `${depth} is exported`);
      assert.equal(third.get(depth), 0, `${depth} after the load`);
    }
    assert.equal(iostat.code, 0, iostat.stderr);
    const reports = iostat.stdout.trim().split('\n').map((line) => JSON.parse(line) as { volumes: Array<{ export: string; readsPerSecond: number; writesPerSecond: number; writeP99Ms: number | null; queueDepth: number }> });
    assert.equal(reports.length, 2);
    for (const report of reports) {
      const [row] = report.volumes;
      assert.equal(row?.export, 'busy');
      assert.ok(row.readsPerSecond > 0 && row.writesPerSecond > 0 && row.writeP99Ms !== null && row.queueDepth > 0, JSON.stringify(row));
    }
    assert.match(text.stdout, /^volume\s+r\/s\s+w\/s\s+rMB\/s\s+wMB\/s\s+r p50 ms.*\s+qd\s+errors$/m);
    assert.match(text.stdout, /^busy\s+\d+/m);
    assert.doesNotMatch(text.stdout, /^idle/m, 'an idle volume has no line in the all-volumes view');
    for (const op of ['read', 'write']) {
      const count = `chunkd_volume_request_seconds_count{volume="busy",op="${op}"}`;
      assert.ok(second.get(count)! > first.get(count)!, `${count}: ${first.get(count)} then ${second.get(count)}`);
      assert.equal(second.get(`chunkd_volume_requests_total{volume="busy",op="${op}"}`), second.get(count));
      assert.equal(second.get(`chunkd_volume_request_seconds_bucket{volume="busy",op="${op}",le="+Inf"}`), second.get(count));
      assert.ok(second.get(`chunkd_volume_bytes_total{volume="busy",op="${op}"}`)! >= 4096 * second.get(count)!);
    }
    assert.equal(second.get('chunkd_volume_requests_total{volume="idle",op="write"}'), undefined, 'a volume no client opened has no series');
    // The stages, node-wide: a write's payload arriving, a 2 MiB write's wait for a chunk I/O worker (writes up to
    // 1 MiB and 4 KiB reads run on the main thread), chunk reads and writes, and the replies moved with the load.
    for (const stage of ['receive', 'worker_wait', 'chunk_read', 'chunk_write', 'reply']) {
      const count = `chunkd_stage_seconds_count{stage="${stage}"}`;
      assert.ok(second.get(count)! > first.get(count)!, `${count}: ${first.get(count)} then ${second.get(count)}`);
      assert.equal(second.get(`chunkd_stage_seconds_bucket{stage="${stage}",le="+Inf"}`), second.get(count));
    }
  } finally {
    await node.stop();
  }
});
