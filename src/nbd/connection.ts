// One NBD client connection: the handshake (handshake.ts), then the transmission phase.
//
// Transmission: requests are decoded as bytes arrive and go to the device at once, in order of arrival (the
// device serializes overlapping ranges); each reply is written whole when its request finishes, so replies go
// out of order but never interleave. Replies written in one turn of the event loop leave in one writev
// (cork until setImmediate). A READ reply is one buffer, header and data, that device.read fills in place.
//
// Receiving: the socket's reads land in a large arena buffer, a window at a time, and what they hold is queued as
// views (input-queue.ts), except a WRITE payload larger than a window: it is read straight into the buffer the
// device writes from (steered-socket.ts), so the kernel's copy out of the socket is its only copy.
//
// Flow control: past requestsInFlightPerConnectionMax requests or bytesInFlightPerConnectionMax bytes in flight
// (or that many reply bytes the client has not read yet) the socket is paused, and resumed when a request
// finishes. A WRITE payload counts from its header on, as it is buffered.
//
// Ending, in every case: reading stops, in-flight device operations finish (their replies are dropped if the
// socket is gone), the socket closes, then the device is closed exactly once and `done` resolves.
//   NBD_CMD_DISC, client EOF, server shutdown: finish in-flight requests, send their replies, then end.
//   Malformed stream, handshake timeout, socket error: destroy the socket at once.
// Errors follow core/fail-stop.ts: a device's ChunkdError or system error is that request's error reply, a
// malformed stream closes this connection, and anything else is a bug that stops the node.
import { AssertionError } from 'node:assert';
import type { Socket } from 'node:net';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
import type { BlockDevice } from '../core/block-device.ts';
import type { DeviceProvider } from '../core/block-device.ts';
import {
  bytesInFlightPerConnectionMax, connectionCloseGraceMs, optionBytesMax, rangeRequestBytesMax,
  requestsInFlightPerConnectionMax,
} from '../core/limits.ts';
import type { SharedBufferPool } from '../core/shared-buffers.ts';
import { BufferPool } from './buffer-pool.ts';
import { blockDescriptors } from './extents.ts';
import { Handshake } from './handshake.ts';
import type { Session } from './handshake.ts';
import { InputQueue } from './input-queue.ts';
import { steerReads } from './steered-socket.ts';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_REPLY_FLAG_DONE, commandName,
  decodeRequest, encodeBlockStatus, encodeGreeting, encodeSimpleReply, encodeStructuredError, encodeStructuredNone,
  offsetDataHeaderBytes, optionHeaderBytes, requestHeaderBytes, simpleReplyHeaderBytes, writeOffsetDataHeader,
  writeSimpleReplyHeader,
} from './protocol.ts';
import type { NbdRequest } from './protocol.ts';
import { splitRange, validateRequest } from './validate.ts';
import type { ValidationContext } from './validate.ts';

/** Counters the server shares with its connections. */
export interface RequestCounters {
  requestsTotal: number;
  requestErrorsTotal: number;
}

export interface ConnectionOptions {
  provider: DeviceProvider;
  log: (line: string) => void;
  counters: RequestCounters;
  handshakeTimeoutMs: number;
  /** Names the connection in log lines. */
  label: string;
  /**
   * Shared-memory buffers for WRITE payloads and READ replies, when chunk I/O runs on worker threads: every
   * payload is then gathered into one (the copy out of the socket's chunks is the one copy it takes), and every
   * reply is read into one in place. Null: Node's buffers, payloads as views of socket chunks where they fit.
   */
  sharedBuffers?: SharedBufferPool | null;
}

/** What the connection needs of a buffer pool. */
interface Buffers {
  acquire(size: number): Buffer;
  release(buffer: Buffer): void;
}

/** Bytes one socket read may bring into the arena: what Node's own reads take. */
const readWindowBytes = 64 * 1024;
/**
 * Socket reads fill an arena a window at a time; a new one is started when less than a window is left. An idle
 * connection holds its arena, so it is kept small; the handshake's messages are smaller still.
 */
const readArenaBytes = 256 * 1024;
const handshakeReadBytes = 4 * 1024;
/** A WRITE payload larger than this is read from the socket straight into its own buffer. */
const steeredPayloadBytesMin = readWindowBytes + 1;

/** Input buffered during the handshake before the socket is paused: two maximal options. */
const handshakeInputBytesMax = 2 * (optionHeaderBytes + optionBytesMax);

export class NbdConnection {
  /** Resolves when the socket is closed, every device operation has finished and the device is closed. */
  readonly done: Promise<void>;
  readonly #resolveDone: () => void;
  readonly #socket: Socket;
  readonly #options: ConnectionOptions;
  readonly #input = new InputQueue();
  readonly #payloadBuffers: Buffers;
  /** Payloads always go into #payloadBuffers (shared memory for the workers), never stay views of socket chunks. */
  readonly #copyPayloads: boolean;
  /** Large READ replies, reused once the socket has written them. */
  readonly #replyBuffers: Buffers;
  readonly #handshake: Handshake;
  #phase: 'handshake' | 'transmission' = 'handshake';
  #session: Session | null = null;
  #validation: ValidationContext | null = null;
  #handshakeBusy = false;
  #handshakeTimer: NodeJS.Timeout | null;
  #graceTimer: NodeJS.Timeout | null = null;

  /** The client sent EOF: nothing more will arrive. */
  #inputEnded = false;
  /** No more requests are taken (DISC, shutdown, protocol error); data that still arrives is ignored. */
  #readingStopped = false;
  /** End the socket as soon as nothing is in flight. */
  #endWhenIdle = false;
  #ending = false;
  #socketClosed = false;
  #released = false;
  #paused = false;
  #parsing = false;
  #corked = false;

  /** A WRITE whose header was decoded and whose payload is still arriving. */
  #pendingWrite: NbdRequest | null = null;
  /** A large pending WRITE's own buffer, and how much of its payload is in it. */
  #payload: Buffer | null = null;
  #payloadFilled = 0;
  /** The part of #payload the next socket read lands in, when it was steered there. */
  #steeredView: Buffer | null = null;
  /**
   * Where socket reads land otherwise: never written twice, so the views queued from it stay valid; a new arena
   * is started when little is left.
   */
  #arena = Buffer.allocUnsafeSlow(handshakeReadBytes);
  #arenaUsed = 0;
  /** Bytes of a refused WRITE's payload still to be read and thrown away. */
  #discardBytes = 0;
  #inFlightCount = 0;
  #inFlightBytes = 0;

  /** `accepted`: a socket that has read nothing yet (the server accepts with pauseOnConnect). */
  constructor(accepted: Socket, options: ConnectionOptions) {
    this.#options = options;
    const shared = options.sharedBuffers ?? null;
    this.#payloadBuffers = shared ?? new BufferPool(bytesInFlightPerConnectionMax);
    this.#replyBuffers = shared ?? new BufferPool(bytesInFlightPerConnectionMax);
    this.#copyPayloads = shared !== null;
    this.#handshake = new Handshake(options.provider);
    const { promise, resolve } = Promise.withResolvers<void>();
    this.done = promise;
    this.#resolveDone = resolve;
    const steered = steerReads(accepted, { nextReadBuffer: () => this.#nextReadBuffer(), onRead: (count, buffer) => this.#onRead(count, buffer) }, { allowHalfOpen: true });
    const socket = steered ?? accepted;
    this.#socket = socket;
    if (steered === null) {
      socket.on('data', (chunk: Buffer) => this.#onData(chunk));
      socket.resume();
    }
    socket.on('end', () => this.#onEnd());
    socket.on('drain', () => this.#maybeResume());
    socket.on('error', (error: NodeJS.ErrnoException) => {
      // A client that hangs up without waiting for its last replies is ordinary; anything else is worth a line.
      if (error.code !== 'EPIPE' && error.code !== 'ECONNRESET') this.#log(`socket error: ${error.message}`);
    });
    socket.on('close', () => this.#onClose());
    this.#handshakeTimer = setTimeout(() => {
      this.#log(`handshake not finished within ${options.handshakeTimeoutMs} ms: closing`);
      socket.destroy();
    }, options.handshakeTimeoutMs);
    this.#handshakeTimer.unref();
    this.#send(encodeGreeting());
  }

  /** Handshake or transmission. */
  get phase(): 'handshake' | 'transmission' {
    return this.#phase;
  }

  /** Stops taking requests; in-flight ones finish and get their replies, then the connection closes. */
  shutdown(): void {
    if (this.#phase === 'handshake') {
      this.#socket.destroy();
      return;
    }
    this.#stopReading();
    this.#endWhenIdle = true;
    this.#maybeEnd();
  }

  /** Where the next socket read lands: the rest of a large WRITE's payload, or the arena. */
  #nextReadBuffer(): Buffer {
    if (this.#payload !== null && this.#input.length === 0 && !this.#readingStopped) {
      this.#steeredView = this.#payload.subarray(this.#payloadFilled);
      return this.#steeredView;
    }
    this.#steeredView = null;
    const handshake = this.#phase === 'handshake';
    const window = handshake ? handshakeReadBytes : readWindowBytes;
    if (this.#arena.length - this.#arenaUsed < window) {
      this.#arena = Buffer.allocUnsafeSlow(handshake ? handshakeReadBytes : readArenaBytes);
      this.#arenaUsed = 0;
    }
    return this.#arena.subarray(this.#arenaUsed, this.#arenaUsed + window);
  }

  #onRead(count: number, buffer: Buffer): void {
    if (buffer === this.#steeredView) {
      this.#steeredView = null;
      this.#payloadFilled += count;
      if (!this.#readingStopped) this.#parseRequests();
      return;
    }
    this.#arenaUsed += count;
    this.#onData(buffer.subarray(0, count));
  }

  #onData(chunk: Buffer): void {
    if (this.#readingStopped) return;
    this.#input.push(chunk);
    if (this.#phase === 'transmission') {
      this.#parseRequests();
      return;
    }
    if (this.#input.length > handshakeInputBytesMax) this.#pause();
    void this.#runHandshake();
  }

  #onEnd(): void {
    this.#inputEnded = true;
    this.#maybeEnd();
  }

  #onClose(): void {
    this.#socketClosed = true;
    this.#readingStopped = true;
    this.#pendingWrite = null;
    this.#input.clear();
    // Only now, with the socket closed, can no read land in it any more.
    if (this.#payload !== null) this.#payloadBuffers.release(this.#payload);
    this.#payload = null;
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    if (this.#graceTimer !== null) clearTimeout(this.#graceTimer);
    this.#maybeRelease();
  }

  // ---- Handshake ----

  async #runHandshake(): Promise<void> {
    if (this.#handshakeBusy) return;
    this.#handshakeBusy = true;
    try {
      while (!this.#socketClosed && this.#phase === 'handshake') {
        const step = await this.#handshake.next(this.#input);
        if (step.kind === 'need-more') break;
        if (step.kind === 'close') {
          this.#log(`closing: ${step.reason}`);
          this.#socket.destroy();
          break;
        }
        for (const buffer of step.output) this.#send(buffer);
        if (step.kind === 'abort') {
          this.#stopReading();
          this.#endWhenIdle = true;
          break;
        }
        if (step.kind === 'transmission') {
          this.#enterTransmission(step.session);
        }
      }
    } catch (error) {
      this.#log(`closing during handshake: ${expectedError(error, 'the NBD handshake').message}`);
      this.#socket.destroy();
    } finally {
      this.#handshakeBusy = false;
    }
    if (this.#phase === 'transmission') this.#parseRequests(); // requests sent right behind the GO
    this.#maybeResume();
    this.#maybeEnd();
    this.#maybeRelease();
  }

  #enterTransmission(session: Session): void {
    // Set even if the socket is gone by now: #maybeRelease then closes the device.
    this.#session = session;
    this.#phase = 'transmission';
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    this.#validation = {
      sizeBytes: session.device.sizeBytes,
      readOnly: session.device.readOnly,
      structuredReplies: session.structuredReplies,
      metaContextId: session.metaContextId,
    };
  }

  // ---- Transmission: reading requests ----

  #parseRequests(): void {
    if (this.#parsing || this.#session === null) return;
    this.#parsing = true;
    try {
      while (!this.#readingStopped) {
        if (this.#discardBytes > 0) {
          this.#discardBytes -= this.#input.skip(this.#discardBytes);
          if (this.#discardBytes > 0) break;
          continue;
        }
        const pending = this.#pendingWrite;
        if (pending !== null && pending.lengthBytes >= steeredPayloadBytesMin) {
          if (!this.#receivePayload(pending.lengthBytes)) break;
          const payload = this.#payload!;
          this.#payload = null;
          this.#pendingWrite = null;
          this.#execute(pending, payload, payload);
          continue;
        }
        if (pending !== null) {
          if (this.#input.length < pending.lengthBytes) break;
          this.#pendingWrite = null;
          const payload = this.#input.take(pending.lengthBytes, this.#payloadBuffers.acquire, this.#copyPayloads);
          this.#execute(pending, payload, this.#input.gathered ? payload : null);
          continue;
        }
        if (this.#atLimit()) {
          this.#pause();
          break;
        }
        const view = this.#input.contiguous(requestHeaderBytes);
        if (view === null) break;
        const decoded = decodeRequest(view.buffer, view.offset);
        assert(decoded.done, 'a whole request header decodes');
        this.#input.skip(decoded.bytesConsumed);
        this.#accept(decoded.value);
      }
    } catch (error) {
      this.#log(`closing: ${expectedError(error, 'reading NBD requests').message}`);
      this.#stopReading();
      this.#socket.destroy();
    } finally {
      this.#parsing = false;
    }
  }

  /**
   * Moves what is queued of a large WRITE's payload into its own buffer (taken now, if this is the first of it);
   * the socket's next reads then land in the buffer itself. Whether the payload is whole.
   */
  #receivePayload(lengthBytes: number): boolean {
    this.#payload ??= this.#payloadBuffers.acquire(lengthBytes);
    const count = Math.min(this.#input.length, lengthBytes - this.#payloadFilled);
    this.#input.takeInto(this.#payload, this.#payloadFilled, count);
    this.#payloadFilled += count;
    if (this.#payloadFilled < lengthBytes) return false;
    this.#payloadFilled = 0;
    return true;
  }

  /** Takes one decoded request: validates it, then runs it, waits for its payload, or answers an error. */
  #accept(request: NbdRequest): void {
    if (request.type === NBD_CMD_DISC) {
      this.#stopReading();
      this.#endWhenIdle = true;
      this.#maybeEnd();
      return;
    }
    this.#options.counters.requestsTotal += 1;
    const validation = this.#validation!;
    validation.sizeBytes = this.#session!.device.sizeBytes;
    const error = validateRequest(request, validation);
    if (error !== 0) {
      this.#replyError(request, error, `invalid ${commandName(request.type)} request (offset ${request.offsetBytes}, length ${request.lengthBytes}, flags 0x${request.flags.toString(16)})`);
      // The payload of a refused WRITE is still on the wire: read past it, a chunk at a time.
      if (request.type === NBD_CMD_WRITE) this.#discardBytes = request.lengthBytes;
      return;
    }
    if (request.type === NBD_CMD_WRITE && request.lengthBytes > 0) {
      this.#pendingWrite = request;
      return;
    }
    this.#execute(request, null);
  }

  #atLimit(): boolean {
    return this.#inFlightCount >= requestsInFlightPerConnectionMax ||
      this.#inFlightBytes >= bytesInFlightPerConnectionMax ||
      this.#socket.writableLength >= bytesInFlightPerConnectionMax;
  }

  #pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#socket.pause();
  }

  #maybeResume(): void {
    if (!this.#paused || this.#readingStopped || this.#handshakeBusy || this.#atLimit()) return;
    this.#paused = false;
    this.#socket.resume();
    if (this.#phase === 'transmission') this.#parseRequests();
  }

  #stopReading(): void {
    this.#readingStopped = true;
    this.#pendingWrite = null; // a payload buffer being filled is given back when the socket closes
    this.#discardBytes = 0;
    this.#input.clear();
    this.#socket.pause();
  }

  // ---- Transmission: running requests ----

  /** Runs a request; `pooled` is a gathered payload buffer to give back to the pool once the device is done with it. */
  #execute(request: NbdRequest, payload: Buffer | null, pooled: Buffer | null = null): void {
    const device = this.#session!.device;
    const { type, flags, offsetBytes, lengthBytes, handle } = request;
    const costBytes = type === NBD_CMD_READ || type === NBD_CMD_WRITE ? lengthBytes : 0;
    this.#inFlightCount += 1;
    this.#inFlightBytes += costBytes;
    const fua = (flags & NBD_CMD_FLAG_FUA) !== 0 ? { fua: true } : undefined;
    let operation: Promise<unknown>;
    switch (type) {
      case NBD_CMD_READ:
        operation = this.#read(device, request);
        break;
      case NBD_CMD_WRITE:
        operation = lengthBytes === 0 ? Promise.resolve() : device.write(offsetBytes, payload!, fua);
        break;
      case NBD_CMD_FLUSH:
        operation = device.flush();
        break;
      case NBD_CMD_TRIM:
        operation = Promise.all(splitRange(offsetBytes, lengthBytes).map((piece) => device.trim(piece.offsetBytes, piece.lengthBytes, fua)));
        break;
      case NBD_CMD_WRITE_ZEROES:
        operation = this.#writeZeroes(device, request);
        break;
      case NBD_CMD_CACHE:
        // The device has no cache verb; the range was validated, and the spec lets CACHE do nothing.
        operation = Promise.resolve();
        break;
      case NBD_CMD_BLOCK_STATUS:
        operation = this.#blockStatus(device, request);
        break;
      default:
        throw new AssertionError({ message: `validated request of unknown type ${type}` });
    }
    operation.then(
      (reply) => {
        if (pooled !== null) this.#payloadBuffers.release(pooled);
        if (reply instanceof Buffer) this.#send(reply, type === NBD_CMD_READ);
        else this.#send(encodeSimpleReply(0, handle));
        this.#finish(costBytes);
      },
      (error: unknown) => {
        if (pooled !== null) this.#payloadBuffers.release(pooled);
        const what = `${commandName(request.type)} offset ${request.offsetBytes} length ${request.lengthBytes}`;
        const failure = expectedError(error, what);
        this.#log(`${what}: ${failure.code}: ${failure.message}`);
        this.#replyError(request, this.#errorNumber(request, failure), failure.message);
        this.#finish(costBytes);
      },
    );
  }

  /** Reads into the reply buffer itself, behind the header that is written once the data is in. */
  #read(device: BlockDevice, request: NbdRequest): Promise<Buffer> {
    const { handle, offsetBytes, lengthBytes } = request;
    const structured = this.#session!.structuredReplies;
    if (lengthBytes === 0) return Promise.resolve(structured ? encodeStructuredNone(handle) : encodeSimpleReply(0, handle));
    // One content chunk always, so NBD_CMD_FLAG_DF is honoured as it is (requestBytesMax is far below 2^32).
    const headerBytes = structured ? offsetDataHeaderBytes : simpleReplyHeaderBytes;
    const reply = this.#replyBuffers.acquire(headerBytes + lengthBytes);
    return device.read(offsetBytes, reply.subarray(headerBytes)).then(
      () => {
        if (structured) writeOffsetDataHeader(reply, 0, NBD_REPLY_FLAG_DONE, handle, offsetBytes, lengthBytes);
        else writeSimpleReplyHeader(reply, 0, 0, handle);
        return reply;
      },
      (error: unknown) => {
        this.#replyBuffers.release(reply);
        throw error;
      },
    );
  }

  #writeZeroes(device: BlockDevice, request: NbdRequest): Promise<unknown> {
    const { flags, offsetBytes, lengthBytes } = request;
    const noHole = (flags & NBD_CMD_FLAG_NO_HOLE) !== 0;
    // Zeroing without NO_HOLE gives the range back (as fast as a trim); with NO_HOLE the store writes zeroes,
    // which is no faster than a WRITE, so a FAST_ZERO request must fail at once (spec).
    if (noHole && (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0) {
      return Promise.reject(new ChunkdError('ENOTSUP', 'WRITE_ZEROES with NO_HOLE is not faster than a write'));
    }
    const options = { fua: (flags & NBD_CMD_FLAG_FUA) !== 0, noHole };
    return Promise.all(splitRange(offsetBytes, lengthBytes).map((piece) => device.writeZeroes(piece.offsetBytes, piece.lengthBytes, options)));
  }

  #blockStatus(device: BlockDevice, request: NbdRequest): Promise<Buffer> {
    const { flags, handle, offsetBytes } = request;
    // The requested length is a hint (spec): ask the device for no more than a range request may cover.
    const queriedBytes = Math.min(request.lengthBytes, rangeRequestBytesMax);
    const requestOne = (flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const contextId = this.#session!.metaContextId;
    return device.blockStatus(offsetBytes, queriedBytes).then((extents) =>
      encodeBlockStatus(NBD_REPLY_FLAG_DONE, handle, contextId, blockDescriptors(extents, queriedBytes, requestOne)));
  }

  /** The NBD error for a failed request: by the error's code, ENOTSUP and EOVERFLOW only where the spec allows them. */
  #errorNumber(request: NbdRequest, error: ChunkdError): number {
    const number = error.nbdError;
    if (number === NBD_ENOTSUP && (request.flags & NBD_CMD_FLAG_FAST_ZERO) === 0) return NBD_EINVAL;
    if (number === NBD_EOVERFLOW && (request.flags & NBD_CMD_FLAG_DF) === 0) return NBD_EINVAL;
    return number;
  }

  #finish(costBytes: number): void {
    this.#inFlightCount -= 1;
    this.#inFlightBytes -= costBytes;
    assert(this.#inFlightCount >= 0 && this.#inFlightBytes >= 0, 'in-flight accounting balances');
    this.#maybeResume();
    this.#maybeEnd();
    this.#maybeRelease();
  }

  // ---- Replies ----

  #replyError(request: NbdRequest, error: number, message: string): void {
    this.#options.counters.requestErrorsTotal += 1;
    // With structured replies an error goes in an ERROR chunk, which carries a message (spec: SHOULD prefer);
    // a READ must use one then.
    const structured = this.#session!.structuredReplies;
    this.#send(structured ? encodeStructuredError(NBD_REPLY_FLAG_DONE, request.handle, error, message) : encodeSimpleReply(error, request.handle));
  }

  /** Writes one whole message; a reply to a client that is gone is dropped. */
  /** `pooled`: the buffer came from #replyBuffers and goes back once the socket is done with it. */
  #send(buffer: Buffer, pooled = false): void {
    const socket = this.#socket;
    if (socket.destroyed || !socket.writable) {
      if (pooled) this.#replyBuffers.release(buffer);
      return;
    }
    if (!this.#corked) {
      this.#corked = true;
      socket.cork();
      setImmediate(this.#uncork);
    }
    if (pooled) socket.write(buffer, () => this.#replyBuffers.release(buffer));
    else socket.write(buffer);
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };

  // ---- Ending ----

  /** Ends the socket gracefully once asked to (or once the client ended its side) and nothing is in flight. */
  #maybeEnd(): void {
    if (this.#ending || this.#socketClosed) return;
    if (this.#inFlightCount > 0 || this.#handshakeBusy) return;
    // After client EOF, a paused connection may still hold whole requests: they are taken on resume first.
    if (!this.#endWhenIdle && !(this.#inputEnded && !this.#paused)) return;
    this.#ending = true;
    const socket = this.#socket;
    socket.end(() => socket.destroy());
    // A client that stopped reading would keep the last replies (and close()) waiting forever.
    this.#graceTimer = setTimeout(() => socket.destroy(), connectionCloseGraceMs);
    this.#graceTimer.unref();
  }

  /** Closes the device once the socket is closed and no device operation is running any more. */
  #maybeRelease(): void {
    if (this.#released || !this.#socketClosed || this.#inFlightCount > 0 || this.#handshakeBusy) return;
    this.#released = true;
    const device = this.#session?.device;
    if (device === undefined) {
      this.#resolveDone();
      return;
    }
    device.close().then(
      () => this.#resolveDone(),
      (error: unknown) => {
        const where = `closing export ${JSON.stringify(this.#session!.exportName)}`;
        this.#log(`${where}: ${expectedError(error, where).message}`);
        this.#resolveDone();
      },
    );
  }

  #log(line: string): void {
    this.#options.log(`${this.#options.label}: ${line}`);
  }
}
