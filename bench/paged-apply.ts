// The metadata side of a write alone, no data written: a chunk run allocated, its map record applied, and every
// `--commit-every` writes the frees of the writes before released (the commit engine's deferredMark, takeDeferred,
// releaseTaken), over the paged catalog (paged-catalog.ts: the live write's applyNow, else apply) or the in-memory
// catalog (metadata.ts's applyRecord over ChunkRefcounts and the ChunkAllocator, as catalog-backend.ts wires them).
// Laps of writes of --size in sequence over a volume of --volume, the first lap not measured (fresh chunks); prints
// the main thread's CPU per write and per GB (`process.cpuUsage`, user + system). What the store adds around it (the
// checksums, the pwrites, the journal) is bench/paged-large-writes.ts's. No checkpoint is taken (the paged catalog's
// dirty nodes stay in memory: for 1 GiB of volume a few thousand nodes).
// Usage: node bench/paged-apply.ts memory|paged [--size 1MiB] [--volume 1GiB] [--laps 4] [--commit-every 64]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { chunkSizeBytes } from '../src/core/limits.ts';
import { parseSize } from '../src/core/units.ts';
import { ChunkAllocator } from '../src/store/allocator.ts';
import { ChunkRefcounts } from '../src/store/chunk-refcounts.ts';
import { realFiles } from '../src/store/file-layer.ts';
import { applyRecord, emptyCatalog, type MetaRecord } from '../src/store/metadata.ts';
import { PagedCatalog } from '../src/store/paged-catalog.ts';

const { values, positionals } = parseArgs({ allowPositionals: true, options: { size: { type: 'string', default: '1MiB' }, volume: { type: 'string', default: '1GiB' }, laps: { type: 'string', default: '4' }, 'commit-every': { type: 'string', default: '64' } } });
const kind = positionals[0];
if (kind !== 'memory' && kind !== 'paged') throw new Error('usage: node bench/paged-apply.ts memory|paged [--size 1MiB] [--volume 1GiB] [--laps 4] [--commit-every 64]');
const chunkCount = parseSize(values.size) / chunkSizeBytes;
const volumeChunks = parseSize(values.volume) / chunkSizeBytes;
const laps = Number(values.laps);
const commitEvery = Number(values['commit-every']);

/** What a write's metadata needs of either kind: an allocation, its record applied, a commit's release of frees. */
interface Side {
  allocate(count: number): number | Promise<number>;
  apply(record: Extract<MetaRecord, { type: 'map' }>): void | Promise<void>;
  commit(): void;
}

const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-paged-apply-'));
let side: Side;
let close = async (): Promise<void> => {};
if (kind === 'paged') {
  const catalog = await PagedCatalog.open(realFiles, directory, { cacheBytes: 256 * 2 ** 20 });
  await catalog.apply({ type: 'create', volumeId: 1, name: 'v', sizeBytes: volumeChunks * chunkSizeBytes });
  const chunks = catalog.chunks;
  side = {
    allocate: (count) => chunks.allocate(count),
    apply: (record) => (catalog.applyNow(record, false) ? undefined : catalog.apply(record, false)),
    commit: () => chunks.releaseTaken(chunks.takeDeferred(chunks.deferredMark())),
  };
  close = () => catalog.close();
} else {
  const catalog = emptyCatalog();
  const allocator = new ChunkAllocator();
  const refs = new ChunkRefcounts((physicalChunk, chunkCount) => allocator.freeDeferred(physicalChunk, chunkCount, false));
  applyRecord(catalog, { type: 'create', volumeId: 1, name: 'v', sizeBytes: volumeChunks * chunkSizeBytes }, refs);
  side = {
    allocate: (count) => allocator.allocate(count),
    apply: (record) => applyRecord(catalog, record, refs),
    commit: () => allocator.releaseTaken(allocator.takeDeferred(allocator.deferredMark())),
  };
}

const sums = new Uint32Array(chunkCount).fill(0x1234);
let writes = 0;
const lap = async (): Promise<void> => {
  for (let virtualChunk = 0; virtualChunk + chunkCount <= volumeChunks; virtualChunk += chunkCount) {
    const allocated = side.allocate(chunkCount);
    const physicalChunk = typeof allocated === 'number' ? allocated : await allocated;
    const applied = side.apply({ type: 'map', volumeId: 1, virtualChunk, physicalChunk, chunkCount, sums });
    if (applied !== undefined) await applied;
    if (++writes % commitEvery === 0) side.commit();
  }
};
try {
  await lap();
  writes = 0;
  const cpu = process.cpuUsage();
  for (let i = 0; i < laps; i++) await lap();
  const usage = process.cpuUsage(cpu);
  const us = usage.user + usage.system;
  const gb = (writes * chunkCount * chunkSizeBytes) / 1e9;
  console.log(`${kind}, ${values.size} writes over ${values.volume}: ${(us / writes).toFixed(1)} us CPU a write, ${(us / 1e6 / gb).toFixed(3)} s/GB (${writes} writes)`);
  await close();
} finally {
  fs.rmSync(directory, { recursive: true, force: true });
}
