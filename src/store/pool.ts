// # The pool: chunkd's on-disk design
//
// A pool is a directory on one local file system:
//
//   chunkd-pool.json     format name and version, chunk size, chunks per file (written once, at creation)
//   lock                 flock()ed by the one process (node or fsck) that owns the pool; holds its pid
//   checkpoint           the whole catalog (volumes, snapshots, chunk maps with each chunk's CRC-32) as of the
//                        start of one journal generation
//   journal-<gen>        the metadata records committed since that checkpoint (map, unmap, create, clone, resize,
//                        remove, snapshot, snapshot-remove, rollback)
//   chunks/NNNNNNNN.chunk  sparse data files of 1 GiB each; physical chunk i is at (i mod 2^18) * 4 KiB of file i >> 18
//
// Data: a volume maps its 4 KiB virtual chunks to physical chunks (ChunkMap: a two-level table, pages only where
// written). Every write gets one fresh contiguous physical run from the allocator (redirect-on-write: a chunk the
// metadata names is never overwritten, volume.ts), and its map record carries the CRC-32 of each chunk, which
// every read checks. So space used is data written (at 4 KiB granularity, whatever the volume's size), a 1 MiB
// write is one pwrite, a 4 KiB write after a snapshot writes 4 KiB, and a block and its checksum cannot disagree
// after a crash. Snapshots and clones share the map's pages and reference-count chunks per page (chunk-map.ts):
// O(pages) to take, one lookup to read whatever their number, and "what changed between two snapshots" is a
// page-by-page comparison that skips shared pages. Chunks freed by trims and removals are punched out of the files
// (fallocate), so the space goes back to the file system; chunks freed by overwrites are only recycled (the next
// writes take them), as punching and reallocating them would be wasted work.
//
// Metadata: all in memory, made durable by a write-ahead journal of small records plus a periodic checkpoint,
// not by a general-purpose database (LMDB was weighed): the records are small (one per write or trim: 37 bytes
// and 4 per chunk), replay is a fold of `applyRecord` (the same code the live node runs), group commit falls
// out of one file append, and the crash-ordering rules below are ours to see and test rather than hidden in a
// store's sync modes. The cost is that a checkpoint rewrites the whole map (compact: runs, not chunks).
//
// Invariants that make a crash at any moment safe:
//  1. A map record is queued only after its chunk's data write completed; a commit fdatasyncs the chunk files
//     before it writes the journal. So committed metadata never names a chunk whose data is not durable.
//  2. A freed chunk is punched and reused only after the commit that recorded the free is durable (deferred
//     frees), so a crash can neither show a volume a chunk another has since written, nor bring back a removed
//     snapshot whose data was already punched. With invariant 1 and redirect-on-write, a chunk's bytes never
//     change while any metadata on disk names it, so its recorded checksum stays true across any crash.
//  3. Journal frames carry a crc32; replay stops at the first bad frame, so the replayed journal is a prefix of
//     what was committed. A FLUSH replies only after its commit's fdatasync, so everything it covers is in it.
//  4. A checkpoint is written to a temporary file, fsynced, renamed into place and the directory fsynced; only then
//     does the next generation's journal start. A crash leaves the old checkpoint and journal, or the new ones.
//  5. Reference counts are never stored: they are rebuilt from the maps at load, so they cannot disagree with them.
//  6. At load, chunks the metadata does not name are punched out: data written but never committed, and chunks
//     recycled by overwrites, are space only.
// After any failed fdatasync of data the pool refuses all further writes (a sticky error, as SQLite's pager):
// the kernel may have dropped the pages, so later flushes could not be trusted.
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError, fromSystemError } from '../core/errors.ts';
import {
  backgroundCommitIntervalMs,
  chunkSizeBytes,
  chunksPerFile,
  deferredChunksCommitMax,
  journalCheckpointBytes,
  snapshotsPerVolumeMax,
  volumeSizeAlignBytes,
  volumeSizeMaxBytes,
  volumesMax,
} from '../core/limits.ts';
import { validateName } from '../core/names.ts';
import { formatSize } from '../core/units.ts';
import { ChunkAllocator, type FreeExtent } from './allocator.ts';
import { ChunkFiles } from './chunk-files.ts';
import { ChunkRefcounts } from './chunk-refcounts.ts';
import { decodeCheckpoint, encodeCheckpoint } from './checkpoint.ts';
import { JournalFile, readJournal } from './journal-file.ts';
import { diffMaps, type ChangedExtent } from './map-diff.ts';
import { scrub, type ScrubReport } from './scrub.ts';
import { applyRecord, countReferences, decodeJournal, emptyCatalog, encodeRecords, type Catalog, type MetaRecord, type SnapshotMeta, type VolumeMeta } from './metadata.ts';
import { tryLockExclusive } from './native.ts';
import { RangeLock } from './range-lock.ts';
import { InlineChunkIo, type ChunkIo } from './chunk-io.ts';
import type { ChunkSums } from './chunk-sums.ts';
import { SnapshotDevice, Volume, type CorruptionReport, type ExportRuntime, type VolumeRuntime, type VolumeStore } from './volume.ts';

export const poolFormatName = 'chunkd-pool';
/** Version 2: every mapped chunk has a checksum in the metadata (version 1 pools had none). */
export const poolFormatVersion = 2;

export interface VolumeInfo {
  name: string;
  sizeBytes: number;
  allocatedBytes: number;
  openCount: number;
  snapshots: string[];
}

export interface SnapshotInfo {
  volume: string;
  name: string;
  sizeBytes: number;
  createdAt: string;
  /** Bytes of chunks that only this snapshot holds: what removing it gives back. */
  uniqueBytes: number;
  openCount: number;
}

export interface PoolStatus {
  directory: string;
  formatVersion: number;
  volumeCount: number;
  snapshotCount: number;
  allocatedBytes: number;
  journalBytes: number;
  generation: number;
  fileSystem: { sizeBytes: number; freeBytes: number };
  failure: string | null;
  /** Reads that failed their checksum since the node started. */
  checksumErrorsTotal: number;
  verifyReads: boolean;
}

export interface PoolOptions {
  directory: string;
  log?: (line: string) => void;
  /** Makes the engine that carries chunk reads and writes (default: inline, on the calling thread). */
  makeIo?: (chunkFiles: ChunkFiles) => ChunkIo;
  /** Verify checksums on reads (default true); false only to measure what verification costs. */
  verifyReads?: boolean;
}

/** What a pool's metadata says after a checkpoint and journal replay; shared by the node and fsck. */
export interface LoadedMetadata {
  catalog: Catalog;
  refs: ChunkRefcounts;
  generation: number;
  replayedRecords: number;
  tornTail: boolean;
}

export class Pool implements VolumeStore {
  readonly directory: string;
  readonly chunkFiles: ChunkFiles;
  readonly allocator: ChunkAllocator;
  readonly refs: ChunkRefcounts;
  readonly io: ChunkIo;
  readonly verifyReads: boolean;
  readonly #catalog: Catalog;
  #checksumErrorsTotal = 0;
  /** Whether chunks freed now go back to the file system (trims, removals) or are only recycled (overwrites). */
  #punchFrees = true;
  readonly #runtimes = new Map<number, VolumeRuntime>();
  readonly #snapshotRuntimes = new Map<number, ExportRuntime>();
  readonly #lockFd: number;
  readonly #log: (line: string) => void;
  #generation: number;
  #journal: JournalFile;
  /** Records applied but not yet committed, each already encoded as a journal frame (the cost spread over writes). */
  #queue: Buffer[] = [];
  #currentCommit: Promise<void> | null = null;
  #pendingCommit: Promise<void> | null = null;
  #failure: ChunkdError | null = null;
  #timer: NodeJS.Timeout;
  #closed = false;

  private constructor(directory: string, lockFd: number, loaded: LoadedMetadata, allocator: ChunkAllocator, journal: JournalFile, options: PoolOptions) {
    const log = options.log ?? (() => {});
    this.directory = directory;
    this.#lockFd = lockFd;
    this.#catalog = loaded.catalog;
    this.#generation = loaded.generation;
    this.allocator = allocator;
    this.refs = loaded.refs;
    // From now on a chunk whose last reference goes is free, once the commit that records it is durable.
    this.refs.onFree = (physicalChunk) => allocator.freeDeferred(physicalChunk, 1, this.#punchFrees);
    this.chunkFiles = new ChunkFiles(path.join(directory, 'chunks'));
    this.io = options.makeIo?.(this.chunkFiles) ?? new InlineChunkIo(this.chunkFiles);
    this.verifyReads = options.verifyReads ?? true;
    this.#journal = journal;
    this.#log = log;
    this.#timer = setInterval(() => {
      if (this.#queue.length > 0 || this.allocator.deferredCount > 0) this.commit().catch((error) => this.#log(`background commit failed: ${(error as Error).message}`));
    }, backgroundCommitIntervalMs);
    this.#timer.unref();
  }

  /** Opens the pool in `directory`, creating it if the directory is missing or empty; locks it for this process. */
  static async open(options: PoolOptions): Promise<Pool> {
    const directory = path.resolve(options.directory);
    const log = options.log ?? (() => {});
    initializePool(directory);
    const lockFd = lockPool(directory);
    try {
      const loaded = loadMetadata(directory);
      const allocator = ChunkAllocator.fromUsed(loaded.refs.usedRuns());
      // Start a fresh generation: the checkpoint absorbs the replayed journal (and drops any torn tail).
      const generation = loaded.generation + 1;
      await writeCheckpointFile(directory, encodeCheckpoint(loaded.catalog, generation));
      fsyncDirectory(directory);
      // The durable checkpoint holds everything the old journal did: drop it before reserving the new one, so
      // that a node restarted on a full file system gets the old journal's space back first.
      removeOtherJournals(directory, generation);
      const journal = await JournalFile.create(journalPath(directory, generation)).catch((error: unknown) => {
        throw fromSystemError(error, `reserving the metadata journal in ${directory}`);
      });
      fsyncDirectory(directory);
      const pool = new Pool(directory, lockFd, { ...loaded, generation }, allocator, journal, options);
      await pool.#punchUnusedSpace();
      if (loaded.replayedRecords > 0 || loaded.tornTail) {
        log(`pool ${directory}: replayed ${loaded.replayedRecords} journal records${loaded.tornTail ? ' (a torn tail from a crash was dropped)' : ''}`);
      }
      return pool;
    } catch (error) {
      fs.closeSync(lockFd);
      throw error;
    }
  }

  // ---- control: volumes ----

  /** Creates a thin volume; nothing is allocated until it is written. */
  async createVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    this.#checkOpen();
    validateName(name);
    checkVolumeSize(sizeBytes);
    this.#checkNewVolumeName(name);
    this.record({ type: 'create', volumeId: this.#catalog.nextVolumeId, name, sizeBytes });
    await this.commit();
    return this.volumeInfo(name);
  }

  /** Removes a volume and gives its space back; refused while it is exported or has snapshots. */
  async removeVolume(name: string): Promise<void> {
    this.#checkOpen();
    const runtime = this.#runtime(name);
    if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${name} is in use (${runtime.openCount} open); disconnect its clients first`);
    const snapshots = [...runtime.meta.snapshots.keys()];
    if (snapshots.length > 0) {
      throw ChunkdError.busy(`volume ${name} has ${snapshots.length} snapshot(s) (${snapshots.slice(0, 5).join(', ')}${snapshots.length > 5 ? ', ...' : ''}); remove them first`);
    }
    this.record({ type: 'remove', volumeId: runtime.meta.id });
    this.#runtimes.delete(runtime.meta.id);
    await this.commit();
  }

  /** Grows a volume at once; shrinking needs `force` (the data past the new end is freed) and no open exports. */
  async resizeVolume(name: string, sizeBytes: number, force = false): Promise<VolumeInfo> {
    this.#checkOpen();
    const runtime = this.#runtime(name);
    checkVolumeSize(sizeBytes);
    const oldSize = runtime.meta.sizeBytes;
    if (sizeBytes < oldSize) {
      if (!force) throw ChunkdError.invalid(`shrinking volume ${name} from ${formatSize(oldSize)} to ${formatSize(sizeBytes)} discards data: pass --force`);
      if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${name} is in use (${runtime.openCount} open); it can shrink only when no client has it open`);
      const firstCut = sizeBytes / chunkSizeBytes;
      this.record({ type: 'unmap', volumeId: runtime.meta.id, virtualChunk: firstCut, chunkCount: oldSize / chunkSizeBytes - firstCut });
    }
    if (sizeBytes !== oldSize) this.record({ type: 'resize', volumeId: runtime.meta.id, sizeBytes });
    await this.commit();
    return this.volumeInfo(name);
  }

  listVolumes(): VolumeInfo[] {
    return [...this.#catalog.byName.keys()].sort().map((name) => this.volumeInfo(name));
  }

  volumeInfo(name: string): VolumeInfo {
    const runtime = this.#runtime(name);
    const meta = runtime.meta;
    return {
      name: meta.name,
      sizeBytes: meta.sizeBytes,
      allocatedBytes: meta.map.mappedCount * chunkSizeBytes,
      openCount: runtime.openCount,
      snapshots: [...meta.snapshots.keys()],
    };
  }

  hasVolume(name: string): boolean {
    return this.#catalog.byName.has(name);
  }

  /** Opens a volume for I/O; close() the result when done. */
  openVolume(name: string): Volume {
    this.#checkOpen();
    return new Volume(this, this.#runtime(name));
  }

  /** Opens a snapshot read-only; close() the result when done. */
  openSnapshot(volumeName: string, snapshotName: string): SnapshotDevice {
    this.#checkOpen();
    const snapshot = this.#snapshot(volumeName, snapshotName);
    return new SnapshotDevice(volumeName, snapshot, this, this.#snapshotRuntime(snapshot.id));
  }

  // ---- control: snapshots and clones ----

  /**
   * Takes a snapshot: waits for the volume's writes in flight (blocking new ones meanwhile), so it holds exactly
   * the writes acknowledged before it, records it, and makes it durable before returning.
   */
  async createSnapshot(volumeName: string, snapshotName: string): Promise<SnapshotInfo> {
    this.#checkOpen();
    validateName(snapshotName, 'snapshot');
    const runtime = this.#runtime(volumeName);
    if (runtime.meta.snapshots.has(snapshotName)) throw ChunkdError.exists(`snapshot ${volumeName}@${snapshotName} already exists`);
    if (runtime.meta.snapshots.size >= snapshotsPerVolumeMax) throw ChunkdError.invalid(`volume ${volumeName} has ${snapshotsPerVolumeMax} snapshots, the most a volume may have`);
    const release = await runtime.lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      this.record({ type: 'snapshot', volumeId: runtime.meta.id, snapshotId: this.#catalog.nextSnapshotId, name: snapshotName, createdAtMs: Date.now() });
    } finally {
      release();
    }
    await this.commit();
    return this.snapshotInfo(volumeName, snapshotName);
  }

  /** Removes a snapshot; chunks that clones or other snapshots still hold stay, the rest go back to the pool. */
  async removeSnapshot(volumeName: string, snapshotName: string): Promise<void> {
    this.#checkOpen();
    const snapshot = this.#snapshot(volumeName, snapshotName);
    const openCount = this.#snapshotRuntimes.get(snapshot.id)?.openCount ?? 0;
    if (openCount > 0) throw ChunkdError.busy(`snapshot ${volumeName}@${snapshotName} is exported (${openCount} open); disconnect its clients first`);
    this.record({ type: 'snapshot-remove', snapshotId: snapshot.id });
    this.#snapshotRuntimes.delete(snapshot.id);
    await this.commit();
  }

  /** Makes the volume's contents the snapshot's again; refused while the volume is exported. Durable on return. */
  async rollbackVolume(volumeName: string, snapshotName: string): Promise<VolumeInfo> {
    this.#checkOpen();
    const runtime = this.#runtime(volumeName);
    const snapshot = this.#snapshot(volumeName, snapshotName);
    if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${volumeName} is exported (${runtime.openCount} open); disconnect its clients before a rollback`);
    this.record({ type: 'rollback', volumeId: runtime.meta.id, snapshotId: snapshot.id });
    await this.commit();
    return this.volumeInfo(volumeName);
  }

  /** Creates a writable volume that starts as the snapshot's image and shares its chunks. */
  async cloneSnapshot(volumeName: string, snapshotName: string, newName: string): Promise<VolumeInfo> {
    this.#checkOpen();
    validateName(newName);
    const snapshot = this.#snapshot(volumeName, snapshotName);
    this.#checkNewVolumeName(newName);
    this.record({ type: 'clone', volumeId: this.#catalog.nextVolumeId, name: newName, snapshotId: snapshot.id });
    await this.commit();
    return this.volumeInfo(newName);
  }

  listSnapshots(volumeName: string): SnapshotInfo[] {
    const volume = this.#runtime(volumeName).meta;
    return [...volume.snapshots.values()].sort((a, b) => a.createdAtMs - b.createdAtMs || a.id - b.id).map((s) => this.#describeSnapshot(volume, s));
  }

  snapshotInfo(volumeName: string, snapshotName: string): SnapshotInfo {
    return this.#describeSnapshot(this.#runtime(volumeName).meta, this.#snapshot(volumeName, snapshotName));
  }

  /** The extents that differ between snapshot `from` and snapshot `to` (or the live volume), from metadata alone. */
  diff(volumeName: string, fromName: string, toName: string | null): ChangedExtent[] {
    const volume = this.#runtime(volumeName).meta;
    const from = this.#snapshot(volumeName, fromName);
    const to = toName === null ? volume : this.#snapshot(volumeName, toName);
    return diffMaps(from.map, to.map, Math.max(from.sizeBytes, to.sizeBytes) / chunkSizeBytes);
  }

  /** Reads and checks every chunk of a volume and its snapshots while they stay in use (scrub.ts). */
  async scrub(volumeName: string, onProgress?: (doneBytes: number, totalBytes: number) => void): Promise<ScrubReport> {
    this.#checkOpen();
    const volume = this.#runtime(volumeName).meta;
    const exports = [
      { name: volume.name, runs: [...volume.map.mappedRuns()] },
      ...[...volume.snapshots.values()].map((snapshot) => ({ name: `${volume.name}@${snapshot.name}`, runs: [...snapshot.map.mappedRuns()] })),
    ];
    const store = { io: this.io, sums: this.sums, isMapped: (chunk: number) => this.refs.get(chunk) > 0, log: this.#log };
    const report = await scrub(store, volume.name, exports, onProgress);
    this.#log(`scrub of ${volume.name}: ${formatSize(report.checkedBytes)} checked in ${exports.length} export(s), ${report.badChunks} bad chunk(s)`);
    return report;
  }

  async status(): Promise<PoolStatus> {
    const stats = await fs.promises.statfs(this.directory);
    return {
      directory: this.directory,
      formatVersion: poolFormatVersion,
      volumeCount: this.#catalog.volumes.size,
      snapshotCount: this.#catalog.snapshots.size,
      allocatedBytes: this.allocator.usedCount * chunkSizeBytes,
      journalBytes: this.#journal.sizeBytes,
      generation: this.#generation,
      fileSystem: { sizeBytes: stats.blocks * stats.bsize, freeBytes: stats.bavail * stats.bsize },
      failure: this.#failure?.message ?? null,
      checksumErrorsTotal: this.#checksumErrorsTotal,
      verifyReads: this.verifyReads,
    };
  }

  /** Commits everything and releases the pool's lock. */
  async close(): Promise<void> {
    if (this.#closed) return;
    clearInterval(this.#timer);
    try {
      if (this.#failure === null) await this.commit();
    } finally {
      this.#closed = true;
      this.#journal.close();
      await this.io.close();
      this.chunkFiles.close();
      fs.closeSync(this.#lockFd);
    }
  }

  // ---- VolumeStore: what volumes call ----

  record(record: MetaRecord): void {
    // A map record replaces chunks with new ones of the same size: the next writes reuse their space, so punching
    // it out of the file (and having the file system allocate it again) would be wasted work.
    this.#punchFrees = record.type !== 'map';
    try {
      applyRecord(this.#catalog, record, this.refs);
    } finally {
      this.#punchFrees = true;
    }
    this.#queue.push(encodeRecords([record]));
    // Chunks freed by overwrites are reusable only after a commit: under a stream of overwrites and no FLUSH, commit
    // early rather than let the files grow by five seconds of writes.
    if (this.allocator.deferredCount >= deferredChunksCommitMax && this.#pendingCommit === null) {
      this.commit().catch((error) => this.#log(`commit to reuse freed space failed: ${(error as Error).message}`));
    }
  }

  get sums(): ChunkSums {
    return this.#catalog.sums;
  }

  corruption(report: CorruptionReport): ChunkdError {
    this.#checksumErrorsTotal += 1;
    const chunkFile = Math.floor(report.physicalChunk / chunksPerFile);
    const fileOffset = (report.physicalChunk % chunksPerFile) * chunkSizeBytes;
    const message =
      `checksum mismatch: ${report.exportName} at byte ${report.offsetBytes} (4 KiB chunk ${report.physicalChunk}, ` +
      `${this.chunkFiles.filePath(chunkFile)} at byte ${fileOffset}): expected crc32 ${hex(report.expected)}, read ${hex(report.actual)}`;
    this.#log(message);
    return ChunkdError.io(`${message}; the read fails rather than return damaged data`);
  }

  checkHealthy(): void {
    if (this.#failure !== null) throw this.#failure;
    if (this.#closed) throw new ChunkdError('ESHUTDOWN', 'the pool is closed');
  }

  /** Makes every write completed before this call durable; concurrent callers share one commit (group commit). */
  commit(): Promise<void> {
    if (this.#pendingCommit !== null) return this.#pendingCommit;
    const previous = this.#currentCommit ?? Promise.resolve();
    const next: Promise<void> = previous
      .catch(() => {})
      .then(() => {
        this.#pendingCommit = null;
        this.#currentCommit = next;
        return this.#runCommit();
      })
      .finally(() => {
        if (this.#currentCommit === next) this.#currentCommit = null;
      });
    this.#pendingCommit = next;
    return next;
  }

  async #runCommit(): Promise<void> {
    this.checkHealthy();
    const records = this.#queue;
    this.#queue = [];
    const freeMark = this.allocator.deferredMark();
    const checkpoint = this.#journal.sizeBytes >= journalCheckpointBytes ? encodeCheckpoint(this.#catalog, this.#generation + 1) : null;
    try {
      await this.chunkFiles.sync();
    } catch (error) {
      this.#queue = records.concat(this.#queue);
      this.#failure = ChunkdError.io(`syncing chunk files failed (${(error as Error).message}); the pool refuses writes until the node restarts`, error);
      this.#log(this.#failure.message);
      throw this.#failure;
    }
    try {
      if (checkpoint !== null) await this.#startGeneration(checkpoint);
      else await this.#journal.append(Buffer.concat(records));
    } catch (error) {
      this.#queue = records.concat(this.#queue);
      throw fromSystemError(error, 'metadata commit');
    }
    // The frees are durable now: punch their space out, then let the allocator hand them out again.
    const freed = this.allocator.takeDeferred(freeMark);
    await Promise.all(coalesce(freed.filter((extent) => extent.punch)).map((extent) => this.chunkFiles.punch(extent.start, extent.count))).catch((error) =>
      this.#log(`giving freed space back to the file system failed: ${(error as Error).message}`),
    );
    this.allocator.releaseTaken(freed);
  }

  async #startGeneration(checkpoint: Buffer): Promise<void> {
    const generation = this.#generation + 1;
    await writeCheckpointFile(this.directory, checkpoint);
    const journal = await JournalFile.create(journalPath(this.directory, generation));
    fsyncDirectory(this.directory);
    const old = this.#journal;
    this.#journal = journal;
    this.#generation = generation;
    old.close();
    fs.rmSync(old.path, { force: true });
  }

  async #punchUnusedSpace(): Promise<void> {
    const tasks: Array<Promise<void>> = [];
    for (const extent of this.allocator.freeExtents()) tasks.push(this.chunkFiles.punch(extent.start, extent.count));
    const files = this.chunkFiles.existingFiles();
    const lastFile = files[files.length - 1];
    if (lastFile !== undefined) {
      const end = (lastFile + 1) * chunksPerFile;
      if (end > this.allocator.highWater) tasks.push(this.chunkFiles.punch(this.allocator.highWater, end - this.allocator.highWater));
    }
    await Promise.all(tasks);
  }

  #describeSnapshot(volume: VolumeMeta, snapshot: SnapshotMeta): SnapshotInfo {
    // Chunks only this snapshot holds: on pages no other map shares, with a single reference.
    let uniqueChunks = 0;
    for (const [, page] of snapshot.map.pages()) {
      if (page.shareCount !== 1) continue;
      for (const slot of page.slots) if (slot > 0 && this.refs.get(slot - 1) === 1) uniqueChunks += 1;
    }
    return {
      volume: volume.name,
      name: snapshot.name,
      sizeBytes: snapshot.sizeBytes,
      createdAt: new Date(snapshot.createdAtMs).toISOString(),
      uniqueBytes: uniqueChunks * chunkSizeBytes,
      openCount: this.#snapshotRuntimes.get(snapshot.id)?.openCount ?? 0,
    };
  }

  #checkNewVolumeName(name: string): void {
    if (this.#catalog.byName.has(name)) throw ChunkdError.exists(`volume ${name} already exists`);
    if (this.#catalog.volumes.size >= volumesMax) throw ChunkdError.invalid(`a pool holds at most ${volumesMax} volumes`);
  }

  #runtime(name: string): VolumeRuntime {
    const meta = this.#catalog.byName.get(name);
    if (meta === undefined) throw ChunkdError.notFound(`no volume named ${name}`);
    let runtime = this.#runtimes.get(meta.id);
    if (runtime === undefined) {
      runtime = { meta, lock: new RangeLock(), openCount: 0 };
      this.#runtimes.set(meta.id, runtime);
    }
    // A rollback replaces the volume's meta fields in place; the runtime keeps pointing at the same object.
    return runtime;
  }

  #snapshot(volumeName: string, snapshotName: string): SnapshotMeta {
    const snapshot = this.#runtime(volumeName).meta.snapshots.get(snapshotName);
    if (snapshot === undefined) throw ChunkdError.notFound(`no snapshot ${volumeName}@${snapshotName}`);
    return snapshot;
  }

  #snapshotRuntime(snapshotId: number): ExportRuntime {
    let runtime = this.#snapshotRuntimes.get(snapshotId);
    if (runtime === undefined) {
      runtime = { openCount: 0 };
      this.#snapshotRuntimes.set(snapshotId, runtime);
    }
    return runtime;
  }

  #checkOpen(): void {
    if (this.#closed) throw new ChunkdError('ESHUTDOWN', 'the pool is closed');
  }
}

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

function hex(value: number): string {
  return value.toString(16).padStart(8, '0');
}

function checkVolumeSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % volumeSizeAlignBytes !== 0 || sizeBytes > volumeSizeMaxBytes) {
    throw ChunkdError.invalid(`invalid volume size ${sizeBytes}: it must be a positive multiple of ${formatSize(volumeSizeAlignBytes)} up to ${formatSize(volumeSizeMaxBytes)}`);
  }
}

function journalPath(directory: string, generation: number): string {
  return path.join(directory, `journal-${generation}`);
}

/** Creates the pool's marker file in a missing or empty directory; refuses a non-empty directory that is not a pool. */
export function initializePool(directory: string): void {
  fs.mkdirSync(directory, { recursive: true, mode: 0o700 });
  const markerPath = path.join(directory, 'chunkd-pool.json');
  if (fs.existsSync(markerPath)) return;
  const entries = fs.readdirSync(directory).filter((name) => !name.endsWith('.sock') && name !== 'lock');
  if (entries.length > 0) throw ChunkdError.invalid(`${directory} is not empty and holds no chunkd pool (no chunkd-pool.json); use an empty or new directory`);
  const marker = { format: poolFormatName, formatVersion: poolFormatVersion, chunkSizeBytes, chunksPerFile, createdAt: new Date().toISOString() };
  const temporary = `${markerPath}.tmp`;
  fs.writeFileSync(temporary, `${JSON.stringify(marker, null, 2)}\n`, { mode: 0o600 });
  fsyncFile(temporary);
  fs.renameSync(temporary, markerPath);
  fsyncDirectory(directory);
}

/** Checks the marker file; throws a clear error for anything that is not a pool of this version. */
export function checkPoolMarker(directory: string): void {
  const markerPath = path.join(directory, 'chunkd-pool.json');
  let marker: { format?: unknown; formatVersion?: unknown; chunkSizeBytes?: unknown; chunksPerFile?: unknown };
  try {
    marker = JSON.parse(fs.readFileSync(markerPath, 'utf8'));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw ChunkdError.notFound(`${directory} is not a chunkd pool (no chunkd-pool.json)`);
    throw ChunkdError.corrupt(`${markerPath} is unreadable: ${(error as Error).message}`);
  }
  if (marker.format !== poolFormatName) throw ChunkdError.corrupt(`${markerPath} does not describe a chunkd pool`);
  if (marker.formatVersion === 1) {
    throw ChunkdError.invalid(`pool ${directory} has format version 1, from before per-block checksums; this chunkd reads version ${poolFormatVersion}: copy its volumes out with chunkd 0.1 (e.g. nbdcopy) into a new pool`);
  }
  if (marker.formatVersion !== poolFormatVersion) throw ChunkdError.invalid(`pool ${directory} has format version ${String(marker.formatVersion)}; this chunkd reads version ${poolFormatVersion}`);
  if (marker.chunkSizeBytes !== chunkSizeBytes || marker.chunksPerFile !== chunksPerFile) throw ChunkdError.invalid(`pool ${directory} was made with another chunk geometry`);
}

/** Takes the pool's lock for this process; refuses with EBUSY (naming the holder's pid) if another has it. */
export function lockPool(directory: string): number {
  const lockPath = path.join(directory, 'lock');
  const fd = fs.openSync(lockPath, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  if (!tryLockExclusive(fd)) {
    const holder = fs.readFileSync(lockPath, 'utf8').trim();
    fs.closeSync(fd);
    throw ChunkdError.busy(`pool ${directory} is in use by another chunkd process${holder ? ` (pid ${holder})` : ''}`);
  }
  fs.ftruncateSync(fd, 0);
  fs.writeSync(fd, `${process.pid}\n`, 0);
  return fd;
}

/** Reads the checkpoint and replays its journal, without changing anything on disk. */
export function loadMetadata(directory: string): LoadedMetadata {
  checkPoolMarker(directory);
  const checkpointPath = path.join(directory, 'checkpoint');
  let catalog = emptyCatalog();
  let generation = 0;
  if (fs.existsSync(checkpointPath)) {
    ({ catalog, generation } = decodeCheckpoint(fs.readFileSync(checkpointPath)));
  }
  // Frees during replay need no action: the allocator is built from the counts that remain.
  const refs = new ChunkRefcounts(() => {});
  countReferences(catalog, refs);
  const bytes = readJournal(journalPath(directory, generation));
  if (bytes === null) return { catalog, refs, generation, replayedRecords: 0, tornTail: false };
  const journal = decodeJournal(bytes);
  for (const record of journal.records) applyRecord(catalog, record, refs);
  return { catalog, refs, generation, replayedRecords: journal.records.length, tornTail: journal.tornTail };
}

async function writeCheckpointFile(directory: string, bytes: Buffer): Promise<void> {
  const target = path.join(directory, 'checkpoint');
  const temporary = `${target}.tmp`;
  const handle = await fs.promises.open(temporary, 'w', 0o600);
  try {
    await handle.writeFile(bytes);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(temporary, target);
}

function removeOtherJournals(directory: string, generation: number): void {
  for (const name of fs.readdirSync(directory)) {
    if (/^journal-\d+$/.test(name) && name !== `journal-${generation}`) fs.rmSync(path.join(directory, name), { force: true });
  }
}

function fsyncFile(filePath: string): void {
  const fd = fs.openSync(filePath, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export function fsyncDirectory(directory: string): void {
  fsyncFile(directory);
}
