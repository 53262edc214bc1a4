// In process, the CPU a 4 KiB write and a 4 KiB read cost over each kind of metadata (issue 15: paged writes and
// reads against the in-memory maps). A fresh pool (--metadata memory or paged, a cache of 64 MiB), one volume of
// 64 GiB, --writes 4 KiB writes at random at QD32 and a flush, a checkpoint (its time and the event loop's longest
// pause meanwhile), then 3 s of 4 KiB reads at random at QD32 (most fall in holes: they measure the lookup). Prints
// the rates and the process's CPU (user + system, all threads) per write and per read: on a shared machine the
// CPU per operation moves less than the rates. Interleave the kinds and repeat. Also prints the metadata the
// writes wrote, per write: the page file's bytes (checkpoints; both copies) and the journal's, and the checkpoints
// the journal's size started (what a shorter journal costs: paged-metadata.md, "The journal's size").
// Usage: node bench/paged-writes.ts memory|paged [--writes 100000] [--journal SIZE] (the journal size that starts a checkpoint;
// default the metadata's) [--profile FILE] (a V8 CPU profile of the writes alone, from the first write to the flush:
// where a write's CPU goes, without the start, the final checkpoint or the reads) [--volume SIZE] (default 64GiB)
// [--prefill] (the whole volume written in 1 MiB writes and checkpointed before the 4 KiB writes: a full map, whose
// random writes dirty a new leaf each and so start a checkpoint every few thousand writes, as a long fio run does) [--dirty-pages N] (the dirty map nodes that start a checkpoint;
// default the metadata's, limits.metadataReplayPagesMax)
import fs from 'node:fs';
import { Session } from 'node:inspector/promises';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/core/units.ts';
import { realFiles, type FileLayer } from '../src/store/file-layer.ts';
import { Pool } from '../src/store/pool.ts';

/** Bytes written through the file layer, by the kind of file (the page file, the journal, the rest). */
const writtenBytes = { pages: 0, journal: 0, other: 0 };
const fileKinds = new Map<number, keyof typeof writtenBytes>();
const kindOf = (file: string): keyof typeof writtenBytes => (/\/metadata\.\d+$|\/checkpoint\.\d+$/.test(file) ? 'pages' : /\/journal-\d+\.\d+$/.test(file) ? 'journal' : 'other');
const countingFiles: FileLayer = {
  ...realFiles,
  open: async (file, mode) => {
    const fd = await realFiles.open(file, mode);
    fileKinds.set(fd, kindOf(file));
    return fd;
  },
  openSync: (file, mode) => {
    const fd = realFiles.openSync(file, mode);
    fileKinds.set(fd, kindOf(file));
    return fd;
  },
  write: (fd, data, positionBytes) => {
    writtenBytes[fileKinds.get(fd) ?? 'other'] += data.length;
    return realFiles.write(fd, data, positionBytes);
  },
  writeSync: (fd, data, positionBytes) => {
    writtenBytes[fileKinds.get(fd) ?? 'other'] += data.length;
    realFiles.writeSync(fd, data, positionBytes);
  },
};

const { values, positionals } = parseArgs({ allowPositionals: true, options: { writes: { type: 'string', default: '100000' }, journal: { type: 'string' }, profile: { type: 'string' }, volume: { type: 'string', default: '64GiB' }, prefill: { type: 'boolean', default: false }, 'dirty-pages': { type: 'string' } } });
const kind = positionals[0];
if (kind !== 'memory' && kind !== 'paged') throw new Error('usage: node bench/paged-writes.ts memory|paged [--writes N] [--journal SIZE]');
const writes = Number(values.writes);
const volumeBytes = parseSize(values.volume);
const blocks = volumeBytes / 4096;
const queueDepth = 32;

const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-paged-writes-'));
try {
  const pool = await Pool.open({ directory: path.join(directory, 'pool'), files: countingFiles, metadata: kind, metadataCacheBytes: 64 * 2 ** 20, ...(values.journal === undefined ? {} : { journalCheckpointBytes: parseSize(values.journal) }), ...(values['dirty-pages'] === undefined ? {} : { metadataDirtyPages: Number(values['dirty-pages']) }) });
  await pool.createVolume('v', volumeBytes);
  const volume = pool.openVolume('v');
  const data = Buffer.alloc(4096, 7);
  if (values.prefill) {
    const fill = Buffer.alloc(2 ** 20, 5);
    let next = 0;
    await Promise.all(Array.from({ length: 8 }, async () => {
      while (next < volumeBytes) {
        const at = next;
        next += fill.length;
        await volume.write(at, fill.subarray(0, Math.min(fill.length, volumeBytes - at)));
      }
    }));
    await volume.flush();
    await pool.checkpoint();
  }
  let issued = 0;
  const writtenBefore = { ...writtenBytes };
  const checkpointsBefore = (await pool.status()).checkpointsTotal;
  const profiler = values.profile === undefined ? undefined : new Session();
  if (profiler !== undefined) {
    profiler.connect();
    await profiler.post('Profiler.enable');
    await profiler.post('Profiler.start');
  }
  const writeCpu = process.cpuUsage();
  const writeStart = performance.now();
  await Promise.all(Array.from({ length: queueDepth }, async () => {
    while (issued < writes) {
      issued += 1;
      await volume.write(Math.floor(Math.random() * blocks) * 4096, data);
    }
  }));
  await volume.flush();
  const writeSeconds = (performance.now() - writeStart) / 1000;
  const writeCpuUs = process.cpuUsage(writeCpu);
  if (profiler !== undefined) {
    const { profile } = await profiler.post('Profiler.stop');
    fs.writeFileSync(values.profile!, JSON.stringify(profile));
    profiler.disconnect();
  }
  const checkpoints = (await pool.status()).checkpointsTotal - checkpointsBefore;
  const perWrite = (part: keyof typeof writtenBytes): string => ((writtenBytes[part] - writtenBefore[part]) / writes).toFixed(0);
  const metadataLine = `${checkpoints} checkpoints during the writes; written per 4 KiB write: page file ${perWrite('pages')} B, journal ${perWrite('journal')} B`;

  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  const checkpointStart = performance.now();
  await pool.checkpoint();
  const checkpointMs = performance.now() - checkpointStart;
  delay.disable();

  let reads = 0;
  const readCpu = process.cpuUsage();
  const readStart = performance.now();
  await Promise.all(Array.from({ length: queueDepth }, async () => {
    const buffer = Buffer.alloc(4096);
    while (performance.now() - readStart < 3000) {
      reads += 1;
      await volume.read(Math.floor(Math.random() * blocks) * 4096, buffer);
    }
  }));
  const readSeconds = (performance.now() - readStart) / 1000;
  const readCpuUs = process.cpuUsage(readCpu);
  const perOp = (usage: NodeJS.CpuUsage, count: number): string => ((usage.user + usage.system) / count).toFixed(1);
  console.log(`${kind}${values.journal === undefined ? '' : `, journal ${values.journal}`}: ${Math.round(writes / writeSeconds)} writes/s (${perOp(writeCpuUs, writes)} us CPU each), checkpoint ${checkpointMs.toFixed(0)} ms (longest pause ${(delay.max / 1e6).toFixed(1)} ms), ${Math.round(reads / readSeconds)} reads/s (${perOp(readCpuUs, reads)} us CPU each)`);
  console.log(`  ${metadataLine}`);
  await volume.close();
  await pool.close();
} finally {
  fs.rmSync(directory, { recursive: true, force: true });
}
