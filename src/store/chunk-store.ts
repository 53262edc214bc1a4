// The chunk store: a pool's data, as the few verbs volumes, scrub and the commit engine need, over the parts that
// carry it (the allocator, the chunk files, the chunk I/O engine, the checksums the metadata holds).
//
// Writes never overwrite a chunk the metadata names (redirect-on-write): `write` and `zero` put whole chunks into
// a fresh contiguous run and return where it is with the checksum of each chunk; the caller records the mapping
// once they return. A run whose write fails goes straight back to the allocator. A full file system is met by
// asking the commit engine to make the chunks freed since the last commit reusable, then trying once more, then
// (`write`, not `zero`) in pieces: halves, each a run of its own, down to single chunks, into the free chunks the
// files hold; all of them written or none kept.
//
// Reads go through a map (`read`): holes give zeros, mapped runs become one plan for the I/O engine, and every
// chunk read is checked against its checksum. A mismatch is logged, counted, and the read fails with EIO naming
// the export, the offset and the chunk file; damaged bytes are never returned.
//
// Frees are deferred (allocator.ts): a freed chunk is reused, and its space punched out of the file when the
// free was a trim or a removal, only after the commit that records it is durable (`reuseFreed`).
import { performance } from 'node:perf_hooks';
import { ChunkdError, DamagedDataError, isNoSpace } from '../core/errors.ts';
import { chunkSizeBytes, chunksPerFile } from '../core/limits.ts';
import { formatSize } from '../core/units.ts';
import type { FreeExtent } from './allocator.ts';
import type { ChunkAllocation, ChunkLookup } from './catalog-backend.ts';
import { blockChecksum, zeroChunkSum } from './checksum.ts';
import type { ChunkFiles } from './chunk-files.ts';
import { locateInPlan, readCachedGathered, type ChunkIo, type IoEngineStatus, type Mismatch } from './chunk-io.ts';
import type { ChunkRun } from './chunk-map.ts';
import { hex, scrub, type ScrubReport, type ScrubSource } from './scrub.ts';
import type { Log } from '../core/log.ts';

/** Where some of a write's chunks went: `chunkCount` chunks from `physicalChunk` on. */
export interface RunPiece {
  physicalChunk: number;
  chunkCount: number;
}

/**
 * Chunks just written: where they went, in the payload's order (one fresh run; several only on a full file system
 * whose free space lies in holes smaller than the write, ChunkStore.write), and the checksum of each.
 */
export interface WrittenRun {
  pieces: RunPiece[];
  sums: Uint32Array;
}

/** One export's mapped runs, for a scrub. */
export interface ScrubTarget {
  name: string;
  runs: ChunkRun[];
}

export interface ChunkStoreParts {
  chunkFiles: ChunkFiles;
  /** The catalog's chunk allocator (catalog-backend.ts). */
  allocator: ChunkAllocation;
  io: ChunkIo;
  /** False only when a benchmark turned read verification off (serve --verify-reads off). */
  verifyReads: boolean;
  log: Log;
  /** Makes the chunks freed since the last commit reusable (a commit): what a write on a full file system asks for. */
  reclaim: () => Promise<void>;
}

export class ChunkStore {
  readonly verifyReads: boolean;
  readonly #files: ChunkFiles;
  readonly #allocator: ChunkAllocation;
  readonly #io: ChunkIo;
  readonly #log: Log;
  readonly #reclaim: () => Promise<void>;
  /** Where readCachedMany reads a stretch of chunks back to back on disk before copying each to its target. */
  readonly #gatherScratch = Buffer.allocUnsafe(gatherStretchBytesMax);
  #checksumErrorsTotal = 0;
  /** When a one-chunk write last found no free chunk it could write on a full file system (#writePastHoles). */
  #pastHolesFailedAtMs = -Infinity;

  constructor(parts: ChunkStoreParts) {
    this.#files = parts.chunkFiles;
    this.#allocator = parts.allocator;
    this.#io = parts.io;
    this.verifyReads = parts.verifyReads;
    this.#log = parts.log;
    this.#reclaim = parts.reclaim;
  }

  // ---- data verbs ----

  /**
   * Writes whole chunks into a fresh run; on a full file system, reclaims deferred frees and tries once more, then
   * in pieces. `sums`: the chunks' checksums when the caller has taken them from these bytes (ChunkIo.writeSummed).
   */
  write(payload: Buffer, sums?: Uint32Array): Promise<WrittenRun> {
    const gate = this.allocationGate();
    if (gate !== null) return gate.then(() => this.#write(payload, sums));
    return this.#write(payload, sums);
  }

  /**
   * Asked before each write takes its chunks: null, or a promise it waits for first (the commit engine holds writes
   * so while the chunks freed and not yet reusable are past its bound: commit-engine.ts, `#spaceGate`).
   */
  allocationGate: () => Promise<void> | null = () => null;

  #write(payload: Buffer, sums: Uint32Array | undefined): Promise<WrittenRun> {
    const chunkCount = payload.length / chunkSizeBytes;
    return this.#writeFresh(payload, chunkCount, sums).catch(async (error: unknown) => {
      if (!isNoSpace(error)) throw error;
      // The file system is full, but chunks this pool freed wait for a commit before they may be reused (they
      // are still space in the files): commit, then try once more, into them.
      if (this.#allocator.deferredCount > 0) {
        try {
          // Refused at once while a commit met the full file system a moment ago (commit-engine.ts): the pieces
          // below may still find free chunks.
          await this.#reclaim();
          return await this.#writeFresh(payload, chunkCount, sums);
        } catch (again) {
          if (!isNoSpace(again)) throw again;
        }
      }
      return chunkCount === 1 ? this.#writePastHoles(payload, sums) : this.#writeInPieces(payload, chunkCount, sums);
    });
  }

  /**
   * One chunk on a full file system. A free chunk may be a hole (punched: a trim, a removal, the open's punch, the
   * metadata's give-back), whose write needs a block the file system has not got, while other free chunks still
   * hold theirs (an overwrite's free keeps its space for the next write). Tries free chunks in the allocator's
   * order, each that met ENOSPC held aside meanwhile (so the allocator hands out another) and given back at the
   * end: up to `holeTriesMax`, and none more once a chunk above the high-water mark (never a held block) failed.
   * A search that found nothing makes the next second's try one chunk only: on a file system full for good, every
   * write would otherwise fail thousands of pwrites.
   */
  async #writePastHoles(payload: Buffer, sums: Uint32Array | undefined): Promise<WrittenRun> {
    const triesMax = performance.now() - this.#pastHolesFailedAtMs < pastHolesRetryMs ? 1 : holeTriesMax;
    const holes: number[] = [];
    try {
      for (;;) {
        const mark = this.#allocator.highWater;
        const allocated = this.#allocator.allocate(1);
        const physicalChunk = typeof allocated === 'number' ? allocated : await allocated;
        try {
          return { pieces: [{ physicalChunk, chunkCount: 1 }], sums: await this.#io.writeSummed(physicalChunk, payload, sums) };
        } catch (error) {
          holes.push(physicalChunk);
          if (!isNoSpace(error)) throw error;
          if (physicalChunk >= mark || holes.length >= triesMax) {
            this.#pastHolesFailedAtMs = performance.now();
            throw error;
          }
        }
      }
    } finally {
      for (const chunk of holes) this.#allocator.release(chunk, 1);
    }
  }

  /**
   * A write the full file system has no room for in one run, in halves, each its own run, halved again down to
   * single chunks as need be: the free space below the high-water mark may all be holes smaller than the write
   * (overwrites at random free chunks one by one; a run found nowhere below goes above the mark, where the file
   * system has no room), and without this a pool whose files held many free chunks refused every write of more
   * than one. All of it written, or nothing kept (each piece written is given back) and the error thrown.
   */
  async #writeInPieces(payload: Buffer, chunkCount: number, sums: Uint32Array | undefined): Promise<WrittenRun> {
    const half = Math.ceil(chunkCount / 2);
    const parts: WrittenRun[] = [];
    try {
      for (const [first, count] of [[0, half], [half, chunkCount - half]] as const) {
        const bytes = payload.subarray(first * chunkSizeBytes, (first + count) * chunkSizeBytes);
        const given = sums?.subarray(first, first + count);
        parts.push(
          await (count === 1
            ? this.#writePastHoles(bytes, given)
            : this.#writeFresh(bytes, count, given).catch((error: unknown) => {
                if (!isNoSpace(error)) throw error;
                return this.#writeInPieces(bytes, count, given);
              })),
        );
      }
    } catch (error) {
      for (const part of parts) for (const piece of part.pieces) this.#allocator.release(piece.physicalChunk, piece.chunkCount);
      throw error;
    }
    const joined = new Uint32Array(chunkCount);
    joined.set(parts[0]!.sums, 0);
    joined.set(parts[1]!.sums, half);
    return { pieces: [...parts[0]!.pieces, ...parts[1]!.pieces], sums: joined };
  }

  /** NO_HOLE zeroing: a fresh run of `chunkCount` chunks, zeroed by the file system and kept allocated. */
  async zero(chunkCount: number): Promise<WrittenRun> {
    const allocated = this.#allocator.allocate(chunkCount);
    const physicalChunk = typeof allocated === 'number' ? allocated : await allocated;
    try {
      await this.#files.zero(physicalChunk, 0, chunkCount * chunkSizeBytes);
    } catch (error) {
      this.#allocator.release(physicalChunk, chunkCount);
      throw error;
    }
    return { pieces: [{ physicalChunk, chunkCount }], sums: new Uint32Array(chunkCount).fill(zeroChunkSum) };
  }

  /**
   * Reads target.length bytes at `offsetBytes` through `found` (the runs under the request, catalog-backend.ts's
   * lookup), checking every chunk read against its checksum:
   * holes give zeros, and the mapped runs under the request become one plan for the chunk I/O engine, read straight
   * into `target` when the request covers whole chunks, else into a scratch buffer whose middle is copied out once
   * every chunk in it has been verified. `exportName` names the volume or VOL@SNAP in a corruption report.
   * Done at once (undefined, or a throw) when the page cache held every byte (chunk-io.ts), else a promise.
   */
  read(exportName: string, found: ChunkLookup, offsetBytes: number, target: Buffer): Promise<void> | undefined {
    const firstChunk = Math.floor(offsetBytes / chunkSizeBytes);
    const chunkCount = Math.ceil((offsetBytes + target.length) / chunkSizeBytes) - firstChunk;
    const runs = found.runs;
    let mappedRuns = 0;
    let mappedChunks = 0;
    for (const run of runs) {
      if (run.physicalChunk < 0) continue;
      mappedRuns += 1;
      mappedChunks += run.chunkCount;
    }
    if (mappedRuns === 0) {
      target.fill(0);
      return undefined;
    }
    const aligned = offsetBytes === firstChunk * chunkSizeBytes && target.length === chunkCount * chunkSizeBytes;
    const buffer = aligned ? target : Buffer.allocUnsafe(chunkCount * chunkSizeBytes);
    const plan = new Float64Array(mappedRuns * 3);
    const expected = new Uint32Array(mappedChunks);
    let p = 0;
    let e = 0;
    for (const run of runs) {
      const targetChunk = run.virtualChunk - firstChunk;
      if (run.physicalChunk < 0) {
        buffer.fill(0, targetChunk * chunkSizeBytes, (targetChunk + run.chunkCount) * chunkSizeBytes);
        continue;
      }
      plan[p++] = run.physicalChunk;
      plan[p++] = run.chunkCount;
      plan[p++] = targetChunk;
      for (let i = 0; i < run.chunkCount; i++) expected[e++] = found.sumOf(run, i);
    }
    const mismatch = this.#io.readChunks(buffer, plan, expected, this.verifyReads);
    if (mismatch instanceof Promise) return mismatch.then((settled) => this.#readDone(exportName, plan, settled, offsetBytes, target, buffer));
    this.#readDone(exportName, plan, mismatch, offsetBytes, target, buffer);
    return undefined;
  }

  /**
   * read() for many reads of whole chunks at once, each with its lookup, done here only from the page cache: their
   * chunks read in order of physical place, a call per stretch of them back to back in one chunk file rather than
   * a call per read (readCachedGathered), each chunk then verified in its target as read() verifies it. A sender
   * reads a random writer's scattered 4 KiB chunks so (replication/send.ts). `outcomes[i]`: null when read i was
   * done (its target filled and verified), the corruption error read() would throw, or undefined when it was not
   * done here (a hole in it, not whole chunks, or a byte not in the page cache): the caller reads it with read().
   */
  readCachedMany(exportName: string, founds: readonly ChunkLookup[], offsets: readonly number[], targets: readonly Buffer[]): Array<Error | null | undefined> {
    const outcomes: Array<Error | null | undefined> = new Array<Error | null | undefined>(founds.length).fill(undefined);
    let total = 0;
    const wanted = new Uint8Array(founds.length);
    for (let r = 0; r < founds.length; r++) {
      if (offsets[r]! % chunkSizeBytes !== 0 || targets[r]!.length % chunkSizeBytes !== 0) continue;
      let mapped = 0;
      for (const run of founds[r]!.runs) mapped += run.physicalChunk < 0 ? -Infinity : run.chunkCount;
      if (mapped !== targets[r]!.length / chunkSizeBytes) continue;
      wanted[r] = 1;
      total += mapped;
    }
    // Every chunk wanted, in read order: its physical place, its 4 KiB of its read's target, its recorded sum, its read.
    const physical = new Float64Array(total);
    const views: Buffer[] = new Array<Buffer>(total);
    const expected = new Uint32Array(total);
    const owner = new Uint32Array(total);
    let c = 0;
    for (let r = 0; r < founds.length; r++) {
      if (wanted[r] === 0) continue;
      const found = founds[r]!;
      const target = targets[r]!;
      const firstChunk = offsets[r]! / chunkSizeBytes;
      for (const run of found.runs) {
        for (let i = 0; i < run.chunkCount; i++) {
          const at = (run.virtualChunk + i - firstChunk) * chunkSizeBytes;
          physical[c] = run.physicalChunk + i;
          views[c] = target.length === chunkSizeBytes ? target : target.subarray(at, at + chunkSizeBytes);
          expected[c] = found.sumOf(run, i);
          owner[c++] = r;
        }
      }
    }
    const done = readCachedGathered(this.#files, physical, views, this.#gatherScratch);
    // A read is done when all its chunks were; verified chunk by chunk, the first mismatch in its order reported.
    for (let k = 0; k < total; k++) if (done[k] === 0) wanted[owner[k]!] = 0;
    for (let k = 0; k < total; k++) {
      const r = owner[k]!;
      if (wanted[r] === 0 || outcomes[r] instanceof Error) continue;
      outcomes[r] = null;
      if (!this.verifyReads) continue;
      const actual = blockChecksum(views[k]!);
      if (actual !== expected[k]) outcomes[r] = this.#corruption(exportName, offsets[r]! + (views[k]!.byteOffset - targets[r]!.byteOffset), physical[k]!, expected[k]!, actual);
    }
    return outcomes;
  }

  /** A read's end: the corruption report of its first mismatch, or the bytes copied out of its scratch buffer. */
  #readDone(exportName: string, plan: Float64Array, mismatch: Mismatch | null, offsetBytes: number, target: Buffer, buffer: Buffer): void {
    const firstChunk = Math.floor(offsetBytes / chunkSizeBytes);
    if (mismatch !== null) {
      const where = locateInPlan(plan, mismatch.chunkIndex);
      throw this.#corruption(exportName, (firstChunk + where.targetChunk) * chunkSizeBytes, where.physicalChunk, mismatch.expected, mismatch.actual);
    }
    if (buffer !== target) buffer.copy(target, 0, offsetBytes - firstChunk * chunkSizeBytes, offsetBytes - firstChunk * chunkSizeBytes + target.length);
  }

  /** Reads and checks every chunk of the given exports while they stay in use (scrub.ts). */
  async scrub(volumeName: string, exports: ScrubTarget[], source: ScrubSource, onProgress?: (doneBytes: number, totalBytes: number) => void): Promise<ScrubReport> {
    const report = await scrub({ io: this.#io, sumOf: (chunk) => source.sumOf(chunk), stillNamed: (chunk, sum) => source.stillNamed(chunk, sum), log: this.#log }, volumeName, exports, onProgress);
    this.#log(`scrub of ${volumeName}: ${formatSize(report.checkedBytes)} checked in ${exports.length} export(s), ${report.badChunks} bad chunk(s)`);
    return report;
  }

  // ---- space: what the commit engine and the pool's open call ----

  /** Chunks freed and waiting for a commit. */
  get deferredCount(): number {
    return this.#allocator.deferredCount;
  }

  /** Of those, the chunks in runs a large write can reuse (DeferredFrees.runCount). */
  get deferredRunCount(): number {
    return this.#allocator.deferredRunCount;
  }

  /** Marks the frees a commit is about to cover (see `reuseFreed`). */
  deferredMark(): number {
    return this.#allocator.deferredMark();
  }

  /** fdatasyncs the chunk files written since the last sync (and their directory for new files). */
  sync(): Promise<void> {
    return this.#files.sync();
  }

  /** After the commit that recorded them is durable: punches out the frees up to `mark` that give space back, then reuses them. */
  async reuseFreed(mark: number): Promise<void> {
    const freed = this.#allocator.takeDeferred(mark);
    await Promise.all(coalesce(freed.filter((extent) => extent.punch)).map((extent) => this.#files.punch(extent.start, extent.count))).catch((error) =>
      this.#log(`giving freed space back to the file system failed: ${(error as Error).message}`, 'warn'),
    );
    this.#allocator.releaseTaken(freed);
  }

  /** At open: punches out every chunk the metadata does not name (uncommitted writes, recycled chunks). */
  async punchUnused(): Promise<void> {
    const tasks: Array<Promise<void>> = [];
    for (const extent of await this.#allocator.freeExtents()) tasks.push(this.#files.punch(extent.start, extent.count));
    await Promise.all([...tasks, this.punchAboveHighWater()]);
  }

  /** At open: punches out the chunk files past the high-water mark (writes never committed, at the top). */
  async punchAboveHighWater(): Promise<void> {
    const files = this.#files.existingFiles();
    const lastFile = files[files.length - 1];
    if (lastFile === undefined) return;
    const end = (lastFile + 1) * chunksPerFile;
    if (end > this.#allocator.highWater) await this.#files.punch(this.#allocator.highWater, end - this.#allocator.highWater);
  }

  /**
   * After open, beside the node's work: punches out the free chunks below the high-water mark (`punchUnused`'s
   * first part), a page of counts at a time, each page's free chunks held meanwhile. Safe beside writes: a chunk
   * with no count names nothing (the open replayed every record before this starts, and made its frees final),
   * and from then on a record names a chunk of no count only after an allocation returned it, which a held chunk
   * never is. Stops between pages once `stopped()`. Returns the chunks punched.
   */
  async punchFreeInBackground(space: ChunkAllocation, stopped: () => boolean): Promise<number> {
    let punched = 0;
    for (let page = 0; page < space.pagesInUse && !stopped(); page++) {
      const extents = await space.holdFree(page);
      try {
        await Promise.all(extents.map((extent) => this.#files.punch(extent.start, extent.count)));
        for (const extent of extents) punched += extent.count;
      } finally {
        space.releaseTaken(extents);
      }
    }
    return punched;
  }

  /**
   * While the node runs, when the metadata meets a full file system (commit-engine.ts): punches out every free
   * chunk below the high-water mark, as the open does, so that a journal's next files and a checkpoint find room.
   * An overwrite's free is not punched (a write soon reuses its space), so after overwrites the pool's files can
   * hold the whole file system while much of them is free chunks. Safe beside writes, as `punchFreeInBackground`
   * says (the in-memory allocator holds a span's free chunks by setting their bits). Returns the chunks punched,
   * holes punched again among them.
   */
  giveBackFree(): Promise<number> {
    return this.punchFreeInBackground(this.#allocator, () => false);
  }

  // ---- status and life ----

  get allocatedBytes(): number {
    return this.#allocator.usedCount * chunkSizeBytes;
  }

  /**
   * The chunk files' span, up to the high-water mark: the chunks in use, those freed and waiting for a commit, and
   * the free ones kept for reuse (some of them holes), so an upper bound of the files' space on disk.
   */
  get spanBytes(): number {
    return this.#allocator.highWater * chunkSizeBytes;
  }

  /** Reads that failed their checksum since the node started. */
  get checksumErrorsTotal(): number {
    return this.#checksumErrorsTotal;
  }

  ioStatus(): IoEngineStatus {
    return this.#io.status();
  }

  /** Waits for the I/O in flight and closes the files; `force` stops the engine at once and leaves the descriptors (a simulated crash). */
  async close(options?: { force?: boolean }): Promise<void> {
    await this.#io.close(options);
    if (options?.force !== true) this.#files.close();
  }

  /**
   * A fresh run of `chunkCount` chunks, written from `payload`, or a rejection (never a throw) with the run given
   * back. Promises chained, not an async function's: each layer of the write's chain was its own promise and turn.
   */
  #writeFresh(payload: Buffer, chunkCount: number, sums: Uint32Array | undefined): Promise<WrittenRun> {
    let allocated: number | Promise<number>;
    try {
      allocated = this.#allocator.allocate(chunkCount);
    } catch (error) {
      return Promise.reject(error);
    }
    if (typeof allocated !== 'number') {
      return allocated.then((physicalChunk) => this.#writeAt(physicalChunk, payload, chunkCount, sums));
    }
    return this.#writeAt(allocated, payload, chunkCount, sums);
  }

  #writeAt(physicalChunk: number, payload: Buffer, chunkCount: number, sums: Uint32Array | undefined): Promise<WrittenRun> {
    let written: Promise<Uint32Array>;
    try {
      written = this.#io.writeSummed(physicalChunk, payload, sums);
    } catch (error) {
      this.#allocator.release(physicalChunk, chunkCount);
      return Promise.reject(error);
    }
    return written.then(
      (sums) => ({ pieces: [{ physicalChunk, chunkCount }], sums }),
      (error: unknown) => {
        this.#allocator.release(physicalChunk, chunkCount);
        throw error;
      },
    );
  }

  /** Logs and counts a chunk whose bytes do not match their checksum; returns the error the read fails with. */
  #corruption(exportName: string, offsetBytes: number, physicalChunk: number, expected: number, actual: number): ChunkdError {
    this.#checksumErrorsTotal += 1;
    const chunkFile = Math.floor(physicalChunk / chunksPerFile);
    const fileOffset = (physicalChunk % chunksPerFile) * chunkSizeBytes;
    const message =
      `checksum mismatch: ${exportName} at byte ${offsetBytes} (4 KiB chunk ${physicalChunk}, ` +
      `${this.#files.filePath(chunkFile)} at byte ${fileOffset}): expected crc32 ${hex(expected)}, read ${hex(actual)}`;
    this.#log(message, 'error');
    return new DamagedDataError(`${message}; the read fails rather than return damaged data`);
  }
}

/** Free chunks a one-chunk write on a full file system tries before it fails with ENOSPC (#writePastHoles). */
const holeTriesMax = 4096;
/** After such a search found nothing, the one-chunk writes of this long try one chunk only. */
const pastHolesRetryMs = 1_000;

/** The most bytes readCachedMany reads with one call: 64 chunks. */
const gatherStretchBytesMax = 64 * chunkSizeBytes;

/** Extents sorted and merged where they touch, so that each stretch of freed space is punched in one call. */
function coalesce(extents: FreeExtent[]): FreeExtent[] {
  const sorted = [...extents].sort((a, b) => a.start - b.start);
  const merged: FreeExtent[] = [];
  for (const extent of sorted) {
    const last = merged[merged.length - 1];
    if (last !== undefined && last.start + last.count === extent.start) last.count += extent.count;
    else merged.push({ ...extent });
  }
  return merged;
}
