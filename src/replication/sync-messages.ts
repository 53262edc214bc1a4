// The payloads of the synchronous replica verbs (peer/protocol.ts numbers them; sync-replicas.ts sends them,
// sync-replica-server.ts serves them), checked here once, at the edge. Pure: bytes in, values out.
//
//   syncOpen  {volume, epoch, sizeBytes}  -> {session}: the node keeps `volume` as a synchronous replica of the
//                                            sender at `epoch` (created empty when it has none; its role is durable
//                                            first), and from now on takes writes of this session only
//   syncWrite binary, below               -> {} once the write is applied there (and durable there with FUA)
//   syncFlush {volume, epoch, session}    -> {} once every write the replica acknowledged before it is durable
//   syncControl {volume, epoch, session, action, ...}
//                                         -> {} once the change is durable there; the owner sends it to an in-sync
//                                            replica with no write in flight (the whole volume's lock), so it lands
//                                            at the same point of the write stream on every replica, and to a
//                                            resyncing one (which gets no client writes) to give it the snapshots
//                                            it missed (sync-replicas.ts, SNAPSHOTS AT RESYNC):
//              action 'snapshot' {name, uuid}         takes the snapshot, with the owner's id
//              action 'remove-snapshot' {name, uuid}  removes it (done already when it is not there)
//              action 'resize' {sizeBytes}            grows or shrinks the replica (a shrink discards the tail)
//              action 'rollback' {name, uuid}         rolls the replica back to that snapshot (ENOENT without it)
//   syncSums {volume, epoch, session, firstChunk, chunkCount}
//                                         -> {sums}: the recorded checksum (CRC-32) of each of those chunks of the
//                                            replica, a hole as a chunk of zeros, base64 of big-endian u32s; at
//                                            most limits.syncSumsChunksMax chunks (what a resync compares)
//   syncRead  {volume, epoch, session,    -> the bytes, raw (verified against their checksums there): the owner
//              offsetBytes, lengthBytes}     repairs a block that failed its checksum from an in-sync replica
//                                            (at most syncReadBytesMax, so the answer fits a control frame)
//   syncClose {volume, epoch, session}    -> {} once the replica is an asynchronous replica of the sender at the
//                                            same epoch (durably), its writes flushed: the owner made the volume's
//                                            replicas asynchronous (volume set --sync off), each at a replication
//                                            point both hold
//
// The session (the replica's count of syncOpens of the volume since it started) shuts out an older connection of
// the same owner: a write the owner gave up on (it timed out, the replica is out of sync) may still wait in the
// replica's socket buffers when the replica resumes, and must not land after the resync has copied that region.
//
// syncWrite is a bulk verb (its payload lands in shared memory, written in place by the chunk I/O workers):
//
//   offset  size  field
//        0     1  op: 1 write, 2 trim, 3 write zeroes
//        1     1  flags: 1 FUA, 2 NO_HOLE (write zeroes only); other bits are refused
//        2     2  bytes of the volume name that follows the header
//        4     4  the sender's ownership epoch of the volume
//        8     8  offset in bytes
//       16     8  length in bytes (a write's data is exactly this long)
//       24     4  the session syncOpen answered
//       28     -  the volume name (UTF-8), then a write's data
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, peerControlBytesMax, volumeSizeMaxBytes, requestBytesMax, syncSumsChunksMax } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import { parseJsonObject } from '../peer/protocol.ts';
import { isSnapshotUuid } from '../store/metadata.ts';

/**
 * How a replica's refusal of a stale owner begins (its epoch is higher than the sender's): the owner then refuses
 * writes itself, where any other failure only makes the replica out of sync. The code alone cannot tell them apart
 * (a connection the peer closes is EPERM too: peer/client.ts).
 */
export const fencedRefusalPrefix = 'fenced: ';

export function isFencedRefusal(error: ChunkdError): boolean {
  return error.code === 'EPERM' && error.message.startsWith(fencedRefusalPrefix);
}

export const SyncOp = { write: 1, trim: 2, zeroes: 3 } as const;
export type SyncOp = (typeof SyncOp)[keyof typeof SyncOp];

const syncFlagFua = 1;
const syncFlagNoHole = 2;
export const syncWriteHeaderBytes = 28;

export interface SyncWriteRequest {
  op: SyncOp;
  fua: boolean;
  noHole: boolean;
  volume: string;
  epoch: number;
  session: number;
  offsetBytes: number;
  lengthBytes: number;
  /** A write's data (a view of the payload); null for trim and write zeroes. */
  data: Buffer | null;
}

export interface SyncOpenRequest {
  volume: string;
  epoch: number;
  sizeBytes: number;
}

export interface SyncFlushRequest {
  volume: string;
  epoch: number;
  session: number;
}

export type SyncControlAction =
  | { action: 'snapshot' | 'remove-snapshot' | 'rollback'; name: string; uuid: string }
  | { action: 'resize'; sizeBytes: number };

export type SyncControlRequest = SyncFlushRequest & SyncControlAction;

/** A syncWrite payload as pieces to write in order: the header with the name, then a write's data (not copied). */
export function encodeSyncWrite(request: SyncWriteRequest): Buffer[] {
  assert(request.op === SyncOp.write ? request.data !== null && request.data.length === request.lengthBytes : request.data === null, 'syncWrite: data for a write only');
  assert(!request.noHole || request.op === SyncOp.zeroes, 'syncWrite: NO_HOLE for write zeroes only');
  const name = Buffer.from(request.volume, 'utf8');
  // From Node's pool: every byte is written below.
  const header = Buffer.allocUnsafe(syncWriteHeaderBytes + name.length);
  header.writeUInt8(request.op, 0);
  header.writeUInt8((request.fua ? syncFlagFua : 0) | (request.noHole ? syncFlagNoHole : 0), 1);
  header.writeUInt16BE(name.length, 2);
  header.writeUInt32BE(request.epoch, 4);
  header.writeBigUInt64BE(BigInt(request.offsetBytes), 8);
  header.writeBigUInt64BE(BigInt(request.lengthBytes), 16);
  header.writeUInt32BE(request.session, 24);
  name.copy(header, syncWriteHeaderBytes);
  return request.data === null || request.data.length === 0 ? [header] : [header, request.data];
}

/** Checks a syncWrite payload; throws EPROTO for anything malformed. The range against the volume is the server's to check. */
export function parseSyncWrite(payload: Buffer): SyncWriteRequest {
  if (payload.length < syncWriteHeaderBytes) throw ChunkdError.protocol(`syncWrite payload of ${payload.length} bytes is shorter than its header`);
  const op = payload.readUInt8(0);
  if (op !== SyncOp.write && op !== SyncOp.trim && op !== SyncOp.zeroes) throw ChunkdError.protocol(`syncWrite: unknown op ${op}`);
  const flags = payload.readUInt8(1);
  if ((flags & ~(syncFlagFua | syncFlagNoHole)) !== 0) throw ChunkdError.protocol(`syncWrite: flags 0x${flags.toString(16)} are not defined`);
  if ((flags & syncFlagNoHole) !== 0 && op !== SyncOp.zeroes) throw ChunkdError.protocol('syncWrite: NO_HOLE is for write zeroes only');
  const nameBytes = payload.readUInt16BE(2);
  const epoch = payload.readUInt32BE(4);
  if (epoch < 1) throw ChunkdError.protocol('syncWrite needs an epoch, a whole number from 1');
  const offset = payload.readBigUInt64BE(8);
  const length = payload.readBigUInt64BE(16);
  if (offset > BigInt(volumeSizeMaxBytes) || length > BigInt(volumeSizeMaxBytes)) throw ChunkdError.protocol('syncWrite: offset or length past the largest volume');
  const session = payload.readUInt32BE(24);
  const offsetBytes = Number(offset);
  const lengthBytes = Number(length);
  if (payload.length < syncWriteHeaderBytes + nameBytes) throw ChunkdError.protocol('syncWrite payload is shorter than its volume name');
  let volume: string;
  try {
    volume = new TextDecoder('utf-8', { fatal: true }).decode(payload.subarray(syncWriteHeaderBytes, syncWriteHeaderBytes + nameBytes));
  } catch {
    throw ChunkdError.protocol('syncWrite: the volume name is not UTF-8');
  }
  if (checkName(volume) !== null) throw ChunkdError.protocol('syncWrite needs a valid volume name');
  const rest = payload.subarray(syncWriteHeaderBytes + nameBytes);
  if (op === SyncOp.write) {
    if (lengthBytes > requestBytesMax) throw ChunkdError.protocol(`syncWrite: a write of ${lengthBytes} bytes is longer than a request may be`);
    if (rest.length !== lengthBytes) throw ChunkdError.protocol(`syncWrite: a write of ${lengthBytes} bytes carries ${rest.length}`);
  } else if (rest.length !== 0) {
    throw ChunkdError.protocol('syncWrite: a trim or write zeroes carries no data');
  }
  return {
    op, fua: (flags & syncFlagFua) !== 0, noHole: (flags & syncFlagNoHole) !== 0, volume, epoch, session, offsetBytes, lengthBytes,
    data: op === SyncOp.write ? rest : null,
  };
}

export function parseSyncOpen(payload: Buffer): SyncOpenRequest {
  const value = parseJsonObject(payload, 'syncOpen');
  const sizeBytes = value.sizeBytes;
  if (typeof sizeBytes !== 'number' || !Number.isSafeInteger(sizeBytes) || sizeBytes < 1 || sizeBytes > volumeSizeMaxBytes) throw ChunkdError.protocol('syncOpen needs sizeBytes');
  return { ...parseTarget(value, 'syncOpen'), sizeBytes };
}

export function parseSyncFlush(payload: Buffer): SyncFlushRequest {
  const value = parseJsonObject(payload, 'syncFlush');
  return { ...parseTarget(value, 'syncFlush'), session: sessionField(value.session, 'syncFlush') };
}

export function parseSyncControl(payload: Buffer): SyncControlRequest {
  const value = parseJsonObject(payload, 'syncControl');
  const target = { ...parseTarget(value, 'syncControl'), session: sessionField(value.session, 'syncControl') };
  if (value.action === 'resize') {
    const sizeBytes = value.sizeBytes;
    if (typeof sizeBytes !== 'number' || !Number.isSafeInteger(sizeBytes) || sizeBytes < 1 || sizeBytes > volumeSizeMaxBytes) throw ChunkdError.protocol('syncControl resize needs sizeBytes');
    return { ...target, action: 'resize', sizeBytes };
  }
  if (value.action !== 'snapshot' && value.action !== 'remove-snapshot' && value.action !== 'rollback') throw ChunkdError.protocol(`syncControl: unknown action ${JSON.stringify(value.action)}`);
  if (typeof value.name !== 'string' || checkName(value.name, 'snapshot') !== null) throw ChunkdError.protocol(`syncControl ${value.action} needs a valid snapshot name`);
  if (!isSnapshotUuid(value.uuid)) throw ChunkdError.protocol(`syncControl ${value.action} needs the snapshot's id, 32 lowercase hex digits`);
  return { ...target, action: value.action, name: value.name, uuid: value.uuid };
}

export interface SyncSumsRequest extends SyncFlushRequest {
  firstChunk: number;
  chunkCount: number;
}

export function parseSyncSums(payload: Buffer): SyncSumsRequest {
  const value = parseJsonObject(payload, 'syncSums');
  const { firstChunk, chunkCount } = value;
  if (typeof firstChunk !== 'number' || !Number.isSafeInteger(firstChunk) || firstChunk < 0 || firstChunk > volumeSizeMaxBytes / chunkSizeBytes) throw ChunkdError.protocol('syncSums needs firstChunk');
  if (typeof chunkCount !== 'number' || !Number.isSafeInteger(chunkCount) || chunkCount < 1 || chunkCount > syncSumsChunksMax) throw ChunkdError.protocol(`syncSums needs chunkCount, from 1 to ${syncSumsChunksMax}`);
  return { ...parseTarget(value, 'syncSums'), session: sessionField(value.session, 'syncSums'), firstChunk, chunkCount };
}

export function encodeSyncSumsReply(sums: Uint32Array): object {
  const bytes = Buffer.alloc(sums.length * 4);
  for (const [index, sum] of sums.entries()) bytes.writeUInt32BE(sum, index * 4);
  return { sums: bytes.toString('base64') };
}

/** The checksums a syncSums reply carries; exactly `chunkCount` of them, or EPROTO. */
export function parseSyncSumsReply(payload: Buffer, chunkCount: number): Uint32Array {
  const value = parseJsonObject(payload, 'syncSums reply');
  const bytes = typeof value.sums === 'string' ? Buffer.from(value.sums, 'base64') : null;
  if (bytes === null || bytes.length !== chunkCount * 4) throw ChunkdError.protocol(`syncSums reply: ${chunkCount} checksums expected`);
  const sums = new Uint32Array(chunkCount);
  for (let index = 0; index < chunkCount; index++) sums[index] = bytes.readUInt32BE(index * 4);
  return sums;
}

export interface SyncReadRequest extends SyncFlushRequest {
  offsetBytes: number;
  lengthBytes: number;
}

/** The most bytes one syncRead asks for: its answer is a control frame's payload. */
export const syncReadBytesMax = peerControlBytesMax;

export function parseSyncRead(payload: Buffer): SyncReadRequest {
  const value = parseJsonObject(payload, 'syncRead');
  const { offsetBytes, lengthBytes } = value;
  if (typeof offsetBytes !== 'number' || !Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || offsetBytes > volumeSizeMaxBytes) throw ChunkdError.protocol('syncRead needs offsetBytes');
  if (typeof lengthBytes !== 'number' || !Number.isSafeInteger(lengthBytes) || lengthBytes < 1 || lengthBytes > syncReadBytesMax) {
    throw ChunkdError.protocol(`syncRead needs lengthBytes, 1 to ${syncReadBytesMax}`);
  }
  return { ...parseTarget(value, 'syncRead'), session: sessionField(value.session, 'syncRead'), offsetBytes, lengthBytes };
}

/** The session a syncOpen reply names. */
export function parseSyncOpenReply(payload: Buffer): number {
  return sessionField(parseJsonObject(payload, 'syncOpen reply').session, 'syncOpen reply');
}

function parseTarget(value: Record<string, unknown>, what: string): { volume: string; epoch: number } {
  if (typeof value.volume !== 'string' || checkName(value.volume) !== null) throw ChunkdError.protocol(`${what} needs a valid volume name`);
  if (typeof value.epoch !== 'number' || !Number.isSafeInteger(value.epoch) || value.epoch < 1 || value.epoch > 0xffffffff) {
    throw ChunkdError.protocol(`${what} needs an epoch, a whole number from 1`);
  }
  return { volume: value.volume, epoch: value.epoch };
}

function sessionField(value: unknown, what: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0 || value > 0xffffffff) throw ChunkdError.protocol(`${what} needs a session, a 32-bit whole number`);
  return value;
}
