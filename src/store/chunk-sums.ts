// The checksum of every physical chunk that a map names (checksum.ts), in blocks of 65,536 chunks allocated when
// first touched. A checksum belongs to the physical chunk, not to a map: a snapshot, a clone and their volume
// that share a chunk share its checksum. Chunks are never overwritten in place (volume.ts), so a chunk's checksum
// is set once, by the map record that names it, and the metadata that names a chunk always carries the checksum
// of the data written there. Pure: no I/O.
import { assert } from '../core/assert.ts';

const blockChunks = 65536;

export class ChunkSums {
  /**
   * By block index: an array, not a Map: a map walk over a volume written at random (a replication cycle's content
   * digest) goes from block to block at almost every chunk, and a Map lookup each was a good part of that walk.
   */
  readonly #blocks: Array<Uint32Array | undefined> = [];
  /** The block read last: a walk of a map asks for hundreds of chunks of one block in a row (saves a Map lookup each). */
  #lastIndex = -1;
  #last: Uint32Array | undefined;

  /** The checksum recorded for `physicalChunk` (0 where none was; only mapped chunks are ever asked for). */
  get(physicalChunk: number): number {
    const blockIndex = Math.floor(physicalChunk / blockChunks);
    if (blockIndex !== this.#lastIndex) {
      this.#lastIndex = blockIndex;
      this.#last = this.#blocks[blockIndex];
    }
    return this.#last?.[physicalChunk % blockChunks] ?? 0;
  }

  /** Records the checksums of `sums.length` consecutive chunks from `physicalChunk`. */
  setRun(physicalChunk: number, sums: ArrayLike<number>): void {
    assert(physicalChunk >= 0);
    let i = 0;
    while (i < sums.length) {
      // One block at a time: a lookup per block, not per chunk.
      const chunk = physicalChunk + i;
      const blockIndex = Math.floor(chunk / blockChunks);
      let block = this.#blocks[blockIndex];
      if (block === undefined) {
        block = new Uint32Array(blockChunks);
        this.#blocks[blockIndex] = block;
        if (blockIndex === this.#lastIndex) this.#last = block;
      }
      const slot = chunk % blockChunks;
      const count = Math.min(sums.length - i, blockChunks - slot);
      if (sums instanceof Uint32Array) block.set(sums.subarray(i, i + count), slot);
      else for (let k = 0; k < count; k++) block[slot + k] = sums[i + k]!;
      i += count;
    }
  }
}
