// Physical chunk allocation for the pool. Free space is a sorted list of free extents below a high-water mark;
// above the mark every chunk is free. Allocation is next-fit: the first free extent at or after a cursor that
// holds the whole request, else the chunks above the high-water mark, so that one write gets one contiguous run
// and one pwrite. Frees are deferred: a freed chunk may still be named by the metadata on disk until the commit
// that records the free is durable, so it is reused only after `takeDeferred` and `releaseTaken` (else a crash could show one
// volume another's data). Pure: no I/O.
// Known weakness: a request larger than every free extent goes above the mark even when the free total would
// hold it, so heavy fragmentation grows the files' address space (not their allocated space: holes are punched).
import { assert } from '../core/assert.ts';

export interface FreeExtent {
  start: number;
  count: number;
}

export class ChunkAllocator {
  #free: FreeExtent[] = [];
  #highWater = 0;
  #cursor = 0;
  #deferred: FreeExtent[] = [];
  /** Deferred frees claimed by a commit in progress (the first ones). */
  #sealedCount = 0;
  #usedCount = 0;

  /** Builds the allocator from every used run (from the metadata at load); overlapping runs are an error. */
  static fromUsed(runs: Iterable<{ physicalChunk: number; chunkCount: number }>): ChunkAllocator {
    const sorted = [...runs].map((r) => ({ start: r.physicalChunk, count: r.chunkCount })).sort((a, b) => a.start - b.start);
    const allocator = new ChunkAllocator();
    let next = 0;
    for (const run of sorted) {
      if (run.start < next) throw new RangeError(`physical chunk ${run.start} is used twice`);
      if (run.start > next) allocator.#free.push({ start: next, count: run.start - next });
      next = run.start + run.count;
      allocator.#usedCount += run.count;
    }
    allocator.#highWater = next;
    return allocator;
  }

  get highWater(): number {
    return this.#highWater;
  }

  get usedCount(): number {
    return this.#usedCount;
  }

  get deferredCount(): number {
    return this.#deferred.reduce((sum, e) => sum + e.count, 0);
  }

  /** Free extents below the high-water mark (for punching leaked space at load). */
  freeExtents(): ReadonlyArray<Readonly<FreeExtent>> {
    return this.#free;
  }

  /** Returns the first of `chunkCount` consecutive physical chunks now owned by the caller. */
  allocate(chunkCount: number): number {
    assert(Number.isInteger(chunkCount) && chunkCount > 0);
    this.#usedCount += chunkCount;
    const index = this.#findFit(chunkCount);
    if (index < 0) {
      const start = this.#highWater;
      this.#highWater += chunkCount;
      return start;
    }
    const extent = this.#free[index]!;
    const start = extent.start;
    extent.start += chunkCount;
    extent.count -= chunkCount;
    if (extent.count === 0) this.#free.splice(index, 1);
    this.#cursor = start + chunkCount;
    return start;
  }

  /** Gives back chunks that no committed metadata names (a failed write): reusable at once. */
  release(start: number, chunkCount: number): void {
    this.#usedCount -= chunkCount;
    this.#insertFree(start, chunkCount);
  }

  /** Gives back chunks that committed metadata may still name: reusable only after the commit (see `takeDeferred`). */
  freeDeferred(start: number, chunkCount: number): void {
    assert(chunkCount > 0);
    this.#usedCount -= chunkCount;
    const last = this.#deferred[this.#deferred.length - 1];
    // Merge with the previous free only if no commit has claimed it yet.
    if (last !== undefined && this.#deferred.length > this.#sealedCount && last.start + last.count === start) last.count += chunkCount;
    else this.#deferred.push({ start, count: chunkCount });
  }

  /** Marks the deferred frees a commit is about to make durable; pass the result to `takeDeferred` after it. */
  deferredMark(): number {
    this.#sealedCount = this.#deferred.length;
    return this.#sealedCount;
  }

  /** Takes the first `mark` deferred frees, now recorded durably; the caller punches them, then `releaseTaken`. */
  takeDeferred(mark: number): FreeExtent[] {
    this.#sealedCount -= mark;
    return this.#deferred.splice(0, mark);
  }

  /** Makes extents from `takeDeferred` reusable. */
  releaseTaken(extents: readonly FreeExtent[]): void {
    for (const extent of extents) this.#insertFree(extent.start, extent.count);
  }

  #findFit(chunkCount: number): number {
    const free = this.#free;
    if (free.length === 0) return -1;
    let first = lowerBound(free, this.#cursor);
    for (let pass = 0; pass < 2; pass++) {
      const end = pass === 0 ? free.length : Math.min(first, free.length);
      for (let i = pass === 0 ? first : 0; i < end; i++) if (free[i]!.count >= chunkCount) return i;
      first = free.length;
    }
    return -1;
  }

  #insertFree(start: number, count: number): void {
    assert(count > 0 && start >= 0 && start + count <= this.#highWater, 'freeing a chunk never allocated');
    const free = this.#free;
    const index = lowerBound(free, start);
    const before = free[index - 1];
    const after = free[index];
    assert(before === undefined || before.start + before.count <= start, 'double free');
    assert(after === undefined || start + count <= after.start, 'double free');
    if (before !== undefined && before.start + before.count === start) {
      before.count += count;
      if (after !== undefined && start + count === after.start) {
        before.count += after.count;
        free.splice(index, 1);
      }
    } else if (after !== undefined && start + count === after.start) {
      after.start = start;
      after.count += count;
    } else {
      free.splice(index, 0, { start, count });
    }
    // Free space that reaches the high-water mark lowers it, so the address space shrinks back.
    const last = free[free.length - 1];
    if (last !== undefined && last.start + last.count === this.#highWater) {
      this.#highWater = last.start;
      free.pop();
    }
  }
}

/** Index of the first extent whose start is >= `chunk`. */
function lowerBound(free: FreeExtent[], chunk: number): number {
  let low = 0;
  let high = free.length;
  while (low < high) {
    const mid = (low + high) >>> 1;
    if (free[mid]!.start < chunk) low = mid + 1;
    else high = mid;
  }
  return low;
}
