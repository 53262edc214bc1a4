// What each NBD command means: a validated request (validate.ts) and its payload become calls on the session's
// device and, once they finish, a reply. Nothing here knows sockets, buffering or the connection's life, as
// nbdkit's protocol.c knows nothing of its backends' insides: the connection (connection.ts) takes a request
// from the receiver (receiver.ts), runs it here, and writes what comes back.
//
// The request path, by file: socket → receiver.ts (bytes to requests and payloads) → protocol.ts (the codec) →
// validate.ts (once, at the edge) → commands.ts (what the command means) → the device (core/block-device.ts).
//
// Hot path: one promise per request, the device's own where there is one, and none for a READ of cached data; a
// READ reply is one buffer, header and data, that device.read fills in place behind a header written once the data
// is in.
import { AssertionError } from 'node:assert';
import { doneNow } from '../core/block-device.ts';
import { ChunkdError } from '../core/errors.ts';
import { rangeRequestBytesMax } from '../core/limits.ts';
import { blockDescriptors } from './extents.ts';
import type { Session } from './handshake.ts';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL,
  NBD_ENOTSUP, NBD_EOVERFLOW, NBD_REPLY_FLAG_DONE, commandName, encodeBlockStatus, encodeSimpleReply,
  encodeStructuredError, encodeStructuredNone, offsetDataHeaderBytes, simpleReplyHeaderBytes, writeOffsetDataHeader,
  writeSimpleReplyHeader,
} from './protocol.ts';
import type { NbdRequest } from './protocol.ts';
import { splitRange } from './validate.ts';

/** Where READ replies come from; a reply goes back once the socket has written it. */
export interface ReplyBuffers {
  acquire(size: number): Buffer;
  release(buffer: Buffer): void;
}

/**
 * Runs a validated request (never NBD_CMD_DISC) on the session's device; `payload` is a WRITE's whole payload,
 * else null. The promise gives a Buffer when that is the whole reply (READ, from `replyBuffers`, and
 * BLOCK_STATUS), anything else when the reply is successReply(request); it fails with the request's error.
 * A READ the device finished before it returned (block-device.ts's doneNow: every byte in the page cache,
 * verified) gives its reply itself, a Buffer rather than a promise, so that the caller can write it at once.
 */
export function runCommand(session: Session, request: NbdRequest, payload: Buffer | null, replyBuffers: ReplyBuffers): Promise<unknown> | Buffer {
  const device = session.device;
  const { type, flags, offsetBytes, lengthBytes } = request;
  switch (type) {
    case NBD_CMD_READ:
      return read(session, request, replyBuffers);
    case NBD_CMD_WRITE:
      return lengthBytes === 0 ? Promise.resolve() : device.write(offsetBytes, payload!, (flags & NBD_CMD_FLAG_FUA) !== 0 ? { fua: true } : undefined);
    case NBD_CMD_FLUSH:
      return device.flush();
    case NBD_CMD_TRIM: {
      const fua = (flags & NBD_CMD_FLAG_FUA) !== 0 ? { fua: true } : undefined;
      return Promise.all(splitRange(offsetBytes, lengthBytes).map((piece) => device.trim(piece.offsetBytes, piece.lengthBytes, fua)));
    }
    case NBD_CMD_WRITE_ZEROES:
      return writeZeroes(session, request);
    case NBD_CMD_CACHE:
      // The device has no cache verb; the range was validated, and the spec lets CACHE do nothing.
      return Promise.resolve();
    case NBD_CMD_BLOCK_STATUS:
      return blockStatus(session, request);
    default:
      throw new AssertionError({ message: `validated request of unknown type ${type}` });
  }
}

/** Bytes of payload or reply data a request holds while in flight: what flow control counts. */
export function requestCostBytes(request: NbdRequest): number {
  return request.type === NBD_CMD_READ || request.type === NBD_CMD_WRITE ? request.lengthBytes : 0;
}

/** The reply to a request that succeeded without data of its own. */
export function successReply(request: NbdRequest): Buffer {
  return encodeSimpleReply(0, request.handle);
}

/** The reply to a request that failed with `error` (a ChunkdError from the device). */
export function failureReply(session: Session, request: NbdRequest, error: ChunkdError): Buffer {
  return errorReply(session, request, nbdErrorFor(request, error), error.message);
}

/** The reply to a request validateRequest refused with NBD error `nbdError`. */
export function refusalReply(session: Session, request: NbdRequest, nbdError: number): Buffer {
  const message = `invalid ${commandName(request.type)} request (offset ${request.offsetBytes}, length ${request.lengthBytes}, flags 0x${request.flags.toString(16)})`;
  return errorReply(session, request, nbdError, message);
}

/** Names a request in log lines and error messages. */
export function describeRequest(request: NbdRequest): string {
  return `${commandName(request.type)} offset ${request.offsetBytes} length ${request.lengthBytes}`;
}

function errorReply(session: Session, request: NbdRequest, nbdError: number, message: string): Buffer {
  // With structured replies an error goes in an ERROR chunk, which carries a message (spec: SHOULD prefer);
  // a READ must use one then.
  return session.structuredReplies
    ? encodeStructuredError(NBD_REPLY_FLAG_DONE, request.handle, nbdError, message)
    : encodeSimpleReply(nbdError, request.handle);
}

/** The NBD error for a failed request: by the error's code, ENOTSUP and EOVERFLOW only where the spec allows them. */
function nbdErrorFor(request: NbdRequest, error: ChunkdError): number {
  const number = error.nbdError;
  if (number === NBD_ENOTSUP && (request.flags & NBD_CMD_FLAG_FAST_ZERO) === 0) return NBD_EINVAL;
  if (number === NBD_EOVERFLOW && (request.flags & NBD_CMD_FLAG_DF) === 0) return NBD_EINVAL;
  return number;
}

/**
 * Reads into the reply buffer itself, behind the header that is written once the data is in: the reply at once
 * when the device finished before it returned (doneNow), else a promise of it.
 */
function read(session: Session, request: NbdRequest, replyBuffers: ReplyBuffers): Promise<Buffer> | Buffer {
  const { handle, offsetBytes, lengthBytes } = request;
  const structured = session.structuredReplies;
  if (lengthBytes === 0) return Promise.resolve(structured ? encodeStructuredNone(handle) : encodeSimpleReply(0, handle));
  // One content chunk always, so NBD_CMD_FLAG_DF is honoured as it is (requestBytesMax is far below 2^32).
  const headerBytes = structured ? offsetDataHeaderBytes : simpleReplyHeaderBytes;
  const reply = replyBuffers.acquire(headerBytes + lengthBytes);
  const reading = session.device.read(offsetBytes, reply.subarray(headerBytes));
  if (reading === doneNow) return withReadHeader(reply, structured, handle, offsetBytes, lengthBytes);
  return reading.then(
    () => withReadHeader(reply, structured, handle, offsetBytes, lengthBytes),
    (error: unknown) => {
      replyBuffers.release(reply);
      throw error;
    },
  );
}

function withReadHeader(reply: Buffer, structured: boolean, handle: bigint, offsetBytes: number, lengthBytes: number): Buffer {
  if (structured) writeOffsetDataHeader(reply, 0, NBD_REPLY_FLAG_DONE, handle, offsetBytes, lengthBytes);
  else writeSimpleReplyHeader(reply, 0, 0, handle);
  return reply;
}

function writeZeroes(session: Session, request: NbdRequest): Promise<unknown> {
  const { flags, offsetBytes, lengthBytes } = request;
  const noHole = (flags & NBD_CMD_FLAG_NO_HOLE) !== 0;
  // Zeroing without NO_HOLE gives the range back (as fast as a trim); with NO_HOLE the store writes zeroes,
  // which is no faster than a WRITE, so a FAST_ZERO request must fail at once (spec).
  if (noHole && (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0) {
    return Promise.reject(new ChunkdError('ENOTSUP', 'WRITE_ZEROES with NO_HOLE is not faster than a write'));
  }
  const options = { fua: (flags & NBD_CMD_FLAG_FUA) !== 0, noHole };
  const device = session.device;
  return Promise.all(splitRange(offsetBytes, lengthBytes).map((piece) => device.writeZeroes(piece.offsetBytes, piece.lengthBytes, options)));
}

function blockStatus(session: Session, request: NbdRequest): Promise<Buffer> {
  const { flags, handle, offsetBytes } = request;
  // The requested length is a hint (spec): ask the device for no more than a range request may cover.
  const queriedBytes = Math.min(request.lengthBytes, rangeRequestBytesMax);
  const requestOne = (flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
  const contextId = session.metaContextId;
  return session.device.blockStatus(offsetBytes, queriedBytes).then((extents) =>
    encodeBlockStatus(NBD_REPLY_FLAG_DONE, handle, contextId, blockDescriptors(extents, queriedBytes, requestOne)));
}
