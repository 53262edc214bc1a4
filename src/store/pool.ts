// # The pool: chunkd's on-disk design
//
// A pool is a directory on one local file system: a marker, a lock, two copies of a checkpoint and of a journal
// of metadata, and chunk files of data (the files and the order they are written in: pool-layout.ts).
//
// Data: a volume maps its 4 KiB virtual chunks to physical chunks (ChunkMap: a two-level table, pages only where
// written); physical chunk i is at (i mod 2^18) * 4 KiB of chunk file i >> 18 (chunk-files.ts). Every write gets
// one fresh contiguous physical run from the allocator (redirect-on-write: a chunk the metadata names is never
// overwritten, volume.ts), and its map record carries the CRC-32 of each chunk, which every read checks. So space
// used is data written (at 4 KiB granularity, whatever the volume's size), a 1 MiB write is one pwrite, a 4 KiB
// write after a snapshot writes 4 KiB, and a block and its checksum cannot disagree after a crash. Snapshots and
// clones share the map's pages and reference-count chunks per page (chunk-map.ts): O(pages) to take, one lookup
// to read whatever their number, and "what changed between two snapshots" is a page-by-page comparison that skips
// shared pages. Chunks freed by trims and removals are punched out of the files (fallocate), so the space goes
// back to the file system; chunks freed by overwrites are only recycled (the next writes take them), as punching
// and reallocating them would be wasted work.
//
// Metadata: all in memory, made durable by a write-ahead journal of small records plus a periodic checkpoint,
// not by a general-purpose database (LMDB was weighed): the records are small (one per write or trim: 37 bytes
// and 4 per chunk), replay is a fold of `applyRecord` (the same code the live node runs), group commit falls
// out of one file append, and the crash-ordering rules below are ours to see and test rather than hidden in a
// store's sync modes. The cost is that a checkpoint rewrites the whole map (compact: runs, not chunks). Both the
// journal and the checkpoint are kept in two copies with checksummed frames, as ZFS keeps ditto copies of its
// metadata: a damaged copy is read from the other and rewritten whole at the next start (journal-format.ts says
// how a torn tail is told from damage).
//
// Invariants that make a crash at any moment safe, including a power loss that drops or tears writes no
// fdatasync covered (src/testing/power-loss.ts simulates exactly that):
//  1. A map record is queued only after its chunk's data write completed; a commit fdatasyncs the chunk files
//     (and their directory, when a file is new) before it writes the journal. So committed metadata never names
//     a chunk whose data is not durable.
//  2. A freed chunk is punched and reused only after the commit that recorded the free is durable (deferred
//     frees), so a crash can neither show a volume a chunk another has since written, nor bring back a removed
//     snapshot whose data was already punched. With invariant 1 and redirect-on-write, a chunk's bytes never
//     change while any metadata on disk names it, so its recorded checksum stays true across any crash.
//  3. A commit is durable in both journal copies before the next one starts, and a FLUSH replies only after its
//     commit's fdatasyncs, so everything it covers is in both; only the last commit can be torn by a crash.
//  4. A generation starts in the order pool-layout.ts gives: a crash leaves the old checkpoint and journal, or
//     the new ones, and never a newer journal with commits whose checkpoint is gone.
//  5. Reference counts are never stored: they are rebuilt from the maps at load, so they cannot disagree with them.
//  6. At load, chunks the metadata does not name are punched out: data written but never committed, and chunks
//     recycled by overwrites, are space only. Metadata that cannot be read whole refuses the load before anything
//     is written, so a damaged pool is never punched.
// After a failed fdatasync, or a failed write of the journal or a checkpoint, the pool refuses all further writes
// (a sticky error, as SQLite's pager): the kernel may have dropped the pages, so later flushes could not be
// trusted. Reads go on. Only a restart, which reads back what is durable, clears it. A full file system is not
// such a failure: a commit that meets ENOSPC fails and is retried by the next.
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError, fromSystemError } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
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
import { encodeCheckpoint } from './checkpoint.ts';
import { realFiles, type FileLayer } from './file-layer.ts';
import type { JournalFile } from './journal-file.ts';
import { diffMaps, type ChangedExtent } from './map-diff.ts';
import { scrub, type ScrubReport } from './scrub.ts';
import { applyRecord, encodeRecords, type Catalog, type MetaRecord, type SnapshotMeta, type VolumeMeta } from './metadata.ts';
import { beginGeneration, chunksDirectory, initializePool, loadMetadata, lockPool, poolFormatVersion } from './pool-layout.ts';
import { RangeLock } from './range-lock.ts';
import { InlineChunkIo, type ChunkIo } from './chunk-io.ts';
import type { ChunkSums } from './chunk-sums.ts';
import { SnapshotDevice, Volume, type CorruptionReport, type ExportRuntime, type VolumeRuntime, type VolumeStore } from './volume.ts';

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
  /** Why the pool refuses writes (a failed sync or metadata write), or null while it takes them. */
  failure: string | null;
  /** The last commit's failure when it was not final (a full file system), or null once a commit succeeds again. */
  commitError: string | null;
  commitFailuresTotal: number;
  /** Damaged or missing metadata copies found at open and repaired from the other copy. */
  metadataRepairsTotal: number;
  /** Reads that failed their checksum since the node started. */
  checksumErrorsTotal: number;
  verifyReads: boolean;
}

export interface PoolOptions {
  directory: string;
  log?: (line: string) => void;
  /** The file system as the pool sees it (default: the real one; tests give a faulty or power-losing twin). */
  files?: FileLayer;
  /** Journal size that starts a new checkpoint (default limits.journalCheckpointBytes; small in tests). */
  journalCheckpointBytes?: number;
  /** How often unflushed writes are committed in the background (default limits.backgroundCommitIntervalMs). */
  backgroundCommitIntervalMs?: number;
  /** Makes the engine that carries chunk reads and writes (default: inline, on the calling thread). */
  makeIo?: (chunkFiles: ChunkFiles) => ChunkIo;
  /** Verify checksums on reads (default true); false only to measure what verification costs. */
  verifyReads?: boolean;
}

/** The metadata a pool opens with: what was loaded, and the generation just started. */
interface OpenedMetadata {
  catalog: Catalog;
  refs: ChunkRefcounts;
  generation: number;
  journal: JournalFile;
  repairs: number;
}

export class Pool implements VolumeStore {
  readonly directory: string;
  readonly files: FileLayer;
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
  readonly #journalCheckpointBytes: number;
  readonly #metadataRepairs: number;
  #generation: number;
  #journal: JournalFile;
  /** Records applied but not yet committed, each already encoded as a journal frame (the cost spread over writes). */
  #queue: Buffer[] = [];
  #currentCommit: Promise<void> | null = null;
  #pendingCommit: Promise<void> | null = null;
  #failure: ChunkdError | null = null;
  #commitError: string | null = null;
  #commitFailures = 0;
  #timer: NodeJS.Timeout;
  #closed = false;

  private constructor(directory: string, lockFd: number, opened: OpenedMetadata, allocator: ChunkAllocator, chunkFiles: ChunkFiles, options: PoolOptions) {
    const log = options.log ?? (() => {});
    this.directory = directory;
    this.files = chunkFiles.layer;
    this.#lockFd = lockFd;
    this.#catalog = opened.catalog;
    this.#generation = opened.generation;
    this.#journal = opened.journal;
    this.#metadataRepairs = opened.repairs;
    this.allocator = allocator;
    this.refs = opened.refs;
    // From now on a chunk whose last reference goes is free, once the commit that records it is durable.
    this.refs.onFree = (physicalChunk) => allocator.freeDeferred(physicalChunk, 1, this.#punchFrees);
    this.chunkFiles = chunkFiles;
    this.io = options.makeIo?.(this.chunkFiles) ?? new InlineChunkIo(this.chunkFiles);
    this.verifyReads = options.verifyReads ?? true;
    this.#journalCheckpointBytes = options.journalCheckpointBytes ?? journalCheckpointBytes;
    this.#log = log;
    this.#timer = setInterval(() => {
      // A failure is logged, counted and shown in status by the commit itself; only a bug goes further (fail-stop).
      if (this.#queue.length > 0 || this.allocator.deferredCount > 0) this.commit().catch((error: unknown) => expectedError(error, 'background commit'));
    }, options.backgroundCommitIntervalMs ?? backgroundCommitIntervalMs);
    this.#timer.unref();
  }

  /**
   * Opens the pool in `directory`, creating it if the directory is missing or empty; locks it for this process.
   * Metadata found damaged in one copy is read from the other and written whole again; metadata that cannot be
   * read without loss refuses the open (ECORRUPT, naming file and offset) before anything is written.
   */
  static async open(options: PoolOptions): Promise<Pool> {
    const directory = path.resolve(options.directory);
    const files = options.files ?? realFiles;
    const log = options.log ?? (() => {});
    await initializePool(files, directory);
    const lockFd = lockPool(files, directory);
    try {
      const loaded = await loadMetadata(files, directory);
      for (const line of loaded.repairs) log(`metadata repaired: ${line}`);
      const allocator = ChunkAllocator.fromUsed(loaded.refs.usedRuns());
      // The chunk files found now are named durably before anything depends on it (chunk-files.ts).
      const chunkFiles = new ChunkFiles(chunksDirectory(directory), files);
      await files.syncDirectory(chunkFiles.directory);
      await files.syncDirectory(directory);
      // Start a fresh generation: its checkpoint absorbs the replayed journal (and drops any torn tail), and
      // writes both copies whole again, which is the repair of a damaged one.
      const generation = loaded.generation + 1;
      const journal = await beginGeneration(files, directory, encodeCheckpoint(loaded.catalog, generation), generation).catch((error: unknown) => {
        throw fromSystemError(error, `starting metadata generation ${generation} in ${directory}`);
      });
      const pool = new Pool(directory, lockFd, { ...loaded, generation, journal, repairs: loaded.repairs.length }, allocator, chunkFiles, options);
      await pool.#punchUnusedSpace();
      if (loaded.replayedRecords > 0 || loaded.tornTail) {
        log(`pool ${directory}: replayed ${loaded.replayedRecords} journal records${loaded.tornTail ? ' (a torn tail from a crash was dropped)' : ''}`);
      }
      return pool;
    } catch (error) {
      files.close(lockFd);
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
      commitError: this.#commitError,
      commitFailuresTotal: this.#commitFailures,
      metadataRepairsTotal: this.#metadataRepairs,
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
      this.files.close(this.#lockFd);
    }
  }

  /**
   * Drops the pool without writing anything more: a test's simulated power loss, after its file layer has
   * stopped answering (src/testing/power-loss.ts). Stops the background commit and the I/O workers; descriptors
   * are the test's to close.
   */
  async abandon(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#timer);
    await this.io.close({ force: true });
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
      this.commit().catch((error: unknown) => expectedError(error, 'commit to reuse freed space'));
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
    const checkpoint = this.#journal.sizeBytes >= this.#journalCheckpointBytes ? encodeCheckpoint(this.#catalog, this.#generation + 1) : null;
    try {
      await this.chunkFiles.sync();
    } catch (error) {
      this.#queue = records.concat(this.#queue);
      throw this.#fail(`syncing chunk files failed (${(error as Error).message})`, error);
    }
    try {
      if (checkpoint !== null) await this.#startGeneration(checkpoint);
      else await this.#journal.append(Buffer.concat(records));
    } catch (error) {
      this.#queue = records.concat(this.#queue);
      // A full file system stops this commit only: at most part of it reached a copy, unsynced, and the next
      // commit writes the same offset with the same sequence number. Anything else may have left a copy written
      // but not durable, or a rotation half done.
      if ((error as NodeJS.ErrnoException).code === 'ENOSPC' && checkpoint === null) {
        this.#commitFailures += 1;
        this.#commitError = `metadata commit failed: ${(error as Error).message}`;
        this.#log(this.#commitError);
        throw fromSystemError(error, 'metadata commit');
      }
      throw this.#fail(`${checkpoint === null ? 'writing the metadata journal' : 'starting a new metadata checkpoint'} failed (${(error as Error).message})`, error);
    }
    this.#commitError = null;
    // The frees are durable now: punch their space out, then let the allocator hand them out again.
    const freed = this.allocator.takeDeferred(freeMark);
    await Promise.all(coalesce(freed.filter((extent) => extent.punch)).map((extent) => this.chunkFiles.punch(extent.start, extent.count))).catch((error) =>
      this.#log(`giving freed space back to the file system failed: ${(error as Error).message}`),
    );
    this.allocator.releaseTaken(freed);
  }

  /** Makes the pool refuse writes from now on (the sticky failure); returns the error to throw. */
  #fail(reason: string, cause: unknown): ChunkdError {
    this.#commitFailures += 1;
    this.#failure = ChunkdError.io(`${reason}; the pool refuses writes until the node restarts`, cause);
    this.#commitError = this.#failure.message;
    this.#log(this.#failure.message);
    return this.#failure;
  }

  async #startGeneration(checkpoint: Buffer): Promise<void> {
    const generation = this.#generation + 1;
    const journal = await beginGeneration(this.files, this.directory, checkpoint, generation);
    const old = this.#journal;
    this.#journal = journal;
    this.#generation = generation;
    old.close();
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

