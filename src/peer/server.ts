// The peer port: a TLS 1.3 listener that takes only peers presenting a certificate from the cluster's CA, and
// serves the peer protocol (protocol.ts) on each connection.
//
//   accept ──► TLS handshake ──► name check ──► awaiting hello ──► ready (verbs) ──► closed
//      │            │                 │                │
//      │            │                 │                └─ no hello by the deadline, a malformed frame, another
//      │            │                 │                   verb first, no common version: error frame, closed
//      │            │                 └─ a name --peer-allow does not list: error frame (EPERM), closed
//      │            └─ no certificate, another CA's, expired, not TLS 1.3, garbage, a stall: refused by
//      │               OpenSSL (rejectUnauthorized), logged ("tlsClientError"); no request is ever read
//      └─ more than limits.peerConnectionsMax open: closed at once
//
// Bounded time: one deadline, limits.peerHandshakeTimeoutMs from accept, covers the TLS handshake and the hello
// (an absolute timer, not an idle one, so a peer that trickles bytes cannot stretch it). Bounded memory: OpenSSL
// holds at most a TLS record in progress; the frame reader checks each header before buffering its payload; a
// connection stops reading while limits.peerRequestsInFlightMax of its requests are being served.
//
// The peer's name is its certificate's subject CN (the CA vouches for it); hostnames play no part, since peers
// reach each other by address.
import net from 'node:net';
import tls from 'node:tls';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
import { connectionCloseGraceMs, peerConnectionsMax, peerHandshakeTimeoutMs, peerRequestsInFlightMax } from '../core/limits.ts';
import { steerTlsReads } from '../nbd/steered-socket.ts';
import { FrameQueue } from './client.ts';
import { certificateName, type TlsCredentials } from './credentials.ts';
import { tlsServerSuites } from '../core/tls-files.ts';
import {
  FrameKind, FrameReader, PeerVerb, encodeErrorFrame, encodeFrame, encodeHelloReply, negotiateVersion, parseHelloRequest,
  peerVersionMax, peerVersionMin, type Frame,
} from './protocol.ts';
import type { Log } from '../core/log.ts';

/** What a verb handler gets: the peer it serves, the version the connection speaks, and the connection itself. */
export interface PeerRequestContext {
  peerName: string;
  version: number;
  connection: PeerConnectionScope;
}

/** A connection as verb handlers see it: for state that lives as long as it does (a stream being received). */
export interface PeerConnectionScope {
  /** Unique among this server's connections. */
  readonly id: number;
  /**
   * Runs `callback` once when the connection closes (at once if it has); the function returned forgets it, for
   * state that ends before its connection does (a stream closed on a connection its owner keeps for the next).
   */
  onClose(callback: () => void): () => void;
}

/**
 * Serves one request of a verb; returns the reply payload (a JSON object, or a Buffer sent as it is: the bytes a
 * syncRead asks for), or throws a ChunkdError.
 */
export type VerbHandler = (payload: Buffer, context: PeerRequestContext) => Promise<object>;

export interface PeerServerOptions {
  /** This node's server pair and the cluster CA. */
  credentials: TlsCredentials;
  /** Peer names allowed in (serve --peer-allow), or null: any name the CA signed. */
  allow: ReadonlySet<string> | null;
  /** The pool's identity, sent in hello. */
  poolId: string;
  /** "chunkd 0.1.0": sent in hello, for people. */
  software: string;
  log: Log;
  /** Verbs after hello (replication adds its own); hello itself is the server's. */
  verbs?: ReadonlyMap<number, VerbHandler>;
  /** Default limits.peerHandshakeTimeoutMs; tests shorten it. */
  handshakeTimeoutMs?: number;
  /** Where a bulk verb's payload is gathered (FrameReader); default a fresh buffer in shared memory. */
  bulkPayload?: (size: number) => Buffer;
}

export interface PeerServerStats {
  listen: string[];
  name: string;
  connectionsOpen: number;
  connectionsTotal: number;
  /** Connections refused: TLS failures (no certificate, wrong CA, expired, garbage, stalls), names not allowed, over the limit. */
  refusedTotal: number;
  requestsTotal: number;
}

export class PeerServer {
  readonly #options: PeerServerOptions;
  readonly #server: tls.Server;
  readonly #sockets = new Set<net.Socket>();
  /** Each accepted connection's deadline for TLS and hello, by remote address; gone once hello is answered. */
  readonly #deadlines = new Map<string, NodeJS.Timeout>();
  /** Connections the deadline just ended, so that the TLS error their end causes is not logged twice. */
  readonly #timedOut = new Set<string>();
  readonly #handshakeTimeoutMs: number;
  #connectionsTotal = 0;
  #refusedTotal = 0;
  #requestsTotal = 0;
  #connectionIds = 0;
  #closing = false;

  constructor(options: PeerServerOptions) {
    this.#options = options;
    this.#handshakeTimeoutMs = options.handshakeTimeoutMs ?? peerHandshakeTimeoutMs;
    const { ca, cert, key } = options.credentials;
    this.#server = tls.createServer({
      minVersion: 'TLSv1.3',
      requestCert: true,
      rejectUnauthorized: true,
      ca,
      cert,
      key,
      // #accept sets the deadline that covers TLS and hello together; Node's own timer stays as a backstop.
      handshakeTimeout: 2 * this.#handshakeTimeoutMs,
      // This node's order of suites, not the client's (tls-files.ts says why).
      ...tlsServerSuites,
    });
    this.#server.on('connection', (socket: net.Socket) => this.#accept(socket));
    this.#server.on('tlsClientError', (error: Error, socket: tls.TLSSocket) => {
      socket.destroy();
      const where = remoteOfTls(socket);
      // A connection the deadline ended is logged and counted there already.
      if (this.#timedOut.delete(where)) return;
      this.#refusedTotal += 1;
      this.#options.log(`peer connection from ${where} refused: ${describeTlsError(error, socket.authorizationError)}`, 'warn');
    });
    this.#server.on('secureConnection', (socket: tls.TLSSocket) => this.#serve(socket));
  }

  async listen(host: string, port: number): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once('error', reject);
      this.#server.listen({ host, port }, () => {
        this.#server.off('error', reject);
        resolve();
      });
    });
    this.#server.on('error', (error) => this.#options.log(`peer listener: ${error.message}`, 'error'));
  }

  addresses(): string[] {
    const address = this.#server.address();
    if (address === null || typeof address === 'string') return [];
    return [address.family === 'IPv6' ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`];
  }

  stats(): PeerServerStats {
    return {
      listen: this.addresses(),
      name: this.#options.credentials.name,
      connectionsOpen: this.#sockets.size,
      connectionsTotal: this.#connectionsTotal,
      refusedTotal: this.#refusedTotal,
      requestsTotal: this.#requestsTotal,
    };
  }

  /** Stops accepting and closes every connection (peers retry; nothing a peer asked is left half done by hello). */
  async close(): Promise<void> {
    this.#closing = true;
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    for (const socket of this.#sockets) socket.destroy();
    await closed;
  }

  #accept(socket: net.Socket): void {
    if (this.#closing || this.#sockets.size >= peerConnectionsMax) {
      this.#refusedTotal += 1;
      this.#options.log(`peer connection from ${remote(socket)} refused: ${this.#closing ? 'the node is stopping' : `${peerConnectionsMax} peer connections are open already`}`);
      socket.destroy();
      return;
    }
    this.#connectionsTotal += 1;
    this.#sockets.add(socket);
    socket.once('close', () => this.#sockets.delete(socket));
    // The deadline for the TLS handshake and the hello together; #serve clears it when hello is answered.
    const deadline = setTimeout(() => {
      if (socket.destroyed) return;
      this.#refusedTotal += 1;
      this.#options.log(`peer connection from ${remote(socket)} closed: no TLS handshake and hello within ${this.#handshakeTimeoutMs} ms`);
      this.#timedOut.add(remote(socket));
      socket.destroy();
      // The TLS layer reports the end as a client error once the socket has closed, or not at all (hello was late).
      setTimeout(() => this.#timedOut.delete(remote(socket)), 1_000).unref();
    }, this.#handshakeTimeoutMs);
    deadline.unref();
    // Keyed by the remote address and port, which name one open connection, and which the TLS socket that
    // #serve gets reports alike (the raw socket is not reachable from it through public API).
    const key = remote(socket);
    this.#deadlines.set(key, deadline);
    socket.once('close', () => {
      clearTimeout(deadline);
      if (this.#deadlines.get(key) === deadline) this.#deadlines.delete(key);
    });
  }

  #serve(socket: tls.TLSSocket): void {
    // rejectUnauthorized: OpenSSL has checked the chain to our CA, the dates and the key usage already.
    assert(socket.authorized, 'a peer connection is authorized once its TLS handshake is done');
    const where = remote(socket);
    const name = certificateName(socket.getPeerCertificate().subject as unknown as Record<string, unknown>);
    const refuse = (reason: string, error: ChunkdError): void => {
      this.#clearDeadline(where);
      this.#refusedTotal += 1;
      this.#options.log(`peer connection from ${where} refused: ${reason}`, 'warn');
      socket.end(Buffer.concat(encodeErrorFrame(0, 0, error)));
      setTimeout(() => socket.destroy(), connectionCloseGraceMs).unref();
    };
    if (name === null) return refuse('its certificate has no valid name (subject CN)', new ChunkdError('EPERM', 'the certificate has no valid name (subject CN)'));
    if (this.#options.allow !== null && !this.#options.allow.has(name)) {
      return refuse(`peer ${name} is not in --peer-allow`, new ChunkdError('EPERM', `peer ${name} is not allowed on node ${this.#options.credentials.name}`));
    }
    socket.setKeepAlive(true, 30_000);
    // Small answers (a synchronous replica's to each write) go at once, not after the previous one's ACK (Nagle).
    socket.setNoDelay(true);
    new PeerConnection(socket, name, where, this, () => this.#clearDeadline(where)).start();
  }

  #clearDeadline(where: string): void {
    clearTimeout(this.#deadlines.get(where));
    this.#deadlines.delete(where);
  }

  /** For PeerConnection: the server's options and counters. */
  get options(): PeerServerOptions {
    return this.#options;
  }

  nextConnectionId(): number {
    this.#connectionIds += 1;
    return this.#connectionIds;
  }

  countRequest(): void {
    this.#requestsTotal += 1;
  }

  countRefused(): void {
    this.#refusedTotal += 1;
  }
}

/** One peer's connection after TLS: hello first, then the verbs, with a bound on requests in flight. */
class PeerConnection {
  readonly #socket: tls.TLSSocket;
  readonly #peerName: string;
  readonly #where: string;
  readonly #server: PeerServer;
  readonly #onHello: () => void;
  /** Bulk payloads (stream bytes, synchronous writes) land in the buffers PeerServerOptions.bulkPayload gives. */
  readonly #reader: FrameReader;
  #state: 'awaiting-hello' | 'ready' | 'closing' = 'awaiting-hello';
  #version = 0;
  #inFlight = 0;
  readonly #scope: PeerConnectionScope;

  constructor(socket: tls.TLSSocket, peerName: string, where: string, server: PeerServer, onHello: () => void) {
    this.#socket = socket;
    this.#peerName = peerName;
    this.#where = where;
    this.#server = server;
    this.#onHello = onHello;
    this.#reader = new FrameReader({ bulkPayload: server.options.bulkPayload ?? ((size) => Buffer.from(new SharedArrayBuffer(size))) });
    const id = server.nextConnectionId();
    this.#scope = {
      id,
      onClose: (callback) => {
        if (socket.destroyed) {
          queueMicrotask(callback);
          return () => {};
        }
        socket.once('close', callback);
        return () => void socket.off('close', callback);
      },
    };
  }

  start(): void {
    const socket = this.#socket;
    // Reads land where the frame reader says (a bulk payload's own buffer): see FrameReader. What TLS decrypted
    // before this (the handshake is over: the hello may be here already) waits in the socket's readable buffer.
    const steered = steerTlsReads(socket, {
      nextReadBuffer: () => this.#reader.nextReadBuffer(),
      onRead: (count, buffer) => {
        this.#reader.onRead(count, buffer);
        this.#pump();
      },
    });
    if (steered) {
      for (let chunk: Buffer | null; (chunk = socket.read() as Buffer | null) !== null;) this.#reader.push(chunk);
      this.#pump();
    } else {
      socket.on('data', (chunk: Buffer) => {
        this.#reader.push(chunk);
        this.#pump();
      });
    }
    socket.on('error', () => {}); // a reset peer: 'close' follows
  }

  #pump(): void {
    while (this.#state !== 'closing' && this.#inFlight < peerRequestsInFlightMax) {
      let frame: Frame | null;
      try {
        frame = this.#reader.next();
      } catch (error) {
        return this.#fail(error);
      }
      if (frame === null) return;
      this.#handle(frame);
    }
    // Too many requests in flight: stop reading until one finishes (#pump runs again then).
    if (this.#state !== 'closing') this.#socket.pause();
  }

  #handle(frame: Frame): void {
    if (frame.kind !== FrameKind.request) return this.#fail(ChunkdError.protocol(`a peer sends requests only, not frames of kind ${frame.kind}`));
    if (this.#state === 'awaiting-hello') {
      if (frame.verb !== PeerVerb.hello) return this.#fail(ChunkdError.protocol(`the first request must be hello (verb ${PeerVerb.hello}), not verb ${frame.verb}`));
      return this.#hello(frame);
    }
    if (frame.verb === PeerVerb.hello) return this.#fail(ChunkdError.protocol('hello twice on one connection'));
    const handler = this.#server.options.verbs?.get(frame.verb);
    if (handler === undefined) {
      this.#send(encodeErrorFrame(frame.verb, frame.requestId, new ChunkdError('ENOTSUP', `verb ${frame.verb} is not known to this node (protocol version ${this.#version})`)));
      return;
    }
    this.#server.countRequest();
    this.#inFlight += 1;
    handler(frame.payload, { peerName: this.#peerName, version: this.#version, connection: this.#scope }).then(
      (reply) => this.#send(encodeFrame(FrameKind.reply, frame.verb, frame.requestId, Buffer.isBuffer(reply) ? reply : Buffer.from(JSON.stringify(reply), 'utf8'))),
      (error: unknown) => this.#send(encodeErrorFrame(frame.verb, frame.requestId, expectedError(error, `peer verb ${frame.verb}`))),
    ).finally(() => {
      this.#inFlight -= 1;
      if (this.#state !== 'closing') {
        this.#socket.resume();
        this.#pump();
      }
    });
  }

  #hello(frame: Frame): void {
    let version: number | null;
    try {
      version = negotiateVersion(parseHelloRequest(frame.payload));
    } catch (error) {
      return this.#fail(error);
    }
    this.#server.countRequest();
    if (version === null) {
      const request = parseHelloRequest(frame.payload);
      const error = new ChunkdError('ENOTSUP', `no common protocol version: the peer speaks ${request.versionMin}-${request.versionMax}, this node ${peerVersionMin}-${peerVersionMax}`);
      this.#server.options.log(`peer ${this.#peerName} (${this.#where}) refused: ${error.message}`, 'warn');
      this.#server.countRefused();
      return this.#close(encodeErrorFrame(frame.verb, frame.requestId, error));
    }
    this.#version = version;
    this.#state = 'ready';
    this.#onHello();
    const { credentials, poolId, software } = this.#server.options;
    this.#send(encodeHelloReply(frame.requestId, { version, name: credentials.name, software, poolId }));
    this.#server.options.log(`peer ${this.#peerName} connected from ${this.#where} (protocol version ${version})`);
  }

  /** A protocol violation: one error frame about the connection, then close. Anything not ours is a bug. */
  #fail(error: unknown): void {
    if (!(error instanceof ChunkdError) || error.code !== 'EPROTO') throw error;
    this.#server.options.log(`peer ${this.#peerName} (${this.#where}): protocol error, closing: ${error.message}`, 'warn');
    this.#close(encodeErrorFrame(0, 0, error));
  }

  #close(last: Buffer[]): void {
    this.#state = 'closing';
    this.#socket.removeAllListeners('data');
    // The replies queued in this turn go first.
    this.#socket.end(Buffer.concat([...this.#out.take(), ...last]));
    setTimeout(() => this.#socket.destroy(), connectionCloseGraceMs).unref();
  }

  #send(buffers: Buffer[]): void {
    if (this.#state === 'closing' || this.#socket.destroyed) return;
    // The replies of one turn of the event loop leave in one socket write (FrameQueue says why).
    for (const buffer of buffers) this.#out.push(buffer);
  }

  readonly #out = new FrameQueue(() => (this.#state === 'closing' || this.#socket.destroyed ? null : this.#socket));
}

function remote(socket: net.Socket): string {
  const address = socket.remoteAddress ?? '?';
  return `${address.includes(':') ? `[${address}]` : address}:${socket.remotePort ?? '?'}`;
}

/**
 * The address of a TLS socket whose handshake failed: a reset one no longer knows it, but the TCP socket under
 * it does (#accept read it, which caches it). `_parent` is Node's internal link to it: for a log line only.
 */
export function remoteOfTls(socket: tls.TLSSocket): string {
  if (socket.remoteAddress !== undefined) return remote(socket);
  const parent = (socket as unknown as { _parent?: unknown })._parent;
  return parent instanceof net.Socket && parent.remoteAddress !== undefined ? remote(parent) : 'an unknown address';
}

/**
 * One line for a refused TLS handshake: what was wrong with the peer, in words. OpenSSL itself refuses a peer
 * without a certificate; one whose certificate fails verification (another CA, expired) completes OpenSSL's
 * handshake and is then destroyed by Node before 'secureConnection', with the reason in `authorizationError`
 * and a "socket hang up" as the error.
 */
export function describeTlsError(error: Error, authorizationError?: string | Error | null): string {
  const code = (error as NodeJS.ErrnoException).code ?? '';
  const reason = (error as { reason?: string }).reason;
  const verifyCode = typeof authorizationError === 'string' ? authorizationError : authorizationError?.message;
  if (verifyCode) return `its certificate failed verification: ${certificateProblem(verifyCode)}`;
  if (code === 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE') return 'the peer presented no certificate';
  if (code === 'ERR_SSL_WRONG_VERSION_NUMBER' || code === 'ERR_SSL_HTTP_REQUEST' || code === 'ERR_SSL_PACKET_LENGTH_TOO_LONG') return `not TLS (${reason ?? code})`;
  if (code === 'ERR_SSL_UNSUPPORTED_PROTOCOL' || code === 'ERR_SSL_NO_PROTOCOLS_AVAILABLE') return `not TLS 1.3 (${reason ?? code})`;
  if (code === 'ECONNRESET') return 'the peer closed the connection during the TLS handshake';
  if (code === 'ERR_SSL_TLSV1_ALERT_UNKNOWN_CA' || code === 'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE') return `the peer refused this node's certificate (${code})`;
  if (/timed out/i.test(error.message)) return 'the TLS handshake timed out';
  return `${reason ?? error.message}${code ? ` (${code})` : ''}`;
}

/** OpenSSL's verification codes (as Node names them) in words. */
function certificateProblem(code: string): string {
  if (code === 'CERT_HAS_EXPIRED') return 'expired (CERT_HAS_EXPIRED)';
  if (code === 'CERT_NOT_YET_VALID') return 'not valid yet (CERT_NOT_YET_VALID)';
  if (/UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT|SELF_SIGNED|CERT_SIGNATURE_FAILURE/.test(code)) return `not issued by this cluster's CA (${code})`;
  if (code === 'INVALID_PURPOSE') return 'not a client certificate (INVALID_PURPOSE: its extendedKeyUsage lacks clientAuth)';
  return code;
}
