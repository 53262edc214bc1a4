// `snapshot diff` of a small change on each metadata kind, in process (no node, no NBD): a volume with `--written`
// bytes written sequentially in 1 MiB writes, snapshot a; 1% of the written blocks overwritten at random in 4 KiB
// writes, snapshot b; 1% again as one run, snapshot c. Then the diffs a..b and b..c timed warm (right after the
// writes) and cold (each after a close and a reopen: over paged metadata nothing of the maps is in memory then),
// with the reads they made (metadata pages: a diff reads no data), and the diff of the whole map (an empty map
// against a: what a full replication stream walks) for scale. The kinds are interleaved, round by round;
// medians are printed. Over paged metadata a diff skips every page the two snapshots share, so it reads the
// paths to the leaves that changed (paged-map.ts): 1% at random still changes most leaves (a leaf holds 127 to
// 253 chunks), 1% as one run a few.
// Usage: npm run bench:snapshot-diff -- [--target DIR] [--written 1GiB] [--rounds 3] [--metadata-cache 64MiB]
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/core/units.ts';
import { realFiles, type FileLayer } from '../src/store/file-layer.ts';
import { Pool } from '../src/store/pool.ts';

const { values } = parseArgs({
  options: { target: { type: 'string' }, written: { type: 'string' }, rounds: { type: 'string' }, 'metadata-cache': { type: 'string' } },
});
const MiB = 1024 * 1024;
const written = parseSize(values.written ?? '1GiB');
const rounds = Number(values.rounds ?? '3');
const cacheBytes = parseSize(values['metadata-cache'] ?? '64MiB');
const targetRoot = values.target ?? process.cwd();
const kinds = ['memory', 'paged'] as const;

function median(samples: number[]): number {
  const sorted = [...samples].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

async function timed<T>(run: () => Promise<T>): Promise<[T, number]> {
  const started = performance.now();
  const result = await run();
  return [result, performance.now() - started];
}

/** Milliseconds, and for the cold ones the reads the diff made (metadata pages: it reads no data). */
interface Sample {
  randomWarm: number;
  runWarm: number;
  random: { ms: number; reads: number };
  run: { ms: number; reads: number };
  whole: { ms: number; reads: number };
  changedBytes: number;
}

async function round(kind: (typeof kinds)[number], seed: number): Promise<Sample> {
  const directory = fs.mkdtempSync(path.join(targetRoot, '.chunkd-diffbench-'));
  let reads = 0;
  const files: FileLayer = {
    ...realFiles,
    read: (fd, target, positionBytes) => ((reads += 1), realFiles.read(fd, target, positionBytes)),
    // A page read from the OS page cache in one call (page-file.ts) is a read too.
    readCached: (fd, target, positionBytes) => {
      const bytesRead = realFiles.readCached(fd, target, positionBytes);
      if (bytesRead === target.length) reads += 1;
      return bytesRead;
    },
  };
  const open = (): Promise<Pool> => Pool.open({ directory, files, metadata: kind, metadataCacheBytes: cacheBytes });
  try {
    const pool = await open();
    await pool.createVolume('v', Math.max(4 * written, 64 * MiB));
    const volume = pool.openVolume('v');
    const data = Buffer.alloc(MiB);
    for (let offset = 0; offset < written; offset += MiB) {
      data.fill((offset / MiB) % 251 + 1);
      await volume.write(offset, data);
    }
    await volume.flush();
    await pool.createSnapshot('v', 'a');
    // b: 1% of the blocks written, at random (a fixed sequence per seed), 32 writes at a time.
    let state = seed;
    const blocks = written / 4096;
    const changes = Math.round(blocks / 100);
    const block = Buffer.alloc(4096, 0xee);
    for (let done = 0; done < changes; done += 32) {
      const batch: Array<Promise<void>> = [];
      for (let i = done; i < Math.min(changes, done + 32); i++) {
        state = (Math.imul(state, 1_103_515_245) + 12_345) >>> 0;
        batch.push(volume.write((state % blocks) * 4096, block));
      }
      await Promise.all(batch);
    }
    await volume.flush();
    await pool.createSnapshot('v', 'b');
    // c: 1% of the blocks written again, as one run in the middle.
    for (let offset = written / 2; offset < written / 2 + changes * 4096; offset += MiB) await volume.write(offset, Buffer.alloc(Math.min(MiB, written / 2 + changes * 4096 - offset), 0xdd));
    await volume.flush();
    await volume.close();
    await pool.createSnapshot('v', 'c');
    const [changed, randomWarm] = await timed(() => pool.diff('v', 'a', 'b'));
    const [, runWarm] = await timed(() => pool.diff('v', 'b', 'c'));
    await pool.close();
    // Cold: each diff right after a reopen, its reads counted.
    const cold = async (from: string | null, to: string): Promise<{ ms: number; reads: number }> => {
      const reopened = await open();
      try {
        const before = reads;
        const [, ms] = await timed(() => reopened.diff('v', from, to));
        return { ms, reads: reads - before };
      } finally {
        await reopened.close();
      }
    };
    return {
      randomWarm,
      runWarm,
      random: await cold('a', 'b'),
      run: await cold('b', 'c'),
      whole: await cold(null, 'a'),
      changedBytes: changed.reduce((sum, extent) => sum + extent.chunkCount, 0) * 4096,
    };
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

const samples = new Map<string, Sample[]>(kinds.map((kind) => [kind, []]));
const show = (cold: { ms: number; reads: number }): string => `${cold.ms.toFixed(2)} ms (${cold.reads} reads)`;
for (let r = 0; r < rounds; r++) {
  for (const kind of kinds) {
    const sample = await round(kind, 1 + r);
    samples.get(kind)!.push(sample);
    console.log(`round ${r + 1} ${kind}: 1% at random (${sample.changedBytes} bytes differ) warm ${sample.randomWarm.toFixed(2)} ms, cold ${show(sample.random)}; 1% as one run warm ${sample.runWarm.toFixed(2)} ms, cold ${show(sample.run)}; the whole map cold ${show(sample.whole)}`);
  }
}
console.log(`\n${written / MiB} MiB written, 1% changed, ${rounds} rounds, medians: ms (metadata reads, cold)`);
console.log('| metadata | 1% at random, warm | cold | 1% as one run, warm | cold | the whole map (empty..a), cold |');
console.log('|---|---|---|---|---|---|');
for (const kind of kinds) {
  const all = samples.get(kind)!;
  const ms = (pick: (s: Sample) => number): string => median(all.map(pick)).toFixed(2);
  const cold = (pick: (s: Sample) => { ms: number; reads: number }): string => `${ms((s) => pick(s).ms)} (${median(all.map((s) => pick(s).reads))})`;
  console.log(`| ${kind} | ${ms((s) => s.randomWarm)} | ${cold((s) => s.random)} | ${ms((s) => s.runWarm)} | ${cold((s) => s.run)} | ${cold((s) => s.whole)} |`);
}
