// Offline consistency check of a pool no node holds. It reads the checkpoint and journal exactly as a node's
// load does (without writing anything), then checks what a load assumes: each volume's and snapshot's map inside
// its size, and every referenced chunk backed by its chunk file. Data left in free space by a
// crash (written, never committed) is reported as reclaimable, not as an error: the next start punches it out.
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, chunksPerFile, volumeSizeAlignBytes } from '../core/limits.ts';
import { ChunkAllocator } from './allocator.ts';
import { ChunkFiles } from './chunk-files.ts';
import type { ChunkMap } from './chunk-map.ts';
import { dataRanges } from './native.ts';
import { loadMetadata, lockPool } from './pool.ts';

export interface FsckReport {
  directory: string;
  clean: boolean;
  errors: string[];
  warnings: string[];
  volumeCount: number;
  snapshotCount: number;
  mappedBytes: number;
  reclaimableBytes: number;
  generation: number;
  replayedRecords: number;
}

/** Checks the pool in `directory`; refuses (EBUSY) a pool a running node holds. */
export function fsckPool(directory: string): FsckReport {
  const resolved = path.resolve(directory);
  if (!fs.existsSync(path.join(resolved, 'chunkd-pool.json'))) throw ChunkdError.notFound(`${resolved} is not a chunkd pool (no chunkd-pool.json)`);
  const lockFd = lockPool(resolved);
  try {
    return check(resolved);
  } finally {
    fs.closeSync(lockFd);
  }
}

function check(directory: string): FsckReport {
  const errors: string[] = [];
  const warnings: string[] = [];
  const report = (clean: boolean, extra: Partial<FsckReport>): FsckReport => ({
    directory, clean, errors, warnings, volumeCount: 0, snapshotCount: 0, mappedBytes: 0, reclaimableBytes: 0, generation: 0, replayedRecords: 0, ...extra,
  });
  let loaded;
  try {
    loaded = loadMetadata(directory);
  } catch (error) {
    if (!(error instanceof ChunkdError)) throw error;
    errors.push(`metadata: ${error.message}`);
    return report(false, {});
  }
  const { catalog, refs, generation, replayedRecords, tornTail } = loaded;
  if (tornTail) warnings.push(`journal-${generation} ends in a record torn by a crash; the next start drops it (it was never acknowledged)`);
  for (const name of fs.readdirSync(directory)) {
    if (/^journal-\d+$/.test(name) && name !== `journal-${generation}`) warnings.push(`stray journal ${name} (the next start removes it)`);
  }

  const files = new ChunkFiles(path.join(directory, 'chunks'));
  const fileSizes = new Map(files.existingFiles().map((index) => [index, fs.statSync(files.filePath(index)).size]));
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
  for (const run of refs.usedRuns()) {
    const lastChunk = run.physicalChunk + run.chunkCount - 1;
    for (let fileIndex = Math.floor(run.physicalChunk / chunksPerFile); fileIndex <= Math.floor(lastChunk / chunksPerFile); fileIndex++) {
      const needed = (Math.min(lastChunk + 1, (fileIndex + 1) * chunksPerFile) - fileIndex * chunksPerFile) * chunkSizeBytes;
      const size = fileSizes.get(fileIndex);
      if (size === undefined) errors.push(`chunk file ${fileIndex} is missing but holds referenced chunks`);
      else if (size < needed) errors.push(`chunk file ${fileIndex} is ${size} bytes, shorter than its referenced chunks (${needed})`);
    }
  }

  let allocator: ChunkAllocator | null = null;
  try {
    allocator = ChunkAllocator.fromUsed(refs.usedRuns());
  } catch (error) {
    errors.push(`allocation: ${(error as Error).message}`);
  }

  let reclaimableBytes = 0;
  if (allocator !== null) {
    const free = [...allocator.freeExtents()];
    const lastFile = Math.max(-1, ...fileSizes.keys());
    if ((lastFile + 1) * chunksPerFile > allocator.highWater) free.push({ start: allocator.highWater, count: (lastFile + 1) * chunksPerFile - allocator.highWater, punch: true });
    for (const extent of free) reclaimableBytes += dataInChunks(files, fileSizes, extent.start, extent.count);
    if (reclaimableBytes > 0) warnings.push(`${reclaimableBytes} bytes of unmapped data in the chunk files (chunks replaced by overwrites and kept for reuse, or writes a crash left uncommitted); the next start gives them back`);
  }
  files.close();
  return report(errors.length === 0, { volumeCount: catalog.volumes.size, snapshotCount: catalog.snapshots.size, mappedBytes, reclaimableBytes, generation, replayedRecords });
}

function dataInChunks(files: ChunkFiles, fileSizes: Map<number, number>, startChunk: number, chunkCount: number): number {
  let bytes = 0;
  const end = startChunk + chunkCount;
  for (let fileIndex = Math.floor(startChunk / chunksPerFile); fileIndex * chunksPerFile < end; fileIndex++) {
    if (!fileSizes.has(fileIndex)) continue;
    const from = (Math.max(startChunk, fileIndex * chunksPerFile) - fileIndex * chunksPerFile) * chunkSizeBytes;
    const to = (Math.min(end, (fileIndex + 1) * chunksPerFile) - fileIndex * chunksPerFile) * chunkSizeBytes;
    const fd = fs.openSync(files.filePath(fileIndex), 'r');
    try {
      for (const range of dataRanges(fd, from, to)) bytes += range.lengthBytes;
    } finally {
      fs.closeSync(fd);
    }
  }
  return bytes;
}
