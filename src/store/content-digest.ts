// The digest of a volume's or snapshot's whole content, from metadata alone: what a replication stream ends with
// (replication/stream-format.ts) and what the receiver checks against what it stored before the snapshot appears.
//
// sha256 over: a label, the size in bytes, then (virtual chunk u64 LE, CRC-32 u32 LE) for every chunk, in order,
// whose checksum is not that of a chunk of zeros. Holes and chunks of zeros are left out alike, so content that
// reads the same digests the same whether it is stored as a hole, as zeros written with NO_HOLE, or as data.
// Why this and not sha256 over the bytes: every chunk's CRC-32 is already in the metadata and was computed from
// the bytes stored, so each side computes the digest in O(mapped chunks) without reading any data. A receiver
// of an incremental would otherwise reread the whole volume, the unchanged part included, to check one stream.
// The price, named: the digest is as strong as the per-chunk CRC-32 that every read already relies on; two
// different chunks with the same CRC at the same place go unseen (2^-32 per chunk for random damage; it is a
// check of what was stored, not a defence against an adversary, which the transport's TLS is for).
// Pure but for the event loop's turns it takes (ContentDigest.turn).
import { createHash } from 'node:crypto';
import { chunkSizeBytes } from '../core/limits.ts';
import { blockChecksum, zeroChunkSum } from './checksum.ts';
import type { ChunkMap } from './chunk-map.ts';

export const contentDigestBytes = 32;
const label = Buffer.from('chunkd-content-digest-v1\n', 'latin1');
const entryBytes = 12;
const batchEntries = 4096;
/** Chunks digested between two turns of the event loop: about 2 ms of CPU, so a digest never holds a stream's I/O long. */
const sliceChunks = 65_536;

/**
 * The digest built a run at a time, in order of virtual chunk: `add` each mapped run (holes may be left out), then
 * `digest`. The same value whichever catalog gives the runs (a ChunkMap's with sums by physical chunk, or a paged
 * map's leaves, which hold their sums).
 */
export class ContentDigest {
  readonly #hash = createHash('sha256');
  readonly #chunkLimit: number;
  readonly #batch = Buffer.allocUnsafe(batchEntries * entryBytes);
  // The entries are written through a DataView, the u64 as two u32 halves: a BigInt per chunk (writeBigUInt64LE)
  // made the digest of a 4 GiB volume cost 130 ms of CPU instead of 35, on both sides of every stream.
  readonly #view = new DataView(this.#batch.buffer, this.#batch.byteOffset, this.#batch.byteLength);
  #used = 0;
  #sinceTurnChunks = 0;

  constructor(sizeBytes: number) {
    this.#hash.update(label);
    const size = Buffer.alloc(8);
    size.writeBigUInt64LE(BigInt(sizeBytes));
    this.#hash.update(size);
    this.#chunkLimit = sizeBytes / chunkSizeBytes;
  }

  /** A mapped run of chunks from `virtualChunk`, the checksum of its `i`th chunk `sumOf(i)`; runs come in order. */
  add(virtualChunk: number, chunkCount: number, sumOf: (index: number) => number): void {
    const count = Math.min(chunkCount, this.#chunkLimit - virtualChunk);
    this.#sinceTurnChunks += Math.max(0, count);
    const view = this.#view;
    for (let i = 0; i < count; i++) {
      const sum = sumOf(i);
      if (sum === zeroChunkSum) continue;
      const chunk = virtualChunk + i;
      view.setUint32(this.#used, chunk % 0x1_0000_0000, true);
      view.setUint32(this.#used + 4, Math.floor(chunk / 0x1_0000_0000), true);
      view.setUint32(this.#used + 8, sum, true);
      this.#used += entryBytes;
      if (this.#used === this.#batch.length) {
        this.#hash.update(this.#batch);
        this.#used = 0;
      }
    }
  }

  /**
   * Once a slice's worth of chunks was added since the last turn, a promise of the event loop's next turn (await
   * it before the next `add`); null before. A 4 GiB volume's digest is 35 ms of CPU at best and far more on a busy
   * machine: in one piece it stalled the stream it ends (the sender's socket writes, the receiver's last replies).
   */
  turn(): Promise<void> | null {
    if (this.#sinceTurnChunks < sliceChunks) return null;
    this.#sinceTurnChunks = 0;
    return new Promise((resolve) => setImmediate(resolve));
  }

  digest(): Buffer {
    this.#hash.update(this.#batch.subarray(0, this.#used));
    return this.#hash.digest();
  }
}

/**
 * The content digest of `map` over its first `sizeBytes`, given each physical chunk's recorded checksum; it lets
 * the event loop turn between slices, so a map changed meanwhile may or may not be seen (callers digest a snapshot,
 * or a volume only they write).
 */
export async function contentDigest(map: ChunkMap, sumOf: (physicalChunk: number) => number, sizeBytes: number): Promise<Buffer> {
  const digest = new ContentDigest(sizeBytes);
  for (const run of map.mappedRuns()) {
    digest.add(run.virtualChunk, run.chunkCount, (i) => sumOf(run.physicalChunk + i));
    const turn = digest.turn();
    if (turn !== null) await turn;
  }
  return digest.digest();
}
