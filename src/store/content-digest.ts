// The digest of a volume's or snapshot's whole content, from metadata alone: what a replication stream ends with
// (replication/stream-format.ts) and what the receiver checks against what it stored before the snapshot appears.
//
// sha256 over: a label, the size in bytes, then (virtual chunk u64 LE, CRC-32 u32 LE) for every chunk, in order,
// whose checksum is not that of a chunk of zeros. Holes and chunks of zeros are left out alike, so content that
// reads the same digests the same whether it is stored as a hole, as zeros written with NO_HOLE, or as data.
// Why this and not sha256 over the bytes: every chunk's CRC-32 is already in the metadata and was computed from
// the bytes stored (on a receiver, from the record's bytes as it checked them, before the store copied them into
// its own buffer: stream-format.ts; a copy that went wrong after that shows at the chunk's first read), so each side computes the digest in O(mapped chunks) without reading any data. A receiver
// of an incremental would otherwise reread the whole volume, the unchanged part included, to check one stream.
// The price, named: the digest is as strong as the per-chunk CRC-32 that every read already relies on; two
// different chunks with the same CRC at the same place go unseen (2^-32 per chunk for random damage; it is a
// check of what was stored, not a defence against an adversary, which the transport's TLS is for).
// The entries are gathered as 32-bit words (the u64 as its two halves) rather than through BigInt and Buffer's
// writers: a replication cycle digests its whole target snapshot on each side, and at 4 GiB (a million chunks) the
// per-entry BigInt made that about 150 ms of CPU in one event loop turn per cycle (now about 30, a quarter of it
// the sha256; BENCHMARKS.md, issue 14).
// Pure but for the event loop's turns it takes (ContentDigest.turn).
import { createHash } from 'node:crypto';
import os from 'node:os';
import { chunkSizeBytes, mapPageChunks } from '../core/limits.ts';
import { zeroChunkSum } from './checksum.ts';
import type { ChunkMap } from './chunk-map.ts';
import type { ChunkSums } from './chunk-sums.ts';

export const contentDigestBytes = 32;
const label = Buffer.from('chunkd-content-digest-v1\n', 'latin1');
/** Words per entry: virtual chunk low, virtual chunk high, CRC-32. */
const entryWords = 3;
const batchEntries = 4096;
const twoTo32 = 2 ** 32;
/** The words are hashed as the machine stores them; on a big-endian one they are swapped to little-endian first. */
const bigEndian = os.endianness() === 'BE';
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
  readonly #words = new Uint32Array(batchEntries * entryWords);
  readonly #bytes = Buffer.from(this.#words.buffer);
  /** Words of #words filled. */
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
    for (let i = 0; i < count; i++) this.addChunk(virtualChunk + i, sumOf(i));
    this.#sinceTurnChunks += Math.max(0, count);
  }

  /** One mapped chunk, after every chunk added before it. */
  addChunk(virtualChunk: number, sum: number): void {
    if (sum === zeroChunkSum || virtualChunk >= this.#chunkLimit) return;
    const words = this.#words;
    let used = this.#used;
    words[used++] = virtualChunk >>> 0;
    words[used++] = Math.floor(virtualChunk / twoTo32);
    words[used++] = sum;
    if (used === words.length) {
      this.#flush(used);
      used = 0;
    }
    this.#used = used;
  }

  /**
   * A map page's mapped chunks from virtual chunk `first`, in order: `slots` holds each chunk's physical chunk plus
   * one (0: a hole), `sums` the checksums by physical chunk. A method called a page at a time, rather than a loop
   * inside contentDigest's async walk: a replication cycle digests its target once, so that long loop ran in
   * on-stack-replaced code, which V8 compiled again at every cycle on both nodes (BENCHMARKS.md, issue 14).
   */
  addPage(first: number, slots: Float64Array, sums: Pick<ChunkSums, 'get'>): void {
    for (let slot = 0; slot < slots.length; slot++) {
      const physical = slots[slot]! - 1;
      if (physical >= 0) this.addChunk(first + slot, sums.get(physical));
    }
    this.#sinceTurnChunks += slots.length;
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
    this.#flush(this.#used);
    this.#used = 0;
    return this.#hash.digest();
  }

  #flush(words: number): void {
    const bytes = this.#bytes.subarray(0, words * 4);
    if (bigEndian) bytes.swap32();
    this.#hash.update(bytes);
  }
}

/**
 * The content digest of `map` over its first `sizeBytes`, given each physical chunk's recorded checksum; it lets
 * the event loop turn between slices, so a map changed meanwhile may or may not be seen (callers digest a snapshot,
 * or a volume only they write).
 */
export async function contentDigest(map: ChunkMap, sums: Pick<ChunkSums, 'get'>, sizeBytes: number): Promise<Buffer> {
  const digest = new ContentDigest(sizeBytes);
  // Page by page rather than through mappedRuns(): a volume written at random has runs of a chunk or two, and
  // an object per run was most of the walk.
  for (const [pageIndex, page] of map.pages()) {
    digest.addPage(pageIndex * mapPageChunks, page.slots, sums);
    const turn = digest.turn();
    if (turn !== null) await turn;
  }
  return digest.digest();
}

