// The pool's metadata as a value, and the records that change it. The live node and the replay of the journal
// at load both change metadata only through `applyRecord`, so what was acknowledged and what comes back after a
// crash cannot drift apart. The record codec is here too: it is pure (bytes in, values out).
//
// Journal framing: [u32 payload length][u32 crc32 of payload][payload]. A length of 0 (the zeros of the
// preallocated journal) ends it; so does a record whose crc fails (a write torn by a crash). Replay stops at the
// first such record: the journal is a prefix of what was committed, never a record out of order.
import { crc32 } from 'node:zlib';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { ChunkMap, type ChunkRun } from './chunk-map.ts';

export interface VolumeMeta {
  id: number;
  name: string;
  sizeBytes: number;
  map: ChunkMap;
}

export interface Catalog {
  nextVolumeId: number;
  volumes: Map<number, VolumeMeta>;
  byName: Map<string, VolumeMeta>;
}

export type MetaRecord =
  | { type: 'map'; volumeId: number; virtualChunk: number; physicalChunk: number; chunkCount: number }
  | { type: 'unmap'; volumeId: number; virtualChunk: number; chunkCount: number }
  | { type: 'create'; volumeId: number; name: string; sizeBytes: number }
  | { type: 'resize'; volumeId: number; sizeBytes: number }
  | { type: 'remove'; volumeId: number };

const typeCodes = { map: 1, unmap: 2, create: 3, resize: 4, remove: 5 } as const;
const frameHeaderBytes = 8;

export function emptyCatalog(): Catalog {
  return { nextVolumeId: 1, volumes: new Map(), byName: new Map() };
}

/** Applies one record; calls `onFree` for every physical run the record stops using. Throws ECORRUPT if it cannot apply. */
export function applyRecord(catalog: Catalog, record: MetaRecord, onFree: (run: ChunkRun) => void): void {
  if (record.type === 'create') {
    if (catalog.volumes.has(record.volumeId) || catalog.byName.has(record.name)) {
      throw ChunkdError.corrupt(`volume ${record.name} (id ${record.volumeId}) created twice`);
    }
    const volume: VolumeMeta = { id: record.volumeId, name: record.name, sizeBytes: record.sizeBytes, map: new ChunkMap() };
    catalog.volumes.set(volume.id, volume);
    catalog.byName.set(volume.name, volume);
    catalog.nextVolumeId = Math.max(catalog.nextVolumeId, volume.id + 1);
    return;
  }
  const volume = catalog.volumes.get(record.volumeId);
  if (volume === undefined) throw ChunkdError.corrupt(`record ${record.type} names volume id ${record.volumeId}, which does not exist`);
  switch (record.type) {
    case 'map':
      for (const run of volume.map.runs(record.virtualChunk, record.chunkCount)) {
        if (run.physicalChunk >= 0) throw ChunkdError.corrupt(`volume ${volume.name}: chunk ${run.virtualChunk} mapped twice`);
      }
      volume.map.mapRun(record.virtualChunk, record.physicalChunk, record.chunkCount);
      return;
    case 'unmap':
      for (const run of volume.map.unmapRange(record.virtualChunk, record.chunkCount)) onFree(run);
      return;
    case 'resize':
      volume.sizeBytes = record.sizeBytes;
      return;
    case 'remove':
      for (const run of volume.map.mappedRuns()) onFree(run);
      catalog.volumes.delete(volume.id);
      catalog.byName.delete(volume.name);
      return;
  }
}

/** Encodes records as journal frames, ready to append. */
export function encodeRecords(records: readonly MetaRecord[]): Buffer {
  const frames = records.map(encodeFrame);
  return Buffer.concat(frames);
}

function encodeFrame(record: MetaRecord): Buffer {
  const name = record.type === 'create' ? Buffer.from(record.name, 'utf8') : Buffer.alloc(0);
  const payload = Buffer.alloc(1 + 4 + 8 + 8 + 8 + 1 + name.length);
  payload.writeUInt8(typeCodes[record.type], 0);
  payload.writeUInt32LE(record.volumeId, 1);
  switch (record.type) {
    case 'map':
      payload.writeDoubleLE(record.virtualChunk, 5);
      payload.writeDoubleLE(record.physicalChunk, 13);
      payload.writeDoubleLE(record.chunkCount, 21);
      break;
    case 'unmap':
      payload.writeDoubleLE(record.virtualChunk, 5);
      payload.writeDoubleLE(record.chunkCount, 21);
      break;
    case 'create':
      payload.writeDoubleLE(record.sizeBytes, 5);
      payload.writeUInt8(name.length, 29);
      name.copy(payload, 30);
      break;
    case 'resize':
      payload.writeDoubleLE(record.sizeBytes, 5);
      break;
    case 'remove':
      break;
  }
  const frame = Buffer.alloc(frameHeaderBytes + payload.length);
  frame.writeUInt32LE(payload.length, 0);
  frame.writeUInt32LE(crc32(payload), 4);
  payload.copy(frame, frameHeaderBytes);
  return frame;
}

export interface DecodedJournal {
  records: MetaRecord[];
  /** Bytes of valid frames: where the next append goes. */
  validBytes: number;
  /** True when the journal ended in a frame that failed its checks (a write torn by a crash), not in zeros. */
  tornTail: boolean;
}

/** Decodes journal frames up to the first end marker or damaged frame. */
export function decodeJournal(bytes: Buffer): DecodedJournal {
  const records: MetaRecord[] = [];
  let offset = 0;
  while (offset + frameHeaderBytes <= bytes.length) {
    const length = bytes.readUInt32LE(offset);
    if (length === 0) return { records, validBytes: offset, tornTail: !isZero(bytes, offset, Math.min(bytes.length, offset + 64)) };
    const end = offset + frameHeaderBytes + length;
    if (end > bytes.length || crc32(bytes.subarray(offset + frameHeaderBytes, end)) !== bytes.readUInt32LE(offset + 4)) {
      return { records, validBytes: offset, tornTail: true };
    }
    const record = decodePayload(bytes.subarray(offset + frameHeaderBytes, end));
    if (record === null) return { records, validBytes: offset, tornTail: true };
    records.push(record);
    offset = end;
  }
  return { records, validBytes: offset, tornTail: offset !== bytes.length && !isZero(bytes, offset, bytes.length) };
}

function decodePayload(payload: Buffer): MetaRecord | null {
  if (payload.length < 30) return null;
  const code = payload.readUInt8(0);
  const volumeId = payload.readUInt32LE(1);
  const a = payload.readDoubleLE(5);
  const b = payload.readDoubleLE(13);
  const c = payload.readDoubleLE(21);
  switch (code) {
    case typeCodes.map:
      return wholeNumbers(a, b, c) ? { type: 'map', volumeId, virtualChunk: a, physicalChunk: b, chunkCount: c } : null;
    case typeCodes.unmap:
      return wholeNumbers(a, c) ? { type: 'unmap', volumeId, virtualChunk: a, chunkCount: c } : null;
    case typeCodes.create: {
      const nameLength = payload.readUInt8(29);
      if (payload.length < 30 + nameLength || !wholeNumbers(a)) return null;
      const name = payload.subarray(30, 30 + nameLength).toString('utf8');
      return checkName(name) === null ? { type: 'create', volumeId, name, sizeBytes: a } : null;
    }
    case typeCodes.resize:
      return wholeNumbers(a) ? { type: 'resize', volumeId, sizeBytes: a } : null;
    case typeCodes.remove:
      return { type: 'remove', volumeId };
    default:
      return null;
  }
}

function wholeNumbers(...values: number[]): boolean {
  return values.every((v) => Number.isSafeInteger(v) && v >= 0);
}

function isZero(bytes: Buffer, start: number, end: number): boolean {
  for (let i = start; i < end; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** Asserts the catalog's own invariants (names unique and indexed, maps inside sizes). */
export function assertCatalog(catalog: Catalog): void {
  assert(catalog.byName.size === catalog.volumes.size);
  for (const volume of catalog.volumes.values()) assert(catalog.byName.get(volume.name) === volume);
}
