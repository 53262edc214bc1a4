// The replay of a paged pool's journal after a crash, in process (issue 15: a crashed node's start is the replay
// of up to one journal, paged-backend.ts's `replayPaged`). Makes one pool (paged metadata, a volume of
// --volume-size), writes --writes 4 KiB blocks at random into it at QD32, and abandons it without a close (a
// crash: the journal since the last root stays to replay; a checkpoint on the way leaves fewer records). Then, for
// --rounds rounds, copies the pool and times `replayPaged` over the copy (root, table, records applied, in memory:
// nothing written). Prints each round and the median.
// Usage: node bench/paged-replay.ts [--writes 180000] [--volume-size 64GiB] [--cache 64MiB] [--rounds 5] [--dir DIR] [--keep]
// With --dir DIR the pool made is kept at DIR/pool (made only if missing), so that two trees can replay the same
// journal (interleave them: run one, then the other, with the same --dir).
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

async function makePool(directory: string, writes: number, volumeBytes: number): Promise<void> {
  const pool = await Pool.open({ directory, metadata: 'paged' });
  await pool.createVolume('v', volumeBytes);
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
  await pool.abandon();
}

const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

const { values } = parseArgs({
  options: {
    writes: { type: 'string', default: '180000' },
    'volume-size': { type: 'string', default: '64GiB' },
    cache: { type: 'string', default: '64MiB' },
    rounds: { type: 'string', default: '5' },
    dir: { type: 'string' },
  },
});
const base = values.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-replay-'));
const template = path.join(base, 'pool');
if (!fs.existsSync(template)) {
  const started = performance.now();
  await makePool(template, Number(values.writes), parseSize(values['volume-size']));
  console.log(`pool made in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}
const seconds: number[] = [];
/** The process's CPU (all threads) over the open: on a shared machine it moves less than the wall time. */
const cpuSeconds: number[] = [];
for (let round = 0; round < Number(values.rounds); round++) {
  const copy = path.join(base, `copy-${process.pid}`);
  fs.rmSync(copy, { recursive: true, force: true });
  fs.cpSync(template, copy, { recursive: true });
  const cpu = process.cpuUsage();
  const replayed = await replayPaged(realFiles, copy, { cacheBytes: parseSize(values.cache) });
  const cpuUs = process.cpuUsage(cpu);
  await replayed.catalog.close();
  fs.rmSync(copy, { recursive: true, force: true });
  seconds.push(replayed.seconds.replay);
  cpuSeconds.push((cpuUs.user + cpuUs.system) / 1e6);
  console.log(`round ${round + 1}: replayed ${replayed.replayedRecords} records in ${replayed.seconds.replay.toFixed(2)} s (root ${replayed.seconds.root.toFixed(3)} s; CPU of the open ${cpuSeconds.at(-1)!.toFixed(2)} s)`);
}
console.log(`median replay: ${median(seconds).toFixed(2)} s, CPU of the open ${median(cpuSeconds).toFixed(2)} s`);
if (values.dir === undefined) fs.rmSync(base, { recursive: true, force: true });
