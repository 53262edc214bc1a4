// In process, the CPU a large write costs over each kind of metadata (issue 15: paged metadata's 1 MiB writes
// against the in-memory maps; issue 19's "store alone" row). A fresh pool (--metadata memory or paged), one volume
// (--volume, default 1GiB), written whole once in sequence (the first lap: fresh chunks, not measured), then
// --laps laps of --size writes in sequence at QD8 over the written data (the steady state: each write frees the
// chunks it replaces), and a flush. Prints the process's CPU (user + system, all threads: checksums, pwrites and
// commits included) per GB written and per write, the rate, and the checkpoints during the measured laps. On a
// shared machine the CPU per GB moves less than the rate: interleave the kinds and repeat.
// Usage: node bench/paged-large-writes.ts memory|paged [--size 1MiB] [--volume 1GiB] [--laps 3]. Profile with
// `node --cpu-prof` and enough laps that the first (not measured) is a small part of it.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/core/units.ts';
import { Pool } from '../src/store/pool.ts';

const { values, positionals } = parseArgs({ allowPositionals: true, options: { size: { type: 'string', default: '1MiB' }, volume: { type: 'string', default: '1GiB' }, laps: { type: 'string', default: '3' } } });
const kind = positionals[0];
if (kind !== 'memory' && kind !== 'paged') throw new Error('usage: node bench/paged-large-writes.ts memory|paged [--size 1MiB] [--volume 1GiB] [--laps 3]');
const writeBytes = parseSize(values.size);
const volumeBytes = parseSize(values.volume);
const laps = Number(values.laps);
const queueDepth = 8;

const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-large-writes-'));
try {
  const pool = await Pool.open({ directory: path.join(directory, 'pool'), metadata: kind });
  await pool.createVolume('v', volumeBytes);
  const volume = pool.openVolume('v');
  const data = Buffer.alloc(writeBytes, 7);
  /** Writes `lapCount` laps of the volume in sequence, `queueDepth` writes in flight. */
  const writeLaps = async (lapCount: number): Promise<void> => {
    const totalBytes = lapCount * volumeBytes;
    let next = 0;
    await Promise.all(Array.from({ length: queueDepth }, async () => {
      while (next < totalBytes) {
        const at = next % volumeBytes;
        next += writeBytes;
        await volume.write(at, data.subarray(0, Math.min(writeBytes, volumeBytes - at)));
      }
    }));
    await volume.flush();
  };
  await writeLaps(1);

  const checkpointsBefore = (await pool.status()).checkpointsTotal;
  const cpu = process.cpuUsage();
  const start = performance.now();
  await writeLaps(laps);
  const seconds = (performance.now() - start) / 1000;
  const usage = process.cpuUsage(cpu);
  const checkpoints = (await pool.status()).checkpointsTotal - checkpointsBefore;
  const bytes = laps * volumeBytes;
  const cpuSeconds = (usage.user + usage.system) / 1e6;
  console.log(`${kind}, ${values.size} writes over ${values.volume}, ${laps} laps: ${(cpuSeconds / (bytes / 1e9)).toFixed(3)} s CPU/GB (user ${(usage.user / 1e6 / (bytes / 1e9)).toFixed(3)}), ${((cpuSeconds * 1e6) / (bytes / writeBytes)).toFixed(0)} us/write, ${(bytes / 1e6 / seconds).toFixed(0)} MB/s, ${checkpoints} checkpoints`);
  await volume.close();
  await pool.close();
} finally {
  fs.rmSync(directory, { recursive: true, force: true });
}
