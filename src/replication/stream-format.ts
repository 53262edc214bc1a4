// # The replication stream, format 1: what `chunkd send` writes and `chunkd receive` applies
//
// A stream carries one snapshot of a volume (the target), whole or as the changes from an older snapshot (the
// base), as Ceph's export-diff and ZFS's send streams do. It is a run of records, each checksummed on its own:
//
//   record   u8 type | u8 0 | u16 0 | u32 payload bytes (LE) | payload | u32 CRC-32 of every byte before it
//   HEADER 1 "CHKDSTRM" | u32 format version (1) | JSON: volumeSizeBytes, chunkSizeBytes, base {uuid, name} or
//            null (a full stream), target {uuid, name}, resumeOffsetBytes, dataBytes (the bytes of changed extents
//            the stream will cover, for progress)
//   DATA   2 u64 offset bytes | the bytes (whole 4 KiB chunks, at most limits.streamDataRecordBytesMax)
//   ZERO   3 u64 offset bytes | u64 length bytes: a range that reads as zeros (the receiver unmaps it)
//   END    4 u64 records before this one (header included) | u64 data bytes carried | 32-byte content digest
//   ABORT  5 UTF-8 message: the sender stopped (a damaged block at its source); no END follows
//
// Invariants a decoder checks, so the receiver can assert them: the HEADER comes first and once; extents are
// chunk-aligned, inside the volume, at or past resumeOffsetBytes, and in strictly increasing order without
// overlap; END or ABORT is last. So "every extent below offset X is applied" is one number, which is what a
// resume token carries. Snapshot ids are 128-bit random (store/metadata.ts) and a received snapshot keeps its
// sender's, so the base of an incremental is matched exactly on any node, not by name.
//
// The content digest (store/content-digest.ts) is over the target's chunk checksums in order, which both sides
// hold in their metadata: the receiver checks it against what it stored without rereading any data, before the
// snapshot appears. A stream damaged in transit fails a record's CRC; one applied to the wrong content, or with
// records missing, fails the counts or the digest.
//
// Resume token: "chunkd1-" then base64url of JSON {base uuid or null, target uuid, offsetBytes}; the receiver
// prints it (it knows what it holds durably), the sender starts a stream at that offset.
//
// Known weakness: a resumed stream is checked record by record and by the final digest, not against the first
// part's bytes; a sender whose target changed between the two parts cannot exist (snapshots are immutable), but a
// different node holding a snapshot with the same id would be trusted (ids are 128 random bits).
// Pure: bytes in, values out.
import { crc32 } from '@node-rs/crc32';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, streamDataRecordBytesMax, streamHeaderBytesMax, streamRecordPayloadBytesMax, volumeSizeMaxBytes } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import { appendedChecksum, blockChecksum, blockChecksums, combinedChecksum, shortChecksum } from '../store/checksum.ts';
import { contentDigestBytes } from '../store/content-digest.ts';
import { isSnapshotUuid } from '../store/metadata.ts';

export const streamFormatVersion = 1;
const magic = Buffer.from('CHKDSTRM', 'latin1');
export const recordHeadBytes = 8;
export const recordTailBytes = 4;
const recordTypes = { header: 1, data: 2, zero: 3, end: 4, abort: 5 } as const;
const abortMessageBytesMax = 4096;

export interface SnapshotRef {
  uuid: string;
  name: string;
}

export interface StreamHeader {
  volumeSizeBytes: number;
  base: SnapshotRef | null;
  target: SnapshotRef;
  resumeOffsetBytes: number;
  /** Bytes of the changed extents the stream covers (data or zeros), for progress. */
  dataBytes: number;
}

export type StreamRecord =
  | { type: 'header'; header: StreamHeader }
  /**
   * `sums`: each 4 KiB chunk's CRC-32 (a data record is whole chunks; the decoder's check of the record's CRC is
   * made from them, one pass over the data: StreamDecoder).
   */
  | { type: 'data'; offsetBytes: number; data: Buffer; sums: Uint32Array }
  | { type: 'zero'; offsetBytes: number; lengthBytes: number }
  | { type: 'end'; recordCount: number; dataBytes: number; digest: Buffer }
  | { type: 'abort'; message: string };

export interface ResumeToken {
  base: string | null;
  target: string;
  offsetBytes: number;
}

// ---- encoding ----

function frame(type: number, payloadParts: readonly Buffer[]): Buffer[] {
  const payloadBytes = payloadParts.reduce((sum, part) => sum + part.length, 0);
  const head = Buffer.alloc(recordHeadBytes);
  head.writeUInt8(type, 0);
  head.writeUInt32LE(payloadBytes, 4);
  let crc = crc32(head);
  for (const part of payloadParts) crc = crc32(part, crc);
  const tail = Buffer.allocUnsafe(recordTailBytes);
  tail.writeUInt32LE(crc >>> 0, 0);
  return [head, ...payloadParts, tail];
}

function u64(value: number): Buffer {
  const out = Buffer.allocUnsafe(8);
  out.writeBigUInt64LE(BigInt(value));
  return out;
}

/** The header record; the stream's first. */
export function encodeHeader(header: StreamHeader): Buffer {
  const version = Buffer.allocUnsafe(4);
  version.writeUInt32LE(streamFormatVersion);
  const json = Buffer.from(JSON.stringify({ ...header, chunkSizeBytes }), 'utf8');
  return Buffer.concat(frame(recordTypes.header, [magic, version, json]));
}

/** A data record, as pieces (the data is not copied). */
export function encodeData(offsetBytes: number, data: Buffer): Buffer[] {
  return frame(recordTypes.data, [u64(offsetBytes), data]);
}

/** Where a data record built in one buffer (sealDataRecord) carries its data, and the bytes it adds around them. */
export const dataRecordDataStart = recordHeadBytes + 8;
export const dataRecordOverheadBytes = dataRecordDataStart + recordTailBytes;

/**
 * Completes, in place, a data record whose data the caller put at dataRecordDataStart of `record` (which is
 * dataRecordOverheadBytes longer than the data): its head, offset and checksum. The bytes are those of
 * encodeData's pieces joined, with one buffer and one CRC pass for the record (a sender reads small extents
 * straight into their records). `dataChecksum`, for data of whole chunks: their combined CRC (checksum.ts), which
 * a sender knows from the read that verified them against their recorded checksums; the record's CRC is then
 * appended to its head's without a second pass over the data. The CRC is the same either way for data that has
 * that checksum; for data that does not (a read not verified, `--verify-reads off`), the record's CRC does not
 * match its bytes, and the receiver refuses the stream as damaged rather than store them.
 */
export function sealDataRecord(record: Buffer, offsetBytes: number, dataChecksum?: number): Buffer {
  const crcEnd = record.length - recordTailBytes;
  record.writeUInt32LE(recordTypes.data, 0); // type, then the zero flags byte and u16
  record.writeUInt32LE(crcEnd - recordHeadBytes, 4);
  record.writeUInt32LE(offsetBytes % 0x1_0000_0000, 8);
  record.writeUInt32LE(Math.floor(offsetBytes / 0x1_0000_0000), 12);
  const dataBytes = crcEnd - dataRecordDataStart;
  const crc = dataChecksum === undefined || dataBytes % chunkSizeBytes !== 0
    ? crc32(record.subarray(0, crcEnd)) >>> 0
    : appendedChecksum(shortChecksum(record, 0, dataRecordDataStart), dataChecksum, dataBytes / chunkSizeBytes);
  record.writeUInt32LE(crc, crcEnd);
  return record;
}

export function encodeZero(offsetBytes: number, lengthBytes: number): Buffer {
  return Buffer.concat(frame(recordTypes.zero, [u64(offsetBytes), u64(lengthBytes)]));
}

export function encodeEnd(recordCount: number, dataBytes: number, digest: Buffer): Buffer {
  return Buffer.concat(frame(recordTypes.end, [u64(recordCount), u64(dataBytes), digest]));
}

export function encodeAbort(message: string): Buffer {
  return Buffer.concat(frame(recordTypes.abort, [Buffer.from(message, 'utf8').subarray(0, abortMessageBytesMax)]));
}

const tokenPrefix = 'chunkd1-';

export function encodeResumeToken(token: ResumeToken): string {
  return tokenPrefix + Buffer.from(JSON.stringify(token), 'utf8').toString('base64url');
}

/** Validates a resume token from a user; EINVAL with what is wrong. */
export function decodeResumeToken(text: string): ResumeToken {
  const bad = (why: string): ChunkdError => ChunkdError.invalid(`invalid resume token: ${why} (print one with chunkd receive --resume-token VOL)`);
  if (!text.startsWith(tokenPrefix)) throw bad(`it does not start with ${tokenPrefix}`);
  let value: Partial<ResumeToken>;
  try {
    value = JSON.parse(Buffer.from(text.slice(tokenPrefix.length), 'base64url').toString('utf8')) as Partial<ResumeToken>;
  } catch {
    throw bad('it does not decode');
  }
  if (typeof value !== 'object' || value === null) throw bad('it does not decode');
  if (value.base !== null && !isSnapshotUuid(value.base)) throw bad('no base id');
  if (!isSnapshotUuid(value.target)) throw bad('no target id');
  if (!isOffset(value.offsetBytes)) throw bad('no offset');
  return { base: value.base, target: value.target, offsetBytes: value.offsetBytes };
}

function isOffset(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0 && value % chunkSizeBytes === 0 && value <= volumeSizeMaxBytes;
}

// ---- decoding ----

/** Chunk sums a decoder's arena holds: 256 KiB of them, the chunks of 256 MiB of data records. */
const decoderSumsArenaLength = 65_536;

/**
 * Decodes a stream pushed in pieces of any size, checking every record's checksum and every invariant of the
 * design note; ECORRUPT for a record that fails its checksum, EPROTO for one that breaks the format. Holds at
 * most one record's bytes (limits.streamRecordPayloadBytesMax) beyond what it returned.
 */
export class StreamDecoder {
  readonly #chunks: Buffer[] = [];
  #bufferedBytes = 0;
  /** Stream bytes consumed by whole records. */
  #offsetBytes = 0;
  #recordCount = 0;
  #dataBytes = 0;
  #header: StreamHeader | null = null;
  /** The end of the last extent: the next must start at or after it. */
  #nextExtentBytes = 0;
  #finished = false;
  /** Where data records' chunk sums are kept (views of it go out with the records; a full one is replaced, never reused). */
  #sums = new Uint32Array(decoderSumsArenaLength);
  #sumsUsed = 0;

  /** Stream bytes taken by the records decoded so far. */
  get offsetBytes(): number {
    return this.#offsetBytes;
  }

  get header(): StreamHeader | null {
    return this.#header;
  }

  /** Whether an END or ABORT record was decoded. */
  get finished(): boolean {
    return this.#finished;
  }

  /** Takes the next piece; returns the records it completes, in order. */
  push(piece: Buffer): StreamRecord[] {
    if (piece.length > 0) {
      this.#chunks.push(piece);
      this.#bufferedBytes += piece.length;
    }
    const records: StreamRecord[] = [];
    for (;;) {
      if (this.#bufferedBytes < recordHeadBytes) break;
      if (this.#finished) throw this.#protocol('bytes follow the stream\'s last record');
      const head = this.#peek(recordHeadBytes);
      const type = head.readUInt8(0);
      const payloadBytes = head.readUInt32LE(4);
      if (type < recordTypes.header || type > recordTypes.abort || head.readUInt8(1) !== 0 || head.readUInt16LE(2) !== 0) {
        throw this.#corrupt(`record ${this.#recordCount} at stream byte ${this.#offsetBytes} has an unknown type or flags (a damaged or foreign stream)`);
      }
      if (payloadBytes > streamRecordPayloadBytesMax) throw this.#corrupt(`record ${this.#recordCount} at stream byte ${this.#offsetBytes} claims ${payloadBytes} bytes, more than a record may hold`);
      const recordBytes = recordHeadBytes + payloadBytes + recordTailBytes;
      if (this.#bufferedBytes < recordBytes) break;
      const bytes = this.#take(recordBytes);
      const crcEnd = recordBytes - recordTailBytes;
      const dataBytes = payloadBytes - 8;
      if (type === recordTypes.data && dataBytes > 0 && dataBytes <= streamDataRecordBytesMax && dataBytes % chunkSizeBytes === 0) {
        records.push(this.#wholeChunksData(bytes, crcEnd));
      } else {
        if ((crc32(bytes.subarray(0, crcEnd)) >>> 0) !== bytes.readUInt32LE(crcEnd)) throw this.#damaged();
        records.push(this.#decode(type, bytes.subarray(recordHeadBytes, crcEnd)));
      }
      this.#recordCount += 1;
      this.#offsetBytes += recordBytes;
    }
    return records;
  }

  /** Called at the end of the input: a stream cut short (no END or ABORT) is reported by the caller, not here. */
  get trailingBytes(): number {
    return this.#bufferedBytes;
  }

  #damaged(): ChunkdError {
    return this.#corrupt(`record ${this.#recordCount} at stream byte ${this.#offsetBytes} fails its checksum: the stream is damaged`);
  }

  /**
   * A data record of whole chunks: each chunk's CRC-32 is taken once, and the record's CRC is checked as their
   * combination appended to its head's (checksum.ts), so each byte is summed once, not once for the record and
   * again for the chunk map. Damage anywhere in the record fails the check exactly as a CRC over its bytes would
   * (the combination is that CRC). The sums go with the record (`sums`).
   */
  #wholeChunksData(bytes: Buffer, crcEnd: number): StreamRecord {
    const data = bytes.subarray(dataRecordDataStart, crcEnd);
    const count = data.length / chunkSizeBytes;
    if (this.#sums.length - this.#sumsUsed < count) {
      this.#sums = new Uint32Array(decoderSumsArenaLength);
      this.#sumsUsed = 0;
    }
    const from = this.#sumsUsed;
    const arena = this.#sums;
    if (count === 1) arena[from] = blockChecksum(data);
    else blockChecksums(data, count, arena, from);
    const crc = appendedChecksum(shortChecksum(bytes, 0, dataRecordDataStart), combinedChecksum(arena, from, count), count);
    if (crc !== bytes.readUInt32LE(crcEnd)) throw this.#damaged();
    this.#sumsUsed = from + count;
    const header = this.#header;
    if (header === null) throw this.#protocol('the stream does not start with a header (not a chunkd stream?)');
    const offsetBytes = this.#extent(header, bytes.readUInt32LE(recordHeadBytes) + bytes.readUInt32LE(recordHeadBytes + 4) * 0x1_0000_0000, data.length);
    this.#dataBytes += data.length;
    return { type: 'data', offsetBytes, data, sums: arena.subarray(from, from + count) };
  }

  #decode(type: number, payload: Buffer): StreamRecord {
    if (type === recordTypes.header) {
      if (this.#header !== null) throw this.#protocol('a second header');
      this.#header = parseHeader(payload, (why) => this.#protocol(why));
      this.#nextExtentBytes = this.#header.resumeOffsetBytes;
      return { type: 'header', header: this.#header };
    }
    const header = this.#header;
    if (header === null) throw this.#protocol('the stream does not start with a header (not a chunkd stream?)');
    switch (type) {
      case recordTypes.data: {
        // A data record of whole chunks, no bigger than a record may be, is #wholeChunksData's: one here is not.
        if (payload.length < 8 + chunkSizeBytes || payload.length > 8 + streamDataRecordBytesMax) throw this.#protocol(`a data record of ${payload.length - 8} bytes`);
        this.#extent(header, Number(payload.readBigUInt64LE(0)), payload.length - 8);
        throw this.#protocol(`a data record of ${payload.length - 8} bytes`);
      }
      case recordTypes.zero: {
        if (payload.length !== 16) throw this.#protocol('a zero record of the wrong size');
        const lengthBytes = Number(payload.readBigUInt64LE(8));
        const offsetBytes = this.#extent(header, Number(payload.readBigUInt64LE(0)), lengthBytes);
        return { type: 'zero', offsetBytes, lengthBytes };
      }
      case recordTypes.end: {
        if (payload.length !== 16 + contentDigestBytes) throw this.#protocol('an end record of the wrong size');
        const recordCount = Number(payload.readBigUInt64LE(0));
        const dataBytes = Number(payload.readBigUInt64LE(8));
        if (recordCount !== this.#recordCount || dataBytes !== this.#dataBytes) {
          throw this.#corrupt(`the end record counts ${recordCount} records and ${dataBytes} data bytes, but ${this.#recordCount} records and ${this.#dataBytes} data bytes came: records are missing`);
        }
        this.#finished = true;
        return { type: 'end', recordCount, dataBytes, digest: Buffer.from(payload.subarray(16)) };
      }
      default:
        this.#finished = true;
        return { type: 'abort', message: payload.toString('utf8') };
    }
  }

  /** Checks one extent against the invariants; returns its offset. */
  #extent(header: StreamHeader, offsetBytes: number, lengthBytes: number): number {
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes % chunkSizeBytes !== 0 || lengthBytes % chunkSizeBytes !== 0 || lengthBytes === 0) {
      throw this.#protocol(`an extent at ${offsetBytes} of ${lengthBytes} bytes is not whole chunks`);
    }
    if (offsetBytes + lengthBytes > header.volumeSizeBytes) throw this.#protocol(`an extent at ${offsetBytes} of ${lengthBytes} bytes ends past the volume (${header.volumeSizeBytes} bytes)`);
    if (offsetBytes < this.#nextExtentBytes) throw this.#protocol(`an extent at ${offsetBytes} comes before the end of the previous one (${this.#nextExtentBytes})`);
    this.#nextExtentBytes = offsetBytes + lengthBytes;
    return offsetBytes;
  }

  #peek(byteCount: number): Buffer {
    const first = this.#chunks[0]!;
    if (first.length >= byteCount) return first.subarray(0, byteCount);
    const joined = Buffer.concat(this.#chunks);
    this.#chunks.length = 0;
    this.#chunks.push(joined);
    return joined.subarray(0, byteCount);
  }

  #take(byteCount: number): Buffer {
    const bytes = this.#peek(byteCount);
    const first = this.#chunks[0]!;
    if (first.length === byteCount) this.#chunks.shift();
    else this.#chunks[0] = first.subarray(byteCount);
    this.#bufferedBytes -= byteCount;
    return bytes;
  }

  #protocol(why: string): ChunkdError {
    return ChunkdError.protocol(`not a valid chunkd stream: ${why} (record ${this.#recordCount}, stream byte ${this.#offsetBytes})`);
  }

  #corrupt(why: string): ChunkdError {
    return ChunkdError.corrupt(why);
  }
}

function parseHeader(payload: Buffer, bad: (why: string) => ChunkdError): StreamHeader {
  if (payload.length < magic.length + 4 || !payload.subarray(0, magic.length).equals(magic)) throw bad('no chunkd stream magic');
  const version = payload.readUInt32LE(magic.length);
  if (version !== streamFormatVersion) throw bad(`stream format version ${version}; this chunkd reads version ${streamFormatVersion}`);
  if (payload.length > streamHeaderBytesMax) throw bad('a header over its size limit');
  let value: Record<string, unknown>;
  try {
    value = JSON.parse(payload.subarray(magic.length + 4).toString('utf8')) as Record<string, unknown>;
  } catch {
    throw bad('a header that is not JSON');
  }
  if (value.chunkSizeBytes !== chunkSizeBytes) throw bad(`chunk size ${String(value.chunkSizeBytes)}, not ${chunkSizeBytes}`);
  const size = value.volumeSizeBytes;
  if (!isOffset(size) || size === 0) throw bad('an invalid volume size');
  const ref = (field: unknown, what: string): SnapshotRef => {
    const r = field as Partial<SnapshotRef> | null;
    if (typeof r !== 'object' || r === null || !isSnapshotUuid(r.uuid) || checkName(r.name, 'snapshot') !== null) throw bad(`an invalid ${what} snapshot`);
    return { uuid: r.uuid, name: r.name as string };
  };
  const base = value.base === null ? null : ref(value.base, 'base');
  const target = ref(value.target, 'target');
  if (base !== null && base.uuid === target.uuid) throw bad('base and target are one snapshot');
  if (!isOffset(value.resumeOffsetBytes) || value.resumeOffsetBytes > size) throw bad('an invalid resume offset');
  const dataBytes = value.dataBytes;
  if (typeof dataBytes !== 'number' || !Number.isSafeInteger(dataBytes) || dataBytes < 0) throw bad('an invalid data size');
  return { volumeSizeBytes: size, base, target, resumeOffsetBytes: value.resumeOffsetBytes, dataBytes };
}
