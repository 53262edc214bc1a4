// Which chunks differ between two maps (two snapshots, or a snapshot and its live volume), from metadata alone:
// no data is read. Pages the two maps share are skipped whole, so the cost is the pages written between them,
// not the size of the volume. Pure.
import { mapPageChunks } from '../core/limits.ts';
import type { ChunkMap } from './chunk-map.ts';

export interface ChangedExtent {
  virtualChunk: number;
  chunkCount: number;
}

/**
 * Extents of virtual chunks (below `chunkLimit`) whose physical chunk differs between `a` and `b`, merged, in order;
 * with `firstOnly`, only the first changed chunk (whether anything changed, at the cost of the first unshared page).
 */
export function diffMaps(a: ChunkMap, b: ChunkMap, chunkLimit: number, firstOnly = false): ChangedExtent[] {
  const pageIndexes = new Set<number>();
  for (const [pageIndex] of a.pages()) pageIndexes.add(pageIndex);
  for (const [pageIndex] of b.pages()) pageIndexes.add(pageIndex);
  const changed: ChangedExtent[] = [];
  for (const pageIndex of [...pageIndexes].sort((x, y) => x - y)) {
    const pageA = a.pageAt(pageIndex);
    const pageB = b.pageAt(pageIndex);
    if (pageA === pageB) continue;
    for (let slot = 0; slot < mapPageChunks; slot++) {
      const virtualChunk = pageIndex * mapPageChunks + slot;
      if (virtualChunk >= chunkLimit) break;
      if ((pageA?.slots[slot] ?? 0) === (pageB?.slots[slot] ?? 0)) continue;
      if (firstOnly) return [{ virtualChunk, chunkCount: 1 }];
      const last = changed[changed.length - 1];
      if (last !== undefined && last.virtualChunk + last.chunkCount === virtualChunk) last.chunkCount += 1;
      else changed.push({ virtualChunk, chunkCount: 1 });
    }
  }
  return changed;
}
