// The paged chunk map (store/paged-map.ts) against today's in-memory ChunkMap on the same 1 GiB volume, fully
// written in runs of 64 (as extents.ts): a warm lookup (every page in the cache) of one chunk as the read path
// asks, `runs(v, 1)`, without a promise (`runsCached`) and awaited; and a one-chunk mapRun at random (the leaf
// re-encoded, no page written: pages go to disk at commit). A cold lookup is a pread per page missed: see
// paged-metadata.md's measurements.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Bench } from 'tinybench';
import { ChunkMap, type ChunkRefs } from '../../src/store/chunk-map.ts';
import { realFiles } from '../../src/store/file-layer.ts';
import { PageAllocator } from '../../src/store/page-allocator.ts';
import { PageCache } from '../../src/store/page-cache.ts';
import { PageFile } from '../../src/store/page-file.ts';
import { PagedMaps, type PageRefs } from '../../src/store/paged-map.ts';
import type { MicroModule } from './harness.ts';

const volumeChunks = (1024 * 2 ** 20) / 4096;
const refs: ChunkRefs = { increment() {}, decrement() {}, incrementRun() {}, decrementRun() {} };

/** Page counts in a Map: what the benchmark needs of space-map.ts. */
function memoryPageRefs(): PageRefs {
  const counts = new Map<number, number>();
  return {
    get: (page) => counts.get(page) ?? 0,
    increment: (page) => void counts.set(page, (counts.get(page) ?? 0) + 1),
    decrement: (page) => {
      const count = (counts.get(page) ?? 0) - 1;
      counts.set(page, count);
      return count;
    },
  };
}

export const pagedMap: MicroModule = {
  name: 'paged-map',
  async register(bench: Bench) {
    const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-bench-pagedmap-'));
    const file = await PageFile.open(realFiles, path.join(directory, 'meta'));
    const maps = new PagedMaps({ cache: new PageCache(file, 64 * 2 ** 20), allocator: new PageAllocator(), pageRefs: memoryPageRefs() });
    const paged = maps.empty();
    const memory = new ChunkMap();
    const sums = new Array<number>(64).fill(0x1234);
    for (let v = 0; v < volumeChunks; v += 64) {
      await paged.mapRun(v, (v / 64) * 128, sums, refs);
      memory.mapRun(v, (v / 64) * 128, 64, refs);
    }
    await maps.commit(() => Buffer.from('root'));
    let state = 12345;
    const random = (): number => {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      return state;
    };
    let sink = 0;
    let next = 1 << 30;
    bench
      .add('chunk map: 64 random runs(v, 1) (1 GiB volume)', () => {
        for (let i = 0; i < 64; i++) sink += memory.runs(random() % volumeChunks, 1)[0]!.physicalChunk;
      })
      .add('paged map, warm: 64 random runsCached(v, 1)', () => {
        for (let i = 0; i < 64; i++) sink += paged.runsCached(random() % volumeChunks, 1)![0]!.physicalChunk;
      })
      .add('paged map, warm: 64 random runs(v, 1), awaited', async () => {
        for (let i = 0; i < 64; i++) sink += (await paged.runs(random() % volumeChunks, 1))[0]!.physicalChunk;
      })
      .add('chunk map: mapRun of one chunk at random', () => {
        memory.mapRun(random() % volumeChunks, next++, 1, refs);
      })
      .add('paged map: mapRun of one chunk at random', async () => {
        await paged.mapRun(random() % volumeChunks, next++, [0x1234], refs);
      });
    return async () => {
      file.close();
      fs.rmSync(directory, { recursive: true, force: true });
      if (sink === -1) throw new Error('unreachable: keeps the results alive');
    };
  },
};
