// Space maps of the paged metadata (step 3 of the plan in paged-metadata.md; nothing uses them yet): reference
// counts of chunks and of pages kept in pages, the chunk allocator's free space derived from the chunk counts,
// and the page allocator's free list kept in pages, so that a root names all a pool needs to reopen.
//
// RefCountMap: a count per index (a physical chunk, or a page of the map trees) in pages of 2,032 counts of 2
// bytes; a count of 65,535 or more is kept in an overflow list (0xffff in its page: look there), held in memory
// and written as a chain of pages when it changed (such counts need 65,535 references each, so the list is at most
// a 65,535th of the references). Which page holds which counts, and how many of its counts are zero, is a
// PagedTable (page-table.ts): one entry per 8 MiB of 4 KiB chunks, held in memory, the summary a search for free
// space reads instead of the pages. A page of counts changed since the last flush is copied once to a new page
// number (copy-on-write: the durable root may name the old one, which is released) and then changed in place
// until the flush; a page never written is all zeros and takes no page.
//
// The shape is synchronous over pinned pages, not async: `load(indexes)` (async) reads and pins the pages of
// counts those indexes need, after which get, increment and decrement are plain synchronous calls, which throw
// (an assertion: a bug of the caller) on a page neither pinned nor changed since the flush. This is the shape the
// plan gives the read and write paths (pin the pages a request needs, then run as today): a map update touches
// tens to hundreds of counts, and ChunkMap's and the paged map's update logic calls ChunkRefs/PageRefs from deep
// inside synchronous loops; an async count would make each of those an await (a microtask each), and would let
// two updates interleave between the read of a count and its write.
//
// ChunkSpace: a RefCountMap of physical chunks that is also the chunk allocator, with allocator.ts's contract (the
// one the chunk store and the commit engine use): runs by next-fit from a cursor, `release` of a failed write,
// frees deferred until the commit that records them is durable (`freeDeferred`, `deferredMark`, `takeDeferred`,
// `releaseTaken`), the same high-water mark, and the same run found for the same history below its scan limit. A
// chunk is free when its count is zero, unless it is held in memory: allocated and not yet counted (a write under
// way), or freed and waiting for a commit. A search reads only the pages of counts whose summary says they are
// part free and could hold part of the run (a page all free or all used is decided from the summary); the pages it
// reads stay pinned until it ends, the last few until the next search (where the next allocation starts: without
// that, each allocation read its pages from the cache again, 30 us against 5). So `allocate` is async, and
// allocations run one at a time. The high-water mark is lowered lazily (finding the new top may read a page):
// `highWater` may be above the exact mark until the next allocation or `settledHighWater`.
// Measured (2 vCPUs, shared): a count change on a pinned page 120 to 170 ns against ChunkRefcounts' 65 to 150;
// allocate(1) in a pool with 1 chunk in 64 free 4 to 10 us against 0.2 to 3; a search that finds nothing over 256
// pages of counts 70 to 120 us against 15 (once per size until something is freed, as allocator.ts).
//
// SpaceMaps: the two count maps and the page allocator behind them and everything else in pages. `flush()`
// (synchronous) puts every changed page into the cache and returns the bytes the next root records; after the
// cache's commit of that root, `committed()` makes the pages released before the flush reusable. The free-page
// list is written whole at each flush as a chain (pages free, and those released since the last flush, which the
// new root no longer names), in pages taken from that list itself. Pure apart from the page cache's reads.
import os from 'node:os';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { DeferredFrees, type FreeExtent } from './allocator.ts';
import type { ChunkRefs } from './chunk-map.ts';
import type { PageCache } from './page-cache.ts';
import { PageAllocator } from './page-allocator.ts';
import { pageBodyBytesMax } from './page-file.ts';
import { chainPagesFor, PagedTable, pageKinds, readChain, readKind, writeChain, type PageSink, type TableRoot } from './page-table.ts';

/** Counts in one page. */
export const countsPerPage = Math.floor(pageBodyBytesMax / 2);
/** A count this large or larger is in the overflow list. */
const overflowMark = 0xffff;
/** Chunks one allocation scans before it settles for the space above the high-water mark (as allocator.ts). */
const allocationScanChunksMax = 1 << 20;
/** Pages of counts a search reads at once. */
const searchReadAhead = 8;
// Counts are read and written through a Uint16Array over the page body: the format is little-endian.
assert(os.endianness() === 'LE', 'the space maps assume a little-endian machine');

/** What a root records of a RefCountMap. */
export interface RefCountRoot {
  directory: TableRoot;
  overflowFirst: number;
  /** Counts in the overflow list. */
  overflowCount: number;
}

/** Pages loaded and held for a caller until `release`. */
export interface Pin {
  release(): void;
}

interface Resident {
  counts: Uint16Array;
  /** Copied to a new page since the last flush: changed in place until the next. */
  writable: boolean;
}

const zeroCounts = new Uint16Array(countsPerPage);

function countsView(body: Buffer): Uint16Array {
  if (body.length !== countsPerPage * 2) throw ChunkdError.corrupt(`a page of reference counts holds ${body.length} bytes, not ${countsPerPage * 2}`);
  if (body.byteOffset % 2 === 0) return new Uint16Array(body.buffer, body.byteOffset, countsPerPage);
  return new Uint16Array(Uint8Array.from(body).buffer);
}

export class RefCountMap {
  readonly #cache: PageCache;
  readonly #sink: PageSink;
  /** Per page of counts: its page number (0: never written, all zeros) and how many of its counts are zero. */
  readonly #directory: PagedTable;
  readonly #overflow: Map<number, number>;
  #overflowPages: number[];
  #overflowChanged = false;
  readonly #resident = new Map<number, Resident>();
  readonly #pins = new Map<number, number>();
  /** Pages of counts changed since the last flush (`changedPages`). */
  #changedPages = 0;

  private constructor(cache: PageCache, sink: PageSink, directory: PagedTable, overflow: Map<number, number>, overflowPages: number[]) {
    this.#cache = cache;
    this.#sink = sink;
    this.#directory = directory;
    this.#overflow = overflow;
    this.#overflowPages = overflowPages;
  }

  /** An empty map (every count zero). */
  static create(cache: PageCache, sink: PageSink): RefCountMap {
    return new RefCountMap(cache, sink, new PagedTable(countsPerPage), new Map(), []);
  }

  /** The map a root recorded: reads its summary and overflow list, not its pages of counts. */
  static async open(cache: PageCache, sink: PageSink, root: RefCountRoot): Promise<RefCountMap> {
    const directory = await PagedTable.open(cache, root.directory, countsPerPage);
    const chain = await readChain(cache, root.overflowFirst, root.overflowCount * 2);
    const overflow = new Map<number, number>();
    for (let i = 0; i < chain.values.length; i += 2) {
      if (chain.values[i + 1]! < overflowMark) throw ChunkdError.corrupt(`reference counts: an overflow count of ${chain.values[i + 1]} for ${chain.values[i]}`);
      overflow.set(chain.values[i]!, chain.values[i + 1]!);
    }
    return new RefCountMap(cache, sink, directory, overflow, chain.pages);
  }

  /** Pages of counts the summary covers (indexes from `pageCount * countsPerPage` on are all zero). */
  get pageCount(): number {
    return this.#directory.length;
  }

  /** Counts of zero in page `page` of counts (the summary). */
  zeros(page: number): number {
    return this.#directory.small(page);
  }

  /** The counts of page `page` if they are in memory (pinned, changed since the flush, or never written), else undefined. */
  countsOf(page: number): Uint16Array | undefined {
    return this.#resident.get(page)?.counts ?? (this.#directory.value(page) === 0 ? zeroCounts : undefined);
  }

  /** Whether the count of `index` can be read and changed now (its page pinned, changed since the flush, or never written). */
  loaded(index: number): boolean {
    return this.countsOf(Math.floor(index / countsPerPage)) !== undefined;
  }

  get(index: number): number {
    const page = Math.floor(index / countsPerPage);
    const counts = this.countsOf(page);
    assert(counts !== undefined, `reference counts: page ${page} (for ${index}) is not loaded`);
    const raw = counts[index - page * countsPerPage]!;
    return raw === overflowMark ? this.#overflow.get(index)! : raw;
  }

  increment(index: number): void {
    this.add(index, 1);
  }

  /** Returns the count after. */
  decrement(index: number): number {
    return this.add(index, -1);
  }

  /** Adds `delta` to the count of `index`; returns the count after. */
  add(index: number, delta: number): number {
    assert(Number.isSafeInteger(index) && index >= 0, `reference counts: index ${index}`);
    const page = Math.floor(index / countsPerPage);
    const slot = index - page * countsPerPage;
    let resident = this.#resident.get(page);
    if (resident === undefined || !resident.writable) resident = this.#makeWritable(page, resident);
    const raw = resident.counts[slot]!;
    const before = raw === overflowMark ? this.#overflow.get(index)! : raw;
    const after = before + delta;
    assert(after >= 0, `reference count of ${index} falls below zero`);
    if (after >= overflowMark) {
      resident.counts[slot] = overflowMark;
      this.#overflow.set(index, after);
      this.#overflowChanged = true;
    } else {
      resident.counts[slot] = after;
      if (raw === overflowMark) {
        this.#overflow.delete(index);
        this.#overflowChanged = true;
      }
    }
    if ((before === 0) !== (after === 0)) this.#directory.set(page, this.#directory.value(page), this.#directory.small(page) + (after === 0 ? 1 : -1));
    return after;
  }

  /** The zeros page `page` of counts holds (loaded), counted: what its summary (`zeros`) should say. */
  countZeros(page: number): number {
    const counts = this.countsOf(page);
    assert(counts !== undefined, `reference counts: page ${page} is not loaded`);
    let zeros = 0;
    for (const count of counts) if (count === 0) zeros += 1;
    return zeros;
  }

  /** Sets the summary of page `page` of counts (loaded) to the zeros it holds: a repair (paged-check.ts). */
  resummarize(page: number): void {
    const zeros = this.countZeros(page);
    if (zeros !== this.#directory.small(page)) this.#directory.set(page, this.#directory.value(page), zeros);
  }

  /** Reads and pins the pages holding the counts of `indexes`. */
  load(indexes: Iterable<number>): Promise<Pin> {
    const pages = new Set<number>();
    for (const index of indexes) pages.add(Math.floor(index / countsPerPage));
    return this.loadPages(pages);
  }

  /** Reads and pins pages of counts (by page, as `zeros` and `countsOf` number them). */
  async loadPages(pages: Iterable<number>): Promise<Pin> {
    const list = [...new Set(pages)];
    // Pinned first, so that a flush while the reads are under way keeps a page that another caller changed.
    for (const page of list) this.#pins.set(page, (this.#pins.get(page) ?? 0) + 1);
    let released = false;
    const pin = {
      release: () => {
        if (released) return;
        released = true;
        for (const page of list) this.#unpin(page);
      },
    };
    try {
      await Promise.all(list.map((page) => this.#fetch(page)));
    } catch (error) {
      pin.release();
      throw error;
    }
    return pin;
  }

  /** Every page this map's state is in, as of the last flush and the changes since (for a check of the page allocator). */
  ownedPages(): number[] {
    const pages = [...this.#directory.pages(), ...this.#overflowPages];
    for (let page = 0; page < this.#directory.length; page++) if (this.#directory.value(page) !== 0) pages.push(this.#directory.value(page));
    return pages;
  }

  /** Pages of counts changed since the last flush: each one a replay of the same changes reads (a cold cache after a crash). */
  get changedPages(): number {
    return this.#changedPages;
  }

  /** Puts the changed pages into the cache (through the sink) and returns what the next root records. */
  flush(): RefCountRoot {
    this.#changedPages = 0;
    for (const [page, resident] of this.#resident) {
      if (!resident.writable) continue;
      resident.writable = false;
      if (!this.#pins.has(page)) this.#resident.delete(page);
    }
    if (this.#overflowChanged) {
      for (const page of this.#overflowPages) this.#sink.release(page);
      const values = [...this.#overflow].sort(([a], [b]) => a - b).flat();
      this.#overflowPages = Array.from({ length: chainPagesFor(values.length) }, () => this.#sink.allocate());
      writeChain(this.#sink, this.#overflowPages, values);
      this.#overflowChanged = false;
    }
    return { directory: this.#directory.flush(this.#sink), overflowFirst: this.#overflowPages[0] ?? 0, overflowCount: this.#overflow.size };
  }

  async #fetch(page: number): Promise<void> {
    for (;;) {
      if (this.#resident.has(page)) return;
      const pageNumber = this.#directory.value(page);
      if (pageNumber === 0) return;
      const body = await readKind(this.#cache, pageNumber, pageKinds.counts);
      // Changed and flushed while the read was under way: read the newer page.
      if (this.#directory.value(page) !== pageNumber) continue;
      if (!this.#resident.has(page)) this.#resident.set(page, { counts: countsView(body), writable: false });
      return;
    }
  }

  #unpin(page: number): void {
    const pins = this.#pins.get(page)! - 1;
    if (pins > 0) {
      this.#pins.set(page, pins);
      return;
    }
    this.#pins.delete(page);
    if (this.#resident.get(page)?.writable === false) this.#resident.delete(page);
  }

  /** A page's first change since the flush: its counts copied to a new page, the old page released. */
  #makeWritable(page: number, resident: Resident | undefined): Resident {
    const old = this.#directory.value(page);
    assert(resident !== undefined || old === 0, `reference counts: page ${page} is not loaded`);
    const body = Buffer.alloc(countsPerPage * 2);
    const counts = countsView(body);
    if (resident !== undefined) counts.set(resident.counts);
    const pageNumber = this.#sink.allocate();
    if (old !== 0) this.#sink.release(old);
    this.#sink.put(pageNumber, pageKinds.counts, body);
    this.#directory.set(page, pageNumber, this.#directory.small(page));
    const writable = { counts, writable: true };
    this.#resident.set(page, writable);
    this.#changedPages += 1;
    return writable;
  }
}

/** Reference counts of physical chunks that are also the chunk allocator (see the top of this file). */
export class ChunkSpace implements ChunkRefs {
  readonly counts: RefCountMap;
  /** Chunks of count zero that are not free: allocated and not yet counted, or freed and waiting for a commit. */
  readonly #held = new Set<number>();
  /** The first kind. */
  readonly #reserved = new Set<number>();
  /** #held per page of counts. */
  readonly #heldPerPage = new Map<number, number>();
  #highWater: number;
  #highWaterStale = false;
  #cursor = 0;
  #usedCount: number;
  readonly #deferred = new DeferredFrees();
  /** No run of this many free chunks was found below the mark since the last time chunks were freed. */
  #noRunOf = Infinity;
  #allocating: Promise<unknown> = Promise.resolve();
  /** The pages of counts a search read last (at most `searchReadAhead`). */
  #searchPin: Pin | undefined;
  /** Called for each chunk whose count falls to zero; by default its free is deferred (and punched). */
  onFree: (physicalChunk: number) => void = (physicalChunk) => this.freeDeferred(physicalChunk, 1);

  private constructor(counts: RefCountMap, highWater: number, usedCount: number) {
    this.counts = counts;
    this.#highWater = highWater;
    this.#usedCount = usedCount;
  }

  /** The allocator over the counts: chunks of nonzero count in use, the mark above the highest (may read a page). */
  static async open(counts: RefCountMap): Promise<ChunkSpace> {
    let used = 0;
    for (let page = 0; page < counts.pageCount; page++) used += countsPerPage - counts.zeros(page);
    const space = new ChunkSpace(counts, 0, used);
    space.#highWater = await space.#top(counts.pageCount * countsPerPage);
    return space;
  }

  /** One above the highest chunk in use or held; may be above that until the next allocation settles it. */
  get highWater(): number {
    return this.#highWater;
  }

  get usedCount(): number {
    return this.#usedCount;
  }

  get deferredCount(): number {
    return this.#deferred.count;
  }

  /** The exact high-water mark (after the allocations under way). */
  settledHighWater(): Promise<number> {
    return this.#serially(async () => {
      await this.#settle();
      return this.#highWater;
    });
  }

  get(physicalChunk: number): number {
    return this.counts.get(physicalChunk);
  }

  increment(physicalChunk: number): void {
    if (this.counts.add(physicalChunk, 1) !== 1) return;
    if (this.#reserved.delete(physicalChunk)) {
      this.#unhold(physicalChunk);
      return;
    }
    assert(!this.#held.has(physicalChunk), `chunk ${physicalChunk} referenced again while its free waits for a commit`);
    // A chunk counted without an allocation (a journal replayed at open).
    this.#usedCount += 1;
    if (physicalChunk >= this.#highWater) this.#highWater = physicalChunk + 1;
  }

  decrement(physicalChunk: number): number {
    const after = this.counts.add(physicalChunk, -1);
    if (after === 0) this.onFree(physicalChunk);
    return after;
  }

  /** Returns the first of `chunkCount` consecutive free chunks, now the caller's (held until counted or released). */
  allocate(chunkCount: number): Promise<number> {
    assert(Number.isInteger(chunkCount) && chunkCount > 0);
    return this.#serially(() => this.#allocate(chunkCount));
  }

  /** Gives back allocated chunks never counted (a failed write): reusable at once. */
  release(start: number, chunkCount: number): void {
    for (let chunk = start; chunk < start + chunkCount; chunk++) {
      assert(this.#reserved.delete(chunk), `chunk ${chunk} released but not allocated`);
      this.#unhold(chunk);
    }
    this.#usedCount -= chunkCount;
    this.#freed(start + chunkCount);
  }

  /** Chunks whose count fell to zero that committed metadata may still name: reusable only after the commit. */
  freeDeferred(start: number, chunkCount: number, punch = true): void {
    assert(chunkCount > 0);
    for (let chunk = start; chunk < start + chunkCount; chunk++) {
      assert(this.counts.get(chunk) === 0 && !this.#held.has(chunk), `chunk ${chunk} freed while in use or already freed`);
      this.#hold(chunk);
    }
    this.#usedCount -= chunkCount;
    this.#deferred.add(start, chunkCount, punch);
  }

  // deferredMark before a commit, takeDeferred after it, then releaseTaken: as allocator.ts.
  deferredMark = (): number => this.#deferred.mark();
  takeDeferred = (mark: number): FreeExtent[] => this.#deferred.take(mark);

  releaseTaken(extents: readonly FreeExtent[]): void {
    for (const extent of extents) {
      for (let chunk = extent.start; chunk < extent.start + extent.count; chunk++) {
        assert(this.#held.has(chunk) && !this.#reserved.has(chunk), `chunk ${chunk} released twice`);
        this.#unhold(chunk);
      }
      this.#freed(extent.start + extent.count);
    }
  }

  /** Pages of counts below the high-water mark (for `holdFree`). */
  get pagesInUse(): number {
    return Math.ceil(this.#highWater / countsPerPage);
  }

  /**
   * The free chunks of page `page` of counts below the high-water mark, held (no allocation returns them) until
   * `releaseTaken` of the same extents: for punching out leaked space beside the node's work (chunk-store.ts's
   * `punchFreeInBackground`). Runs after the allocations under way; reads that page at most.
   */
  holdFree(page: number): Promise<FreeExtent[]> {
    return this.#serially(async () => {
      await this.#settle();
      const first = page * countsPerPage;
      // Above the mark a chunk may be taken without a search (`#allocate`): never held here.
      const end = Math.min(first + countsPerPage, this.#highWater);
      if (first >= end || this.#available(page) === 0) return [];
      const extents: FreeExtent[] = [];
      const add = (chunk: number): void => {
        this.#hold(chunk);
        const last = extents[extents.length - 1];
        if (last !== undefined && last.start + last.count === chunk) last.count += 1;
        else extents.push({ start: chunk, count: 1, punch: true });
      };
      if (this.#available(page) === countsPerPage) {
        for (let chunk = first; chunk < end; chunk++) add(chunk);
        return extents;
      }
      const pin = await this.counts.loadPages([page]);
      try {
        const counts = this.counts.countsOf(page)!;
        for (let chunk = first; chunk < end; chunk++) if (counts[chunk - first] === 0 && !this.#held.has(chunk)) add(chunk);
      } finally {
        pin.release();
      }
      return extents;
    });
  }

  /** Free runs below the high-water mark (for punching leaked space): reads every part-free page of counts. */
  async freeExtents(): Promise<FreeExtent[]> {
    const highWater = await this.settledHighWater();
    const extents: FreeExtent[] = [];
    const add = (start: number, end: number): void => {
      const last = extents[extents.length - 1];
      if (last !== undefined && last.start + last.count === start) last.count += end - start;
      else extents.push({ start, count: end - start, punch: true });
    };
    for (let page = 0; page * countsPerPage < highWater; page++) {
      const first = page * countsPerPage;
      const end = Math.min(first + countsPerPage, highWater);
      const available = this.#available(page);
      if (available === 0) continue;
      if (available === countsPerPage) {
        add(first, end);
        continue;
      }
      const pin = await this.counts.loadPages([page]);
      try {
        const counts = this.counts.countsOf(page)!;
        for (let chunk = first; chunk < end; chunk++) if (counts[chunk - first] === 0 && !this.#held.has(chunk)) add(chunk, chunk + 1);
      } finally {
        pin.release();
      }
    }
    return extents;
  }

  async #allocate(chunkCount: number): Promise<number> {
    await this.#settle();
    let start = -1;
    const setCount = this.#usedCount + this.#held.size - this.#reserved.size;
    if (this.#highWater - setCount >= chunkCount && chunkCount < this.#noRunOf) {
      start = await this.#findRun(this.#cursor, this.#highWater, chunkCount);
      if (start < 0) start = await this.#findRun(0, Math.min(this.#highWater, this.#cursor + chunkCount - 1), chunkCount);
      if (start < 0) this.#noRunOf = chunkCount;
    }
    if (start < 0) start = this.#highWater;
    for (let chunk = start; chunk < start + chunkCount; chunk++) {
      this.#reserved.add(chunk);
      this.#hold(chunk);
    }
    this.#usedCount += chunkCount;
    this.#highWater = Math.max(this.#highWater, start + chunkCount);
    this.#cursor = start + chunkCount;
    return start;
  }

  /** The first run of `count` free chunks starting in [from, to) and ending by `to`, or -1; scans a bounded distance. */
  async #findRun(from: number, to: number, count: number): Promise<number> {
    const pins: Pin[] = [];
    try {
      const state = { position: from, runStart: -1 };
      for (;;) {
        const found = this.#scan(to, Math.min(to, from + allocationScanChunksMax), count, state);
        if (typeof found === 'number') {
          if (found < 0 || this.#runFree(found, count)) return found;
          // Something changed under the search while it read pages: search again.
          state.position = from;
          state.runStart = -1;
          continue;
        }
        pins.push(await this.counts.loadPages(found));
      }
    } finally {
      // The pages read last stay pinned until the next search ends: the next allocation starts where this one ended.
      const last = pins.pop();
      for (const pin of pins) pin.release();
      if (last !== undefined) {
        this.#searchPin?.release();
        this.#searchPin = last;
      }
    }
  }

  /**
   * Goes on with a search from `state` over what is in memory: the start of the run found, -1, or the pages of counts
   * it needs read to go on (`state` then says where it stopped).
   */
  #scan(to: number, limit: number, count: number, state: { position: number; runStart: number }): number | number[] {
    let { position, runStart } = state;
    while (position < to) {
      if (runStart < 0 && position >= limit) return -1;
      const page = Math.floor(position / countsPerPage);
      const first = page * countsPerPage;
      const pageEnd = Math.min(first + countsPerPage, to);
      const available = this.#available(page);
      if (available === 0) {
        runStart = -1;
        position = pageEnd;
        continue;
      }
      if (available === countsPerPage) {
        if (runStart < 0) runStart = position;
        if (pageEnd - runStart >= count) return runStart;
        position = pageEnd;
        continue;
      }
      // Part free. Nothing carried in and nothing free in the next page: a run here lies within this page.
      if (runStart < 0 && available < count && (pageEnd >= to || this.#available(page + 1) === 0)) {
        position = pageEnd;
        continue;
      }
      const counts = this.counts.countsOf(page);
      if (counts === undefined) {
        state.position = position;
        state.runStart = runStart;
        const need = [page];
        for (let next = page + 1; need.length < searchReadAhead && next * countsPerPage < to; next++) {
          const free = this.#available(next);
          if (free > 0 && free < countsPerPage && this.counts.countsOf(next) === undefined) need.push(next);
        }
        return need;
      }
      for (let chunk = position; chunk < pageEnd; chunk++) {
        if (counts[chunk - first] === 0 && !this.#held.has(chunk)) {
          if (runStart < 0) {
            if (chunk >= limit) return -1;
            runStart = chunk;
          }
          if (chunk + 1 - runStart >= count) return runStart;
        } else runStart = -1;
      }
      position = pageEnd;
    }
    return -1;
  }

  /** Whether every chunk of the run is free now (its part-free pages are pinned by the search). */
  #runFree(start: number, count: number): boolean {
    for (let chunk = start; chunk < start + count; chunk++) {
      const page = Math.floor(chunk / countsPerPage);
      if (this.#available(page) === countsPerPage) continue;
      const counts = this.counts.countsOf(page);
      if (counts === undefined || counts[chunk - page * countsPerPage] !== 0 || this.#held.has(chunk)) return false;
    }
    return true;
  }

  /** Free chunks of a page of counts: its zeros less those held. */
  #available(page: number): number {
    return this.counts.zeros(page) - (this.#heldPerPage.get(page) ?? 0);
  }

  #hold(chunk: number): void {
    this.#held.add(chunk);
    const page = Math.floor(chunk / countsPerPage);
    this.#heldPerPage.set(page, (this.#heldPerPage.get(page) ?? 0) + 1);
  }

  #unhold(chunk: number): void {
    assert(this.#held.delete(chunk));
    const page = Math.floor(chunk / countsPerPage);
    const held = this.#heldPerPage.get(page)! - 1;
    if (held === 0) this.#heldPerPage.delete(page);
    else this.#heldPerPage.set(page, held);
  }

  /** Chunks up to `end` became free: a run may exist that a search missed, and the mark may come down. */
  #freed(end: number): void {
    this.#noRunOf = Infinity;
    if (end >= this.#highWater) this.#highWaterStale = true;
  }

  async #settle(): Promise<void> {
    if (!this.#highWaterStale) return;
    const top = await this.#top(this.#highWater);
    this.#highWaterStale = false;
    if (top < this.#highWater) {
      this.#highWater = top;
      this.#cursor = Math.min(this.#cursor, top);
    }
  }

  /** One above the highest chunk below `below` in use or held (0 if none); reads at most the page holding it. */
  async #top(below: number): Promise<number> {
    let top = below;
    while (top > 0) {
      const page = Math.floor((top - 1) / countsPerPage);
      const first = page * countsPerPage;
      if (this.counts.zeros(page) === countsPerPage && !this.#heldPerPage.has(page)) {
        top = first;
        continue;
      }
      const pin = await this.counts.loadPages([page]);
      try {
        const counts = this.counts.countsOf(page)!;
        for (let chunk = top - 1; chunk >= first; chunk--) if (counts[chunk - first] !== 0 || this.#held.has(chunk)) return chunk + 1;
      } finally {
        pin.release();
      }
      top = first;
    }
    return 0;
  }

  #serially<T>(run: () => Promise<T>): Promise<T> {
    const result = this.#allocating.then(run);
    this.#allocating = result.catch(() => {});
    return result;
  }
}

/** What a root records of the space maps. */
export interface SpaceRoot {
  chunkCounts: RefCountRoot;
  pageCounts: RefCountRoot;
  /** The page allocator: its high-water mark and its free list. */
  nextPage: number;
  freeFirst: number;
  freeCount: number;
}

const rootFields = 13;
export const spaceRootBytes = 1 + rootFields * 6;
const spaceRootVersion = 1;

export function encodeSpaceRoot(root: SpaceRoot): Buffer {
  const fields = [root.chunkCounts, root.pageCounts].flatMap((counts) => [counts.directory.length, counts.directory.depth, counts.directory.top, counts.overflowFirst, counts.overflowCount]);
  fields.push(root.nextPage, root.freeFirst, root.freeCount);
  const out = Buffer.alloc(spaceRootBytes);
  out.writeUInt8(spaceRootVersion, 0);
  for (const [i, field] of fields.entries()) out.writeUIntLE(field, 1 + i * 6, 6);
  return out;
}

export function decodeSpaceRoot(bytes: Buffer): SpaceRoot {
  if (bytes.length < spaceRootBytes || bytes.readUInt8(0) !== spaceRootVersion) throw ChunkdError.corrupt(`space maps root: ${bytes.length} bytes, version ${bytes[0]}`);
  const field = (i: number): number => bytes.readUIntLE(1 + i * 6, 6);
  const counts = (at: number): RefCountRoot => ({ directory: { length: field(at), depth: field(at + 1), top: field(at + 2) }, overflowFirst: field(at + 3), overflowCount: field(at + 4) });
  return { chunkCounts: counts(0), pageCounts: counts(5), nextPage: field(10), freeFirst: field(11), freeCount: field(12) };
}

/** The chunk space, the page reference counts and the page allocator, kept in pages through one cache. */
export class SpaceMaps implements PageSink {
  readonly pages: PageAllocator;
  readonly #cache: PageCache;
  #freeListPages: number[];
  #chunks: ChunkSpace | undefined;
  #pageRefs: RefCountMap | undefined;

  private constructor(cache: PageCache, pages: PageAllocator, freeListPages: number[]) {
    this.#cache = cache;
    this.pages = pages;
    this.#freeListPages = freeListPages;
  }

  /** The space maps a root recorded (`encodeSpaceRoot`'s bytes), or empty ones for null. */
  static async open(cache: PageCache, root: Buffer | null): Promise<SpaceMaps> {
    if (root === null) {
      const maps = new SpaceMaps(cache, new PageAllocator(), []);
      maps.#chunks = await ChunkSpace.open(RefCountMap.create(cache, maps));
      maps.#pageRefs = RefCountMap.create(cache, maps);
      return maps;
    }
    const decoded = decodeSpaceRoot(root);
    const free = await readChain(cache, decoded.freeFirst, decoded.freeCount);
    const maps = new SpaceMaps(cache, new PageAllocator({ nextPage: decoded.nextPage, free: free.values }), free.pages);
    maps.#chunks = await ChunkSpace.open(await RefCountMap.open(cache, maps, decoded.chunkCounts));
    maps.#pageRefs = await RefCountMap.open(cache, maps, decoded.pageCounts);
    return maps;
  }

  /** Reference counts of physical chunks, and the chunk allocator. */
  get chunks(): ChunkSpace {
    return this.#chunks!;
  }

  /** Reference counts of the map trees' pages (PageRefs). */
  get pageRefs(): RefCountMap {
    return this.#pageRefs!;
  }

  allocate(): number {
    return this.pages.allocate();
  }

  release(pageNumber: number): void {
    this.pages.release(pageNumber);
  }

  put(pageNumber: number, kind: number, body: Buffer): void {
    this.#cache.put(pageNumber, { kind, body });
  }

  /**
   * Puts every page changed since the last flush into the cache, last the free-page list, and returns the bytes the
   * next root records. Call it after everything else that allocates or releases pages for that root has done so.
   */
  flush(): Buffer {
    const chunkCounts = this.chunks.counts.flush();
    const pageCounts = this.pageRefs.flush();
    for (const page of this.#freeListPages) this.pages.release(page);
    // Taking the list's pages out of the free pages only shortens it: as many as the list would fill before is enough.
    const listPages = Array.from({ length: chainPagesFor(this.pages.freeCount + this.pages.waitingCount) }, () => this.pages.allocate());
    const state = this.pages.sealForCommit();
    writeChain(this, listPages, state.free);
    this.#freeListPages = listPages;
    return encodeSpaceRoot({ chunkCounts, pageCounts, nextPage: state.nextPage, freeFirst: listPages[0] ?? 0, freeCount: state.free.length });
  }

  /** Every page the space maps' state is in, as of the last flush (a check: with free pages, each page once). */
  ownedPages(): number[] {
    return [...this.chunks.counts.ownedPages(), ...this.pageRefs.ownedPages(), ...this.#freeListPages];
  }

  /** The root of the last flush is durable: the pages released before it may be written again. */
  committed(): void {
    this.pages.committed();
  }
}
