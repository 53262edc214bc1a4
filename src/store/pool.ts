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
// Metadata: all in memory, made durable by a write-ahead journal of small records plus a periodic checkpoint, both
// in two checksummed copies; commit-engine.ts says how, and the invariants that make a crash at any moment safe.
// It grows with the map pages touched and every start rebuilds it (BENCHMARKS.md, "Metadata at scale"). A pool
// created with paged metadata (format 4, `serve --metadata paged`) keeps it in pages on disk behind a bounded cache
// instead (paged-metadata.md, paged-backend.ts); the pool holds either behind catalog-backend.ts's interface.
//
// The pool itself is the catalog's control operations (create, resize, snapshot, clone, rollback, diff, scrub),
// each a metadata record committed before it returns, over three parts it keeps to itself: the chunk store
// (chunk-store.ts: the data, as verbs), the commit engine (commit-engine.ts: records made durable) and the files on
// disk (pool-layout.ts). A volume sees only the chunk store's data verbs and the engine's record and commit (its
// VolumeStore, volume.ts).
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError, fromSystemError, isNoSpace } from '../core/errors.ts';
import {
  backgroundCommitIntervalMs,
  chunkSizeBytes,
  deferredChunksCommitMax,
  metadataCacheBytesDefault,
  readDefragInFlightBytesMax,
  snapshotsPerVolumeMax,
  volumeSizeAlignBytes,
  volumeSizeMaxBytes,
  volumesMax,
} from '../core/limits.ts';
import { validateName } from '../core/names.ts';
import { formatSize } from '../core/units.ts';
import { ChunkAllocator } from './allocator.ts';
import { MemoryBackend, type CatalogBackend, type CatalogView, type MapHandle, type SnapshotView, type VolumeView } from './catalog-backend.ts';
import { encodeCheckpoint } from './checkpoint.ts';
import { ChunkFiles } from './chunk-files.ts';
import { InlineChunkIo, type ChunkIo, type IoEngineStatus } from './chunk-io.ts';
import { ChunkStore } from './chunk-store.ts';
import { CommitEngine, type CheckpointReport } from './commit-engine.ts';
import { realFiles, type FileLayer } from './file-layer.ts';
import type { ChangedExtent } from './map-diff.ts';
import type { JournalFile } from './journal-file.ts';
import { HeldAloneMemo } from './held-alone.ts';
import { isSnapshotUuid } from './metadata.ts';
import { openPaged } from './paged-backend.ts';
import { pagedCatalogFile } from './paged-catalog.ts';
import { removeUpgradeLeftovers } from './pool-upgrade.ts';
import { beginGeneration, checkPoolMarker, chunksDirectory, chunksHoldData, initializePool, loadMetadata, lockPool, poolIdentity, type MetadataKind } from './pool-layout.ts';
import { zeroChunkSum } from './checksum.ts';
import { RangeLock } from './range-lock.ts';
import type { ScrubReport } from './scrub.ts';
import type { ChunkSpace } from './space-map.ts';
import { SnapshotDevice, Volume, type ExportRuntime, type ReadDefrag, type VolumeRuntime, type VolumeStore } from './volume.ts';
import type { Log } from '../core/log.ts';
import { emptyStageTimes, timedVolumeStore, type StageTimes } from './stage-times.ts';
import type { LatencyHistogram } from '../core/latency-histogram.ts';

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
  /** Unique across nodes (metadata.ts); a received snapshot keeps its sender's. */
  uuid: string;
  sizeBytes: number;
  createdAt: string;
  openCount: number;
}

/** A snapshot as `snapshot list` and `snapshot info` show it: counted (`Pool.countedSnapshots`). */
export interface CountedSnapshotInfo extends SnapshotInfo {
  /** Bytes of chunks that only this snapshot holds: what removing it gives back. */
  uniqueBytes: number;
}

export interface PoolStatus {
  directory: string;
  formatVersion: number;
  volumeCount: number;
  snapshotCount: number;
  allocatedBytes: number;
  /**
   * The chunk files' span (ChunkStore.spanBytes): above `allocatedBytes` by the chunks freed since the last commit
   * and the free chunks the files keep for reuse (random overwrites leave many: README, Durability).
   */
  chunkFilesBytes: number;
  journalBytes: number;
  generation: number;
  fileSystem: { sizeBytes: number; freeBytes: number };
  /** Why the pool refuses writes (a failed sync or metadata write), or null while it takes them. */
  failure: string | null;
  /** The last commit's failure when it was not final (a full file system), or null once a commit succeeds again. */
  commitError: string | null;
  commitFailuresTotal: number;
  freeChunksGivenBackBytesTotal: number;
  /** Writes that waited for a commit before taking chunks, while the chunks freed and not yet reusable were past their bound. */
  writesHeldForFreedSpaceTotal: number;
  checkpointsTotal: number;
  lastCheckpoint: CheckpointReport | null;
  checkpointEncodeSecondsMax: number;
  /** Damaged or missing metadata copies found at open and repaired from the other copy. */
  metadataRepairsTotal: number;
  /** Reads that failed their checksum since the node started. */
  checksumErrorsTotal: number;
  verifyReads: boolean;
  /** Whether large reads that find their range scattered rewrite it as one run (PoolOptions.readDefrag). */
  readDefrag: boolean;
  /** Bytes such rewrites wrote since the pool opened. */
  readDefragBytesTotal: number;
}

export interface PoolOptions {
  directory: string;
  log?: Log;
  /** The file system as the pool sees it (default: the real one; tests give a faulty or power-losing twin). */
  files?: FileLayer;
  /** Journal size that starts a new checkpoint (default: the catalog's, limits.journalCheckpointBytes or pagedJournalCheckpointBytes; small in tests). */
  journalCheckpointBytes?: number;
  /** How often unflushed writes are committed in the background (default limits.backgroundCommitIntervalMs). */
  backgroundCommitIntervalMs?: number;
  /** Chunks freed and not yet reusable that start a commit (default limits.deferredChunksCommitMax; small in tests). */
  freedChunksCommitMax?: number;
  /** Makes the engine that carries chunk reads and writes (default: inline, on the calling thread). */
  makeIo?: (chunkFiles: ChunkFiles, waitTimes: LatencyHistogram) => ChunkIo;
  /** Verify checksums on reads (default true); false only to measure what verification costs. */
  verifyReads?: boolean;
  /**
   * Large reads that find their range in many small pieces (rewritten at random) a second time rewrite it in the
   * background as one fresh run, while no snapshot exists in the pool (volume.ts's #defragment, limits.readDefragBytesMin).
   * Default true.
   */
  readDefrag?: boolean;
  /** The metadata a pool created now gets (default memory; an existing pool keeps its own: chunkd-pool.json). */
  metadata?: MetadataKind;
  /** The paged metadata's cache of clean pages, in bytes (default limits.metadataCacheBytesDefault). */
  metadataCacheBytes?: number;
  /** Paged metadata: how long a checkpoint encodes map nodes between two turns of the event loop (default 5 ms; 0 in tests, a turn every few nodes). */
  metadataCommitSliceMs?: number;
  /** Paged metadata: the memory of map nodes changed since the last checkpoint that starts the next (default: the cache's size, at least limits.metadataDirtyBytesMin). */
  metadataDirtyBytes?: number;
  /** Paged metadata: checkpoints of at least this many pages write them on a thread of their own (default page-writer.ts's pageWriterMinPages; null: never). */
  metadataPageWriterMinPages?: number | null;
  /** Paged metadata: the count of map nodes changed since the last checkpoint that starts the next, whatever their memory (default limits.metadataReplayPagesMax: it bounds what a crash leaves to replay). */
  metadataDirtyPages?: number;
  /** Paged metadata: the estimated cost of the replay a crash would leave (microseconds) that starts the next checkpoint (default limits.metadataReplayCostMaxUs). */
  metadataReplayCostMaxUs?: number;
  /**
   * Paged metadata: the root covering an open's replay, written in the background, starts its work only once this
   * settles (or a record or checkpoint comes first): a node passes its start, so that the ready line does not wait
   * behind it for the CPU (paged-backend.ts's `openPaged`). Default: at once.
   */
  metadataRootAfter?: Promise<unknown>;
}

/** The metadata a pool opens with: its catalog, and the generation just started. */
interface OpenedMetadata {
  catalog: CatalogBackend;
  generation: number;
  journal: JournalFile;
  repairs: number;
}

export class Pool {
  readonly directory: string;
  readonly #catalog: CatalogBackend;
  readonly #chunks: ChunkStore;
  readonly #engine: CommitEngine;
  /** What volumes and snapshot devices are given: the data verbs and the engine's record and commit, nothing else. */
  readonly #volumeStore: VolumeStore;
  /** Time spent in the store's stages by every volume's requests (stage-times.ts). */
  readonly #stageTimes = emptyStageTimes();
  readonly #files: FileLayer;
  readonly #runtimes = new Map<number, VolumeRuntime>();
  readonly #snapshotRuntimes = new Map<number, ExportRuntime>();
  /** Volumes a stream is being received into (replication/receive.ts): clients may not open or change them. */
  readonly #receiving = new Set<number>();
  readonly #lockFd: number;
  readonly #log: Log;
  readonly #metadataRepairs: number;
  readonly #readDefragOn: boolean;
  /** Read defragmentation's rewrites in flight (close waits for them), their bytes, and the bytes rewritten so far. */
  readonly #defrags = new Set<Promise<void>>();
  #defragBytesInFlight = 0;
  #defragBytesTotal = 0;
  /** What each snapshot holds alone, remembered between lists (held-alone.ts): told every record the catalog applies. */
  readonly #heldAlone: HeldAloneMemo;
  /** The punch of free chunks a paged open leaves running (never rejects). */
  #punching: Promise<void> = Promise.resolve();
  /** Lets the root after a paged open's replay go without waiting for `metadataRootAfter` (the close: the punch waits for that root). */
  #letRootGo = (): void => {};
  #closed = false;

  private constructor(directory: string, lockFd: number, opened: OpenedMetadata, chunkFiles: ChunkFiles, options: PoolOptions) {
    const log = options.log ?? (() => {});
    this.directory = directory;
    this.#files = chunkFiles.layer;
    this.#lockFd = lockFd;
    this.#catalog = opened.catalog;
    this.#heldAlone = new HeldAloneMemo(opened.catalog.tables);
    opened.catalog.onApplied = (record) => this.#heldAlone.observe(record);
    this.#metadataRepairs = opened.repairs;
    this.#log = log;
    this.#chunks = new ChunkStore({
      chunkFiles,
      allocator: opened.catalog.allocator,
      io: options.makeIo?.(chunkFiles, this.#stageTimes.worker_wait) ?? new InlineChunkIo(chunkFiles),
      verifyReads: options.verifyReads ?? true,
      log,
      reclaim: () => this.#engine.reclaim(),
    });
    this.#engine = new CommitEngine({
      catalog: opened.catalog,
      chunks: this.#chunks,
      journal: opened.journal,
      generation: opened.generation,
      journalCheckpointBytes: options.journalCheckpointBytes ?? opened.catalog.journalCheckpointBytes,
      freedChunksCommitMax: options.freedChunksCommitMax ?? deferredChunksCommitMax,
      backgroundCommitIntervalMs: options.backgroundCommitIntervalMs ?? backgroundCommitIntervalMs,
      log,
    });
    this.#readDefragOn = options.readDefrag ?? true;
    const readDefrag: ReadDefrag = { allowed: () => this.#defragAllowed(), start: (bytes, rewrite) => this.#startDefrag(bytes, rewrite) };
    this.#volumeStore = timedVolumeStore({ chunks: this.#chunks, metadata: this.#engine, writeGate: (volume) => this.#writeGate(volume), readDefrag }, this.#stageTimes);
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
    await initializePool(files, directory, options.metadata);
    const lockFd = lockPool(files, directory);
    try {
      const kind = await checkPoolMarker(files, directory);
      if (kind === 'memory' && options.metadata === 'paged') {
        throw ChunkdError.invalid(`pool ${directory} has its metadata in memory (format 3), not paged: upgrade it first, with no node on it, by chunkd pool upgrade --pool ${directory} --metadata paged (or start the node without --metadata paged)`);
      }
      for (const name of await removeUpgradeLeftovers(files, directory, kind)) log(`pool ${directory}: removed ${name}, left by a pool upgrade cut short`);
      if (kind === 'paged') return await Pool.#openPaged(directory, lockFd, files, options);
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
      const checkpoint = encodeCheckpoint(loaded.catalog, generation);
      const journal = await beginGeneration(files, directory, checkpoint, generation)
        .catch(async (error: unknown) => {
          // A full file system: the chunks the metadata does not name (recycled by overwrites, kept for reuse) are
          // punched first, as they are after the open anyway (safe now: the metadata read back is what is durable),
          // and the same checkpoint is written again (the same bytes: a copy the first try wrote stays whole).
          if (!isNoSpace(error)) throw error;
          await Promise.all(allocator.freeExtents().map((extent) => chunkFiles.punch(extent.start, extent.count)));
          log(`pool ${directory}: the file system was full at the open's checkpoint; the free chunks were punched first`, 'warn');
          return beginGeneration(files, directory, checkpoint, generation);
        })
        .catch((error: unknown) => {
          throw fromSystemError(error, `starting metadata generation ${generation} in ${directory}`);
        });
      const catalog = new MemoryBackend({ catalog: loaded.catalog, refs: loaded.refs, allocator, files, directory });
      const pool = new Pool(directory, lockFd, { catalog, generation, journal, repairs: loaded.repairs.length }, chunkFiles, options);
      await pool.#chunks.punchUnused();
      if (loaded.replayedRecords > 0 || loaded.tornTail) {
        log(`pool ${directory}: replayed ${loaded.replayedRecords} journal records${loaded.tornTail ? ' (a torn tail from a crash was dropped)' : ''}`);
      }
      return pool;
    } catch (error) {
      files.close(lockFd);
      throw error;
    }
  }

  /** The rest of `open` for a pool of paged metadata (paged-backend.ts). */
  static async #openPaged(directory: string, lockFd: number, files: FileLayer, options: PoolOptions): Promise<Pool> {
    const log = options.log ?? (() => {});
    // A missing page file is a new pool's (PagedCatalog.open makes it): not where data was written (as loadMetadata
    // refuses a format-3 pool with no checkpoint and data).
    const pageFiles = [0, 1].map((copy) => path.join(directory, `${pagedCatalogFile}.${copy}`));
    if (!pageFiles.some((file) => fs.existsSync(file)) && chunksHoldData(directory)) {
      throw ChunkdError.corrupt(`pool ${directory}: ${pageFiles.map((file) => path.basename(file)).join(' and ')} are both missing, but chunks/ holds data`);
    }
    let letRootGo = (): void => {};
    const rootAfter = options.metadataRootAfter === undefined ? undefined : Promise.race([options.metadataRootAfter, new Promise<void>((resolve) => (letRootGo = resolve))]);
    const opened = await openPaged(files, directory, { cacheBytes: options.metadataCacheBytes ?? metadataCacheBytesDefault, commitSliceMs: options.metadataCommitSliceMs, dirtyBytes: options.metadataDirtyBytes, dirtyPages: options.metadataDirtyPages, replayCostMaxUs: options.metadataReplayCostMaxUs, pageWriterMinPages: options.metadataPageWriterMinPages, log }, rootAfter).catch((error: unknown) => {
      throw fromSystemError(error, `opening the paged metadata of ${directory}`);
    });
    for (const line of opened.repairs) log(`metadata repaired: ${line}`);
    let pool: Pool;
    let punchSeconds = 0;
    try {
      const chunkFiles = new ChunkFiles(chunksDirectory(directory), files);
      await files.syncDirectory(chunkFiles.directory);
      await files.syncDirectory(directory);
      pool = new Pool(directory, lockFd, { catalog: opened.backend, generation: opened.generation, journal: opened.journal, repairs: opened.repairs.length }, chunkFiles, options);
      const punchStarted = performance.now();
      // Only the top at open; the free chunks below it after, beside the node's work (chunk-store.ts).
      await pool.#chunks.punchAboveHighWater();
      punchSeconds = (performance.now() - punchStarted) / 1000;
      pool.#letRootGo = letRootGo;
      pool.#punching = pool.#punchInBackground(opened.backend.allocator, opened.rootWritten);
    } catch (error) {
      opened.journal.close();
      await opened.backend.close().catch(() => {});
      throw error;
    }
    if (opened.replayedRecords > 0 || opened.tornTail) {
      log(`pool ${directory}: replayed ${opened.replayedRecords} journal records${opened.tornTail ? ' (a torn tail from a crash was dropped)' : ''}`);
    }
    const { root, replay } = opened.seconds;
    log(`pool ${directory}: opened in ${(root + replay + opened.checkpointSeconds + punchSeconds).toFixed(3)} s (root and table ${root.toFixed(3)} s, replay ${replay.toFixed(3)} s, new journal ${opened.checkpointSeconds.toFixed(3)} s, punch above the high-water mark ${punchSeconds.toFixed(3)} s; the root after the replay is written in the background)`, 'debug');
    opened.rootWritten.then(
      (seconds) => log(`pool ${directory}: the root covering the replay written in the background, ${seconds.toFixed(3)} s after the open`, 'debug'),
      (error: unknown) => {
        // Else the backend's sticky failure: the engine reports it.
        if (isNoSpace(error)) log(`pool ${directory}: the root covering the replay met a full file system (${(error as Error).message}); a later checkpoint writes it, the journals stay until then`, 'warn');
      },
    );
    return pool;
  }

  /** The punch of free chunks after a paged open; a failure is a warning (the space stays used until the next open). */
  async #punchInBackground(space: ChunkSpace, rootWritten: Promise<unknown>): Promise<void> {
    const started = performance.now();
    let punched = 0;
    try {
      punched = await this.#chunks.punchFreeInBackground(space, () => this.#closed);
      this.#log(`pool ${this.directory}: ${punched} free chunks punched out in the background in ${((performance.now() - started) / 1000).toFixed(3)} s`, 'debug');
    } catch (error) {
      this.#log(`punching out free chunks after the open failed: ${(error as Error).message}`, 'warn');
    }
    // The open met a full file system (the root after its replay not written, or no reserve for the new journal):
    // the space given back goes to metadata first, before writes take it for data. A checkpoint writes the root,
    // removes the journals it covers (their reserve too) and reserves the new journal's.
    const rootFailed = await rootWritten.then(
      () => false,
      () => true,
    );
    if (punched === 0 || this.#closed || !(rootFailed || this.#engine.journalReserveShort)) return;
    try {
      await this.#engine.checkpoint();
      this.#log(`pool ${this.directory}: the metadata checkpoint that the open could not write on a full file system written once free chunks were punched`);
    } catch (error) {
      this.#log(`the metadata checkpoint after the punch of free chunks failed: ${(error as Error).message}`, 'warn');
    }
  }

  /** Settles when the punch of free chunks begun by the open has ended (at once for a format-3 pool). */
  freeSpacePunched(): Promise<void> {
    return this.#punching;
  }

  // ---- control: volumes ----

  /** Creates a thin volume; nothing is allocated until it is written. */
  createVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    return this.#control(async () => {
      this.#checkOpen();
      validateName(name);
      checkVolumeSize(sizeBytes);
      this.#checkNewVolumeName(name);
      this.#engine.record({ type: 'create', volumeId: this.#tables.nextVolumeId, name, sizeBytes });
      await this.#committed();
      return this.volumeInfo(name);
    });
  }

  /** Removes a volume and gives its space back; refused while it is exported or has snapshots. */
  removeVolume(name: string): Promise<void> {
    return this.#control(async () => {
      this.#checkOpen();
      const runtime = this.#runtime(name);
      // A read's rewrite counts as open while it runs (volume.ts's #defragment): it ends without a client.
      await this.readDefragsSettled();
      if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${name} is in use (${runtime.openCount} open); disconnect its clients first`);
      this.#checkNotReceiving(runtime);
      const snapshots = [...runtime.meta.snapshots.keys()];
      if (snapshots.length > 0) {
        throw ChunkdError.busy(`volume ${name} has ${snapshots.length} snapshot(s) (${snapshots.slice(0, 5).join(', ')}${snapshots.length > 5 ? ', ...' : ''}); remove them first`);
      }
      this.#engine.record({ type: 'remove', volumeId: runtime.meta.id });
      this.#runtimes.delete(runtime.meta.id);
      await this.#committed();
    });
  }

  /** Grows a volume at once; shrinking needs `force` (the data past the new end is freed) and no open exports. */
  resizeVolume(name: string, sizeBytes: number, force = false): Promise<VolumeInfo> {
    return this.#control(async () => {
      this.#checkOpen();
      const runtime = this.#runtime(name);
      this.#checkNotReceiving(runtime);
      await this.#resize(runtime, sizeBytes, force);
      return this.volumeInfo(name);
    });
  }

  async #resize(runtime: VolumeRuntime, sizeBytes: number, force: boolean): Promise<void> {
    const name = runtime.meta.name;
    checkVolumeSize(sizeBytes);
    const oldSize = runtime.meta.sizeBytes;
    if (sizeBytes < oldSize) {
      if (!force) throw ChunkdError.invalid(`shrinking volume ${name} from ${formatSize(oldSize)} to ${formatSize(sizeBytes)} discards data: pass --force`);
      await this.readDefragsSettled();
      if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${name} is in use (${runtime.openCount} open); it can shrink only when no client has it open`);
      const firstCut = sizeBytes / chunkSizeBytes;
      this.#engine.record({ type: 'unmap', volumeId: runtime.meta.id, virtualChunk: firstCut, chunkCount: oldSize / chunkSizeBytes - firstCut });
    }
    if (sizeBytes !== oldSize) this.#engine.record({ type: 'resize', volumeId: runtime.meta.id, sizeBytes });
    await this.#committed();
  }

  listVolumes(): VolumeInfo[] {
    return [...this.#tables.byName.keys()].sort().map((name) => this.volumeInfo(name));
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

  /** Pool-wide histograms of the store's stages since open (chunk I/O, commits), for /metrics. */
  stageTimes(): StageTimes {
    return this.#stageTimes;
  }

  hasVolume(name: string): boolean {
    return this.#tables.byName.has(name);
  }

  /** Opens a volume for I/O; close() the result when done. Refused while a stream is received into it. */
  openVolume(name: string): Volume {
    this.#checkOpen();
    const runtime = this.#runtime(name);
    this.#checkNotReceiving(runtime);
    return new Volume(this.#volumeStore, runtime);
  }

  /**
   * Refuses every write to the volume from now on with `reason` (null: takes them again). Writes in flight finish
   * first (the whole range is taken exclusively, as a snapshot does), and the writes before are committed, so
   * that on return everything the volume acknowledged is durable and nothing more will be.
   */
  async blockWrites(name: string, reason: ChunkdError | null): Promise<void> {
    this.#checkOpen();
    const runtime = this.#runtime(name);
    const release = await runtime.lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
    runtime.writeBlock = reason;
    release();
    await this.#committed();
  }

  /**
   * Asked at every write to a volume, before it is applied and before it is acknowledged (reads and the stream
   * receiver are not asked): the cluster's fencing by time (cluster/cluster.ts). Default: every write goes through.
   */
  setWriteGate(gate: (volume: string) => ChunkdError | null): void {
    this.#writeGate = gate;
  }

  #writeGate: (volume: string) => ChunkdError | null = () => null;

  /** Why the volume refuses writes, or null. */
  writeBlock(name: string): ChunkdError | null {
    return this.#runtime(name).writeBlock;
  }

  // ---- control: receiving a stream (replication/receive.ts) ----

  /**
   * Marks a volume as being received into: from now on clients cannot open it, roll it back, snapshot, resize or
   * remove it, until endReceive. Refused while it is open. Kept in memory only: the receiver's durable state says
   * which volumes to mark again at start.
   */
  beginReceive(name: string): void {
    this.#checkOpen();
    const runtime = this.#runtime(name);
    if (this.#receiving.has(runtime.meta.id)) return;
    if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${name} is in use (${runtime.openCount} open); disconnect its clients before receiving into it`);
    this.#receiving.add(runtime.meta.id);
  }

  endReceive(name: string): void {
    const meta = this.#tables.byName.get(name);
    if (meta !== undefined) this.#receiving.delete(meta.id);
  }

  isReceiving(name: string): boolean {
    const meta = this.#tables.byName.get(name);
    return meta !== undefined && this.#receiving.has(meta.id);
  }

  /** The handle a synchronous replica is written through by its owner (replication/sync-replica-server.ts): past its write block. */
  openVolumeForSync(name: string): Volume {
    this.#checkOpen();
    const runtime = this.#runtime(name);
    this.#checkNotReceiving(runtime);
    return new Volume(this.#volumeStore, runtime, true);
  }

  /** The receiver's own handle on a volume marked by beginReceive. */
  openVolumeForReceive(name: string): Volume {
    this.#checkOpen();
    return new Volume(this.#volumeStore, this.#receivingRuntime(name), true);
  }

  /** What the receiver may change on a volume marked by beginReceive: its size (to the stream's), or back to a snapshot. */
  receiveResize(name: string, sizeBytes: number): Promise<void> {
    return this.#control(async () => {
      await this.#resize(this.#receivingRuntime(name), sizeBytes, true);
    });
  }

  receiveRollback(name: string, snapshotName: string): Promise<void> {
    return this.#control(async () => {
      const runtime = this.#receivingRuntime(name);
      if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${name} is open (${runtime.openCount}); a receive cannot roll it back`);
      this.#engine.record({ type: 'rollback', volumeId: runtime.meta.id, snapshotId: this.#snapshot(name, snapshotName).id });
      await this.#committed();
    });
  }

  /** Takes the snapshot a received stream ends in, with the sender's id; the volume must be marked by beginReceive. */
  receiveSnapshot(volumeName: string, snapshotName: string, uuid: string): Promise<SnapshotInfo> {
    return this.#control(async () => {
      return this.#takeSnapshot(this.#receivingRuntime(volumeName), volumeName, snapshotName, uuid);
    });
  }

  /** Removes a volume a receive created and could not complete (with no snapshots yet). */
  receiveDiscardVolume(name: string): Promise<void> {
    return this.#control(async () => {
      const runtime = this.#receivingRuntime(name);
      if (runtime.openCount > 0 || runtime.meta.snapshots.size > 0) throw ChunkdError.busy(`volume ${name} is open or has snapshots; a receive cannot discard it`);
      this.#engine.record({ type: 'remove', volumeId: runtime.meta.id });
      this.#runtimes.delete(runtime.meta.id);
      this.#receiving.delete(runtime.meta.id);
      await this.#committed();
    });
  }

  /** Opens a snapshot read-only; close() the result when done. */
  openSnapshot(volumeName: string, snapshotName: string): SnapshotDevice {
    this.#checkOpen();
    const snapshot = this.#snapshot(volumeName, snapshotName);
    return new SnapshotDevice(volumeName, snapshot, this.#volumeStore, this.#snapshotRuntime(snapshot.id));
  }

  // ---- control: snapshots and clones ----

  /**
   * Takes a snapshot: waits for the volume's writes in flight (blocking new ones meanwhile), so it holds exactly
   * the writes acknowledged before it, records it, and makes it durable before returning. `uuid`: the id to give
   * it (a synchronous replica takes its owner's snapshot with the owner's id); a new one by default.
   */
  createSnapshot(volumeName: string, snapshotName: string, uuid = randomUUID().replaceAll('-', '')): Promise<SnapshotInfo> {
    return this.#control(async () => {
      this.#checkOpen();
      validateName(snapshotName, 'snapshot');
      const runtime = this.#runtime(volumeName);
      this.#checkNotReceiving(runtime);
      return this.#takeSnapshot(runtime, volumeName, snapshotName, uuid);
    });
  }

  async #takeSnapshot(runtime: VolumeRuntime, volumeName: string, snapshotName: string, uuid: string): Promise<SnapshotInfo> {
    this.#checkOpen();
    validateName(snapshotName, 'snapshot');
    if (!isSnapshotUuid(uuid)) throw ChunkdError.invalid(`invalid snapshot id ${JSON.stringify(uuid)}: 32 lowercase hex digits`);
    for (const other of runtime.meta.snapshots.values()) {
      if (other.uuid === uuid) throw ChunkdError.exists(`volume ${volumeName} already has a snapshot with id ${uuid} (${other.name})`);
    }
    if (runtime.meta.snapshots.has(snapshotName)) throw ChunkdError.exists(`snapshot ${volumeName}@${snapshotName} already exists`);
    if (runtime.meta.snapshots.size >= snapshotsPerVolumeMax) throw ChunkdError.invalid(`volume ${volumeName} has ${snapshotsPerVolumeMax} snapshots, the most a volume may have`);
    const release = await runtime.lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      this.#engine.record({ type: 'snapshot', volumeId: runtime.meta.id, snapshotId: this.#tables.nextSnapshotId, name: snapshotName, createdAtMs: Date.now(), uuid });
    } finally {
      release();
    }
    await this.#committed();
    return this.snapshotInfo(volumeName, snapshotName);
  }

  /**
   * Removes a snapshot; chunks that clones or other snapshots still hold stay, the rest go back to the pool, their
   * space punched out of the files (given back to the file system) unless `recycle`: then they are only reused by
   * later writes, as the chunks an overwrite replaces are (what is still free at the next open is punched then).
   * A replication link removes its own snapshot each cycle (replication/replicator.ts), and what that frees is
   * exactly what the volume's overwrites displaced since: a scattered 4 KiB chunk per random write, whose punch (a
   * file system transaction each, about 130 us of CPU and the file's lock) cost more than the write, on both
   * nodes, and held the commit until all were done.
   */
  removeSnapshot(volumeName: string, snapshotName: string, options: { recycle?: boolean } = {}): Promise<void> {
    return this.#control(async () => {
      this.#checkOpen();
      const snapshot = this.#snapshot(volumeName, snapshotName);
      this.#checkNotReceiving(this.#runtime(volumeName));
      const openCount = this.#snapshotRuntimes.get(snapshot.id)?.openCount ?? 0;
      if (openCount > 0) throw ChunkdError.busy(`snapshot ${volumeName}@${snapshotName} is exported (${openCount} open); disconnect its clients first`);
      this.#engine.record({ type: 'snapshot-remove', snapshotId: snapshot.id }, options.recycle !== true);
      this.#snapshotRuntimes.delete(snapshot.id);
      await this.#committed();
    });
  }

  /** Makes the volume's contents the snapshot's again; refused while the volume is exported. Durable on return. */
  rollbackVolume(volumeName: string, snapshotName: string): Promise<VolumeInfo> {
    return this.#control(async () => {
      this.#checkOpen();
      const runtime = this.#runtime(volumeName);
      const snapshot = this.#snapshot(volumeName, snapshotName);
      this.#checkNotReceiving(runtime);
      await this.readDefragsSettled();
      if (runtime.openCount > 0) throw ChunkdError.busy(`volume ${volumeName} is exported (${runtime.openCount} open); disconnect its clients before a rollback`);
      this.#engine.record({ type: 'rollback', volumeId: runtime.meta.id, snapshotId: snapshot.id });
      await this.#committed();
      return this.volumeInfo(volumeName);
    });
  }

  /** Creates a writable volume that starts as the snapshot's image and shares its chunks. */
  cloneSnapshot(volumeName: string, snapshotName: string, newName: string): Promise<VolumeInfo> {
    return this.#control(async () => {
      this.#checkOpen();
      validateName(newName);
      const snapshot = this.#snapshot(volumeName, snapshotName);
      this.#checkNewVolumeName(newName);
      this.#engine.record({ type: 'clone', volumeId: this.#tables.nextVolumeId, name: newName, snapshotId: snapshot.id });
      await this.#committed();
      return this.volumeInfo(newName);
    });
  }

  listSnapshots(volumeName: string): SnapshotInfo[] {
    const volume = this.#runtime(volumeName).meta;
    return [...volume.snapshots.values()].sort((a, b) => a.createdAtMs - b.createdAtMs || a.id - b.id).map((s) => this.#describeSnapshot(volume, s));
  }

  snapshotInfo(volumeName: string, snapshotName: string): SnapshotInfo {
    return this.#describeSnapshot(this.#runtime(volumeName).meta, this.#snapshot(volumeName, snapshotName));
  }

  /**
   * The volume's snapshots (only `snapshotName` if given) with what each holds alone, after the records applied
   * before the call: remembered from an earlier call where no record since may have changed it (held-alone.ts),
   * else a walk of the snapshot's unshared pages (over paged metadata, read a slice at a time). `recount`: walk
   * every one (tests compare the two).
   */
  async countedSnapshots(volumeName: string, snapshotName?: string, options: { recount?: boolean } = {}): Promise<CountedSnapshotInfo[]> {
    const listed = snapshotName === undefined ? this.listSnapshots(volumeName) : [this.snapshotInfo(volumeName, snapshotName)];
    await this.#engine.settled();
    const counted: CountedSnapshotInfo[] = [];
    for (const info of listed) {
      const uniqueChunks = await this.#heldAloneChunks(volumeName, info, options.recount === true);
      if (uniqueChunks === null) {
        // Removed meanwhile: left out (or, asked by name, not found).
        if (snapshotName !== undefined) this.#snapshot(volumeName, snapshotName);
        continue;
      }
      counted.push({ ...info, uniqueBytes: uniqueChunks * chunkSizeBytes });
    }
    return counted;
  }

  /** Counts and walks of `countedSnapshots` since the open: answered from the memo, and walked (tests, benchmarks). */
  get heldAloneCounts(): { remembered: number; walked: number } {
    return { remembered: this.#heldAlone.hits, walked: this.#heldAlone.walks };
  }

  /** What the snapshot `info` names holds alone, in chunks; null if it was removed before or during its walk. */
  async #heldAloneChunks(volumeName: string, info: SnapshotInfo, recount: boolean): Promise<number | null> {
    const current = (): SnapshotView | undefined => {
      const snapshot = this.#tables.byName.get(volumeName)?.snapshots.get(info.name);
      return snapshot?.uuid === info.uuid ? snapshot : undefined;
    };
    let snapshot = current();
    if (snapshot === undefined) return null;
    const remembered = recount ? undefined : this.#heldAlone.remembered(snapshot.id);
    if (remembered !== undefined) return remembered;
    // The token before the wait: every record it does not cover is applied before the walk begins.
    const token = this.#heldAlone.token(snapshot.id);
    await this.#engine.settled();
    snapshot = current();
    if (snapshot === undefined) return null;
    let uniqueChunks: number;
    try {
      uniqueChunks = await this.#catalog.uniqueChunks(snapshot.map);
    } catch (error) {
      // Removed during the walk (paged-map.ts).
      if (!(error instanceof ChunkdError && error.code === 'ENOENT')) throw error;
      return null;
    }
    this.#heldAlone.remember(token, uniqueChunks);
    return uniqueChunks;
  }

  /**
   * The extents that differ between snapshot `from` (null: an empty volume, so every mapped chunk) and snapshot
   * `to` (or the live volume), from metadata alone, after the records applied before the call; pages the two maps
   * share are skipped.
   */
  async diff(volumeName: string, fromName: string | null, toName: string | null, firstOnly = false): Promise<ChangedExtent[]> {
    await this.#engine.settled();
    // The maps taken after the wait: a rollback applied meanwhile replaces the volume's.
    const volume = this.#runtime(volumeName).meta;
    const from: { map: MapHandle | null; sizeBytes: number } = fromName === null ? { map: null, sizeBytes: 0 } : this.#snapshot(volumeName, fromName);
    const to = toName === null ? volume : this.#snapshot(volumeName, toName);
    return this.#catalog.diff(from.map, to.map, Math.max(from.sizeBytes, to.sizeBytes) / chunkSizeBytes, firstOnly);
  }

  /**
   * Whether the live volume's map differs from snapshot `fromName`'s (pool.diff's meaning, after the records applied
   * before the call), stopping at the first changed chunk where the catalog can: a replication link asks it every
   * cycle, before it takes a snapshot, and the full diff of a busy volume cost milliseconds (the stream's plan makes
   * that diff again anyway).
   */
  async changedSince(volumeName: string, fromName: string): Promise<boolean> {
    return (await this.diff(volumeName, fromName, null, true)).length > 0;
  }

  /**
   * The digest of a snapshot's (or, with null, the live volume's) whole content, from metadata alone, after the
   * records applied before the call: the chunk checksums in order (content-digest.ts says why that and not a hash
   * of the bytes).
   */
  async contentDigest(volumeName: string, snapshotName: string | null): Promise<Buffer> {
    await this.#engine.settled();
    const { map, sizeBytes } = snapshotName === null ? this.#runtime(volumeName).meta : this.#snapshot(volumeName, snapshotName);
    return this.#catalog.contentDigest(map, sizeBytes);
  }

  /**
   * The recorded checksum of each chunk [firstChunk, firstChunk + chunkCount) of the live volume (or of its snapshot
   * `snapshotName`), a hole as a chunk of zeros, from metadata alone: what a synchronous replica's resync compares
   * (sync-replicas.ts).
   */
  async chunkSums(volumeName: string, firstChunk: number, chunkCount: number, snapshotName: string | null = null): Promise<Uint32Array> {
    const source = snapshotName === null ? this.#runtime(volumeName).meta : this.#snapshot(volumeName, snapshotName);
    const sums = new Uint32Array(chunkCount).fill(zeroChunkSum);
    const found = await this.#catalog.lookup(source.map, firstChunk, chunkCount);
    for (const run of found.runs) {
      if (run.physicalChunk < 0) continue;
      for (let i = 0; i < run.chunkCount; i++) sums[run.virtualChunk - firstChunk + i] = found.sumOf(run, i);
    }
    return sums;
  }

  /** The volume and snapshot names of the snapshot with id `uuid` in `volumeName` (any volume if null), or null. */
  findSnapshot(uuid: string, volumeName: string | null = null): { volume: string; snapshot: string } | null {
    const volumes = volumeName === null ? [...this.#tables.volumes.values()] : [this.#runtime(volumeName).meta];
    for (const volume of volumes) {
      for (const snapshot of volume.snapshots.values()) if (snapshot.uuid === uuid) return { volume: volume.name, snapshot: snapshot.name };
    }
    return null;
  }

  /** Reads and checks every chunk of a volume and its snapshots while they stay in use (scrub.ts). */
  async scrub(volumeName: string, onProgress?: (doneBytes: number, totalBytes: number) => void): Promise<ScrubReport> {
    this.#checkOpen();
    const volume = this.#runtime(volumeName).meta;
    // The maps as they are when a check asks (a rollback replaces a volume's; a removed snapshot's is gone).
    const targets = [
      { name: volume.name, map: () => this.#tables.volumes.get(volume.id)?.map, sizeBytes: volume.sizeBytes },
      ...[...volume.snapshots.values()].map((snapshot) => ({ name: `${volume.name}@${snapshot.name}`, map: () => this.#tables.snapshots.get(snapshot.id)?.map, sizeBytes: snapshot.sizeBytes })),
    ];
    const plan = await this.#catalog.scrubPlan(targets);
    return this.#chunks.scrub(volume.name, plan.exports, plan.source, onProgress);
  }

  /** Commits what is queued and writes a checkpoint of all metadata now (commit-engine.ts). */
  checkpoint(): Promise<CheckpointReport> {
    return this.#engine.checkpoint();
  }

  async status(): Promise<PoolStatus> {
    const stats = await fs.promises.statfs(this.directory);
    return {
      directory: this.directory,
      formatVersion: this.#catalog.formatVersion,
      volumeCount: this.#tables.volumes.size,
      snapshotCount: this.#tables.snapshots.size,
      allocatedBytes: this.#chunks.allocatedBytes,
      chunkFilesBytes: this.#chunks.spanBytes,
      ...this.#engine.status(),
      fileSystem: { sizeBytes: stats.blocks * stats.bsize, freeBytes: stats.bavail * stats.bsize },
      metadataRepairsTotal: this.#metadataRepairs,
      checksumErrorsTotal: this.#chunks.checksumErrorsTotal,
      verifyReads: this.#chunks.verifyReads,
      readDefrag: this.#readDefragOn,
      readDefragBytesTotal: this.#defragBytesTotal,
    };
  }

  /**
   * Whether a volume's scattered range may be rewritten now: only bytes verified as they were read are written
   * again, and only while the pool holds no snapshot, so that no chunk it would let go of is shared (a snapshot
   * keeps what its volume overwrites: rewriting would hold the range twice). A clone whose snapshot was removed may
   * still share chunks with its origin; a rewrite there is as correct as any write, and costs the space of the range.
   */
  #defragAllowed(): boolean {
    if (!this.#readDefragOn || this.#closed || !this.#chunks.verifyReads || this.#tables.snapshots.size > 0) return false;
    try {
      this.#engine.checkHealthy();
    } catch {
      return false;
    }
    return true;
  }

  /** Resolves once the read defragmentation's rewrites now in flight are done (tests, benchmarks). */
  async readDefragsSettled(): Promise<void> {
    await Promise.all(this.#defrags);
  }

  #startDefrag(bytes: number, rewrite: () => Promise<boolean>): boolean {
    if (this.#defragBytesInFlight + bytes > readDefragInFlightBytesMax) return false;
    this.#defragBytesInFlight += bytes;
    const done = rewrite().then(
      (rewrote) => {
        if (rewrote) this.#defragBytesTotal += bytes;
      },
      (error: unknown) => {
        // The range stays as it was (nothing was recorded); the failure of a write the engine cares about is its own.
        if (!this.#closed) this.#log(`a read's rewrite of a scattered range failed: ${(error as Error).message}`, 'warn');
      },
    );
    this.#defrags.add(done);
    void done.finally(() => {
      this.#defragBytesInFlight -= bytes;
      this.#defrags.delete(done);
    });
    return true;
  }

  /** The pool's stable identity (a UUID in `pool-id`, made at the first call): how peers tell pools apart. */
  identity(): Promise<string> {
    return poolIdentity(this.#files, this.directory);
  }

  /** The chunk I/O engine's load (inline, or worker threads). */
  ioStatus(): IoEngineStatus {
    return this.#chunks.ioStatus();
  }

  /** Whether reads are checked against their checksums (false only when a benchmark turned it off). */
  get verifyReads(): boolean {
    return this.#chunks.verifyReads;
  }

  /** Commits everything and releases the pool's lock. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    // Rewrites started before: their records go into the last commit (none starts once closed).
    await Promise.all(this.#defrags);
    // It stops between pages of counts once closed, and reads them through the catalog: before the catalog closes.
    // It waits for the root after the open's replay, which may be waiting for its caller's start.
    this.#letRootGo();
    await this.#punching;
    try {
      await this.#engine.close();
    } finally {
      await this.#catalog.close().catch((error: unknown) => this.#log(`closing the metadata failed: ${(error as Error).message}`, 'error'));
      await this.#chunks.close();
      this.#files.close(this.#lockFd);
    }
  }

  /**
   * Drops the pool without writing anything more: a test's simulated power loss, after its file layer has
   * stopped answering (src/testing/power-loss.ts). Stops the background commit and the I/O workers; descriptors
   * are the test's to close.
   */
  async abandon(): Promise<void> {
    this.#closed = true;
    this.#engine.abandon();
    this.#catalog.abandon?.();
    await this.#chunks.close({ force: true });
  }

  #describeSnapshot(volume: VolumeView, snapshot: SnapshotView): SnapshotInfo {
    return {
      volume: volume.name,
      name: snapshot.name,
      uuid: snapshot.uuid,
      sizeBytes: snapshot.sizeBytes,
      createdAt: new Date(snapshot.createdAtMs).toISOString(),
      openCount: this.#snapshotRuntimes.get(snapshot.id)?.openCount ?? 0,
    };
  }

  /**
   * Runs a control verb after those called before it have returned: each reads the tables (names, next ids) as the
   * verbs before it left them, records, and commits, so that two at once cannot both take one id or one name. Over
   * paged metadata that is needed (a record is applied after `record` returns, catalog-backend.ts); in memory it
   * costs nothing but the wait. Writes and reads do not take it.
   */
  #control<T>(verb: () => Promise<T>): Promise<T> {
    const result = this.#controlQueue.then(verb, verb);
    this.#controlQueue = result.catch(() => {});
    return result;
  }

  #controlQueue: Promise<unknown> = Promise.resolve();

  /** Commits what is queued, then waits for it to be applied (over paged metadata, queued): a control verb reads what it did. */
  async #committed(): Promise<void> {
    await this.#engine.commit();
    await this.#engine.settled();
  }

  /** The volumes and snapshots as applied so far. */
  get #tables(): CatalogView {
    return this.#catalog.tables;
  }

  #checkNewVolumeName(name: string): void {
    if (this.#tables.byName.has(name)) throw ChunkdError.exists(`volume ${name} already exists`);
    if (this.#tables.volumes.size >= volumesMax) throw ChunkdError.invalid(`a pool holds at most ${volumesMax} volumes`);
  }

  #runtime(name: string): VolumeRuntime {
    const meta = this.#tables.byName.get(name);
    if (meta === undefined) throw ChunkdError.notFound(`no volume named ${name}`);
    let runtime = this.#runtimes.get(meta.id);
    if (runtime === undefined) {
      runtime = { meta, lock: new RangeLock(), openCount: 0, writeBlock: null };
      this.#runtimes.set(meta.id, runtime);
    }
    // A rollback replaces the volume's meta fields in place; the runtime keeps pointing at the same object.
    return runtime;
  }

  #snapshot(volumeName: string, snapshotName: string): SnapshotView {
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

  /** The runtime of a volume marked by beginReceive: what the receive-only verbs work on. */
  #receivingRuntime(name: string): VolumeRuntime {
    const runtime = this.#runtime(name);
    if (!this.#receiving.has(runtime.meta.id)) throw ChunkdError.busy(`volume ${name} is not being received into`);
    return runtime;
  }

  #checkNotReceiving(runtime: VolumeRuntime): void {
    if (this.#receiving.has(runtime.meta.id)) {
      throw ChunkdError.busy(`a stream is being received into volume ${runtime.meta.name}; it cannot be opened or changed until the receive completes or is aborted (chunkd receive --abort ${runtime.meta.name})`);
    }
  }

  #checkOpen(): void {
    if (this.#closed) throw new ChunkdError('ESHUTDOWN', 'the pool is closed');
  }
}

function checkVolumeSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % volumeSizeAlignBytes !== 0 || sizeBytes > volumeSizeMaxBytes) {
    throw ChunkdError.invalid(`invalid volume size ${sizeBytes}: it must be a positive multiple of ${formatSize(volumeSizeAlignBytes)} up to ${formatSize(volumeSizeMaxBytes)}`);
  }
}

