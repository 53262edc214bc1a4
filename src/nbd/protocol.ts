// The NBD wire format, as doc/proto.md in the NetworkBlockDevice/nbd repository defines it: constants, decoders
// of what a client sends, encoders of what a server answers. Pure: no sockets, no devices, no clocks.
//
// Decoders take a Buffer and an offset and return either { done: true, value, bytesConsumed } or
// { done: false, bytesNeeded } (the total bytes from `offset` that must be present before decoding can go on).
// Malformed input throws ChunkdError EPROTO and nothing else: a fuzz test holds them to that.
//
// 64-bit offsets: a request offset is a Number when it fits (at most 2^53 - 1); above that it decodes as
// Infinity, which no range check passes, so the server answers EINVAL/ENOSPC instead of computing with a
// rounded value. Handles are opaque 64-bit values kept as bigint.
import { ChunkdError } from '../core/errors.ts';
import { assert } from '../core/assert.ts';
import { optionBytesMax } from '../core/limits.ts';

// ---- Magics ----
/** 'NBDMAGIC': first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': newstyle handshake magic, also the magic of each client option. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---- Handshake flags (16 bits, server) and client flags (32 bits) ----
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---- Transmission flags (16 bits) ----
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- Options ----
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// ---- Option reply types ----
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const NBD_REP_FLAG_ERROR = 2 ** 31;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

// ---- Information types (NBD_OPT_INFO / NBD_OPT_GO) ----
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- Commands ----
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// ---- Command flags ----
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// ---- Structured replies ----
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = 2 ** 15 + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 2 ** 15 + 2;

// ---- Errors (the error field of replies) ----
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---- base:allocation ----
export const NBD_META_CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// ---- Sizes ----
export const greetingBytes = 18;
export const clientFlagsBytes = 4;
export const optionHeaderBytes = 16;
export const optionReplyHeaderBytes = 20;
export const requestHeaderBytes = 28;
export const simpleReplyHeaderBytes = 16;
export const structuredReplyHeaderBytes = 20;
/** A structured OFFSET_DATA chunk's header: the chunk header and the 64-bit offset before the data. */
export const offsetDataHeaderBytes = structuredReplyHeaderBytes + 8;
/** Zeroes after the NBD_OPT_EXPORT_NAME reply unless the client asked for NBD_FLAG_C_NO_ZEROES. */
export const exportNameZeroesBytes = 124;
/** The protocol's limit on any string (export names, messages, context names). */
export const stringBytesMax = 4096;

const allHandshakeClientFlags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// ---- Decoder results ----
export type Decoded<T> = { done: true; value: T; bytesConsumed: number } | { done: false; bytesNeeded: number };

function needMore(bytesNeeded: number): { done: false; bytesNeeded: number } {
  return { done: false, bytesNeeded };
}

export interface ClientFlags {
  fixedNewstyle: boolean;
  noZeroes: boolean;
}

export interface ClientOption {
  option: number;
  /** The option's data: a view of the input, valid as long as the caller keeps the input. */
  data: Buffer;
}

export interface NbdRequest {
  flags: number;
  type: number;
  handle: bigint;
  /** Infinity when the wire value is above 2^53 - 1: no export is that large, so every range check fails. */
  offsetBytes: number;
  lengthBytes: number;
}

// ---- Decoders (client → server) ----

/** Decodes the client flags that follow the greeting; unknown flags are a protocol violation (spec: MUST drop). */
export function decodeClientFlags(buffer: Buffer, offset: number): Decoded<ClientFlags> {
  if (buffer.length - offset < clientFlagsBytes) return needMore(clientFlagsBytes);
  const flags = buffer.readUInt32BE(offset);
  if ((flags & ~allHandshakeClientFlags) !== 0) {
    throw ChunkdError.protocol(`unknown client flags 0x${flags.toString(16)}`);
  }
  return {
    done: true,
    value: { fixedNewstyle: (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0, noZeroes: (flags & NBD_FLAG_C_NO_ZEROES) !== 0 },
    bytesConsumed: clientFlagsBytes,
  };
}

/** Decodes one option (header and data); an option longer than limits.optionBytesMax is refused as abuse. */
export function decodeOption(buffer: Buffer, offset: number): Decoded<ClientOption> {
  const available = buffer.length - offset;
  if (available < optionHeaderBytes) return needMore(optionHeaderBytes);
  if (buffer.readUInt32BE(offset) !== 0x49484156 || buffer.readUInt32BE(offset + 4) !== 0x454f5054) {
    throw ChunkdError.protocol('bad option magic (expected IHAVEOPT)');
  }
  const option = buffer.readUInt32BE(offset + 8);
  const dataBytes = buffer.readUInt32BE(offset + 12);
  if (dataBytes > optionBytesMax) {
    throw ChunkdError.protocol(`option ${option} carries ${dataBytes} bytes, more than the ${optionBytesMax} allowed`);
  }
  const totalBytes = optionHeaderBytes + dataBytes;
  if (available < totalBytes) return needMore(totalBytes);
  const data = buffer.subarray(offset + optionHeaderBytes, offset + totalBytes);
  return { done: true, value: { option, data }, bytesConsumed: totalBytes };
}

/** Decodes a transmission request header (a WRITE's payload follows it and is not part of it). */
export function decodeRequest(buffer: Buffer, offset: number): Decoded<NbdRequest> {
  if (buffer.length - offset < requestHeaderBytes) return needMore(requestHeaderBytes);
  const magic = buffer.readUInt32BE(offset);
  if (magic !== NBD_REQUEST_MAGIC) {
    throw ChunkdError.protocol(`bad request magic 0x${magic.toString(16)}`);
  }
  // Two 32-bit halves instead of readBigUInt64BE: no BigInt on the hot path, and the high half tells directly
  // whether the value fits 53 bits.
  const offsetHigh = buffer.readUInt32BE(offset + 16);
  const offsetLow = buffer.readUInt32BE(offset + 20);
  const offsetBytes = offsetHigh <= 0x1fffff ? offsetHigh * 2 ** 32 + offsetLow : Number.POSITIVE_INFINITY;
  return {
    done: true,
    value: {
      flags: buffer.readUInt16BE(offset + 4),
      type: buffer.readUInt16BE(offset + 6),
      handle: buffer.readBigUInt64BE(offset + 8),
      offsetBytes,
      lengthBytes: buffer.readUInt32BE(offset + 24),
    },
    bytesConsumed: requestHeaderBytes,
  };
}

// ---- Option data parsers: malformed data throws EPROTO, which the handshake answers NBD_REP_ERR_INVALID ----

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decodes a protocol string: valid UTF-8, no NUL, at most 4096 bytes. */
export function decodeString(bytes: Uint8Array, what: string): string {
  if (bytes.length > stringBytesMax) throw ChunkdError.protocol(`${what} is longer than ${stringBytesMax} bytes`);
  if (bytes.includes(0)) throw ChunkdError.protocol(`${what} contains NUL`);
  try {
    return utf8.decode(bytes);
  } catch {
    throw ChunkdError.protocol(`${what} is not valid UTF-8`);
  }
}

/** Parses NBD_OPT_EXPORT_NAME's data: the whole of it is the name. */
export function parseExportNameData(data: Buffer): string {
  return decodeString(data, 'export name');
}

export interface InfoRequest {
  exportName: string;
  infoTypes: number[];
}

/** Parses the data of NBD_OPT_INFO and NBD_OPT_GO: name length, name, count of info requests, the requests. */
export function parseInfoRequest(data: Buffer): InfoRequest {
  if (data.length < 6) throw ChunkdError.protocol('NBD_OPT_INFO/GO data shorter than 6 bytes');
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 6) throw ChunkdError.protocol('NBD_OPT_INFO/GO export name runs past the option');
  const exportName = decodeString(data.subarray(4, 4 + nameBytes), 'export name');
  const infoCount = data.readUInt16BE(4 + nameBytes);
  if (data.length !== 4 + nameBytes + 2 + 2 * infoCount) {
    throw ChunkdError.protocol('NBD_OPT_INFO/GO information request count does not match the option length');
  }
  const infoTypes: number[] = [];
  for (let index = 0; index < infoCount; index += 1) infoTypes.push(data.readUInt16BE(4 + nameBytes + 2 + 2 * index));
  return { exportName, infoTypes };
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/** Parses the data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest {
  let at = 0;
  const readLength = (what: string): number => {
    if (data.length - at < 4) throw ChunkdError.protocol(`meta context option: ${what} runs past the option`);
    const value = data.readUInt32BE(at);
    at += 4;
    return value;
  };
  const readString = (what: string): string => {
    const lengthBytes = readLength(`${what} length`);
    if (lengthBytes > data.length - at) throw ChunkdError.protocol(`meta context option: ${what} runs past the option`);
    const text = decodeString(data.subarray(at, at + lengthBytes), what);
    at += lengthBytes;
    return text;
  };
  const exportName = readString('export name');
  const queryCount = readLength('query count');
  // Each query needs at least its 4-byte length: a count beyond that is malformed (and bounds the loop).
  if (queryCount > (data.length - at) / 4) throw ChunkdError.protocol('meta context option: query count runs past the option');
  const queries: string[] = [];
  for (let index = 0; index < queryCount; index += 1) queries.push(readString('query'));
  if (at !== data.length) throw ChunkdError.protocol('meta context option: trailing bytes');
  return { exportName, queries };
}

// ---- Encoders (server → client): handshake ----

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags (fixed newstyle, no zeroes). */
export function encodeGreeting(): Buffer {
  const buffer = Buffer.allocUnsafe(greetingBytes);
  buffer.writeBigUInt64BE(NBD_MAGIC, 0);
  buffer.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  buffer.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  return buffer;
}

/** The reply that ends the handshake after NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const buffer = Buffer.alloc(10 + (noZeroes ? 0 : exportNameZeroesBytes));
  buffer.writeBigUInt64BE(BigInt(sizeBytes), 0);
  buffer.writeUInt16BE(transmissionFlags, 8);
  return buffer;
}

/** One fixed-newstyle option reply with an optional payload. */
export function encodeOptionReply(option: number, replyType: number, payload?: Uint8Array): Buffer {
  const payloadBytes = payload?.length ?? 0;
  const buffer = Buffer.allocUnsafe(optionReplyHeaderBytes + payloadBytes);
  buffer.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  buffer.writeUInt32BE(option >>> 0, 8);
  buffer.writeUInt32BE(replyType >>> 0, 12);
  buffer.writeUInt32BE(payloadBytes, 16);
  if (payload) buffer.set(payload, optionReplyHeaderBytes);
  return buffer;
}

/** An error reply (bit 31 set) carrying a human-readable message. */
export function encodeOptionError(option: number, replyType: number, message: string): Buffer {
  assert(replyType >= NBD_REP_FLAG_ERROR, 'an option error reply has bit 31 set');
  return encodeOptionReply(option, replyType, encodeMessage(message));
}

/** NBD_REP_SERVER for NBD_OPT_LIST: name length, name, then the description. */
export function encodeServerReply(option: number, name: string, description: string): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const descriptionBytes = encodeMessage(description);
  assert(nameBytes.length <= stringBytesMax, 'export names are short');
  const payload = Buffer.allocUnsafe(4 + nameBytes.length + descriptionBytes.length);
  payload.writeUInt32BE(nameBytes.length, 0);
  payload.set(nameBytes, 4);
  payload.set(descriptionBytes, 4 + nameBytes.length);
  return encodeOptionReply(option, NBD_REP_SERVER, payload);
}

/** NBD_REP_INFO / NBD_INFO_EXPORT: export size and transmission flags. */
export function encodeInfoExport(option: number, sizeBytes: number, transmissionFlags: number): Buffer {
  const payload = Buffer.allocUnsafe(12);
  payload.writeUInt16BE(NBD_INFO_EXPORT, 0);
  payload.writeBigUInt64BE(BigInt(sizeBytes), 2);
  payload.writeUInt16BE(transmissionFlags, 10);
  return encodeOptionReply(option, NBD_REP_INFO, payload);
}

/** NBD_REP_INFO / NBD_INFO_NAME: the export's canonical name. */
export function encodeInfoName(option: number, name: string): Buffer {
  return encodeInfoString(option, NBD_INFO_NAME, name);
}

/** NBD_REP_INFO / NBD_INFO_DESCRIPTION: a description for humans. */
export function encodeInfoDescription(option: number, description: string): Buffer {
  return encodeInfoString(option, NBD_INFO_DESCRIPTION, description);
}

/** NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block sizes. */
export function encodeInfoBlockSize(option: number, minimumBytes: number, preferredBytes: number, maximumBytes: number): Buffer {
  assert(minimumBytes >= 1 && minimumBytes <= 65536 && isPowerOfTwo(minimumBytes), 'minimum block size: a power of 2 up to 64 KiB');
  assert(preferredBytes >= Math.max(minimumBytes, 512) && isPowerOfTwo(preferredBytes), 'preferred block size: a power of 2 >= 512');
  assert(maximumBytes % minimumBytes === 0 && maximumBytes >= preferredBytes && maximumBytes <= 0xffffffff, 'maximum block size');
  const payload = Buffer.allocUnsafe(14);
  payload.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  payload.writeUInt32BE(minimumBytes, 2);
  payload.writeUInt32BE(preferredBytes, 6);
  payload.writeUInt32BE(maximumBytes, 10);
  return encodeOptionReply(option, NBD_REP_INFO, payload);
}

/** NBD_REP_META_CONTEXT: a context ID and the context's name. */
export function encodeMetaContextReply(option: number, contextId: number, name: string): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  assert(nameBytes.length <= stringBytesMax, 'context names are short');
  const payload = Buffer.allocUnsafe(4 + nameBytes.length);
  payload.writeUInt32BE(contextId >>> 0, 0);
  payload.set(nameBytes, 4);
  return encodeOptionReply(option, NBD_REP_META_CONTEXT, payload);
}

// ---- Encoders (server → client): transmission ----

/** Writes a simple reply header (magic, error, handle) into `target` at `at`; a READ's data follows it. */
export function writeSimpleReplyHeader(target: Buffer, at: number, error: number, handle: bigint): void {
  target.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, at);
  target.writeUInt32BE(error, at + 4);
  target.writeBigUInt64BE(handle, at + 8);
}

/** A simple reply without data: every success but a READ's, and every error without structured replies. */
export function encodeSimpleReply(error: number, handle: bigint): Buffer {
  const buffer = Buffer.allocUnsafe(simpleReplyHeaderBytes);
  writeSimpleReplyHeader(buffer, 0, error, handle);
  return buffer;
}

/** Writes a structured reply chunk header into `target` at `at`; `payloadBytes` bytes of payload follow it. */
export function writeStructuredHeader(target: Buffer, at: number, flags: number, type: number, handle: bigint, payloadBytes: number): void {
  target.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, at);
  target.writeUInt16BE(flags, at + 4);
  target.writeUInt16BE(type, at + 6);
  target.writeBigUInt64BE(handle, at + 8);
  target.writeUInt32BE(payloadBytes, at + 16);
}

/** NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: the success that carries nothing. */
export function encodeStructuredNone(handle: bigint): Buffer {
  const buffer = Buffer.allocUnsafe(structuredReplyHeaderBytes);
  writeStructuredHeader(buffer, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0);
  return buffer;
}

/**
 * Writes an OFFSET_DATA chunk's header (28 bytes) into `target` at `at`, for `dataBytes` bytes of data that
 * follow it in the same buffer: the server reads straight into that place and sends one buffer.
 */
export function writeOffsetDataHeader(target: Buffer, at: number, flags: number, handle: bigint, offsetBytes: number, dataBytes: number): void {
  assert(dataBytes >= 1 && dataBytes <= 0xffffffff - 8, 'OFFSET_DATA carries 1 to 2^32 - 9 bytes');
  assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, 'an offset inside an export');
  writeStructuredHeader(target, at, flags, NBD_REPLY_TYPE_OFFSET_DATA, handle, 8 + dataBytes);
  // Two 32-bit halves: this runs for every READ, and a BigInt per reply is measurable there.
  target.writeUInt32BE(Math.floor(offsetBytes / 2 ** 32), at + structuredReplyHeaderBytes);
  target.writeUInt32BE(offsetBytes >>> 0, at + structuredReplyHeaderBytes + 4);
}

/** An OFFSET_DATA chunk with its data copied in (the hot path uses writeOffsetDataHeader instead). */
export function encodeOffsetData(flags: number, handle: bigint, offsetBytes: number, data: Uint8Array): Buffer {
  const buffer = Buffer.allocUnsafe(offsetDataHeaderBytes + data.length);
  writeOffsetDataHeader(buffer, 0, flags, handle, offsetBytes, data.length);
  buffer.set(data, offsetDataHeaderBytes);
  return buffer;
}

/** An OFFSET_HOLE chunk: `holeBytes` bytes at `offsetBytes` read as zeroes. */
export function encodeOffsetHole(flags: number, handle: bigint, offsetBytes: number, holeBytes: number): Buffer {
  assert(holeBytes >= 1 && holeBytes <= 0xffffffff, 'a hole is 1 to 2^32 - 1 bytes');
  const buffer = Buffer.allocUnsafe(structuredReplyHeaderBytes + 12);
  writeStructuredHeader(buffer, 0, flags, NBD_REPLY_TYPE_OFFSET_HOLE, handle, 12);
  buffer.writeBigUInt64BE(BigInt(offsetBytes), structuredReplyHeaderBytes);
  buffer.writeUInt32BE(holeBytes, structuredReplyHeaderBytes + 8);
  return buffer;
}

export interface BlockDescriptor {
  lengthBytes: number;
  statusFlags: number;
}

/** A BLOCK_STATUS chunk: the context ID, then one (length, status) pair per descriptor. */
export function encodeBlockStatus(flags: number, handle: bigint, contextId: number, descriptors: readonly BlockDescriptor[]): Buffer {
  assert(descriptors.length >= 1, 'a BLOCK_STATUS chunk carries at least one descriptor');
  const payloadBytes = 4 + 8 * descriptors.length;
  const buffer = Buffer.allocUnsafe(structuredReplyHeaderBytes + payloadBytes);
  writeStructuredHeader(buffer, 0, flags, NBD_REPLY_TYPE_BLOCK_STATUS, handle, payloadBytes);
  buffer.writeUInt32BE(contextId >>> 0, structuredReplyHeaderBytes);
  let at = structuredReplyHeaderBytes + 4;
  for (const descriptor of descriptors) {
    assert(descriptor.lengthBytes >= 1 && descriptor.lengthBytes <= 0xffffffff, 'a descriptor is 1 to 2^32 - 1 bytes');
    buffer.writeUInt32BE(descriptor.lengthBytes, at);
    buffer.writeUInt32BE(descriptor.statusFlags >>> 0, at + 4);
    at += 8;
  }
  return buffer;
}

/** An ERROR chunk: a nonzero NBD error and a message for humans. */
export function encodeStructuredError(flags: number, handle: bigint, error: number, message: string): Buffer {
  assert(error !== 0, 'an error chunk carries a nonzero error');
  const messageBytes = encodeMessage(message);
  const buffer = Buffer.allocUnsafe(structuredReplyHeaderBytes + 6 + messageBytes.length);
  writeStructuredHeader(buffer, 0, flags, NBD_REPLY_TYPE_ERROR, handle, 6 + messageBytes.length);
  buffer.writeUInt32BE(error, structuredReplyHeaderBytes);
  buffer.writeUInt16BE(messageBytes.length, structuredReplyHeaderBytes + 4);
  buffer.set(messageBytes, structuredReplyHeaderBytes + 6);
  return buffer;
}

/** An ERROR_OFFSET chunk: an error at a given offset inside the request's range. */
export function encodeStructuredErrorOffset(flags: number, handle: bigint, error: number, message: string, offsetBytes: number): Buffer {
  assert(error !== 0, 'an error chunk carries a nonzero error');
  const messageBytes = encodeMessage(message);
  const payloadBytes = 6 + messageBytes.length + 8;
  const buffer = Buffer.allocUnsafe(structuredReplyHeaderBytes + payloadBytes);
  writeStructuredHeader(buffer, 0, flags, NBD_REPLY_TYPE_ERROR_OFFSET, handle, payloadBytes);
  buffer.writeUInt32BE(error, structuredReplyHeaderBytes);
  buffer.writeUInt16BE(messageBytes.length, structuredReplyHeaderBytes + 4);
  buffer.set(messageBytes, structuredReplyHeaderBytes + 6);
  buffer.writeBigUInt64BE(BigInt(offsetBytes), structuredReplyHeaderBytes + 6 + messageBytes.length);
  return buffer;
}

// ---- Helpers ----

/** Encodes a message as a protocol string: NUL replaced, cut to 4096 bytes on a character boundary. */
export function encodeMessage(message: string): Buffer {
  const bytes = Buffer.from(message.replaceAll('\0', ' '), 'utf8');
  if (bytes.length <= stringBytesMax) return bytes;
  let end = stringBytesMax;
  // Step back over UTF-8 continuation bytes (10xxxxxx) so the cut never splits a character.
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end -= 1;
  return bytes.subarray(0, end);
}

function encodeInfoString(option: number, infoType: number, text: string): Buffer {
  const textBytes = encodeMessage(text);
  const payload = Buffer.allocUnsafe(2 + textBytes.length);
  payload.writeUInt16BE(infoType, 0);
  payload.set(textBytes, 2);
  return encodeOptionReply(option, NBD_REP_INFO, payload);
}

function isPowerOfTwo(value: number): boolean {
  return Number.isInteger(value) && value > 0 && (value & (value - 1)) === 0;
}

/** A short name for a command, for log lines. */
export function commandName(type: number): string {
  return commandNames[type] ?? `NBD_CMD_${type}`;
}

const commandNames: Record<number, string> = {
  [NBD_CMD_READ]: 'READ',
  [NBD_CMD_WRITE]: 'WRITE',
  [NBD_CMD_DISC]: 'DISC',
  [NBD_CMD_FLUSH]: 'FLUSH',
  [NBD_CMD_TRIM]: 'TRIM',
  [NBD_CMD_CACHE]: 'CACHE',
  [NBD_CMD_WRITE_ZEROES]: 'WRITE_ZEROES',
  [NBD_CMD_BLOCK_STATUS]: 'BLOCK_STATUS',
};
