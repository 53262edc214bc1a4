// Physical chunk allocation for the pool: a bitmap of chunks in use (set: allocated, or freed but not yet
// reusable) below a high-water mark; above the mark every chunk is free. Allocation is next-fit: the first run of
// free chunks at or after a cursor that holds the whole request (then from the start up to the cursor), else
// the chunks above the high-water mark, so that one write gets one contiguous run and one pwrite. Every
// overwrite frees chunks (redirect-on-write, volume.ts), so frees are frequent and scattered: a bitmap makes
// each free O(chunks) and each allocation a scan that skips whole words.
// Frees are deferred: a freed chunk may still be named by the metadata on disk until the commit that records the
// free is durable, so it is reused only after `takeDeferred` and `releaseTaken` (else a crash could show one
// volume another's data). A deferred free says whether its space should be punched out of the file (a trim, a
// removal: the space goes back to the file system) or only recycled (an overwrite: a write will soon reuse it).
// Pure: no I/O.
// Random overwrites leave the space below the mark riddled with single free chunks, where a large write finds no
// run: searches work a 32-bit word at a time (a run of 64 or more free chunks holds a whole free word, so only
// those are looked at), and a search that found nothing is not repeated for that size or larger until something
// is freed. Measured before both: after 4 KiB random writes, 1 MiB writes spent milliseconds each scanning
// bit by bit, and ran at 290 against 1,250 MB/s.
// Known weakness: a search gives up after scanning `allocationScanChunksMax` chunks and goes above the mark, so a
// pool fragmented into small holes grows its files' address space for large writes (not their allocated space
// when the holes were punched); the holes are reused by smaller writes, and by a larger one that the file system
// has no room for above the mark (ChunkStore.write then writes it in pieces). Space above the mark costs more CPU to
// write than recycled space, and not because of its blocks: its page-cache folios are new memory, which on a VM
// whose balloon reports free pages to the host faults in the host on first touch (measured on the 2-vCPU VM: the
// copy into the page cache at 0.23-0.51 s/GB against 0.07-0.11 into recycled chunks; BENCHMARKS.md, issue 19).
import { assert } from '../core/assert.ts';

export interface FreeExtent {
  start: number;
  count: number;
  /** Give the space back to the file system (fallocate punch) before reuse. */
  punch: boolean;
}

/**
 * Frees waiting for the commit that records them, in order, each merged with the one before when they touch and
 * no commit has claimed that one yet (shared by this allocator and the space maps' one, space-map.ts).
 */
export class DeferredFrees {
  #extents: FreeExtent[] = [];
  #count = 0;
  /** Chunks waiting in extents of `freedRunChunksMin` or more. */
  #runCount = 0;
  /** Frees claimed by a commit in progress (the first ones). */
  #sealedCount = 0;

  /** Chunks waiting. */
  get count(): number {
    return this.#count;
  }

  /**
   * Chunks waiting in runs of at least `freedRunChunksMin`: the frees a large write can reuse once they are
   * released. An overwrite of data written at random frees single chunks, which no run of a large write fits.
   */
  get runCount(): number {
    return this.#runCount;
  }

  add(start: number, chunkCount: number, punch: boolean): void {
    this.#count += chunkCount;
    const last = this.#extents[this.#extents.length - 1];
    if (last !== undefined && this.#extents.length > this.#sealedCount && last.punch === punch && last.start + last.count === start) {
      const before = last.count;
      last.count += chunkCount;
      if (before >= freedRunChunksMin) this.#runCount += chunkCount;
      else if (last.count >= freedRunChunksMin) this.#runCount += last.count;
    } else {
      this.#extents.push({ start, count: chunkCount, punch });
      if (chunkCount >= freedRunChunksMin) this.#runCount += chunkCount;
    }
  }

  /** Marks the frees a commit is about to make durable; pass the result to `take` after it. */
  mark(): number {
    this.#sealedCount = this.#extents.length;
    return this.#sealedCount;
  }

  /** Takes the first `mark` frees, now recorded durably. */
  take(mark: number): FreeExtent[] {
    this.#sealedCount -= mark;
    const taken = this.#extents.splice(0, mark);
    for (const extent of taken) {
      this.#count -= extent.count;
      if (extent.count >= freedRunChunksMin) this.#runCount -= extent.count;
    }
    return taken;
  }
}

/** Freed chunks in a run at least this long count as reusable by large writes (`DeferredFrees.runCount`): 128 KiB. */
export const freedRunChunksMin = 32;

/** Chunks in one span of `holdFree` (32 MiB of chunks). */
const holdSpanChunks = 8192;

/** Chunks one allocation scans before it settles for the space above the high-water mark. */
const allocationScanChunksMax = 1 << 20;

export class ChunkAllocator {
  #bits = new Uint32Array(1024);
  #highWater = 0;
  #cursor = 0;
  /** Bits set: chunks allocated plus chunks freed but not yet released. */
  #setCount = 0;
  #usedCount = 0;
  readonly #deferred = new DeferredFrees();
  /** No run of this many free chunks was found below the mark since the last time chunks were freed. */
  #noRunOf = Infinity;

  /** Builds the allocator from every used run (from the metadata at load); overlapping runs are an error. */
  static fromUsed(runs: Iterable<{ physicalChunk: number; chunkCount: number }>): ChunkAllocator {
    const allocator = new ChunkAllocator();
    for (const run of runs) {
      const end = run.physicalChunk + run.chunkCount;
      allocator.#grow(end);
      for (let chunk = run.physicalChunk; chunk < end; chunk++) if (allocator.#isSet(chunk)) throw new RangeError(`physical chunk ${chunk} is used twice`);
      allocator.#setRange(run.physicalChunk, run.chunkCount);
      allocator.#highWater = Math.max(allocator.#highWater, end);
      allocator.#usedCount += run.chunkCount;
    }
    return allocator;
  }

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

  /** Free runs below the high-water mark (for punching leaked space at load). */
  freeExtents(): FreeExtent[] {
    return this.#freeRuns(0, this.#highWater);
  }

  /** The free runs of [first, end). */
  #freeRuns(first: number, end: number): FreeExtent[] {
    const extents: FreeExtent[] = [];
    for (let chunk = first; chunk < end; ) {
      const start = this.#nextClear(chunk, end);
      if (start < 0) break;
      chunk = this.#nextSet(start, end);
      extents.push({ start, count: chunk - start, punch: true });
    }
    return extents;
  }

  /** Spans of `holdSpanChunks` below the high-water mark (for `holdFree`). */
  get pagesInUse(): number {
    return Math.ceil(this.#highWater / holdSpanChunks);
  }

  /** The free chunks of span `page` below the mark, held (set, not counted as used) until `releaseTaken`. */
  holdFree(page: number): FreeExtent[] {
    const first = page * holdSpanChunks;
    const extents = this.#freeRuns(first, Math.min(first + holdSpanChunks, this.#highWater));
    for (const extent of extents) this.#setRange(extent.start, extent.count);
    return extents;
  }

  /** Returns the first of `chunkCount` consecutive physical chunks now owned by the caller. */
  allocate(chunkCount: number): number {
    assert(Number.isInteger(chunkCount) && chunkCount > 0);
    let start = -1;
    if (this.#highWater - this.#setCount >= chunkCount && chunkCount < this.#noRunOf) {
      start = this.#findRun(this.#cursor, this.#highWater, chunkCount);
      if (start < 0) start = this.#findRun(0, Math.min(this.#highWater, this.#cursor + chunkCount - 1), chunkCount);
      if (start < 0) this.#noRunOf = chunkCount;
    }
    if (start < 0) {
      start = this.#highWater;
      this.#highWater += chunkCount;
      this.#grow(this.#highWater);
    }
    this.#setRange(start, chunkCount);
    this.#usedCount += chunkCount;
    this.#cursor = start + chunkCount;
    return start;
  }

  /** Gives back chunks that no committed metadata names (a failed write): reusable at once. */
  release(start: number, chunkCount: number): void {
    this.#usedCount -= chunkCount;
    this.#clearRange(start, chunkCount);
  }

  /** Gives back chunks that committed metadata may still name: reusable only after the commit (see `takeDeferred`). */
  freeDeferred(start: number, chunkCount: number, punch = true): void {
    assert(chunkCount > 0);
    this.#usedCount -= chunkCount;
    this.#deferred.add(start, chunkCount, punch);
  }

  /** Marks the deferred frees a commit is about to make durable; pass the result to `takeDeferred` after it. */
  deferredMark(): number {
    return this.#deferred.mark();
  }

  /** Takes the first `mark` deferred frees, now recorded durably; the caller punches them, then `releaseTaken`. */
  takeDeferred(mark: number): FreeExtent[] {
    return this.#deferred.take(mark);
  }

  /** Makes extents from `takeDeferred` reusable. */
  releaseTaken(extents: readonly FreeExtent[]): void {
    for (const extent of extents) this.#clearRange(extent.start, extent.count);
  }

  /** The first run of `count` clear bits starting in [from, to) and ending by `to`, or -1; scans a bounded distance. */
  #findRun(from: number, to: number, count: number): number {
    const limit = Math.min(to, from + allocationScanChunksMax);
    if (count >= 64) return this.#findLongRun(from, to, limit, count);
    let chunk = from;
    while (chunk + count <= to && chunk < limit) {
      const start = this.#nextClear(chunk, to);
      if (start < 0 || start + count > to) return -1;
      const end = this.#nextSet(start, Math.min(to, start + count));
      if (end - start >= count) return start;
      chunk = end;
    }
    return -1;
  }

  /**
   * #findRun for 64 or more chunks: such a run holds at least one whole free word, so only free words are looked
   * at, each extended back into the free top of the word before it and forward to the next chunk in use.
   */
  #findLongRun(from: number, to: number, limit: number, count: number): number {
    for (let word = Math.floor(from / 32); word * 32 < limit; word++) {
      if (this.#bits[word] !== 0) continue;
      // Free chunks at the top of the word before (it is not free whole, or this word would not be the first).
      const before = word > 0 && word * 32 > from ? Math.clz32(this.#bits[word - 1]!) : 0;
      const start = Math.max(from, word * 32 - before);
      const end = this.#nextSet(word * 32, Math.min(to, start + count));
      if (end - start >= count) return start;
      word = Math.floor(end / 32); // the word holding `end` is in use in part: the loop moves past it
    }
    return -1;
  }

  /** The first clear bit in [from, to), or -1. */
  #nextClear(from: number, to: number): number {
    let chunk = from;
    while (chunk < to) {
      // Clear bits of this word at or above chunk's: the lowest is the answer.
      const bit = chunk % 32;
      const free = ~this.#bits[(chunk - bit) / 32]! & (-1 << bit);
      if (free !== 0) {
        const found = chunk - bit + lowestBit(free);
        return found < to ? found : -1;
      }
      chunk += 32 - bit;
    }
    return -1;
  }

  /** The first set bit in [from, to), or `to`. */
  #nextSet(from: number, to: number): number {
    let chunk = from;
    while (chunk < to) {
      const bit = chunk % 32;
      const used = this.#bits[(chunk - bit) / 32]! & (-1 << bit);
      if (used !== 0) return Math.min(to, chunk - bit + lowestBit(used));
      chunk += 32 - bit;
    }
    return to;
  }

  #isSet(chunk: number): boolean {
    return (this.#bits[chunk >>> 5]! & (1 << (chunk & 31))) !== 0;
  }

  /** Sets the bits of [start, start + count), a word at a time (a 1 MiB write allocates 256 chunks). */
  #setRange(start: number, count: number): void {
    for (let chunk = start, end = start + count; chunk < end; ) {
      const mask = wordMask(chunk, end);
      if ((this.#bits[chunk >>> 5]! & mask) !== 0) assert(false, 'allocating a chunk in use');
      this.#bits[chunk >>> 5]! |= mask;
      chunk += 32 - (chunk & 31);
    }
    this.#setCount += count;
  }

  #clearRange(start: number, count: number): void {
    assert(count > 0 && start >= 0 && start + count <= this.#highWater, 'freeing a chunk never allocated');
    this.#noRunOf = Infinity; // the freed chunks may make a run that a search missed before
    for (let chunk = start, end = start + count; chunk < end; ) {
      const mask = wordMask(chunk, end);
      if ((this.#bits[chunk >>> 5]! & mask) !== mask) assert(false, 'double free');
      this.#bits[chunk >>> 5]! &= ~mask;
      chunk += 32 - (chunk & 31);
    }
    this.#setCount -= count;
    // Free space that reaches the high-water mark lowers it, so the address space shrinks back.
    if (start + count === this.#highWater) {
      let top = start;
      while (top > 0 && !this.#isSet(top - 1)) top = (top & 31) === 0 && this.#bits[(top >>> 5) - 1] === 0 ? top - 32 : top - 1;
      this.#highWater = top;
      this.#cursor = Math.min(this.#cursor, top);
    }
  }

  #grow(chunks: number): void {
    const words = (chunks >>> 5) + 1;
    if (words <= this.#bits.length) return;
    const grown = new Uint32Array(Math.max(words, this.#bits.length * 2));
    grown.set(this.#bits);
    this.#bits = grown;
  }
}

/** The bits of `chunk`'s word from `chunk` up to `end` (exclusive) or the word's end, as a signed 32-bit mask. */
function wordMask(chunk: number, end: number): number {
  const bit = chunk & 31;
  const bits = Math.min(32 - bit, end - chunk);
  return bits === 32 ? -1 : (((1 << bits) - 1) << bit) | 0;
}

/** The index of the lowest set bit of a nonzero 32-bit value. */
function lowestBit(value: number): number {
  return 31 - Math.clz32(value & -value);
}
