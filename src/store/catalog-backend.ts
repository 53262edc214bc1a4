// The pool's metadata as the commit engine, the volumes and the pool use it, whichever catalog holds it: today's
// in-memory catalog (`MemoryBackend` below: metadata.ts's Catalog, a journal plus a whole checkpoint, pool format
// 3) or the paged catalog (paged-backend.ts: paged-catalog.ts's pages behind a bounded cache, the journal as its
// write-ahead log, pool format 4). The engine and the volumes see only this interface, so neither asks which.
//
// What differs, and how the interface hides it:
//   - Applying a record: synchronous in memory, queued over pages (a map pass may read pages). `apply` returns at
//     once either way; `settled` resolves once every record applied before it has been (at once in memory), and
//     rejects with the first apply that failed (a bug or damage: the engine makes it its sticky failure).
//   - Looking chunks up (reads, trims, block status): `lookup` gives the runs of a range with each mapped chunk's
//     checksum, at once when every page is in memory and nothing is queued before it, else as a promise resolved
//     after the records queued before it (a read sees the writes acknowledged before it).
//   - Checkpoints: `beginCheckpoint` is called by the commit that starts a new journal generation, at the moment
//     it takes the queued records; what it covers is exactly the records applied before (see `PendingCheckpoint`).
//   - Chunk space: the allocator is the catalog's (ChunkAllocator in memory, the space maps' ChunkSpace over
//     pages); the chunk store allocates from it, the engine releases deferred frees after the journal commit
//     that records them (`ChunkAllocation`).
//
// The tables of volumes and snapshots (ids, names, sizes) are plain objects in both, read synchronously; a map is
// opaque (`MapHandle`) outside its backend, which alone knows what it is.
import { assert } from '../core/assert.ts';
import { journalCheckpointBytes } from '../core/limits.ts';
import type { Log } from '../core/log.ts';
import type { ChunkAllocator, FreeExtent } from './allocator.ts';
import { encodeCheckpoint } from './checkpoint.ts';
import { ChunkMap, type ChunkRun } from './chunk-map.ts';
import type { ChunkRefcounts } from './chunk-refcounts.ts';
import type { ChunkSums } from './chunk-sums.ts';
import { contentDigest } from './content-digest.ts';
import type { FileLayer } from './file-layer.ts';
import type { JournalFile } from './journal-file.ts';
import { diffMaps, type ChangedExtent } from './map-diff.ts';
import { applyRecord, type Catalog, type MetaRecord } from './metadata.ts';
import { beginGeneration, poolFormatVersion } from './pool-layout.ts';
import { memoryScrubSource, type ScrubExport, type ScrubSource } from './scrub.ts';

/** A volume's or snapshot's map: opaque but for its count, read only by the backend that made it. */
export interface MapHandle {
  readonly mappedCount: number;
}

export interface SnapshotView {
  readonly id: number;
  readonly uuid: string;
  readonly volumeId: number;
  readonly name: string;
  readonly sizeBytes: number;
  readonly createdAtMs: number;
  readonly map: MapHandle;
}

export interface VolumeView {
  readonly id: number;
  readonly name: string;
  readonly sizeBytes: number;
  /** Replaced in place by a rollback: read it at each use. */
  readonly map: MapHandle;
  /** By name. */
  readonly snapshots: ReadonlyMap<string, SnapshotView>;
}

/** The tables of volumes and snapshots, as applied so far. */
export interface CatalogView {
  readonly nextVolumeId: number;
  readonly nextSnapshotId: number;
  readonly volumes: ReadonlyMap<number, VolumeView>;
  readonly byName: ReadonlyMap<string, VolumeView>;
  readonly snapshots: ReadonlyMap<number, SnapshotView>;
}

/** The chunks under a read: its runs (holes and mapped runs, in order) and each mapped chunk's checksum. */
export interface ChunkLookup {
  readonly runs: readonly ChunkRun[];
  sumOf(run: ChunkRun, index: number): number;
}

/** The chunk allocator as the chunk store and the engine use it (allocator.ts's contract; space-map.ts's ChunkSpace too). */
export interface ChunkAllocation {
  readonly highWater: number;
  readonly usedCount: number;
  readonly deferredCount: number;
  /** Of those, the chunks in runs of at least allocator.ts's `freedRunChunksMin` (DeferredFrees.runCount). */
  readonly deferredRunCount: number;
  allocate(chunkCount: number): number | Promise<number>;
  release(start: number, chunkCount: number): void;
  deferredMark(): number;
  takeDeferred(mark: number): FreeExtent[];
  releaseTaken(extents: readonly FreeExtent[]): void;
  freeExtents(): FreeExtent[] | Promise<FreeExtent[]>;
  /** Spans of chunks below the high-water mark, for `holdFree` (the paged space's pages of counts). */
  readonly pagesInUse: number;
  /**
   * The free chunks of span `page` below the high-water mark, held (no allocation returns them) until
   * `releaseTaken` of the same extents: for punching their space out while the node runs (ChunkStore.giveBackFree).
   */
  holdFree(page: number): FreeExtent[] | Promise<FreeExtent[]>;
}

/**
 * A checkpoint begun by a commit (`beginCheckpoint`): `write` makes it durable and starts a new generation, whose
 * journal it returns (`generation`, or a later one: see MemoryBackend). The frames the commit took were applied
 * before the checkpoint was begun: the in-memory catalog's checkpoint holds them already; the paged one needs
 * them appended to the old generation's journal first (`appendsRecords`: the engine does that, and, once it is
 * durable, never again for a retry), as its root covers that generation.
 *
 * A `write` that fails with ENOSPC (a full file system) may be retried by a later checkpoint: it leaves the old
 * generation readable, and whatever it wrote of the new one is either rewritten whole by the retry or of a
 * generation the retry does not reuse. Until a retry succeeds, the engine appends nothing to the old journal: a
 * checkpoint of the new generation may be on disk and would hide it.
 */
export interface PendingCheckpoint {
  /** The synchronous part, in seconds (the catalog encoded, or the root queued). */
  readonly encodeSeconds: number;
  /** The commit's records go to the old generation's journal before `write` (the paged catalog). */
  readonly appendsRecords: boolean;
  write(journal: JournalFile): Promise<{ journal: JournalFile; bytes: number }>;
}

/** A map to scrub: its export's name, and the map as it is now (undefined once removed: it names nothing then). */
export interface ScrubTarget {
  name: string;
  map: () => MapHandle | undefined;
  sizeBytes: number;
}

/** What a scrub reads (each export's mapped runs, captured now) and checks it against (scrub.ts). */
export interface ScrubPlan {
  exports: ScrubExport[];
  source: ScrubSource;
}

export interface CatalogBackend {
  /** The pool format this catalog is stored in (chunkd-pool.json). */
  readonly formatVersion: number;
  /** The journal size that starts a checkpoint when the pool's options do not say (limits.ts). */
  readonly journalCheckpointBytes: number;
  /** Whether a clean close ends with a checkpoint (so that the next open replays nothing). */
  readonly checkpointAtClose: boolean;
  /**
   * Whether the catalog's memory asks for a checkpoint now, whatever the journal's size (paged: the map nodes
   * changed since the last one, held in memory until it writes them, past the cache's size). Asked at each record.
   */
  readonly checkpointWanted: boolean;
  readonly tables: CatalogView;
  readonly allocator: ChunkAllocation;
  /** Applies `record` (or queues its apply after those before it); chunks it frees are punched out when `punchFrees`. */
  apply(record: MetaRecord, punchFrees: boolean): void;
  /**
   * Told of each record `apply` took (applied, or queued behind those before it), in order, as `apply` returns:
   * the pool's memo of what each snapshot holds alone (held-alone.ts). Null: nobody.
   */
  onApplied: ((record: MetaRecord) => void) | null;
  /** Resolves once every record applied before the call has been; rejects with the first that failed. */
  settled(): Promise<void>;
  /** The first apply that failed (the engine makes it its sticky failure), or null. */
  readonly failure: Error | null;
  /** The runs of [virtualChunk, virtualChunk + chunkCount) of `map` with their checksums (see the top). */
  lookup(map: MapHandle, virtualChunk: number, chunkCount: number): ChunkLookup | Promise<ChunkLookup>;
  /**
   * Extents below `chunkLimit` mapped differently in `from` (null: an empty map) and `to`, as the records applied
   * so far left them (the caller awaits `settled` first, then takes the maps from the tables); what the two maps
   * share is skipped (in memory a shared 2 MiB page, over pages a shared subtree), so a diff costs what changed
   * between them, not the volume's size. With `firstOnly` a backend may stop at the first changed chunk (whether
   * anything changed): it returns that one only, or the whole diff (paged metadata, which has no such shortcut).
   */
  diff(from: MapHandle | null, to: MapHandle, chunkLimit: number, firstOnly?: boolean): Promise<ChangedExtent[]>;
  /** content-digest.ts's digest of `map` over its first `sizeBytes` (the caller awaits `settled` first, as for `diff`). */
  contentDigest(map: MapHandle, sizeBytes: number): Promise<Buffer>;
  /**
   * Chunks only `map` holds (what removing its snapshot gives back), for a snapshot's map (the caller awaits
   * `settled` first, as for `diff`): the chunks of its unshared pages named nowhere else.
   */
  uniqueChunks(map: MapHandle): Promise<number>;
  /** What a scrub of these maps reads and checks it against. */
  scrubPlan(targets: readonly ScrubTarget[]): Promise<ScrubPlan>;
  /** Begins the checkpoint that starts generation `generation` (see PendingCheckpoint). */
  beginCheckpoint(generation: number): PendingCheckpoint;
  /** Waits for what is queued and closes what the catalog holds open. */
  close(): Promise<void>;
  /** A simulated crash (Pool.abandon): writes nothing more, whatever is queued or in flight. */
  abandon?(): void;
  /** Where the catalog logs what the node's operator should see (the commit engine's log, given at its start). */
  setLog?(log: Log): void;
}

const settledNow = Promise.resolve();

/** Today's catalog: all in memory, applied synchronously, a whole checkpoint per generation (commit-engine.ts). */
export class MemoryBackend implements CatalogBackend {
  readonly formatVersion = poolFormatVersion;
  readonly journalCheckpointBytes = journalCheckpointBytes;
  /** Format 3 reads its whole checkpoint at open anyway: a replay adds little, a whole checkpoint at close much. */
  readonly checkpointAtClose = false;
  readonly checkpointWanted = false;
  /** applyRecord throws at once, to the engine's record: nothing fails later. */
  readonly failure = null;
  readonly tables: Catalog;
  readonly allocator: ChunkAllocator;
  readonly #refs: ChunkRefcounts;
  readonly #files: FileLayer;
  readonly #directory: string;
  #punchFrees = true;
  onApplied: ((record: MetaRecord) => void) | null = null;
  /** The generation of the last checkpoint begun (0: none yet). */
  #lastCheckpointGeneration = 0;

  constructor(parts: { catalog: Catalog; refs: ChunkRefcounts; allocator: ChunkAllocator; files: FileLayer; directory: string }) {
    this.tables = parts.catalog;
    this.#refs = parts.refs;
    this.allocator = parts.allocator;
    this.#files = parts.files;
    this.#directory = parts.directory;
    // From now on a chunk whose last reference goes is free, once the commit that records it is durable.
    this.#refs.onFree = (start, chunkCount) => this.allocator.freeDeferred(start, chunkCount, this.#punchFrees);
  }

  apply(record: MetaRecord, punchFrees: boolean): void {
    this.#punchFrees = punchFrees;
    try {
      applyRecord(this.tables, record, this.#refs);
    } finally {
      this.#punchFrees = true;
    }
    // Not for a record refused: it changed nothing.
    this.onApplied?.(record);
  }

  settled(): Promise<void> {
    return settledNow;
  }

  lookup(map: MapHandle, virtualChunk: number, chunkCount: number): ChunkLookup {
    const sums = this.tables.sums;
    return { runs: chunkMap(map).runs(virtualChunk, chunkCount), sumOf: (run, index) => sums.get(run.physicalChunk + index) };
  }

  async diff(from: MapHandle | null, to: MapHandle, chunkLimit: number, firstOnly = false): Promise<ChangedExtent[]> {
    return diffMaps(from === null ? new ChunkMap() : chunkMap(from), chunkMap(to), chunkLimit, firstOnly);
  }

  async contentDigest(map: MapHandle, sizeBytes: number): Promise<Buffer> {
    return contentDigest(chunkMap(map), this.tables.sums, sizeBytes);
  }

  async uniqueChunks(map: MapHandle): Promise<number> {
    // Chunks on pages no other map shares, with a single reference.
    let unique = 0;
    for (const [, page] of chunkMap(map).pages()) {
      if (page.shareCount !== 1) continue;
      for (const slot of page.slots) if (slot > 0 && this.#refs.get(slot - 1) === 1) unique += 1;
    }
    return unique;
  }

  async scrubPlan(targets: readonly ScrubTarget[]): Promise<ScrubPlan> {
    const exports = targets.map(({ name, map }) => ({ name, runs: [...chunkMap(map()!).mappedRuns()] }));
    return { exports, source: memoryScrubSource(this.tables.sums, this.#refs) };
  }

  beginCheckpoint(generation: number): PendingCheckpoint {
    // A retry after a failed one (a full file system) takes the next generation, never the same one again: the
    // failed one may have left a copy of its checkpoint, and a retry of the same generation with other contents
    // could then leave two copies of one generation that differ, which a load would take for one checkpoint (and,
    // both torn, merge frame by frame). Its journal, empty, and that copy are an older generation's leftovers.
    generation = Math.max(generation, this.#lastCheckpointGeneration + 1);
    this.#lastCheckpointGeneration = generation;
    const started = performance.now();
    const checkpoint = encodeCheckpoint(this.tables, generation);
    return {
      encodeSeconds: (performance.now() - started) / 1000,
      // The checkpoint holds the records the commit took: they are not appended anywhere.
      appendsRecords: false,
      write: async () => ({ journal: await beginGeneration(this.#files, this.#directory, checkpoint, generation), bytes: checkpoint.length }),
    };
  }

  async close(): Promise<void> {}
}

function chunkMap(map: MapHandle): ChunkMap {
  assert(map instanceof ChunkMap, 'a map of another catalog');
  return map;
}
