// The data half of chunk storage: reads that verify checksums and writes that compute them, over whole 4 KiB
// chunks. Two engines implement it: InlineChunkIo runs on the calling thread (reads from the page cache right
// there, other I/O on libuv's pool), WorkerChunkIo (worker-io.ts) hands each request to a piscina worker that
// does the pread/pwrite and the checksums, so the event loop only speaks protocols. Control I/O (fdatasync,
// punch, zero ranges) stays with ChunkFiles on the main thread: it is rare and already off the event loop.
import { assert } from '../core/assert.ts';
import { chunkSizeBytes } from '../core/limits.ts';
import { blockChecksum } from './checksum.ts';
import type { ChunkFiles } from './chunk-files.ts';

/** The first chunk of a read whose bytes do not match their checksum. */
export interface Mismatch {
  /** Index of the chunk within the read (0 = the first chunk read). */
  chunkIndex: number;
  expected: number;
  actual: number;
}

/** Per-engine load, for `chunkd status`. */
export interface IoEngineStatus {
  engine: 'inline' | 'workers';
  workers: Array<{ id: number; inFlight: number }>;
  queued: number;
  workerRestarts: number;
}

export interface ChunkIo {
  /** Reads whole chunks from `physicalChunk` into `target` and checks each against `expected` (skipped when `verify` is false). */
  readVerified(physicalChunk: number, target: Buffer, expected: Uint32Array, verify: boolean): Promise<Mismatch | null>;
  /** Writes whole chunks from `physicalChunk` and returns the checksum of each. */
  writeSummed(physicalChunk: number, data: Buffer): Promise<Uint32Array>;
  status(): IoEngineStatus;
  close(): Promise<void>;
}

/** The checksum of each whole chunk of `data`. */
export function chunkSums(data: Uint8Array): Uint32Array {
  assert(data.length % chunkSizeBytes === 0, 'checksums cover whole chunks');
  const sums = new Uint32Array(data.length / chunkSizeBytes);
  for (let i = 0; i < sums.length; i++) sums[i] = blockChecksum(data.subarray(i * chunkSizeBytes, (i + 1) * chunkSizeBytes));
  return sums;
}

/** The first chunk of `data` whose checksum differs from `expected`, or null. */
export function firstMismatch(data: Uint8Array, expected: Uint32Array): Mismatch | null {
  assert(data.length === expected.length * chunkSizeBytes);
  for (let i = 0; i < expected.length; i++) {
    const actual = blockChecksum(data.subarray(i * chunkSizeBytes, (i + 1) * chunkSizeBytes));
    if (actual !== expected[i]) return { chunkIndex: i, expected: expected[i]!, actual };
  }
  return null;
}

/** Chunk I/O and checksums on the calling thread. */
export class InlineChunkIo implements ChunkIo {
  readonly #files: ChunkFiles;

  constructor(files: ChunkFiles) {
    this.#files = files;
  }

  async readVerified(physicalChunk: number, target: Buffer, expected: Uint32Array, verify: boolean): Promise<Mismatch | null> {
    await this.#files.read(physicalChunk, 0, target);
    return verify ? firstMismatch(target, expected) : null;
  }

  async writeSummed(physicalChunk: number, data: Buffer): Promise<Uint32Array> {
    const sums = chunkSums(data);
    await this.#files.write(physicalChunk, 0, data);
    return sums;
  }

  status(): IoEngineStatus {
    return { engine: 'inline', workers: [], queued: 0, workerRestarts: 0 };
  }

  async close(): Promise<void> {}
}
