// Reference counts of physical chunks: how many map pages name each chunk (see chunk-map.ts). Kept in memory
// only and rebuilt from the maps at load, so they can never disagree with the metadata on disk. Counts live in
// blocks of 65,536 chunks (256 MiB of pool space each), allocated when first touched. Pure: no I/O.
import { assert } from '../core/assert.ts';
import type { ChunkRefs } from './chunk-map.ts';

const blockChunks = 65536;

export class ChunkRefcounts implements ChunkRefs {
  readonly #blocks = new Map<number, Uint32Array>();
  /** The block used last: a write touches hundreds of chunks of one block in a row (saves a Map lookup each). */
  #lastIndex = -1;
  #last: Uint32Array | undefined;
  /** Called for each run of chunks whose counts fall to zero (a chunk alone from `decrement`), in order. */
  onFree: (start: number, chunkCount: number) => void;

  constructor(onFree: (start: number, chunkCount: number) => void) {
    this.onFree = onFree;
  }

  get(physicalChunk: number): number {
    return this.#block(Math.floor(physicalChunk / blockChunks))?.[physicalChunk % blockChunks] ?? 0;
  }

  increment(physicalChunk: number): void {
    this.#blockMade(Math.floor(physicalChunk / blockChunks))[physicalChunk % blockChunks]! += 1;
  }

  decrement(physicalChunk: number): void {
    const block = this.#block(Math.floor(physicalChunk / blockChunks));
    const slot = physicalChunk % blockChunks;
    // The message is built only on failure: this runs for every chunk of every page a snapshot's removal lets go of.
    if (block === undefined || block[slot]! === 0) assert(false, `chunk ${physicalChunk} released more often than referenced`);
    block[slot]! -= 1;
    if (block[slot] === 0) this.onFree(physicalChunk, 1);
  }

  /** `increment` of each chunk of [start, start + chunkCount): a block at a time (a large write maps hundreds). */
  incrementRun(start: number, chunkCount: number): void {
    const end = start + chunkCount;
    for (let chunk = start; chunk < end; ) {
      const blockIndex = Math.floor(chunk / blockChunks);
      const block = this.#blockMade(blockIndex);
      const blockStart = blockIndex * blockChunks;
      // Slots as small integers, whatever the chunk numbers are (they may come from a Float64Array).
      const stop = Math.min(blockChunks, end - blockStart) | 0;
      for (let slot = (chunk - blockStart) | 0; slot < stop; slot++) block[slot]! += 1;
      chunk = blockStart + stop;
    }
  }

  /** `decrement` of each chunk of [start, start + chunkCount): `onFree` once for each run of them that falls to zero. */
  decrementRun(start: number, chunkCount: number): void {
    // The run of freed chunks being gathered: [freeStart, freeEnd).
    let freeStart = -1;
    let freeEnd = -1;
    const end = start + chunkCount;
    for (let chunk = start; chunk < end; ) {
      const blockIndex = Math.floor(chunk / blockChunks);
      const block = this.#block(blockIndex);
      if (block === undefined) assert(false, `chunk ${chunk} released more often than referenced`);
      const blockStart = blockIndex * blockChunks;
      const stop = Math.min(blockChunks, end - blockStart) | 0;
      for (let slot = (chunk - blockStart) | 0; slot < stop; slot++) {
        const count = block[slot]!;
        if (count === 0) assert(false, `chunk ${blockStart + slot} released more often than referenced`);
        block[slot] = count - 1;
        if (count !== 1) continue;
        const freed = blockStart + slot;
        if (freed === freeEnd) freeEnd += 1;
        else {
          if (freeEnd > freeStart) this.onFree(freeStart, freeEnd - freeStart);
          freeStart = freed;
          freeEnd = freed + 1;
        }
      }
      chunk = blockStart + stop;
    }
    if (freeEnd > freeStart) this.onFree(freeStart, freeEnd - freeStart);
  }

  /**
   * `increment` of each chunk a map page's slots name (a slot holds its chunk + 1; 0 is a hole): a page's copy on
   * write (chunk-map.ts) in one call. Chunk by chunk, through the interface, a copied page of 512 chunks cost about 20 µs: 10 ms for a 1 GiB volume written at random, after each
   * snapshot a replication cycle takes, on both nodes (BENCHMARKS.md, issue 14).
   */
  incrementSlots(slots: Float64Array): void {
    this.#changeSlots(slots, 1);
  }

  /**
   * `decrement` of each chunk a map page's slots name (the last holder of a page letting go of it: releasePage), in
   * one call: `onFree` once for each run of chunks, in slot order, that falls to zero.
   */
  decrementSlots(slots: Float64Array): void {
    this.#changeSlots(slots, -1);
  }

  /** incrementSlots (`by` 1) or decrementSlots (-1): a block looked up only when the chunks move to another. */
  #changeSlots(slots: Float64Array, by: 1 | -1): void {
    let blockIndex = -1;
    let block: Uint32Array | undefined;
    let freeStart = -1;
    let freeEnd = -1;
    for (let i = 0; i < slots.length; i++) {
      const slot = slots[i]!;
      if (slot === 0) continue;
      const chunk = slot - 1;
      const index = Math.floor(chunk / blockChunks);
      if (index !== blockIndex) {
        blockIndex = index;
        block = by > 0 ? this.#blockMade(index) : this.#block(index);
      }
      const at = chunk - index * blockChunks;
      const count = block?.[at] ?? 0;
      if (by > 0) {
        block![at] = count + 1;
        continue;
      }
      if (count === 0) assert(false, `chunk ${chunk} released more often than referenced`);
      block![at] = count - 1;
      if (count !== 1) continue;
      if (chunk === freeEnd) freeEnd += 1;
      else {
        if (freeEnd > freeStart) this.onFree(freeStart, freeEnd - freeStart);
        freeStart = chunk;
        freeEnd = chunk + 1;
      }
    }
    if (freeEnd > freeStart) this.onFree(freeStart, freeEnd - freeStart);
  }

  /** The block `blockIndex`, made (all zeros) when missing. */
  #blockMade(blockIndex: number): Uint32Array {
    let block = this.#block(blockIndex);
    if (block === undefined) {
      block = new Uint32Array(blockChunks);
      this.#blocks.set(blockIndex, block);
      this.#last = block;
    }
    return block;
  }

  #block(blockIndex: number): Uint32Array | undefined {
    if (blockIndex !== this.#lastIndex) {
      this.#lastIndex = blockIndex;
      this.#last = this.#blocks.get(blockIndex);
    }
    return this.#last;
  }

  /** One past the highest chunk with a nonzero count (0 when none has). */
  end(): number {
    let end = 0;
    for (const run of this.usedRuns()) end = run.physicalChunk + run.chunkCount;
    return end;
  }

  /** Runs of chunks with a nonzero count, in order (to rebuild the allocator at load). */
  *usedRuns(): Generator<{ physicalChunk: number; chunkCount: number }> {
    const blockIndexes = [...this.#blocks.keys()].sort((a, b) => a - b);
    let pending: { physicalChunk: number; chunkCount: number } | undefined;
    for (const blockIndex of blockIndexes) {
      const block = this.#blocks.get(blockIndex)!;
      for (let slot = 0; slot < blockChunks; slot++) {
        if (block[slot] === 0) continue;
        const chunk = blockIndex * blockChunks + slot;
        if (pending !== undefined && pending.physicalChunk + pending.chunkCount === chunk) {
          pending.chunkCount += 1;
          continue;
        }
        if (pending !== undefined) yield pending;
        pending = { physicalChunk: chunk, chunkCount: 1 };
      }
    }
    if (pending !== undefined) yield pending;
  }
}
