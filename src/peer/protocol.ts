// The peer protocol's codec: frames and the payloads of its verbs, pure (no socket, no timer), so that the
// server, the client and the fuzz test drive it alike. Everything a peer sends is checked here, once; the
// server and the client behind it assert.
//
// A connection is mutual TLS (server.ts, client.ts); inside it both sides send frames, all of one shape:
//
//   offset  size  field
//        0     4  magic 0x43484b50 ("CHKP"): a stream that is not ours is caught at the first frame
//        4     1  kind: 1 request, 2 reply, 3 error
//        5     1  flags: 0 (reserved for replication's streams, e.g. "more frames follow"; nonzero is refused)
//        6     2  verb: what a request asks (a reply and an error name the verb they answer)
//        8     4  request id: chosen by the requester, echoed by the answer; 0 in an error about the connection
//       12     4  payload bytes, then the payload
//
// The header is the same in every protocol version, so that two versions can always tell each other so. The
// first request on a connection must be hello, which negotiates the version: the requester says which versions
// it speaks (versionMin..versionMax), the answer names the highest both speak, or is an error (ENOTSUP) and the
// connection ends. Control verbs (hello, and replication's to come) carry a JSON object of at most
// limits.peerControlBytesMax bytes; bulk verbs (replication's data, later) carry bytes up to limits.peerFrameBytesMax.
// Both caps are checked at the header, before any payload is buffered, so a peer's frame costs bounded memory.
//
// What is malformed (magic, kind, flags, a payload over its cap, JSON that is not the object a verb needs) throws
// ChunkdError EPROTO: the receiver sends one error frame (request id 0) and closes. An unknown verb in a frame
// that is otherwise sound is answered with an error frame (ENOTSUP) and the connection goes on.
import { assert } from '../core/assert.ts';
import { ChunkdError, errorCodes, type ErrorCode } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { peerControlBytesMax, peerFrameBytesMax } from '../core/limits.ts';
import { InputQueue } from '../nbd/input-queue.ts';

export const peerFrameMagic = 0x43484b50;
export const frameHeaderBytes = 16;

/** Protocol versions this build speaks; hello settles on the highest both ends speak. */
export const peerVersionMin = 1;
export const peerVersionMax = 1;

export const FrameKind = { request: 1, reply: 2, error: 3 } as const;
export type FrameKind = (typeof FrameKind)[keyof typeof FrameKind];

/**
 * Verbs by number: never reuse a number. Replication's (replication/replica-server.ts serves them, their payloads
 * are in replication/peer-messages.ts): what a node holds of a volume, a stream into it (open, data, close), giving
 * up an interrupted one, removing replication snapshots the owner no longer needs, and a handoff's last step.
 */
export const PeerVerb = {
  hello: 1, replicaInfo: 2, receiveOpen: 3, receiveData: 4, receiveClose: 5, receiveAbort: 6, replicaPrune: 7, takeOwnership: 8,
  // Synchronous replicas (replication/sync-replicas.ts; payloads in replication/sync-messages.ts).
  syncOpen: 9, syncWrite: 10, syncFlush: 11, syncControl: 12, syncSums: 13, syncRead: 14, syncClose: 15,
  // The cluster's, numbered from 32 (apart from the synchronous replicas', which grow from 12): a new volume
  // placed on another node (cluster/remote-create.ts).
  volumeCreate: 32,
} as const;

/** Verbs whose payload is raw bytes up to peerFrameBytesMax; every other verb's is a JSON object up to peerControlBytesMax. */
const bulkVerbs: ReadonlySet<number> = new Set<number>([PeerVerb.receiveData, PeerVerb.syncWrite]);

/** Longest message an error frame carries; longer ones are cut, so an error never exceeds its own cap. */
const errorMessageCharsMax = 1024;

export interface FrameHeader {
  kind: FrameKind;
  verb: number;
  requestId: number;
  payloadBytes: number;
}

export interface Frame extends FrameHeader {
  /** A view of the received bytes: valid while the caller holds it (the input is never written again). */
  payload: Buffer;
}

export type Decoded<T> = { done: true; value: T; bytesConsumed: number } | { done: false; bytesNeeded: number };

/** The largest payload a frame of `verb` may carry. */
export function payloadBytesMaxFor(verb: number): number {
  return bulkVerbs.has(verb) ? peerFrameBytesMax : peerControlBytesMax;
}

/** Decodes and checks a frame header; throws EPROTO for anything malformed, before its payload is waited for. */
export function decodeFrameHeader(buffer: Buffer, offset: number): Decoded<FrameHeader> {
  if (buffer.length - offset < frameHeaderBytes) return { done: false, bytesNeeded: frameHeaderBytes };
  const magic = buffer.readUInt32BE(offset);
  if (magic !== peerFrameMagic) throw ChunkdError.protocol(`bad frame magic 0x${magic.toString(16).padStart(8, '0')} (not a chunkd peer)`);
  const kind = buffer.readUInt8(offset + 4);
  if (kind !== FrameKind.request && kind !== FrameKind.reply && kind !== FrameKind.error) throw ChunkdError.protocol(`unknown frame kind ${kind}`);
  const flags = buffer.readUInt8(offset + 5);
  if (flags !== 0) throw ChunkdError.protocol(`frame flags 0x${flags.toString(16)} are not defined`);
  const verb = buffer.readUInt16BE(offset + 6);
  const requestId = buffer.readUInt32BE(offset + 8);
  const payloadBytes = buffer.readUInt32BE(offset + 12);
  // An error frame is always a control frame, whatever verb it answers.
  const payloadMax = kind === FrameKind.error ? peerControlBytesMax : payloadBytesMaxFor(verb);
  if (payloadBytes > payloadMax) throw ChunkdError.protocol(`frame of verb ${verb} carries ${payloadBytes} bytes, more than the ${payloadMax} allowed`);
  return { done: true, value: { kind, verb, requestId, payloadBytes }, bytesConsumed: frameHeaderBytes };
}

/** Decodes a whole frame; `bytesNeeded` says how many bytes from `offset` it takes when they are not all there. */
export function decodeFrame(buffer: Buffer, offset: number): Decoded<Frame> {
  const header = decodeFrameHeader(buffer, offset);
  if (!header.done) return header;
  const totalBytes = frameHeaderBytes + header.value.payloadBytes;
  if (buffer.length - offset < totalBytes) return { done: false, bytesNeeded: totalBytes };
  const payload = buffer.subarray(offset + frameHeaderBytes, offset + totalBytes);
  return { done: true, value: { ...header.value, payload }, bytesConsumed: totalBytes };
}

/** A frame as buffers to write in order (the payload is not copied). */
export function encodeFrame(kind: FrameKind, verb: number, requestId: number, payload: Buffer): Buffer[] {
  const header = encodeFrameHeader(kind, verb, requestId, payload.length);
  return payload.length === 0 ? [header] : [header, payload];
}

/** The header of a frame whose payload of `payloadBytes` the caller writes after it. */
export function encodeFrameHeader(kind: FrameKind, verb: number, requestId: number, payloadBytes: number): Buffer {
  assert(Number.isInteger(verb) && verb >= 0 && verb <= 0xffff, 'encodeFrame: a 16-bit verb');
  assert(Number.isInteger(requestId) && requestId >= 0 && requestId <= 0xffffffff, 'encodeFrame: a 32-bit request id');
  assert(payloadBytes <= (kind === FrameKind.error ? peerControlBytesMax : payloadBytesMaxFor(verb)), 'encodeFrame: payload within its cap');
  // From Node's pool (every byte is written below): a buffer of its own per frame cost a microsecond or more.
  const header = Buffer.allocUnsafe(frameHeaderBytes);
  header.writeUInt32BE(peerFrameMagic, 0);
  header.writeUInt8(kind, 4);
  header.writeUInt8(0, 5);
  header.writeUInt16BE(verb, 6);
  header.writeUInt32BE(requestId, 8);
  header.writeUInt32BE(payloadBytes, 12);
  return header;
}

/** A control frame whose payload is `value` as JSON. */
export function encodeJsonFrame(kind: FrameKind, verb: number, requestId: number, value: object): Buffer[] {
  return encodeFrame(kind, verb, requestId, Buffer.from(JSON.stringify(value), 'utf8'));
}

export interface PeerErrorPayload {
  code: ErrorCode;
  message: string;
}

/** An error frame answering `verb`/`requestId` (0/0: about the connection itself). */
export function encodeErrorFrame(verb: number, requestId: number, error: ChunkdError): Buffer[] {
  const message = error.message.length > errorMessageCharsMax ? `${error.message.slice(0, errorMessageCharsMax)}...` : error.message;
  return encodeJsonFrame(FrameKind.error, verb, requestId, { code: error.code, message } satisfies PeerErrorPayload);
}

/** The error an error frame carries; an unknown code is kept as EIO, so a newer peer's codes still read. */
export function parseErrorPayload(payload: Buffer): ChunkdError {
  const value = parseJsonObject(payload, 'error');
  if (typeof value.message !== 'string') throw ChunkdError.protocol('error frame without a message');
  const message = value.message.slice(0, errorMessageCharsMax);
  const code = typeof value.code === 'string' && value.code in errorCodes ? (value.code as ErrorCode) : 'EIO';
  return new ChunkdError(code, message);
}

export interface HelloRequest {
  versionMin: number;
  versionMax: number;
}

export interface HelloReply {
  /** The version both ends speak from now on. */
  version: number;
  /** The answering node's name (its certificate's CN). */
  name: string;
  /** The answering program and its version, e.g. "chunkd 0.1.0" (for people; nothing depends on it). */
  software: string;
  /** The answering node's pool (a UUID, stable for the pool's life). */
  poolId: string;
}

/** A hello request's payload: the versions this build speaks, unless told otherwise (tests). */
export function helloRequestPayload(request: HelloRequest = { versionMin: peerVersionMin, versionMax: peerVersionMax }): Buffer {
  return Buffer.from(JSON.stringify(request), 'utf8');
}

export function encodeHelloRequest(requestId: number, request?: HelloRequest): Buffer[] {
  return encodeFrame(FrameKind.request, PeerVerb.hello, requestId, helloRequestPayload(request));
}

export function encodeHelloReply(requestId: number, reply: HelloReply): Buffer[] {
  return encodeJsonFrame(FrameKind.reply, PeerVerb.hello, requestId, reply);
}

/** Checks a hello request; fields this version does not know are ignored (a newer peer may send more). */
export function parseHelloRequest(payload: Buffer): HelloRequest {
  const value = parseJsonObject(payload, 'hello');
  const versionMin = value.versionMin;
  const versionMax = value.versionMax;
  if (!isVersion(versionMin) || !isVersion(versionMax) || versionMin > versionMax) {
    throw ChunkdError.protocol('hello needs versionMin and versionMax, whole numbers from 1 to 65535 with versionMin <= versionMax');
  }
  return { versionMin, versionMax };
}

export function parseHelloReply(payload: Buffer): HelloReply {
  const value = parseJsonObject(payload, 'hello reply');
  if (!isVersion(value.version)) throw ChunkdError.protocol('hello reply without a version');
  if (typeof value.name !== 'string' || checkName(value.name, 'node') !== null) throw ChunkdError.protocol('hello reply without a valid node name');
  if (typeof value.software !== 'string' || value.software.length > 256) throw ChunkdError.protocol('hello reply without a software string');
  if (typeof value.poolId !== 'string' || !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(value.poolId)) {
    throw ChunkdError.protocol('hello reply without a pool id (a UUID)');
  }
  return { version: value.version, name: value.name, software: value.software, poolId: value.poolId };
}

/** The highest version in both ranges, or null when they do not meet. */
export function negotiateVersion(request: HelloRequest, ours: HelloRequest = { versionMin: peerVersionMin, versionMax: peerVersionMax }): number | null {
  const version = Math.min(request.versionMax, ours.versionMax);
  return version >= Math.max(request.versionMin, ours.versionMin) ? version : null;
}

function isVersion(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value >= 1 && value <= 0xffff;
}

export function parseJsonObject(payload: Buffer, what: string): Record<string, unknown> {
  let value: unknown;
  try {
    // fatal: bytes that are not UTF-8 are malformed, not replaced.
    value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload));
  } catch {
    throw ChunkdError.protocol(`${what} payload is not JSON`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw ChunkdError.protocol(`${what} payload is not a JSON object`);
  return value as Record<string, unknown>;
}

/**
 * Frames out of a byte stream as it arrives: push what the socket delivers, take whole frames with next(). It
 * holds at most one frame's bytes beyond what was pushed in one go, since each header is checked before its
 * payload is waited for.
 *
 * A socket whose reads can be steered (peer/server.ts: steered-socket.ts's steerTlsReads) asks nextReadBuffer where
 * each read lands and reports it with onRead, instead of pushing chunks: the reads fill an arena a window at a
 * time, queued as views (the arena is never written twice, so a view stays valid), and once a bulk request's
 * header is taken, the rest of its payload is read straight into the buffer `bulkPayload` gave (on a node, plain
 * memory reused from frame to frame: replica-server.ts), so that TLS decrypts into it and nothing copies it again. Through 'data'
 * events each TLS record (16 KiB at most) was a buffer of its own, an event, and a copy to gather the frame: about
 * 65,000 of each per GiB a replica receives.
 */
export class FrameReader {
  readonly #input = new InputQueue();
  /** Where a bulk verb's payload is gathered, or null to gather it like any other (see the constructor). */
  readonly #bulkPayload: ((size: number) => Buffer) | null;
  /** A bulk request whose header is taken and whose payload is arriving in its own buffer. */
  #bulk: { header: FrameHeader; payload: Buffer; filled: number } | null = null;
  /** The part of #bulk's payload the next steered read lands in, when it was pointed there. */
  #steeredView: Buffer | null = null;
  /** Where steered reads land otherwise; a new arena is started when less than a window is left. */
  #arena: Buffer | null = null;
  #arenaUsed = 0;

  /**
   * `bulkPayload`, when given, makes the buffer every bulk verb's payload is gathered into, always one copy: a
   * node passes buffers it reuses (replica-server.ts's bulkPayload: plain memory, since a payload's writes are
   * made inline, up to limits.inlineWriteBytesMax; a larger one is staged by a chunk I/O worker, store/worker-io.ts).
   */
  constructor(options: { bulkPayload?: (size: number) => Buffer } = {}) {
    this.#bulkPayload = options.bulkPayload ?? null;
  }

  push(chunk: Buffer): void {
    this.#input.push(chunk);
  }

  /** Where the next steered socket read lands: the rest of a bulk payload being received, or the arena. */
  nextReadBuffer(): Buffer {
    const bulk = this.#bulk;
    if (bulk !== null && this.#input.length === 0 && bulk.filled < bulk.payload.length) {
      this.#steeredView = bulk.payload.subarray(bulk.filled);
      return this.#steeredView;
    }
    this.#steeredView = null;
    if (this.#arena === null || this.#arena.length - this.#arenaUsed < steeredReadWindowBytes) {
      this.#arena = Buffer.allocUnsafeSlow(steeredReadArenaBytes);
      this.#arenaUsed = 0;
    }
    return this.#arena.subarray(this.#arenaUsed, this.#arenaUsed + steeredReadWindowBytes);
  }

  /** `count` bytes of a steered read arrived at the start of `buffer`, the one nextReadBuffer returned last. */
  onRead(count: number, buffer: Buffer): void {
    if (buffer === this.#steeredView) {
      this.#steeredView = null;
      this.#bulk!.filled += count;
      return;
    }
    this.#arenaUsed += count;
    this.#input.push(buffer.subarray(0, count));
  }

  /** Bytes received and not yet taken as frames. */
  get bufferedBytes(): number {
    return this.#input.length;
  }

  /** The next whole frame, or null until its bytes are all here; throws EPROTO for a malformed one. */
  next(): Frame | null {
    if (this.#bulk !== null) return this.#takeBulk();
    const head = this.#input.contiguous(frameHeaderBytes);
    if (head === null) return null;
    const header = decodeFrameHeader(head.buffer, head.offset);
    assert(header.done, 'a whole header decodes');
    if (this.#bulkPayload !== null && header.value.kind === FrameKind.request && bulkVerbs.has(header.value.verb)) {
      this.#input.skip(frameHeaderBytes);
      this.#bulk = { header: header.value, payload: this.#bulkPayload(header.value.payloadBytes), filled: 0 };
      return this.#takeBulk();
    }
    const whole = this.#input.contiguous(frameHeaderBytes + header.value.payloadBytes);
    if (whole === null) return null;
    const frame = decodeFrame(whole.buffer, whole.offset);
    assert(frame.done, 'a whole frame decodes');
    this.#input.skip(frame.bytesConsumed);
    return frame.value;
  }

  /** Moves what is queued of the bulk payload into its buffer; the frame once the payload is whole. */
  #takeBulk(): Frame | null {
    const bulk = this.#bulk!;
    const count = Math.min(this.#input.length, bulk.payload.length - bulk.filled);
    this.#input.takeInto(bulk.payload, bulk.filled, count);
    bulk.filled += count;
    if (bulk.filled < bulk.payload.length) return null;
    this.#bulk = null;
    return { ...bulk.header, payload: bulk.payload };
  }
}

/** Bytes one steered read may bring into the arena, and the arena's size (as the NBD receiver's: nbd/receiver.ts). */
const steeredReadWindowBytes = 64 * 1024;
const steeredReadArenaBytes = 256 * 1024;
