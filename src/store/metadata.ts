// The pool's metadata as a value (volumes, snapshots, their chunk maps), and the records that change it. The live
// node and the replay of the journal at load both change metadata only through `applyRecord`, so what was
// acknowledged and what comes back after a crash cannot drift apart. The record codec is here too: pure.
//
// Each record is one frame (frames.ts: length, crc32, payload); a journal commit holds a run of them
// (journal-format.ts). Payload: a type byte, then fixed binary fields for the hot records (map, unmap: one per
// write or trim; a map record ends with the checksum of each chunk it maps) and JSON for the rare control records.
//
// Snapshot ids: every snapshot has a unique id (`uuid`, 128 bits as 32 hex digits, random at creation; a received
// snapshot keeps its sender's, so that an incremental stream finds its base by id on any node, as ZFS matches
// GUIDs). Pools written before ids existed (format 3 as first released) have snapshot records and checkpoint
// entries without one: those get an id derived from what they do hold (legacySnapshotUuid), the same at every
// load, so replay, fsck and the live node agree; the next checkpoint (every start writes one) stores it.
import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { unreachable } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import { ChunkMap, type ChunkRefs } from './chunk-map.ts';
import { ChunkSums } from './chunk-sums.ts';
import { frameHeaderBytes } from './frames.ts';

export interface VolumeMeta {
  id: number;
  name: string;
  sizeBytes: number;
  map: ChunkMap;
  /** By name. */
  snapshots: Map<string, SnapshotMeta>;
}

export interface SnapshotMeta {
  id: number;
  /** Unique across nodes: 32 lowercase hex digits (see the note at the top). */
  uuid: string;
  volumeId: number;
  name: string;
  sizeBytes: number;
  createdAtMs: number;
  map: ChunkMap;
}

export interface Catalog {
  nextVolumeId: number;
  nextSnapshotId: number;
  volumes: Map<number, VolumeMeta>;
  byName: Map<string, VolumeMeta>;
  snapshots: Map<number, SnapshotMeta>;
  /** The checksum of every mapped physical chunk. */
  sums: ChunkSums;
}

export type MetaRecord =
  | { type: 'map'; volumeId: number; virtualChunk: number; physicalChunk: number; chunkCount: number; sums: Uint32Array }
  | { type: 'unmap'; volumeId: number; virtualChunk: number; chunkCount: number }
  | { type: 'create'; volumeId: number; name: string; sizeBytes: number }
  | { type: 'clone'; volumeId: number; name: string; snapshotId: number }
  | { type: 'resize'; volumeId: number; sizeBytes: number }
  | { type: 'remove'; volumeId: number }
  | { type: 'snapshot'; volumeId: number; snapshotId: number; name: string; createdAtMs: number; uuid?: string }
  | { type: 'snapshot-remove'; snapshotId: number }
  | { type: 'rollback'; volumeId: number; snapshotId: number };

const typeCodes = { map: 1, unmap: 2, create: 3, resize: 4, remove: 5, clone: 6, snapshot: 7, 'snapshot-remove': 8, rollback: 9 } as const;
const typesByCode = new Map<number, MetaRecord['type']>(Object.entries(typeCodes).map(([type, code]) => [code, type as MetaRecord['type']]));
/** Type byte, volume id, virtual chunk, physical chunk, chunk count; a map record's checksums follow. */
const rangeRecordBytes = 29;

const uuidPattern = /^[0-9a-f]{32}$/;

/** Whether `value` is a snapshot id as stored: 32 lowercase hex digits. */
export function isSnapshotUuid(value: unknown): value is string {
  return typeof value === 'string' && uuidPattern.test(value);
}

/**
 * The id of a snapshot recorded before ids existed: derived from its pool-local ids, creation time and name, so
 * every load of the same metadata gives the same one. Unique enough within a pool; across pools only as unique as
 * those fields (the known weakness of the legacy path; a snapshot taken now gets 128 random bits).
 */
export function legacySnapshotUuid(volumeId: number, snapshotId: number, createdAtMs: number, name: string): string {
  return createHash('sha256').update(`chunkd-legacy-snapshot:${volumeId}:${snapshotId}:${createdAtMs}:${name}`).digest('hex').slice(0, 32);
}

export function emptyCatalog(): Catalog {
  return { nextVolumeId: 1, nextSnapshotId: 1, volumes: new Map(), byName: new Map(), snapshots: new Map(), sums: new ChunkSums() };
}

/** Adds a volume to the catalog (for records and checkpoints alike). */
export function addVolume(catalog: Catalog, volume: VolumeMeta): void {
  if (catalog.volumes.has(volume.id) || catalog.byName.has(volume.name)) throw ChunkdError.corrupt(`volume ${volume.name} (id ${volume.id}) exists twice`);
  catalog.volumes.set(volume.id, volume);
  catalog.byName.set(volume.name, volume);
  catalog.nextVolumeId = Math.max(catalog.nextVolumeId, volume.id + 1);
}

/** Adds a snapshot to the catalog and to its volume. */
export function addSnapshot(catalog: Catalog, snapshot: SnapshotMeta): void {
  const volume = catalog.volumes.get(snapshot.volumeId);
  if (volume === undefined) throw ChunkdError.corrupt(`snapshot ${snapshot.name} names volume id ${snapshot.volumeId}, which does not exist`);
  checkNewSnapshot(catalog, volume, snapshot.id, snapshot.name, snapshot.uuid);
  catalog.snapshots.set(snapshot.id, snapshot);
  volume.snapshots.set(snapshot.name, snapshot);
  catalog.nextSnapshotId = Math.max(catalog.nextSnapshotId, snapshot.id + 1);
}

/** What `checkRecord` reads of a catalog: its tables, whatever its maps are (paged-catalog.ts's too). */
export interface CatalogTables {
  volumes: ReadonlyMap<number, { id: number; name: string; sizeBytes: number; snapshots: ReadonlyMap<string, { name: string; uuid: string }> }>;
  byName: ReadonlyMap<string, unknown>;
  snapshots: ReadonlyMap<number, { id: number; volumeId: number }>;
}

/**
 * Throws ECORRUPT, changing nothing, if `record` cannot apply to the catalog: the one statement of which records
 * apply, for `applyRecord` and for the paged catalog alike.
 */
export function checkRecord(catalog: CatalogTables, record: MetaRecord): void {
  const newVolume = (id: number, name: string): void => {
    if (catalog.volumes.has(id) || catalog.byName.has(name)) throw ChunkdError.corrupt(`volume ${name} (id ${id}) exists twice`);
  };
  switch (record.type) {
    case 'create':
      newVolume(record.volumeId, record.name);
      return;
    case 'clone':
      snapshotById(catalog, record.snapshotId);
      newVolume(record.volumeId, record.name);
      return;
    case 'snapshot-remove':
      snapshotById(catalog, record.snapshotId);
      return;
    default:
      break;
  }
  const volume = volumeById(catalog, record.volumeId);
  switch (record.type) {
    case 'map':
      if ((record.virtualChunk + record.chunkCount) * chunkSizeBytes > volume.sizeBytes) throw ChunkdError.corrupt(`volume ${volume.name}: a record maps past its end`);
      if (record.sums.length !== record.chunkCount) throw ChunkdError.corrupt(`volume ${volume.name}: a map record without a checksum for each chunk`);
      return;
    case 'remove':
      if (volume.snapshots.size > 0) throw ChunkdError.corrupt(`volume ${volume.name} removed while it has snapshots`);
      return;
    case 'snapshot':
      checkNewSnapshot(catalog, volume, record.snapshotId, record.name, snapshotUuidOf(record));
      return;
    case 'rollback':
      if (snapshotById(catalog, record.snapshotId).volumeId !== volume.id) throw ChunkdError.corrupt(`rollback of ${volume.name} to a snapshot of another volume`);
      return;
    case 'unmap':
    case 'resize':
      return;
    default:
      unreachable(record);
  }
}

/** The id of the snapshot a record creates: its own, or for a record from before ids, the derived one. */
export function snapshotUuidOf(record: Extract<MetaRecord, { type: 'snapshot' }>): string {
  return record.uuid ?? legacySnapshotUuid(record.volumeId, record.snapshotId, record.createdAtMs, record.name);
}

/** Throws ECORRUPT if a snapshot of `volume` cannot take this id, name and uuid. */
function checkNewSnapshot(catalog: CatalogTables, volume: { name: string; snapshots: ReadonlyMap<string, { name: string; uuid: string }> }, id: number, name: string, uuid: string): void {
  if (catalog.snapshots.has(id) || volume.snapshots.has(name)) throw ChunkdError.corrupt(`snapshot ${volume.name}@${name} exists twice`);
  for (const other of volume.snapshots.values()) {
    if (other.uuid === uuid) throw ChunkdError.corrupt(`snapshots ${volume.name}@${other.name} and @${name} have one id (${uuid})`);
  }
}

/** Applies one record; chunk references go through `refs`. Throws ECORRUPT, changing nothing, if the record cannot apply. */
export function applyRecord(catalog: Catalog, record: MetaRecord, refs: ChunkRefs): void {
  checkRecord(catalog, record);
  switch (record.type) {
    case 'create':
      addVolume(catalog, { id: record.volumeId, name: record.name, sizeBytes: record.sizeBytes, map: new ChunkMap(), snapshots: new Map() });
      return;
    case 'clone': {
      const snapshot = snapshotById(catalog, record.snapshotId);
      addVolume(catalog, { id: record.volumeId, name: record.name, sizeBytes: snapshot.sizeBytes, map: snapshot.map.clone(), snapshots: new Map() });
      return;
    }
    case 'snapshot-remove': {
      const snapshot = snapshotById(catalog, record.snapshotId);
      snapshot.map.drop(refs);
      catalog.snapshots.delete(snapshot.id);
      volumeById(catalog, snapshot.volumeId).snapshots.delete(snapshot.name);
      return;
    }
    default:
      break;
  }
  const volume = volumeById(catalog, record.volumeId);
  switch (record.type) {
    case 'map':
      catalog.sums.setRun(record.physicalChunk, record.sums);
      volume.map.mapRun(record.virtualChunk, record.physicalChunk, record.chunkCount, refs);
      return;
    case 'unmap':
      volume.map.unmapRange(record.virtualChunk, record.chunkCount, refs);
      return;
    case 'resize':
      volume.sizeBytes = record.sizeBytes;
      return;
    case 'remove':
      volume.map.drop(refs);
      catalog.volumes.delete(volume.id);
      catalog.byName.delete(volume.name);
      return;
    case 'snapshot':
      addSnapshot(catalog, {
        id: record.snapshotId,
        uuid: snapshotUuidOf(record),
        volumeId: volume.id,
        name: record.name,
        sizeBytes: volume.sizeBytes,
        createdAtMs: record.createdAtMs,
        map: volume.map.clone(),
      });
      return;
    case 'rollback': {
      const snapshot = snapshotById(catalog, record.snapshotId);
      const map = snapshot.map.clone();
      volume.map.drop(refs);
      volume.map = map;
      volume.sizeBytes = snapshot.sizeBytes;
      return;
    }
    default:
      unreachable(record);
  }
}

function volumeById<V>(catalog: { volumes: ReadonlyMap<number, V> }, volumeId: number): V {
  const volume = catalog.volumes.get(volumeId);
  if (volume === undefined) throw ChunkdError.corrupt(`a record names volume id ${volumeId}, which does not exist`);
  return volume;
}

function snapshotById<S>(catalog: { snapshots: ReadonlyMap<number, S> }, snapshotId: number): S {
  const snapshot = catalog.snapshots.get(snapshotId);
  if (snapshot === undefined) throw ChunkdError.corrupt(`a record names snapshot id ${snapshotId}, which does not exist`);
  return snapshot;
}

/** Encodes records as journal frames, ready to append: one buffer, written in place (a commit may carry 10^5 records). */
export function encodeRecords(records: readonly MetaRecord[]): Buffer {
  const jsonPayloads = new Map<MetaRecord, Buffer>();
  let totalBytes = 0;
  for (const record of records) totalBytes += frameHeaderBytes + payloadBytes(record, jsonPayloads);
  const out = Buffer.allocUnsafe(totalBytes);
  let offset = 0;
  for (const record of records) {
    const start = offset + frameHeaderBytes;
    let end: number;
    if (record.type === 'map' || record.type === 'unmap') {
      out.writeUInt8(typeCodes[record.type], start);
      out.writeUInt32LE(record.volumeId, start + 1);
      out.writeDoubleLE(record.virtualChunk, start + 5);
      out.writeDoubleLE(record.type === 'map' ? record.physicalChunk : 0, start + 13);
      out.writeDoubleLE(record.chunkCount, start + 21);
      end = start + rangeRecordBytes;
      if (record.type === 'map') end = writeSums(out, end, record.sums, record.chunkCount);
    } else {
      out.writeUInt8(typeCodes[record.type], start);
      end = start + 1 + jsonPayloads.get(record)!.copy(out, start + 1);
    }
    out.writeUInt32LE(end - start, offset);
    out.writeUInt32LE(crc32(out.subarray(start, end)), offset + 4);
    offset = end;
  }
  return out;
}

const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/**
 * Writes `chunkCount` checksums little-endian at `offset` of `out`; returns the offset after them. Many, on a
 * little-endian machine, as the bytes they are, in one copy (a 1 MiB write's record holds 256).
 */
function writeSums(out: Buffer, offset: number, sums: Uint32Array, chunkCount: number): number {
  // A few (a 4 KiB write's one) cost less one by one than a view of them does.
  if (!littleEndian || chunkCount < 16) {
    for (let i = 0; i < chunkCount; i++) offset = out.writeUInt32LE(sums[i]!, offset);
    return offset;
  }
  out.set(new Uint8Array(sums.buffer, sums.byteOffset, chunkCount * 4), offset);
  return offset + chunkCount * 4;
}

function payloadBytes(record: MetaRecord, jsonPayloads: Map<MetaRecord, Buffer>): number {
  if (record.type === 'map') return rangeRecordBytes + record.chunkCount * 4;
  if (record.type === 'unmap') return rangeRecordBytes;
  const { type: _type, ...fields } = record;
  const json = Buffer.from(JSON.stringify(fields), 'utf8');
  jsonPayloads.set(record, json);
  return 1 + json.length;
}

/** The record in one frame's payload, or null if it is not a record this version knows. */
export function decodeRecord(payload: Buffer): MetaRecord | null {
  return payload.length === 0 ? null : decodePayload(payload);
}

function decodePayload(payload: Buffer): MetaRecord | null {
  const type = typesByCode.get(payload.readUInt8(0));
  if (type === undefined) return null;
  if (type === 'map' || type === 'unmap') {
    if (payload.length < rangeRecordBytes) return null;
    const volumeId = payload.readUInt32LE(1);
    const virtualChunk = payload.readDoubleLE(5);
    const physicalChunk = payload.readDoubleLE(13);
    const chunkCount = payload.readDoubleLE(21);
    if (!wholeNumbers(virtualChunk, physicalChunk, chunkCount) || chunkCount === 0) return null;
    if (type === 'unmap') return payload.length === rangeRecordBytes ? { type, volumeId, virtualChunk, chunkCount } : null;
    if (payload.length !== rangeRecordBytes + chunkCount * 4) return null;
    const sums = new Uint32Array(chunkCount);
    for (let i = 0; i < chunkCount; i++) sums[i] = payload.readUInt32LE(rangeRecordBytes + i * 4);
    return { type, volumeId, virtualChunk, physicalChunk, chunkCount, sums };
  }
  let fields: Record<string, unknown>;
  try {
    fields = JSON.parse(payload.subarray(1).toString('utf8')) as Record<string, unknown>;
  } catch {
    return null;
  }
  const numbers = ['volumeId', 'snapshotId', 'sizeBytes', 'createdAtMs'].filter((key) => key in fields);
  if (!numbers.every((key) => wholeNumbers(fields[key] as number))) return null;
  if ('name' in fields && checkName(fields.name) !== null) return null;
  if ('uuid' in fields && !isSnapshotUuid(fields.uuid)) return null;
  return { type, ...fields } as MetaRecord;
}

function wholeNumbers(...values: number[]): boolean {
  return values.every((v) => Number.isSafeInteger(v) && v >= 0);
}

/** Every map of the catalog: volumes' then snapshots'. */
export function* allMaps(catalog: Catalog): Generator<ChunkMap> {
  for (const volume of catalog.volumes.values()) yield volume.map;
  for (const snapshot of catalog.snapshots.values()) yield snapshot.map;
}

/** Counts each chunk once per distinct page that names it: the reference counts of a freshly loaded catalog. */
export function countReferences(catalog: Catalog, refs: ChunkRefs): void {
  const seen = new Set<object>();
  for (const map of allMaps(catalog)) {
    for (const [, page] of map.pages()) {
      if (seen.has(page)) continue;
      seen.add(page);
      for (const slot of page.slots) if (slot > 0) refs.increment(slot - 1);
    }
  }
}
