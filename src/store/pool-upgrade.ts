// The upgrade of a pool of format 3 (all metadata in memory: a checkpoint plus a journal, metadata.ts's Catalog)
// to format 4 (paged metadata: paged-catalog.ts), offline: `chunkd pool upgrade --pool DIR --metadata paged`.
// The chunk files stay as they are (the same physical chunks); only the metadata is rebuilt.
//
// How: the old metadata is loaded as a node would load it (pool-layout.ts's loadMetadata: checkpoint, journal),
// then the records that would have built it are synthesized (`upgradeRecords`) and applied to a fresh paged
// catalog, as a replay applies a journal. Why records and not a copy of the maps: the paged catalog's only way in
// is `apply` (no bulk load), the records carry every check `applyRecord` makes (checkRecord), and they give the
// sharing: per volume, in creation order, the volume is made (created empty, or cloned from the snapshot it was
// cloned from), then each map (each snapshot in id order, then the live volume) is built from a parent map by
// the parent's clone (the volume's own state, or a rollback to one of its earlier snapshots) and the diff between
// the two (map records of the parent's chunks with their checksums, unmaps of its holes), then the snapshot is
// taken with its own id, uuid, name and creation time. A clone or snapshot in the paged catalog shares the root and
// copies only the leaves a later record changes, so maps that shared pages in format 3 share nodes in format 4,
// and a map changes only the leaves where it differs from its parent.
//
// Which parent: format 3 says who shares with whom (a snapshot, its volume and its clones hold the same `Page`
// objects, and the checkpoint keeps them shared). A map's parent is the built snapshot that holds the most of its
// pages: for a volume's first map, a snapshot of an earlier volume (its clone origin: none, it was created); after
// that, the volume's state now (the snapshot just taken) or one of its earlier snapshots (a rollback happened).
// Counted from an index of which snapshots hold each page, only over the pages the volume's state does not share,
// so that the usual case (no rollback) costs a pass over the map's pages.
//
// Order of a diff's records: within windows of `shuffleWindow` records, shuffled. A B+tree filled by appends in
// key order leaves its leaves half full (paged-map.ts: a split shares entries evenly); keys at random fill them
// about as a node's random writes do (measured in the report of this step, paged-metadata.md).
//
// Crash safety: the new metadata is built in `upgrade.tmp/` (metadata.0, metadata.1), written with checkpoints
// on the way (so that memory stays bounded), closed, opened again and compared with the old metadata (every
// volume and snapshot: ids, names, sizes, uuids, creation times, every mapped chunk and its checksum). Then the two
// page files are renamed into the pool and the directory synced (a format-3 pool ignores metadata.*), then the
// marker chunkd-pool.json is replaced (temporary file, fdatasync, rename) by one of format 4 and the directory
// synced: that rename is the switch. Only then are the checkpoint and journals removed. A crash before the switch
// leaves the pool of format 3 whole (what the upgrade wrote is removed by the next open or upgrade:
// `removeUpgradeLeftovers`); after it, the pool of format 4 whole (its root covers the old journal's generation:
// an open ignores the old journals and removes them, and the next open or `pool upgrade` removes the old
// checkpoint).
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, metadataCacheBytesDefault } from '../core/limits.ts';
import { makeRandom, randomInt } from '../core/random.ts';
import type { ChunkMap, Page } from './chunk-map.ts';
import type { ChunkSums } from './chunk-sums.ts';
import { realFiles, replaceFile, type FileLayer } from './file-layer.ts';
import { diffMaps } from './map-diff.ts';
import type { Catalog, MetaRecord, SnapshotMeta, VolumeMeta } from './metadata.ts';
import { mappedRunsOf } from './paged-backend.ts';
import { PagedCatalog, pagedCatalogFile } from './paged-catalog.ts';
import type { PagedMap } from './paged-map.ts';
import { checkPoolMarker, checkpointCopies, checkpointPath, journalGenerations, journalPaths, loadMetadata, markerPath, pagedPoolMarker, withPoolLocked, type MetadataKind } from './pool-layout.ts';

/** Where the new metadata is built, in the pool directory. */
export const upgradeDirectoryName = 'upgrade.tmp';

/** Chunks a synthesized map record names at most (a wide pass pins every page of its range). */
const recordChunksMax = 65_536;
/** Records shuffled together (see the top). */
const shuffleWindow = 8_192;
/** Map nodes changed before an intermediate checkpoint of the metadata being built (16 MiB of nodes). */
const checkpointDirtyPages = 4_096;

export interface UpgradeOptions {
  files?: FileLayer;
  log?: (line: string) => void;
  /** The page cache while building (default limits.metadataCacheBytesDefault). */
  cacheBytes?: number;
  /** Tests: map node capacities, as PagedCatalogOptions. */
  leafCapacity?: number;
  interiorCapacity?: number;
  /** Tests: apply each diff's records in key order instead of shuffled (to measure what the shuffle saves). */
  inKeyOrder?: boolean;
}

export interface UpgradeReport {
  directory: string;
  fromFormat: number;
  toFormat: number;
  volumeCount: number;
  snapshotCount: number;
  /** Records synthesized and applied. */
  records: number;
  /** Bytes of one copy of the new page file. */
  metadataBytes: number;
  /** Metadata copies found damaged at load and read from the other copy (the upgrade rebuilt from the good one). */
  repairs: string[];
  seconds: number;
}

/**
 * Upgrades the pool in `directory` from format 3 to format 4 (paged metadata), holding its lock: EBUSY while a
 * node holds it, EINVAL when it is of format 4 already. See the top for the steps and why a crash is safe.
 */
export function upgradePool(directory: string, options: UpgradeOptions = {}): Promise<UpgradeReport> {
  const files = options.files ?? realFiles;
  const started = performance.now();
  return withPoolLocked(files, directory, async (resolved) => {
    const kind = await checkPoolMarker(files, resolved);
    if (kind === 'paged') {
      await removeUpgradeLeftovers(files, resolved, kind);
      throw ChunkdError.invalid(`pool ${resolved} has paged metadata (format 4) already: nothing to upgrade`);
    }
    await removeUpgradeLeftovers(files, resolved, kind);
    const loaded = await loadMetadata(files, resolved);
    const staging = path.join(resolved, upgradeDirectoryName);
    fs.mkdirSync(staging, { mode: 0o700 });
    await files.syncDirectory(resolved);
    const catalogOptions = { cacheBytes: options.cacheBytes ?? metadataCacheBytesDefault, leafCapacity: options.leafCapacity, interiorCapacity: options.interiorCapacity };
    // Build, with the root covering the old journal's generation: every record of it is in the pages.
    const built = await PagedCatalog.open(files, staging, catalogOptions);
    let records = 0;
    try {
      const order = options.inKeyOrder === true ? (window: MetaRecord[]) => window : shuffled;
      let window: MetaRecord[] = [];
      const flush = async (): Promise<void> => {
        for (const record of order(window)) {
          await built.apply(record, false).catch((error: unknown) => {
            if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
            throw ChunkdError.corrupt(`pool ${resolved}: its metadata could not be rebuilt (${(error as Error).message}); nothing was changed: chunkd fsck --pool ${resolved} says what is damaged`);
          });
          records += 1;
          // Frees final at once, as in a replay (replayPaged): nothing here waits for a journal commit.
          built.chunks.releaseTaken(built.chunks.takeDeferred(built.chunks.deferredMark()));
          if (built.dirtyPages >= checkpointDirtyPages) await built.checkpoint(loaded.generation);
        }
        window = [];
      };
      for (const record of upgradeRecords(loaded.catalog)) {
        // Only a diff's map and unmap records may be reordered: each names its own range of one map.
        if (record.type !== 'map' && record.type !== 'unmap') await flush();
        window.push(record);
        if (window.length >= shuffleWindow || (record.type !== 'map' && record.type !== 'unmap')) await flush();
      }
      await flush();
      await built.raiseNextIds(loaded.catalog.nextVolumeId, loaded.catalog.nextSnapshotId);
      await built.checkpoint(loaded.generation);
    } finally {
      await built.close();
    }
    // What is on disk now, read back and compared before anything of the old pool is touched.
    const reread = await PagedCatalog.open(files, staging, catalogOptions);
    try {
      await compareCatalogs(loaded.catalog, reread);
    } finally {
      await reread.close();
    }
    for (let copy = 0; copy < checkpointCopies; copy++) {
      await files.rename(path.join(staging, `${pagedCatalogFile}.${copy}`), path.join(resolved, `${pagedCatalogFile}.${copy}`));
    }
    await files.syncDirectory(resolved);
    // The switch.
    await replaceFile(files, markerPath(resolved), pagedPoolMarker(await markerCreatedAt(resolved)));
    await files.syncDirectory(resolved);
    for (const generation of journalGenerations(resolved)) for (const file of journalPaths(resolved, generation)) await files.unlink(file);
    await removeUpgradeLeftovers(files, resolved, 'paged');
    await files.syncDirectory(resolved);
    options.log?.(`pool ${resolved}: upgraded to paged metadata (format 4)`);
    return {
      directory: resolved,
      fromFormat: 3,
      toFormat: 4,
      volumeCount: loaded.catalog.volumes.size,
      snapshotCount: loaded.catalog.snapshots.size,
      records,
      metadataBytes: fs.statSync(path.join(resolved, `${pagedCatalogFile}.0`)).size,
      repairs: loaded.repairs,
      seconds: (performance.now() - started) / 1000,
    };
  }).catch((error: unknown) => {
    if (error instanceof ChunkdError && error.code === 'EBUSY') throw ChunkdError.busy(`${error.message}: the upgrade is offline; stop the node first`);
    throw error;
  });
}

/** The creation time the pool's marker records (kept by the upgrade). */
async function markerCreatedAt(directory: string): Promise<string> {
  const marker = JSON.parse(fs.readFileSync(markerPath(directory), 'utf8')) as { createdAt?: unknown };
  return typeof marker.createdAt === 'string' ? marker.createdAt : new Date().toISOString();
}

/**
 * What an upgrade cut short leaves in a pool of kind `kind`, as paths: the building directory, and, in a pool of
 * format 3, page files moved in before the switch; in a pool of format 4, the old checkpoint left after it.
 */
export function upgradeLeftovers(directory: string, kind: MetadataKind): string[] {
  const staging = path.join(directory, upgradeDirectoryName);
  const stale = kind === 'memory' ? [0, 1].map((copy) => path.join(directory, `${pagedCatalogFile}.${copy}`)) : Array.from({ length: checkpointCopies }, (_, copy) => checkpointPath(directory, copy));
  return [staging, ...stale.flatMap((name) => [name, `${name}.tmp`])].filter((file) => fs.existsSync(file));
}

/** Removes `upgradeLeftovers` (the pool locked); returns their names. */
export async function removeUpgradeLeftovers(files: FileLayer, directory: string, kind: MetadataKind): Promise<string[]> {
  const found = upgradeLeftovers(directory, kind);
  for (const file of found) {
    if (!fs.statSync(file).isDirectory()) {
      await files.unlink(file);
      continue;
    }
    for (const name of fs.readdirSync(file)) await files.unlink(path.join(file, name));
    fs.rmdirSync(file);
  }
  return found.map((file) => path.basename(file));
}

/** Fisher-Yates over a copy, with a fixed seed (the same pool upgrades to the same pages). */
function shuffled<T>(items: readonly T[]): T[] {
  const out = [...items];
  const random = makeRandom(items.length);
  for (let i = out.length - 1; i > 0; i--) {
    const j = randomInt(random, i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/** A map to build: a snapshot, or a volume's live state (built last). */
type Target = { snapshot: SnapshotMeta } | { volume: VolumeMeta };

/**
 * The records that build `catalog` from nothing, sharing as it shares (see the top): per volume in id order, its
 * creation or clone, then for each of its snapshots in id order and last its live state, the rollback to the
 * parent if not the state now, a resize if the size differs, the diff from the parent, and the snapshot.
 * Pure: reads the catalog only.
 */
export function* upgradeRecords(catalog: Catalog): Generator<MetaRecord> {
  const volumes = [...catalog.volumes.values()].sort((a, b) => a.id - b.id);
  // Snapshots in the order they are built; `holders` says which of them hold each page (ascending positions).
  const order = volumes.flatMap((volume) => [...volume.snapshots.values()].sort((a, b) => a.id - b.id));
  const holders = new Map<Page, number[]>();
  order.forEach((snapshot, position) => {
    for (const [, page] of snapshot.map.pages()) {
      const list = holders.get(page);
      if (list === undefined) holders.set(page, [position]);
      else list.push(position);
    }
  });
  let built = 0;
  for (const volume of volumes) {
    const targets: Target[] = [...[...volume.snapshots.values()].sort((a, b) => a.id - b.id).map((snapshot) => ({ snapshot })), { volume }];
    /** The snapshot the volume's map is a clone of now (null: empty, or not yet made). */
    let current: SnapshotMeta | null = null;
    let sizeBytes = 0;
    for (const [index, target] of targets.entries()) {
      const map = 'snapshot' in target ? target.snapshot.map : target.volume.map;
      const wantedSize = 'snapshot' in target ? target.snapshot.sizeBytes : target.volume.sizeBytes;
      const first = index === 0;
      const allowed = (snapshot: SnapshotMeta): boolean => (first ? snapshot.volumeId !== volume.id : snapshot.volumeId === volume.id);
      const parent = parentOf(map, current, order, holders, built, allowed);
      if (first) {
        if (parent === null) {
          yield { type: 'create', volumeId: volume.id, name: volume.name, sizeBytes: wantedSize };
          sizeBytes = wantedSize;
        } else {
          yield { type: 'clone', volumeId: volume.id, name: volume.name, snapshotId: parent.id };
          sizeBytes = parent.sizeBytes;
        }
      } else if (parent !== current && parent !== null) {
        yield { type: 'rollback', volumeId: volume.id, snapshotId: parent.id };
        sizeBytes = parent.sizeBytes;
      }
      current = parent;
      if (sizeBytes !== wantedSize) yield { type: 'resize', volumeId: volume.id, sizeBytes: wantedSize };
      sizeBytes = wantedSize;
      yield* diffRecords(volume.id, current?.map ?? null, map, catalog.sums);
      if ('snapshot' in target) {
        const { id, name, createdAtMs, uuid } = target.snapshot;
        yield { type: 'snapshot', volumeId: volume.id, snapshotId: id, name, createdAtMs, uuid };
        current = target.snapshot;
        built += 1;
      }
    }
  }
}

/**
 * The built snapshot (position below `built`, `allowed`) holding the most pages of `map`, or `current` when none
 * holds more than it does.
 */
function parentOf(map: ChunkMap, current: SnapshotMeta | null, order: readonly SnapshotMeta[], holders: ReadonlyMap<Page, number[]>, built: number, allowed: (snapshot: SnapshotMeta) => boolean): SnapshotMeta | null {
  const counts = new Map<number, number>();
  for (const [pageIndex, page] of map.pages()) {
    if (current !== null && current.map.pageAt(pageIndex) === page) continue;
    for (const position of holders.get(page) ?? []) {
      if (position >= built) break;
      if (allowed(order[position]!)) counts.set(position, (counts.get(position) ?? 0) + 1);
    }
  }
  let best: SnapshotMeta | null = null;
  let bestCount = 0;
  for (const [position, count] of counts) {
    if (count > bestCount) [best, bestCount] = [order[position]!, count];
  }
  if (best === null) return current;
  if (current === null) return best;
  return sharedPages(map, best.map) > sharedPages(map, current.map) ? best : current;
}

function sharedPages(a: ChunkMap, b: ChunkMap): number {
  let shared = 0;
  for (const [pageIndex, page] of a.pages()) if (b.pageAt(pageIndex) === page) shared += 1;
  return shared;
}

/** Map and unmap records that turn a clone of `from` (null: an empty map) into `to` on volume `volumeId`. */
function* diffRecords(volumeId: number, from: ChunkMap | null, to: ChunkMap, sums: ChunkSums): Generator<MetaRecord> {
  const extents = from === null ? [...to.mappedRuns()] : diffMaps(from, to, Number.POSITIVE_INFINITY);
  for (const extent of extents) {
    for (const run of to.runs(extent.virtualChunk, extent.chunkCount)) {
      for (let done = 0; done < run.chunkCount; done += recordChunksMax) {
        const chunkCount = Math.min(recordChunksMax, run.chunkCount - done);
        const virtualChunk = run.virtualChunk + done;
        if (run.physicalChunk < 0) {
          yield { type: 'unmap', volumeId, virtualChunk, chunkCount };
          continue;
        }
        const physicalChunk = run.physicalChunk + done;
        const runSums = new Uint32Array(chunkCount);
        for (let i = 0; i < chunkCount; i++) runSums[i] = sums.get(physicalChunk + i);
        yield { type: 'map', volumeId, virtualChunk, physicalChunk, chunkCount, sums: runSums };
      }
    }
  }
}

/**
 * Throws ECORRUPT unless `paged` holds exactly what `catalog` holds: the same volumes and snapshots (ids, names,
 * sizes, uuids, creation times, chunks mapped) and every map the same chunks with the same checksums.
 */
export async function compareCatalogs(catalog: Catalog, paged: PagedCatalog): Promise<void> {
  const fail = (why: string): never => {
    throw ChunkdError.corrupt(`the paged metadata built does not match the old metadata: ${why}; the pool is left as it was`);
  };
  const tables = paged.tables;
  if (tables.volumes.size !== catalog.volumes.size || tables.snapshots.size !== catalog.snapshots.size) fail('not the same number of volumes or snapshots');
  if (tables.nextVolumeId !== catalog.nextVolumeId || tables.nextSnapshotId !== catalog.nextSnapshotId) fail('not the same next ids');
  const compareMap = async (what: string, old: ChunkMap, map: PagedMap, sizeBytes: number): Promise<void> => {
    if (old.mappedCount !== map.mappedCount) fail(`${what}: ${map.mappedCount} chunks mapped, not ${old.mappedCount}`);
    const expected = old.mappedRuns();
    let want = expected.next();
    let offset = 0;
    for await (const run of mappedRunsOf(map, sizeBytes / chunkSizeBytes)) {
      for (let i = 0; i < run.chunkCount; i++) {
        if (want.done === true) fail(`${what}: chunk ${run.virtualChunk + i} mapped, not before`);
        const { virtualChunk, physicalChunk } = want.value!;
        const sum = catalog.sums.get(physicalChunk + offset);
        if (run.virtualChunk + i !== virtualChunk + offset || run.physicalChunk + i !== physicalChunk + offset || run.sums[i] !== sum) {
          fail(`${what}: chunk ${run.virtualChunk + i} maps ${run.physicalChunk + i} (sum ${run.sums[i]}), not chunk ${virtualChunk + offset} to ${physicalChunk + offset} (sum ${sum})`);
        }
        offset += 1;
        if (offset === want.value!.chunkCount) [want, offset] = [expected.next(), 0];
      }
    }
    if (want.done !== true) fail(`${what}: chunk ${want.value.virtualChunk + offset} not mapped`);
  };
  for (const volume of catalog.volumes.values()) {
    const other = tables.volumes.get(volume.id);
    if (other === undefined || other.name !== volume.name || other.sizeBytes !== volume.sizeBytes) fail(`volume ${volume.name} (id ${volume.id})`);
    await compareMap(`volume ${volume.name}`, volume.map, other!.map, volume.sizeBytes);
  }
  for (const snapshot of catalog.snapshots.values()) {
    const other = tables.snapshots.get(snapshot.id);
    const fields = (s: Omit<SnapshotMeta, 'map'>): string => JSON.stringify([s.uuid, s.volumeId, s.name, s.sizeBytes, s.createdAtMs]);
    if (other === undefined || fields(other) !== fields(snapshot)) fail(`snapshot id ${snapshot.id} (${snapshot.name})`);
    await compareMap(`snapshot ${snapshot.name} (id ${snapshot.id})`, snapshot.map, other!.map, snapshot.sizeBytes);
  }
}
