// Offline consistency check of a pool no node holds. It reads the checkpoint and journal exactly as a node's
// load does (without writing anything), then checks what a load assumes: each volume's and snapshot's map inside
// its size, and every referenced chunk backed by its chunk file. Damage is any of that, and also a metadata copy
// that a start would have to repair from the other one: `clean` means no damage at all. Data left in free space
// by a crash (written, never committed), a torn journal tail, and files of an older generation are warnings,
// not damage: the next start drops them. `chunkd fsck` exits 0 when clean, 1 on damage, 2 when it cannot run.
// A pool of paged metadata gets the checks of paged-check.ts besides (both copies of every page, the reference
// counts against the maps), read-only.
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, chunksPerFile, volumeSizeAlignBytes } from '../core/limits.ts';
import { ChunkAllocator, type FreeExtent } from './allocator.ts';
import { chunkFileIndexOf, chunkFilePath } from './chunk-file-layout.ts';
import type { ChunkMap } from './chunk-map.ts';
import { realFiles, type FileLayer } from './file-layer.ts';
import { dataRanges } from './native.ts';
import { mappedRunsOf, replayPaged } from './paged-backend.ts';
import { checkPagedCatalog } from './paged-check.ts';
import type { PagedMap } from './paged-map.ts';
import { checkPoolMarker, chunksDirectory, loadMetadata, withPoolLocked } from './pool-layout.ts';
import { upgradeLeftovers } from './pool-upgrade.ts';

export interface FsckReport {
  directory: string;
  clean: boolean;
  /** Damage: what was found, one line each. */
  errors: string[];
  /** Damage fsck --repair repairs with nothing lost (from the other metadata copy, or, over pages, from the maps). */
  repairable: boolean;
  /** Whether the metadata could be read at all (the counts below mean nothing when not). */
  loaded: boolean;
  warnings: string[];
  volumeCount: number;
  snapshotCount: number;
  mappedBytes: number;
  reclaimableBytes: number;
  generation: number;
  replayedRecords: number;
}

/**
 * Checks the pool in `directory`. Throws (the CLI's exit 2) when it cannot run: not a pool, a pool of another
 * format, a pool a running node holds (EBUSY).
 */
export function fsckPool(directory: string, files: FileLayer = realFiles): Promise<FsckReport> {
  return withPoolLocked(files, directory, (resolved) => check(files, resolved));
}

async function check(files: FileLayer, directory: string): Promise<FsckReport> {
  const errors: string[] = [];
  const warnings: string[] = [];
  const report = (extra: Partial<FsckReport>): FsckReport => ({
    directory, clean: errors.length === 0, errors, repairable: false, loaded: true, warnings, volumeCount: 0, snapshotCount: 0, mappedBytes: 0, reclaimableBytes: 0, generation: 0, replayedRecords: 0, ...extra,
  });
  if ((await checkPoolMarker(files, directory)) === 'paged') return checkPaged(files, directory, errors, warnings, report);
  let loaded;
  try {
    loaded = await loadMetadata(files, directory);
  } catch (error) {
    if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
    errors.push(`metadata: ${error.message}`);
    return report({ loaded: false });
  }
  const { catalog, refs, generation, replayedRecords, tornTail } = loaded;
  for (const line of loaded.repairs) errors.push(`metadata: ${line} (repairable: the next start or fsck --repair writes it whole again; nothing is lost)`);
  const repairable = loaded.repairs.length > 0;
  if (tornTail) warnings.push(`journal-${generation} ends in a commit torn by a crash; the next start drops it (it was never acknowledged)`);
  for (const line of loaded.leftovers) warnings.push(`stray metadata file ${line}; the next start removes it`);
  for (const file of upgradeLeftovers(directory, 'memory')) warnings.push(`${path.basename(file)}, left by a pool upgrade cut short (the pool is still of format 3); the next start or pool upgrade removes it`);

  const chunkDirectory = chunksDirectory(directory);
  const fileSizes = chunkFileSizes(chunkDirectory);
  let mappedBytes = 0;
  const checkMap = (what: string, map: ChunkMap, sizeBytes: number): void => {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % volumeSizeAlignBytes !== 0) errors.push(`${what}: invalid size ${sizeBytes}`);
    const sizeChunks = sizeBytes / chunkSizeBytes;
    for (const run of map.mappedRuns()) {
      mappedBytes += run.chunkCount * chunkSizeBytes;
      if (run.virtualChunk + run.chunkCount > sizeChunks) {
        errors.push(`${what}: chunks ${run.virtualChunk}..${run.virtualChunk + run.chunkCount - 1} are mapped past its end`);
      }
    }
  };
  for (const volume of catalog.volumes.values()) {
    checkMap(`volume ${volume.name}`, volume.map, volume.sizeBytes);
    for (const snapshot of volume.snapshots.values()) checkMap(`snapshot ${volume.name}@${snapshot.name}`, snapshot.map, snapshot.sizeBytes);
  }
  // Every referenced chunk must lie inside a chunk file that was written that far.
  checkChunkFiles(refs.usedRuns(), fileSizes, errors);

  let allocator: ChunkAllocator | null = null;
  try {
    allocator = ChunkAllocator.fromUsed(refs.usedRuns());
  } catch (error) {
    errors.push(`allocation: ${(error as Error).message}`);
  }

  const reclaimableBytes = allocator === null ? 0 : reclaimable(chunkDirectory, fileSizes, allocator.freeExtents(), allocator.highWater, warnings);
  return report({ repairable: repairable && errors.length === loaded.repairs.length, volumeCount: catalog.volumes.size, snapshotCount: catalog.snapshots.size, mappedBytes, reclaimableBytes, generation, replayedRecords });
}

/**
 * fsck of a pool of paged metadata (paged-backend.ts), read-only (no page is rewritten, not even one a read finds
 * damaged in one copy): the root and table read, the journals after the root replayed (in memory), both copies of
 * every page the root names read (paged-check.ts), every map tree walked once and the reference counts compared
 * with what the maps name, then every map walked leaf by leaf in slices: mapped inside its size, its chunks inside
 * the chunk files.
 */
async function checkPaged(files: FileLayer, directory: string, errors: string[], warnings: string[], report: (extra: Partial<FsckReport>) => FsckReport): Promise<FsckReport> {
  let replayed;
  try {
    replayed = await replayPaged(files, directory, { cacheBytes: fsckCacheBytes, readOnly: true });
  } catch (error) {
    if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
    errors.push(`metadata: ${error.message}`);
    return report({ loaded: false });
  }
  const { catalog, generation, replayedRecords, tornTail } = replayed;
  try {
    for (const line of replayed.repairs) errors.push(`metadata: ${line} (repairable: fsck --repair or the next start writes it whole again; nothing is lost)`);
    if (tornTail) warnings.push(`journal-${generation} ends in a commit torn by a crash; the next start drops it (it was never acknowledged)`);
    for (const line of replayed.leftovers) warnings.push(`stray metadata file ${line}; the next start removes it`);
    for (const file of upgradeLeftovers(directory, 'paged')) warnings.push(`${path.basename(file)}, left by the pool upgrade (the pool is of format 4); the next start removes it`);
    for (const copy of catalog.file.rootMissingFrom) {
      warnings.push(`${catalog.file.paths[copy]} lacks the newest metadata root (a commit cut short by a crash, or damage); the next start or fsck --repair writes it there`);
    }
    const findings = await checkPagedCatalog(catalog);
    errors.push(...findings.repairable);
    const repairableCount = replayed.repairs.length + findings.repairable.length;
    errors.push(...findings.unrepairable);
    const chunkDirectory = chunksDirectory(directory);
    const fileSizes = chunkFileSizes(chunkDirectory);
    let mappedBytes = 0;
    const checkMap = async (what: string, map: PagedMap, sizeBytes: number): Promise<void> => {
      if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % volumeSizeAlignBytes !== 0) errors.push(`${what}: invalid size ${sizeBytes}`);
      let inside = 0;
      try {
        for await (const run of mappedRunsOf(map, Math.floor(sizeBytes / chunkSizeBytes))) {
          inside += run.chunkCount;
          checkChunkFiles([run], fileSizes, errors);
        }
      } catch (error) {
        // A page damaged in both copies: reported above, with the bytes of each map it held.
        if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT' || findings.walk.lost.size === 0) throw error;
        return;
      }
      mappedBytes += map.mappedCount * chunkSizeBytes;
      if (inside !== map.mappedCount) errors.push(`${what}: ${map.mappedCount - inside} chunk(s) are mapped past its end`);
    };
    try {
      for (const volume of catalog.tables.volumes.values()) {
        await checkMap(`volume ${volume.name}`, volume.map, volume.sizeBytes);
        for (const snapshot of volume.snapshots.values()) await checkMap(`snapshot ${volume.name}@${snapshot.name}`, snapshot.map, snapshot.sizeBytes);
      }
    } catch (error) {
      if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
      errors.push(`metadata: ${error.message}`);
    }
    const chunks = catalog.chunks;
    let reclaimableBytes = 0;
    try {
      reclaimableBytes = reclaimable(chunkDirectory, fileSizes, await chunks.freeExtents(), await chunks.settledHighWater(), warnings);
    } catch (error) {
      // A page of counts damaged in both copies: named above (the free space cannot be read without it).
      if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT' || findings.scan.lost.length === 0) throw error;
    }
    return report({
      repairable: repairableCount > 0 && errors.length === repairableCount,
      volumeCount: catalog.tables.volumes.size,
      snapshotCount: catalog.tables.snapshots.size,
      mappedBytes,
      reclaimableBytes,
      generation,
      replayedRecords,
    });
  } finally {
    await catalog.close();
  }
}

/** The paged catalog's cache while fsck walks it. */
const fsckCacheBytes = 64 * 1024 * 1024;

function chunkFileSizes(chunkDirectory: string): Map<number, number> {
  const existing = fs.existsSync(chunkDirectory) ? fs.readdirSync(chunkDirectory).flatMap((name) => chunkFileIndexOf(name) ?? []) : [];
  return new Map(existing.map((index) => [index, fs.statSync(chunkFilePath(chunkDirectory, index)).size]));
}

/** Errors for referenced runs of chunks that lie past the end of their chunk file, or in a missing one. */
function checkChunkFiles(runs: Iterable<{ physicalChunk: number; chunkCount: number }>, fileSizes: Map<number, number>, errors: string[]): void {
  for (const run of runs) {
    const lastChunk = run.physicalChunk + run.chunkCount - 1;
    for (let fileIndex = Math.floor(run.physicalChunk / chunksPerFile); fileIndex <= Math.floor(lastChunk / chunksPerFile); fileIndex++) {
      const needed = (Math.min(lastChunk + 1, (fileIndex + 1) * chunksPerFile) - fileIndex * chunksPerFile) * chunkSizeBytes;
      const size = fileSizes.get(fileIndex);
      const line =
        size === undefined ? `chunk file ${fileIndex} is missing but holds referenced chunks` : size < needed ? `chunk file ${fileIndex} is ${size} bytes, shorter than its referenced chunks (${needed})` : null;
      if (line !== null && !errors.includes(line)) errors.push(line);
    }
  }
}

/** Bytes of data in free chunks (and past the high-water mark), with the warning that names them. */
function reclaimable(chunkDirectory: string, fileSizes: Map<number, number>, freeExtents: readonly FreeExtent[], highWater: number, warnings: string[]): number {
  const free = [...freeExtents];
  const lastFile = Math.max(-1, ...fileSizes.keys());
  if ((lastFile + 1) * chunksPerFile > highWater) free.push({ start: highWater, count: (lastFile + 1) * chunksPerFile - highWater, punch: true });
  let bytes = 0;
  for (const extent of free) bytes += dataInChunks(chunkDirectory, fileSizes, extent.start, extent.count);
  if (bytes > 0) warnings.push(`${bytes} bytes of unmapped data in the chunk files (chunks replaced by overwrites and kept for reuse, or writes a crash left uncommitted); the next start gives them back`);
  return bytes;
}

function dataInChunks(chunkDirectory: string, fileSizes: Map<number, number>, startChunk: number, chunkCount: number): number {
  let bytes = 0;
  const end = startChunk + chunkCount;
  for (let fileIndex = Math.floor(startChunk / chunksPerFile); fileIndex * chunksPerFile < end; fileIndex++) {
    if (!fileSizes.has(fileIndex)) continue;
    const from = (Math.max(startChunk, fileIndex * chunksPerFile) - fileIndex * chunksPerFile) * chunkSizeBytes;
    const to = (Math.min(end, (fileIndex + 1) * chunksPerFile) - fileIndex * chunksPerFile) * chunkSizeBytes;
    const fd = fs.openSync(chunkFilePath(chunkDirectory, fileIndex), 'r');
    try {
      for (const range of dataRanges(fd, from, to)) bytes += range.lengthBytes;
    } finally {
      fs.closeSync(fd);
    }
  }
  return bytes;
}
