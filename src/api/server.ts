// The management API: HTTP/1.1 + JSON on a unix socket (mode 0600), and on TCP with mutual TLS if asked (--api-listen), routes under /v1/, and /metrics in
// Prometheus text format. It validates what comes in (URL, names, sizes, body) and calls the control plane;
// every ChunkdError (and system error) becomes a JSON error with a status code and the error's stable code, and
// anything else is a bug that stops the node (core/fail-stop.ts).
import type http from 'node:http';
import type https from 'node:https';
import type net from 'node:net';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ChunkdError, type ErrorCode } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
import { parseHostPort } from '../core/host-port.ts';
import { apiBodyBytesMax, syncReplicaTimeoutMsDefault } from '../core/limits.ts';
import { validateName } from '../core/names.ts';
import { closeHttpServer, listenOwnerOnly } from '../core/unix-socket.ts';
import type { CountedSnapshotInfo, SnapshotInfo, VolumeInfo } from '../store/pool.ts';
import type { ScrubReport } from '../store/scrub.ts';
import type { PreparedSend } from '../replication/send.ts';
import type { ReceiveResult } from '../replication/receive.ts';
import { defaultEveryMs, type ReplicaSettings } from '../replication/replicator.ts';
import type { SyncReplicaSettings } from '../replication/sync-replicas.ts';
import type { Log } from '../core/log.ts';
import type { VolumePlacement } from '../cluster/remote-create.ts';

// node:http and node:https as Node's own (CommonJS) objects rather than ES module imports: an import builds an ES
// module facade of node:http, which reads every export, and one of them is a lazy getter that loads undici (fetch,
// WebSocket): 15-45 ms of CPU at each start of a node, for nothing a node uses (BENCHMARKS.md, issue 15, "The
// fixed part of a node's start"; operator.test.ts checks that a node's modules load no undici).
const { createServer } = process.getBuiltinModule('node:http');

/** Progress lines of a long operation go out at most this often. */
const progressIntervalMs = 250;

export interface DiffReport {
  volume: string;
  from: string;
  to: string | null;
  changedBytes: number;
  extents: Array<{ offsetBytes: number; lengthBytes: number }>;
}

export interface ControlPlane {
  listVolumes(): VolumeInfo[];
  volumeInfo(name: string): VolumeInfo;
  /** `replicas`: replica links to that many other nodes of the cluster (node.ts); 0 or absent: none. */
  /** `where`: in a cluster, the node named, or 'placed' (the most free space: cluster/placement.ts). */
  createVolume(name: string, sizeBytes: number, replicas?: number, sync?: { timeoutMs: number } | null, where?: VolumePlacement): Promise<VolumeInfo>;
  resizeVolume(name: string, sizeBytes: number, force: boolean): Promise<VolumeInfo>;
  /** The volume's replicas made synchronous (`sync`: their timeout) or asynchronous (null): volume set --sync. */
  setVolumeSync(name: string, sync: { timeoutMs: number } | null): Promise<unknown>;
  removeVolume(name: string): Promise<void>;
  createSnapshot(volume: string, snapshot: string): Promise<SnapshotInfo>;
  /** With what each snapshot holds alone (`Pool.countedSnapshots`). */
  listSnapshots(volume: string): Promise<CountedSnapshotInfo[]>;
  snapshotInfo(volume: string, snapshot: string): Promise<CountedSnapshotInfo>;
  removeSnapshot(volume: string, snapshot: string): Promise<void>;
  rollbackVolume(volume: string, snapshot: string): Promise<VolumeInfo>;
  cloneSnapshot(volume: string, snapshot: string, newName: string): Promise<VolumeInfo>;
  diff(volume: string, from: string, to: string | null): Promise<DiffReport>;
  scrub(volume: string, onProgress: (doneBytes: number, totalBytes: number) => void): Promise<ScrubReport>;
  status(): Promise<unknown>;
  metrics(): Promise<string>;
  /** Each export's I/O statistics since start (node/io-stats.ts): what chunkd iostat samples. */
  ioStats(): Record<string, unknown>;
  /** Commits and writes a checkpoint of all metadata now; answers its generation, bytes and times. */
  checkpoint(): Promise<unknown>;
  /** Attach (body: mountpoint, fs, via) and detach a volume's file system (src/node/attachments.ts). */
  attach(volume: string, body: Record<string, unknown>): Promise<unknown>;
  detach(volume: string): Promise<unknown>;
  /** A replication stream of VOL@SNAP (incremental from `from`), or the one a resume token continues (replication/send.ts). */
  sendStream(request: { volume: string; snapshot: string; from: string | null } | { resumeToken: string }): Promise<PreparedSend>;
  /** Applies a replication stream to a volume (replication/receive.ts); its token and abort. */
  receiveStream(volume: string, body: AsyncIterable<Buffer>): Promise<ReceiveResult>;
  receiveToken(volume: string): Promise<unknown>;
  abortReceive(volume: string): Promise<unknown>;
  /** Replicas of this node's volumes on other nodes (replication/replicator.ts). */
  addReplica(settings: ReplicaSettings): Promise<unknown>;
  /** A synchronous replica (replication/sync-replicas.ts): writes are acknowledged once it has them. */
  addSyncReplica(settings: SyncReplicaSettings): Promise<unknown>;
  removeReplica(volume: string, peer: string): Promise<unknown>;
  listReplicas(volume: string | null): Promise<unknown[]>;
  syncReplicas(volume: string, peer: string | null): Promise<unknown[]>;
  /** Failover: a replica becomes the owner; a fenced old owner becomes a replica of the new one. */
  promote(volume: string): Promise<unknown>;
  demote(volume: string, ownerAddress: string | null): Promise<unknown>;
  /** Moves a volume to another node (replication/handoff.ts). */
  handoff(volume: string, to: string): Promise<unknown>;
  /** The cluster as etcd has it (cluster/cluster.ts); refused on a node not in one. */
  clusterStatus(): Promise<unknown>;
  /** Every volume of the cluster (cluster/listing.ts), or null on a node not in one. */
  clusterVolumes(): Promise<unknown[]> | null;
  /** Moves a volume to node `to` through etcd (cluster/cluster.ts), from any node of a cluster. */
  moveVolume(volume: string, to: string): Promise<unknown>;
  cancelMove(volume: string): Promise<unknown>;
}

const statusByCode: Partial<Record<ErrorCode, number>> = {
  EINVAL: 400,
  EBADNAME: 400,
  ENOENT: 404,
  EEXIST: 409,
  EBUSY: 409,
  EPERM: 403,
  ENOSPC: 507,
  ESHUTDOWN: 503,
  EPROTO: 400,
  ECORRUPT: 422,
};

export class ApiServer {
  readonly #control: ControlPlane;
  readonly #server: http.Server;
  #socketPath: string | null = null;
  #tlsServer: https.Server | null = null;

  constructor(control: ControlPlane) {
    this.#control = control;
    this.#server = createServer((request, response) => this.#serve(request, response));
    // A replication stream's request body may take hours (PUT .../receive); the socket is local and owner-only.
    this.#server.requestTimeout = 0;
  }

  #serve(request: http.IncomingMessage, response: http.ServerResponse): void {
    this.#handle(request, response).catch((error: unknown) => sendError(response, error));
  }

  /** Listens on a unix socket readable by its owner only; a stale socket from a crashed node is replaced. */
  async listen(socketPath: string): Promise<void> {
    await listenOwnerOnly(this.#server, socketPath);
    this.#socketPath = socketPath;
  }

  /**
   * Offers the same API on TCP (serve --api-listen): TLS 1.3 with a client certificate from the cluster CA
   * required; a client without one, or with another CA's or an expired one, is refused in the handshake.
   */
  async listenTls(host: string, port: number, credentials: { ca: Buffer; cert: Buffer; key: Buffer }, log: Log): Promise<void> {
    // The peer port's helpers, loaded by the nodes that listen on TCP only (core/lazy-import.ts).
    const { describeTlsError, remoteOfTls } = await import('../peer/server.ts');
    const server = process.getBuiltinModule('node:https').createServer({ minVersion: 'TLSv1.3', requestCert: true, rejectUnauthorized: true, ...credentials }, (request, response) => this.#serve(request, response));
    // Reading the address at accept keeps it for the log line of a handshake that fails (remoteOfTls).
    server.on('connection', (socket: net.Socket) => void socket.remoteAddress);
    server.on('tlsClientError', (error, socket) => {
      socket.destroy();
      log(`api connection from ${remoteOfTls(socket)} refused: ${describeTlsError(error, socket.authorizationError)}`, 'warn');
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.#tlsServer = server;
  }

  /** The TCP address of the TLS listener, or null. */
  tlsAddress(): string | null {
    const address = this.#tlsServer?.address();
    if (address === undefined || address === null || typeof address === 'string') return null;
    return address.family === 'IPv6' ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`;
  }

  async close(): Promise<void> {
    if (this.#tlsServer !== null) await closeHttpServer(this.#tlsServer, null);
    await closeHttpServer(this.#server, this.#socketPath);
  }

  async #handle(request: http.IncomingMessage, response: http.ServerResponse): Promise<void> {
    const url = requestUrl(request);
    const parts = url.pathname.split('/').filter((part) => part !== '').map(decodePathPart);
    const method = request.method ?? 'GET';
    // Names sit at even positions from the third on (/v1/volumes/NAME/snapshots/SNAP/...); the rest is the route.
    const route = `${method} /${parts.map((part, i) => (i >= 2 && i % 2 === 0 ? ':' : part)).join('/')}`;
    const volumeName = (): string => validateName(parts[2]);
    const snapshotName = (): string => validateName(parts[4], 'snapshot');
    // A stream's body is the stream itself, not a JSON object: it goes to the receiver as it comes.
    if (route === 'PUT /v1/volumes/:/receive') {
      // The receiver reads the body through this iterator, which it cannot end: the rest of a refused stream is
      // read and dropped here before the answer. Answering at once would close the connection under the
      // client's writes, and a client that meets EPIPE first never sees why. The cost: a stream refused at its
      // header is still read to its end (a two-step receive would avoid that; not yet).
      const chunks = request[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
      const body: AsyncIterable<Buffer> = { [Symbol.asyncIterator]: () => ({ next: () => chunks.next() }) };
      try {
        return sendJson(response, 200, await this.#control.receiveStream(volumeName(), body));
      } catch (error) {
        for (;;) {
          const next = await chunks.next().catch(() => ({ done: true as const, value: undefined }));
          if (next.done === true) break;
        }
        throw error;
      }
    }
    const body = await readBody(request);
    switch (route) {
      case 'GET /metrics':
        response.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
        response.end(await this.#control.metrics());
        return;
      case 'GET /v1/status':
        return sendJson(response, 200, await this.#control.status());
      case 'GET /v1/iostat':
        return sendJson(response, 200, { atMs: Date.now(), exports: this.#control.ioStats() });
      case 'POST /v1/checkpoint':
        return sendJson(response, 200, await this.#control.checkpoint());
      case 'GET /v1/cluster':
        return sendJson(response, 200, await this.#control.clusterStatus());
      case 'GET /v1/volumes': {
        // On a clustered node, the cluster's volumes too (an etcd that does not answer leaves the local ones, said).
        const volumes = this.#control.listVolumes();
        const cluster = this.#control.clusterVolumes();
        if (cluster === null) return sendJson(response, 200, { volumes });
        const answer = await cluster.then((list) => ({ cluster: list }), (error: unknown) => ({ clusterError: error instanceof Error ? error.message : String(error) }));
        return sendJson(response, 200, { volumes, ...answer });
      }
      case 'POST /v1/volumes': {
        const name = validateName(body.name);
        const replicas = body.replicas ?? 0;
        if (!Number.isSafeInteger(replicas) || (replicas as number) < 0 || (replicas as number) > 8) throw ChunkdError.invalid(`invalid replicas ${JSON.stringify(replicas)}: a whole number from 0 to 8`);
        if (body.sync !== undefined && typeof body.sync !== 'boolean') throw ChunkdError.invalid('sync must be true or false');
        if (body.syncTimeoutMs !== undefined && body.sync !== true) throw ChunkdError.invalid('syncTimeoutMs goes with sync: true');
        const sync = body.sync === true ? { timeoutMs: syncTimeoutField(body.syncTimeoutMs) } : null;
        const where: VolumePlacement = body.node === undefined ? 'placed' : { node: validateName(body.node, 'node') };
        return sendJson(response, 201, await this.#control.createVolume(name, sizeField(body.sizeBytes), replicas as number, sync, where));
      }
      case 'GET /v1/volumes/:':
        return sendJson(response, 200, this.#control.volumeInfo(volumeName()));
      case 'PATCH /v1/volumes/:': {
        if (body.sync === undefined) return sendJson(response, 200, await this.#control.resizeVolume(volumeName(), sizeField(body.sizeBytes), body.force === true));
        // volume set --sync: one change at a time.
        if (typeof body.sync !== 'boolean') throw ChunkdError.invalid('sync must be true or false');
        if (body.sizeBytes !== undefined || body.force !== undefined) throw ChunkdError.invalid('a change of sync takes no sizeBytes or force: resize apart');
        if (body.syncTimeoutMs !== undefined && body.sync !== true) throw ChunkdError.invalid('syncTimeoutMs goes with sync: true');
        return sendJson(response, 200, await this.#control.setVolumeSync(volumeName(), body.sync ? { timeoutMs: syncTimeoutField(body.syncTimeoutMs) } : null));
      }
      case 'DELETE /v1/volumes/:':
        await this.#control.removeVolume(volumeName());
        return sendJson(response, 200, { removed: parts[2] });
      case 'GET /v1/volumes/:/snapshots':
        return sendJson(response, 200, { snapshots: await this.#control.listSnapshots(volumeName()) });
      case 'POST /v1/volumes/:/snapshots': {
        const volume = volumeName();
        return sendJson(response, 201, await this.#control.createSnapshot(volume, validateName(body.name, 'snapshot')));
      }
      case 'GET /v1/volumes/:/snapshots/:':
        return sendJson(response, 200, await this.#control.snapshotInfo(volumeName(), snapshotName()));
      case 'DELETE /v1/volumes/:/snapshots/:':
        await this.#control.removeSnapshot(volumeName(), snapshotName());
        return sendJson(response, 200, { removed: `${parts[2]}@${parts[4]}` });
      case 'POST /v1/volumes/:/snapshots/:/rollback':
        return sendJson(response, 200, await this.#control.rollbackVolume(volumeName(), snapshotName()));
      case 'GET /v1/volumes/:/snapshots/:/diff': {
        const to = url.searchParams.get('to');
        return sendJson(response, 200, await this.#control.diff(volumeName(), snapshotName(), to === null ? null : validateName(to, 'snapshot')));
      }
      case 'GET /v1/volumes/:/snapshots/:/stream': {
        const from = url.searchParams.get('from');
        return this.#send(response, await this.#control.sendStream({ volume: volumeName(), snapshot: snapshotName(), from: from === null ? null : validateName(from, 'snapshot') }));
      }
      case 'GET /v1/stream': {
        const token = url.searchParams.get('resume');
        if (token === null) throw ChunkdError.invalid('GET /v1/stream needs ?resume=TOKEN');
        return this.#send(response, await this.#control.sendStream({ resumeToken: token }));
      }
      case 'GET /v1/volumes/:/receive':
        return sendJson(response, 200, await this.#control.receiveToken(volumeName()));
      case 'DELETE /v1/volumes/:/receive':
        return sendJson(response, 200, await this.#control.abortReceive(volumeName()));
      case 'GET /v1/replicas':
        return sendJson(response, 200, { replicas: await this.#control.listReplicas(null) });
      case 'GET /v1/volumes/:/replicas':
        return sendJson(response, 200, { replicas: await this.#control.listReplicas(volumeName()) });
      case 'POST /v1/volumes/:/replicas':
        if (body.sync === true) return sendJson(response, 201, await this.#control.addSyncReplica(syncReplicaSettings(volumeName(), body)));
        return sendJson(response, 201, await this.#control.addReplica(replicaSettings(volumeName(), body)));
      case 'DELETE /v1/volumes/:/replicas':
        return sendJson(response, 200, await this.#control.removeReplica(volumeName(), peerField(body.peer)));
      case 'POST /v1/volumes/:/replicate':
        return sendJson(response, 200, { cycles: await this.#control.syncReplicas(volumeName(), body.peer === undefined ? null : peerField(body.peer)) });
      case 'POST /v1/volumes/:/handoff':
        return sendJson(response, 200, await this.#control.handoff(volumeName(), peerField(body.to)));
      case 'POST /v1/volumes/:/move': {
        if (body.cancel === true) return sendJson(response, 200, await this.#control.cancelMove(volumeName()));
        if (body.to === undefined) throw ChunkdError.invalid('a move needs "to": the name of a node of the cluster (or "cancel": true)');
        return sendJson(response, 200, await this.#control.moveVolume(volumeName(), validateName(body.to, 'node')));
      }
      case 'POST /v1/volumes/:/promote':
        return sendJson(response, 200, await this.#control.promote(volumeName()));
      case 'POST /v1/volumes/:/demote':
        return sendJson(response, 200, await this.#control.demote(volumeName(), body.owner === undefined ? null : peerField(body.owner)));
      case 'POST /v1/volumes/:/scrub':
        return this.#scrub(response, volumeName());
      case 'POST /v1/volumes/:/attach':
        return sendJson(response, 200, await this.#control.attach(volumeName(), body));
      case 'POST /v1/volumes/:/detach':
        return sendJson(response, 200, await this.#control.detach(volumeName()));
      case 'POST /v1/clones': {
        const source = typeof body.source === 'string' ? body.source.split('@') : [];
        if (source.length !== 2) throw ChunkdError.invalid('source must be VOLUME@SNAPSHOT');
        const [volume, snapshot] = [validateName(source[0]), validateName(source[1], 'snapshot')];
        return sendJson(response, 201, await this.#control.cloneSnapshot(volume, snapshot, validateName(body.name)));
      }
      default:
        throw new ChunkdError(parts[0] === 'v1' || parts[0] === 'metrics' ? 'EINVAL' : 'ENOENT', `no route ${method} ${url.pathname}`);
    }
  }

  /**
   * Sends a replication stream as the body, with backpressure (the generator reads the next chunk only when the
   * socket took the last). A sender that stops at a damaged block ends the stream with an ABORT record; a client
   * that goes away ends it early, which is its own business: logged, nothing more.
   */
  async #send(response: http.ServerResponse, prepared: PreparedSend): Promise<void> {
    response.writeHead(200, { 'content-type': 'application/octet-stream', 'x-chunkd-stream-data-bytes': String(prepared.header.dataBytes) });
    try {
      await pipeline(Readable.from(recordBytes(prepared.records), { objectMode: false, highWaterMark: 4 }), response);
    } catch (error) {
      if (error instanceof ChunkdError) throw error;
      if (!response.destroyed && !response.writableEnded) throw error;
      // The client went away (closed, killed): the generator was returned, which closed the snapshot.
    }
  }

  /** Streams progress lines ({"progress": {...}}) while the scrub runs, then {"report": ...}. */
  async #scrub(response: http.ServerResponse, volume: string): Promise<void> {
    this.#control.volumeInfo(volume); // a missing volume is a plain 404, before the stream starts
    response.writeHead(200, { 'content-type': 'application/x-ndjson' });
    let lastProgressMs = 0;
    try {
      const report = await this.#control.scrub(volume, (doneBytes, totalBytes) => {
        const now = Date.now();
        if (now - lastProgressMs < progressIntervalMs && doneBytes < totalBytes) return;
        lastProgressMs = now;
        response.write(`${JSON.stringify({ progress: { doneBytes, totalBytes } })}\n`);
      });
      response.end(`${JSON.stringify({ report })}\n`);
    } catch (error) {
      const failure = expectedError(error, `scrubbing volume ${volume}`);
      response.end(`${JSON.stringify({ error: { code: failure.code, message: failure.message } })}\n`);
    }
  }
}

/** A stream's records as a run of buffers, for a byte stream. */
async function* recordBytes(records: AsyncGenerator<Buffer[]>): AsyncGenerator<Buffer> {
  for await (const record of records) yield* record;
}

function sizeField(value: unknown): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value)) throw ChunkdError.invalid('sizeBytes must be a whole number of bytes');
  return value;
}

/** A request's URL; one that does not parse is the client's mistake (EINVAL); shared with the Docker plugin socket. */
export function requestUrl(request: http.IncomingMessage): URL {
  try {
    return new URL(request.url ?? '/', 'http://chunkd');
  } catch {
    throw ChunkdError.invalid(`request URL ${JSON.stringify(request.url)} does not parse`);
  }
}

function decodePathPart(part: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw ChunkdError.invalid(`bad percent-encoding in ${JSON.stringify(part)}`);
  }
}

/** Reads a request's JSON object body (at most apiBodyBytesMax bytes; none gives {}); shared with the Docker plugin socket. */
export async function readBody(request: http.IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of request) {
    total += (chunk as Buffer).length;
    if (total > apiBodyBytesMax) throw ChunkdError.invalid(`request body over ${apiBodyBytesMax} bytes`);
    chunks.push(chunk as Buffer);
  }
  if (total === 0) return {};
  try {
    const value: unknown = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new Error('not an object');
    return value as Record<string, unknown>;
  } catch {
    throw ChunkdError.invalid('request body is not a JSON object');
  }
}

function sendJson(response: http.ServerResponse, status: number, value: unknown): void {
  const body = `${JSON.stringify(value)}\n`;
  response.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  response.end(body);
}

function sendError(response: http.ServerResponse, error: unknown): void {
  const failure = expectedError(error, 'an API request');
  if (response.headersSent) {
    response.destroy();
    return;
  }
  sendJson(response, statusByCode[failure.code] ?? 500, { error: { code: failure.code, message: failure.message } });
}

/** HOST:PORT of a peer (an IPv6 host in brackets). */
function peerField(value: unknown): string {
  const address = parseHostPort(value);
  if (address === null || address.port === 0) throw ChunkdError.invalid('peer must be HOST:PORT of a node\'s --peer-listen, e.g. 10.0.0.2:10810');
  return value as string;
}

function syncReplicaSettings(volume: string, body: Record<string, unknown>): SyncReplicaSettings {
  return { volume, peer: peerField(body.peer), timeoutMs: syncTimeoutField(body.timeoutMs), maxRateBytesPerSecond: maxRateField(body.maxRateBytesPerSecond) };
}

/** A synchronous link's timeout in a request body (default syncReplicaTimeoutMsDefault). */
function syncTimeoutField(value: unknown): number {
  const timeoutMs = value ?? syncReplicaTimeoutMsDefault;
  if (typeof timeoutMs !== 'number' || !Number.isSafeInteger(timeoutMs) || timeoutMs < 100 || timeoutMs > 600_000) throw ChunkdError.invalid('timeoutMs must be a whole number of milliseconds from 100 to 600000');
  return timeoutMs;
}

function replicaSettings(volume: string, body: Record<string, unknown>): ReplicaSettings {
  const everyMs = body.everyMs ?? defaultEveryMs;
  if (typeof everyMs !== 'number' || !Number.isSafeInteger(everyMs) || everyMs < 100 || everyMs > 7 * 86_400_000) throw ChunkdError.invalid('everyMs must be a whole number of milliseconds from 100 to a week');
  return { volume, peer: peerField(body.peer), everyMs, maxRateBytesPerSecond: maxRateField(body.maxRateBytesPerSecond) };
}

/** A replica's rate cap in a request body: bytes a second, or null (none). */
function maxRateField(value: unknown): number | null {
  const rate = value ?? null;
  if (rate !== null && (typeof rate !== 'number' || !Number.isSafeInteger(rate) || rate < 4096)) throw ChunkdError.invalid('maxRateBytesPerSecond must be a whole number of bytes per second, at least 4096, or null');
  return rate;
}
