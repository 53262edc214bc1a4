// Space maps of the paged metadata (step 3 of the plan in paged-metadata.md; nothing uses them yet): reference
// counts of chunks and of pages kept in pages, the chunk allocator's free space derived from the chunk counts,
// and the page allocator's free pages kept in pages, so that a root names all a pool needs to reopen.
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
// part free and could hold part of the run (a page all free or all used is decided from the summary; a page with
// fewer free chunks than the run only if it and the next page hold enough, and then only its last ones), and
// within a page moves a run's length at a time through chunks in use (`#scan`); the pages it
// reads stay pinned until it ends, the last few until the next search (where the next allocation starts: without
// that, each allocation read its pages from the cache again, 30 us against 5). So `allocate` is async, and
// allocations run one at a time. The high-water mark is lowered lazily (finding the new top may read a page):
// `highWater` may be above the exact mark until the next allocation or `settledHighWater`.
// Held chunks are bits per page of counts (`ChunkBits`), and a run's counts change a page at a time
// (`incrementRun`, `decrementRun`, `RefCountMap.addRun`): a 1 MiB write's 256 chunks cost a hash-set entry
// each before, most of the metadata's CPU of a large write (BENCHMARKS.md, issue 15, "1 MiB writes over paged metadata").
// Measured (2 vCPUs, shared): a count change on a pinned page 120 to 170 ns against ChunkRefcounts' 65 to 150;
// allocate(1) in a pool with 1 chunk in 64 free 4 to 10 us against 0.2 to 3; a search that finds nothing over 256
// pages of counts 70 to 120 us against 15 (once per size until something is freed, as allocator.ts).
//
// SpaceMaps: the two count maps and the page allocator behind them and everything else in pages. `flush()`
// (synchronous) puts every changed page into the cache and returns the bytes the next root records; after the
// cache's commit of that root, `committed()` makes the pages released before the flush reusable. The free pages
// are the page allocator's bitmap in pages (page-allocator.ts), written last: a flush writes its leaves changed
// since the last one. A root of version 1 named a free-page list written whole as a chain: read once at open and
// turned into the bitmap, written at the next flush (the chain's pages released by it). Pure apart from the page
// cache's reads.
import os from 'node:os';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { DeferredFrees, type FreeExtent } from './allocator.ts';
import type { ChunkRefs } from './chunk-map.ts';
import type { PageCache } from './page-cache.ts';
import { PageAllocator, pagesPerLeaf } from './page-allocator.ts';
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
    if (counts === undefined) assert(false, `reference counts: page ${page} (for ${index}) is not loaded`);
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
    if (!(Number.isSafeInteger(index) && index >= 0)) assert(false, `reference counts: index ${index}`);
    const page = Math.floor(index / countsPerPage);
    const slot = index - page * countsPerPage;
    let resident = this.#resident.get(page);
    if (resident === undefined || !resident.writable) resident = this.#makeWritable(page, resident);
    const raw = resident.counts[slot]!;
    const before = raw === overflowMark ? this.#overflow.get(index)! : raw;
    const after = before + delta;
    if (after < 0) assert(false, `reference count of ${index} falls below zero`);
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

  /**
   * `add(index, delta)` of each index of [start, start + count), at once (a 1 MiB write's 256 chunks): each page of
   * counts made writable and its summary set once, not once an index. Pushes to `edges`, in order, each index whose
   * count went from zero or to zero. The same counts, summary and overflow list as `add` of each in turn.
   */
  addRun(start: number, count: number, delta: 1 | -1, edges: number[]): void {
    if (!(Number.isSafeInteger(start) && start >= 0 && Number.isSafeInteger(count) && count >= 0)) assert(false, `reference counts: a run of ${count} at ${start}`);
    const end = start + count;
    let index = start;
    while (index < end) {
      const page = Math.floor(index / countsPerPage);
      const first = page * countsPerPage;
      const stop = Math.min(end, first + countsPerPage);
      let resident = this.#resident.get(page);
      if (resident === undefined || !resident.writable) resident = this.#makeWritable(page, resident);
      const counts = resident.counts;
      let zerosDelta = 0;
      for (; index < stop; index++) {
        const raw = counts[index - first]!;
        const after = raw + delta;
        if (raw === overflowMark || after >= overflowMark || after < 0) {
          // The overflow list or a count below zero (the assertion): `add`'s way, the summary brought up to date first.
          if (zerosDelta !== 0) this.#directory.set(page, this.#directory.value(page), this.#directory.small(page) + zerosDelta);
          zerosDelta = 0;
          const before = this.get(index);
          const changed = this.add(index, delta);
          if (before === 0 || changed === 0) edges.push(index);
          continue;
        }
        counts[index - first] = after;
        if (raw === 0) {
          zerosDelta -= 1;
          edges.push(index);
        } else if (after === 0) {
          zerosDelta += 1;
          edges.push(index);
        }
      }
      if (zerosDelta !== 0) this.#directory.set(page, this.#directory.value(page), this.#directory.small(page) + zerosDelta);
    }
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

/** Words of a page's bits in `ChunkBits`. */
const bitWordsPerPage = Math.ceil(countsPerPage / 32);
const noBits = new Uint32Array(bitWordsPerPage);
/** Pages' bits a `ChunkBits` keeps for reuse once clear (8 KiB at most). */
const spareBitPages = 32;

/**
 * A set of chunks as a bitmap per page of counts that holds any (256 bytes a page; a page goes once empty): what
 * `ChunkSpace` holds, set and cleared a run at a time (a large write's 256 chunks: a bit each, not a hash-set
 * insertion each, which was the most costly part of a 1 MiB write's metadata; BENCHMARKS.md, issue 15, "1 MiB
 * writes over paged metadata"). A page with a chunk held also has its page of counts changed since the last flush
 * (4 KiB in memory: a free or an allocation counts it), so the bitmaps add at most a sixteenth to that.
 */
class ChunkBits {
  readonly #pages = new Map<number, { bits: Uint32Array; count: number }>();
  /** Pages' bits no longer used, all clear. */
  readonly #spare: Array<{ bits: Uint32Array; count: number }> = [];
  #size = 0;

  get size(): number {
    return this.#size;
  }

  has(chunk: number): boolean {
    const page = Math.floor(chunk / countsPerPage);
    const entry = this.#pages.get(page);
    if (entry === undefined) return false;
    const slot = chunk - page * countsPerPage;
    return (entry.bits[slot >>> 5]! & (1 << (slot & 31))) !== 0;
  }

  /** Adds each chunk of [start, start + count); false if any was in already (the others are added). */
  addRun(start: number, count: number): boolean {
    return this.#changeRun(start, count, true);
  }

  /** Removes each chunk of [start, start + count); false if any was not in (the others are removed). */
  deleteRun(start: number, count: number): boolean {
    return this.#changeRun(start, count, false);
  }

  /** The bits of page `page` of counts (bit `slot & 31` of word `slot >>> 5` for the chunk at `slot` in it): read only, valid until the next change. */
  wordsOf(page: number): Uint32Array {
    return this.#pages.get(page)?.bits ?? noBits;
  }

  delete(chunk: number): boolean {
    return this.deleteRun(chunk, 1);
  }

  /** Sets (`add`) or clears each chunk's bit; false if any was so already. A page's bits go once none is set. */
  #changeRun(start: number, count: number, add: boolean): boolean {
    let changedAll = true;
    for (let chunk = start, end = start + count; chunk < end; ) {
      const page = Math.floor(chunk / countsPerPage);
      const first = page * countsPerPage;
      const stop = Math.min(end, first + countsPerPage);
      let entry = this.#pages.get(page);
      if (entry === undefined) {
        if (!add) {
          changedAll = false;
          chunk = stop;
          continue;
        }
        entry = this.#spare.pop() ?? { bits: new Uint32Array(bitWordsPerPage), count: 0 };
        this.#pages.set(page, entry);
      }
      const bits = entry.bits;
      const step = add ? 1 : -1;
      for (; chunk < stop; chunk++) {
        const slot = chunk - first;
        const mask = 1 << (slot & 31);
        const word = bits[slot >>> 5]!;
        if (((word & mask) !== 0) === add) {
          changedAll = false;
          continue;
        }
        bits[slot >>> 5] = word ^ mask;
        entry.count += step;
        this.#size += step;
      }
      if (entry.count === 0) {
        this.#pages.delete(page);
        // All its bits are clear: kept for the next page to take (a 4 KiB write's chunk takes a page's bits, and gives them back once counted).
        if (this.#spare.length < spareBitPages) this.#spare.push(entry);
      }
    }
    return changedAll;
  }
}

/** Reference counts of physical chunks that are also the chunk allocator (see the top of this file). */
export class ChunkSpace implements ChunkRefs {
  readonly counts: RefCountMap;
  /**
   * Chunks of count zero that are not free (held) are of two kinds, in two sets that share no chunk (one lookup
   * each where a chunk changes kind, not two): allocated and not yet counted (reserved), or freed and waiting for a
   * commit, or for a punch (`holdFree`).
   */
  readonly #reserved = new ChunkBits();
  readonly #freeing = new ChunkBits();
  /** Chunks held (of both kinds) per page of counts, changed once a run's page (`#heldChange`). */
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
  #searchedChunks = 0;
  /** Called for each run of chunks whose counts fall to zero (in order); by default their free is deferred (and punched). */
  onFree: (start: number, chunkCount: number) => void = (start, chunkCount) => this.freeDeferred(start, chunkCount);
  /** The chunks whose counts went from or to zero in a run's change (`incrementRun`, `decrementRun`): reused. */
  readonly #edges: number[] = [];

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

  get deferredRunCount(): number {
    return this.#deferred.runCount;
  }

  /** Chunks whose counts searches for free space walked one by one, since open. */
  get searchedChunks(): number {
    return this.#searchedChunks;
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
      this.#heldChange(Math.floor(physicalChunk / countsPerPage), -1);
      return;
    }
    if (this.#freeing.has(physicalChunk)) assert(false, `chunk ${physicalChunk} referenced again while its free waits for a commit`);
    // A chunk counted without an allocation (a journal replayed at open).
    this.#usedCount += 1;
    if (physicalChunk >= this.#highWater) this.#highWater = physicalChunk + 1;
  }

  decrement(physicalChunk: number): number {
    const after = this.counts.add(physicalChunk, -1);
    if (after === 0) this.onFree(physicalChunk, 1);
    return after;
  }

  /** `increment` of each chunk of [start, start + chunkCount), at once (paged-map.ts's passes: a large write's run). */
  incrementRun(start: number, chunkCount: number): void {
    const edges = this.#edges;
    edges.length = 0;
    this.counts.addRun(start, chunkCount, 1, edges);
    // Chunks counted for the first time: allocated (held until now), or counted without an allocation (a replay).
    let page = -1;
    let unheld = 0;
    for (let i = 0; i < edges.length; i++) {
      const chunk = edges[i]!;
      if (this.#reserved.delete(chunk)) {
        const chunkPage = Math.floor(chunk / countsPerPage);
        if (chunkPage !== page) {
          if (unheld > 0) this.#heldChange(page, -unheld);
          page = chunkPage;
          unheld = 0;
        }
        unheld += 1;
        continue;
      }
      if (this.#freeing.has(chunk)) assert(false, `chunk ${chunk} referenced again while its free waits for a commit`);
      this.#usedCount += 1;
      if (chunk >= this.#highWater) this.#highWater = chunk + 1;
    }
    if (unheld > 0) this.#heldChange(page, -unheld);
  }

  /** `decrement` of each chunk of [start, start + chunkCount), at once: `onFree` once a run of chunks falling to zero. */
  decrementRun(start: number, chunkCount: number): void {
    const edges = this.#edges;
    edges.length = 0;
    this.counts.addRun(start, chunkCount, -1, edges);
    let i = 0;
    while (i < edges.length) {
      const first = edges[i]!;
      let count = 1;
      while (i + count < edges.length && edges[i + count] === first + count) count += 1;
      i += count;
      this.onFree(first, count);
    }
  }

  /**
   * Asked before each allocation: null, or a promise the allocation waits for first (paged-backend.ts holds the
   * writes so while a checkpoint is behind: `PagedBackend`'s `#holdWrite`).
   */
  allocationGate: () => Promise<void> | null = () => null;

  /** Returns the first of `chunkCount` consecutive free chunks, now the caller's (held until counted or released). */
  allocate(chunkCount: number): Promise<number> {
    assert(Number.isInteger(chunkCount) && chunkCount > 0);
    const gate = this.allocationGate();
    if (gate !== null) return gate.then(() => this.#serially(() => this.#allocate(chunkCount)));
    return this.#serially(() => this.#allocate(chunkCount));
  }

  /** Gives back allocated chunks never counted (a failed write): reusable at once. */
  release(start: number, chunkCount: number): void {
    assert(this.#reserved.deleteRun(start, chunkCount), 'chunks released but not allocated');
    this.#heldRunChange(start, chunkCount, -1);
    this.#usedCount -= chunkCount;
    this.#freed(start + chunkCount);
  }

  /** Chunks whose count fell to zero that committed metadata may still name: reusable only after the commit. */
  freeDeferred(start: number, chunkCount: number, punch = true): void {
    assert(chunkCount > 0);
    for (let chunk = start, end = start + chunkCount; chunk < end; ) {
      const page = Math.floor(chunk / countsPerPage);
      const first = page * countsPerPage;
      const stop = Math.min(end, first + countsPerPage);
      const counts = this.counts.countsOf(page);
      assert(counts !== undefined, `reference counts: page ${page} (for ${chunk}) is not loaded`);
      for (; chunk < stop; chunk++) if (counts[chunk - first] !== 0 || this.#reserved.has(chunk)) assert(false, `chunk ${chunk} freed while in use`);
    }
    // `#holdRun` refuses a chunk already held for a commit (freed twice).
    this.#holdRun(start, chunkCount);
    this.#usedCount -= chunkCount;
    this.#deferred.add(start, chunkCount, punch);
  }

  // deferredMark before a commit, takeDeferred after it, then releaseTaken: as allocator.ts.
  deferredMark = (): number => this.#deferred.mark();
  takeDeferred = (mark: number): FreeExtent[] => this.#deferred.take(mark);

  releaseTaken(extents: readonly FreeExtent[]): void {
    for (const extent of extents) {
      // Held for a commit or a punch, so not reserved (the two sets share no chunk).
      this.#unholdRun(extent.start, extent.count);
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
        this.#holdRun(chunk, 1);
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
        for (let chunk = first; chunk < end; chunk++) if (counts[chunk - first] === 0 && !this.#isHeld(chunk)) add(chunk);
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
        for (let chunk = first; chunk < end; chunk++) if (counts[chunk - first] === 0 && !this.#isHeld(chunk)) add(chunk, chunk + 1);
      } finally {
        pin.release();
      }
    }
    return extents;
  }

  async #allocate(chunkCount: number): Promise<number> {
    await this.#settle();
    let start = -1;
    const setCount = this.#usedCount + this.#freeing.size;
    if (this.#highWater - setCount >= chunkCount && chunkCount < this.#noRunOf) {
      start = await this.#findRun(this.#cursor, this.#highWater, chunkCount);
      if (start < 0) start = await this.#findRun(0, Math.min(this.#highWater, this.#cursor + chunkCount - 1), chunkCount);
      if (start < 0) this.#noRunOf = chunkCount;
    }
    if (start < 0) start = this.#highWater;
    assert(this.#reserved.addRun(start, chunkCount));
    this.#heldRunChange(start, chunkCount, 1);
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
      // Part free, nothing carried in and fewer free chunks here than the run: a run starting here goes on into the
      // next page, so it needs free chunks there too, and (unless longer than a page) this page's and the next's
      // free chunks together hold it. After random overwrites every page holds a few free chunks among 2,000 in
      // use, and a search for a write's run of tens read every page's counts.
      if (runStart < 0 && available < count) {
        const next = pageEnd >= to ? 0 : this.#available(page + 1);
        if (next === 0 || (count <= countsPerPage && available + next < count)) {
          position = pageEnd;
          continue;
        }
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
      // And such a run starts among the page's last `available` chunks.
      if (runStart < 0 && available < count) position = Math.max(position, pageEnd - available);
      // Held chunks as the page's bits, read here rather than looked up a chunk at a time.
      const reserved = this.#reserved.wordsOf(page);
      const freeing = this.#freeing.wordsOf(page);
      let chunk = position;
      if (runStart >= 0) {
        // A run carried in from the page before: it goes on through the free chunks at this page's start.
        for (; chunk < pageEnd && isFreeSlot(counts, reserved, freeing, chunk - first); chunk++) {
          if (chunk + 1 - runStart >= count) {
            this.#searchedChunks += chunk + 1 - position;
            return runStart;
          }
        }
        this.#searchedChunks += Math.min(pageEnd, chunk + 1) - position;
        if (chunk < pageEnd) {
          runStart = -1;
          chunk += 1;
        }
      }
      // A run starting at `chunk` holds the chunk `count` - 1 further (or the page's last): that one is looked at
      // first, and if in use no run starts before it, so the search moves `count` chunks at a time through chunks
      // in use (a page of a few free chunks among 2,000 is not walked a count at a time).
      while (chunk < pageEnd) {
        const last = Math.min(chunk + count, pageEnd) - 1;
        let back = last;
        while (back >= chunk && isFreeSlot(counts, reserved, freeing, back - first)) back -= 1;
        this.#searchedChunks += last - back + (back >= chunk ? 1 : 0);
        if (back >= chunk) {
          chunk = back + 1; // in use at `back`: a run starts after it
          continue;
        }
        // [chunk, last] free: a run, or the start of one that goes on into the next page.
        if (chunk >= limit) return -1;
        if (last + 1 - chunk >= count) return chunk;
        runStart = chunk;
        break;
      }
      position = pageEnd;
    }
    return -1;
  }

  /** Whether every chunk of the run is free now (its part-free pages are pinned by the search). */
  #runFree(start: number, count: number): boolean {
    for (let chunk = start, end = start + count; chunk < end; ) {
      const page = Math.floor(chunk / countsPerPage);
      const first = page * countsPerPage;
      const stop = Math.min(end, first + countsPerPage);
      if (this.#available(page) === countsPerPage) {
        chunk = stop;
        continue;
      }
      const counts = this.counts.countsOf(page);
      if (counts === undefined) return false;
      const reserved = this.#reserved.wordsOf(page);
      const freeing = this.#freeing.wordsOf(page);
      for (; chunk < stop; chunk++) if (!isFreeSlot(counts, reserved, freeing, chunk - first)) return false;
    }
    return true;
  }

  /** Free chunks of a page of counts: its zeros less those held. */
  #available(page: number): number {
    return this.counts.zeros(page) - (this.#heldPerPage.get(page) ?? 0);
  }

  /** Whether `chunk` (of count zero) is held: reserved, or waiting for a commit or a punch. */
  #isHeld(chunk: number): boolean {
    return this.#reserved.has(chunk) || this.#freeing.has(chunk);
  }

  /** Adds `delta` to the chunks held per page for each chunk of [start, start + chunkCount): once a page. */
  #heldRunChange(start: number, chunkCount: number, delta: 1 | -1): void {
    for (let chunk = start, end = start + chunkCount; chunk < end; ) {
      const page = Math.floor(chunk / countsPerPage);
      const stop = Math.min(end, (page + 1) * countsPerPage);
      this.#heldChange(page, delta * (stop - chunk));
      chunk = stop;
    }
  }

  /** Holds each chunk of [start, start + chunkCount) for a commit (none held yet). */
  #holdRun(start: number, chunkCount: number): void {
    assert(this.#freeing.addRun(start, chunkCount), `chunks of ${start} to ${start + chunkCount - 1} freed twice`);
    this.#heldRunChange(start, chunkCount, 1);
  }

  /** Lets go of each chunk of [start, start + chunkCount) held for a commit or a punch. */
  #unholdRun(start: number, chunkCount: number): void {
    assert(this.#freeing.deleteRun(start, chunkCount), `chunks of ${start} to ${start + chunkCount - 1} released twice or never freed`);
    this.#heldRunChange(start, chunkCount, -1);
  }

  /** Adds `delta` to the chunks held in page `page` of counts. */
  #heldChange(page: number, delta: number): void {
    const held = (this.#heldPerPage.get(page) ?? 0) + delta;
    assert(held >= 0);
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
        for (let chunk = top - 1; chunk >= first; chunk--) if (counts[chunk - first] !== 0 || this.#isHeld(chunk)) return chunk + 1;
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
  /** The page allocator: its high-water mark and the table of its leaves of free pages (as many entries as leaves cover the mark). */
  nextPage: number;
  freeDepth: number;
  freeTop: number;
}

/** A root of version 1: the free pages as a list, a chain of `freeCount` values from `freeFirst`. */
interface SpaceRootV1 {
  chunkCounts: RefCountRoot;
  pageCounts: RefCountRoot;
  nextPage: number;
  freeFirst: number;
  freeCount: number;
}

const rootFields = 13;
export const spaceRootBytes = 1 + rootFields * 6;
/** 2: free pages as a bitmap in pages; 1 (read, converted at the next flush): as a list written whole. */
const spaceRootVersion = 2;

export function encodeSpaceRoot(root: SpaceRoot): Buffer {
  const fields = [root.chunkCounts, root.pageCounts].flatMap((counts) => [counts.directory.length, counts.directory.depth, counts.directory.top, counts.overflowFirst, counts.overflowCount]);
  fields.push(root.nextPage, root.freeDepth, root.freeTop);
  const out = Buffer.alloc(spaceRootBytes);
  out.writeUInt8(spaceRootVersion, 0);
  for (const [i, field] of fields.entries()) out.writeUIntLE(field, 1 + i * 6, 6);
  return out;
}

export function decodeSpaceRoot(bytes: Buffer): ({ version: 2 } & SpaceRoot) | ({ version: 1 } & SpaceRootV1) {
  const version = bytes.readUInt8(0);
  if (bytes.length < spaceRootBytes || (version !== 1 && version !== 2)) throw ChunkdError.corrupt(`space maps root: ${bytes.length} bytes, version ${bytes[0]}`);
  const field = (i: number): number => bytes.readUIntLE(1 + i * 6, 6);
  const counts = (at: number): RefCountRoot => ({ directory: { length: field(at), depth: field(at + 1), top: field(at + 2) }, overflowFirst: field(at + 3), overflowCount: field(at + 4) });
  const common = { chunkCounts: counts(0), pageCounts: counts(5), nextPage: field(10) };
  if (version === 1) return { version, ...common, freeFirst: field(11), freeCount: field(12) };
  return { version, ...common, freeDepth: field(11), freeTop: field(12) };
}

/** The chunk space, the page reference counts and the page allocator, kept in pages through one cache. */
export class SpaceMaps implements PageSink {
  readonly pages: PageAllocator;
  readonly #cache: PageCache;
  #chunks: ChunkSpace | undefined;
  #pageRefs: RefCountMap | undefined;

  private constructor(cache: PageCache, pages: PageAllocator) {
    this.#cache = cache;
    this.pages = pages;
  }

  /** The space maps a root recorded (`encodeSpaceRoot`'s bytes), or empty ones for null. */
  static async open(cache: PageCache, root: Buffer | null): Promise<SpaceMaps> {
    if (root === null) {
      const maps = new SpaceMaps(cache, new PageAllocator());
      maps.#chunks = await ChunkSpace.open(RefCountMap.create(cache, maps));
      maps.#pageRefs = RefCountMap.create(cache, maps);
      return maps;
    }
    const decoded = decodeSpaceRoot(root);
    let pages: PageAllocator;
    if (decoded.version === 1) {
      // The list of a pool from before the bitmap: read once, its pages released (the next root no longer names them).
      const free = await readChain(cache, decoded.freeFirst, decoded.freeCount);
      pages = new PageAllocator({ nextPage: decoded.nextPage, free: free.values });
      // A damaged list could name its own pages as free: the allocator would throw a plain error at their release.
      const listPages = new Set(free.pages);
      const inList = free.values.find((page) => listPages.has(page));
      if (inList !== undefined) throw ChunkdError.corrupt(`space maps root: page ${inList} of the free-page list is in the list`);
      for (const page of free.pages) pages.release(page);
    } else {
      const length = Math.ceil(decoded.nextPage / pagesPerLeaf);
      pages = await PageAllocator.open(cache, { nextPage: decoded.nextPage, directory: { length, depth: decoded.freeDepth, top: decoded.freeTop } });
    }
    const maps = new SpaceMaps(cache, pages);
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
   * Puts every page changed since the last flush into the cache, last the free pages' leaves changed, and returns
   * the bytes the next root records. Call it after everything else that allocates or releases pages for that root
   * has done so.
   */
  flush(): Buffer {
    const chunkCounts = this.chunks.counts.flush();
    const pageCounts = this.pageRefs.flush();
    const free = this.pages.flush(this);
    return encodeSpaceRoot({ chunkCounts, pageCounts, nextPage: free.nextPage, freeDepth: free.directory.depth, freeTop: free.directory.top });
  }

  /** Every page the space maps' state is in, as of the last flush (a check: with free pages, each page once). */
  ownedPages(): number[] {
    return [...this.chunks.counts.ownedPages(), ...this.pageRefs.ownedPages(), ...this.pages.ownedPages()];
  }

  /** The root of the last flush is durable: the pages released before it may be written again. */
  committed(): void {
    this.pages.committed();
  }
}

/** Whether the chunk at `slot` of a page of counts is free: of count zero and held neither for a write nor for a commit. */
function isFreeSlot(counts: Uint16Array, reserved: Uint32Array, freeing: Uint32Array, slot: number): boolean {
  return counts[slot] === 0 && ((reserved[slot >>> 5]! | freeing[slot >>> 5]!) & (1 << (slot & 31))) === 0;
}
