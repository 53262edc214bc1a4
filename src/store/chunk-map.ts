// A volume's map from virtual chunks to physical chunks: two levels, as qcow2's L1/L2 tables. The first level is
// a Map from page index to a page; a page is a Float64Array of `mapPageChunks` slots, each holding the physical
// chunk index + 1 (0 = never written, reads as zeros). Pages exist only where something was written, so a 64 TiB
// volume with 100 MiB written costs a few hundred KiB of memory, and a lookup is one Map.get plus an array index.
// Pure: no I/O. Float64 keeps physical indexes exact up to 2^53 (a pool of any size).
import { assert } from '../core/assert.ts';
import { mapPageChunks } from '../core/limits.ts';

/** A stretch of virtual chunks that is either a hole (`physicalChunk` -1) or physically contiguous. */
export interface ChunkRun {
  virtualChunk: number;
  chunkCount: number;
  physicalChunk: number;
}

interface Page {
  slots: Float64Array;
  usedCount: number;
}

export class ChunkMap {
  readonly #pages = new Map<number, Page>();
  #mappedCount = 0;

  /** Chunks mapped in this volume (its allocated size is this times the chunk size). */
  get mappedCount(): number {
    return this.#mappedCount;
  }

  /** The physical chunk of `virtualChunk`, or -1 for a hole. */
  get(virtualChunk: number): number {
    const page = this.#pages.get(Math.floor(virtualChunk / mapPageChunks));
    if (page === undefined) return -1;
    return page.slots[virtualChunk % mapPageChunks]! - 1;
  }

  /** Maps `chunkCount` chunks from `virtualChunk` to consecutive physical chunks; each must be a hole. */
  mapRun(virtualChunk: number, physicalChunk: number, chunkCount: number): void {
    assert(chunkCount > 0 && physicalChunk >= 0 && virtualChunk >= 0);
    for (let i = 0; i < chunkCount; i++) {
      const v = virtualChunk + i;
      const pageIndex = Math.floor(v / mapPageChunks);
      let page = this.#pages.get(pageIndex);
      if (page === undefined) {
        page = { slots: new Float64Array(mapPageChunks), usedCount: 0 };
        this.#pages.set(pageIndex, page);
      }
      const slot = v % mapPageChunks;
      assert(page.slots[slot] === 0, 'mapRun over a mapped chunk');
      page.slots[slot] = physicalChunk + i + 1;
      page.usedCount += 1;
    }
    this.#mappedCount += chunkCount;
  }

  /** Unmaps every chunk in [virtualChunk, virtualChunk + chunkCount); returns the physical runs it held. */
  unmapRange(virtualChunk: number, chunkCount: number): ChunkRun[] {
    const freed: ChunkRun[] = [];
    const end = virtualChunk + chunkCount;
    let v = virtualChunk;
    while (v < end) {
      const pageIndex = Math.floor(v / mapPageChunks);
      const pageEnd = Math.min(end, (pageIndex + 1) * mapPageChunks);
      const page = this.#pages.get(pageIndex);
      if (page !== undefined) {
        for (; v < pageEnd; v++) {
          const slot = v % mapPageChunks;
          const physical = page.slots[slot]! - 1;
          if (physical < 0) continue;
          page.slots[slot] = 0;
          page.usedCount -= 1;
          this.#mappedCount -= 1;
          const last = freed[freed.length - 1];
          if (last !== undefined && last.virtualChunk + last.chunkCount === v && last.physicalChunk + last.chunkCount === physical) {
            last.chunkCount += 1;
          } else {
            freed.push({ virtualChunk: v, chunkCount: 1, physicalChunk: physical });
          }
        }
        if (page.usedCount === 0) this.#pages.delete(pageIndex);
      }
      v = pageEnd;
    }
    return freed;
  }

  /** Splits [virtualChunk, virtualChunk + chunkCount) into holes and physically contiguous runs, in order. */
  runs(virtualChunk: number, chunkCount: number): ChunkRun[] {
    const result: ChunkRun[] = [];
    const end = virtualChunk + chunkCount;
    const firstPage = Math.floor(virtualChunk / mapPageChunks);
    const pageSpan = Math.ceil(end / mapPageChunks) - firstPage;
    // A range wider than the pages that exist (a huge, sparse volume) walks the existing pages, not the range.
    const pageIndexes = pageSpan > 2 * this.#pages.size + 8 ? this.#sortedPagesIn(firstPage, firstPage + pageSpan) : null;
    let v = virtualChunk;
    let next = 0;
    while (v < end) {
      let pageIndex = Math.floor(v / mapPageChunks);
      if (pageIndexes !== null) {
        while (next < pageIndexes.length && pageIndexes[next]! < pageIndex) next += 1;
        const nextPage = pageIndexes[next];
        if (nextPage === undefined || nextPage * mapPageChunks >= end) {
          pushRun(result, v, end - v, -1);
          break;
        }
        if (nextPage > pageIndex) {
          pushRun(result, v, nextPage * mapPageChunks - v, -1);
          v = nextPage * mapPageChunks;
          pageIndex = nextPage;
        }
      }
      const pageEnd = Math.min(end, (pageIndex + 1) * mapPageChunks);
      const page = this.#pages.get(pageIndex);
      if (page === undefined) {
        pushRun(result, v, pageEnd - v, -1);
        v = pageEnd;
        continue;
      }
      for (; v < pageEnd; v++) pushRun(result, v, 1, page.slots[v % mapPageChunks]! - 1);
    }
    return result;
  }

  #sortedPagesIn(firstPage: number, endPage: number): number[] {
    const indexes: number[] = [];
    for (const pageIndex of this.#pages.keys()) if (pageIndex >= firstPage && pageIndex < endPage) indexes.push(pageIndex);
    return indexes.sort((a, b) => a - b);
  }

  /** Every mapped run of the volume in virtual order (for checkpoints and checks). */
  *mappedRuns(): Generator<ChunkRun> {
    const pageIndexes = [...this.#pages.keys()].sort((a, b) => a - b);
    let pending: ChunkRun | undefined;
    for (const pageIndex of pageIndexes) {
      const page = this.#pages.get(pageIndex)!;
      for (let slot = 0; slot < mapPageChunks; slot++) {
        const physical = page.slots[slot]! - 1;
        if (physical < 0) continue;
        const v = pageIndex * mapPageChunks + slot;
        if (pending !== undefined && pending.virtualChunk + pending.chunkCount === v && pending.physicalChunk + pending.chunkCount === physical) {
          pending.chunkCount += 1;
          continue;
        }
        if (pending !== undefined) yield pending;
        pending = { virtualChunk: v, chunkCount: 1, physicalChunk: physical };
      }
    }
    if (pending !== undefined) yield pending;
  }
}

function pushRun(runs: ChunkRun[], virtualChunk: number, chunkCount: number, physicalChunk: number): void {
  const last = runs[runs.length - 1];
  if (last !== undefined && last.virtualChunk + last.chunkCount === virtualChunk) {
    const bothHoles = last.physicalChunk < 0 && physicalChunk < 0;
    const contiguous = last.physicalChunk >= 0 && physicalChunk >= 0 && last.physicalChunk + last.chunkCount === physicalChunk;
    if (bothHoles || contiguous) {
      last.chunkCount += chunkCount;
      return;
    }
  }
  runs.push({ virtualChunk, chunkCount, physicalChunk });
}
