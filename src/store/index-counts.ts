// A count per index (a physical chunk, a metadata page) for fsck's walk of the maps (paged-check.ts): blocks of
// 65,536 counts in typed arrays, allocated when first touched, as ChunkSums keeps checksums. A Map of counts took
// tens of bytes an entry and cannot hold more than 2^24 entries (V8's limit: it throws at entry 16,777,216), so a
// walk over 64 GiB of 4 KiB chunks in use failed; here an index costs 4 bytes where its block is touched and no
// count of entries is bounded but by memory. Pure: no I/O.

const blockIndexes = 65536;

export class IndexCounts {
  readonly #blocks: Array<Uint32Array | undefined> = [];
  #end = 0;
  #distinct = 0;

  /** Adds one to `index`'s count; returns the count before. */
  add(index: number): number {
    const blockIndex = Math.floor(index / blockIndexes);
    let block = this.#blocks[blockIndex];
    if (block === undefined) {
      block = new Uint32Array(blockIndexes);
      this.#blocks[blockIndex] = block;
    }
    const slot = index % blockIndexes;
    const before = block[slot]!;
    if (before === 0xffffffff) throw new RangeError(`count of ${index} past 2^32 - 1`);
    block[slot] = before + 1;
    if (before === 0) this.#distinct++;
    if (index >= this.#end) this.#end = index + 1;
    return before;
  }

  /** The count of `index` (0 where nothing was added). */
  get(index: number): number {
    return this.#blocks[Math.floor(index / blockIndexes)]?.[index % blockIndexes] ?? 0;
  }

  has(index: number): boolean {
    return this.get(index) !== 0;
  }

  /** One past the highest index counted (0 when none is). */
  get end(): number {
    return this.#end;
  }

  /** Each index with a count and its count, by index. */
  *entries(): Generator<[index: number, count: number]> {
    for (let b = 0; b < this.#blocks.length; b++) {
      const block = this.#blocks[b];
      if (block === undefined) continue;
      for (let slot = 0; slot < blockIndexes; slot++) if (block[slot] !== 0) yield [b * blockIndexes + slot, block[slot]!];
    }
  }

  [Symbol.iterator](): Generator<[index: number, count: number]> {
    return this.entries();
  }

  /** How many indexes have a count. */
  get size(): number {
    return this.#distinct;
  }
}
