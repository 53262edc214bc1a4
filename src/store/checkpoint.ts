// The checkpoint: the whole catalog (volumes, snapshots and their chunk maps) as of the start of one journal
// generation. Maps share pages (chunk-map.ts), so pages are stored once and maps refer to them; a checkpoint of
// a volume with a thousand snapshots is as large as its distinct pages, not a thousand copies.
// Layout: a run of frames (frames.ts), each with its own length and crc32:
//   header: "CHUNKDC4" then JSON (generation, id counters, page count, volumes and snapshots with their sizes and
//     snapshot ids; a checkpoint from before snapshot ids has none: metadata.ts derives them)
//   one frame per page: u32 run count, then runs of (u16 first slot, u16 slot count, f64 first physical chunk,
//     then a u32 checksum per chunk of the run); a chunk named by two distinct pages has its checksum twice
//   one frame per map in header order (volumes, then snapshots): u32 page count, then its page references,
//     (f64 page index, u32 page number) each (never an empty frame: eight zero bytes would pass as one)
//   trailer: "CHUNKDC4" then u32 count of the frames before it (a file cut short is damaged, not smaller)
// A pool keeps two copies, checkpoint.0 and checkpoint.1, each written to a temporary file, fdatasynced and
// renamed into place (pool-layout.ts): a crash leaves each old or new, whole. Damage in one copy is read from the
// other; damage in both copies in different frames still leaves every frame whole somewhere (frames.ts).
// Pure: bytes in, values out.
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, mapPageChunks } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import { ChunkMap, type Page } from './chunk-map.ts';
import { encodeFrames, frameAt, readFramesFromCopies } from './frames.ts';
import { addSnapshot, addVolume, allMaps, emptyCatalog, isSnapshotUuid, legacySnapshotUuid, type Catalog } from './metadata.ts';

const magic = Buffer.from('CHUNKDC4', 'latin1');
const pageRunBytes = 12;
const pageReferenceBytes = 12;

interface Header {
  generation: number;
  nextVolumeId: number;
  nextSnapshotId: number;
  pageCount: number;
  volumes: Array<{ id: number; name: string; sizeBytes: number; pageCount: number }>;
  snapshots: Array<{ id: number; uuid?: string; volumeId: number; name: string; sizeBytes: number; createdAtMs: number; pageCount: number }>;
}

/** Encodes the catalog as it stands, as the checkpoint that starts journal `generation`. */
export function encodeCheckpoint(catalog: Catalog, generation: number): Buffer {
  const pageNumbers = new Map<Page, number>();
  const pagePayloads: Buffer[] = [];
  const maps = [...allMaps(catalog)];
  const referencePayloads = maps.map((map) => {
    const pages = map.pages();
    const out = Buffer.allocUnsafe(4 + pages.length * pageReferenceBytes);
    let offset = out.writeUInt32LE(pages.length, 0);
    for (const [pageIndex, page] of pages) {
      let number = pageNumbers.get(page);
      if (number === undefined) {
        number = pagePayloads.length;
        pageNumbers.set(page, number);
        pagePayloads.push(encodePage(catalog, page));
      }
      offset = out.writeDoubleLE(pageIndex, offset);
      offset = out.writeUInt32LE(number, offset);
    }
    return out;
  });
  const volumes = [...catalog.volumes.values()];
  const snapshots = [...catalog.snapshots.values()];
  const header: Header = {
    generation,
    nextVolumeId: catalog.nextVolumeId,
    nextSnapshotId: catalog.nextSnapshotId,
    pageCount: pagePayloads.length,
    volumes: volumes.map((v) => ({ id: v.id, name: v.name, sizeBytes: v.sizeBytes, pageCount: v.map.pageCount })),
    snapshots: snapshots.map((s) => ({ id: s.id, uuid: s.uuid, volumeId: s.volumeId, name: s.name, sizeBytes: s.sizeBytes, createdAtMs: s.createdAtMs, pageCount: s.map.pageCount })),
  };
  const payloads = [Buffer.concat([magic, Buffer.from(JSON.stringify(header), 'utf8')]), ...pagePayloads, ...referencePayloads];
  const trailer = Buffer.alloc(magic.length + 4);
  magic.copy(trailer);
  trailer.writeUInt32LE(payloads.length, magic.length);
  payloads.push(trailer);
  return encodeFrames(payloads);
}

function encodePage(catalog: Catalog, page: Page): Buffer {
  const runs = runsOfPage(page);
  const out = Buffer.allocUnsafe(4 + runs.reduce((bytes, run) => bytes + pageRunBytes + run[1] * 4, 0));
  let offset = out.writeUInt32LE(runs.length, 0);
  for (const [slot, count, physical] of runs) {
    offset = out.writeUInt16LE(slot, offset);
    offset = out.writeUInt16LE(count, offset);
    offset = out.writeDoubleLE(physical, offset);
    for (let i = 0; i < count; i++) offset = out.writeUInt32LE(catalog.sums.get(physical + i), offset);
  }
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

/** What a load makes of a pool's checkpoint copies. */
export interface CheckpointChoice {
  catalog: Catalog;
  generation: number;
  /** Copies not used as they were: damaged or missing (repaired by the next write), with where; or older (a rotation cut short). */
  damagedCopies: Array<{ copy: number; offsetBytes: number }>;
  staleCopies: number[];
}

/**
 * Decodes the newest whole checkpoint among its copies (null: that file is missing), or one assembled frame by
 * frame from copies of one generation that are each damaged. Throws ECORRUPT naming where, when none can be read.
 */
export function chooseCheckpoint(copies: ReadonlyArray<Buffer | null>): CheckpointChoice {
  const parsed = copies.map((copy) => (copy === null ? null : framesOf([copy], copy.length)));
  let best = -1;
  let bestGeneration = -1;
  parsed.forEach((result, index) => {
    if (result === null || !('payloads' in result)) return;
    const generation = headerOf(result.payloads).generation;
    if (generation > bestGeneration) {
      best = index;
      bestGeneration = generation;
    }
  });
  const damageOf = (index: number): { copy: number; offsetBytes: number } => {
    const result = parsed[index];
    return { copy: index, offsetBytes: result === null || result === undefined || 'payloads' in result ? 0 : result.damage.offsetBytes };
  };
  if (best >= 0) {
    const decoded = decodeCheckpointFrames((parsed[best] as { payloads: Buffer[] }).payloads);
    const damagedCopies: CheckpointChoice['damagedCopies'] = [];
    const staleCopies: number[] = [];
    parsed.forEach((result, index) => {
      if (index === best) return;
      if (result !== null && 'payloads' in result) {
        if (headerOf(result.payloads).generation < bestGeneration) staleCopies.push(index);
      } else {
        damagedCopies.push(damageOf(index));
      }
    });
    return { ...decoded, damagedCopies, staleCopies };
  }
  // No copy is whole: copies of one length may still hold every frame between them.
  const present = copies.filter((copy): copy is Buffer => copy !== null);
  if (present.length > 1 && present.every((copy) => copy.length === present[0]!.length)) {
    const merged = framesOf(present, present[0]!.length);
    if ('payloads' in merged) {
      const decoded = decodeCheckpointFrames(merged.payloads);
      return { ...decoded, damagedCopies: copies.map((_, index) => damageOf(index)), staleCopies: [] };
    }
  }
  const where = copies.map((copy, index) => `checkpoint.${index} ${copy === null ? 'is missing' : `is damaged at byte ${damageOf(index).offsetBytes}`}`).join(', ');
  throw ChunkdError.corrupt(`no whole checkpoint: ${where}`);
}

/** The frames of a checkpoint from its copies, up to and including the trailer that counts them. */
function framesOf(copies: readonly Buffer[], lengthBytes: number): { payloads: Buffer[] } | { damage: { offsetBytes: number } } {
  const result = readFramesFromCopies(copies, 0, lengthBytes);
  if (!('payloads' in result)) return result;
  const payloads = result.payloads;
  const trailer = payloads[payloads.length - 1];
  const first = payloads[0];
  if (first === undefined || !first.subarray(0, magic.length).equals(magic)) return { damage: { offsetBytes: 0 } };
  if (trailer === undefined || trailer.length !== magic.length + 4 || !trailer.subarray(0, magic.length).equals(magic) || trailer.readUInt32LE(magic.length) !== payloads.length - 1) {
    return { damage: { offsetBytes: lengthBytes } };
  }
  return { payloads };
}

function headerOf(payloads: readonly Buffer[]): Header {
  try {
    return JSON.parse(payloads[0]!.subarray(magic.length).toString('utf8')) as Header;
  } catch {
    throw ChunkdError.corrupt('checkpoint: its header is not JSON though its checksum matches');
  }
}

/** Decodes one checkpoint's bytes (all of its frames whole); throws ECORRUPT on any damage. */
export function decodeCheckpoint(bytes: Buffer): { catalog: Catalog; generation: number } {
  const result = framesOf([bytes], bytes.length);
  if (!('payloads' in result)) throw ChunkdError.corrupt(`checkpoint: damaged at byte ${result.damage.offsetBytes}`);
  return decodeCheckpointFrames(result.payloads);
}

/** Bytes of a volume that salvage could not bring back, and why. */
export interface LostExtent {
  /** The volume, or VOL@SNAP. */
  export: string;
  offsetBytes: number;
  lengthBytes: number;
  why: string;
}

/**
 * The catalog from a checkpoint's frames. Strict (no `lost`): each frame whole, and ECORRUPT where they disagree.
 * Salvage (`lost` given): a frame that is null or does not decode loses what it held, which is added to `lost`:
 * a page loses its 2 MiB stretch in every map that refers to it, a map its whole export.
 */
function decodeCheckpointFrames(payloads: ReadonlyArray<Buffer | null>, lost?: LostExtent[]): { catalog: Catalog; generation: number } {
  const header = headerOf(payloads as Buffer[]);
  const mapCount = header.volumes.length + header.snapshots.length;
  if (lost === undefined && payloads.length !== 1 + header.pageCount + mapCount + 1) throw ChunkdError.corrupt('checkpoint: frame count does not match its header');
  const catalog = emptyCatalog();
  const pages: Array<Page | null> = [];
  for (let i = 0; i < header.pageCount; i++) {
    const payload = payloads[1 + i] ?? null;
    if (lost === undefined) pages.push(decodePage(catalog, payload!));
    else pages.push(payload === null ? null : salvaged(() => decodePage(catalog, payload)));
  }
  let nextMap = 1 + header.pageCount;
  const readMap = (exportName: string, pageCount: number, sizeBytes: number): ChunkMap => {
    const references = payloads[nextMap++] ?? null;
    if (references === null || references.length !== 4 + pageCount * pageReferenceBytes || references.readUInt32LE(0) !== pageCount) {
      if (lost === undefined) throw ChunkdError.corrupt('checkpoint: a map of the wrong length');
      lost.push({ export: exportName, offsetBytes: 0, lengthBytes: sizeBytes, why: 'its map in the checkpoint is damaged in both copies' });
      return new ChunkMap();
    }
    const entries = new Map<number, Page>();
    let mappedCount = 0;
    for (let offset = 4; offset < references.length; offset += pageReferenceBytes) {
      const pageIndex = references.readDoubleLE(offset);
      const page = pages[references.readUInt32LE(offset + 8)];
      if (page === null && lost !== undefined) {
        const start = pageIndex * mapPageChunks * chunkSizeBytes;
        lost.push({ export: exportName, offsetBytes: start, lengthBytes: Math.min(mapPageChunks * chunkSizeBytes, sizeBytes - start), why: 'a page of its map in the checkpoint is damaged in both copies' });
        continue;
      }
      if (page === undefined || page === null || !Number.isSafeInteger(pageIndex) || pageIndex < 0 || entries.has(pageIndex)) throw ChunkdError.corrupt('checkpoint: invalid page reference');
      page.shareCount += 1;
      entries.set(pageIndex, page);
      mappedCount += page.usedCount;
    }
    return new ChunkMap(entries, mappedCount);
  };
  for (const entry of header.volumes) {
    if (checkName(entry.name) !== null) throw ChunkdError.corrupt(`checkpoint: invalid volume name ${JSON.stringify(entry.name)}`);
    addVolume(catalog, { id: entry.id, name: entry.name, sizeBytes: entry.sizeBytes, map: readMap(entry.name, entry.pageCount, entry.sizeBytes), snapshots: new Map() });
  }
  for (const entry of header.snapshots) {
    if (checkName(entry.name, 'snapshot') !== null) throw ChunkdError.corrupt(`checkpoint: invalid snapshot name ${JSON.stringify(entry.name)}`);
    const volumeName = catalog.volumes.get(entry.volumeId)?.name ?? `volume ${entry.volumeId}`;
    const map = readMap(`${volumeName}@${entry.name}`, entry.pageCount, entry.sizeBytes);
    if (entry.uuid !== undefined && !isSnapshotUuid(entry.uuid)) throw ChunkdError.corrupt(`checkpoint: invalid id for snapshot ${entry.name}`);
    const uuid = entry.uuid ?? legacySnapshotUuid(entry.volumeId, entry.id, entry.createdAtMs, entry.name);
    addSnapshot(catalog, { id: entry.id, uuid, volumeId: entry.volumeId, name: entry.name, sizeBytes: entry.sizeBytes, createdAtMs: entry.createdAtMs, map });
  }
  if (lost === undefined && pages.some((page) => page!.shareCount === 0)) throw ChunkdError.corrupt('checkpoint: a page no map refers to');
  catalog.nextVolumeId = Math.max(catalog.nextVolumeId, header.nextVolumeId);
  catalog.nextSnapshotId = Math.max(catalog.nextSnapshotId, header.nextSnapshotId);
  return { catalog, generation: header.generation };
}

function salvaged<T>(decode: () => T): T | null {
  try {
    return decode();
  } catch (error) {
    if (error instanceof ChunkdError) return null;
    throw error;
  }
}

/**
 * What can be read from checkpoint copies that chooseCheckpoint refuses: every frame some copy holds whole, the
 * others skipped by their length where a copy's length field leads to a whole frame. Null when not even the header
 * frame survives (nothing of the checkpoint can be placed).
 */
export function salvageCheckpoint(copies: ReadonlyArray<Buffer | null>): { catalog: Catalog; generation: number; lost: LostExtent[]; lostFrames: number } | null {
  const present = copies.filter((copy): copy is Buffer => copy !== null);
  const lengthBytes = Math.max(0, ...present.map((copy) => copy.length));
  const payloads: Array<Buffer | null> = [];
  let lostFrames = 0;
  let offset = 0;
  while (offset < lengthBytes) {
    const whole = present.map((copy) => frameAt(copy, offset)).find((frame) => frame !== null) ?? null;
    if (whole !== null) {
      payloads.push(whole.payload);
      offset = whole.end;
      continue;
    }
    // Skip the damaged frame by a length that leads to a whole frame, or to the end.
    const next = present
      .map((copy) => (offset + 8 <= copy.length ? offset + 8 + copy.readUInt32LE(offset) : -1))
      .find((end) => end > offset && (end === lengthBytes || present.some((copy) => frameAt(copy, end) !== null)));
    if (next === undefined) break;
    payloads.push(null);
    lostFrames += 1;
    offset = next;
  }
  const first = payloads[0];
  if (first === undefined || first === null || !first.subarray(0, magic.length).equals(magic)) return null;
  const lost: LostExtent[] = [];
  const { catalog, generation } = decodeCheckpointFrames(payloads, lost);
  return { catalog, generation, lost, lostFrames };
}

function decodePage(catalog: Catalog, bytes: Buffer): Page {
  const fail = (): never => {
    throw ChunkdError.corrupt('checkpoint: invalid page');
  };
  if (bytes.length < 4) fail();
  const runCount = bytes.readUInt32LE(0);
  let offset = 4;
  const page: Page = { slots: new Float64Array(mapPageChunks), usedCount: 0, shareCount: 0 };
  for (let r = 0; r < runCount; r++) {
    if (offset + pageRunBytes > bytes.length) fail();
    const slot = bytes.readUInt16LE(offset);
    const count = bytes.readUInt16LE(offset + 2);
    const physical = bytes.readDoubleLE(offset + 4);
    offset += pageRunBytes;
    if (count === 0 || slot + count > mapPageChunks || !Number.isSafeInteger(physical) || physical < 0 || offset + count * 4 > bytes.length) fail();
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
  if (offset !== bytes.length || page.usedCount === 0) fail();
  return page;
}
