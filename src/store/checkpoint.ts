// The checkpoint: the whole catalog (volumes, snapshots and their chunk maps) as of the start of one journal
// generation. Maps share pages (chunk-map.ts), so pages are stored once and maps refer to them; a checkpoint of
// a volume with a thousand snapshots is as large as its distinct pages, not a thousand copies.
// Layout: "CHUNKDC3" | u32 header length | header JSON | pages | page references | u32 crc32 of all before it.
//   page: u32 run count, then runs of (u16 first slot, u16 slot count, f64 first physical chunk, then a u32
//   checksum per chunk of the run); a chunk named by two distinct pages has its checksum stored twice, alike
//   page references, per map in header order (volumes, then snapshots): (f64 page index, u32 page number)
// Written to a temporary file, fsynced and renamed into place: a crash leaves the old or the new one, whole.
// Pure: bytes in, values out.
import { crc32 } from 'node:zlib';
import { ChunkdError } from '../core/errors.ts';
import { mapPageChunks } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import { ChunkMap, type Page } from './chunk-map.ts';
import { addSnapshot, addVolume, allMaps, emptyCatalog, type Catalog } from './metadata.ts';

const magic = Buffer.from('CHUNKDC3', 'latin1');
const pageRunBytes = 12;
const pageReferenceBytes = 12;

interface Header {
  generation: number;
  nextVolumeId: number;
  nextSnapshotId: number;
  pageCount: number;
  volumes: Array<{ id: number; name: string; sizeBytes: number; pageCount: number }>;
  snapshots: Array<{ id: number; volumeId: number; name: string; sizeBytes: number; createdAtMs: number; pageCount: number }>;
}

/** Encodes the catalog as it stands, as the checkpoint that starts journal `generation`. */
export function encodeCheckpoint(catalog: Catalog, generation: number): Buffer {
  const pageNumbers = new Map<Page, number>();
  const pageRuns: Array<Array<[number, number, number]>> = [];
  const maps = [...allMaps(catalog)];
  const references = maps.map((map) =>
    map.pages().map(([pageIndex, page]) => {
      let number = pageNumbers.get(page);
      if (number === undefined) {
        number = pageRuns.length;
        pageNumbers.set(page, number);
        pageRuns.push(runsOfPage(page));
      }
      return [pageIndex, number] as const;
    }),
  );
  const volumes = [...catalog.volumes.values()];
  const snapshots = [...catalog.snapshots.values()];
  const header: Header = {
    generation,
    nextVolumeId: catalog.nextVolumeId,
    nextSnapshotId: catalog.nextSnapshotId,
    pageCount: pageRuns.length,
    volumes: volumes.map((v) => ({ id: v.id, name: v.name, sizeBytes: v.sizeBytes, pageCount: v.map.pageCount })),
    snapshots: snapshots.map((s) => ({ id: s.id, volumeId: s.volumeId, name: s.name, sizeBytes: s.sizeBytes, createdAtMs: s.createdAtMs, pageCount: s.map.pageCount })),
  };
  const headerBytes = Buffer.from(JSON.stringify(header), 'utf8');
  const runBytes = pageRuns.reduce((sum, runs) => sum + 4 + runs.reduce((bytes, run) => bytes + pageRunBytes + run[1] * 4, 0), 0);
  const referenceBytes = references.reduce((sum, list) => sum + list.length * pageReferenceBytes, 0);
  const out = Buffer.alloc(magic.length + 4 + headerBytes.length + runBytes + referenceBytes + 4);
  let offset = magic.copy(out, 0);
  offset = out.writeUInt32LE(headerBytes.length, offset);
  offset += headerBytes.copy(out, offset);
  for (const runs of pageRuns) {
    offset = out.writeUInt32LE(runs.length, offset);
    for (const [slot, count, physical] of runs) {
      offset = out.writeUInt16LE(slot, offset);
      offset = out.writeUInt16LE(count, offset);
      offset = out.writeDoubleLE(physical, offset);
      for (let i = 0; i < count; i++) offset = out.writeUInt32LE(catalog.sums.get(physical + i), offset);
    }
  }
  for (const list of references) {
    for (const [pageIndex, number] of list) {
      offset = out.writeDoubleLE(pageIndex, offset);
      offset = out.writeUInt32LE(number, offset);
    }
  }
  out.writeUInt32LE(crc32(out.subarray(0, offset)), offset);
  return out;
}

/** A page's mapped slots as runs of (first slot, count, first physical chunk). */
function runsOfPage(page: Page): Array<[number, number, number]> {
  const runs: Array<[number, number, number]> = [];
  for (let slot = 0; slot < mapPageChunks; slot++) {
    const physical = page.slots[slot]! - 1;
    if (physical < 0) continue;
    const last = runs[runs.length - 1];
    if (last !== undefined && last[0] + last[1] === slot && last[2] + last[1] === physical) last[1] += 1;
    else runs.push([slot, 1, physical]);
  }
  return runs;
}

/** Decodes a checkpoint; throws ECORRUPT on any damage. Chunk reference counts are the caller's to rebuild. */
export function decodeCheckpoint(bytes: Buffer): { catalog: Catalog; generation: number } {
  if (bytes.length < magic.length + 8 || !bytes.subarray(0, magic.length).equals(magic)) throw ChunkdError.corrupt('checkpoint: bad magic');
  const crcOffset = bytes.length - 4;
  if (crc32(bytes.subarray(0, crcOffset)) !== bytes.readUInt32LE(crcOffset)) throw ChunkdError.corrupt('checkpoint: checksum mismatch');
  const headerLength = bytes.readUInt32LE(magic.length);
  let offset = magic.length + 4;
  let header: Header;
  try {
    header = JSON.parse(bytes.subarray(offset, offset + headerLength).toString('utf8')) as Header;
  } catch {
    throw ChunkdError.corrupt('checkpoint: header is not JSON');
  }
  offset += headerLength;
  const need = (count: number): void => {
    if (offset + count > crcOffset) throw ChunkdError.corrupt('checkpoint: truncated');
  };

  const catalog = emptyCatalog();
  const pages: Page[] = [];
  for (let i = 0; i < header.pageCount; i++) {
    need(4);
    const runCount = bytes.readUInt32LE(offset);
    offset += 4;
    const page: Page = { slots: new Float64Array(mapPageChunks), usedCount: 0, shareCount: 0 };
    for (let r = 0; r < runCount; r++) {
      need(pageRunBytes);
      const slot = bytes.readUInt16LE(offset);
      const count = bytes.readUInt16LE(offset + 2);
      const physical = bytes.readDoubleLE(offset + 4);
      offset += pageRunBytes;
      if (count === 0 || slot + count > mapPageChunks || !Number.isSafeInteger(physical) || physical < 0) throw ChunkdError.corrupt('checkpoint: invalid page run');
      need(count * 4);
      const sums = new Uint32Array(count);
      for (let i = 0; i < count; i++) sums[i] = bytes.readUInt32LE(offset + i * 4);
      offset += count * 4;
      catalog.sums.setRun(physical, sums);
      for (let s = slot; s < slot + count; s++) {
        if (page.slots[s] !== 0) throw ChunkdError.corrupt('checkpoint: a page maps one slot twice');
        page.slots[s] = physical + (s - slot) + 1;
      }
      page.usedCount += count;
    }
    if (page.usedCount === 0) throw ChunkdError.corrupt('checkpoint: an empty page');
    pages.push(page);
  }

  const readMap = (pageCount: number): ChunkMap => {
    need(pageCount * pageReferenceBytes);
    const entries = new Map<number, Page>();
    let mappedCount = 0;
    for (let i = 0; i < pageCount; i++) {
      const pageIndex = bytes.readDoubleLE(offset);
      const page = pages[bytes.readUInt32LE(offset + 8)];
      offset += pageReferenceBytes;
      if (page === undefined || !Number.isSafeInteger(pageIndex) || pageIndex < 0 || entries.has(pageIndex)) throw ChunkdError.corrupt('checkpoint: invalid page reference');
      page.shareCount += 1;
      entries.set(pageIndex, page);
      mappedCount += page.usedCount;
    }
    return new ChunkMap(entries, mappedCount);
  };

  for (const entry of header.volumes) {
    if (checkName(entry.name) !== null) throw ChunkdError.corrupt(`checkpoint: invalid volume name ${JSON.stringify(entry.name)}`);
    addVolume(catalog, { id: entry.id, name: entry.name, sizeBytes: entry.sizeBytes, map: readMap(entry.pageCount), snapshots: new Map() });
  }
  for (const entry of header.snapshots) {
    if (checkName(entry.name, 'snapshot') !== null) throw ChunkdError.corrupt(`checkpoint: invalid snapshot name ${JSON.stringify(entry.name)}`);
    addSnapshot(catalog, { id: entry.id, volumeId: entry.volumeId, name: entry.name, sizeBytes: entry.sizeBytes, createdAtMs: entry.createdAtMs, map: readMap(entry.pageCount) });
  }
  if (offset !== crcOffset) throw ChunkdError.corrupt('checkpoint: trailing bytes');
  if (pages.some((page) => page.shareCount === 0)) throw ChunkdError.corrupt('checkpoint: a page no map refers to');
  catalog.nextVolumeId = Math.max(catalog.nextVolumeId, header.nextVolumeId);
  catalog.nextSnapshotId = Math.max(catalog.nextSnapshotId, header.nextSnapshotId);
  return { catalog, generation: header.generation };
}
