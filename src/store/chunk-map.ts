// A map from a volume's (or snapshot's) virtual chunks to physical chunks: two levels, as qcow2's L1/L2 tables.
// The first level is a Map from page index to a page; a page is a Float64Array of `mapPageChunks` slots, each
// holding the physical chunk index + 1 (0 = never written, reads as zeros). Pages exist only where something was
// written, so a 64 TiB volume with 100 MiB written costs a few hundred KiB, and a lookup is one Map.get plus an
// index. Float64 keeps physical indexes exact up to 2^53.
//
// Snapshots and clones share pages, as qcow2 shares L2 tables: `clone()` copies only the first level and counts
// one more holder on each page (`shareCount`), so it costs O(pages), not O(data). A map that changes a shared page
// first takes a private copy of it. Physical chunks are reference-counted per page (ChunkRefs): a chunk named by
// two pages counts 2, whatever the number of maps holding those pages. So copying a page adds one reference to
// each chunk in it, and dropping the last holder of a page removes one. A chunk is the writer's alone when its
// page is not shared and its count is 1; otherwise a write must go elsewhere (copy-on-write).
// Pure: no I/O.
import { assert } from '../core/assert.ts';
import { mapPageChunks } from '../core/limits.ts';

/** A stretch of virtual chunks that is either a hole (`physicalChunk` -1) or physically contiguous. */
export interface ChunkRun {
  virtualChunk: number;
  chunkCount: number;
  physicalChunk: number;
}

/**
 * Reference counts of physical chunks, kept by the pool; a count that falls to zero frees the chunk. The run
 * calls change the counts of [start, start + chunkCount) as a chunk at a time would, in one call (a 1 MiB write
 * maps 256 chunks: chunk-refcounts.ts and space-map.ts do them a block or a page of counts at a time).
 */
export interface ChunkRefs {
  increment(physicalChunk: number): void;
  decrement(physicalChunk: number): void;
  incrementRun(start: number, chunkCount: number): void;
  decrementRun(start: number, chunkCount: number): void;
  /**
   * Optional: `increment` (`decrement`) of each chunk a page's slots name (slot = chunk + 1, 0 a hole), in one call:
   * a page's copy on write and its last holder's release (chunk-refcounts.ts). Without them, a chunk at a time.
   */
  incrementSlots?(slots: Float64Array): void;
  decrementSlots?(slots: Float64Array): void;
}

export interface Page {
  slots: Float64Array;
  usedCount: number;
  /** Maps that hold this page. */
  shareCount: number;
}

export class ChunkMap {
  readonly #pages: Map<number, Page>;
  #mappedCount: number;

  constructor(pages: Map<number, Page> = new Map(), mappedCount = 0) {
    this.#pages = pages;
    this.#mappedCount = mappedCount;
  }

  /** Chunks mapped (the map's logical allocated size is this times the chunk size). */
  get mappedCount(): number {
    return this.#mappedCount;
  }

  get pageCount(): number {
    return this.#pages.size;
  }

  /** The physical chunk of `virtualChunk`, or -1 for a hole. */
  get(virtualChunk: number): number {
    const page = this.#pages.get(Math.floor(virtualChunk / mapPageChunks));
    if (page === undefined) return -1;
    return page.slots[virtualChunk % mapPageChunks]! - 1;
  }

  /** A map with the same contents that shares every page with this one: O(pages). */
  clone(): ChunkMap {
    for (const page of this.#pages.values()) page.shareCount += 1;
    return new ChunkMap(new Map(this.#pages), this.#mappedCount);
  }

  /** Lets go of every page; chunks no other page names lose their last reference. The map is empty after. */
  drop(refs: ChunkRefs): void {
    for (const page of this.#pages.values()) releasePage(page, refs);
    this.#pages.clear();
    this.#mappedCount = 0;
  }

  /**
   * Points `chunkCount` chunks from `virtualChunk` at consecutive physical chunks, replacing what they named. A
   * page at a time, and on it the counts a run at a time (ChunkRefs' run calls): the chunks it
   * replaces, a physically contiguous stretch at a time (a sequential overwrite replaces one run), then the new run.
   * A 1 MiB write maps 256 chunks, and two count calls per chunk were 2% of the main thread's CPU (BENCHMARKS.md,
   * issue 19). The new chunks are fresh (never named by anything), so no count dips to zero on the way.
   */
  mapRun(virtualChunk: number, physicalChunk: number, chunkCount: number, refs: ChunkRefs): void {
    assert(chunkCount > 0 && physicalChunk >= 0 && virtualChunk >= 0);
    let i = 0;
    while (i < chunkCount) {
      // A page at a time: one lookup (and copy-on-write check) per page, not per chunk.
      const v = virtualChunk + i;
      const page = this.#ownPage(Math.floor(v / mapPageChunks), refs, true)!;
      const slots = page.slots;
      // Slots as small integers, whatever the chunk numbers are (a record's may be doubles).
      const first = v % mapPageChunks | 0;
      const end = Math.min(mapPageChunks, first + chunkCount - i) | 0;
      const base = physicalChunk + i - first + 1;
      let fresh = 0;
      let oldStart = -1;
      let oldCount = 0;
      for (let slot = first; slot < end; slot++) {
        const old = slots[slot]! - 1;
        slots[slot] = base + slot;
        if (old < 0) fresh += 1;
        else if (oldCount > 0 && old === oldStart + oldCount) oldCount += 1;
        else {
          if (oldCount > 0) refs.decrementRun(oldStart, oldCount);
          oldStart = old;
          oldCount = 1;
        }
      }
      if (oldCount > 0) refs.decrementRun(oldStart, oldCount);
      page.usedCount += fresh;
      this.#mappedCount += fresh;
      refs.incrementRun(physicalChunk + i, end - first);
      i += end - first;
    }
  }

  /** Unmaps every chunk in [virtualChunk, virtualChunk + chunkCount); returns how many were mapped. */
  unmapRange(virtualChunk: number, chunkCount: number, refs: ChunkRefs): number {
    let unmapped = 0;
    const end = virtualChunk + chunkCount;
    for (const pageIndex of this.#pageIndexesIn(virtualChunk, end)) {
      const page = this.#ownPage(pageIndex, refs, false)!;
      const from = Math.max(virtualChunk, pageIndex * mapPageChunks);
      const to = Math.min(end, (pageIndex + 1) * mapPageChunks);
      for (let v = from; v < to; v++) {
        const slot = v % mapPageChunks;
        const physical = page.slots[slot]! - 1;
        if (physical < 0) continue;
        page.slots[slot] = 0;
        page.usedCount -= 1;
        unmapped += 1;
        refs.decrement(physical);
      }
      if (page.usedCount === 0) this.#pages.delete(pageIndex);
    }
    this.#mappedCount -= unmapped;
    return unmapped;
  }

  /** Splits [virtualChunk, virtualChunk + chunkCount) into holes and physically contiguous runs, in order. */
  runs(virtualChunk: number, chunkCount: number): ChunkRun[] {
    // A 4 KiB read's lookup, the commonest: one Map lookup, no list of pages.
    if (chunkCount === 1) return [{ virtualChunk, chunkCount, physicalChunk: this.get(virtualChunk) }];
    const result: ChunkRun[] = [];
    const end = virtualChunk + chunkCount;
    let v = virtualChunk;
    for (const pageIndex of this.#pageIndexesIn(virtualChunk, end)) {
      const pageStart = Math.max(virtualChunk, pageIndex * mapPageChunks);
      if (v < pageStart) pushRun(result, v, pageStart - v, -1);
      const page = this.#pages.get(pageIndex)!;
      const pageEnd = Math.min(end, (pageIndex + 1) * mapPageChunks);
      for (v = pageStart; v < pageEnd; v++) pushRun(result, v, 1, page.slots[v % mapPageChunks]! - 1);
    }
    if (v < end) pushRun(result, v, end - v, -1);
    return result;
  }

  /** Every mapped run in virtual order (for checkpoints, checks and reports). */
  *mappedRuns(): Generator<ChunkRun> {
    let pending: ChunkRun | undefined;
    for (const [pageIndex, page] of this.pages()) {
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

  /** The pages in page-index order. */
  pages(): Array<[number, Page]> {
    return [...this.#pages.entries()].sort((a, b) => a[0] - b[0]);
  }

  /** The page holding `virtualChunk` (undefined where nothing is mapped); shared pages are returned as they are. */
  pageAt(pageIndex: number): Page | undefined {
    return this.#pages.get(pageIndex);
  }

  /** Indexes of existing pages that overlap [start, end) chunks, in order; walks the pages, not the range, when sparse. */
  #pageIndexesIn(start: number, end: number): number[] {
    const first = Math.floor(start / mapPageChunks);
    const last = Math.ceil(end / mapPageChunks);
    const indexes: number[] = [];
    if (last - first <= 2 * this.#pages.size + 8) {
      for (let pageIndex = first; pageIndex < last; pageIndex++) if (this.#pages.has(pageIndex)) indexes.push(pageIndex);
      return indexes;
    }
    for (const pageIndex of this.#pages.keys()) if (pageIndex >= first && pageIndex < last) indexes.push(pageIndex);
    return indexes.sort((a, b) => a - b);
  }

  /** The page, made private to this map (copied if shared); created when `create` and missing. */
  #ownPage(pageIndex: number, refs: ChunkRefs, create: boolean): Page | undefined {
    const page = this.#pages.get(pageIndex);
    if (page === undefined) {
      if (!create) return undefined;
      const fresh: Page = { slots: new Float64Array(mapPageChunks), usedCount: 0, shareCount: 1 };
      this.#pages.set(pageIndex, fresh);
      return fresh;
    }
    if (page.shareCount === 1) return page;
    const copy: Page = { slots: page.slots.slice(), usedCount: page.usedCount, shareCount: 1 };
    page.shareCount -= 1;
    if (refs.incrementSlots !== undefined) refs.incrementSlots(copy.slots);
    else for (const slot of copy.slots) if (slot > 0) refs.increment(slot - 1);
    this.#pages.set(pageIndex, copy);
    return copy;
  }
}

/** Drops one holder of a page; the last holder takes its chunks' references with it. */
export function releasePage(page: Page, refs: ChunkRefs): void {
  assert(page.shareCount > 0);
  page.shareCount -= 1;
  if (page.shareCount > 0) return;
  if (refs.decrementSlots !== undefined) refs.decrementSlots(page.slots);
  else for (const slot of page.slots) if (slot > 0) refs.decrement(slot - 1);
}

/** Whether chunks at `virtualChunk` naming `physicalChunk` (-1: a hole) continue the run `last`. */
export function continuesRun(last: ChunkRun | undefined, virtualChunk: number, physicalChunk: number): last is ChunkRun {
  if (last === undefined || last.virtualChunk + last.chunkCount !== virtualChunk) return false;
  const bothHoles = last.physicalChunk < 0 && physicalChunk < 0;
  const contiguous = last.physicalChunk >= 0 && physicalChunk >= 0 && last.physicalChunk + last.chunkCount === physicalChunk;
  return bothHoles || contiguous;
}

function pushRun(runs: ChunkRun[], virtualChunk: number, chunkCount: number, physicalChunk: number): void {
  const last = runs[runs.length - 1];
  if (continuesRun(last, virtualChunk, physicalChunk)) last.chunkCount += chunkCount;
  else runs.push({ virtualChunk, chunkCount, physicalChunk });
}
