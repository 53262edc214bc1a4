// The paged catalog (step 4a of the plan in paged-metadata.md; the pool does not use it yet): a pool's whole
// metadata over pages, changed only by the journal's records with exactly `applyRecord`'s meaning (metadata.ts),
// so that step 4b can replay the journal into it and the live node can apply into it as it applies into today's
// in-memory Catalog.
//
// What lives where:
//   - the chunk map of each volume and snapshot: a `PagedMap` (paged-map.ts), the crc32 of each chunk beside it
//     in the leaves (today's ChunkSums is not needed: a map record's sums go into the entries it writes);
//   - page and chunk reference counts, the chunk allocator's free space and the page allocator's free pages: the
//     space maps (space-map.ts), whose pages of counts the map passes load alongside the map pages they visit
//     (paged-map.ts's `CountPages`);
//   - the table of volumes and snapshots (ids, names, sizes, snapshot ids, creation times, next ids, and each
//     map's root page and count of chunks mapped): JSON in a chain of pages (page-table.ts's chain of 48-bit
//     values, 6 bytes a value), rewritten whole at each checkpoint. Not in the root body: a root holds at most
//     4,064 bytes and a table entry takes about 100, so a volume with a few dozen snapshots would not fit. Not a
//     tree of its own either: the table is small (a thousand snapshots is about 100 KB, 25 pages), every
//     checkpoint after a write changes it (a map's root page changes with every copy-on-write), and it is read
//     whole at open: O(volumes + snapshots), never O(data).
//
// Root body (the two-slot root of page-file.ts), little-endian:
//   u8 version (1) | u48 journal generation covered | u48 first page of the table | u48 table bytes |
//   the space maps' root (space-map.ts's `encodeSpaceRoot`, 79 bytes)
// Opening reads the root, the table's chain and the space maps' summaries (SpaceMaps.open: the free pages' bitmap,
// a page per 127 MiB of metadata, and the per-page-of-counts summary, about 1 MiB per TiB of chunks); no map page
// and no page of counts. Lookups read the pages they need through the cache.
//
// `apply` queues a record; records apply one at a time in call order, each over counts loaded first (a map pass
// stops and loads what it misses, a drop loads page by page). A record that cannot apply is refused with ECORRUPT
// before it changes anything, by `checkRecord`, the check `applyRecord` makes. A map is taken out of the table before it is dropped
// (remove, snapshot-remove, rollback), so a lookup never sees a half-dropped map. Lookups are not queued: they
// see the records applied so far.
//
// `checkpoint(journalGeneration)` is queued with the records: the maps' dirty nodes into the cache, then the
// table, then the space maps' flush (last: it seals the page allocator's releases into this root), then the
// cache's commit of the root (pages, fdatasync, root slot, fdatasync), then the pages released before the flush
// become reusable (PagedMaps.commit's `committed` on the space maps' page allocator). Only the part before the
// writes holds the queue: the records after a checkpoint apply beside its write (PagedMaps.commitBeside; a failed
// checkpoint fails every later one, but for a full file system: `#checkpointFailure`). Chunks whose count fell to
// zero wait as deferred frees in `chunks` (ChunkSpace): when they may be reused is the caller's to say
// (deferredMark / takeDeferred / releaseTaken), since in step 4b the journal commit, not the checkpoint, makes a
// free durable.
import path from 'node:path';
import type { Log } from '../core/log.ts';
import { unreachable } from '../core/assert.ts';
import { ChunkdError, isNoSpace } from '../core/errors.ts';
import { chunkSizeBytes, metadataDirtyBytesMin, metadataReplayCostMaxUs, metadataReplayPagesMax, replayCostCountChangeUs, replayCostPageUs, replayCostRecordUs } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import type { FileLayer } from './file-layer.ts';
import type { ChangedExtent } from './map-diff.ts';
import { checkRecord, type CatalogTables, isSnapshotUuid, snapshotUuidOf, type MetaRecord, type SnapshotMeta, type VolumeMeta } from './metadata.ts';
import { PageCache } from './page-cache.ts';
import type { FreePagesView } from './page-allocator.ts';
import { firstDataPage, PageFile } from './page-file.ts';
import { chainPagesFor, readChain, writeChain } from './page-table.ts';
import { PagedMaps, type MapNode, type PagedMap, type PagedRun } from './paged-map.ts';
import { SpaceMaps, spaceRootBytes, type ChunkSpace } from './space-map.ts';

/** The page file's name in the pool directory (its copies are `metadata.0` and `metadata.1`). */
export const pagedCatalogFile = 'metadata';

/** A volume as listed: metadata.ts's fields, its map's count of chunks mapped for the map. */
export type PagedVolume = Omit<VolumeMeta, 'map' | 'snapshots'> & {
  /** Chunks mapped: the volume's allocated bytes are this times the chunk size. */
  mappedCount: number;
};

export type PagedSnapshot = Omit<SnapshotMeta, 'map'> & { mappedCount: number };

/** A volume's map or a snapshot's. */
export type MapTarget = { volumeId: number } | { snapshotId: number };

type VolumeEntry = Omit<VolumeMeta, 'map' | 'snapshots'> & {
  map: PagedMap;
  /** By name. */
  snapshots: Map<string, SnapshotEntry>;
};

type SnapshotEntry = Omit<SnapshotMeta, 'map'> & { map: PagedMap };

/**
 * Map nodes changed since the last checkpoint past this many times what asks for one hold new writes while a
 * checkpoint is under way (`dirtyFarPastLimit`): the dirty nodes then stay under about this many times the cache's
 * size (with a 16 MiB cache, 64 MiB of them), where a checkpoint that fell behind let them grow with the writes.
 */
export const dirtyHoldFactor = 4;

export interface PagedCatalogOptions {
  /** The bound of the page cache's clean pages, in bytes. */
  cacheBytes: number;
  /** Map node capacities (smaller in tests, for deep trees). */
  leafCapacity?: number;
  interiorCapacity?: number;
  /** How long a checkpoint encodes map nodes, or moves written pages to the clean ones, or queued mutations run, between two turns of the event loop (PagedMaps, PageCache; 0 in tests: a turn at fixed counts, so that a test's run does not depend on the machine's speed). */
  commitSliceMs?: number;
  /** The memory of map nodes changed since the last checkpoint that asks for the next (`dirtyPastLimit`; default: `cacheBytes`, at least limits.metadataDirtyBytesMin). */
  dirtyBytes?: number;
  /** The count of map nodes changed since the last checkpoint that asks for the next, whatever their memory (`dirtyPastLimit`; default limits.metadataReplayPagesMax). */
  dirtyPages?: number;
  /** The estimated cost of the replay a crash would leave that asks for the next checkpoint (`dirtyPastLimit`, `replayCostUs`; default limits.metadataReplayCostMaxUs). */
  replayCostMaxUs?: number;
  /** Read only (fsck): the page file writes no repair and refuses commits; records still apply, in memory. */
  readOnly?: boolean;
  /** Checkpoints of at least this many pages write them on the page writer thread (PageFileOptions.writerMinPages; null: never). */
  pageWriterMinPages?: number | null;
  /** Where the page writer thread's failures are reported. */
  log?: Log;
}

interface CatalogRoot {
  journalGeneration: number;
  tableFirst: number;
  tableBytes: number;
  space: Buffer;
}

const rootVersion = 1;
const rootHeaderBytes = 1 + 3 * 6;
const valueBytes = 6;

export function encodeCatalogRoot(root: CatalogRoot): Buffer {
  const out = Buffer.alloc(rootHeaderBytes + root.space.length);
  out.writeUInt8(rootVersion, 0);
  out.writeUIntLE(root.journalGeneration, 1, 6);
  out.writeUIntLE(root.tableFirst, 7, 6);
  out.writeUIntLE(root.tableBytes, 13, 6);
  root.space.copy(out, rootHeaderBytes);
  return out;
}

export function decodeCatalogRoot(bytes: Buffer): CatalogRoot {
  if (bytes.length !== rootHeaderBytes + spaceRootBytes || bytes.readUInt8(0) !== rootVersion) throw ChunkdError.corrupt(`paged catalog root: ${bytes.length} bytes, version ${bytes[0]}`);
  return { journalGeneration: bytes.readUIntLE(1, 6), tableFirst: bytes.readUIntLE(7, 6), tableBytes: bytes.readUIntLE(13, 6), space: Buffer.from(bytes.subarray(rootHeaderBytes)) };
}

/** Bytes as the 48-bit values of a chain, 6 to a value (the last padded with zeros). */
function bytesToValues(bytes: Buffer): number[] {
  const padded = Buffer.alloc(Math.ceil(bytes.length / valueBytes) * valueBytes);
  bytes.copy(padded);
  return Array.from({ length: padded.length / valueBytes }, (_, i) => padded.readUIntLE(i * valueBytes, valueBytes));
}

function valuesToBytes(values: readonly number[], byteCount: number): Buffer {
  const out = Buffer.alloc(values.length * valueBytes);
  values.forEach((value, i) => out.writeUIntLE(value, i * valueBytes, valueBytes));
  return out.subarray(0, byteCount);
}

interface TableJson {
  nextVolumeId: number;
  nextSnapshotId: number;
  volumes: Array<{ id: number; name: string; sizeBytes: number; rootPage: number; mappedCount: number }>;
  snapshots: Array<{ id: number; uuid: string; volumeId: number; name: string; sizeBytes: number; createdAtMs: number; rootPage: number; mappedCount: number }>;
}

const wholeNumber = (value: unknown): value is number => typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;

function parseTable(bytes: Buffer): TableJson {
  const fail = (why: string): never => {
    throw ChunkdError.corrupt(`paged catalog table: ${why}`);
  };
  let table: TableJson;
  try {
    table = JSON.parse(bytes.toString('utf8')) as TableJson;
  } catch {
    return fail('not JSON');
  }
  if (!wholeNumber(table.nextVolumeId) || !wholeNumber(table.nextSnapshotId) || !Array.isArray(table.volumes) || !Array.isArray(table.snapshots)) fail('no id counters or lists');
  for (const entry of [...table.volumes, ...table.snapshots]) {
    const numbers = [entry.id, entry.sizeBytes, entry.rootPage, entry.mappedCount];
    if (!numbers.every(wholeNumber) || checkName(entry.name) !== null) fail(`a bad entry ${JSON.stringify(entry)}`);
  }
  for (const snapshot of table.snapshots) if (!wholeNumber(snapshot.volumeId) || !wholeNumber(snapshot.createdAtMs) || !isSnapshotUuid(snapshot.uuid)) fail(`a bad snapshot ${JSON.stringify(snapshot)}`);
  return table;
}

export class PagedCatalog {
  readonly #file: PageFile;
  #checkpointFailure: Error | null = null;
  /** The last checkpoint's write (settles, never rejects). */
  #lastCheckpoint: Promise<void> = Promise.resolve();
  readonly #cache: PageCache;
  readonly #space: SpaceMaps;
  readonly #maps: PagedMaps;
  #nextVolumeId = 1;
  #nextSnapshotId = 1;
  readonly #volumes = new Map<number, VolumeEntry>();
  readonly #byName = new Map<string, VolumeEntry>();
  readonly #snapshots = new Map<number, SnapshotEntry>();
  #tablePages: number[] = [];
  #journalGeneration = 0;
  /** The page allocator as the durable root left it (which pages that root names: paged-check.ts). */
  #pagesAtOpen: FreePagesView = { nextPage: firstDataPage, isFree: () => false };
  /** The last record or checkpoint queued: they run one at a time, in call order. */
  #queue: Promise<unknown> = Promise.resolve();
  /** Records and checkpoints queued and not yet settled: none, and a map record may apply at once (`applyNow`). */
  #queued = 0;
  /**
   * Lets a checkpoint queued with `after` start before `after` settles (see `checkpoint`): called by whatever would
   * otherwise wait behind it (`#enqueue`, `close`, `abandon`); undefined when none waits.
   */
  #openGate: (() => void) | undefined;
  /** Whether chunks the record applying now frees are punched out once free (see `apply`). */
  #punchFrees = true;
  /** Records applied since the last checkpoint took its pages (`replayLoad`). */
  #recordsSince = 0;
  /** See `dirtyPastLimit`. */
  readonly #dirtyBytes: number;
  readonly #dirtyPages: number;
  readonly #replayCostMaxUs: number;

  private constructor(file: PageFile, cache: PageCache, space: SpaceMaps, maps: PagedMaps, dirtyBytes: number, dirtyPages: number, replayCostMaxUs: number) {
    this.#file = file;
    this.#dirtyBytes = dirtyBytes;
    this.#dirtyPages = dirtyPages;
    this.#replayCostMaxUs = replayCostMaxUs;
    this.#cache = cache;
    this.#space = space;
    this.#maps = maps;
    space.chunks.onFree = (start, chunkCount) => space.chunks.freeDeferred(start, chunkCount, this.#punchFrees);
  }

  /** Opens the paged catalog of `directory` (an empty one where none was committed): reads its root and table. */
  static async open(files: FileLayer, directory: string, options: PagedCatalogOptions): Promise<PagedCatalog> {
    const file = await PageFile.open(files, path.join(directory, pagedCatalogFile), { readOnly: options.readOnly, writerMinPages: options.pageWriterMinPages, log: options.log });
    try {
      // The files may have just been created: their entries must be durable before a root in them counts.
      if (file.root === null) await files.syncDirectory(directory);
      const cache = new PageCache(file, options.cacheBytes, options.commitSliceMs);
      const root = file.root === null ? null : decodeCatalogRoot(file.root.body);
      const space = await SpaceMaps.open(cache, root?.space ?? null);
      const maps = new PagedMaps({
        cache,
        allocator: space.pages,
        pageRefs: space.pageRefs,
        leafCapacity: options.leafCapacity,
        interiorCapacity: options.interiorCapacity,
        commitSliceMs: options.commitSliceMs,
        mutationRunMs: options.commitSliceMs,
        pageCountPages: space.pageRefs,
        chunkCountPages: space.chunks.counts,
      });
      const catalog = new PagedCatalog(file, cache, space, maps, options.dirtyBytes ?? Math.max(options.cacheBytes, metadataDirtyBytesMin), options.dirtyPages ?? metadataReplayPagesMax, options.replayCostMaxUs ?? metadataReplayCostMaxUs);
      catalog.#pagesAtOpen = space.pages.view();
      if (root !== null) await catalog.#load(root);
      return catalog;
    } catch (error) {
      file.close();
      throw error;
    }
  }

  async #load(root: CatalogRoot): Promise<void> {
    this.#journalGeneration = root.journalGeneration;
    const chain = await readChain(this.#cache, root.tableFirst, Math.ceil(root.tableBytes / valueBytes));
    this.#tablePages = chain.pages;
    const table = parseTable(valuesToBytes(chain.values, root.tableBytes));
    // Each entry is checked as the record that creates it would be (a damaged table is refused, not half loaded).
    for (const volume of table.volumes) {
      checkRecord(this.#tables(), { type: 'create', volumeId: volume.id, name: volume.name, sizeBytes: volume.sizeBytes });
      this.#addVolume({ id: volume.id, name: volume.name, sizeBytes: volume.sizeBytes, map: this.#maps.open(volume), snapshots: new Map() });
    }
    for (const snapshot of table.snapshots) {
      const { rootPage, mappedCount, ...fields } = snapshot;
      checkRecord(this.#tables(), { type: 'snapshot', volumeId: fields.volumeId, snapshotId: fields.id, name: fields.name, createdAtMs: fields.createdAtMs, uuid: fields.uuid });
      this.#addSnapshot({ ...fields, map: this.#maps.open({ rootPage, mappedCount }) });
    }
    this.#nextVolumeId = Math.max(this.#nextVolumeId, table.nextVolumeId);
    this.#nextSnapshotId = Math.max(this.#nextSnapshotId, table.nextSnapshotId);
  }

  /** The page file (for checks and tools: paged-check.ts reads both copies of each page). */
  get file(): PageFile {
    return this.#file;
  }

  /** The page allocator's free pages at open: every page below `nextPage` not free is named by the durable root. */
  get pagesAtOpen(): FreePagesView {
    return this.#pagesAtOpen;
  }

  /** The journal generation the durable root covers (0 before the first checkpoint). */
  get journalGeneration(): number {
    return this.#journalGeneration;
  }

  get nextVolumeId(): number {
    return this.#nextVolumeId;
  }

  get nextSnapshotId(): number {
    return this.#nextSnapshotId;
  }

  /** Chunk reference counts and the chunk allocator (deferred frees are the caller's to release; see the top). */
  get chunks(): ChunkSpace {
    return this.#space.chunks;
  }

  /** The space maps (for checks and tools: page counts, the page allocator, the pages they own). */
  get space(): SpaceMaps {
    return this.#space;
  }

  /** Reads of the page file since the open, and passes started over after reading what they missed (for benchmarks and tests). */
  get pageReads(): { misses: number; passRestarts: number } {
    return { misses: this.#cache.stats().misses, passRestarts: this.#maps.passRestarts };
  }

  /** Map nodes changed since the last checkpoint (what the next one writes, with the pages of counts). */
  get dirtyPages(): number {
    return this.#maps.dirtyPages;
  }

  /**
   * Whether the map nodes changed since the last checkpoint hold the memory that asks for the next (the cache's
   * bound, at least limits.metadataDirtyBytesMin; `PagedCatalogOptions.dirtyBytes`), each counted as a full leaf,
   * its words and its object, the words becoming its page's image at the checkpoint (`PagedMaps.nodeBytes`). They are never evicted, only a checkpoint
   * makes them clean pages of the cache: the engine starts one when this says so (`CatalogBackend.checkpointWanted`),
   * so that the metadata's memory stays about twice the cache's size, whatever the data held. Without it only the
   * journal's size started one: up to a journal's records (about 51,000) of dirty leaves, some 500 MiB, once the
   * map is much larger than what they touch. Also once they are limits.metadataReplayPagesMax (`dirtyPages`),
   * whatever the cache: after a crash each is a page the replay reads (a cold cache). And once the replay a crash
   * would leave is estimated at limits.metadataReplayCostMaxUs (`replayCostUs`): records, pages and counts, so
   * that a crashed start is bounded where the count of nodes is not what costs (a journal of records over a map
   * of a few thousand leaves; the copies of leaves snapshots share, each counting up its chunks).
   */
  get dirtyPastLimit(): boolean {
    const dirty = this.#maps.dirtyPages;
    return dirty >= this.#dirtyPages || dirty * this.#maps.nodeBytes >= this.#dirtyBytes || this.replayCostUs >= this.#replayCostMaxUs;
  }

  /**
   * Whether the map nodes changed since the last checkpoint are past `dirtyHoldFactor` times what asks for one
   * (`dirtyPastLimit`'s memory or count): a checkpoint under way has fallen behind the writes, and paged-backend.ts
   * holds new writes until it is durable, so that what is dirty (never evicted) stays bounded.
   */
  get dirtyFarPastLimit(): boolean {
    const dirty = this.#maps.dirtyPages;
    return dirty >= dirtyHoldFactor * this.#dirtyPages || dirty * this.#maps.nodeBytes >= dirtyHoldFactor * this.#dirtyBytes;
  }

  /** The replay a crash now would leave (`replayLoad`), in estimated microseconds of CPU (limits.ts's weights). */
  get replayCostUs(): number {
    const load = this.replayLoad;
    return load.records * replayCostRecordUs + (load.mapPages + load.countPages) * replayCostPageUs + load.countChanges * replayCostCountChangeUs;
  }

  /**
   * What a replay of the records applied since the last checkpoint would do, were the node to crash now (a cold
   * cache): the records, the pages it reads (the map nodes changed, each a copy of a page on disk or a new one,
   * and the pages of chunk and page counts changed) and the reference counts it changes (`PagedMaps.countChanges`).
   */
  get replayLoad(): { records: number; mapPages: number; countPages: number; countChanges: number } {
    return { records: this.#recordsSince, mapPages: this.#maps.dirtyPages, countPages: this.#space.chunks.counts.changedPages + this.#space.pageRefs.changedPages, countChanges: this.#maps.countChanges };
  }

  /** The pages the table was last written to (for a check that every page is named once). */
  get tablePages(): readonly number[] {
    return this.#tablePages;
  }

  /**
   * The tables as applied so far, read-only: volumes (each with its map and its snapshots by name), volumes by
   * name, snapshots by id, the next ids (catalog-backend.ts's CatalogView). A rollback replaces a volume's map
   * in place.
   */
  get tables(): { readonly nextVolumeId: number; readonly nextSnapshotId: number; volumes: ReadonlyMap<number, VolumeEntry>; byName: ReadonlyMap<string, VolumeEntry>; snapshots: ReadonlyMap<number, SnapshotEntry> } {
    return this.#tablesView;
  }

  readonly #tablesView = ((catalog: PagedCatalog) => ({
    get nextVolumeId() {
      return catalog.#nextVolumeId;
    },
    get nextSnapshotId() {
      return catalog.#nextSnapshotId;
    },
    volumes: catalog.#volumes as ReadonlyMap<number, VolumeEntry>,
    byName: catalog.#byName as ReadonlyMap<string, VolumeEntry>,
    snapshots: catalog.#snapshots as ReadonlyMap<number, SnapshotEntry>,
  }))(this);

  /** Volumes by id. */
  volumes(): PagedVolume[] {
    return [...this.#volumes.values()].sort((a, b) => a.id - b.id).map((volume) => ({ id: volume.id, name: volume.name, sizeBytes: volume.sizeBytes, mappedCount: volume.map.mappedCount }));
  }

  /** Snapshots by id. */
  snapshots(): PagedSnapshot[] {
    return [...this.#snapshots.values()]
      .sort((a, b) => a.id - b.id)
      .map((snapshot) => ({ id: snapshot.id, uuid: snapshot.uuid, volumeId: snapshot.volumeId, name: snapshot.name, sizeBytes: snapshot.sizeBytes, createdAtMs: snapshot.createdAtMs, mappedCount: snapshot.map.mappedCount }));
  }

  /** The volume named `name`, or undefined. */
  volumeByName(name: string): PagedVolume | undefined {
    const volume = this.#byName.get(name);
    return volume === undefined ? undefined : this.volumes().find((v) => v.id === volume.id);
  }

  /** Bytes a volume's map names (its chunks mapped times the chunk size): from its root slot entry, no page read. */
  allocatedBytes(volumeId: number): number {
    return this.#volumeById(volumeId, ChunkdError.notFound).map.mappedCount * chunkSizeBytes;
  }

  /** The root page of a map (0: empty), for checks and tools. */
  rootPage(target: MapTarget): number {
    return this.#mapOf(target).rootPage;
  }

  /** A map node as it is now (read through the cache), for checks and tools. */
  mapNode(page: number): Promise<MapNode> {
    return this.#maps.node(page);
  }

  /** Holes and physically contiguous runs of [virtualChunk, virtualChunk + chunkCount) of a map, with each chunk's crc32. */
  runs(target: MapTarget, virtualChunk: number, chunkCount: number): Promise<PagedRun[]> {
    return this.#mapOf(target).runs(virtualChunk, chunkCount);
  }

  /** The same as `runs` if every page it needs is in memory (no promise, no read), else undefined. */
  runsCached(target: MapTarget, virtualChunk: number, chunkCount: number): PagedRun[] | undefined {
    return this.#mapOf(target).runsCached(virtualChunk, chunkCount);
  }

  /** Extents below `chunkLimit` mapped differently in two maps, skipping the pages they share. */
  diff(a: MapTarget, b: MapTarget, chunkLimit: number): Promise<ChangedExtent[]> {
    return this.#mapOf(a).diff(this.#mapOf(b), chunkLimit);
  }

  /**
   * Applies a record after those queued before it, with applyRecord's meaning; ECORRUPT if it cannot apply. The
   * chunks it frees wait in `chunks` as deferred frees, to be punched out when released if `punchFrees` (not for
   * an overwrite's: the next writes reuse them).
   */
  apply(record: MetaRecord, punchFrees = true): Promise<void> {
    this.#recordsSince += 1;
    return this.#enqueue(async () => {
      this.#punchFrees = punchFrees;
      try {
        await this.#apply(record);
      } finally {
        this.#punchFrees = true;
      }
    });
  }

  /**
   * A map record applied now, in this turn, when nothing is queued before it and its map takes it in place
   * (`PagedMap.mapRunNow`): the same as `apply`, without the two queues' promises (paged-metadata.md, "CPU per
   * write"). False, having changed nothing, otherwise (any other record, a record `checkRecord` refuses): the
   * caller then calls `apply`.
   */
  applyNow(record: MetaRecord, punchFrees = true): boolean {
    if (record.type !== 'map' || this.#queued > 0) return false;
    const volume = this.#volumes.get(record.volumeId);
    if (volume === undefined) return false;
    try {
      checkRecord(this.#tables(), record);
    } catch {
      return false;
    }
    this.#punchFrees = punchFrees;
    try {
      const applied = volume.map.mapRunNow(record.virtualChunk, record.physicalChunk, record.sums, this.#space.chunks);
      if (applied) this.#recordsSince += 1;
      return applied;
    } finally {
      this.#punchFrees = true;
    }
  }

  /**
   * Raises the next volume and snapshot ids to at least these, after the records queued before it: an upgraded
   * pool (pool-upgrade.ts) keeps its old counters, so that the ids of volumes and snapshots removed before the
   * upgrade are not given again, as they never are.
   */
  raiseNextIds(nextVolumeId: number, nextSnapshotId: number): Promise<void> {
    return this.#enqueue(async () => {
      this.#nextVolumeId = Math.max(this.#nextVolumeId, nextVolumeId);
      this.#nextSnapshotId = Math.max(this.#nextSnapshotId, nextSnapshotId);
    });
  }

  /**
   * Reads into the page cache the map pages an `applyMaps` of `records` will visit, ahead of it (the replay's
   * prefetch: the reads overlap instead of a pass starting over once per level), and pins the pages of counts it
   * changes until `release`; `fits` false when those map pages would not fit the cache (it stopped reading them).
   * Nothing when the records are not all of one existing volume (`applyMaps` applies those one by one).
   */
  async prefetchMaps(records: ReadonlyArray<Extract<MetaRecord, { type: 'map' }>>): Promise<{ pages: number; fits: boolean; release(): void }> {
    const volume = this.#volumes.get(records[0]?.volumeId ?? -1);
    if (volume === undefined || records.some((record) => record.volumeId !== volume.id)) return { pages: 0, fits: true, release: () => {} };
    return volume.map.prefetchRuns(records);
  }

  /**
   * Applies map records of one volume after those queued before it, as one pass of its map (paged-map.ts's
   * `mapRuns`: a leaf and the nodes above it copied once for all the records that meet it): the same tables,
   * maps and chunk counts as `apply` of each in turn. A record that cannot apply is refused as `apply` refuses
   * it, after the records before it have applied.
   */
  applyMaps(records: ReadonlyArray<Extract<MetaRecord, { type: 'map' }>>, punchFrees = true): Promise<void> {
    this.#recordsSince += records.length;
    return this.#enqueue(async () => {
      this.#punchFrees = punchFrees;
      try {
        const volumeId = records[0]?.volumeId;
        // Map records change no table: each is checked against the tables as they are now.
        const refused = records.some((record) => {
          try {
            checkRecord(this.#tables(), record);
            return record.volumeId !== volumeId;
          } catch {
            return true;
          }
        });
        if (refused) {
          for (const record of records) await this.#apply(record);
          return;
        }
        if (volumeId === undefined) return;
        await this.#volumeById(volumeId).map.mapRuns(records, this.#space.chunks);
      } finally {
        this.#punchFrees = true;
      }
    });
  }

  /**
   * Makes everything applied before it durable as the root covering journal `journalGeneration`: dirty map nodes,
   * the table, the space maps, then the root (see the top). Queued with the records; the records after it apply
   * once its pages are taken, beside its write, and the promise resolves when the root is durable. With `after`,
   * its work (the encoding, the pages' writes) starts once `after` settles or something is queued behind it.
   */
  checkpoint(journalGeneration: number, after?: Promise<unknown>): Promise<void> {
    let durable: Promise<void> | undefined;
    let gate: Promise<void> | undefined;
    const sealed = this.#enqueue(async () => {
      if (gate !== undefined) await gate;
      // A failed checkpoint leaves the catalog ahead of its file (pages placed, releases sealed): no root may be
      // written over that state. The engine stops at the first failure, but a checkpoint may already be queued
      // behind the failed one (the root after an open's replay is written in the background: paged-backend.ts).
      if (this.#checkpointFailure !== null) throw ChunkdError.io(`an earlier metadata checkpoint failed (${this.#checkpointFailure.message}); no root is written until a restart`, this.#checkpointFailure);
      // The records after this point are the next checkpoint's (what a crash leaves to replay: `replayLoad`).
      this.#recordsSince = 0;
      const commit = this.#maps.commitBeside(() => this.#rootBody(journalGeneration));
      durable = commit.durable.then(
        () => {
          this.#journalGeneration = journalGeneration;
        },
        (error: unknown) => {
          // A full file system is retried by the next checkpoint (PagedMaps.commitBeside).
          if (!isNoSpace(error)) this.#checkpointFailure ??= error as Error;
          throw error;
        },
      );
      durable.catch(() => {});
      this.#lastCheckpoint = durable.catch(() => {});
      // The records after it apply once its pages are taken, beside its write (PagedMaps.commitBeside).
      await commit.sealed;
    });
    if (after !== undefined) {
      // Its place in the queue is taken now (it covers exactly what was applied before this call); its work waits
      // for `after`, or for the first task queued behind it (a record, a checkpoint: it must not wait on the
      // caller's signal, which may itself wait for that task), or for the close.
      gate = new Promise<void>((resolve) => {
        const open = (): void => {
          if (this.#openGate === open) this.#openGate = undefined;
          resolve();
        };
        this.#openGate = open;
        void after.then(open, open);
      });
    }
    return sealed.then(() => durable!);
  }

  /** The root of a checkpoint covering `journalGeneration`: the table placed, the space maps flushed (last). */
  #rootBody(journalGeneration: number): Buffer {
    const bytes = Buffer.from(JSON.stringify(this.#table()), 'utf8');
    const values = bytesToValues(bytes);
    for (const page of this.#tablePages) this.#space.release(page);
    this.#tablePages = Array.from({ length: chainPagesFor(values.length) }, () => this.#space.allocate());
    const tableFirst = writeChain(this.#space, this.#tablePages, values);
    // Last: the flush seals the page allocator's releases into this root.
    const space = this.#space.flush();
    return encodeCatalogRoot({ journalGeneration, tableFirst, tableBytes: bytes.length, space });
  }

  /**
   * The process died (a simulated crash: Pool.abandon): the page file is closed, so that nothing queued or in
   * flight writes another page or root through descriptors the test is about to close (and the next open reuse).
   */
  abandon(): void {
    this.#openGate?.();
    this.#file.close();
  }

  /** Waits for what is queued, then closes the page file (what was not checkpointed is lost). */
  async close(): Promise<void> {
    this.#openGate?.();
    await this.#queue;
    await this.#lastCheckpoint;
    this.#file.close();
  }

  #table(): TableJson {
    return {
      nextVolumeId: this.#nextVolumeId,
      nextSnapshotId: this.#nextSnapshotId,
      volumes: [...this.#volumes.values()].map((volume) => ({ id: volume.id, name: volume.name, sizeBytes: volume.sizeBytes, ...volume.map.state() })),
      snapshots: [...this.#snapshots.values()].map((snapshot) => ({
        id: snapshot.id,
        uuid: snapshot.uuid,
        volumeId: snapshot.volumeId,
        name: snapshot.name,
        sizeBytes: snapshot.sizeBytes,
        createdAtMs: snapshot.createdAtMs,
        ...snapshot.map.state(),
      })),
    };
  }

  /** The tables `checkRecord` reads. */
  #tables(): CatalogTables {
    return { volumes: this.#volumes, byName: this.#byName, snapshots: this.#snapshots };
  }

  async #apply(record: MetaRecord): Promise<void> {
    checkRecord(this.#tables(), record);
    const chunks = this.#space.chunks;
    switch (record.type) {
      case 'create':
        this.#addVolume({ id: record.volumeId, name: record.name, sizeBytes: record.sizeBytes, map: this.#maps.empty(), snapshots: new Map() });
        return;
      case 'clone': {
        const snapshot = this.#snapshotById(record.snapshotId);
        const map = await this.#maps.cloneLoaded(snapshot.map);
        this.#addVolume({ id: record.volumeId, name: record.name, sizeBytes: snapshot.sizeBytes, map, snapshots: new Map() });
        return;
      }
      case 'snapshot-remove': {
        const snapshot = this.#snapshotById(record.snapshotId);
        this.#snapshots.delete(snapshot.id);
        this.#volumeById(snapshot.volumeId).snapshots.delete(snapshot.name);
        await snapshot.map.drop(chunks);
        return;
      }
      default:
        break;
    }
    const volume = this.#volumeById(record.volumeId);
    switch (record.type) {
      case 'map':
        await volume.map.mapRun(record.virtualChunk, record.physicalChunk, record.sums, chunks);
        return;
      case 'unmap':
        await volume.map.unmapRange(record.virtualChunk, record.chunkCount, chunks);
        return;
      case 'resize':
        volume.sizeBytes = record.sizeBytes;
        return;
      case 'remove':
        this.#volumes.delete(volume.id);
        this.#byName.delete(volume.name);
        await volume.map.drop(chunks);
        return;
      case 'snapshot': {
        const map = await this.#maps.cloneLoaded(volume.map);
        this.#addSnapshot({ id: record.snapshotId, uuid: snapshotUuidOf(record), volumeId: volume.id, name: record.name, sizeBytes: volume.sizeBytes, createdAtMs: record.createdAtMs, map });
        return;
      }
      case 'rollback': {
        const snapshot = this.#snapshotById(record.snapshotId);
        const map = await this.#maps.cloneLoaded(snapshot.map);
        const old = volume.map;
        volume.map = map;
        volume.sizeBytes = snapshot.sizeBytes;
        await old.drop(chunks);
        return;
      }
      default:
        unreachable(record);
    }
  }

  #addVolume(volume: VolumeEntry): void {
    this.#volumes.set(volume.id, volume);
    this.#byName.set(volume.name, volume);
    this.#nextVolumeId = Math.max(this.#nextVolumeId, volume.id + 1);
  }

  #addSnapshot(snapshot: SnapshotEntry): void {
    this.#snapshots.set(snapshot.id, snapshot);
    this.#volumeById(snapshot.volumeId).snapshots.set(snapshot.name, snapshot);
    this.#nextSnapshotId = Math.max(this.#nextSnapshotId, snapshot.id + 1);
  }

  #volumeById(volumeId: number, error: (message: string) => ChunkdError = ChunkdError.corrupt): VolumeEntry {
    const volume = this.#volumes.get(volumeId);
    if (volume === undefined) throw error(`volume id ${volumeId} does not exist`);
    return volume;
  }

  #snapshotById(snapshotId: number, error: (message: string) => ChunkdError = ChunkdError.corrupt): SnapshotEntry {
    const snapshot = this.#snapshots.get(snapshotId);
    if (snapshot === undefined) throw error(`snapshot id ${snapshotId} does not exist`);
    return snapshot;
  }

  #mapOf(target: MapTarget): PagedMap {
    return 'volumeId' in target ? this.#volumeById(target.volumeId, ChunkdError.notFound).map : this.#snapshotById(target.snapshotId, ChunkdError.notFound).map;
  }

  #enqueue<T>(task: () => Promise<T>): Promise<T> {
    this.#openGate?.();
    this.#queued += 1;
    const settle = (): void => {
      this.#queued -= 1;
    };
    const result = this.#queue.then(task, task);
    this.#queue = result.then(settle, settle);
    return result;
  }
}
