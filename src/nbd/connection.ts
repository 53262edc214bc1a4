// One NBD client connection's life: the handshake (handshake.ts), then the transmission phase, flow control, and
// its end. The request path runs through three files: receiver.ts cuts the socket's bytes into requests and
// payloads, commands.ts says what each command means on the device, and this file joins them: it validates a
// request once (validate.ts), runs it, writes its reply, and decides when to read, pause and close.
//
// The connection's life is one state value:
//
//   handshake ──STARTTLS: ACK in the clear──► tls ──TLS is up──► handshake (options again, inside TLS)
//       │
//   handshake ──GO, EXPORT_NAME──► transmission
//       │                              │
//       │ ABORT                        │ DISC, shutdown()
//       └──────────► draining ◄────────┘
//                       │ nothing in flight                 handshake, transmission:
//                       ▼                                   client EOF, nothing in flight, not paused
//                    closing ◄──────────────────────────────────────────┘
//                       ▲      (socket.end(): the last replies go out; cut after connectionCloseGraceMs)
//                       │
//   any state ──────────┘ garbage, handshake timeout, TLS failure, shutdown() in the handshake: socket.destroy()
//
//   any state ──the socket's 'close'──► closed ──no request and no handshake step running──► released
//                                                 (the device is closed, exactly once; `done` resolves)
//
// Only `handshake` and `transmission` take what the socket reads (in `tls`, TLS itself reads); every state from
// `draining` on drops what arrives. The handshake timeout covers `tls` too, so a TLS handshake that stalls or
// fails costs what a plain one does: one socket, bounded buffers, until the timer or the error ends it.
// A handshake step (an option's answer, which may open a device) runs asynchronously: while one runs the
// connection neither takes another, nor ends, nor is released, whatever its state. Transitions: #enterTransmission,
// #startTls, #onSecure, #drain, #maybeEnd, #destroy, #onClose and #maybeRelease.
//
// TLS (tls.ts): after NBD_OPT_STARTTLS is acknowledged in the clear, a TLSSocket takes over the same socket (its
// descriptor and handle) and becomes the one replies are written to. What it decrypts lands where the receiver
// says, as plain reads do (steered-socket.ts), or, where that cannot be had, comes as chunks that the receiver
// queues. Its replies go out a slice at a time through a queue of their own (reply-queue.ts), over a socket whose
// send buffer is widened (a unix socket's), so that encrypting one slice overlaps the client's reading of the last.
//
// Transmission: requests are taken as bytes arrive and go to the device at once, in order of arrival (the device
// serializes overlapping ranges); each reply is written whole when its request finishes, so replies go out of
// order but never interleave. Replies written in one turn of the event loop leave in one writev (cork until
// setImmediate), but for a large READ's, written at once with the next request taken a turn later (so that the
// socket copies bytes still in the CPU's caches: limits.hotReplyBytesMin); over TLS, in slices (reply-queue.ts:
// from setImmediate on, each once the last is written).
//
// Flow control: past requestsInFlightPerConnectionMax requests or bytesInFlightPerConnectionMax bytes in flight
// (or that many reply bytes the client has not read yet) the socket is paused, and resumed when a request
// finishes. A WRITE payload counts from its header on, as it is buffered. In the handshake, the socket is paused
// while more than two maximal options wait.
//
// Errors follow core/fail-stop.ts: a device's ChunkdError or system error is that request's error reply, a
// malformed stream closes this connection, and anything else is a bug that stops the node.
import type { Socket } from 'node:net';
import tls from 'node:tls';
import { assert } from '../core/assert.ts';
import { expectedError } from '../core/fail-stop.ts';
import type { DeviceProvider } from '../core/block-device.ts';
import {
  bytesInFlightPerConnectionMax, connectionCloseGraceMs, hotReplyBytesMin, optionBytesMax, plainSendBufferBytes, requestsInFlightPerConnectionMax,
  tlsReplyJoinBytes, tlsReplySliceBytes, tlsSendBufferBytes,
} from '../core/limits.ts';
import type { SharedBufferPool } from '../core/shared-buffers.ts';
import { BufferPool } from './buffer-pool.ts';
import { describeRequest, failureReply, refusalReply, requestCostBytes, runCommand, successReply } from './commands.ts';
import type { ReplyBuffers } from './commands.ts';
import { Handshake } from './handshake.ts';
import type { Session } from './handshake.ts';
import { Receiver } from './receiver.ts';
import type { PayloadBuffers, RequestSink } from './receiver.ts';
import { ReplyQueue } from './reply-queue.ts';
import { descriptorOf, steerReads, steerTlsReads, widenSendBuffer } from './steered-socket.ts';
import { NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, encodeGreeting, optionHeaderBytes } from './protocol.ts';
import type { NbdRequest } from './protocol.ts';
import { peerRefusal } from './tls.ts';
import type { TlsSettings } from './tls.ts';
import { validateRequest } from './validate.ts';
import type { ValidationContext } from './validate.ts';
import type { Log, LogLevel } from '../core/log.ts';
import { observeLatency } from '../core/latency-histogram.ts';
import type { ProtocolStageTimes } from '../store/stage-times.ts';
import { performance } from 'node:perf_hooks';
import { IdlePollPolicy, claimTurnPoll, pollReadable, receiveNow, threadPolls, type IdlePollCounters } from './idle-poll.ts';

/** Counters the server shares with its connections. */
export interface RequestCounters {
  requestsTotal: number;
  requestErrorsTotal: number;
  /** The front end's stages: a WRITE payload's arrival, a reply's way to the kernel (store/stage-times.ts). */
  stages: ProtocolStageTimes;
  /** Waits for a client's next request polled rather than slept (idle-poll.ts). */
  idlePoll: IdlePollCounters;
}

export interface ConnectionOptions {
  provider: DeviceProvider;
  log: Log;
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
  /** TLS offered or required (NBD_OPT_STARTTLS); null or absent: off. */
  tls?: TlsSettings | null;
  /** Microseconds to poll for the next request once idle (serve --poll-us, idle-poll.ts); 0 or absent: off. */
  pollUs?: number;
}

/** The connection's life; see the diagram at the top of this file. */
export type ConnectionState = 'handshake' | 'tls' | 'transmission' | 'draining' | 'closing' | 'closed' | 'released';

/** Input buffered during the handshake before the socket is paused: two maximal options. */
const handshakeInputBytesMax = 2 * (optionHeaderBytes + optionBytesMax);

export class NbdConnection {
  /** Resolves when the socket is closed, every device operation has finished and the device is closed. */
  readonly done: Promise<void>;
  readonly #resolveDone: () => void;
  /** Where replies go and reads come from: the accepted socket, or after STARTTLS the TLS socket over it. */
  #socket: Socket;
  readonly #options: ConnectionOptions;
  readonly #receiver: Receiver;
  /** WRITE payloads the receiver gathers or steers into, given back here once the device is done with them. */
  readonly #payloadBuffers: PayloadBuffers;
  readonly #sink: RequestSink;
  /** Large READ replies, reused once the socket has written them. */
  readonly #replyBuffers: ReplyBuffers;
  readonly #handshake: Handshake;
  /** When each WRITE whose payload is still arriving had its header decoded (the `receive` stage). */
  readonly #payloadStarts = new Map<NbdRequest, number>();
  #state: ConnectionState = 'handshake';
  /** A handshake step is running (see the note at the top). */
  #handshakeBusy = false;
  #session: Session | null = null;
  #validation: ValidationContext | null = null;
  #handshakeTimer: NodeJS.Timeout | null;
  #graceTimer: NodeJS.Timeout | null = null;

  // Flow control and replies.
  #inFlightCount = 0;
  #inFlightBytes = 0;
  /** The socket is paused by flow control. */
  #paused = false;
  /** Replies written in this turn of the event loop wait for #uncork (or, corked in a take, for its end). */
  #corked = false;
  /** #takeRequests is running: replies of the requests it answers at once are written when it ends. */
  #taking = false;
  /** The socket was corked in this take, and is uncorked when it ends rather than at setImmediate. */
  #uncorkAfterTake = false;
  /**
   * The one reply answered so far in this take, not yet written: alone at the end of the take it is written as it
   * is (one write, no cork); a second reply corks the socket and both go in one writev.
   */
  #heldReply: Buffer | null = null;
  #heldPooled = false;
  #heldAnsweredAt: number | null = null;
  /**
   * A large READ was taken in this turn: the next request waits for the next turn (setImmediate), so that this
   * one's reply is written before another large read evicts its bytes from the CPU's caches. Taken together, eight
   * 1 MiB reads were all read and verified before the first was written, and the socket's copy then read cold
   * memory (0.16 CPU s/GB against 0.07, BENCHMARKS.md, issue 19). Plain sockets only: TLS writes in slices.
   */
  #largeReadTaken = false;
  /** #resumeTaking is due at setImmediate. */
  #resumeScheduled = false;
  /** Over TLS, replies wait here and go out a slice at a time (reply-queue.ts); null before TLS. */
  #tlsReplies: ReplyQueue | null = null;
  /** A slice of #tlsReplies is being written, or is due at setImmediate. */
  #tlsWriting = false;
  /** `closing` with TLS replies still queued: the socket is ended once they are written. */
  #endAfterReplies = false;
  /** Whether the next idle wait is polled (idle-poll.ts). */
  readonly #idlePoll = new IdlePollPolicy();
  /**
   * The most requests in flight at once since the last idle wait: a poll is for clients that send one at a time.
   * Requests taken in one take count as in flight together, though cached READs finish one by one within it.
   */
  #inFlightPeak = 0;
  /** Requests run in the take going on (#takeOnce). */
  #takenInTake = 0;

  /** `accepted`: a socket that has read nothing yet (the server accepts with pauseOnConnect). */
  constructor(accepted: Socket, options: ConnectionOptions) {
    this.#options = options;
    const shared = options.sharedBuffers ?? null;
    this.#payloadBuffers = shared ?? new BufferPool(bytesInFlightPerConnectionMax);
    this.#receiver = new Receiver(this.#payloadBuffers, shared !== null, () => this.#onInput());
    this.#replyBuffers = shared ?? new BufferPool(bytesInFlightPerConnectionMax);
    this.#sink = {
      mayTakeRequest: () => this.#mayTakeRequest(),
      onRequest: (request) => this.#accept(request),
      onPayload: (request, payload, pooled) => this.#execute(request, payload, pooled),
    };
    this.#handshake = new Handshake(options.provider, options.tls?.mode ?? 'off');
    const { promise, resolve } = Promise.withResolvers<void>();
    this.done = promise;
    this.#resolveDone = resolve;
    const receiver = this.#receiver;
    const steered = steerReads(accepted, { nextReadBuffer: () => receiver.nextReadBuffer(), onRead: (count, buffer) => receiver.onRead(count, buffer) }, { allowHalfOpen: true });
    const socket = steered ?? accepted;
    this.#socket = socket;
    if (steered === null) {
      socket.on('data', (chunk: Buffer) => receiver.onData(chunk));
      socket.resume();
    }
    this.#listen(socket);
    this.#handshakeTimer = setTimeout(() => this.#destroy(`handshake not finished within ${options.handshakeTimeoutMs} ms: closing`), options.handshakeTimeoutMs);
    this.#handshakeTimer.unref();
    this.#send(encodeGreeting());
  }

  readonly #onSocketEnd = (): void => this.#onEnd();
  readonly #onSocketDrain = (): void => this.#maybeResume();
  readonly #onSocketClose = (): void => this.#onClose();
  readonly #onSocketError = (error: NodeJS.ErrnoException): void => {
    if (this.#state === 'tls') {
      this.#destroy(`closing: TLS handshake failed: ${error.message.trim()}`);
      return;
    }
    // A client that hangs up without waiting for its last replies is ordinary; anything else is worth a line.
    if (error.code !== 'EPIPE' && error.code !== 'ECONNRESET') this.#log(`socket error: ${error.message}`, 'warn');
  };

  #listen(socket: Socket): void {
    socket.on('end', this.#onSocketEnd);
    socket.on('drain', this.#onSocketDrain);
    socket.on('error', this.#onSocketError);
    socket.on('close', this.#onSocketClose);
  }

  /** Where the connection is in its life. */
  get state(): ConnectionState {
    return this.#state;
  }

  /** The export the connection serves, once in transmission; null before. */
  get exportName(): string | null {
    return this.#session?.exportName ?? null;
  }

  /** Stops taking requests; in-flight ones finish and get their replies, then the connection closes. */
  shutdown(): void {
    if (this.#state === 'handshake' || this.#state === 'tls') this.#destroy(null);
    else if (this.#state === 'transmission') this.#drain();
  }

  // ---- Input ----

  #onInput(): void {
    if (this.#state === 'transmission') {
      this.#takeRequests();
      return;
    }
    // In `tls`, what arrives once TLS is up but before the connection heard so waits for #onSecure.
    if (this.#state === 'tls') return;
    assert(this.#state === 'handshake', 'input is taken only in the handshake and transmission');
    if (this.#receiver.input.length > handshakeInputBytesMax) this.#pause();
    void this.#runHandshake();
  }

  #onEnd(): void {
    if (this.#state === 'tls') {
      this.#destroy('closing: the client ended its side during the TLS handshake');
      return;
    }
    this.#receiver.onEnd();
    this.#maybeEnd();
  }

  #onClose(): void {
    this.#state = 'closed';
    this.#receiver.closed();
    for (const buffer of this.#tlsReplies?.clear() ?? []) this.#replyBuffers.release(buffer);
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    if (this.#graceTimer !== null) clearTimeout(this.#graceTimer);
    this.#maybeRelease();
  }

  // ---- Handshake ----

  async #runHandshake(): Promise<void> {
    if (this.#handshakeBusy) return;
    this.#handshakeBusy = true;
    try {
      while (this.#state === 'handshake') {
        const step = await this.#handshake.next(this.#receiver.input);
        if (step.kind === 'need-more') break;
        if (step.kind === 'close') {
          this.#destroy(`closing: ${step.reason}`);
          break;
        }
        if (step.kind === 'starttls') {
          this.#startTls(step.output);
          break;
        }
        for (const buffer of step.output) this.#send(buffer);
        if (step.kind === 'abort') {
          this.#drain();
          break;
        }
        if (step.kind === 'transmission') this.#enterTransmission(step.session);
      }
    } catch (error) {
      this.#destroy(`closing during handshake: ${expectedError(error, 'the NBD handshake').message}`);
    } finally {
      this.#handshakeBusy = false;
    }
    if (this.#state === 'transmission') this.#takeRequests(); // requests sent right behind the GO
    this.#maybeResume();
    this.#maybeEnd();
    this.#maybeRelease();
  }

  /** handshake → tls: the ACK goes out in the clear, then a TLS socket takes this one over (#upgrade). */
  #startTls(ack: Buffer[]): void {
    // The client starts TLS once it has the ACK: bytes already here came before it, a violation.
    if (this.#receiver.input.length > 0) {
      this.#destroy('closing: bytes after NBD_OPT_STARTTLS before its reply');
      return;
    }
    this.#state = 'tls';
    const plain = this.#socket;
    plain.pause();
    if (this.#corked) {
      // Earlier replies leave first, in order; the pending #uncork then finds nothing to do.
      this.#corked = false;
      plain.uncork();
    }
    plain.write(Buffer.concat(ack), (error) => {
      if (error == null && this.#state === 'tls') this.#upgrade(plain);
    });
  }

  /** The ACK is out: TLS takes over the socket and becomes the one this connection reads and writes. */
  #upgrade(plain: Socket): void {
    const settings = this.#options.tls!;
    plain.off('end', this.#onSocketEnd);
    plain.off('drain', this.#onSocketDrain);
    plain.off('error', this.#onSocketError);
    plain.off('close', this.#onSocketClose);
    plain.on('error', () => {}); // the TLS socket reports what goes wrong from now on
    widenSendBuffer(plain, tlsSendBufferBytes);
    const secure = new tls.TLSSocket(plain, {
      isServer: true,
      secureContext: settings.secureContext,
      requestCert: settings.verifyPeer,
      rejectUnauthorized: settings.verifyPeer,
    });
    this.#socket = secure;
    this.#tlsReplies = new ReplyQueue();
    this.#listen(secure);
    const receiver = this.#receiver;
    const steered = steerTlsReads(secure, { nextReadBuffer: () => receiver.nextReadBuffer(), onRead: (count, buffer) => receiver.onRead(count, buffer) });
    if (!steered) secure.on('data', (chunk: Buffer) => receiver.onData(chunk));
    secure.once('secure', () => this.#onSecure(secure));
  }

  /** tls → handshake: TLS is up; option haggling starts again inside it. */
  #onSecure(secure: tls.TLSSocket): void {
    if (this.#state !== 'tls') return;
    const settings = this.#options.tls!;
    const refusal = settings.verifyPeer ? peerRefusal(secure.getPeerX509Certificate(), settings.authorities) : null;
    if (refusal !== null) {
      this.#destroy(`closing: client certificate refused: ${refusal}`);
      return;
    }
    this.#state = 'handshake';
    this.#paused = false;
    this.#handshake.tlsStarted();
    void this.#runHandshake();
  }

  #enterTransmission(session: Session): void {
    // Kept even if the socket is gone by now: #maybeRelease then closes the device.
    this.#session = session;
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    this.#validation = {
      sizeBytes: session.device.sizeBytes,
      readOnly: session.device.readOnly,
      structuredReplies: session.structuredReplies,
      metaContextId: session.metaContextId,
    };
    if (this.#state !== 'handshake') return;
    this.#state = 'transmission';
    // Replies of large reads fill the default send buffer at once (limits.ts); a TLS socket has its own.
    if (this.#tlsReplies === null) widenSendBuffer(this.#socket, plainSendBufferBytes);
    this.#receiver.startTransmission();
  }

  // ---- Transmission: taking requests ----

  /**
   * Takes the requests that arrived. A READ of cached data is answered before the take ends (runCommand gives its
   * reply at once): the replies of one take are written when it ends, one as a plain write, several as one writev,
   * and the idle wait for the next request (#idleWait) follows in the same callback, with no turn of the event loop
   * between the request's arrival and its reply.
   */
  #takeRequests(): void {
    if (this.#taking) return;
    if (this.#takeOnce()) this.#idleWait();
  }

  /** One take (see #takeRequests); whether it wrote replies. */
  #takeOnce(): boolean {
    this.#taking = true;
    this.#takenInTake = 0;
    try {
      this.#receiver.takeRequests(this.#sink);
    } catch (error) {
      this.#destroy(`closing: ${expectedError(error, 'reading NBD requests').message}`);
    } finally {
      this.#taking = false;
    }
    if (this.#takenInTake > this.#inFlightPeak) this.#inFlightPeak = this.#takenInTake;
    let wrote = this.#heldReply !== null;
    if (wrote) this.#writeHeld();
    else if (this.#uncorkAfterTake) {
      this.#uncorkAfterTake = false;
      this.#corked = false;
      this.#socket.uncork();
      wrote = true;
    }
    this.#maybeEnd(); // deferred while the take ran (#maybeEnd)
    return wrote;
  }

  /**
   * After replies are written: the idle wait for the client's next request, polled (#pollIdle). When the poll sees
   * the request come, it is read here at once (receiveNow; the receiver's readNow says where it lands) and taken,
   * and the wait after its reply polled again, rather than left for the event loop: its turn (an epoll_pwait, the
   * read and the callback into JavaScript) cost a QD1 request several microseconds. A request that does not finish
   * at once (a write) ends the loop; its reply, in #finish, comes back here. idle-poll.ts's turnPollsMax polls a
   * turn bound how long the connection holds the event loop (each request waited for at most --poll-us).
   */
  #idleWait(): void {
    while (this.#pollIdle()) {
      if (!this.#receiver.readNow(this.#receiveNow)) return;
      if (!this.#takeOnce()) return;
    }
  }

  /** Takes one decoded request: validates it, then runs it, waits for its payload, or answers an error. */
  #accept(request: NbdRequest): void {
    if (request.type === NBD_CMD_DISC) {
      this.#drain();
      return;
    }
    this.#options.counters.requestsTotal += 1;
    const validation = this.#validation!;
    validation.sizeBytes = this.#session!.device.sizeBytes;
    const error = validateRequest(request, validation);
    if (error !== 0) {
      this.#options.counters.requestErrorsTotal += 1;
      this.#send(refusalReply(this.#session!, request, error));
      // The payload of a refused WRITE is still on the wire: read past it, a chunk at a time.
      if (request.type === NBD_CMD_WRITE) this.#receiver.discardPayload(request.lengthBytes);
      return;
    }
    if (request.type === NBD_CMD_WRITE && request.lengthBytes > 0) {
      this.#payloadStarts.set(request, performance.now());
      this.#receiver.expectPayload(request);
      return;
    }
    if (request.type === NBD_CMD_READ && request.lengthBytes >= hotReplyBytesMin && this.#tlsReplies === null) this.#largeReadTaken = true;
    this.#execute(request, null, null);
  }

  /** Runs a request; `pooled` is a gathered payload buffer to give back once the device is done with it. */
  #execute(request: NbdRequest, payload: Buffer | null, pooled: Buffer | null): void {
    const session = this.#session!;
    const costBytes = requestCostBytes(request);
    const stages = this.#options.counters.stages;
    const payloadStart = payload === null ? undefined : this.#payloadStarts.get(request);
    if (payloadStart !== undefined) {
      this.#payloadStarts.delete(request);
      observeLatency(stages.receive, (performance.now() - payloadStart) / 1000);
    }
    this.#inFlightCount += 1;
    this.#inFlightBytes += costBytes;
    if (this.#inFlightCount > this.#inFlightPeak) this.#inFlightPeak = this.#inFlightCount;
    if (this.#taking) this.#takenInTake += 1;
    const running = runCommand(session, request, payload, this.#replyBuffers);
    threadPolls.requestsInFlight += 1; // counted once it runs: every way below ends in #finish
    if (Buffer.isBuffer(running)) {
      // A READ of cached data, answered before runCommand returned: its reply goes with this take's (#takeRequests).
      this.#send(running, true, performance.now());
      this.#finish(costBytes);
      return;
    }
    running.then(
      (reply) => {
        if (pooled !== null) this.#payloadBuffers.release(pooled);
        const answeredAt = performance.now();
        if (reply instanceof Buffer) this.#send(reply, request.type === NBD_CMD_READ, answeredAt);
        else this.#send(successReply(request), false, answeredAt);
        this.#finish(costBytes);
      },
      (error: unknown) => {
        if (pooled !== null) this.#payloadBuffers.release(pooled);
        const what = describeRequest(request);
        const failure = expectedError(error, what);
        this.#log(`${what}: ${failure.code}: ${failure.message}`, 'warn');
        this.#options.counters.requestErrorsTotal += 1;
        this.#send(failureReply(session, request, failure));
        this.#finish(costBytes);
      },
    );
  }

  #finish(costBytes: number): void {
    this.#inFlightCount -= 1;
    this.#inFlightBytes -= costBytes;
    threadPolls.requestsInFlight -= 1;
    assert(this.#inFlightCount >= 0 && this.#inFlightBytes >= 0, 'in-flight accounting balances');
    this.#maybeResume();
    this.#maybeEnd();
    this.#maybeRelease();
  }

  // ---- Flow control ----

  #atLimit(): boolean {
    return this.#inFlightCount >= requestsInFlightPerConnectionMax ||
      this.#inFlightBytes >= bytesInFlightPerConnectionMax ||
      this.#socket.writableLength + (this.#tlsReplies?.queuedBytes ?? 0) >= bytesInFlightPerConnectionMax;
  }

  /** Whether the receiver may decode another request header; pauses the socket when not. */
  #mayTakeRequest(): boolean {
    if (this.#largeReadTaken) {
      if (!this.#resumeScheduled) {
        this.#resumeScheduled = true;
        setImmediate(this.#resumeTaking);
      }
      return false;
    }
    if (!this.#atLimit()) return true;
    this.#pause();
    return false;
  }

  /** The next turn after a large READ: requests are taken again (unless flow control paused the socket meanwhile). */
  readonly #resumeTaking = (): void => {
    this.#resumeScheduled = false;
    this.#largeReadTaken = false;
    if (this.#state === 'transmission' && !this.#paused) this.#takeRequests();
  };

  #pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#socket.pause();
  }

  #maybeResume(): void {
    if (!this.#paused || this.#handshakeBusy || this.#atLimit()) return;
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return;
    this.#paused = false;
    this.#socket.resume();
    if (this.#state === 'transmission') this.#takeRequests();
  }

  // ---- Replies ----

  /**
   * Writes one whole message; a reply to a client that is gone is dropped. `pooled`: the buffer came from
   * #replyBuffers and goes back once the socket is done with it.
   *
   * When: a large READ's reply at once; the replies of one take at its end (#takeRequests); any other reply with
   * the rest of this turn's, in one writev at setImmediate (#uncork). (Tried: a QD1 WRITE's reply written at once,
   * its idle wait at the end of the turn: more CPU per write, BENCHMARKS.md issue 19.)
   */
  #send(buffer: Buffer, pooled = false, answeredAt: number | null = null): void {
    const socket = this.#socket;
    if (socket.destroyed || !socket.writable) {
      if (pooled) this.#replyBuffers.release(buffer);
      return;
    }
    if (this.#tlsReplies !== null) {
      this.#tlsReplies.push(buffer, pooled, answeredAt);
      if (!this.#tlsWriting) {
        this.#tlsWriting = true;
        setImmediate(this.#writeTlsSlice);
      }
      return;
    }
    if (pooled && buffer.length >= hotReplyBytesMin) {
      // A large read's reply leaves now, while the CPU's caches still hold the bytes just read and verified
      // (earlier replies of this turn first, in order); see #largeReadTaken.
      this.#writeHeld();
      if (this.#corked) {
        this.#corked = false;
        this.#uncorkAfterTake = false;
        socket.uncork();
      }
    } else if (this.#taking) {
      if (!this.#corked) {
        if (this.#heldReply === null) {
          this.#heldReply = buffer;
          this.#heldPooled = pooled;
          this.#heldAnsweredAt = answeredAt;
          return;
        }
        this.#corked = true;
        this.#uncorkAfterTake = true;
        socket.cork();
        this.#writeHeld();
      }
    } else if (!this.#corked) {
      this.#corked = true;
      socket.cork();
      setImmediate(this.#uncork);
    }
    this.#write(buffer, pooled, answeredAt);
  }

  /** Writes the reply held in this take, if any (before one that must follow it). */
  #writeHeld(): void {
    const held = this.#heldReply;
    if (held === null) return;
    this.#heldReply = null;
    this.#write(held, this.#heldPooled, this.#heldAnsweredAt);
  }

  #write(buffer: Buffer, pooled: boolean, answeredAt: number | null): void {
    const socket = this.#socket;
    if (socket.destroyed || !socket.writable) {
      if (pooled) this.#replyBuffers.release(buffer);
      return;
    }
    if (!pooled && answeredAt === null) {
      socket.write(buffer);
      return;
    }
    const replyTimes = this.#options.counters.stages.reply;
    socket.write(buffer, () => {
      if (pooled) this.#replyBuffers.release(buffer);
      if (answeredAt !== null) observeLatency(replyTimes, (performance.now() - answeredAt) / 1000);
    });
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
    this.#idleWait();
  };

  /** Reads what the socket holds now into `target` (#idleWait); 0 when nothing was read. */
  readonly #receiveNow = (target: Buffer): number => {
    const fd = descriptorOf(this.#socket);
    return fd === null ? 0 : receiveNow(fd, target);
  };

  /**
   * Once this turn's replies are with the kernel and nothing is in flight on this thread: waits for the client's
   * next request polling the socket rather than asleep in epoll (idle-poll.ts), when the policy says it pays.
   * Whether the poll saw something to read.
   */
  #pollIdle(): boolean {
    const pollUs = this.#options.pollUs ?? 0;
    if (pollUs <= 0 || this.#state !== 'transmission' || this.#tlsReplies !== null) return false;
    if (this.#inFlightCount > 0 || threadPolls.requestsInFlight > 0 || this.#paused || this.#socket.writableLength > 0) return false;
    // A client with several requests in flight (queue depth 32) sends its next ones as replies reach it, not one
    // by one: the poll would only take a CPU it needs (measured: 4 KiB reads at QD32 0.81-0.92x without this).
    const oneAtATime = this.#inFlightPeak <= 1;
    this.#inFlightPeak = 0;
    if (!oneAtATime) return false;
    const fd = descriptorOf(this.#socket);
    if (fd === null || !this.#idlePoll.shouldPoll() || !claimTurnPoll(this)) return false;
    if (pollReadable(fd, pollUs, this.#options.counters.idlePoll)) {
      this.#idlePoll.hit();
      return true;
    }
    this.#idlePoll.missed();
    return false;
  }

  /** Writes the next slice of queued TLS replies; the one after follows once the socket has taken it. */
  readonly #writeTlsSlice = (): void => {
    const socket = this.#socket;
    // A socket that is gone takes nothing more; what is queued goes back at 'close'.
    const slice = socket.destroyed || !socket.writable ? null : this.#tlsReplies!.take(tlsReplySliceBytes, tlsReplyJoinBytes);
    if (slice === null) {
      this.#tlsWriting = false;
      if (this.#endAfterReplies) this.#endSocket();
      return;
    }
    const last = slice.pieces.length - 1;
    socket.cork();
    for (let index = 0; index < last; index++) socket.write(slice.pieces[index]!);
    socket.write(slice.pieces[last]!, () => {
      for (const buffer of slice.finished) this.#replyBuffers.release(buffer);
      const now = performance.now();
      const replyTimes = this.#options.counters.stages.reply;
      for (const answeredAt of slice.answeredAt) observeLatency(replyTimes, (now - answeredAt) / 1000);
      this.#writeTlsSlice();
      this.#maybeResume();
    });
    socket.uncork();
  };

  // ---- Ending ----

  /** handshake, transmission → draining: no more requests are read; the connection ends once idle. */
  #drain(): void {
    this.#state = 'draining';
    this.#receiver.stop();
    this.#socket.pause();
    this.#maybeEnd();
  }

  /** → closing at once: the socket is destroyed, replies not yet written are lost. `reason`: a log line, if any. */
  #destroy(reason: string | null): void {
    if (reason !== null) this.#log(reason, 'warn');
    if (this.#state !== 'closed' && this.#state !== 'released') {
      this.#state = 'closing';
      this.#receiver.stop();
    }
    this.#socket.destroy();
  }

  /** draining, or handshake and transmission after client EOF → closing, once nothing is in flight. */
  #maybeEnd(): void {
    if (this.#inFlightCount > 0 || this.#handshakeBusy || this.#taking) return;
    const state = this.#state;
    // After client EOF, a paused connection may still hold whole requests: they are taken on resume first.
    const ended = (state === 'handshake' || state === 'transmission') && this.#receiver.ended && !this.#paused;
    if (state !== 'draining' && !ended) return;
    this.#state = 'closing';
    this.#receiver.stop(); // after EOF, all it may hold is part of a request
    this.#endSocket();
    // A client that stopped reading would keep the last replies (and close()) waiting forever.
    const socket = this.#socket;
    this.#graceTimer = setTimeout(() => socket.destroy(), connectionCloseGraceMs);
    this.#graceTimer.unref();
  }

  /** Ends the socket once every reply is handed to it (over TLS some may still be queued). */
  #endSocket(): void {
    this.#endAfterReplies = this.#tlsWriting;
    if (this.#endAfterReplies) return;
    const socket = this.#socket;
    socket.end(() => socket.destroy());
  }

  /** closed → released, once no device operation or handshake step runs: the device is closed, once. */
  #maybeRelease(): void {
    if (this.#state !== 'closed' || this.#inFlightCount > 0 || this.#handshakeBusy) return;
    this.#state = 'released';
    const session = this.#session;
    if (session === null) {
      this.#resolveDone();
      return;
    }
    session.device.close().then(
      () => this.#resolveDone(),
      (error: unknown) => {
        const where = `closing export ${JSON.stringify(session.exportName)}`;
        this.#log(`${where}: ${expectedError(error, where).message}`, 'warn');
        this.#resolveDone();
      },
    );
  }

  #log(line: string, level?: LogLevel): void {
    this.#options.log(`${this.#options.label}: ${line}`, level);
  }
}
