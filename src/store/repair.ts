// chunkd fsck --repair: the explicit, offline step after fsck found damage.
//  - Metadata that loads (one copy damaged, the other whole): a new generation is written from it, both copies
//    whole again. Nothing is lost.
//  - Metadata that does not load (the same place damaged in both copies): salvage. The checkpoint gives every
//    frame some copy holds whole (a lost page or map loses its stretch of its exports); the journal is replayed
//    up to its first damaged record and no further: a record applied after a gap could name a chunk that a lost
//    record had freed and a later write reused, and so show one volume another's data. What the journal holds
//    after the gap is reported, record by record, as lost. Then every mapped chunk is read and checked against
//    its checksum, and chunks that fail (damaged, or reused by writes whose records were lost) are unmapped and
//    reported, so that the repaired pool reads without errors. The damaged metadata files are moved into
//    damaged-<time>/ in the pool, and a new generation is written from what was salvaged.
// Chunks no salvaged metadata names are given back at the next start, as after any crash.
// A pool of paged metadata (format 4) is repaired by `repairPaged`, below: from one whole copy or from what the
// maps say (nothing lost), and a journal damaged in both copies salvaged as above; a page damaged in both copies
// is not salvaged there (yet): it is listed and nothing is changed.
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes } from '../core/limits.ts';
import { ChunkFiles } from './chunk-files.ts';
import { InlineChunkIo } from './chunk-io.ts';
import type { ChunkMap } from './chunk-map.ts';
import { ChunkRefcounts } from './chunk-refcounts.ts';
import { chooseCheckpoint, encodeCheckpoint, salvageCheckpoint, type LostExtent } from './checkpoint.ts';
import { realFiles, type FileLayer } from './file-layer.ts';
import { salvageJournal } from './journal-format.ts';
import { applyRecord, countReferences, emptyCatalog, type Catalog, type MetaRecord } from './metadata.ts';
import { PagedBackend, replayPaged, startAfterReplay } from './paged-backend.ts';
import type { PagedCatalog } from './paged-catalog.ts';
import type { PagedMap } from './paged-map.ts';
import { checkPagedCatalog, countMismatches, recount, scanPageCopies, walkMaps } from './paged-check.ts';
import { beginGeneration, checkPoolMarker, checkpointCopies, checkpointPath, chunksDirectory, journalGenerations, journalPaths, loadMetadata, readCopies, withPoolLocked } from './pool-layout.ts';
import { memoryScrubSource, scrub } from './scrub.ts';

export interface RepairReport {
  directory: string;
  /** What the repair did, one line each. */
  actions: string[];
  /** True when the pool was only rewritten from whole copies: nothing was lost. */
  lossless: boolean;
  /** Stretches of volumes and snapshots that no longer hold what they held (they read as zeros or older data). */
  lostExtents: LostExtent[];
  /** Changes that were made and are lost (volumes created, snapshots taken, ...), and records no copy could give. */
  lostChanges: string[];
  /** Where the damaged metadata files were moved, or null. */
  setAside: string | null;
  /** The metadata generation the repaired pool starts from. */
  generation: number;
  /** Damage found and not repaired (a page of paged metadata damaged in both copies): the pool was left as it was. */
  unrepairable: string[];
}

/** Repairs the pool in `directory` (not held by a node: EBUSY otherwise). */
export function repairPool(directory: string, files: FileLayer = realFiles): Promise<RepairReport> {
  return withPoolLocked(files, directory, async (resolved) => {
    if ((await checkPoolMarker(files, resolved)) === 'paged') return repairPaged(files, resolved);
    let loaded;
    try {
      loaded = await loadMetadata(files, resolved);
    } catch (error) {
      if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
      return await salvage(files, resolved, error.message);
    }
    const generation = loaded.generation + 1;
    (await beginGeneration(files, resolved, encodeCheckpoint(loaded.catalog, generation), generation)).close();
    const actions = [
      ...loaded.repairs.map((line) => `rewrote from the good copy: ${line}`),
      ...loaded.leftovers.map((line) => `removed or rewrote ${line}`),
      `wrote metadata generation ${generation} whole, in both copies`,
    ];
    return { directory: resolved, actions, lossless: true, lostExtents: [], lostChanges: [], setAside: null, generation, unrepairable: [] };
  });
}

/**
 * The repair of a pool of paged metadata, in two passes. First a read-only one, fsck's (paged-check.ts): if any
 * damage is beyond repair (a page damaged in both copies, a table that does not load), the report lists it with
 * the volumes and bytes it takes, and nothing is written. Else the pool is opened as a node opens it (the
 * journals after the root replayed, a copy of the root missing from one file written there), both copies of every
 * page the root names are read and a damaged copy rewritten from the whole one (then fdatasynced), the reference
 * counts that differ from the maps are set to what the maps name, and a new root covering all of it is written
 * and a fresh journal generation started, as at a node's open (so a journal damaged in one copy is replaced by one
 * whole in both).
 * A journal damaged in both copies is salvaged as format 3's (above): its records applied up to the first that
 * cannot be read or applied, what follows reported as lost, every mapped chunk read against its checksum and
 * those that fail unmapped and reported, the damaged journals copied into damaged-<time>/, and the root then
 * covers every journal (so none is replayed again).
 * Crash safety: a rewritten copy gets the bytes the other copy holds (a torn write leaves it damaged as before,
 * the other whole), and everything else is the node's own copy-on-write commit, the journals removed only once the
 * root that covers them is durable: a crash at any point leaves the pool as it was, or repaired.
 */
async function repairPaged(files: FileLayer, directory: string): Promise<RepairReport> {
  const fail = (unrepairable: string[]): RepairReport => ({ directory, actions: [], lossless: true, lostExtents: [], lostChanges: [], setAside: null, generation: 0, unrepairable });
  let findings;
  let salvage = false;
  let journalDamage: string | null = null;
  for (;;) {
    try {
      const checked = await replayPaged(files, directory, { cacheBytes: repairCacheBytes, readOnly: true, salvage });
      try {
        findings = await checkPagedCatalog(checked.catalog);
      } finally {
        await checked.catalog.close();
      }
      break;
    } catch (error) {
      if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
      // The journals are read record by record once (the salvage); what else fails to load is beyond repair.
      if (salvage) return fail([...new Set([`metadata: ${journalDamage}`, `metadata: ${error.message}`])]);
      journalDamage = error.message;
      salvage = true;
    }
  }
  if (findings.unrepairable.length > 0) return fail([...(journalDamage === null ? [] : [`metadata: ${journalDamage}`]), ...findings.unrepairable]);

  const replayed = await replayPaged(files, directory, { cacheBytes: repairCacheBytes, salvage });
  const { catalog } = replayed;
  const actions: string[] = [];
  const lostExtents: LostExtent[] = [];
  const lostChanges: string[] = [];
  let setAside: string | null = null;
  try {
    for (const copy of catalog.file.rootMissingFrom) actions.push(`wrote the newest metadata root into ${catalog.file.paths[copy]}, which lacked it`);
    // The pages the open read are repaired already (in the file, not yet synced); the scan finds the rest.
    const scan = await scanPageCopies(catalog, true);
    await catalog.file.sync();
    unreadableSinceCheck(scan.lost.map((page) => page.line));
    for (const page of findings.scan.oneCopy) actions.push(`rewrote from the good copy: ${page.line}`);
    actions.push(`checked both copies of the ${findings.scan.pagesChecked} metadata pages the root names`);
    for (const line of replayed.repairs) actions.push(`replayed from the good copy: ${line}`);
    if (replayed.salvage !== null) {
      const { gap, lost, where } = replayed.salvage;
      actions.push(`the journals do not replay: ${journalDamage}`, `${replayed.replayedRecords} record(s) replayed${gap === null ? '' : `, up to ${gap}`}`);
      for (const item of lost) {
        if (item.kind === 'lost-stretch') lostChanges.push(`${where(item)} to byte ${item.endBytes}: commits ${item.sequences}, unreadable in both copies: what they held is unknown`);
        else if (item.kind === 'lost-frame') describeLost(catalog.tables, item.seemsToBe, `a record at ${where(item)} damaged in both copies`, lostExtents, lostChanges);
        else describeLost(catalog.tables, item.record, `a record at ${where(item)} after the damage (not applied)`, lostExtents, lostChanges);
      }
      const checked = await unmapBadChunks(files, directory, catalog, lostExtents);
      actions.push(`checked ${checked.checkedBytes} bytes of data against their checksums: ${checked.badChunks} bad chunk(s) unmapped`);
      setAside = path.join(directory, `damaged-${new Date().toISOString().replace(/[:.]/g, '-')}`);
      fs.mkdirSync(setAside);
      // Copies: the journals themselves go only once the root that covers them is durable (startAfterReplay).
      for (const generation of journalGenerations(directory)) for (const file of journalPaths(directory, generation)) if (fs.existsSync(file)) fs.copyFileSync(file, path.join(setAside, path.basename(file)));
      await files.syncDirectory(setAside);
      await files.syncDirectory(directory);
      actions.push(`copied the damaged journals to ${setAside}`);
    }
    // The walk must see every map page (a page it cannot read hides what it names: recounted, those chunks and
    // pages would be freed, and reused by the next writes). The check read them all; a page that stopped reading
    // since (a sector gone bad) stops the repair here, before anything is committed.
    const walk = await walkMaps(catalog);
    unreadableSinceCheck([...walk.lost].map(([page, why]) => (why.includes(`page ${page}`) ? why : `metadata page ${page}: ${why}`)));
    const counts = await countMismatches(catalog, walk);
    if (counts.namedButFree.length > 0) throw ChunkdError.corrupt(`map pages ${counts.namedButFree.join(', ')} are named by a map but on the free-page list`);
    await recount(catalog, counts);
    if (counts.chunks.length > 0) actions.push(`recounted ${counts.chunks.length} chunk reference count(s) from the maps (${counts.chunks.slice(0, 4).map((m) => `chunk ${m.index}: ${m.counted} to ${m.named}`).join(', ')}${counts.chunks.length > 4 ? ', ...' : ''})`);
    if (counts.pages.length > 0) actions.push(`recounted ${counts.pages.length} page reference count(s) from the maps (${counts.pages.slice(0, 4).map((m) => `page ${m.index}: ${m.counted} to ${m.named}`).join(', ')}${counts.pages.length > 4 ? ', ...' : ''})`);
    for (const m of counts.summaries) actions.push(`set the summary of page ${m.page} of ${m.of} reference counts from its counts (${m.recorded} free recorded, ${m.counted} counted)`);
    for (const line of replayed.leftovers) actions.push(`removed ${line}`);
    const { generation, journal } = await startAfterReplay(files, directory, replayed);
    journal.close();
    actions.push(`wrote a metadata root covering journal generation ${replayed.generation} (${replayed.replayedRecords} record(s) replayed) and started journal-${generation}, whole in both copies`);
    const lossless = replayed.salvage === null;
    return { directory, actions, lossless, lostExtents: mergeExtents(lostExtents), lostChanges, setAside, generation, unrepairable: [] };
  } finally {
    await catalog.close();
  }
}

/** Throws when the repair's writable pass found pages lost that its read-only check read whole: nothing committed. */
function unreadableSinceCheck(lines: string[]): void {
  if (lines.length === 0) return;
  throw ChunkdError.corrupt(`${lines.join('; ')}: unreadable now, though the check before the repair read it whole; nothing was committed (the pool is as it was); run chunkd fsck again`);
}

/** Reads every chunk the catalog's maps name against its checksum; unmaps those that fail, reported as lost. */
async function unmapBadChunks(files: FileLayer, directory: string, catalog: PagedCatalog, lostExtents: LostExtent[]): Promise<{ checkedBytes: number; badChunks: number }> {
  const maps = new Map<string, { map: PagedMap; sizeBytes: number }>();
  for (const volume of catalog.tables.volumes.values()) {
    maps.set(volume.name, { map: volume.map, sizeBytes: volume.sizeBytes });
    for (const snapshot of volume.snapshots.values()) maps.set(`${volume.name}@${snapshot.name}`, { map: snapshot.map, sizeBytes: snapshot.sizeBytes });
  }
  const plan = await new PagedBackend(catalog, files, directory).scrubPlan([...maps].map(([name, { map, sizeBytes }]) => ({ name, map: () => map, sizeBytes })));
  const chunkFiles = new ChunkFiles(chunksDirectory(directory), files);
  let report;
  try {
    report = await scrub({ io: new InlineChunkIo(chunkFiles), ...plan.source, log: () => {} }, 'the salvaged pool', plan.exports);
  } finally {
    chunkFiles.close();
  }
  const chunks = catalog.chunks;
  for (const extent of report.badExtents) {
    await maps.get(extent.export)!.map.unmapRange(extent.offsetBytes / chunkSizeBytes, extent.lengthBytes / chunkSizeBytes, chunks);
    lostExtents.push({ ...extent, why: 'its data does not match its checksum (damaged, or reused by writes whose records were lost): unmapped, it reads as zeros' });
  }
  chunks.releaseTaken(chunks.takeDeferred(chunks.deferredMark()));
  return report;
}

/** The paged catalog's cache while the repair walks it. */
const repairCacheBytes = 64 * 1024 * 1024;

async function salvage(files: FileLayer, directory: string, reason: string): Promise<RepairReport> {
  const actions = [`the metadata does not load: ${reason}`];
  const lostExtents: LostExtent[] = [];
  const lostChanges: string[] = [];
  const names = fs.readdirSync(directory);
  const generations = journalGenerations(directory);
  const checkpoints = await readCopies(files, Array.from({ length: checkpointCopies }, (_, copy) => checkpointPath(directory, copy)));

  // The checkpoint: whole from one copy, or frame by frame.
  let catalog: Catalog = emptyCatalog();
  let generation = 0;
  if (checkpoints.some((copy) => copy !== null)) {
    try {
      ({ catalog, generation } = chooseCheckpoint(checkpoints));
      actions.push(`checkpoint of generation ${generation} read whole`);
    } catch {
      const salvaged = salvageCheckpoint(checkpoints);
      if (salvaged === null) {
        generation = generations[0] ?? 0;
        lostChanges.push('every volume and snapshot of the checkpoint: its header is damaged in both copies, so not even their names can be read');
      } else {
        ({ catalog, generation } = salvaged);
        lostExtents.push(...salvaged.lost);
        actions.push(`checkpoint of generation ${generation} salvaged: ${salvaged.lostFrames} frame(s) damaged in both copies`);
      }
    }
  }
  const refs = new ChunkRefcounts(() => {});
  countReferences(catalog, refs);

  // The journals from the checkpoint's generation on, applied up to the first damaged record.
  let gap: string | null = null;
  for (const journalGeneration of generations.filter((g) => g >= generation)) {
    const paths = journalPaths(directory, journalGeneration);
    const items = salvageJournal(await readCopies(files, paths), journalGeneration);
    const where = (offsetBytes: number): string => `journal-${journalGeneration} byte ${offsetBytes}`;
    let applied = 0;
    for (const item of items) {
      if (gap === null && item.kind === 'record') {
        try {
          applyRecord(catalog, item.record, refs);
          applied += 1;
          continue;
        } catch (error) {
          if (!(error instanceof ChunkdError)) throw error;
          gap = `${where(item.offsetBytes)}: a record that does not apply (${error.message})`;
        }
      }
      if (item.kind === 'lost-stretch') {
        gap ??= `${where(item.offsetBytes)}: commits ${item.sequences} unreadable in both copies`;
        lostChanges.push(`${where(item.offsetBytes)} to byte ${item.endBytes}: commits ${item.sequences}, unreadable in both copies: what they held is unknown`);
      } else if (item.kind === 'lost-frame') {
        gap ??= `${where(item.offsetBytes)}: a record damaged in both copies`;
        describeLost(catalog, item.seemsToBe, `a record at ${where(item.offsetBytes)} damaged in both copies`, lostExtents, lostChanges);
      } else {
        describeLost(catalog, item.record, `a record at ${where(item.offsetBytes)} after the damage (not applied)`, lostExtents, lostChanges);
      }
    }
    actions.push(`journal-${journalGeneration}: ${applied} record(s) replayed${gap === null ? '' : `, up to ${gap}`}`);
  }

  // Every mapped chunk read and checked: what fails is unmapped, so that the pool reads without errors.
  const chunkFiles = new ChunkFiles(chunksDirectory(directory), files);
  const exports = [
    ...[...catalog.volumes.values()].map((volume) => ({ name: volume.name, map: volume.map })),
    ...[...catalog.snapshots.values()].map((snapshot) => ({ name: `${catalog.volumes.get(snapshot.volumeId)?.name}@${snapshot.name}`, map: snapshot.map })),
  ];
  const report = await scrub(
    { io: new InlineChunkIo(chunkFiles), ...memoryScrubSource(catalog.sums, refs), log: () => {} },
    'the salvaged pool',
    exports.map(({ name, map }) => ({ name, runs: [...map.mappedRuns()] })),
  );
  chunkFiles.close();
  for (const extent of report.badExtents) {
    const map = exports.find((entry) => entry.name === extent.export)!.map as ChunkMap;
    map.unmapRange(extent.offsetBytes / chunkSizeBytes, extent.lengthBytes / chunkSizeBytes, refs);
    lostExtents.push({ ...extent, why: 'its data does not match its checksum (damaged, or reused by writes whose records were lost): unmapped, it reads as zeros' });
  }
  actions.push(`checked ${report.checkedBytes} bytes of data against their checksums: ${report.badChunks} bad chunk(s) unmapped`);

  // The damaged files aside, then a new generation from what was salvaged.
  const aside = path.join(directory, `damaged-${new Date().toISOString().replace(/[:.]/g, '-')}`);
  fs.mkdirSync(aside);
  for (const name of names) {
    if (/^(checkpoint\.\d+|journal-\d+\.\d+)(\.tmp)?$/.test(name)) await files.rename(path.join(directory, name), path.join(aside, name));
  }
  await files.syncDirectory(aside);
  const next = Math.max(generation, ...generations) + 1;
  (await beginGeneration(files, directory, encodeCheckpoint(catalog, next), next)).close();
  actions.push(`moved the damaged metadata files to ${aside}`, `wrote metadata generation ${next} from what was salvaged`);
  return { directory, actions, lossless: false, lostExtents: mergeExtents(lostExtents), lostChanges, setAside: aside, generation: next, unrepairable: [] };
}

/** The names describeLost reads: format 3's Catalog and the paged catalog's tables both have them. */
interface CatalogNames {
  volumes: ReadonlyMap<number, { name: string }>;
  snapshots: ReadonlyMap<number, { name: string; volumeId: number }>;
}

/** Reports what a record that was not applied would have done. */
function describeLost(catalog: CatalogNames, record: MetaRecord | null, what: string, lostExtents: LostExtent[], lostChanges: string[]): void {
  if (record === null) {
    lostChanges.push(`${what}: unreadable, what it did is unknown`);
    return;
  }
  const volumeName = (id: number): string => catalog.volumes.get(id)?.name ?? `volume id ${id}`;
  const snapshotName = (id: number): string => {
    const snapshot = catalog.snapshots.get(id);
    return snapshot === undefined ? `id ${id}` : `${volumeName(snapshot.volumeId)}@${snapshot.name}`;
  };
  switch (record.type) {
    case 'map':
    case 'unmap': {
      const volume = catalog.volumes.get(record.volumeId);
      const why = `${what}: a ${record.type === 'map' ? 'write' : 'trim'} that is lost, so these bytes read as they were before it`;
      if (volume === undefined) lostChanges.push(`${why} (of ${volumeName(record.volumeId)}, chunks ${record.virtualChunk}+${record.chunkCount})`);
      else lostExtents.push({ export: volume.name, offsetBytes: record.virtualChunk * chunkSizeBytes, lengthBytes: record.chunkCount * chunkSizeBytes, why });
      return;
    }
    case 'create':
      lostChanges.push(`${what}: volume ${record.name} was created; it is lost`);
      return;
    case 'clone':
      lostChanges.push(`${what}: clone ${record.name} was made; it is lost`);
      return;
    case 'remove':
      lostChanges.push(`${what}: ${volumeName(record.volumeId)} was removed; it is back`);
      return;
    case 'resize':
      lostChanges.push(`${what}: ${volumeName(record.volumeId)} was resized to ${record.sizeBytes} bytes; it has its old size`);
      return;
    case 'snapshot':
      lostChanges.push(`${what}: snapshot ${volumeName(record.volumeId)}@${record.name} was taken; it is lost`);
      return;
    case 'snapshot-remove':
      lostChanges.push(`${what}: snapshot ${snapshotName(record.snapshotId)} was removed; it is back`);
      return;
    case 'rollback':
      lostChanges.push(`${what}: ${volumeName(record.volumeId)} was rolled back to snapshot ${snapshotName(record.snapshotId)}; it was not`);
      return;
  }
}

/** Extents of one export and reason, sorted and merged where they touch. */
function mergeExtents(extents: LostExtent[]): LostExtent[] {
  const sorted = [...extents].sort((a, b) => a.export.localeCompare(b.export) || a.offsetBytes - b.offsetBytes);
  const merged: LostExtent[] = [];
  for (const extent of sorted) {
    const last = merged[merged.length - 1];
    if (last !== undefined && last.export === extent.export && last.why === extent.why && last.offsetBytes + last.lengthBytes >= extent.offsetBytes) {
      last.lengthBytes = Math.max(last.lengthBytes, extent.offsetBytes + extent.lengthBytes - last.offsetBytes);
    } else {
      merged.push({ ...extent });
    }
  }
  return merged;
}
