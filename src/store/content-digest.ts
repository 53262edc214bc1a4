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
// Pure.
import { createHash } from 'node:crypto';
import { chunkSizeBytes } from '../core/limits.ts';
import { blockChecksum, zeroChunkSum } from './checksum.ts';
import type { ChunkMap } from './chunk-map.ts';

export const contentDigestBytes = 32;
const label = Buffer.from('chunkd-content-digest-v1\n', 'latin1');
const entryBytes = 12;
const batchEntries = 4096;

/** The content digest of `map` over its first `sizeBytes`, given each physical chunk's recorded checksum. */
export function contentDigest(map: ChunkMap, sumOf: (physicalChunk: number) => number, sizeBytes: number): Buffer {
  const hash = createHash('sha256');
  hash.update(label);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(sizeBytes));
  hash.update(size);
  const chunkLimit = sizeBytes / chunkSizeBytes;
  const batch = Buffer.allocUnsafe(batchEntries * entryBytes);
  let used = 0;
  for (const run of map.mappedRuns()) {
    for (let i = 0; i < run.chunkCount; i++) {
      const virtualChunk = run.virtualChunk + i;
      if (virtualChunk >= chunkLimit) break;
      const sum = sumOf(run.physicalChunk + i);
      if (sum === zeroChunkSum) continue;
      batch.writeBigUInt64LE(BigInt(virtualChunk), used);
      batch.writeUInt32LE(sum, used + 8);
      used += entryBytes;
      if (used === batch.length) {
        hash.update(batch);
        used = 0;
      }
    }
  }
  hash.update(batch.subarray(0, used));
  return hash.digest();
}
