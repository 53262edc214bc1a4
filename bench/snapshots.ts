// Snapshot benchmarks (the snapshots issue's figures), each measured the way a user would see it:
//   1. snapshot create latency with 100 MiB and with 4 GiB written (median of repeated creates)
//   2. pool bytes written per client byte, 4 KiB random writes into a volume whose every block a snapshot holds
//   3. 4 KiB random read IOPS at iodepth 32 (fio, nbd engine) with 0, 10, 100 and 1,000 snapshots on the volume
//   4. snapshot diff of two snapshots 1 GiB apart in a 16 GiB volume: time, and bytes the node read meanwhile
//   5. pool space given back by removing a snapshot that alone held 1 GiB
// Rows 1, 2, 4 and 5 drive a real node over its API and NBD socket; bytes written and read come from the node's
// /proc/PID/io (wchar/rchar: every byte it passed to write/read, data and journal alike).
// Usage: node bench/snapshots.ts [--target DIR] [--quick] [--out FILE.json]
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { callApi } from '../src/cli/api-client.ts';
import { TestNbdClient } from '../src/testing/nbd-client.ts';
import { startNode, type RunningNode } from '../src/testing/node-process.ts';

const { values } = parseArgs({
  options: { target: { type: 'string' }, quick: { type: 'boolean' }, out: { type: 'string' } },
});
const quick = values.quick === true;
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const targetRoot = values.target ?? process.cwd();
const scratch = fs.mkdtempSync(path.join(targetRoot, '.chunkd-snapbench-'));
const results: Record<string, unknown> = { quick, target: targetRoot, startedAt: new Date().toISOString() };
let node = null as RunningNode | null;

process.on('SIGINT', () => {
  node?.process.kill('SIGKILL');
  fs.rmSync(scratch, { recursive: true, force: true });
  process.exit(130);
});

function median(samples: number[]): number {
  const sorted = [...samples].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

function processIo(pid: number): { rchar: number; wchar: number } {
  const text = fs.readFileSync(`/proc/${pid}/io`, 'utf8');
  const field = (name: string): number => Number(new RegExp(`^${name}: (\\d+)$`, 'm').exec(text)![1]);
  return { rchar: field('rchar'), wchar: field('wchar') };
}

function poolDiskBytes(pool: string): number {
  const du = spawnSync('du', ['-s', '-B1', pool], { encoding: 'utf8' });
  return Number(du.stdout.split('\t')[0]);
}

const api = (method: string, route: string, body?: unknown): Promise<unknown> => callApi(node!.apiSocket, method, route, body);

/** Writes `bytes` sequentially from `offsetBytes` in 1 MiB requests, 16 in flight, then flushes. */
async function fill(client: TestNbdClient, offsetBytes: number, bytes: number, byte: number): Promise<void> {
  const data = Buffer.alloc(MiB, byte);
  const inFlight = new Set<Promise<unknown>>();
  for (let at = offsetBytes; at < offsetBytes + bytes; at += MiB) {
    const request = client.write(at, data).finally(() => inFlight.delete(request));
    inFlight.add(request);
    if (inFlight.size >= 16) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  await client.flush();
}

/** 4 KiB writes at random chunk-aligned offsets below `rangeBytes`, 32 in flight. */
async function randomWrites(client: TestNbdClient, rangeBytes: number, count: number, seed: number): Promise<void> {
  let state = seed >>> 0;
  const next = (): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state;
  };
  const data = Buffer.alloc(4096, 0x5c);
  const inFlight = new Set<Promise<unknown>>();
  for (let i = 0; i < count; i++) {
    const request = client.write((next() % (rangeBytes / 4096)) * 4096, data).finally(() => inFlight.delete(request));
    inFlight.add(request);
    if (inFlight.size >= 32) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  await client.flush();
}

async function createLatency(client: TestNbdClient, volume: string, writtenBytes: number, creates: number): Promise<number> {
  await fill(client, 0, writtenBytes, 0x11);
  const samples: number[] = [];
  for (let i = 0; i < creates; i++) {
    const started = performance.now();
    await api('POST', `/v1/volumes/${volume}/snapshots`, { name: `lat${i}` });
    samples.push(performance.now() - started);
  }
  return median(samples);
}

function fioRandRead(uri: string, sizeBytes: number, runtimeS: number): number {
  const run = spawnSync('fio', ['--name=rr', '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', '--bs=4k', '--iodepth=32', `--size=${sizeBytes}`,
    '--time_based', `--runtime=${runtimeS}`, '--ramp_time=1', '--output-format=json'], { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (run.status !== 0) throw new Error(`fio failed: ${run.stderr}`);
  return JSON.parse(run.stdout.slice(run.stdout.indexOf('{'))).jobs[0].read.iops as number;
}

async function main(): Promise<void> {
  node = await startNode(path.join(scratch, 'pool'));
  const pid = node.process.pid!;

  // 1. Create latency does not grow with data written.
  const latency: Record<string, number> = {};
  for (const [label, bytes] of [['100MiB', 100 * MiB], ['4GiB', quick ? 256 * MiB : 4 * GiB]] as const) {
    const volume = `lat-${label}`;
    await api('POST', '/v1/volumes', { name: volume, sizeBytes: 8 * GiB });
    const client = await TestNbdClient.connect(node.nbdSocket, volume);
    latency[label] = await createLatency(client, volume, bytes, quick ? 3 : 21);
    await client.disconnect();
    console.log(`snapshot create, ${label} written: median ${latency[label]!.toFixed(2)} ms`);
  }
  results.createLatencyMsMedian = latency;

  // 2. Write amplification of copy-on-write.
  {
    const volumeBytes = quick ? 64 * MiB : 1 * GiB;
    await api('POST', '/v1/volumes', { name: 'amp', sizeBytes: volumeBytes });
    const client = await TestNbdClient.connect(node.nbdSocket, 'amp');
    await fill(client, 0, volumeBytes, 0x22);
    await api('POST', '/v1/volumes/amp/snapshots', { name: 'all' });
    const writes = quick ? 2000 : 50_000;
    const before = processIo(pid);
    await randomWrites(client, volumeBytes, writes, 7);
    const after = processIo(pid);
    const ratio = (after.wchar - before.wchar) / (writes * 4096);
    results.poolBytesPerClientByte = ratio;
    console.log(`4 KiB random writes over a fully snapshotted volume: ${ratio.toFixed(3)} pool bytes written per client byte`);
    await client.disconnect();
  }

  // 3. Random read IOPS against the number of snapshots.
  {
    const volumeBytes = quick ? 64 * MiB : 1 * GiB;
    const runtimeS = quick ? 2 : 8;
    await api('POST', '/v1/volumes', { name: 'many', sizeBytes: volumeBytes });
    const client = await TestNbdClient.connect(node.nbdSocket, 'many');
    await fill(client, 0, volumeBytes, 0x33);
    const iops: Record<string, number> = {};
    let taken = 0;
    for (const target of quick ? [0, 10, 30] : [0, 10, 100, 1000]) {
      while (taken < target) {
        await api('POST', '/v1/volumes/many/snapshots', { name: `s${taken}` });
        await randomWrites(client, volumeBytes, 16, taken + 1); // each snapshot holds some overwritten blocks
        taken += 1;
      }
      // Median of three samples (one in quick mode): single samples on a shared 2-core machine move by 20%.
      const samples = Array.from({ length: quick ? 1 : 3 }, () => fioRandRead(node!.uri('many'), volumeBytes, runtimeS));
      iops[String(target)] = median(samples);
      console.log(`4 KiB random read, iodepth 32, ${target} snapshots: ${Math.round(iops[String(target)]!)} IOPS (samples ${samples.map(Math.round).join(', ')})`);
    }
    results.randReadIopsBySnapshots = iops;
    await client.disconnect();
  }

  // 4. Diff of two snapshots 1 GiB apart in a 16 GiB volume, and 5. space given back by removing the first.
  {
    const apart = quick ? 64 * MiB : GiB;
    await api('POST', '/v1/volumes', { name: 'big', sizeBytes: 16 * GiB });
    const client = await TestNbdClient.connect(node.nbdSocket, 'big');
    await fill(client, 0, apart, 0x44);
    await api('POST', '/v1/volumes/big/snapshots', { name: 'a' });
    await fill(client, 0, apart, 0x55); // the volume now differs from snapshot a in `apart` bytes
    await api('POST', '/v1/volumes/big/snapshots', { name: 'b' });
    await client.disconnect();
    const before = processIo(pid);
    const started = performance.now();
    const diff = (await api('GET', '/v1/volumes/big/snapshots/a/diff?to=b')) as { changedBytes: number };
    const diffMs = performance.now() - started;
    const after = processIo(pid);
    results.diff = { changedBytes: diff.changedBytes, milliseconds: diffMs, nodeBytesRead: after.rchar - before.rchar };
    console.log(`snapshot diff a..b: ${diff.changedBytes} bytes differ, ${diffMs.toFixed(1)} ms, node read ${after.rchar - before.rchar} bytes meanwhile`);

    const { uniqueBytes } = (await api('GET', '/v1/volumes/big/snapshots/a')) as { uniqueBytes: number };
    const spaceBefore = poolDiskBytes(path.join(scratch, 'pool'));
    await api('DELETE', '/v1/volumes/big/snapshots/a');
    const spaceAfter = poolDiskBytes(path.join(scratch, 'pool'));
    results.snapshotRemove = { uniqueBytes, poolBytesFreed: spaceBefore - spaceAfter };
    console.log(`snapshot rm of a snapshot holding ${uniqueBytes} bytes alone: the pool shrank by ${spaceBefore - spaceAfter} bytes`);
  }

  await node.stop();
  node = null;
  const out = values.out ?? path.join('bench', 'results', `snapshots-${Date.now()}.json`);
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, `${JSON.stringify(results, null, 2)}\n`);
  console.log(`results: ${out}`);
}

try {
  await main();
} catch (error) {
  if (node !== null) console.error(`node log (last lines):\n${node.stderr().split('\n').slice(-30).join('\n')}`);
  throw error;
} finally {
  if (node !== null) await node.kill();
  fs.rmSync(scratch, { recursive: true, force: true });
}
