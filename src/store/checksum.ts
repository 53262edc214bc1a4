// The checksum of one 4 KiB block: CRC-32 (IEEE), from native/crc32.c through koffi where it was built at install
// (native-crc.ts: a run's blocks in one call, 0.06 s/GiB in 4 KiB blocks here with VPCLMULQDQ), else from
// @node-rs/crc32, a native SIMD implementation (10.3 GB/s in 4 KiB blocks when measured first, against 1.8 GB/s
// for Node's built-in zlib.crc32 and 2.9 GB/s for the same package's crc32c; a call per block). Both give the
// same values, so pools move between them freely. 32 bits detect every burst error up to 32 bits and any other
// damage with probability 1 - 2^-32, which is what a per-block check on a local disk needs.
//
// Verifying many blocks at once: the CRC of a concatenation follows from the CRCs of its parts (zlib's
// crc32_combine), crc(A || B) = shift(crc(A)) ^ crc(B), where shift, for a B of one block, is a fixed linear map
// on 32-bit values. So a run of blocks is checked with one native call over all its bytes against the combination
// of their recorded checksums: 1 MiB in one call ran at 15 GB/s here, 256 calls of 4 KiB at 6-10 GB/s. Damage
// inside one block changes the run's CRC exactly when it would change that block's (shifting by x^n mod the
// polynomial is invertible), and a mismatch is then looked for block by block to name the block.
import { crc32 } from '@node-rs/crc32';
import { chunkSizeBytes } from '../core/limits.ts';
import { loadNativeCrc, nativeCrcLibrary, type NativeCrc } from './native-crc.ts';

/** The native CRC, null where @node-rs/crc32 computes them; undefined until the first checksum asks. */
let native: NativeCrc | null | undefined;

function nativeCrc(): NativeCrc | null {
  if (native === undefined) native = loadNativeCrc();
  return native;
}

/** What computes the checksums, for the node's log: loads the native CRC (and refuses a bad CHUNKD_CRC) now. */
export function checksumEngine(): string {
  const loaded = nativeCrc();
  if (loaded !== null) return `CRC-32 by ${nativeCrcLibrary} (${loaded.kernel} kernel)`;
  return process.env.CHUNKD_CRC === 'node-rs' ? 'CRC-32 by @node-rs/crc32 (CHUNKD_CRC=node-rs)' : `CRC-32 by @node-rs/crc32, a call per 4 KiB block (${nativeCrcLibrary} was not built: install a C compiler and run sh native/build.sh)`;
}

/** Whether checksums are native (one call for many blocks, blockChecksums); false where @node-rs/crc32 computes them. */
export function nativeChecksums(): boolean {
  return nativeCrc() !== null;
}

/** The checksum of one block's bytes (any length; the store passes whole 4 KiB chunks). */
export function blockChecksum(bytes: Uint8Array): number {
  const loaded = nativeCrc();
  return loaded !== null ? loaded.checksum(bytes) : crc32(bytes as Buffer) >>> 0;
}

/** The checksum of each of the `count` whole blocks at the start of `bytes`, into out[from..from + count). */
export function blockChecksums(bytes: Uint8Array, count: number, out: Uint32Array, from = 0): void {
  const loaded = nativeCrc();
  if (loaded !== null) {
    loaded.blocks(bytes, chunkSizeBytes, count, from === 0 ? out : out.subarray(from, from + count));
    return;
  }
  const views = count >= cachedBlockViewsMin ? blockViews(bytes, count) : null;
  for (let i = 0; i < count; i++) out[from + i] = crc32((views?.[i] ?? bytes.subarray(i * chunkSizeBytes, (i + 1) * chunkSizeBytes)) as Buffer) >>> 0;
}

/**
 * Without the native CRC, a large write's checksums take one view per 4 KiB chunk (@node-rs/crc32 takes a buffer,
 * no offset): 256 objects per MiB, 30 KB of the 49 KB the main thread allocated per 1 MiB NBD write, most of what
 * set the pace of the scavenges in the node's bounded young generation (bin/chunkd.js; BENCHMARKS.md, issue 19,
 * seventh pass). Large payloads come from pools and are reused (the shared buffers' large list, the connections'
 * buffer pools), so their chunks' views are made once and kept with their memory: a WeakMap keyed by the
 * ArrayBuffer, which holds them as long as that memory lives and no longer. Only for bytes that cover their whole
 * (fixed-length) ArrayBuffer: that is what pooled payloads are, and it bounds what is kept to one view per chunk of
 * memory that is in use anyway.
 */
const cachedBlockViewsMin = 32;
const blockViewCache = new WeakMap<ArrayBufferLike, Uint8Array[]>();

/** The views of the first `count` chunks of `bytes`, kept with its memory, or null when it is not a whole fixed-length buffer. */
function blockViews(bytes: Uint8Array, count: number): Uint8Array[] | null {
  const memory = bytes.buffer;
  if (bytes.byteOffset !== 0 || bytes.byteLength !== memory.byteLength || count * chunkSizeBytes > memory.byteLength) return null;
  if ((memory as { resizable?: boolean }).resizable === true || (memory as { growable?: boolean }).growable === true) return null;
  let views = blockViewCache.get(memory);
  if (views === undefined) {
    views = [];
    for (let offset = 0; offset + chunkSizeBytes <= memory.byteLength; offset += chunkSizeBytes) views.push(Buffer.from(memory, offset, chunkSizeBytes));
    blockViewCache.set(memory, views);
  }
  return views;
}

/** CRC-32 (IEEE, reflected: the polynomial 0xedb88320) of each byte value, for shortChecksum. */
const byteTable: Uint32Array = (() => {
  const table = new Uint32Array(256);
  for (let value = 0; value < 256; value++) {
    let crc = value;
    for (let bit = 0; bit < 8; bit++) crc = (crc & 1) !== 0 ? 0xedb88320 ^ (crc >>> 1) : crc >>> 1;
    table[value] = crc >>> 0;
  }
  return table;
})();

/**
 * blockChecksum of bytes[start..end) for a few bytes (a replication record's 16-byte head), computed here a byte at a
 * time: the native call costs about 0.16-0.2 µs whatever the length (it was a fifth of a 4 KiB record's checksum
 * work on each side of a stream), these 16 bytes about 0.02. The same value as blockChecksum's.
 */
export function shortChecksum(bytes: Uint8Array, start: number, end: number): number {
  let crc = 0xffffffff;
  for (let i = start; i < end; i++) crc = byteTable[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** The checksum of a chunk of zeros: what a hole reads as (@node-rs/crc32's: nothing native loads at import). */
export const zeroChunkSum = crc32(Buffer.alloc(chunkSizeBytes)) >>> 0;

/** The checksum of a run of bytes: blockChecksum of their concatenation (compare with combinedChecksum). */
export const runChecksum = blockChecksum;

/**
 * shift(v), the linear map above for one block of chunkSizeBytes, as four byte-indexed tables. It is read off the
 * CRC itself: continuing a CRC from state v over a block of zeros gives shift(v) ^ crc(zeros), for every v.
 */
const shiftTables: Uint32Array[] = (() => {
  const zeros = Buffer.alloc(chunkSizeBytes);
  const offset = crc32(zeros, 0) >>> 0;
  const basis = Array.from({ length: 32 }, (_, bit) => ((crc32(zeros, (1 << bit) >>> 0) >>> 0) ^ offset) >>> 0);
  return [0, 1, 2, 3].map((byte) => {
    const table = new Uint32Array(256);
    for (let value = 1; value < 256; value++) {
      let image = 0;
      for (let bit = 0; bit < 8; bit++) if ((value & (1 << bit)) !== 0) image ^= basis[byte * 8 + bit]!;
      table[value] = image >>> 0;
    }
    return table;
  });
})();

/**
 * The checksum of some bytes followed by `blockCount` whole blocks, from the bytes' checksum `head` and the blocks'
 * combined checksum `blocks` (combinedChecksum's): no byte is read again. A sender seals each record of a chunk it
 * has just read and verified against its recorded checksum this way (replication/stream-format.ts).
 */
export function appendedChecksum(head: number, blocks: number, blockCount: number): number {
  const [t0, t1, t2, t3] = shiftTables as [Uint32Array, Uint32Array, Uint32Array, Uint32Array];
  let crc = head >>> 0;
  for (let i = 0; i < blockCount; i++) crc = (t0[crc & 0xff]! ^ t1[(crc >>> 8) & 0xff]! ^ t2[(crc >>> 16) & 0xff]! ^ t3[crc >>> 24]!) >>> 0;
  return (crc ^ blocks) >>> 0;
}

/** The checksum of `count` consecutive blocks (chunkSizeBytes each) whose own checksums are sums[from..]. */
export function combinedChecksum(sums: Uint32Array, from: number, count: number): number {
  const [t0, t1, t2, t3] = shiftTables as [Uint32Array, Uint32Array, Uint32Array, Uint32Array];
  let crc = sums[from]!;
  for (let i = from + 1; i < from + count; i++) {
    crc = (t0[crc & 0xff]! ^ t1[(crc >>> 8) & 0xff]! ^ t2[(crc >>> 16) & 0xff]! ^ t3[crc >>> 24]! ^ sums[i]!) >>> 0;
  }
  return crc;
}
