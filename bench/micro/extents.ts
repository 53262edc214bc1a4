// Extent mapping: a volume's chunk map (virtual → physical chunk) looked up per request, split into runs for a
// large request, cloned for a snapshot; and base:allocation descriptors built for BLOCK_STATUS.
import type { Bench } from 'tinybench';
import { blockDescriptors } from '../../src/nbd/extents.ts';
import { ChunkMap, type ChunkRefs } from '../../src/store/chunk-map.ts';
import type { Extent } from '../../src/core/block-device.ts';
import type { MicroModule } from './harness.ts';

const chunkBytes = 4096;
const volumeChunks = (1024 * 2 ** 20) / chunkBytes; // a 1 GiB volume

const refs: ChunkRefs = { increment() {}, decrement() {}, incrementRun() {}, decrementRun() {} };

/** A fully written 1 GiB volume whose physical chunks are contiguous in runs of 64 (as sequential fills leave them). */
function filledMap(): ChunkMap {
  const map = new ChunkMap();
  for (let v = 0; v < volumeChunks; v += 64) map.mapRun(v, (v / 64) * 128, 64, refs);
  return map;
}

export const extents: MicroModule = {
  name: 'extents',
  async register(bench: Bench) {
    const map = filledMap();
    let state = 12345;
    const random = (): number => {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      return state;
    };
    const extentList: Extent[] = Array.from({ length: 64 }, (_, i) => ({ lengthBytes: 65536, hole: i % 3 === 0, zero: i % 3 === 0 }));
    let sink = 0;
    bench
      .add('chunk map: 64 random 4 KiB lookups (1 GiB volume)', () => {
        for (let i = 0; i < 64; i++) sink += map.get(random() % volumeChunks);
      })
      .add('chunk map: runs of a 1 MiB range', () => {
        sink += map.runs((random() % (volumeChunks / 256)) * 256, 256).length;
      })
      .add('chunk map: clone and drop (a snapshot of 1 GiB)', () => {
        const copy = map.clone();
        copy.drop(refs);
      })
      .add('block status: descriptors of 64 extents', () => {
        sink += blockDescriptors(extentList, 64 * 65536, false).length;
      });
    return async () => {
      if (sink === -1) throw new Error('unreachable: keeps the results alive');
    };
  },
};
