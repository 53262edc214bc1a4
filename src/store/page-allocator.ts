// Page numbers for the paged metadata's copy-on-write. A page replaced by copy-on-write is still named by the
// durable root until the commit that replaces the root is durable, so it is reusable only after that commit:
// `release` holds it, `flush` seals it into the next root, `committed` frees it (the rule the chunk allocator
// follows for chunks, allocator.ts). Allocation takes the lowest free page first, else a new one above the
// high-water mark.
//
// Free pages are a bitmap (a bit a page), kept in pages of 32,512 bits ("leaves", page kind 0x33) named by a
// PagedTable (page-table.ts: one entry a leaf, its page number and how many of its bits are set; while the pool
// has fewer pages than one leaf covers, the root names that leaf and there is no table), so that a flush
// writes the leaves changed since the last one and the table's pages above them, not a list of every free page:
// after a volume of 16 TiB written at 4 KiB is deleted, some 16 million free pages are 516 leaves (2 MiB), of
// which a later checkpoint rewrites the few its changes touch (the free list this replaced was a `Set`, which V8
// cannot grow past 2^24 entries, and a chain of 96 MiB rewritten at every checkpoint: BENCHMARKS.md, issue 15).
// In memory each leaf is two bitmaps (what the next root records, and what may be handed out now): 2 bits a
// metadata page, held whole (2 MiB a 32 GiB of metadata pages, a 16,384th of them; the chunk counts' own summary
// is larger at any size), plus, for a leaf with pages waiting for a commit, a bitmap of those.
//
// A bit set in a leaf means: the root does not name the page, or the page is one of this bitmap's own (a leaf or
// a page of its table). Its own pages are taken from and given back to the free pages without changing a bit, so
// that writing the bitmap never changes the bitmap (a leaf's copy would need a page, whose bit would dirty a leaf,
// whose copy would need a page...). They are known from the table (read whole at open) and never handed out while
// the bitmap names them. Before a flush takes pages, it makes sure enough are free to take (extending the mark
// with free pages if need be: those change leaves, but before any leaf is written).
//
// Invariants: a bit at or above `nextPage`, or below `firstDataPage`, is never set; a page free to hand out has its
// bit set; a page waiting for a commit has its bit set and is not free to hand out; a page of the bitmap's own
// has its bit set and is neither. Pure but for `open` (reads the table and leaves through a PageSource).
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { firstDataPage, pageBodyBytesMax } from './page-file.ts';
import { PagedTable, pageKinds, readKind, tableEntriesPerPage, type PageSink, type PageSource, type TableRoot } from './page-table.ts';

const wordsPerLeaf = Math.floor(pageBodyBytesMax / 4);
/** Pages a leaf of the bitmap covers. */
export const pagesPerLeaf = wordsPerLeaf * 32;
/** Leaves read at once at open. */
const openReadAhead = 64;

/** A list of free pages (the form before the bitmap, and of tests). */
export interface PageAllocatorState {
  /** The lowest page number never handed out. */
  nextPage: number;
  /** Pages free to hand out again. */
  free: number[];
}

/** What a root records of the page allocator. */
export interface FreePagesRoot {
  nextPage: number;
  /** The table of leaves: as many entries as leaves cover `nextPage`. */
  directory: TableRoot;
}

/** Which pages were free to hand out at some point (a copy: the page allocator at open, for checks). */
export interface FreePagesView {
  nextPage: number;
  isFree(page: number): boolean;
}

interface Leaf {
  /** What the next root records: the page is not named by it (or is a page of the bitmap's own). */
  free: Uint32Array;
  /** Free to hand out now. */
  avail: Uint32Array;
  availCount: number;
  /** Released since the last flush: free once the root after it is durable. */
  released: Uint32Array | null;
  /** Released before a flush whose root is not yet durable. */
  sealed: Uint32Array | null;
  /** `free` changed since the last flush. */
  dirty: boolean;
}

function popcount(word: number): number {
  let x = word - ((word >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** The word of its leaf that holds `page`'s bit, and the bit's mask in it. */
function wordOf(page: number): number {
  return (page % pagesPerLeaf) >>> 5;
}

function maskOf(page: number): number {
  return 1 << (page & 31);
}

function lowestBit(word: number): number {
  return 31 - Math.clz32(word & -word);
}

export class PageAllocator {
  #nextPage: number;
  readonly #leaves: Array<Leaf | undefined> = [];
  #directory: PagedTable;
  /** The bitmap's own pages (its leaves, its table's pages), as of the changes since the last flush. */
  readonly #own = new Set<number>();
  /** Leaves with pages released or sealed (`Leaf.released`, `Leaf.sealed`). */
  readonly #waitingLeaves = new Set<number>();
  /** Whether a flush sealed releases that wait for `committed`. */
  #sealPending = false;
  #availCount = 0;
  #releasedCount = 0;
  #sealedCount = 0;
  /** No page below this one is free to hand out. */
  #hint = firstDataPage;

  /** An allocator with the free pages of `state` (none written yet: the first flush writes every leaf). */
  constructor(state: PageAllocatorState = { nextPage: firstDataPage, free: [] }) {
    if (!Number.isSafeInteger(state.nextPage) || state.nextPage < firstDataPage) throw ChunkdError.corrupt(`page allocator: next page ${state.nextPage}`);
    this.#nextPage = state.nextPage;
    this.#directory = new PagedTable();
    for (const page of state.free) {
      if (!Number.isSafeInteger(page) || page < firstDataPage || page >= state.nextPage) throw ChunkdError.corrupt(`page allocator: free page ${page} outside ${firstDataPage}..${state.nextPage - 1}`);
      const leaf = this.#leaf(page);
      const word = wordOf(page);
      const mask = maskOf(page);
      if ((leaf.free[word]! & mask) !== 0) throw ChunkdError.corrupt(`page allocator: page ${page} is free twice`);
      leaf.free[word]! |= mask;
      leaf.avail[word]! |= mask;
      leaf.availCount += 1;
      leaf.dirty = true;
      this.#availCount += 1;
    }
  }

  /** The allocator a root recorded: reads the table of leaves and every leaf (a page a 32,512 metadata pages). */
  static async open(source: PageSource, root: FreePagesRoot): Promise<PageAllocator> {
    const allocator = new PageAllocator({ nextPage: root.nextPage, free: [] });
    const leafCount = Math.ceil(root.nextPage / pagesPerLeaf);
    if (root.directory.length !== leafCount) throw ChunkdError.corrupt(`page allocator: ${root.directory.length} leaves of free pages for ${root.nextPage} pages`);
    if (root.directory.depth === 0) {
      // One leaf and no table: the root names the leaf (0: no page free).
      if (leafCount !== 1) throw ChunkdError.corrupt(`page allocator: no table of free pages for ${leafCount} leaves`);
      if (root.directory.top !== 0) {
        allocator.#addOwn(root.directory.top);
        const body = await readKind(source, root.directory.top, pageKinds.freePages);
        let ones = 0;
        for (let offset = 0; offset + 4 <= body.length; offset += 4) ones += popcount(body.readUInt32LE(offset));
        allocator.#loadLeaf(0, body, ones);
        allocator.#directory.set(0, root.directory.top, ones);
      }
      allocator.#unmarkOwn();
      return allocator;
    }
    // A table for one leaf is never written (the root names the leaf): a damaged root, whose table would leak.
    if (leafCount === 1) throw ChunkdError.corrupt('page allocator: a table of free pages for one leaf');
    const directory = await PagedTable.open(source, root.directory);
    allocator.#directory = directory;
    for (const page of directory.pages()) allocator.#addOwn(page);
    // Each leaf's page checked before it is read (a damaged entry is corruption, not a failed read), and a missing
    // leaf has no pages free.
    for (let index = 0; index < leafCount; index++) {
      if (directory.value(index) !== 0) allocator.#addOwn(directory.value(index));
      else if (directory.small(index) !== 0) throw ChunkdError.corrupt(`page allocator: leaf ${index} of free pages has no page but ${directory.small(index)} pages free`);
    }
    for (let start = 0; start < leafCount; start += openReadAhead) {
      const indexes = Array.from({ length: Math.min(openReadAhead, leafCount - start) }, (_, i) => start + i).filter((index) => directory.value(index) !== 0);
      const bodies = await Promise.all(indexes.map((index) => readKind(source, directory.value(index), pageKinds.freePages)));
      for (const [i, body] of bodies.entries()) allocator.#loadLeaf(indexes[i]!, body, directory.small(indexes[i]!));
    }
    allocator.#unmarkOwn();
    return allocator;
  }

  /** At open: the bitmap's own pages are named by the root, set in their leaves, not free to hand out. */
  #unmarkOwn(): void {
    for (const page of this.#own) {
      const leaf = this.#leaves[Math.floor(page / pagesPerLeaf)];
      const word = wordOf(page);
      const mask = maskOf(page);
      if (leaf === undefined || (leaf.free[word]! & mask) === 0) throw ChunkdError.corrupt(`page allocator: page ${page} of the free-page bitmap is not marked in it`);
      leaf.avail[word]! &= ~mask;
      leaf.availCount -= 1;
      this.#availCount -= 1;
    }
  }

  #addOwn(page: number): void {
    if (page < firstDataPage || page >= this.#nextPage || this.#own.has(page)) throw ChunkdError.corrupt(`page allocator: page ${page} of the free-page bitmap named twice or outside ${firstDataPage}..${this.#nextPage - 1}`);
    this.#own.add(page);
  }

  #loadLeaf(index: number, body: Buffer, ones: number): void {
    if (body.length !== wordsPerLeaf * 4) throw ChunkdError.corrupt(`a leaf of free pages holds ${body.length} bytes, not ${wordsPerLeaf * 4}`);
    const leaf = this.#leaf(index * pagesPerLeaf);
    leaf.dirty = false;
    const words = new Uint32Array(Uint8Array.from(body).buffer);
    const first = index * pagesPerLeaf;
    let count = 0;
    for (let w = 0; w < wordsPerLeaf; w++) {
      const word = words[w]!;
      if (word === 0) continue;
      count += popcount(word);
      // No bit below the first data page or at or above the mark.
      const low = first + w * 32 + lowestBit(word);
      const high = first + w * 32 + 31 - Math.clz32(word);
      if (low < firstDataPage || high >= this.#nextPage) throw ChunkdError.corrupt(`page allocator: a free page outside ${firstDataPage}..${this.#nextPage - 1} in leaf ${index}`);
    }
    if (count !== ones) throw ChunkdError.corrupt(`page allocator: leaf ${index} of free pages holds ${count} pages, its table says ${ones}`);
    leaf.free.set(words);
    leaf.avail.set(words);
    leaf.availCount = count;
    this.#availCount += count;
  }

  /** The leaf holding `page`'s bit (made if missing). */
  #leaf(page: number): Leaf {
    const index = Math.floor(page / pagesPerLeaf);
    let leaf = this.#leaves[index];
    if (leaf === undefined) {
      leaf = { free: new Uint32Array(wordsPerLeaf), avail: new Uint32Array(wordsPerLeaf), availCount: 0, released: null, sealed: null, dirty: false };
      this.#leaves[index] = leaf;
    }
    return leaf;
  }

  /** The lowest page free to hand out (its bit cleared in `avail`), or -1. */
  #take(): number {
    if (this.#availCount === 0) return -1;
    const page = this.#nextAvail(this.#hint);
    assert(page >= 0, `page allocator: ${this.#availCount} pages free and none found from ${this.#hint}`);
    const leaf = this.#leaves[Math.floor(page / pagesPerLeaf)]!;
    leaf.avail[wordOf(page)]! &= ~maskOf(page);
    leaf.availCount -= 1;
    this.#availCount -= 1;
    this.#hint = page;
    return page;
  }

  /** The lowest page free to hand out at or above `from`, or -1 (none is below the hint). */
  #nextAvail(from: number): number {
    const start = Math.max(from, this.#hint);
    for (let index = Math.floor(start / pagesPerLeaf); index < this.#leaves.length; index++) {
      const leaf = this.#leaves[index];
      if (leaf === undefined || leaf.availCount === 0) continue;
      const first = index * pagesPerLeaf;
      const firstWord = start > first ? wordOf(start) : 0;
      for (let w = firstWord; w < wordsPerLeaf; w++) {
        // In the first word, only the bits from `start` on.
        const word = w === firstWord && start > first ? leaf.avail[w]! & ~(maskOf(start) - 1) : leaf.avail[w]!;
        if (word !== 0) return first + w * 32 + lowestBit(word);
      }
    }
    return -1;
  }

  allocate(): number {
    const page = this.#take();
    if (page < 0) return this.#nextPage++;
    const leaf = this.#leaves[Math.floor(page / pagesPerLeaf)]!;
    leaf.free[wordOf(page)]! &= ~maskOf(page);
    leaf.dirty = true;
    return page;
  }

  /** The pages the next `count` calls of `allocate` will return, in order (nothing released or committed between). */
  upcoming(count: number): number[] {
    const pages: number[] = [];
    if (this.#availCount > 0) for (let page = this.#nextAvail(0); page >= 0 && pages.length < count; page = this.#nextAvail(page + 1)) pages.push(page);
    for (let page = this.#nextPage; pages.length < count; page++) pages.push(page);
    return pages;
  }

  /** A page the next root will no longer name: free once that root is durable. */
  release(page: number): void {
    if (!Number.isSafeInteger(page) || page < firstDataPage || page >= this.#nextPage) throw new Error(`page allocator: release of page ${page}, never handed out`);
    const leaf = this.#leaf(page);
    const word = wordOf(page);
    const mask = maskOf(page);
    // Free, waiting and the bitmap's own pages all have their bit set.
    if ((leaf.free[word]! & mask) !== 0) throw new Error(`page allocator: page ${page} released twice`);
    leaf.free[word]! |= mask;
    leaf.dirty = true;
    this.#hold(page, leaf, word, mask);
  }

  /** Holds `page` (its bit set) until the commit after the next flush. */
  #hold(page: number, leaf: Leaf, word: number, mask: number): void {
    leaf.released ??= new Uint32Array(wordsPerLeaf);
    leaf.released[word]! |= mask;
    this.#releasedCount += 1;
    this.#waitingLeaves.add(Math.floor(page / pagesPerLeaf));
  }

  /** A page for the bitmap itself: its bit stays set (see the top), it is not handed out. */
  #takeOwn(): number {
    const page = this.#take();
    assert(page >= 0, 'page allocator: a flush ran out of the pages it made free');
    this.#own.add(page);
    return page;
  }

  /** A page of the bitmap's own that the next root no longer names: waits for the commit as any other. */
  #releaseOwn(page: number): void {
    assert(this.#own.delete(page), `page allocator: page ${page} is not the bitmap's`);
    const leaf = this.#leaves[Math.floor(page / pagesPerLeaf)]!;
    const word = wordOf(page);
    const mask = maskOf(page);
    assert((leaf.free[word]! & mask) !== 0);
    this.#hold(page, leaf, word, mask);
  }

  /**
   * Writes the leaves changed since the last flush, and the table's pages above them, to new pages through `sink`
   * (its `put`; the pages come from this allocator, see the top), and seals the releases made so far into the
   * root about to be made: they count as free there (that root no longer names them), though they are handed out
   * only after `committed`. Pages released from now on wait for the commit after. Returns what the root records.
   */
  flush(sink: Pick<PageSink, 'put'>): FreePagesRoot {
    const table = this.#directory;
    const leafCount = (): number => Math.ceil(this.#nextPage / pagesPerLeaf);
    // Pages the flush takes, at most: a page a dirty leaf, and at each level of the table as many pages as dirty
    // leaves, or as the level has (its growth included). Made free above the mark where fewer are free.
    for (;;) {
      let dirty = 0;
      for (let index = 0; index < leafCount(); index++) if (this.#leaves[index]?.dirty === true || index >= table.length) dirty += 1;
      let need = dirty;
      for (let size = Math.ceil(leafCount() / tableEntriesPerPage); leafCount() > 1; size = Math.ceil(size / tableEntriesPerPage)) {
        need += Math.min(dirty, size);
        if (size <= 1) break;
      }
      if (this.#availCount >= need) break;
      this.#extendFree(need - this.#availCount);
    }
    for (let index = 0; index < leafCount(); index++) {
      const leaf = this.#leaves[index];
      if (leaf?.dirty !== true && index < table.length) continue;
      const old = table.value(index);
      if (old !== 0) this.#releaseOwn(old);
      let ones = 0;
      if (leaf !== undefined) {
        leaf.dirty = false;
        for (let w = 0; w < wordsPerLeaf; w++) if (leaf.free[w] !== 0) ones += popcount(leaf.free[w]!);
      }
      // A leaf with no bit set takes no page (0 in the table reads as all clear).
      if (ones === 0) {
        table.set(index, 0, 0);
        continue;
      }
      const pageNumber = this.#takeOwn();
      sink.put(pageNumber, pageKinds.freePages, Buffer.from(leaf!.free.slice().buffer));
      table.set(index, pageNumber, ones);
    }
    // One leaf (127 MiB of metadata pages): the root names it, no table. The table's entries are kept, dirty, and
    // written whole once a second leaf is needed.
    const directory =
      leafCount() === 1 ? { length: 1, depth: 0, top: table.value(0) } : table.flush({ allocate: () => this.#takeOwn(), release: (page) => this.#releaseOwn(page), put: (page, kind, body) => sink.put(page, kind, body) });
    assert(directory.length === leafCount());
    for (const index of this.#waitingLeaves) {
      const leaf = this.#leaves[index]!;
      if (leaf.released === null) continue;
      if (leaf.sealed === null) leaf.sealed = leaf.released;
      else for (let w = 0; w < wordsPerLeaf; w++) leaf.sealed[w]! |= leaf.released[w]!;
      leaf.released = null;
    }
    this.#sealedCount += this.#releasedCount;
    this.#releasedCount = 0;
    this.#sealPending = true;
    return { nextPage: this.#nextPage, directory };
  }

  /** Raises the mark by `count` pages, free to hand out at once (no root names a page above the mark). */
  #extendFree(count: number): void {
    for (let i = 0; i < count; i++) {
      const page = this.#nextPage++;
      const leaf = this.#leaf(page);
      const word = wordOf(page);
      const mask = maskOf(page);
      leaf.free[word]! |= mask;
      leaf.avail[word]! |= mask;
      leaf.availCount += 1;
      leaf.dirty = true;
      this.#availCount += 1;
      this.#hint = Math.min(this.#hint, page);
    }
  }

  /**
   * The root that stopped naming the released pages is durable: they may be written again (after `flush`, those
   * released before it; without one, all).
   */
  committed(): void {
    const sealed = this.#sealPending;
    for (const index of [...this.#waitingLeaves]) {
      const leaf = this.#leaves[index]!;
      const freed = sealed ? leaf.sealed : leaf.released;
      if (freed !== null) {
        for (let w = 0; w < wordsPerLeaf; w++) {
          const word = freed[w]!;
          if (word === 0) continue;
          assert((leaf.avail[w]! & word) === 0 && (~leaf.free[w]! & word) === 0, 'page allocator: a page freed by a commit is free already or in use');
          leaf.avail[w]! |= word;
          leaf.availCount += popcount(word);
          this.#hint = Math.min(this.#hint, index * pagesPerLeaf + w * 32 + lowestBit(word));
        }
      }
      if (sealed) leaf.sealed = null;
      else leaf.released = null;
      if (leaf.sealed === null && leaf.released === null) this.#waitingLeaves.delete(index);
    }
    this.#availCount += sealed ? this.#sealedCount : this.#releasedCount;
    if (sealed) this.#sealedCount = 0;
    else this.#releasedCount = 0;
    this.#sealPending = false;
  }

  /** Pages free to hand out now. */
  get freeCount(): number {
    return this.#availCount;
  }

  /** Released and not yet free (waiting for a commit). */
  get waitingCount(): number {
    return this.#releasedCount + this.#sealedCount;
  }

  get nextPage(): number {
    return this.#nextPage;
  }

  /** Whether `page` is free to hand out now. */
  isFree(page: number): boolean {
    const leaf = this.#leaves[Math.floor(page / pagesPerLeaf)];
    return leaf !== undefined && (leaf.avail[wordOf(page)]! & maskOf(page)) !== 0;
  }

  /** A copy of which pages are free to hand out now (a bit a page below the mark: for checks, fsck's). */
  view(): FreePagesView {
    const nextPage = this.#nextPage;
    const leaves = this.#leaves.map((leaf) => (leaf === undefined || leaf.availCount === 0 ? undefined : leaf.avail.slice()));
    return {
      nextPage,
      isFree: (page) => {
        const avail = leaves[Math.floor(page / pagesPerLeaf)];
        return avail !== undefined && (avail[wordOf(page)]! & maskOf(page)) !== 0;
      },
    };
  }

  /** The pages of the bitmap itself (its leaves and its table's pages), as of the last flush and the changes since. */
  ownedPages(): number[] {
    return [...this.#own];
  }

  /** The pages free to hand out, in order (for tests and small checks: a list as long as the free pages). */
  state(): PageAllocatorState {
    const free: number[] = [];
    if (this.#availCount > 0) for (let page = this.#nextAvail(0); page >= 0; page = this.#nextAvail(page + 1)) free.push(page);
    return { nextPage: this.#nextPage, free };
  }
}
