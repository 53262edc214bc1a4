// The replay of a paged pool's journal after a crash, in process (issue 15: a crashed node's start is the replay
// of up to one journal, paged-backend.ts's `replayPaged`). Makes one pool (paged metadata, a volume of
// --volume-size), writes --writes 4 KiB blocks at random into it at QD32, and abandons it without a close (a
// crash: the journal since the last root stays to replay; a checkpoint on the way leaves fewer records). Then, for
// --rounds rounds, copies the pool and times `replayPaged` over the copy (root, table, records applied, in memory:
// nothing written). Prints each round and the median.
// With --then-writes R the pool is closed cleanly after --writes (a root covering them, an empty journal), opened
// again and R more writes at random are left to replay: R records over a map whose leaves are all on disk (what
// a crash leaves after much written). With --cold each copy's files are synced and dropped from the OS page cache
// (`dd iflag=nocache count=0`: the copy's files only) before its replay, so the leaves are read from the disk.
// With --snapshots N the first --writes are cut in N equal shares, a snapshot of the volume after each (the
// snapshot variant of bench:scale: a replay's first write into a leaf a snapshot shares copies it). The pool is
// made with a cache of --cache, as it is replayed.
// Usage: node bench/paged-replay.ts [--writes 180000] [--then-writes R] [--snapshots N] [--volume-size 64GiB] [--cache 64MiB] [--rounds 5] [--cold] [--dir DIR] [--keep]
// With --dir DIR the pool made is kept at DIR/pool (made only if missing), so that two trees can replay the same
// journal (interleave them: run one, then the other, with the same --dir).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/core/units.ts';
import { realFiles } from '../src/store/file-layer.ts';
import { replayPaged } from '../src/store/paged-backend.ts';
import { Pool } from '../src/store/pool.ts';

const blockBytes = 4096;
const queueDepth = 32;

async function writeAtRandom(pool: Pool, writes: number, volumeBytes: number, snapshots = 0): Promise<void> {
  // With snapshots, the writes are cut in equal shares with a snapshot after each (as bench:scale's --snapshots).
  if (snapshots > 0) {
    const share = Math.ceil(writes / snapshots);
    for (let done = 0, index = 0; done < writes; done += share, index++) {
      await writeAtRandom(pool, Math.min(share, writes - done), volumeBytes);
      await pool.createSnapshot('v', `s${pool.listSnapshots('v').length}`);
    }
    return;
  }
  const volume = pool.openVolume('v');
  const blocks = volumeBytes / blockBytes;
  const data = Buffer.alloc(blockBytes, 7);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < writes) {
      next += 1;
      await volume.write(Math.floor(Math.random() * blocks) * blockBytes, data);
    }
  };
  await Promise.all(Array.from({ length: queueDepth }, worker));
  await volume.flush();
}

async function makePool(directory: string, writes: number, thenWrites: number | undefined, volumeBytes: number, snapshots: number, cacheBytes: number): Promise<void> {
  let pool = await Pool.open({ directory, metadata: 'paged', metadataCacheBytes: cacheBytes });
  await pool.createVolume('v', volumeBytes);
  await writeAtRandom(pool, writes, volumeBytes, snapshots);
  if (thenWrites !== undefined) {
    await pool.close();
    pool = await Pool.open({ directory, metadata: 'paged', metadataCacheBytes: cacheBytes });
    await writeAtRandom(pool, thenWrites, volumeBytes);
  }
  await pool.abandon();
}

/** A copy of the pool whose metadata is copied and whose chunk files are hard-linked (the replay reads no chunk). */
function copyPool(from: string, to: string): void {
  fs.cpSync(from, to, { recursive: true, filter: (source) => path.dirname(source) !== path.join(from, 'chunks') });
  for (const name of fs.readdirSync(path.join(from, 'chunks'))) fs.linkSync(path.join(from, 'chunks', name), path.join(to, 'chunks', name));
}

/** Syncs the metadata files of `directory` (its own files: not the chunks) and drops them from the OS page cache (GNU dd's nocache, no data copied). */
function dropFromPageCache(directory: string): void {
  for (const entry of fs.readdirSync(directory, { withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const file = path.join(directory, entry.name);
    const fd = fs.openSync(file, 'r+');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
  }
}

const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

const { values } = parseArgs({
  options: {
    writes: { type: 'string', default: '180000' },
    'then-writes': { type: 'string' },
    cold: { type: 'boolean', default: false },
    'volume-size': { type: 'string', default: '64GiB' },
    cache: { type: 'string', default: '64MiB' },
    rounds: { type: 'string', default: '5' },
    dir: { type: 'string' },
    snapshots: { type: 'string', default: '0' },
  },
});
const base = values.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-replay-'));
const template = path.join(base, 'pool');
if (!fs.existsSync(template)) {
  const started = performance.now();
  await makePool(template, Number(values.writes), values['then-writes'] === undefined ? undefined : Number(values['then-writes']), parseSize(values['volume-size']), Number(values.snapshots), parseSize(values.cache));
  console.log(`pool made in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}
const seconds: number[] = [];
/** The process's CPU (all threads) over the open: on a shared machine it moves less than the wall time. */
const cpuSeconds: number[] = [];
for (let round = 0; round < Number(values.rounds); round++) {
  const copy = path.join(base, `copy-${process.pid}`);
  fs.rmSync(copy, { recursive: true, force: true });
  copyPool(template, copy);
  if (values.cold) dropFromPageCache(copy);
  const cpu = process.cpuUsage();
  const replayed = await replayPaged(realFiles, copy, { cacheBytes: parseSize(values.cache) });
  const cpuUs = process.cpuUsage(cpu);
  const { misses, passRestarts } = replayed.catalog.pageReads;
  console.log(`  load left by the crash: ${JSON.stringify(replayed.catalog.replayLoad)}`);
  await replayed.catalog.close();
  fs.rmSync(copy, { recursive: true, force: true });
  seconds.push(replayed.seconds.replay);
  cpuSeconds.push((cpuUs.user + cpuUs.system) / 1e6);
  console.log(`round ${round + 1}: replayed ${replayed.replayedRecords} records in ${replayed.seconds.replay.toFixed(2)} s (root ${replayed.seconds.root.toFixed(3)} s; ${misses} page reads (${replayed.prefetchedPages} ahead), ${passRestarts} restarts; CPU of the open ${cpuSeconds.at(-1)!.toFixed(2)} s)`);
}
console.log(`median replay: ${median(seconds).toFixed(2)} s, CPU of the open ${median(cpuSeconds).toFixed(2)} s`);
if (values.dir === undefined) fs.rmSync(base, { recursive: true, force: true });
