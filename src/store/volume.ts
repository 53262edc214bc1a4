// Volumes and snapshots as BlockDevices. A volume maps byte ranges to chunk runs and runs the chunk I/O; each
// request holds its chunk range in the volume's RangeLock for its whole life (writes exclusively), which gives
// DESIGN.md's per-block ordering and lets the rest of the path assume no one else changes those map entries.
//
// Writes: a chunk the volume owns alone (its page unshared, its reference count 1) is overwritten in place: no
// metadata change, no copy. A hole, or a chunk a snapshot shares, gets a fresh contiguous physical run (copy-on-
// write at 4 KiB: only the partly covered first and last chunks are read to fill in), written whole, and only
// after the data is written is the mapping recorded, so metadata never names a chunk whose data was not written
// first. Trims unmap whole chunks (their space is punched out once the unmap is committed) and zero the partly
// covered ends. A snapshot device reads through the snapshot's frozen map and refuses nothing itself: the NBD
// edge answers EPERM for writes to a read-only export before they reach it.
import { assert } from '../core/assert.ts';
import type { BlockDevice, Extent, WriteOptions, ZeroOptions } from '../core/block-device.ts';
import { fromSystemError } from '../core/errors.ts';
import { blockStatusExtentsMax, chunkSizeBytes } from '../core/limits.ts';
import type { ChunkAllocator } from './allocator.ts';
import type { ChunkMap, ChunkRun } from './chunk-map.ts';
import type { ChunkFiles } from './chunk-files.ts';
import type { ChunkRefcounts } from './chunk-refcounts.ts';
import type { MetaRecord, SnapshotMeta, VolumeMeta } from './metadata.ts';
import type { RangeLock, Release } from './range-lock.ts';

/** What a volume needs from its pool: the narrow waist between data path and pool. */
export interface VolumeStore {
  readonly chunkFiles: ChunkFiles;
  readonly allocator: ChunkAllocator;
  readonly refs: ChunkRefcounts;
  /** Applies a metadata record to the live catalog and queues it for the next commit. */
  record(record: MetaRecord): void;
  /** Makes every completed write durable (FLUSH). */
  commit(): Promise<void>;
  /** Throws the pool's sticky failure, if an earlier sync failed. */
  checkHealthy(): void;
}

/** Shared by every open of one volume or snapshot. */
export interface ExportRuntime {
  openCount: number;
}

export interface VolumeRuntime extends ExportRuntime {
  meta: VolumeMeta;
  lock: RangeLock;
}

/** Source of the bytes written at absolute volume offsets [start, end). */
type ByteSource = (start: number, end: number) => Buffer;

export class Volume implements BlockDevice {
  readonly readOnly = false;
  readonly #store: VolumeStore;
  readonly #runtime: VolumeRuntime;
  #closed = false;

  constructor(store: VolumeStore, runtime: VolumeRuntime) {
    this.#store = store;
    this.#runtime = runtime;
    runtime.openCount += 1;
  }

  get name(): string {
    return this.#runtime.meta.name;
  }

  get sizeBytes(): number {
    return this.#runtime.meta.sizeBytes;
  }

  get #map(): ChunkMap {
    return this.#runtime.meta.map;
  }

  async read(offsetBytes: number, target: Buffer): Promise<void> {
    this.#assertRange(offsetBytes, target.length);
    if (target.length === 0) return;
    const release = await this.#lock(offsetBytes, target.length, false);
    try {
      await readThroughMap(this.#map, this.#store.chunkFiles, offsetBytes, target);
    } catch (error) {
      throw fromSystemError(error, `read of volume ${this.name} at ${offsetBytes}`);
    } finally {
      release();
    }
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    this.#assertRange(offsetBytes, data.length);
    this.#store.checkHealthy();
    if (data.length > 0) {
      const release = await this.#lock(offsetBytes, data.length, true);
      try {
        await this.#writeBytes(offsetBytes, data.length, (start, end) => data.subarray(start - offsetBytes, end - offsetBytes));
      } catch (error) {
        throw fromSystemError(error, `write to volume ${this.name} at ${offsetBytes}`);
      } finally {
        release();
      }
    }
    if (options?.fua) await this.#store.commit();
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await this.#zero(offsetBytes, lengthBytes, false, 'trim');
    if (options?.fua) await this.#store.commit();
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    // Without NO_HOLE, giving the space back is the fastest way to zeros: reads of holes give zeros.
    await this.#zero(offsetBytes, lengthBytes, options?.noHole === true, 'write zeroes');
    if (options?.fua) await this.#store.commit();
  }

  flush(): Promise<void> {
    return this.#store.commit();
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#assertRange(offsetBytes, lengthBytes);
    return blockStatusOfMap(this.#map, offsetBytes, lengthBytes);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#runtime.openCount -= 1;
  }

  #assertRange(offsetBytes: number, lengthBytes: number): void {
    assert(!this.#closed, 'I/O on a closed volume');
    assertRange(offsetBytes, lengthBytes, this.sizeBytes);
  }

  #lock(offsetBytes: number, lengthBytes: number, exclusive: boolean): Release | Promise<Release> {
    const first = Math.floor(offsetBytes / chunkSizeBytes);
    const end = Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes);
    return this.#runtime.lock.acquire(first, end, exclusive);
  }

  /** Trim (noHole false) or zero-write with NO_HOLE: whole chunks are unmapped or zeroed, partial ends zero-written. */
  async #zero(offsetBytes: number, lengthBytes: number, noHole: boolean, what: string): Promise<void> {
    this.#assertRange(offsetBytes, lengthBytes);
    this.#store.checkHealthy();
    if (lengthBytes === 0) return;
    const release = await this.#lock(offsetBytes, lengthBytes, true);
    try {
      const end = offsetBytes + lengthBytes;
      const firstWhole = Math.ceil(offsetBytes / chunkSizeBytes);
      const endWhole = Math.floor(end / chunkSizeBytes);
      const parts: Array<Promise<void>> = [];
      const zeroPart = (start: number, stop: number): void => {
        // A hole already reads as zeros; without NO_HOLE it may stay one.
        if (!noHole && this.#map.get(Math.floor(start / chunkSizeBytes)) < 0) return;
        parts.push(this.#writeBytes(start, stop - start, (a, b) => Buffer.alloc(b - a)));
      };
      // A partly covered chunk at each end (one chunk when the range lies inside it), whole chunks between.
      const headEnd = Math.min(end, firstWhole * chunkSizeBytes);
      if (offsetBytes < headEnd) zeroPart(offsetBytes, headEnd);
      const tailStart = Math.max(headEnd, endWhole * chunkSizeBytes);
      if (tailStart < end) zeroPart(tailStart, end);
      if (endWhole > firstWhole) {
        if (noHole) parts.push(this.#zeroWholeChunks(firstWhole, endWhole - firstWhole));
        else this.#store.record({ type: 'unmap', volumeId: this.#runtime.meta.id, virtualChunk: firstWhole, chunkCount: endWhole - firstWhole });
      }
      await settleAll(parts);
    } catch (error) {
      throw fromSystemError(error, `${what} of volume ${this.name} at ${offsetBytes}`);
    } finally {
      release();
    }
  }

  /** Writes `lengthBytes` at `offsetBytes` from `source`: in place where the volume owns the chunk, else copy-on-write. */
  async #writeBytes(offsetBytes: number, lengthBytes: number, source: ByteSource): Promise<void> {
    const first = Math.floor(offsetBytes / chunkSizeBytes);
    const count = Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes) - first;
    this.#map.ownRange(first, count, this.#store.refs);
    const tasks: Array<Promise<void>> = [];
    for (const run of this.#map.runs(first, count)) {
      for (const segment of this.#splitByOwnership(run)) {
        const [start, end] = clip(segment, offsetBytes, lengthBytes);
        const segmentStart = segment.virtualChunk * chunkSizeBytes;
        if (segment.physicalChunk >= 0 && this.#owned(segment.physicalChunk)) {
          tasks.push(this.#store.chunkFiles.write(segment.physicalChunk, start - segmentStart, source(start, end)));
        } else {
          tasks.push(this.#replaceRun(segment, start, end, source));
        }
      }
    }
    if (tasks.length === 1) return tasks[0];
    await settleAll(tasks);
  }

  /** Gives a hole or a shared run a fresh physical run holding the old content (zeros for a hole) overlaid with the new bytes. */
  async #replaceRun(run: ChunkRun, start: number, end: number, source: ByteSource): Promise<void> {
    const runStart = run.virtualChunk * chunkSizeBytes;
    const runBytes = run.chunkCount * chunkSizeBytes;
    let payload: Buffer;
    if (start === runStart && end === runStart + runBytes) {
      payload = source(start, end);
    } else {
      payload = Buffer.alloc(runBytes);
      if (run.physicalChunk >= 0) {
        // Copy-on-write of a shared chunk: only the partly covered first and last chunks need their old bytes.
        const reads: Array<Promise<void>> = [];
        if (start > runStart) reads.push(this.#store.chunkFiles.read(run.physicalChunk, 0, payload.subarray(0, chunkSizeBytes)));
        const lastChunk = run.chunkCount - 1;
        if (end < runStart + runBytes && (lastChunk > 0 || start === runStart)) {
          reads.push(this.#store.chunkFiles.read(run.physicalChunk + lastChunk, 0, payload.subarray(lastChunk * chunkSizeBytes)));
        }
        await Promise.all(reads);
      }
      source(start, end).copy(payload, start - runStart);
    }
    await this.#fillFresh(run, (physicalChunk) => this.#store.chunkFiles.write(physicalChunk, 0, payload));
  }

  /** NO_HOLE zeroing of whole chunks: in place where owned, else a fresh zeroed run. */
  async #zeroWholeChunks(firstChunk: number, chunkCount: number): Promise<void> {
    this.#map.ownRange(firstChunk, chunkCount, this.#store.refs);
    const tasks: Array<Promise<void>> = [];
    for (const run of this.#map.runs(firstChunk, chunkCount)) {
      for (const segment of this.#splitByOwnership(run)) {
        const bytes = segment.chunkCount * chunkSizeBytes;
        if (segment.physicalChunk >= 0 && this.#owned(segment.physicalChunk)) tasks.push(this.#store.chunkFiles.zero(segment.physicalChunk, 0, bytes));
        else tasks.push(this.#fillFresh(segment, (physicalChunk) => this.#store.chunkFiles.zero(physicalChunk, 0, bytes)));
      }
    }
    await Promise.all(tasks);
  }

  /** Allocates a physical run for `run`, fills it, then maps it; on failure the run goes straight back. */
  async #fillFresh(run: ChunkRun, fill: (physicalChunk: number) => Promise<void>): Promise<void> {
    const physicalChunk = this.#store.allocator.allocate(run.chunkCount);
    try {
      await fill(physicalChunk);
    } catch (error) {
      this.#store.allocator.release(physicalChunk, run.chunkCount);
      throw error;
    }
    this.#store.record({ type: 'map', volumeId: this.#runtime.meta.id, virtualChunk: run.virtualChunk, physicalChunk, chunkCount: run.chunkCount });
  }

  /** Whether the volume alone holds this chunk (its page was made private by ownRange first). */
  #owned(physicalChunk: number): boolean {
    return this.#store.refs.get(physicalChunk) === 1;
  }

  /** Splits a mapped run where ownership changes, so each piece is either all owned or all shared. */
  #splitByOwnership(run: ChunkRun): ChunkRun[] {
    if (run.physicalChunk < 0 || run.chunkCount === 1) return [run];
    const pieces: ChunkRun[] = [];
    let pieceStart = 0;
    let owned = this.#owned(run.physicalChunk);
    for (let i = 1; i <= run.chunkCount; i++) {
      const nextOwned = i < run.chunkCount ? this.#owned(run.physicalChunk + i) : !owned;
      if (nextOwned === owned) continue;
      pieces.push({ virtualChunk: run.virtualChunk + pieceStart, chunkCount: i - pieceStart, physicalChunk: run.physicalChunk + pieceStart });
      pieceStart = i;
      owned = nextOwned;
    }
    return pieces;
  }
}

/** A snapshot as a read-only BlockDevice: its map never changes while it exists, so reads need no lock. */
export class SnapshotDevice implements BlockDevice {
  readonly readOnly = true;
  readonly name: string;
  readonly #snapshot: SnapshotMeta;
  readonly #chunkFiles: ChunkFiles;
  readonly #runtime: ExportRuntime;
  #closed = false;

  constructor(volumeName: string, snapshot: SnapshotMeta, chunkFiles: ChunkFiles, runtime: ExportRuntime) {
    this.name = `${volumeName}@${snapshot.name}`;
    this.#snapshot = snapshot;
    this.#chunkFiles = chunkFiles;
    this.#runtime = runtime;
    runtime.openCount += 1;
  }

  get sizeBytes(): number {
    return this.#snapshot.sizeBytes;
  }

  async read(offsetBytes: number, target: Buffer): Promise<void> {
    assertRange(offsetBytes, target.length, this.sizeBytes);
    try {
      await readThroughMap(this.#snapshot.map, this.#chunkFiles, offsetBytes, target);
    } catch (error) {
      throw fromSystemError(error, `read of snapshot ${this.name} at ${offsetBytes}`);
    }
  }

  write(): Promise<void> {
    return refuseWrite();
  }

  trim(): Promise<void> {
    return refuseWrite();
  }

  writeZeroes(): Promise<void> {
    return refuseWrite();
  }

  async flush(): Promise<void> {}

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    assertRange(offsetBytes, lengthBytes, this.sizeBytes);
    return blockStatusOfMap(this.#snapshot.map, offsetBytes, lengthBytes);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#runtime.openCount -= 1;
  }
}

function refuseWrite(): Promise<void> {
  assert(false, 'a write reached a read-only snapshot: the NBD edge must refuse it');
}

function assertRange(offsetBytes: number, lengthBytes: number, sizeBytes: number): void {
  assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0 && Number.isSafeInteger(lengthBytes) && lengthBytes >= 0);
  assert(offsetBytes + lengthBytes <= sizeBytes, 'request past the end of the export');
}

/** Reads target.length bytes at `offsetBytes` through `map`: holes give zeros, mapped runs one read each. */
function readThroughMap(map: ChunkMap, chunkFiles: ChunkFiles, offsetBytes: number, target: Buffer): Promise<void> | Promise<void[]> {
  const first = Math.floor(offsetBytes / chunkSizeBytes);
  const runs = map.runs(first, Math.ceil((offsetBytes + target.length) / chunkSizeBytes) - first);
  const readRun = (run: ChunkRun): Promise<void> => {
    const [start, end] = clip(run, offsetBytes, target.length);
    const part = target.subarray(start - offsetBytes, end - offsetBytes);
    if (run.physicalChunk < 0) {
      part.fill(0);
      return Promise.resolve();
    }
    return chunkFiles.read(run.physicalChunk, start - run.virtualChunk * chunkSizeBytes, part);
  };
  if (runs.length === 1) return readRun(runs[0]!);
  return Promise.all(runs.map(readRun));
}

/** The allocation map of [offsetBytes, offsetBytes + lengthBytes): holes (zero) and data, merged. */
function blockStatusOfMap(map: ChunkMap, offsetBytes: number, lengthBytes: number): Extent[] {
  assert(lengthBytes > 0);
  const first = Math.floor(offsetBytes / chunkSizeBytes);
  const extents: Extent[] = [];
  for (const run of map.runs(first, Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes) - first)) {
    const [start, end] = clip(run, offsetBytes, lengthBytes);
    const hole = run.physicalChunk < 0;
    const last = extents[extents.length - 1];
    if (last !== undefined && last.hole === hole) {
      last.lengthBytes += end - start;
      continue;
    }
    if (extents.length === blockStatusExtentsMax) break;
    extents.push({ lengthBytes: end - start, hole, zero: hole });
  }
  return extents;
}

/** Waits for every task, then fails with the first failure: no I/O may still use the caller's buffer after it returns. */
async function settleAll(tasks: Array<Promise<void>>): Promise<void> {
  const results = await Promise.allSettled(tasks);
  const failed = results.find((result) => result.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
}

/** The bytes of `run` inside the request [offsetBytes, offsetBytes + lengthBytes), as absolute offsets. */
function clip(run: ChunkRun, offsetBytes: number, lengthBytes: number): [number, number] {
  const start = Math.max(offsetBytes, run.virtualChunk * chunkSizeBytes);
  const end = Math.min(offsetBytes + lengthBytes, (run.virtualChunk + run.chunkCount) * chunkSizeBytes);
  return [start, end];
}
