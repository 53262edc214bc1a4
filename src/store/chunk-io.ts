// The data half of chunk storage: reads that verify checksums and writes that compute them, over whole 4 KiB
// chunks. Two engines implement it: InlineChunkIo runs on the calling thread (reads from the page cache right
// there, other I/O on libuv's pool or, for small writes, the chunk writer: right there, or on its thread: chunk-writer.ts),
// WorkerChunkIo (worker-io.ts) hands each request to a piscina worker that does the pread/pwrite and the
// checksums, so the event loop only speaks protocols. Control I/O (fdatasync,
// punch, zero ranges) stays with ChunkFiles on the main thread: it is rare and already off the event loop.
import { assert } from '../core/assert.ts';
import { chunkSizeBytes, chunksPerFile } from '../core/limits.ts';
import { settleAll } from '../core/settle.ts';
import { blockChecksum, blockChecksums, combinedChecksum, runChecksum } from './checksum.ts';
import type { ChunkFiles } from './chunk-files.ts';
import type { ChunkWriter, SmallWriteCounts } from './chunk-writer.ts';

/** The first chunk of a read whose bytes do not match their checksum. */
export interface Mismatch {
  /** Index of the chunk among those read, in plan order (see readChunks). */
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
  /** Small writes pwritten by the main thread itself or by the chunk writer's thread (chunk-writer.ts), where one runs. */
  smallWrites?: SmallWriteCounts;
}

export interface ChunkIo {
  /**
   * Reads runs of whole chunks into one buffer and checks each chunk against its checksum (unless `verify` is
   * false). `plan` holds (physical chunk, chunk count, chunk index in `target`) triples; `expected` the checksums
   * of all the chunks read, in plan order. One call per client request, however many runs it is made of. The
   * answer comes at once, not as a promise, when the read was done right here (every byte in the page cache):
   * a promise per layer of a 4 KiB read was a good part of its CPU cost at queue depth 32 (BENCHMARKS.md, issue 19).
   */
  readChunks(target: Buffer, plan: Float64Array, expected: Uint32Array, verify: boolean): Mismatch | null | Promise<Mismatch | null>;
  /**
   * Writes whole chunks from `physicalChunk` and returns the checksum of each: `sums` when the caller gives them
   * (taken from these bytes already, as a replication receiver's decoder does), else computed here.
   */
  writeSummed(physicalChunk: number, data: Buffer, sums?: Uint32Array): Promise<Uint32Array>;
  status(): IoEngineStatus;
  /** Waits for the I/O in flight, then stops; `force` stops at once (a simulated crash: nothing more may land). */
  close(options?: { force?: boolean }): Promise<void>;
}

/** The checksum of each whole chunk of `data`. */
export function chunkSums(data: Uint8Array): Uint32Array {
  assert(data.length % chunkSizeBytes === 0, 'checksums cover whole chunks');
  const sums = new Uint32Array(data.length / chunkSizeBytes);
  blockChecksums(data, sums.length, sums);
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

/**
 * `chunkCount` chunks of `target` from chunk `targetChunk`: `target` itself when that is all of it (a 4 KiB read's
 * one run), so that no view is made: a view cost 0.03-0.11 µs against 0.42-0.49 µs for a 4 KiB chunk's CRC.
 */
function planBytes<T extends Uint8Array>(target: T, targetChunk: number, chunkCount: number): T {
  const start = targetChunk * chunkSizeBytes;
  const end = start + chunkCount * chunkSizeBytes;
  return start === 0 && end === target.length ? target : (target.subarray(start, end) as T);
}

/**
 * The chunks of `plan` in `target`, verified in plan order: the first whose checksum differs, or null. Runs that
 * lie back to back in `target` (a range rewritten at random reads as many runs of a chunk or a few, one after
 * another) are checked as one stretch, with one CRC over its bytes against the combination of their chunks'
 * checksums (checksum.ts), and run by run, block by block, only when that fails: one native call per stretch
 * instead of one per run.
 */
export function firstPlanMismatch(target: Uint8Array, plan: Float64Array, expected: Uint32Array): Mismatch | null {
  let index = 0;
  let p = 0;
  while (p < plan.length) {
    // The stretch: plan entries p..end-1, each starting where the one before ends in the target.
    let count = plan[p + 1]!;
    let end = p + 3;
    while (end < plan.length && plan[end + 2]! === plan[p + 2]! + count) {
      count += plan[end + 1]!;
      end += 3;
    }
    const bytes = planBytes(target, plan[p + 2]!, count);
    if (count === 1) {
      // One chunk (a 4 KiB read): its own checksum, with no more views of it.
      const actual = blockChecksum(bytes);
      if (actual !== expected[index]) return { chunkIndex: index, expected: expected[index]!, actual };
      index += 1;
      p = end;
      continue;
    }
    if (runChecksum(bytes) === combinedChecksum(expected, index, count)) {
      index += count;
      p = end;
      continue;
    }
    for (; p < end; p += 3) {
      const runCount = plan[p + 1]!;
      const runStart = plan[p + 2]! * chunkSizeBytes;
      const mismatch = firstMismatch(target.subarray(runStart, runStart + runCount * chunkSizeBytes), expected.subarray(index, index + runCount));
      if (mismatch !== null) return { ...mismatch, chunkIndex: index + mismatch.chunkIndex };
      index += runCount;
    }
  }
  return null;
}

/** The most chunks of other runs a span of readCachedChunks reads over (and has read again): a 4 KiB copy costs less than a read call. */
const spanGapChunksMax = 4;

/**
 * The last plan entry of the span that starts at entry `p`: a range rewritten at random is runs of the data first
 * written there, each as far from its place in the target as the others and in one chunk file, with a few
 * rewritten chunks between them. Such runs are read with one call from the first to the last, over the few
 * chunks between them, which are then read again from their own runs. A span covers only target chunks that
 * runs of the plan cover (never a hole, which no run reads again), gaps of at most spanGapChunksMax chunks; `p`
 * itself when nothing follows that way.
 */
export function spanEnd(plan: Float64Array, p: number): number {
  const delta = plan[p]! - plan[p + 2]!;
  const file = Math.floor(plan[p]! / chunksPerFile);
  let last = p;
  let lastEnd = plan[p + 2]! + plan[p + 1]!;
  for (let q = p + 3; q < plan.length; q += 3) {
    if (plan[q + 2]! !== plan[q - 1]! + plan[q - 2]!) break; // a hole before entry q
    const targetChunk = plan[q + 2]!;
    if (targetChunk - lastEnd > spanGapChunksMax) break;
    if (plan[q]! - targetChunk !== delta) continue;
    if (Math.floor((plan[q]! + plan[q + 1]! - 1) / chunksPerFile) !== file) break;
    last = q;
    lastEnd = targetChunk + plan[q + 1]!;
  }
  return last;
}

/**
 * Reads single chunks scattered over the chunk files, each into its own 4 KiB target, from the page cache only, in
 * order of physical place: each stretch of chunks that lie back to back in one chunk file (at most
 * scratch.length bytes) is read with one call into `scratch` and copied out to its chunks' targets, instead of one
 * read call per chunk. A replication cycle's changed chunks were written close together in time, so they lie close
 * together in the chunk files though far apart in the volume, and a sender reads them in volume order (BENCHMARKS.md,
 * issue 14). Nothing is verified here. Returns a flag per chunk: 1 when read, 0 when not (a byte not in the page
 * cache, or its file not open yet: the caller reads it another way).
 */
export function readCachedGathered(files: Pick<ChunkFiles, 'readCached'>, physical: Float64Array, targets: readonly Buffer[], scratch: Buffer): Uint8Array {
  const count = physical.length;
  const done = new Uint8Array(count);
  const order = new Uint32Array(count);
  for (let i = 0; i < count; i++) order[i] = i;
  order.sort((a, b) => physical[a]! - physical[b]!);
  const stretchMax = Math.max(1, Math.floor(scratch.length / chunkSizeBytes));
  let k = 0;
  while (k < count) {
    const first = physical[order[k]!]!;
    const file = Math.floor(first / chunksPerFile);
    let end = k + 1;
    while (end < count && end - k < stretchMax && physical[order[end]!]! === first + (end - k) && Math.floor(physical[order[end]!]! / chunksPerFile) === file) end += 1;
    if (end - k === 1) {
      if (files.readCached(first, 0, targets[order[k]!]!)) done[order[k]!] = 1;
    } else if (files.readCached(first, 0, scratch.subarray(0, (end - k) * chunkSizeBytes))) {
      for (let j = k; j < end; j++) {
        scratch.copy(targets[order[j]!]!, 0, (j - k) * chunkSizeBytes, (j - k + 1) * chunkSizeBytes);
        done[order[j]!] = 1;
      }
    }
    k = end;
  }
  return done;
}

/** The plan entry (physical chunk, and chunk index in the target) of the `index`th chunk read. */
export function locateInPlan(plan: Float64Array, index: number): { physicalChunk: number; targetChunk: number } {
  let remaining = index;
  for (let p = 0; p < plan.length; p += 3) {
    const count = plan[p + 1]!;
    if (remaining < count) return { physicalChunk: plan[p]! + remaining, targetChunk: plan[p + 2]! + remaining };
    remaining -= count;
  }
  assert(false, 'a chunk index past the plan');
}

/** Chunk I/O and checksums on the calling thread. */
export class InlineChunkIo implements ChunkIo {
  readonly #files: ChunkFiles;
  readonly #writer: ChunkWriter | null;

  /** `writer`: takes small writes whose bytes are in its slab, inline or on its thread (chunk-writer.ts); others go to libuv's pool. */
  constructor(files: ChunkFiles, writer: ChunkWriter | null = null) {
    this.#files = files;
    this.#writer = writer;
  }

  readChunks(target: Buffer, plan: Float64Array, expected: Uint32Array, verify: boolean): Mismatch | null | Promise<Mismatch | null> {
    // The usual case first, with no promise at all: every byte in the page cache.
    const cached = this.readCachedChunks(target, plan, expected, verify);
    if (cached !== undefined) return cached;
    return this.#readChunksAsync(target, plan, expected, verify);
  }

  async #readChunksAsync(target: Buffer, plan: Float64Array, expected: Uint32Array, verify: boolean): Promise<Mismatch | null> {
    const reads: Array<Promise<void>> = [];
    for (let p = 0; p < plan.length; p += 3) {
      const start = plan[p + 2]! * chunkSizeBytes;
      reads.push(this.#files.read(plan[p]!, 0, target.subarray(start, start + plan[p + 1]! * chunkSizeBytes)));
    }
    // Every read settles before this returns, so none still writes into the caller's buffer after a failure.
    await settleAll(reads);
    return verify ? firstPlanMismatch(target, plan, expected) : null;
  }

  /**
   * readChunks right here if the page cache holds every byte of the plan and each chunk file is open already: the
   * first mismatch or null, as readChunks gives; undefined when some byte is not cached (the target is then partly
   * filled, and the caller reads it all again another way).
   */
  readCachedChunks(target: Buffer, plan: Float64Array, expected: Uint32Array, verify: boolean): Mismatch | null | undefined {
    let p = 0;
    while (p < plan.length) {
      const last = spanEnd(plan, p);
      if (last > p) {
        // One read for the span, the stale bytes in its gaps then read over by their own runs (below).
        const start = plan[p + 2]! * chunkSizeBytes;
        const end = (plan[last + 2]! + plan[last + 1]!) * chunkSizeBytes;
        if (this.#files.readCached(plan[p]!, 0, target.subarray(start, end))) {
          const delta = plan[p]! - plan[p + 2]!;
          for (let q = p + 3; q < last; q += 3) if (plan[q]! - plan[q + 2]! !== delta && !this.#readRunCached(target, plan, q)) return undefined;
          p = last + 3;
          continue;
        }
      }
      for (; p <= last; p += 3) if (!this.#readRunCached(target, plan, p)) return undefined;
    }
    return verify ? firstPlanMismatch(target, plan, expected) : null;
  }

  #readRunCached(target: Buffer, plan: Float64Array, p: number): boolean {
    return this.#files.readCached(plan[p]!, 0, planBytes(target, plan[p + 2]!, plan[p + 1]!));
  }

  writeSummed(physicalChunk: number, data: Buffer, given?: Uint32Array): Promise<Uint32Array> {
    const sums = given ?? chunkSums(data);
    return this.#files.write(physicalChunk, 0, data, this.#writer).then(() => sums);
  }

  status(): IoEngineStatus {
    return { engine: 'inline', workers: [], queued: 0, workerRestarts: 0 };
  }

  async close(): Promise<void> {}
}
