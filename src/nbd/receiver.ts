// Receiving one NBD connection's bytes: where each socket read lands, what is queued, and how the transmission
// phase's stream is cut into requests and WRITE payloads. The connection (connection.ts) decides what to do with
// them; what a command means is commands.ts.
//
// Where reads land: in a large arena buffer, a window at a time, queued as views (input-queue.ts). The arena is
// filled again from its start only once every byte read into it is consumed and no view of it was handed out
// (payloads copied into shared buffers: always; else until a small WRITE's payload goes to the device as a view),
// so a view stays valid while it is held, and a stream of large WRITEs allocates no arenas: a new 256 KiB arena
// every four 1 MiB WRITEs was 64 KiB of ArrayBuffer per request, which V8 counts as external memory and answered
// with a full collection every 8-10 MB of it (BENCHMARKS.md, issue 19, seventh pass). A WRITE payload larger than a window is read straight into the
// buffer the device writes from (steered-socket.ts: the socket's next read is pointed at the rest of it), so the
// kernel's copy out of the socket is its only copy. A socket whose reads cannot be steered (the move failed, or
// TLS, which decrypts into buffers of its own) delivers chunks instead (onData), and the same queue takes them.
//
// Cutting the stream, in takeRequests: a request header, decoded whole from the queue; a WRITE's payload, taken
// from the queue (a view where it lies in one chunk) or, when large, moved into its own buffer that the socket
// then fills; a refused WRITE's payload, skipped as it arrives. Before each header the connection may say "no
// more for now" (flow control): nothing is decoded until it asks again.
import { assert } from '../core/assert.ts';
import { smallRequestBytesMax } from '../core/limits.ts';
import { InputQueue } from './input-queue.ts';
import { decodeRequest, requestHeaderBytes } from './protocol.ts';
import type { NbdRequest } from './protocol.ts';

/** Bytes one socket read may bring into the arena: what Node's own reads take. */
const readWindowBytes = smallRequestBytesMax;
/**
 * Socket reads fill an arena a window at a time; a new one is started when less than a window is left. An idle
 * connection holds its arena, so it is kept small; the handshake's messages are smaller still.
 */
const readArenaBytes = 256 * 1024;
const handshakeReadBytes = 4 * 1024;
/** A WRITE payload larger than this is read from the socket straight into its own buffer. */
const steeredPayloadBytesMin = readWindowBytes + 1;

/** Where WRITE payloads that are copied or steered go. */
export interface PayloadBuffers {
  acquire(size: number): Buffer;
  release(buffer: Buffer): void;
}

/** What the connection does with the requests the receiver cuts out of the stream. */
export interface RequestSink {
  /** Whether another request header may be decoded now; false stops takeRequests until it is called again. */
  mayTakeRequest(): boolean;
  /** A decoded request header. A WRITE's payload follows: the sink calls expectPayload or discardPayload. */
  onRequest(request: NbdRequest): void;
  /** A WRITE's whole payload; `pooled` (the payload itself, or null) goes back to the payload buffers once used. */
  onPayload(request: NbdRequest, payload: Buffer, pooled: Buffer | null): void;
}

export class Receiver {
  /** Bytes received and not yet consumed; the handshake reads its messages from here too. */
  readonly input = new InputQueue();
  readonly #payloadBuffers: PayloadBuffers;
  /** Payloads always go into #payloadBuffers (shared memory for the workers), never stay views of socket chunks. */
  readonly #copyPayloads: boolean;
  /** Called when bytes arrived that someone may take (not after stop()). */
  readonly #onInput: () => void;
  /** Reads are small until the transmission phase. */
  #transmission = false;
  /** No more bytes are taken (stop()); what still arrives is dropped. */
  #stopped = false;
  /** The client sent EOF: what is queued is all there will be. */
  #ended = false;
  /** takeRequests is running (a sink call must not start it again beneath itself). */
  #taking = false;

  /** A WRITE whose header was decoded and whose payload is still arriving. */
  #pendingWrite: NbdRequest | null = null;
  /** A large pending WRITE's own buffer, and how much of its payload is in it. */
  #payload: Buffer | null = null;
  #payloadFilled = 0;
  /** The part of #payload the next socket read lands in, when it was steered there. */
  #steeredView: Buffer | null = null;
  /** Where socket reads land otherwise; a new arena is started when little is left. */
  #arena = Buffer.allocUnsafeSlow(handshakeReadBytes);
  #arenaUsed = 0;
  /**
   * The arena may be filled again from its start once every byte read into it is consumed: it was started in the
   * transmission phase (the handshake keeps views of its options across its asynchronous steps), and no view of
   * it was handed out (a small WRITE's payload left as a view of the socket's bytes: not with #copyPayloads).
   */
  #arenaReusable = false;
  /** Bytes of a refused WRITE's payload still to be read and thrown away. */
  #discardBytes = 0;
  /** The buffer nextReadBuffer gave last: where the event loop's next read of the socket lands. */
  #handedOut: Buffer | null = null;

  constructor(payloadBuffers: PayloadBuffers, copyPayloads: boolean, onInput: () => void) {
    this.#payloadBuffers = payloadBuffers;
    this.#copyPayloads = copyPayloads;
    this.#onInput = onInput;
  }

  /** Whether the client sent EOF. */
  get ended(): boolean {
    return this.#ended;
  }

  /** Whether stop() was called. */
  get stopped(): boolean {
    return this.#stopped;
  }

  /** The handshake is over: reads take a full window from now on. */
  startTransmission(): void {
    this.#transmission = true;
  }

  /** Where the next steered socket read lands: the rest of a large WRITE's payload, or the arena. */
  nextReadBuffer(): Buffer {
    if (this.#payload !== null && this.input.length === 0 && !this.#stopped) {
      this.#steeredView = this.#payload.subarray(this.#payloadFilled);
      this.#handedOut = this.#steeredView;
      return this.#steeredView;
    }
    this.#steeredView = null;
    const window = this.#transmission ? readWindowBytes : handshakeReadBytes;
    // Nothing queued and no view lent: the bytes read so far are all consumed, and the arena starts over.
    if (this.#arenaReusable && this.input.length === 0) this.#arenaUsed = 0;
    if (this.#arena.length - this.#arenaUsed < window) {
      this.#arena = Buffer.allocUnsafeSlow(this.#transmission ? readArenaBytes : handshakeReadBytes);
      this.#arenaUsed = 0;
      this.#arenaReusable = this.#transmission;
    }
    this.#handedOut = this.#arena.subarray(this.#arenaUsed, this.#arenaUsed + window);
    return this.#handedOut;
  }

  /**
   * Reads what the socket holds now with `receive` (a read that does not wait: the count of bytes it put at the
   * start of the buffer it is given, or 0), outside the event loop's own reads (the idle poll saw a request
   * coming, connection.ts); whether bytes came. Only between requests (nothing queued, no payload expected, no
   * view of the arena lent), and into the arena past both the bytes read so far and the buffer the event loop's
   * next read lands in, so that no read lands on bytes of another.
   */
  readNow(receive: (target: Buffer) => number): boolean {
    const handedOut = this.#handedOut;
    if (!this.#transmission || this.#stopped || this.input.length > 0 || this.#pendingWrite !== null || this.#payload !== null || this.#discardBytes > 0) return false;
    // A view of the arena lent (a small WRITE's payload, to the device): #arenaUsed only grows until a new arena,
    // and a read here would leave the window the event loop holds unused each time (a new 256 KiB arena every few
    // QD1 writes, which V8 answers with collections; see the top of this file).
    if (!this.#arenaReusable || handedOut === null || handedOut.buffer !== this.#arena.buffer) return false;
    const start = Math.max(this.#arenaUsed, handedOut.byteOffset - this.#arena.byteOffset + handedOut.length);
    if (this.#arena.length - start < readWindowBytes) return false;
    const target = this.#arena.subarray(start, start + readWindowBytes);
    const count = receive(target);
    if (count <= 0) return false;
    // Every byte read lies before #arenaUsed (the event loop's read, when it lands, counts its bytes on top: more
    // than it used, never less).
    this.#arenaUsed = start + count;
    this.input.push(target.subarray(0, count));
    return true;
  }

  /** `count` bytes of a steered read arrived at the start of `buffer`, the one nextReadBuffer returned last. */
  onRead(count: number, buffer: Buffer): void {
    if (buffer === this.#steeredView) {
      this.#steeredView = null;
      this.#payloadFilled += count;
      if (!this.#stopped) this.#onInput();
      return;
    }
    this.#arenaUsed += count;
    this.onData(buffer.subarray(0, count));
  }

  /** A chunk the socket delivered (a socket that is not steered); it is queued as it is, not copied. */
  onData(chunk: Buffer): void {
    if (this.#stopped) return;
    this.input.push(chunk);
    this.#onInput();
  }

  /** The client sent EOF. */
  onEnd(): void {
    this.#ended = true;
  }

  /**
   * Cuts requests and payloads out of what is queued and hands them to `sink`, until the bytes run out, the sink
   * says no more, or stop(). A malformed header throws ChunkdError EPROTO.
   */
  takeRequests(sink: RequestSink): void {
    if (this.#taking) return;
    this.#taking = true;
    try {
      while (!this.#stopped) {
        if (this.#discardBytes > 0) {
          this.#discardBytes -= this.input.skip(this.#discardBytes);
          if (this.#discardBytes > 0) break;
          continue;
        }
        const pending = this.#pendingWrite;
        if (pending !== null && pending.lengthBytes >= steeredPayloadBytesMin) {
          if (!this.#receivePayload(pending.lengthBytes)) break;
          const payload = this.#payload!;
          this.#payload = null;
          this.#pendingWrite = null;
          sink.onPayload(pending, payload, payload);
          continue;
        }
        if (pending !== null) {
          if (this.input.length < pending.lengthBytes) break;
          this.#pendingWrite = null;
          const payload = this.input.take(pending.lengthBytes, this.#payloadBuffers.acquire, this.#copyPayloads);
          // A view of the socket's bytes goes to the device, which may hold it for a while: the arena it lies in
          // (the current one, or an older one) is not filled again.
          if (!this.input.gathered) this.#arenaReusable = false;
          sink.onPayload(pending, payload, this.input.gathered ? payload : null);
          continue;
        }
        if (!sink.mayTakeRequest()) break;
        const view = this.input.contiguous(requestHeaderBytes);
        if (view === null) break;
        const decoded = decodeRequest(view.buffer, view.offset);
        assert(decoded.done, 'a whole request header decodes');
        this.input.skip(decoded.bytesConsumed);
        sink.onRequest(decoded.value);
      }
    } finally {
      this.#taking = false;
    }
  }

  /** The WRITE just given to onRequest was accepted: its payload is the next bytes. */
  expectPayload(request: NbdRequest): void {
    assert(this.#pendingWrite === null && this.#discardBytes === 0 && request.lengthBytes > 0, 'one payload expected at a time');
    this.#pendingWrite = request;
  }

  /** The WRITE just given to onRequest was refused: its payload is still on the wire; read past it as it comes. */
  discardPayload(lengthBytes: number): void {
    assert(this.#pendingWrite === null && this.#discardBytes === 0, 'one payload expected at a time');
    this.#discardBytes = lengthBytes;
  }

  /** Takes nothing more: what is queued is dropped, and what still arrives too. */
  stop(): void {
    this.#stopped = true;
    this.#pendingWrite = null; // a payload buffer being filled is given back by closed()
    this.#discardBytes = 0;
    this.input.clear();
  }

  /** The socket is closed: only now can no read land in a steered payload buffer any more, so it goes back. */
  closed(): void {
    this.stop();
    if (this.#payload !== null) this.#payloadBuffers.release(this.#payload);
    this.#payload = null;
  }

  /**
   * Moves what is queued of a large WRITE's payload into its own buffer (taken now, if this is the first of it);
   * the socket's next reads then land in the buffer itself. Whether the payload is whole.
   */
  #receivePayload(lengthBytes: number): boolean {
    this.#payload ??= this.#payloadBuffers.acquire(lengthBytes);
    const count = Math.min(this.input.length, lengthBytes - this.#payloadFilled);
    this.input.takeInto(this.#payload, this.#payloadFilled, count);
    this.#payloadFilled += count;
    if (this.#payloadFilled < lengthBytes) return false;
    this.#payloadFilled = 0;
    return true;
  }
}
