// The NBD server: listeners (TCP and unix sockets) that hand each accepted socket to an NbdConnection, a cap
// on connections, counters, and an orderly close. The protocol lives in handshake.ts (options), connection.ts (a
// connection's life and flow control), receiver.ts (bytes to requests) and commands.ts (what each command means).
import { emptyProtocolStageTimes, type ProtocolStageTimes } from '../store/stage-times.ts';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { ChunkdError } from '../core/errors.ts';
import { claimSocketPath } from '../core/unix-socket.ts';
import type { DeviceProvider } from '../core/block-device.ts';
import { connectionsMax, handshakeTimeoutMs } from '../core/limits.ts';
import type { SharedBufferPool } from '../core/shared-buffers.ts';
import { NbdConnection } from './connection.ts';
import type { RequestCounters } from './connection.ts';
import type { TlsSettings } from './tls.ts';
import { emptyIdlePollCounters, type IdlePollCounters } from './idle-poll.ts';
import type { Log } from '../core/log.ts';

export interface NbdServerOptions {
  provider: DeviceProvider;
  log?: Log;
  /** Overrides limits.handshakeTimeoutMs (tests). */
  handshakeTimeoutMs?: number;
  /** Overrides limits.connectionsMax (tests). */
  connectionsMax?: number;
  /** Request buffers in shared memory, when the devices' chunk I/O runs on worker threads (connection.ts). */
  sharedBuffers?: SharedBufferPool | null;
  /** TLS offered or required on every listener (tls.ts); null or absent: off. */
  tls?: TlsSettings | null;
  /** Microseconds a connection polls for the next request once idle (idle-poll.ts); 0 or absent: off. */
  pollUs?: number;
}

export interface NbdServerStats {
  connectionsOpen: number;
  connectionsTotal: number;
  requestsTotal: number;
  requestErrorsTotal: number;
  /** Time in the front end's own stages (store/stage-times.ts). */
  stages: ProtocolStageTimes;
  /** Idle waits polled (idle-poll.ts). */
  idlePoll: IdlePollCounters;
}

export class NbdServer {
  readonly #provider: DeviceProvider;
  readonly #log: Log;
  readonly #handshakeTimeoutMs: number;
  readonly #connectionsMax: number;
  readonly #sharedBuffers: SharedBufferPool | null;
  readonly #tls: TlsSettings | null;
  readonly #pollUs: number;
  readonly #listeners: net.Server[] = [];
  readonly #connections = new Set<NbdConnection>();
  readonly #counters: RequestCounters = { requestsTotal: 0, requestErrorsTotal: 0, stages: emptyProtocolStageTimes(), idlePoll: emptyIdlePollCounters() };
  #connectionsTotal = 0;
  #closing: Promise<void> | null = null;

  constructor(options: NbdServerOptions) {
    this.#provider = options.provider;
    this.#log = options.log ?? (() => {});
    this.#handshakeTimeoutMs = options.handshakeTimeoutMs ?? handshakeTimeoutMs;
    this.#connectionsMax = options.connectionsMax ?? connectionsMax;
    this.#sharedBuffers = options.sharedBuffers ?? null;
    this.#tls = options.tls ?? null;
    this.#pollUs = options.pollUs ?? 0;
  }

  /** Listens on a TCP address (port 0 picks a free port: see addresses()). */
  async listenTcp(host: string, port: number, options: { reusePort?: boolean } = {}): Promise<void> {
    // reusePort: several threads each listen on the same port and the kernel spreads connections among them.
    await this.#listen({ host, port, reusePort: options.reusePort === true }, true);
  }

  /**
   * Listens on a unix socket. A stale socket file (nothing accepts on it: ECONNREFUSED) is replaced; a socket
   * someone answers on, or a path that is not a socket, is refused with ChunkdError EBUSY.
   */
  async listenUnix(path: string): Promise<void> {
    await claimSocketPath(path);
    await this.#listen({ path }, false);
  }

  /** The addresses listened on: "host:port" for TCP (with the port chosen when 0 was asked), the path for unix. */
  addresses(): string[] {
    return this.#listeners.map((listener) => describe(listener.address()));
  }

  /**
   * Stops accepting, lets in-flight requests finish and get their replies, then closes every connection (those
   * still in the handshake at once). Resolves when all are closed and every opened device has been closed.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  /**
   * Ends every connection to `exportName` as a server shutdown does: requests in flight finish and get their
   * replies, then the connection closes (a handoff moved the volume; clients reconnect to its new owner).
   * Returns how many connections it ended.
   */
  disconnectExport(exportName: string): number {
    let count = 0;
    for (const connection of this.#connections) {
      if (connection.exportName !== exportName) continue;
      connection.shutdown();
      count += 1;
    }
    return count;
  }

  /** Counters since the server was made. */
  stats(): NbdServerStats {
    return {
      connectionsOpen: this.#connections.size,
      connectionsTotal: this.#connectionsTotal,
      requestsTotal: this.#counters.requestsTotal,
      requestErrorsTotal: this.#counters.requestErrorsTotal,
      stages: this.#counters.stages,
      idlePoll: { ...this.#counters.idlePoll },
    };
  }

  async #listen(address: net.ListenOptions, tcp: boolean): Promise<void> {
    if (this.#closing !== null) throw new ChunkdError('ESHUTDOWN', 'the NBD server is closed');
    // allowHalfOpen: a client that shuts down its sending side still gets the replies to what it sent.
    // pauseOnConnect: the connection moves the socket to reads it steers before anything is read (connection.ts).
    const listener = net.createServer({ allowHalfOpen: true, noDelay: tcp, pauseOnConnect: true }, (socket) => this.#accept(socket, tcp));
    await new Promise<void>((resolve, reject) => {
      listener.once('error', reject);
      listener.listen(address, () => {
        listener.off('error', reject);
        resolve();
      });
    });
    listener.on('error', (error) => this.#log(`nbd listener: ${error.message}`, 'error'));
    this.#listeners.push(listener);
    this.#log(`nbd: listening on ${describe(listener.address())}${this.#tls === null ? '' : ` (TLS ${this.#tls.mode}${this.#tls.verifyPeer ? ', clients verified' : ''})`}`);
  }

  #accept(socket: net.Socket, tcp: boolean): void {
    if (this.#closing !== null || this.#connections.size >= this.#connectionsMax) {
      this.#log(`nbd: refusing a connection: ${this.#closing !== null ? 'closing' : `${this.#connectionsMax} connections open`}`, 'warn');
      socket.on('error', () => {});
      socket.destroy();
      return;
    }
    this.#connectionsTotal += 1;
    if (tcp) socket.setNoDelay(true);
    const label = `nbd#${this.#connectionsTotal}${tcp ? ` ${socket.remoteAddress}:${socket.remotePort}` : ''}`;
    const connection = new NbdConnection(socket, {
      provider: this.#provider,
      log: this.#log,
      counters: this.#counters,
      handshakeTimeoutMs: this.#handshakeTimeoutMs,
      label,
      sharedBuffers: this.#sharedBuffers,
      tls: this.#tls,
      pollUs: this.#pollUs,
    });
    this.#connections.add(connection);
    void connection.done.then(() => this.#connections.delete(connection));
  }

  async #close(): Promise<void> {
    const listenersClosed = this.#listeners.map((listener) => new Promise<void>((resolve) => listener.close(() => resolve())));
    for (const connection of this.#connections) connection.shutdown();
    await Promise.all([...listenersClosed, ...[...this.#connections].map((connection) => connection.done)]);
  }
}

function describe(address: AddressInfo | string | null): string {
  if (address === null) return 'nothing';
  if (typeof address === 'string') return address;
  return address.family === 'IPv6' ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`;
}
