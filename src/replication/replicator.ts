// The owner side of replication: keeps read-only replicas of this node's volumes on other nodes, over the peer
// port (mutual TLS), as rbd-mirror's snapshot mode and Flocker do. Each replica (a volume and a peer) is a link
// with its own loop; a cycle of a link:
//
//   connect, hello ──► replicaInfo: what the peer holds of the volume
//     ├─ an interrupted receive whose target (and base) this node still has: resume it at its offset
//     │  (what arrived before is never sent again); one it cannot resume: receiveAbort, then as below
//     └─ else: base = the newest snapshot both hold (none: a full stream); no change since it: done ("current");
//        otherwise take snapshot repl-<ms> (durable before anything is sent) as the target
//   receiveOpen, receiveData frames (a window of them in flight, paced by --max-rate), receiveClose: the peer
//   checks the END record's digest and takes the snapshot ──► replicaPrune on the peer, then here: replication
//   snapshots that no link of the volume still needs as its base are removed
//
// A failed cycle (a dropped link, a peer restarting, a refused stream) is retried with a growing delay, and the
// next cycle resumes where the peer's durable receive state says. What each link has replicated last is written
// to <pool>/replication/replicas.json with its settings, so that after a restart no link's base is pruned by
// another before it has run again.
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ChunkdError } from '../core/errors.ts';
import { parseHostPort } from '../core/host-port.ts';
import { chunkSizeBytes } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import { formatDuration, formatSize } from '../core/units.ts';
import { PeerClient } from '../peer/client.ts';
import type { TlsCredentials } from '../peer/credentials.ts';
import { PeerVerb } from '../peer/protocol.ts';
import type { Pool } from '../store/pool.ts';
import { jsonPayload, parsePruneReply, parseReceiveResult, parseReplicaInfo, replicationSnapshotPrefix, type ReplicaInfo, type TakeOwnershipRequest } from './peer-messages.ts';
import { RateLimiter } from './rate-limit.ts';
import type { ReceiveResult } from './receive.ts';
import { prepareSend, type PreparedSend, type SendRequest } from './send.ts';
import { readStateFile, writeStateFile } from './state-file.ts';
import type { Log } from '../core/log.ts';

/** Stream bytes per receiveData frame: a few records' worth, so a frame's overhead is small and the window deep enough. */
const frameBytesTarget = 1024 * 1024;
/** receiveData frames in flight on a link: keeps the link busy while the peer writes (8 MiB at most). */
const frameWindow = 8;
/** A request unanswered this long means a peer that hangs (paused, its disk stuck): the cycle fails and retries. */
export const defaultRequestTimeoutMs = 60_000;
const retryDelayMinMs = 1_000;
const retryDelayMaxMs = 30_000;
export const defaultEveryMs = 30_000;

export interface ReplicaSettings {
  volume: string;
  /** HOST:PORT of the peer's --peer-listen. */
  peer: string;
  everyMs: number;
  /** Bytes per second at most, or null for no limit. */
  maxRateBytesPerSecond: number | null;
}

interface StoredLink extends ReplicaSettings {
  /** The id of the last snapshot the peer confirmed it holds complete, or null before the first. */
  lastUuid: string | null;
}

export interface ReplicaStatus extends ReplicaSettings {
  peerName: string | null;
  state: 'idle' | 'replicating' | 'retrying' | 'stopped';
  lastReplicated: { snapshot: string; uuid: string; takenAt: string } | null;
  /** Seconds the replica is behind: since the last replicated point was taken, or since a check found nothing new. */
  lagSeconds: number | null;
  /** Bytes of changed extents not yet on the peer: the stream in progress's rest, or the change since the last point. */
  bytesPending: number;
  /** The stream in progress. */
  stream: { target: string; totalBytes: number; sentBytes: number; resumedFromBytes: number } | null;
  /** Bytes per second of the last complete stream (its data over its time). */
  throughputBytesPerSecond: number | null;
  lastError: { message: string; at: string } | null;
  cyclesTotal: number;
  cycleFailuresTotal: number;
  streamBytesSentTotal: number;
}

export interface CycleResult {
  volume: string;
  peer: string;
  /** What the cycle did: sent a stream (full, incremental, or a resumed one), or found the replica current. */
  outcome: 'full' | 'incremental' | 'resumed' | 'current';
  snapshot: string;
  /** Where the stream started in the volume (a resume: what the peer held already, not sent again). */
  resumedFromBytes: number;
  streamBytes: number;
  dataBytes: number;
  seconds: number;
}

export interface ReplicatorOptions {
  pool: Pool;
  /** This node's client pair (its certificate names it to peers), or a reason there is none. */
  credentials: TlsCredentials | string;
  log: Log;
  /** Default defaultRequestTimeoutMs (serve --peer-timeout). */
  requestTimeoutMs?: number;
  /** The volume's ownership epoch on this node. */
  epochOf: (volume: string) => number;
  /** Why the volume cannot be replicated from here (it is a replica, or fenced), or null. */
  refuse: (volume: string) => string | null;
  /**
   * In a cluster (where a volume's name and its epochs are the cluster's): a replica that follows this node (or an
   * older epoch) but shares no snapshot with it is sent whole, in place (receiveOpen's replace), rather than left
   * stale for an operator.
   */
  resendWhole?: boolean;
  /** A snapshot of the volume kept from pruning (a promoted owner's point, for its old owner's rejoin: roles.ts KeptBase), or null. */
  keptBase?: (volume: string) => string | null;
  /** A point of the volume landed on the peer named `peerName` (its certificate's name). */
  landed?: (volume: string, peerName: string) => Promise<void>;
  /** A peer owns the volume at a higher epoch (it was promoted, or follows a node that was): stop writing it, durably. */
  fence: (volume: string, by: { owner: string; ownerEpoch: number; ownerAddress: string | null }) => Promise<void>;
}

class Link {
  readonly stored: StoredLink;
  peerName: string | null = null;
  state: ReplicaStatus['state'] = 'idle';
  /** When a cycle last found the replica current (nothing changed since its last point); null after a stream. */
  currentAsOfMs: number | null = null;
  stream: ReplicaStatus['stream'] = null;
  throughput: number | null = null;
  lastError: ReplicaStatus['lastError'] = null;
  cycles = 0;
  failures = 0;
  sentTotal = 0;
  timer: NodeJS.Timeout | null = null;
  running: Promise<void> | null = null;
  client: PeerClient | null = null;
  /** Callers of sync() waiting for the next cycle to finish. */
  waiters: Array<{ resolve: (result: CycleResult) => void; reject: (error: unknown) => void }> = [];
  retryDelayMs = retryDelayMinMs;
  stopped = false;

  constructor(stored: StoredLink) {
    this.stored = stored;
  }
}

export class Replicator {
  readonly #options: ReplicatorOptions;
  readonly #file: string;
  readonly #links: Link[] = [];
  readonly #timeoutMs: number;

  constructor(options: ReplicatorOptions) {
    this.#options = options;
    this.#timeoutMs = options.requestTimeoutMs ?? defaultRequestTimeoutMs;
    this.#file = path.join(options.pool.directory, 'replication', 'replicas.json');
  }

  /** Loads the links (links of volumes that are gone are dropped); start() runs them. */
  async load(): Promise<void> {
    const value = (await readStateFile(this.#file)) as { links?: StoredLink[] } | null;
    let stale = false;
    for (const stored of value?.links ?? []) {
      if (checkName(stored?.volume) !== null || parseHostPort(stored.peer) === null || !Number.isSafeInteger(stored.everyMs)) {
        throw ChunkdError.corrupt(`${this.#file}: an entry is not a replica link`);
      }
      if (!this.#options.pool.hasVolume(stored.volume)) {
        stale = true;
        continue;
      }
      this.#links.push(new Link(stored));
    }
    if (stale) await this.#save();
  }

  /** Starts each link's loop. */
  start(): void {
    for (const link of this.#links) this.#schedule(link, 0);
    if (this.#links.length > 0) this.#options.log(`replication: ${this.#links.length} replica link(s): ${this.#links.map((l) => `${l.stored.volume} -> ${l.stored.peer}`).join(', ')}`);
  }

  async stop(): Promise<void> {
    for (const link of this.#links) this.#halt(link);
    await Promise.all(this.#links.map((link) => link.running?.catch(() => {})));
  }

  /** Adds a replica of `settings.volume` on `settings.peer` and starts replicating at once. */
  async add(settings: ReplicaSettings): Promise<ReplicaStatus> {
    const { pool } = this.#options;
    pool.volumeInfo(settings.volume);
    const refusal = this.#options.refuse(settings.volume);
    if (refusal !== null) throw ChunkdError.readOnly(refusal);
    this.#credentials();
    if (this.#find(settings.volume, settings.peer) !== null) throw ChunkdError.exists(`volume ${settings.volume} already has a replica at ${settings.peer}`);
    const link = new Link({ ...settings, lastUuid: null });
    this.#links.push(link);
    await this.#save();
    this.#options.log(`replication: ${settings.volume} -> ${settings.peer} added (every ${formatDuration(settings.everyMs)}${settings.maxRateBytesPerSecond === null ? '' : `, at most ${formatSize(settings.maxRateBytesPerSecond)}/s`})`);
    this.#schedule(link, 0);
    return await this.#status(link);
  }

  /** Stops replicating `volume` to `peer`; the replica there stays as it is (remove it there if it is not wanted). */
  async remove(volume: string, peer: string): Promise<void> {
    const link = this.#find(volume, peer);
    if (link === null) throw ChunkdError.notFound(`volume ${volume} has no replica at ${peer}`);
    this.#halt(link);
    await link.running?.catch(() => {});
    this.#links.splice(this.#links.indexOf(link), 1);
    await this.#save();
    this.#options.log(`replication: ${volume} -> ${peer} removed`);
  }

  /** Forgets every link of a volume that was removed, or that this node no longer owns. */
  async forgetVolume(volume: string): Promise<void> {
    const links = this.#links.filter((link) => link.stored.volume === volume);
    for (const link of links) {
      this.#halt(link);
      await link.running?.catch(() => {});
      this.#links.splice(this.#links.indexOf(link), 1);
    }
    if (links.length > 0) await this.#save();
  }

  /** Adds a link of `volume` to `address` unless there is one. */
  async ensureLink(volume: string, address: string, everyMs: number): Promise<void> {
    if (this.#find(volume, address) === null) await this.add({ volume, peer: address, everyMs, maxRateBytesPerSecond: null });
  }

  /** A handoff's last step (handoff.ts): asks the peer to own `request.volume`; resolves once it does, durably. */
  async takeOwnership(address: string, request: TakeOwnershipRequest): Promise<void> {
    const { host, port } = peerAddress(address);
    const client = await PeerClient.connect({ host, port, credentials: this.#credentials() });
    try {
      await withTimeout(client.request(PeerVerb.takeOwnership, jsonPayload(request)), this.#timeoutMs, () => client.close(), `${address} did not answer the handoff`);
    } finally {
      client.close();
    }
  }

  /** What the peer at `address` holds of `volume` (one connection, one question). */
  async askPeer(address: string, volume: string): Promise<ReplicaInfo> {
    const { host, port } = peerAddress(address);
    const client = await PeerClient.connect({ host, port, credentials: this.#credentials() });
    try {
      return parseReplicaInfo(await withTimeout(client.request(PeerVerb.replicaInfo, jsonPayload({ volume })), this.#timeoutMs, () => client.close(), `${address} did not answer`));
    } finally {
      client.close();
    }
  }

  list(): Promise<ReplicaStatus[]> {
    return Promise.all(this.#links.map((link) => this.#status(link)));
  }

  async statusOf(volume: string): Promise<ReplicaStatus[]> {
    this.#options.pool.volumeInfo(volume);
    return Promise.all(this.#links.filter((link) => link.stored.volume === volume).map((link) => this.#status(link)));
  }

  /** Runs a cycle of each link of `volume` (or the one to `peer`) now, after any running one; resolves with what each did. */
  async sync(volume: string, peer: string | null): Promise<CycleResult[]> {
    const links = this.#links.filter((link) => link.stored.volume === volume && (peer === null || link.stored.peer === peer));
    if (links.length === 0) throw ChunkdError.notFound(peer === null ? `volume ${volume} has no replicas (chunkd replica add ${volume} --peer HOST:PORT)` : `volume ${volume} has no replica at ${peer}`);
    return Promise.all(links.map((link) => new Promise<CycleResult>((resolve, reject) => {
      link.waiters.push({ resolve, reject });
      if (link.running === null) this.#schedule(link, 0);
    })));
  }

  #find(volume: string, peer: string): Link | null {
    return this.#links.find((link) => link.stored.volume === volume && link.stored.peer === peer) ?? null;
  }

  #halt(link: Link): void {
    link.stopped = true;
    link.state = 'stopped';
    if (link.timer !== null) clearTimeout(link.timer);
    link.timer = null;
    link.client?.close();
    link.client = null;
    for (const waiter of link.waiters.splice(0)) waiter.reject(new ChunkdError('ESHUTDOWN', `replication of ${link.stored.volume} to ${link.stored.peer} stopped`));
  }

  #schedule(link: Link, delayMs: number): void {
    if (link.stopped) return;
    if (link.timer !== null) clearTimeout(link.timer);
    link.timer = setTimeout(() => {
      link.timer = null;
      if (link.running !== null) return;
      link.running = this.#run(link).finally(() => {
        link.running = null;
        // Callers who asked while that cycle ran want one that starts after their call.
        if (link.waiters.length > 0) this.#schedule(link, 0);
      });
    }, delayMs);
    link.timer.unref();
  }

  async #run(link: Link): Promise<void> {
    const waiters = link.waiters.splice(0);
    try {
      const result = await this.#cycle(link);
      link.cycles += 1;
      link.lastError = null;
      link.retryDelayMs = retryDelayMinMs;
      link.state = 'idle';
      for (const waiter of waiters) waiter.resolve(result);
      this.#schedule(link, link.stored.everyMs);
    } catch (error) {
      // The connection goes with the failed cycle (a receive it carried winds up on the peer); the next opens anew.
      link.client?.close();
      link.client = null;
      link.cycles += 1;
      link.failures += 1;
      link.stream = null;
      const message = error instanceof Error ? error.message : String(error);
      link.lastError = { message, at: new Date().toISOString() };
      for (const waiter of waiters) waiter.reject(error);
      if (link.stopped) return;
      link.state = 'retrying';
      this.#options.log(`replication of ${link.stored.volume} to ${link.stored.peer} failed (retry in ${formatDuration(link.retryDelayMs)}): ${message}`, 'warn');
      this.#schedule(link, Math.min(link.retryDelayMs, link.stored.everyMs));
      link.retryDelayMs = Math.min(retryDelayMaxMs, link.retryDelayMs * 2);
    }
  }

  /**
   * What the peer holds of `volume`. A peer whose last stream's connection just dropped (this node gave up on it:
   * a paused or slow receiver) is still winding that receive up and answers EBUSY until it has saved what arrived:
   * asked again every 100 ms for up to the request timeout, so that a cycle right after such a failure resumes
   * rather than fails.
   */
  async #replicaInfo(ask: (verb: number, value: object) => Promise<Buffer>, volume: string): Promise<ReplicaInfo> {
    const deadline = performance.now() + this.#timeoutMs;
    for (;;) {
      try {
        return parseReplicaInfo(await ask(PeerVerb.replicaInfo, { volume }));
      } catch (error) {
        if (!(error instanceof ChunkdError && error.code === 'EBUSY') || performance.now() >= deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  }

  /** A new connection to the link's peer, the link's from now on. */
  async #connect(link: Link): Promise<PeerClient> {
    const { host, port } = peerAddress(link.stored.peer);
    link.client = null;
    const client = await PeerClient.connect({ host, port, credentials: this.#credentials() });
    if (link.stopped) {
      client.close();
      throw new ChunkdError('ESHUTDOWN', 'replication stopped');
    }
    link.client = client;
    link.peerName = client.hello.name;
    return client;
  }

  /** A control request on `client`, answered within the request timeout (else the connection is closed). */
  #asker(link: Link, client: PeerClient): (verb: number, value: object) => Promise<Buffer> {
    return (verb, value) => withTimeout(client.request(verb, jsonPayload(value)), this.#timeoutMs, () => client.close(), `${link.peerName} did not answer within ${formatDuration(this.#timeoutMs)}`);
  }

  async #cycle(link: Link): Promise<CycleResult> {
    const { pool } = this.#options;
    const { volume, peer } = link.stored;
    const started = performance.now();
    const refusal = this.#options.refuse(volume);
    if (refusal !== null) throw ChunkdError.readOnly(refusal);
    link.state = 'replicating';
    // The connection of the cycle before is kept (each new one cost both nodes a mutual TLS handshake and a secure
    // context, every cycle of a link replicating every 500 ms); one the peer closed meanwhile is opened anew, and
    // so is one that dies at the cycle's first question (a peer restarted since: its close not seen yet).
    const reused = link.client !== null && !link.client.closed;
    if (!reused) link.client?.close();
    let client = reused ? link.client! : await this.#connect(link);
    let ask = this.#asker(link, client);
    let info: ReplicaInfo;
    try {
      info = await this.#replicaInfo(ask, volume);
    } catch (error) {
      if (!reused || !client.closed || link.stopped) throw error;
      client = await this.#connect(link);
      ask = this.#asker(link, client);
      info = await this.#replicaInfo(ask, volume);
    }
    await this.#checkPeer(link, info);

    let request: SendRequest | null = null;
    let outcome: CycleResult['outcome'] = 'incremental';
    /** A full stream that replaces the peer's replica in place (see resendWhole). */
    let replace = false;
    if (info.receive !== null) {
      const target = pool.findSnapshot(info.receive.target, volume);
      const base = info.receive.base === null ? null : pool.findSnapshot(info.receive.base, volume);
      if (target !== null && (info.receive.base === null || base !== null)) {
        request = { volume, snapshot: target.snapshot, from: base?.snapshot ?? null, resumeOffsetBytes: info.receive.offsetBytes };
        outcome = 'resumed';
        this.#options.log(`replication of ${volume} to ${link.peerName}: resuming ${target.snapshot} at byte ${info.receive.offsetBytes}`);
      } else {
        this.#options.log(`replication of ${volume} to ${link.peerName}: its interrupted receive is of a snapshot this node no longer has; aborting it there`);
        await ask(PeerVerb.receiveAbort, { volume });
        info = parseReplicaInfo(await ask(PeerVerb.replicaInfo, { volume }));
      }
    }
    if (request === null) {
      const peerIds = new Set(info.snapshots.map((snapshot) => snapshot.uuid));
      const base = pool.listSnapshots(volume).reverse().find((snapshot) => peerIds.has(snapshot.uuid)) ?? null;
      if (info.exists && base === null) {
        const epoch = this.#options.epochOf(volume);
        const follows = info.replicaOf !== null && (info.replicaOf.owner === this.#credentials().name || info.replicaOf.epoch < epoch);
        if (this.#options.resendWhole !== true || !follows) {
          throw ChunkdError.invalid(`the replica of ${volume} on ${link.peerName} shares no snapshot with this node's ${volume}: remove it there (chunkd volume rm ${volume}) and the next cycle sends it whole`);
        }
        // A failover promoted another replica, whose points this one never got: its copy is no part of the volume's
        // history from this epoch on (and normally older: the successor is the live replica with the newest point).
        this.#options.log(`replication of ${volume} to ${link.peerName}: its replica shares no snapshot with this node's ${volume} (it holds ${info.snapshots.map((snapshot) => snapshot.name).join(', ') || 'none'}); resending it whole, in place (its replication points there are given up, its other snapshots stay)`, 'warn');
        replace = true;
      }
      if (base !== null && pool.volumeInfo(volume).sizeBytes === base.sizeBytes && !(await pool.changedSince(volume, base.name))) {
        await this.#landed(link, client, base.uuid, Date.parse(base.createdAt));
        link.currentAsOfMs = Date.now();
        return { volume, peer, outcome: 'current', snapshot: base.name, resumedFromBytes: 0, streamBytes: 0, dataBytes: 0, seconds: (performance.now() - started) / 1000 };
      }
      const target = await pool.createSnapshot(volume, uniqueSnapshotName(pool.listSnapshots(volume).map((s) => s.name)));
      request = { volume, snapshot: target.name, from: base?.name ?? null, resumeOffsetBytes: 0 };
      outcome = base === null ? 'full' : 'incremental';
    }

    const prepared = await prepareSend(pool, request, this.#options.log);
    const total = prepared.header.dataBytes;
    link.stream = { target: request.snapshot, totalBytes: total, sentBytes: 0, resumedFromBytes: request.resumeOffsetBytes };
    await ask(PeerVerb.receiveOpen, { volume, epoch: this.#options.epochOf(volume), ...(replace ? { replace: true } : {}) });
    const streamStarted = performance.now();
    const streamBytes = await this.#stream(link, client, prepared);
    const result: ReceiveResult = parseReceiveResult(await ask(PeerVerb.receiveClose, {}));
    const seconds = (performance.now() - streamStarted) / 1000;
    link.throughput = seconds > 0 ? Math.round(result.dataBytes / seconds) : null;
    link.stream = null;
    const target = pool.snapshotInfo(volume, request.snapshot);
    await this.#landed(link, client, target.uuid, Date.parse(target.createdAt));
    this.#options.log(`replicated ${volume}@${target.name} to ${link.peerName} (${outcome}): ${formatSize(result.dataBytes)} of data, ${formatSize(streamBytes)} of stream in ${seconds.toFixed(2)} s`);
    return { volume, peer, outcome, snapshot: target.name, resumedFromBytes: request.resumeOffsetBytes, streamBytes, dataBytes: result.dataBytes, seconds: (performance.now() - started) / 1000 };
  }

  /**
   * The peer must hold no volume of that name, or a replica of it from this node. A peer that owns it, or follows
   * another owner, at a higher epoch than this node's means this node was replaced (a failover): the volume is
   * fenced here before anything else happens.
   */
  async #checkPeer(link: Link, info: ReplicaInfo): Promise<void> {
    const me = this.#credentials().name;
    const epoch = this.#options.epochOf(info.volume);
    if (info.ownedEpoch !== null && info.ownedEpoch > epoch) {
      await this.#fence(info.volume, { owner: link.peerName!, ownerEpoch: info.ownedEpoch, ownerAddress: link.stored.peer });
    }
    if (info.replicaOf !== null && info.replicaOf.owner !== me && info.replicaOf.epoch > epoch) {
      await this.#fence(info.volume, { owner: info.replicaOf.owner, ownerEpoch: info.replicaOf.epoch, ownerAddress: null });
    }
    if (info.exists && info.replicaOf === null) {
      throw ChunkdError.readOnly(`node ${link.peerName} has a volume ${info.volume} of its own; it cannot be a replica of this node's: remove it there, or replicate to another node`);
    }
    if (info.replicaOf !== null && info.replicaOf.owner !== me && info.replicaOf.epoch >= epoch) {
      throw ChunkdError.readOnly(`${info.volume} on ${link.peerName} is a replica of ${info.replicaOf.owner} (epoch ${info.replicaOf.epoch}), not of ${me}`);
    }
  }

  async #fence(volume: string, by: { owner: string; ownerEpoch: number; ownerAddress: string | null }): Promise<never> {
    const epoch = this.#options.epochOf(volume);
    this.#options.log(`volume ${volume} FENCED: node ${by.owner} owns it at epoch ${by.ownerEpoch}, this node's epoch is ${epoch}; writes are refused (chunkd replica demote ${volume} makes it a replica of ${by.owner})`, 'error');
    await this.#options.fence(volume, by);
    throw ChunkdError.readOnly(`fenced: node ${by.owner} owns ${volume} at epoch ${by.ownerEpoch}, above this node's ${epoch}`);
  }

  /**
   * Asks every link's peer, once, whether it knows of a newer owner of the volume, before the node serves clients:
   * a node that was replaced while it was down fences itself here. A peer that does not answer within `timeoutMs`
   * is logged and skipped: without a cluster (etcd) to ask, a node that cannot reach its peers serves as before.
   */
  async checkOwnership(timeoutMs: number): Promise<void> {
    const links = [...this.#links];
    await Promise.all(links.map(async (link) => {
      if (this.#options.refuse(link.stored.volume) !== null) return;
      const { host, port } = peerAddress(link.stored.peer);
      let client: PeerClient | null = null;
      try {
        client = await PeerClient.connect({ host, port, credentials: this.#credentials(), timeoutMs });
        link.peerName = client.hello.name;
        const info = parseReplicaInfo(await withTimeout(client.request(PeerVerb.replicaInfo, jsonPayload({ volume: link.stored.volume })), timeoutMs, () => client?.close(), 'no answer'));
        await this.#checkPeer(link, info).catch((error: unknown) => {
          if (this.#options.refuse(link.stored.volume) === null) throw error;
        });
      } catch (error) {
        this.#options.log(`replication: could not confirm with ${link.stored.peer} that this node still owns ${link.stored.volume} (${(error as Error).message}); serving it`, 'warn');
      } finally {
        client?.close();
      }
    }));
  }

  /** Sends the stream as receiveData frames, a window of them in flight, paced by the link's rate; returns its bytes. */
  #stream(link: Link, client: PeerClient, prepared: PreparedSend): Promise<number> {
    return sendWindowed(
      prepared,
      link.stored.maxRateBytesPerSecond,
      (pieces) => withTimeout(client.request(PeerVerb.receiveData, pieces), this.#timeoutMs, () => client.close(), `${link.peerName} took no stream bytes for ${formatDuration(this.#timeoutMs)}`),
      (frameBytes, covered) => {
        link.sentTotal += frameBytes;
        if (link.stream !== null) link.stream.sentBytes = Math.max(link.stream.sentBytes, covered);
      },
    );
  }

  /** The peer holds `uuid` complete: record it, and prune replication snapshots no link needs any more, there and here. */
  async #landed(link: Link, client: PeerClient, uuid: string, takenAtMs: number): Promise<void> {
    const { pool } = this.#options;
    const { volume } = link.stored;
    link.currentAsOfMs = null;
    if (link.stored.lastUuid !== uuid) {
      link.stored.lastUuid = uuid;
      await this.#save();
    }
    const pruned = parsePruneReply(await withTimeout(client.request(PeerVerb.replicaPrune, jsonPayload({ volume, keep: [uuid] })), this.#timeoutMs, () => client.close(), `${link.peerName} did not answer a prune`));
    if (pruned.kept.length > 0) this.#options.log(`replication of ${volume} to ${link.peerName}: ${pruned.kept.join(', ')} kept there while clients read them`);
    await this.#options.landed?.(volume, link.peerName!);
    // Here, every link of the volume needs its own last point (its next base), and any stream in progress its target;
    // a promoted owner keeps the point it was promoted at until its old owner has rejoined from it.
    const needed = new Set<string>();
    const kept = this.#options.keptBase?.(volume) ?? null;
    if (kept !== null) needed.add(kept);
    for (const other of this.#links) {
      if (other.stored.volume !== volume) continue;
      if (other.stored.lastUuid !== null) needed.add(other.stored.lastUuid);
      if (other.stream !== null) needed.add(pool.snapshotInfo(volume, other.stream.target).uuid);
    }
    for (const snapshot of pool.listSnapshots(volume)) {
      if (!snapshot.name.startsWith(replicationSnapshotPrefix) || needed.has(snapshot.uuid) || snapshot.openCount > 0) continue;
      // An interrupted stream of another link may still target it: a link whose peer holds a receive of it resumes
      // it, so keep snapshots newer than this one; the older ones no link can need.
      if (Date.parse(snapshot.createdAt) > takenAtMs) continue;
      // Recycled, not punched: what it alone held is what the volume's overwrites displaced since (pool.ts).
      await pool.removeSnapshot(volume, snapshot.name, { recycle: true }).catch((error: unknown) => this.#options.log(`replication of ${volume}: could not remove ${snapshot.name}: ${(error as Error).message}`, 'warn'));
    }
  }

  async #status(link: Link): Promise<ReplicaStatus> {
    const { pool } = this.#options;
    const { volume, lastUuid } = link.stored;
    let lastReplicated: ReplicaStatus['lastReplicated'] = null;
    let bytesPending = 0;
    const last = lastUuid === null || !pool.hasVolume(volume) ? null : pool.findSnapshot(lastUuid, volume);
    if (last !== null) {
      const info = pool.snapshotInfo(volume, last.snapshot);
      lastReplicated = { snapshot: info.name, uuid: info.uuid, takenAt: info.createdAt };
    }
    if (link.stream !== null) {
      bytesPending = Math.max(0, link.stream.totalBytes - link.stream.sentBytes);
    } else if (pool.hasVolume(volume)) {
      const changed = await pool.diff(volume, last?.snapshot ?? null, null);
      bytesPending = changed.reduce((sum, extent) => sum + extent.chunkCount, 0) * chunkSizeBytes;
    }
    const asOf = link.currentAsOfMs ?? (lastReplicated === null ? null : Date.parse(lastReplicated.takenAt));
    return {
      volume,
      peer: link.stored.peer,
      everyMs: link.stored.everyMs,
      maxRateBytesPerSecond: link.stored.maxRateBytesPerSecond,
      peerName: link.peerName,
      state: link.state,
      lastReplicated,
      lagSeconds: last === null || asOf === null ? null : Math.max(0, (Date.now() - asOf) / 1000),
      bytesPending,
      stream: link.stream === null ? null : { ...link.stream },
      throughputBytesPerSecond: link.throughput,
      lastError: link.lastError,
      cyclesTotal: link.cycles,
      cycleFailuresTotal: link.failures,
      streamBytesSentTotal: link.sentTotal,
    };
  }

  #credentials(): TlsCredentials {
    const credentials = this.#options.credentials;
    if (typeof credentials === 'string') throw ChunkdError.invalid(`replication needs this node's client certificate: ${credentials}`);
    return credentials;
  }

  async #save(): Promise<void> {
    await writeStateFile(this.#file, { links: this.#links.map((link) => link.stored) });
  }
}

/**
 * Sends a prepared stream (send.ts) as frames (sendFrames), `frameWindow` of them in flight, paced at
 * `rateBytesPerSecond` (null: as fast as the peer answers): `request` sends one frame's pieces and settles when the
 * peer has answered it; `answered` is told of each (its bytes, and the stream bytes covered when it was sent).
 * Answered, a frame's read buffers are recycled for the next reads. Returns the bytes sent; the first failure of a
 * request stops the stream and is thrown. Exported for bench/replication-send-cost.ts.
 */
export async function sendWindowed(prepared: PreparedSend, rateBytesPerSecond: number | null, request: (pieces: Buffer[]) => Promise<unknown>, answered?: (frameBytes: number, coveredBytes: number) => void): Promise<number> {
  const limiter = rateBytesPerSecond === null ? null : new RateLimiter(rateBytesPerSecond);
  const inFlight = new Set<Promise<void>>();
  let failure: unknown = null;
  let sentBytes = 0;
  const send = async (pieces: Buffer[], records: Buffer[][], frameBytes: number): Promise<void> => {
    if (limiter !== null) {
      const waitMs = limiter.reserve(frameBytes, performance.now());
      if (waitMs > 0) await new Promise((resolve) => setTimeout(resolve, waitMs));
    }
    while (inFlight.size >= frameWindow && failure === null) await Promise.race(inFlight);
    if (failure !== null) throw failure;
    const covered = prepared.coveredBytes();
    const sending = request(pieces).then(
      () => {
        // Answered: the frame's bytes went through TLS long ago, and their read buffers may take the next reads.
        prepared.recycle(records);
        sentBytes += frameBytes;
        answered?.(frameBytes, covered);
      },
      (error: unknown) => {
        failure ??= error;
      },
    );
    inFlight.add(sending);
    void sending.finally(() => inFlight.delete(sending));
  };
  try {
    await sendFrames(prepared.batches, send);
    await Promise.all(inFlight);
  } finally {
    await prepared.batches.return(undefined);
  }
  if (failure !== null) throw failure;
  return sentBytes;
}

/**
 * Cuts a stream's records into receiveData frames of about frameBytesTarget and hands each to `send` (its pieces,
 * its records, its bytes), waiting on it before the next. Frames end at record ends, so the receiver decodes each
 * record in place, without gathering it again. Pieces that lie side by side in memory (a sender's small records,
 * carved one after another from its arena) go as one view of their bytes, not as a write to the socket each: no
 * byte is copied for it.
 */
async function sendFrames(batches: AsyncIterable<Buffer[][]>, send: (pieces: Buffer[], records: Buffer[][], frameBytes: number) => Promise<void>): Promise<void> {
  let pieces: Buffer[] = [];
  let records: Buffer[][] = [];
  let pieceBytes = 0;
  let joined: Buffer | null = null;
  let joinedEnd = 0;
  const closeJoined = (): void => {
    if (joined === null) return;
    pieces.push(joinedEnd === joined.byteOffset + joined.length ? joined : Buffer.from(joined.buffer, joined.byteOffset, joinedEnd - joined.byteOffset));
    joined = null;
  };
  for await (const batch of batches) {
    for (const record of batch) {
      records.push(record);
      for (const piece of record) {
        pieceBytes += piece.length;
        if (joined !== null && piece.buffer === joined.buffer && piece.byteOffset === joinedEnd) {
          joinedEnd += piece.length;
          continue;
        }
        closeJoined();
        joined = piece;
        joinedEnd = piece.byteOffset + piece.length;
      }
      if (pieceBytes >= frameBytesTarget) {
        closeJoined();
        await send(pieces, records, pieceBytes);
        pieces = [];
        records = [];
        pieceBytes = 0;
      }
    }
  }
  closeJoined();
  if (pieceBytes > 0) await send(pieces, records, pieceBytes);
}

/** `repl-<ms since 1970>`, made unique among `taken` names. */
export function uniqueSnapshotName(taken: string[]): string {
  let ms = Date.now();
  while (taken.includes(`${replicationSnapshotPrefix}${ms}`)) ms += 1;
  return `${replicationSnapshotPrefix}${ms}`;
}

/** A peer's HOST:PORT (checked where it came in: the API, or the links file). */
function peerAddress(address: string): { host: string; port: number } {
  const parsed = parseHostPort(address);
  if (parsed === null) throw ChunkdError.invalid(`a peer address is HOST:PORT, not ${JSON.stringify(address)}`);
  return parsed;
}

/** `promise`, or a failure after `ms` (calling `onTimeout` first, to end what it waits on). */
function withTimeout<T>(promise: Promise<T>, ms: number, onTimeout: () => void, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => {
      onTimeout();
      reject(ChunkdError.io(message));
    }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

