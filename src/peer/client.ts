// The client side of the peer port: a mutual TLS 1.3 connection presenting this node's (or an admin's) client
// pair, a hello, then requests, each answered by a reply or an error frame with the same request id.
//
// The server is checked against the cluster CA, and its name is its certificate's CN; host names play no part
// (peers are reached by address), but `expectName` makes a connection to any other name fail. Every failure
// is a ChunkdError with one line that says what went wrong: nothing listening, a refused certificate (ours or
// theirs), a name not allowed, no common version, no answer in time.
import tls from 'node:tls';
import { ChunkdError } from '../core/errors.ts';
import { peerClientTimeoutMs } from '../core/limits.ts';
import { tlsCipherSuites } from '../core/tls-files.ts';
import { certificateName, type TlsCredentials } from './credentials.ts';
import {
  FrameKind, FrameReader, PeerVerb, encodeFrameHeader, helloRequestPayload, parseErrorPayload, parseHelloReply, type Frame, type HelloReply,
} from './protocol.ts';

export interface PeerClientOptions {
  host: string;
  port: number;
  /** This side's client pair and the cluster CA. */
  credentials: TlsCredentials;
  /** Refuse a server whose certificate names another node. */
  expectName?: string;
  /** Connect, TLS and hello together; default limits.peerClientTimeoutMs. */
  timeoutMs?: number;
}

export class PeerClient {
  readonly #socket: tls.TLSSocket;
  readonly #where: string;
  readonly #reader = new FrameReader();
  readonly #pending = new Map<number, { resolve: (frame: Frame) => void; reject: (error: ChunkdError) => void }>();
  #nextRequestId = 1;
  #failure: ChunkdError | null = null;
  readonly #ended = Promise.withResolvers<ChunkdError>();
  /** What the server said in hello. */
  hello!: HelloReply;

  private constructor(socket: tls.TLSSocket, where: string) {
    this.#socket = socket;
    this.#where = where;
    socket.on('data', (chunk: Buffer) => {
      this.#reader.push(chunk);
      this.#pump();
    });
    socket.on('error', (error) => this.#fail(describeClientError(error, where)));
    // A server refuses a certificate from another CA, or an expired one, by closing once TLS is done: no alert.
    socket.on('close', () => this.#fail(new ChunkdError('EPERM', `the peer at ${where} closed the connection without an answer: it refused this client's certificate (another CA, expired, or a name it does not allow), or it is not a chunkd peer port; its log says which`)));
  }

  /** Connects, checks the server's certificate, says hello; the connection is ready for requests when it resolves. */
  static async connect(options: PeerClientOptions): Promise<PeerClient> {
    const where = options.host.includes(':') ? `[${options.host}]:${options.port}` : `${options.host}:${options.port}`;
    const { ca, cert, key } = options.credentials;
    let serverName: string | null = null;
    const socket = tls.connect({
      host: options.host,
      port: options.port,
      minVersion: 'TLSv1.3',
      ciphers: tlsCipherSuites,
      ca,
      cert,
      key,
      // The chain to our CA is checked (rejectUnauthorized); the name is the CN, not the host name.
      rejectUnauthorized: true,
      checkServerIdentity: (_host, peer) => {
        serverName = certificateName(peer.subject as unknown as Record<string, unknown>);
        if (serverName === null) return new Error('the peer certificate has no valid name (subject CN)');
        if (options.expectName !== undefined && serverName !== options.expectName) return new Error(`the peer is ${serverName}, not ${options.expectName}`);
        return undefined;
      },
    });
    // Requests are small frames answered by small frames (synchronous replicas' writes): Nagle's algorithm would
    // hold each back until the previous one is acknowledged.
    socket.setNoDelay(true);
    const client = new PeerClient(socket, where);
    const timeoutMs = options.timeoutMs ?? peerClientTimeoutMs;
    const timer = setTimeout(() => client.#fail(new ChunkdError('EIO', `no answer from the peer at ${where} within ${timeoutMs} ms`)), timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('secureConnect', resolve);
        client.#pending.set(0, { resolve: () => {}, reject });
      });
      client.#pending.delete(0);
      const reply = await client.#request(PeerVerb.hello, helloRequestPayload());
      client.hello = parseHelloReply(reply.payload);
      if (client.hello.name !== serverName) throw ChunkdError.protocol(`the peer at ${where} says it is ${client.hello.name}, but its certificate names ${serverName}`);
      return client;
    } catch (error) {
      client.close();
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Sends a request of `verb` and resolves with the reply's payload; an error frame rejects with its error. A
   * payload given as pieces is written as they are, not joined first (a stream's data frames).
   */
  async request(verb: number, payload: Buffer | Buffer[]): Promise<Buffer> {
    return (await this.#request(verb, payload)).payload;
  }

  /** Whether the connection has ended (a failure, the peer's close, or close()): no request can go on it any more. */
  get closed(): boolean {
    return this.#failure !== null;
  }

  /** Resolves with the first failure that ends the connection (close() included): a connection idle for long learns it too. */
  get ended(): Promise<ChunkdError> {
    return this.#ended.promise;
  }

  close(): void {
    this.#fail(new ChunkdError('ESHUTDOWN', 'the connection was closed'));
    this.#socket.destroy();
  }

  #request(verb: number, payload: Buffer | Buffer[]): Promise<Frame> {
    if (this.#failure !== null) return Promise.reject(this.#failure);
    const requestId = this.#nextRequestId;
    this.#nextRequestId = this.#nextRequestId === 0xffffffff ? 1 : this.#nextRequestId + 1;
    const pieces = Array.isArray(payload) ? payload : [payload];
    const payloadBytes = pieces.reduce((sum, piece) => sum + piece.length, 0);
    return new Promise<Frame>((resolve, reject) => {
      this.#pending.set(requestId, { resolve, reject });
      // The requests of this turn of the event loop leave together at its end (FrameQueue): one TLS write and one
      // wake-up of the peer for a burst of small ones (a synchronous replica's writes at a queue depth of 32), not
      // one per request; a large piece goes as a write of its own.
      this.#out.push(encodeFrameHeader(FrameKind.request, verb, requestId, payloadBytes));
      for (const piece of pieces) this.#out.push(piece);
    });
  }

  readonly #out = new FrameQueue(() => this.#failure === null ? this.#socket : null);

  #pump(): void {
    for (;;) {
      let frame: Frame | null;
      try {
        frame = this.#reader.next();
        if (frame === null) return;
        if (frame.kind === FrameKind.request) throw ChunkdError.protocol(`the peer at ${this.#where} sent a request; a server only answers`);
        if (frame.kind === FrameKind.error && frame.requestId === 0) {
          // About the connection itself: the server refused us or found us at fault, and closes.
          const error = parseErrorPayload(frame.payload);
          throw new ChunkdError(error.code, `the peer at ${this.#where} refused: ${error.message}`);
        }
        const waiting = this.#pending.get(frame.requestId);
        if (waiting === undefined) throw ChunkdError.protocol(`the peer at ${this.#where} answered request ${frame.requestId}, which was not asked`);
        this.#pending.delete(frame.requestId);
        if (frame.kind === FrameKind.error) waiting.reject(parseErrorPayload(frame.payload));
        else waiting.resolve(frame);
      } catch (error) {
        if (!(error instanceof ChunkdError)) throw error;
        this.#fail(error);
        this.#socket.destroy();
        return;
      }
    }
  }

  /** The first failure ends the connection: every request waiting gets it, and so does every later one. */
  #fail(error: ChunkdError): void {
    this.#failure ??= error;
    this.#ended.resolve(this.#failure);
    for (const { reject } of this.#pending.values()) reject(this.#failure);
    this.#pending.clear();
  }
}

/** The most bytes joined into one socket write; a larger piece is a write of its own. */
const joinedWriteBytesMax = 256 * 1024;

/**
 * The frames one side of a peer connection sends (PeerClient's requests, the peer server's replies), written from
 * the end of the turn of the event loop that queued them, one socket write at a time. Pieces are joined into one
 * buffer of up to joinedWriteBytesMax first: each piece written costs the stream's bookkeeping (about 100 pieces a
 * turn for a synchronous replica's 4 KiB writes at a queue depth of 32), and each write ends in a TLS record that
 * may be short, which the receiver decrypts and is called back for like a full one. A larger piece (a 1 MiB write's
 * data) is a write of its own, and the next write waits for its callback: Node's TLS socket copies a write of
 * several buffers (a writev, which is also what its writable buffer makes of writes queued behind one in progress)
 * into one buffer before encrypting it, and encrypts a write of one buffer where it lies. Measured on 1 MiB
 * syncWrites (the header and the data went corked), that join copied every byte the sender sent once more. The
 * bar for going alone is high (not one TLS record's 16 KiB, as for NBD replies) because a stream's frames mix small
 * records with views of any size: each piece between short ones written alone would add two short records.
 */
export class FrameQueue {
  #pieces: Buffer[] = [];
  /** Whether a write is in progress or one is due at the turn's end: what is pushed meanwhile waits for it. */
  #busy = false;
  /** The socket to write to, or null when the connection is failing (the frames are dropped). */
  readonly #target: () => tls.TLSSocket | null;

  constructor(target: () => tls.TLSSocket | null) {
    this.#target = target;
  }

  push(piece: Buffer): void {
    if (!this.#busy) {
      this.#busy = true;
      setImmediate(this.#writeNext);
    }
    this.#pieces.push(piece);
  }

  /** The frames queued and not written yet, taken out (a connection ending sends them with its last frame). */
  take(): Buffer[] {
    const pieces = this.#pieces;
    this.#pieces = [];
    return pieces;
  }

  /** The next write: one piece of more than joinedWriteBytesMax alone, or smaller ones joined up to that. */
  #nextWrite(): Buffer | null {
    const pieces = this.#pieces;
    if (pieces.length === 0) return null;
    let count = 1;
    let bytes = pieces[0]!.length;
    while (bytes <= joinedWriteBytesMax && count < pieces.length && bytes + pieces[count]!.length <= joinedWriteBytesMax) {
      bytes += pieces[count]!.length;
      count += 1;
    }
    const taken = count === pieces.length ? pieces : pieces.slice(0, count);
    this.#pieces = count === pieces.length ? [] : pieces.slice(count);
    return count === 1 ? taken[0]! : Buffer.concat(taken, bytes);
  }

  readonly #writeNext = (): void => {
    const socket = this.#target();
    const write = socket === null ? null : this.#nextWrite();
    if (socket === null || write === null) {
      if (socket === null) this.#pieces = [];
      this.#busy = false;
      return;
    }
    socket.write(write, this.#written);
  };

  readonly #written = (error?: Error | null): void => {
    // A failed write ends the connection ('error', then 'close'): nothing more is written.
    if (error) {
      this.#pieces = [];
      this.#busy = false;
      return;
    }
    this.#writeNext();
  };
}

/** One line for a connection failure, saying whose certificate was refused where it can tell (also the CLI's, for the API on TCP). */
export function describeClientError(error: Error, where: string, who = `the peer at ${where}`): ChunkdError {
  const code = (error as NodeJS.ErrnoException).code ?? '';
  if (code === 'ECONNREFUSED') return new ChunkdError('ENOENT', `nothing listens at ${where} (is the node started with --peer-listen?)`);
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return new ChunkdError('ENOENT', `cannot resolve the host of ${where}`);
  // Our checkServerIdentity's own refusals (a name missing or not the one expected).
  if (code === '' && /^the peer/.test(error.message)) return new ChunkdError('EPERM', `${who} is refused: ${error.message}`);
  if (code === 'CERT_HAS_EXPIRED') return new ChunkdError('EPERM', `${who} presented an expired certificate`);
  if (code === 'UNABLE_TO_VERIFY_LEAF_SIGNATURE' || code === 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY' || code === 'SELF_SIGNED_CERT_IN_CHAIN' || code === 'DEPTH_ZERO_SELF_SIGNED_CERT' || code === 'CERT_SIGNATURE_FAILURE') {
    return new ChunkdError('EPERM', `${who} presented a certificate this cluster's CA did not issue (${code})`);
  }
  // The server's alerts about our certificate (TLS 1.3 sends them after our side thought the handshake done).
  if (/ALERT_CERTIFICATE_REQUIRED/.test(code)) return new ChunkdError('EPERM', `${who} refused this client: it requires a client certificate`);
  if (/ALERT_UNKNOWN_CA|ALERT_BAD_CERTIFICATE|ALERT_DECRYPT_ERROR/.test(code)) return new ChunkdError('EPERM', `${who} refused this client's certificate: not issued by its CA (${code})`);
  if (/ALERT_CERTIFICATE_EXPIRED/.test(code)) return new ChunkdError('EPERM', `${who} refused this client's certificate: expired`);
  if (/ALERT_PROTOCOL_VERSION|WRONG_VERSION_NUMBER|UNSUPPORTED_PROTOCOL/.test(code)) return new ChunkdError('EPROTO', `${who} does not speak TLS 1.3 (${code})`);
  if (code === 'ECONNRESET' || code === 'EPIPE') return new ChunkdError('EIO', `${who} closed the connection: it refused this client's certificate (another CA or expired), or is not what was asked for; its log says which`);
  return new ChunkdError('EIO', `connection to ${who} failed: ${error.message}${code ? ` (${code})` : ''}`);
}
