// A volume as a BlockDevice: maps byte ranges to chunk runs and runs the chunk I/O. Each request holds its chunk
// range in the volume's RangeLock for its whole life (writes exclusively), which gives DESIGN.md's per-block
// ordering and lets the rest of the path assume that no one else changes those map entries meanwhile.
//
// Writes go in place into chunks the volume already owns (no metadata change, no copy); a write into a hole
// allocates one contiguous physical run, writes it whole (zero-padded when the request covers part of a chunk),
// and only after the data is written records the mapping, so metadata never names a chunk whose data was not
// written first. Trims punch the space out of the chunk files before recording the unmap, so a freed chunk has
// no pending I/O when the allocator hands it out again.
import { assert } from '../core/assert.ts';
import type { BlockDevice, Extent, WriteOptions, ZeroOptions } from '../core/block-device.ts';
import { ChunkdError, fromSystemError } from '../core/errors.ts';
import { blockStatusExtentsMax, chunkSizeBytes } from '../core/limits.ts';
import type { ChunkAllocator } from './allocator.ts';
import type { ChunkRun } from './chunk-map.ts';
import type { ChunkFiles } from './chunk-files.ts';
import type { MetaRecord, VolumeMeta } from './metadata.ts';
import type { RangeLock, Release } from './range-lock.ts';

/** What a volume needs from its pool: the narrow waist between data path and pool. */
export interface VolumeStore {
  readonly chunkFiles: ChunkFiles;
  readonly allocator: ChunkAllocator;
  /** Applies a metadata record to the live catalog and queues it for the next commit. */
  record(record: MetaRecord): void;
  /** Makes every completed write durable (FLUSH). */
  commit(): Promise<void>;
  /** Throws the pool's sticky failure, if an earlier sync failed. */
  checkHealthy(): void;
}

/** Shared by every open of one volume. */
export interface VolumeRuntime {
  meta: VolumeMeta;
  lock: RangeLock;
  openCount: number;
}

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

  async read(offsetBytes: number, target: Buffer): Promise<void> {
    this.#assertRange(offsetBytes, target.length);
    if (target.length === 0) return;
    const release = await this.#lock(offsetBytes, target.length, false);
    try {
      const runs = this.#runs(offsetBytes, target.length);
      if (runs.length === 1) return await this.#readRun(runs[0]!, offsetBytes, target);
      await Promise.all(runs.map((run) => this.#readRun(run, offsetBytes, target)));
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
        const runs = this.#runs(offsetBytes, data.length);
        if (runs.length === 1) await this.#writeRun(runs[0]!, offsetBytes, data);
        else await Promise.all(runs.map((run) => this.#writeRun(run, offsetBytes, data)));
      } catch (error) {
        throw fromSystemError(error, `write to volume ${this.name} at ${offsetBytes}`);
      } finally {
        release();
      }
    }
    if (options?.fua) await this.#store.commit();
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    this.#assertRange(offsetBytes, lengthBytes);
    this.#store.checkHealthy();
    if (lengthBytes > 0) {
      const release = await this.#lock(offsetBytes, lengthBytes, true);
      try {
        await Promise.all(this.#runs(offsetBytes, lengthBytes).map((run) => this.#trimRun(run, offsetBytes, lengthBytes)));
      } catch (error) {
        throw fromSystemError(error, `trim of volume ${this.name} at ${offsetBytes}`);
      } finally {
        release();
      }
    }
    if (options?.fua) await this.#store.commit();
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    // Without NO_HOLE, giving the space back is the fastest way to zeros, and reads of holes give zeros.
    if (!options?.noHole) return this.trim(offsetBytes, lengthBytes, options);
    this.#assertRange(offsetBytes, lengthBytes);
    this.#store.checkHealthy();
    if (lengthBytes > 0) {
      const release = await this.#lock(offsetBytes, lengthBytes, true);
      try {
        await Promise.all(this.#runs(offsetBytes, lengthBytes).map((run) => this.#zeroRun(run, offsetBytes, lengthBytes)));
      } catch (error) {
        throw fromSystemError(error, `write zeroes to volume ${this.name} at ${offsetBytes}`);
      } finally {
        release();
      }
    }
    if (options.fua) await this.#store.commit();
  }

  flush(): Promise<void> {
    return this.#store.commit();
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#assertRange(offsetBytes, lengthBytes);
    assert(lengthBytes > 0);
    const extents: Extent[] = [];
    for (const run of this.#runs(offsetBytes, lengthBytes)) {
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

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#runtime.openCount -= 1;
  }

  #assertRange(offsetBytes: number, lengthBytes: number): void {
    assert(!this.#closed, 'I/O on a closed volume');
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0 && Number.isSafeInteger(lengthBytes) && lengthBytes >= 0);
    assert(offsetBytes + lengthBytes <= this.sizeBytes, 'request past the end of the volume');
  }

  #lock(offsetBytes: number, lengthBytes: number, exclusive: boolean): Release | Promise<Release> {
    const first = Math.floor(offsetBytes / chunkSizeBytes);
    const end = Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes);
    return this.#runtime.lock.acquire(first, end, exclusive);
  }

  #runs(offsetBytes: number, lengthBytes: number): ChunkRun[] {
    const first = Math.floor(offsetBytes / chunkSizeBytes);
    const end = Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes);
    return this.#runtime.meta.map.runs(first, end - first);
  }

  #readRun(run: ChunkRun, offsetBytes: number, target: Buffer): Promise<void> {
    const [start, end] = clip(run, offsetBytes, target.length);
    const part = target.subarray(start - offsetBytes, end - offsetBytes);
    if (run.physicalChunk < 0) {
      part.fill(0);
      return Promise.resolve();
    }
    return this.#store.chunkFiles.read(run.physicalChunk, start - run.virtualChunk * chunkSizeBytes, part);
  }

  async #writeRun(run: ChunkRun, offsetBytes: number, data: Buffer): Promise<void> {
    const [start, end] = clip(run, offsetBytes, data.length);
    const part = data.subarray(start - offsetBytes, end - offsetBytes);
    const runStart = run.virtualChunk * chunkSizeBytes;
    if (run.physicalChunk >= 0) return this.#store.chunkFiles.write(run.physicalChunk, start - runStart, part);
    const whole = start === runStart && end === runStart + run.chunkCount * chunkSizeBytes;
    let payload = part;
    if (!whole) {
      payload = Buffer.alloc(run.chunkCount * chunkSizeBytes);
      part.copy(payload, start - runStart);
    }
    await this.#fillHole(run, (physicalChunk) => this.#store.chunkFiles.write(physicalChunk, 0, payload));
  }

  async #trimRun(run: ChunkRun, offsetBytes: number, lengthBytes: number): Promise<void> {
    if (run.physicalChunk < 0) return;
    const [start, end] = clip(run, offsetBytes, lengthBytes);
    const runStart = run.virtualChunk * chunkSizeBytes;
    // Chunks wholly inside the range go back to the pool; a partly covered chunk at either end is zeroed in place.
    const firstWhole = Math.ceil(start / chunkSizeBytes);
    const endWhole = Math.floor(end / chunkSizeBytes);
    const zeroParts: Array<Promise<void>> = [];
    if (endWhole <= firstWhole) {
      return this.#store.chunkFiles.zero(run.physicalChunk, start - runStart, end - start);
    }
    if (start < firstWhole * chunkSizeBytes) zeroParts.push(this.#store.chunkFiles.zero(run.physicalChunk, start - runStart, firstWhole * chunkSizeBytes - start));
    if (endWhole * chunkSizeBytes < end) zeroParts.push(this.#store.chunkFiles.zero(run.physicalChunk, endWhole * chunkSizeBytes - runStart, end - endWhole * chunkSizeBytes));
    const physicalStart = run.physicalChunk + (firstWhole - run.virtualChunk);
    zeroParts.push(this.#store.chunkFiles.punch(physicalStart, endWhole - firstWhole));
    await Promise.all(zeroParts);
    this.#store.record({ type: 'unmap', volumeId: this.#runtime.meta.id, virtualChunk: firstWhole, chunkCount: endWhole - firstWhole });
  }

  async #zeroRun(run: ChunkRun, offsetBytes: number, lengthBytes: number): Promise<void> {
    const [start, end] = clip(run, offsetBytes, lengthBytes);
    const runStart = run.virtualChunk * chunkSizeBytes;
    if (run.physicalChunk >= 0) return this.#store.chunkFiles.zero(run.physicalChunk, start - runStart, end - start);
    await this.#fillHole(run, (physicalChunk) => this.#store.chunkFiles.zero(physicalChunk, 0, run.chunkCount * chunkSizeBytes));
  }

  /** Allocates a physical run for a hole, fills it, then maps it; on failure the run goes straight back. */
  async #fillHole(run: ChunkRun, fill: (physicalChunk: number) => Promise<void>): Promise<void> {
    const physicalChunk = this.#store.allocator.allocate(run.chunkCount);
    try {
      await fill(physicalChunk);
    } catch (error) {
      this.#store.allocator.release(physicalChunk, run.chunkCount);
      throw error;
    }
    this.#store.record({ type: 'map', volumeId: this.#runtime.meta.id, virtualChunk: run.virtualChunk, physicalChunk, chunkCount: run.chunkCount });
  }
}

/** The bytes of `run` inside the request [offsetBytes, offsetBytes + lengthBytes), as absolute volume offsets. */
function clip(run: ChunkRun, offsetBytes: number, lengthBytes: number): [number, number] {
  const start = Math.max(offsetBytes, run.virtualChunk * chunkSizeBytes);
  const end = Math.min(offsetBytes + lengthBytes, (run.virtualChunk + run.chunkCount) * chunkSizeBytes);
  return [start, end];
}

