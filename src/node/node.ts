// A node: one pool, its NBD front end and its management API, started and stopped in order.
// Stopping reverses starting: no new connections, in-flight requests finish, everything is committed, the
// pool's lock is released.
import { withProtocolStages } from '../store/stage-times.ts';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { BlockDevice, DeviceProvider } from '../core/block-device.ts';
import { checkName } from '../core/names.ts';
import { helperThreadNice, setLibuvPoolNice } from '../core/thread-priority.ts';
import { ChunkdError, fromSystemError } from '../core/errors.ts';
import { ApiServer, type ControlPlane, type DiffReport } from '../api/server.ts';
import { NbdServer } from '../nbd/server.ts';
import { addIdlePollCounters, type IdlePollCounters } from '../nbd/idle-poll.ts';
import { loadTlsServerConfig, tlsSettings, type TlsServerConfig } from '../nbd/tls.ts';
import { chunkSizeBytes, syncReplicaTimeoutMsDefault } from '../core/limits.ts';
import type { CheckpointReport } from '../store/commit-engine.ts';
import { Pool, type CountedSnapshotInfo, type SnapshotInfo, type VolumeInfo } from '../store/pool.ts';
import type { MetadataKind } from '../store/pool-layout.ts';
import type { ScrubReport } from '../store/scrub.ts';
import { StreamReceiver, type ReceiveResult } from '../replication/receive.ts';
import { prepareSend, resumeRequest, type PreparedSend } from '../replication/send.ts';
import { SyncReplicaExport, SyncReplicaServer } from '../replication/sync-replica-server.ts';
import { SyncDevice, SyncReplication, type SyncReplicaSettings, type SyncReplicaStatus } from '../replication/sync-replicas.ts';
import { defaultEveryMs, Replicator, uniqueSnapshotName, type CycleResult, type ReplicaSettings, type ReplicaStatus } from '../replication/replicator.ts';
import type { HandoffContext, HandoffResult } from '../replication/handoff.ts';
import { VolumeRoles, type FencedRole } from '../replication/roles.ts';
import { newestReplicationPoint, replicationSnapshotPrefix } from '../replication/peer-messages.ts';
import { renderMetrics } from './metrics.ts';
import type { MetricsServer } from './metrics-server.ts';
import { describeLoopPause, LoopPauses, type LoopPause } from './loop-pauses.ts';
import { SharedBufferPool } from '../core/shared-buffers.ts';
import { NbdThreads } from './nbd-threads.ts';
import type { IoEngineStatus } from '../store/chunk-io.ts';
import { checksumEngine, nativeChecksums } from '../store/checksum.ts';
import { defaultWorkerCount, WorkerChunkIo } from '../store/worker-io.ts';
import type { FuseFrontEnd, FuseStatus } from '../fuse/front-end.ts';
import type { DockerPluginServer } from '../api/docker-plugin.ts';
import { Attachments, type AttachmentStatus } from './attachments.ts';
import { validateAttachRequest } from './attachment-table.ts';
import { loadCredentials, type TlsCredentials } from '../peer/credentials.ts';
import type { PeerServer, PeerServerStats } from '../peer/server.ts';
import { softwareVersion } from '../core/version.ts';
import type { Log } from '../core/log.ts';
import { emptyIoStats, MeasuredDevice, type ExportIoStats } from './io-stats.ts';
import { needs } from '../core/lazy-import.ts';
import type { ClusterConfig, ClusterHost, ClusterMember, ClusterStatus } from '../cluster/cluster.ts';
import type { ClusterVolume } from '../cluster/listing.ts';
import type { VolumePlacement } from '../cluster/remote-create.ts';
import { formatSize } from '../core/units.ts';

export interface NodeConfig {
  poolDirectory: string;
  /** TCP listener for NBD, or null for none; port 0 picks a free port. */
  listen: { host: string; port: number } | null;
  /** Unix socket for NBD, or null. */
  nbdSocketPath: string | null;
  /** Unix socket of the management API; default <pool>/chunkd.sock. */
  apiSocketPath: string | null;
  /** Created at start when missing. */
  defaultVolume: { name: string; sizeBytes: number } | null;
  log: Log;
  /** Worker threads for chunk I/O and checksums (serve --workers); 0 runs it all on the main thread. Default: one per CPU. */
  workers?: number;
  /** NBD protocol threads with their own TCP listeners on the port (serve --nbd-threads); 0: the main thread serves NBD. */
  nbdThreads?: number;
  /** Check every block read against its checksum (default true); off only to measure what checking costs. */
  verifyReads?: boolean;
  /** Large reads rewrite a range they find scattered as one run (serve --read-defrag; default true). */
  readDefrag?: boolean;
  /** Microseconds an idle NBD connection polls for its next request (serve --poll-us, nbd/idle-poll.ts); 0 or absent: off. */
  pollUs?: number;
  /** The metadata a pool created now gets (serve --metadata; default memory); an existing pool keeps its own. */
  metadata?: MetadataKind;
  /** Paged metadata: the page cache's bound in bytes (serve --metadata-cache). */
  metadataCacheBytes?: number;
  /** FUSE front end: volumes as files under this directory (serve --fuse); null: mounted at <pool>/.fuse when an attach needs it. */
  fuseDirectory?: string | null;
  /** Unix socket for the Docker volume plugin protocol (serve --plugin-socket), or null. */
  pluginSocketPath?: string | null;
  /** The peer port (serve --peer-listen, --tls-dir, --peer-allow), or null/absent for none. */
  peer?: PeerConfig | null;
  /** The management API on TCP too (serve --api-listen), mutual TLS with the set in tlsDirectory; null/absent: unix socket only. */
  apiTls?: { listen: { host: string; port: number }; tlsDirectory: string } | null;
  /**
   * NBD over TLS on every NBD listener, TCP and unix socket (serve --tls, --tls-dir, --tls-verify-peer); null or
   * absent: off. `directory` holds the credentials in qemu's layout (nbd/tls.ts).
   */
  tls?: { mode: 'on' | 'require'; directory: string; verifyPeer: boolean } | null;
  /** How long a replication peer may leave a request unanswered before the cycle fails (serve --peer-timeout); default 60 s. */
  peerTimeoutMs?: number;
  /** GET /metrics on plain HTTP over TCP for Prometheus (serve --metrics-listen), nothing else there; null/absent: none. */
  metricsListen?: { host: string; port: number } | null;
  /** Membership of a cluster coordinated through etcd (serve --etcd, --node-name, --lease-ttl); null/absent: the node works alone. */
  cluster?: ClusterConfig | null;
}

export interface PeerConfig {
  listen: { host: string; port: number };
  /** This node's set from chunkd tls init (qemu layout): its server pair is what the peer port presents. */
  tlsDirectory: string;
  /** Peer names let in; null: any the CA signed. */
  allow: string[] | null;
  /** Default limits.peerHandshakeTimeoutMs (tests shorten it). */
  handshakeTimeoutMs?: number;
}

export class ChunkdNode implements ControlPlane, DeviceProvider {
  readonly config: NodeConfig;
  readonly pool: Pool;
  readonly nbd: NbdServer;
  readonly api: ApiServer;
  readonly apiSocketPath: string;
  readonly #startedAt = Date.now();
  #eventLoop = performance.eventLoopUtilization();
  /** By export name (VOL, VOL@SNAP): what its devices served since start. */
  readonly #ioStats = new Map<string, ExportIoStats>();
  /**
   * The event loop's longest gap between two ticks of a 10 ms timer, since the node was made (after the pool
   * opened), with what the main thread did through it (loop-pauses.ts); its lateness is the longest pause.
   */
  readonly #loopPauses: LoopPauses;
  #threads: NbdThreads | null = null;
  #fuse: FuseFrontEnd | null = null;
  #fuseMounting: Promise<FuseFrontEnd> | null = null;
  #attachments: Attachments | null = null;
  #plugin: DockerPluginServer | null = null;
  #peer: PeerServer | null = null;
  #metrics: MetricsServer | null = null;
  /** The pool's stable identity (pool-layout.ts: pool-id), told to peers in hello. */
  readonly poolId: string;
  readonly #receiver: StreamReceiver;
  /** Which volumes are read-only replicas of other nodes' (loaded at start). */
  #roles: VolumeRoles | null = null;
  #replicator: Replicator | null = null;
  /** Synchronous replicas of this node's volumes (replication/sync-replicas.ts), and the side that serves others'. */
  #sync: SyncReplication | null = null;
  #syncServer: SyncReplicaServer | null = null;
  /** Volumes whose replicas `volume set --sync` is changing: the cluster's link steps leave them alone meanwhile. */
  readonly #settingSync = new Set<string>();
  #cluster: ClusterMember | null = null;

  private constructor(config: NodeConfig, pool: Pool, sharedBuffers: SharedBufferPool | null, poolId: string, tls: TlsServerConfig | null) {
    this.config = config;
    this.pool = pool;
    this.poolId = poolId;
    // With NBD threads the main thread serves their device calls: a poll there would hold those up (idle-poll.ts).
    const mainThreadPolls = (config.nbdThreads ?? 0) === 0 || config.listen === null;
    this.nbd = new NbdServer({ provider: this, log: config.log, sharedBuffers, tls: tls === null ? null : tlsSettings(tls), pollUs: mainThreadPolls ? config.pollUs ?? 0 : 0 });
    this.api = new ApiServer(this);
    this.#receiver = new StreamReceiver(pool, config.log);
    this.apiSocketPath = config.apiSocketPath ?? path.join(pool.directory, 'chunkd.sock');
    this.#loopPauses = new LoopPauses({ onLongGap: (pause) => config.log(`event loop paused ${describeLoopPause(pause)}`, 'debug') });
    this.#loopPauses.start();
  }

  /** Opens the pool and starts the front ends; on any failure everything started is stopped again. */
  static async start(config: NodeConfig): Promise<ChunkdNode> {
    // Where a start goes (a debug line at the end): performance.now() counts from the process's start.
    const entered = performance.now();
    // Credentials first: a missing or bad file is refused with its name before the pool is even opened.
    const tls = config.tls ? loadTlsServerConfig(config.tls.directory, config.tls.mode, config.tls.verifyPeer) : null;
    const peerCredentials = config.peer ? loadCredentials(config.peer.tlsDirectory, 'server') : null;
    const apiCredentials = config.apiTls ? loadCredentials(config.apiTls.tlsDirectory, 'server') : null;
    if (config.cluster && peerCredentials !== null && peerCredentials.name !== config.cluster.nodeName) {
      throw ChunkdError.invalid(`--node-name ${config.cluster.nodeName} differs from the name in this node's certificate (${peerCredentials.name}, in ${peerCredentials.directory}): peers know it by that name, so give --node-name ${peerCredentials.name}`);
    }
    // The checksums' engine, loaded now: a bad CHUNKD_CRC is refused before the pool opens, and a node whose
    // native CRC was not built says so (it runs, its large writes and reads at more CPU).
    config.log(`checksums: ${checksumEngine()}`, nativeChecksums() ? 'debug' : 'info');
    const workers = config.workers ?? defaultWorkerCount();
    // With workers, request buffers live in shared memory so that bytes reach a worker without a copy.
    const sharedBuffers = workers > 0 ? new SharedBufferPool() : null;
    // The root a paged pool writes after a crashed open's replay waits for the start (Pool.open's metadataRootAfter),
    // so that its work does not hold up the ready line; a record or a close lets it go first.
    let startDone = (): void => {};
    const started = new Promise<void>((resolve) => {
      startDone = resolve;
    });
    const pool = await Pool.open({
      metadataRootAfter: started,
      directory: config.poolDirectory,
      log: config.log,
      // The chunk I/O threads start after the ready line too (worker-io.ts's threadsAfter): until then the pool's
      // I/O is done here, as with --workers 0.
      makeIo: sharedBuffers === null ? undefined : (chunkFiles, waitTimes) => new WorkerChunkIo(chunkFiles, { workerCount: workers, buffers: sharedBuffers, log: config.log, waitTimes, threadsAfter: started }),
      verifyReads: config.verifyReads ?? true,
      readDefrag: config.readDefrag ?? true,
      metadata: config.metadata,
      metadataCacheBytes: config.metadataCacheBytes,
    });
    const poolOpened = performance.now();
    if (!pool.verifyReads) config.log('--verify-reads off: reads are NOT checked against their checksums (for measuring what checking costs only)', 'warn');
    let poolId: string;
    try {
      poolId = await pool.identity();
    } catch (error) {
      await pool.close().catch(() => {});
      throw fromSystemError(error, `reading or writing the pool id in ${pool.directory}`);
    }
    const node = new ChunkdNode(config, pool, sharedBuffers, poolId, tls);
    try {
      await node.#receiver.restore();
      node.#roles = await VolumeRoles.load(pool.directory, (volume) => pool.hasVolume(volume));
      const roles = node.#roles;
      node.#replicator = new Replicator({
        pool,
        credentials: replicationCredentials(config),
        log: config.log,
        requestTimeoutMs: config.peerTimeoutMs,
        epochOf: (volume) => roles.epochOf(volume),
        resendWhole: Boolean(config.cluster),
        keptBase: (volume) => roles.keptBase(volume)?.uuid ?? null,
        landed: (volume, peerName) => roles.releaseBase(volume, peerName),
        refuse: (volume) => {
          const role = roles.replicaOf(volume);
          if (role !== null) return `volume ${volume} is a replica of ${role.owner}; replicate it from its owner`;
          return roles.fenced(volume) === null ? null : roles.writeRefusal(volume, 'replicating it')!.message;
        },
        fence: async (volume, by) => {
          await roles.set(volume, { role: 'fenced', epoch: roles.epochOf(volume), ...by });
          await pool.blockWrites(volume, roles.writeRefusal(volume, 'a write'));
        },
      });
      await node.#replicator.load();
      node.#sync = await SyncReplication.load({
        pool, poolDirectory: pool.directory, credentials: replicationCredentials(config), log: config.log, epochOf: (volume) => roles.epochOf(volume),
        // What the volume itself would refuse (a handoff, a fence, the cluster's lease): never sent to a replica.
        writeRefusal: (volume) => pool.writeBlock(volume) ?? node.#cluster?.writeRefusal(volume) ?? null,
        // In a cluster, the replicas in sync go into the volume's record in etcd (failover promotes only those).
        recordInSync: (volume, nodes) => node.#cluster?.recordInSync(volume, nodes) ?? null,
      });
      node.#syncServer = new SyncReplicaServer(pool, roles, config.log);
      // A handoff a crash interrupted is settled first (it may make a volume a replica here, or take writes again).
      for (const [volume] of roles.handoffs()) await (await importHandoff()).resolve(node.#handoffContext(), volume);
      // Before any client is served: a node replaced while it was down learns it from its peers, and is fenced.
      await node.#replicator.checkOwnership(ownershipCheckTimeoutMs);
      // Every volume this node may not write is refused in the pool too (the receiver writes past that).
      for (const volume of roles.readOnlyVolumes()) await pool.blockWrites(volume, roles.writeRefusal(volume, 'a write'));
      for (const [volume] of roles.fencedVolumes()) config.log(roles.writeRefusal(volume, 'writing')!.message, 'warn');
      // In a cluster, no write is acknowledged before the node has joined it (at the end, once its peer port
      // listens, so that its record names it): every write asks the cluster first (fencing by time).
      if (config.cluster) pool.setWriteGate((volume) => ChunkdError.readOnly(`volume ${volume}: writes refused: node ${config.cluster!.nodeName} is joining the cluster`));
      if (config.defaultVolume !== null && !config.cluster && !pool.hasVolume(config.defaultVolume.name)) {
        await node.createVolume(config.defaultVolume.name, config.defaultVolume.sizeBytes);
        config.log(`created volume ${config.defaultVolume.name}`);
      }
      await node.api.listen(node.apiSocketPath);
      if (config.apiTls && apiCredentials !== null) {
        await node.api.listenTls(config.apiTls.listen.host, config.apiTls.listen.port, apiCredentials, config.log);
        config.log(`management API also on ${node.api.tlsAddress()}: mutual TLS, client certificates from the CA in ${apiCredentials.directory}`);
      }
      if (config.metricsListen) {
        // Loaded with --metrics-listen only: an HTTP server of its own (node:http).
        const { MetricsServer } = await needs('the metrics port (--metrics-listen)', () => import('./metrics-server.ts'));
        node.#metrics = await MetricsServer.listen(config.metricsListen.host, config.metricsListen.port, () => node.metrics(), config.log);
        config.log(`metrics on http://${node.#metrics.address()}/metrics`);
      }
      if (config.listen !== null && (config.nbdThreads ?? 0) > 0) {
        node.#threads = await NbdThreads.start({ count: config.nbdThreads!, host: config.listen.host, port: config.listen.port, provider: node, log: config.log, tls, pollUs: config.pollUs ?? 0 });
      } else if (config.listen !== null) {
        await node.nbd.listenTcp(config.listen.host, config.listen.port);
      }
      if (config.nbdSocketPath !== null) await node.nbd.listenUnix(config.nbdSocketPath);
      if (config.fuseDirectory) await node.fuse();
      node.#attachments = Attachments.load({
        poolDirectory: pool.directory,
        log: config.log,
        volumeInfo: (name) => pool.volumeInfo(name),
        fuseFile: async (volume) => (await node.fuse()).filePath(volume),
        nbdUri: (volume) => node.#nbdUri(volume),
        flushVolume: async (volume) => {
          const device = await node.open(volume);
          try {
            await device.flush();
          } finally {
            await device.close();
          }
        },
      });
      if (node.#attachments.size > 0) await node.#attachments.recoverAll();
      if (config.pluginSocketPath) {
        const { DockerPluginServer } = await needs('the Docker volume plugin (--plugin-socket)', () => import('../api/docker-plugin.ts'));
        node.#plugin = new DockerPluginServer(node, path.join(pool.directory, 'mounts'), config.log);
        await node.#plugin.listen(config.pluginSocketPath);
      }
      if (config.peer && peerCredentials !== null) {
        const [{ ReplicaServer }, { PeerServer }, { PeerVerb }] = await needs('the peer port (--peer-listen)', () =>
          Promise.all([import('../replication/replica-server.ts'), import('../peer/server.ts'), import('../peer/protocol.ts')]));
        const replicaServer = new ReplicaServer(pool, node.#receiver, roles, config.log, async (volume, replicaBack) => {
          // In a cluster, writes start once etcd names this node (the old owner records the move next).
          node.#cluster?.expectOwnership(volume);
          if (replicaBack !== null) await node.replicator.ensureLink(volume, replicaBack, defaultEveryMs);
        }, (volume) => node.#syncServer!.forget(volume));
        node.#peer = new PeerServer({
          credentials: peerCredentials,
          allow: config.peer.allow === null ? null : new Set(config.peer.allow),
          poolId,
          software: `chunkd ${softwareVersion}`,
          log: config.log,
          handshakeTimeoutMs: config.peer.handshakeTimeoutMs,
          verbs: new Map([...replicaServer.verbs(), ...node.#syncServer.verbs(), [PeerVerb.volumeCreate, (payload, context) => node.#createForPeer(payload, context.peerName)]]),
          bulkPayload: (size) => node.#syncServer!.takePayload(size) ?? replicaServer.bulkPayload(size),
        });
        await node.#peer.listen(config.peer.listen.host, config.peer.listen.port);
        config.log(`peer port ${node.#peer.addresses().join(' ')}: node ${peerCredentials.name}, mutual TLS with the CA in ${peerCredentials.directory}, ${config.peer.allow === null ? 'any peer the CA signed' : `peers ${config.peer.allow.join(', ')} only`}`);
      }
      if (config.cluster) {
        // etcd's client (grpc, protobufjs: a good part of a start's module loading) is loaded by a cluster's nodes only.
        const { ClusterMember } = await needs('a node in a cluster (--etcd)', () => import('../cluster/cluster.ts'));
        node.#cluster = await ClusterMember.start(config.cluster, node.#clusterHost());
        const cluster = node.#cluster;
        pool.setWriteGate((volume) => cluster.writeRefusal(volume));
        if (config.defaultVolume !== null && !pool.hasVolume(config.defaultVolume.name)) {
          await node.createVolume(config.defaultVolume.name, config.defaultVolume.sizeBytes);
          config.log(`created volume ${config.defaultVolume.name}`);
        }
      }
      node.#replicator.start();
      node.#sync.start();
      const seconds = (from: number, to: number): string => ((to - from) / 1000).toFixed(3);
      const now = performance.now();
      config.log(`node started ${seconds(0, now)} s after its process (modules and options ${seconds(0, entered)} s, pool open ${seconds(entered, poolOpened)} s, the rest: roles, replication, listeners ${seconds(poolOpened, now)} s)`, 'debug');
      // After the caller's ready line (written in the same turn as this returns).
      setImmediate(startDone);
      // libuv's pool below the event loop (thread-priority.ts): its threads exist by now (the pool's files were
      // opened through it); the worker threads set their own.
      setLibuvPoolNice(helperThreadNice());
    } catch (error) {
      await node.stop().catch(() => {});
      throw error;
    }
    return node;
  }

  async stop(): Promise<void> {
    this.#loopPauses.stop();
    await this.#replicator?.stop();
    await this.#metrics?.close();
    await this.#peer?.close();
    await this.#plugin?.close();
    // File systems first (their last writes go through FUSE or NBD to the pool), then the FUSE mount.
    await this.#attachments?.stopAll();
    await this.#fuse?.close();
    await this.#threads?.stop();
    await this.nbd.close();
    // After the front ends: their last writes go to the synchronous replicas too.
    await this.#sync?.stop();
    // Once the front ends have finished their requests, the node leaves the cluster: its lease is revoked, so its
    // registration goes at once and a replica may take its volumes over without waiting for the TTL.
    await this.#cluster?.stop();
    await this.api.close();
    await this.pool.close();
  }

  /** The FUSE front end, mounted on first use: at --fuse DIR, else at <pool>/.fuse. */
  fuse(): Promise<FuseFrontEnd> {
    if (this.#fuse !== null) return Promise.resolve(this.#fuse);
    this.#fuseMounting ??= needs('the FUSE front end', () => import('../fuse/front-end.ts')).then(({ FuseFrontEnd }) => FuseFrontEnd.mount(this.config.fuseDirectory || path.join(this.pool.directory, '.fuse'), this, this.config.log)).then(
      (frontEnd) => {
        this.#fuse = frontEnd;
        this.config.log(`FUSE front end mounted at ${frontEnd.directory}`);
        return frontEnd;
      },
      (error: unknown) => {
        this.#fuseMounting = null;
        throw error;
      },
    );
    return this.#fuseMounting;
  }

  /** The node's own NBD URI of a volume (for nbdfuse): over TLS when TLS is required, with the node's credentials. */
  #nbdUri(volume: string): string | null {
    const tls = this.config.tls?.mode === 'require' ? path.resolve(this.config.tls.directory) : null;
    const secure = tls === null ? '' : 's';
    const credentials = tls === null ? '' : `tls-certificates=${tls}`;
    if (this.config.nbdSocketPath) return `nbd${secure}+unix:///${volume}?socket=${path.resolve(this.config.nbdSocketPath)}${credentials === '' ? '' : `&${credentials}`}`;
    const tcp = this.nbdAddresses().find((address) => !address.startsWith('/') && !address.startsWith('unix:'));
    return tcp === undefined ? null : `nbd${secure}://${tcp}/${volume}${credentials === '' ? '' : `?${credentials}`}`;
  }

  get attachments(): Attachments {
    if (this.#attachments === null) throw new ChunkdError('ESHUTDOWN', 'the node is starting');
    return this.#attachments;
  }

  attach(volume: string, body: Record<string, unknown>): Promise<AttachmentStatus> {
    return this.attachments.attach(validateAttachRequest(volume, body));
  }

  async detach(volume: string): Promise<{ detached: string }> {
    await this.attachments.detach(volume);
    return { detached: volume };
  }

  // ---- DeviceProvider (NBD exports) ----

  async open(exportName: string): Promise<BlockDevice> {
    const device = await this.#openExport(exportName);
    let stats = this.#ioStats.get(exportName);
    if (stats === undefined) this.#ioStats.set(exportName, (stats = emptyIoStats()));
    return new MeasuredDevice(device, stats);
  }

  /** Each export's I/O statistics since the node started (io-stats.ts), for exports that still exist. */
  ioStats(): Record<string, ExportIoStats> {
    const stats: Record<string, ExportIoStats> = {};
    for (const [exportName, exportStats] of this.#ioStats) {
      const at = exportName.indexOf('@');
      const volume = at < 0 ? exportName : exportName.slice(0, at);
      const exists = this.pool.hasVolume(volume) && (at < 0 || this.pool.listSnapshots(volume).some((snapshot) => snapshot.name === exportName.slice(at + 1)));
      if (exists) stats[exportName] = exportStats;
      else this.#ioStats.delete(exportName);
    }
    return stats;
  }

  async #openExport(exportName: string): Promise<BlockDevice> {
    const at = exportName.indexOf('@');
    const volumeName = at < 0 ? exportName : exportName.slice(0, at);
    const nameError = checkName(volumeName);
    if (nameError) throw nameError;
    if (at < 0) {
      if (this.#roles?.replicaOf(volumeName)) return this.#openReplica(volumeName);
      const volume = this.pool.openVolume(volumeName);
      return this.#sync === null ? volume : new SyncDevice(volume, this.#sync);
    }
    const snapshotName = exportName.slice(at + 1);
    const snapshotError = checkName(snapshotName, 'snapshot');
    if (snapshotError) throw snapshotError;
    return this.pool.openSnapshot(volumeName, snapshotName);
  }

  /**
   * A replica's export is its newest replicated snapshot, read-only: a consistent point in time that the streams
   * feeding the replica do not change under a reader (the volume itself is being written by them).
   */
  #openReplica(volume: string): BlockDevice {
    // A synchronous replica is as current as its owner's acknowledged writes: the volume itself, read-only.
    if (this.roles.isSyncReplica(volume)) return new SyncReplicaExport(this.pool.openVolume(volume));
    const newest = newestReplicationPoint(this.pool.listSnapshots(volume));
    if (newest === null) throw ChunkdError.notFound(`volume ${volume} is a replica that has not received its first snapshot yet`);
    return this.pool.openSnapshot(volume, newest.name);
  }

  list(): Array<{ name: string; description: string }> {
    const exports: Array<{ name: string; description: string }> = [];
    for (const volume of this.pool.listVolumes()) {
      const role = this.#roles?.replicaOf(volume.name) ?? null;
      exports.push({ name: volume.name, description: role === null ? `chunkd volume ${volume.name}` : `read-only replica of ${volume.name} on ${role.owner}` });
      for (const snapshot of volume.snapshots) exports.push({ name: `${volume.name}@${snapshot}`, description: `snapshot ${snapshot} of ${volume.name} (read-only)` });
    }
    return exports;
  }

  // ---- ControlPlane (management API) ----

  listVolumes(): VolumeInfo[] {
    return this.pool.listVolumes();
  }

  volumeInfo(name: string): VolumeInfo {
    return this.pool.volumeInfo(name);
  }

  /**
   * Creates a volume. `where`: 'here' (the default: the default volume, the Docker plugin's Create), 'placed' (the
   * API's volume create without --node: in a cluster, the live node with the most free space owns it,
   * cluster/placement.ts), or a named node of the cluster. A volume owned elsewhere is created there (the create
   * forwarded over the peer port, cluster/remote-create.ts). In a cluster it is recorded in etcd too, and `replicas`
   * (0 by default) replica links go to distinct other nodes with the most free space, each with its first cycle
   * done before this returns.
   */
  async createVolume(name: string, sizeBytes: number, replicas = 0, sync: { timeoutMs: number } | null = null, where: VolumePlacement = 'here'): Promise<VolumeInfo & { replicas?: string[]; owner?: string }> {
    if (replicas > 0 && this.#cluster === null) throw ChunkdError.invalid('--replicas needs a cluster (chunkd serve --etcd URL --node-name NAME): without one, add replicas with chunkd replica add VOL --peer HOST:PORT');
    if (typeof where === 'object' && this.#cluster === null) throw ChunkdError.invalid(`--node ${where.node} needs a cluster (chunkd serve --etcd URL --node-name NAME): without one, a volume is created on the node asked`);
    if (sync !== null && replicas === 0) throw ChunkdError.invalid('--sync needs --replicas N (1 or more): the replicas it makes synchronous');
    if (this.#cluster !== null && where !== 'here') {
      const credentials = replicationCredentials(this.config);
      const owner = await this.#cluster.placeOwner(typeof where === 'object' ? where.node : null, typeof credentials !== 'string');
      if (owner.name !== this.#cluster.nodeName) {
        if (typeof credentials === 'string') throw ChunkdError.invalid(`volume ${name} cannot be created on node ${owner.name} from here: ${credentials}`);
        this.config.log(`volume ${name}: created on node ${owner.name} (${typeof where === 'object' ? 'named' : `the most free space, ${formatSize(owner.freeBytes)}`}), asked here`);
        return { ...(await (await importRemoteCreate()).createOnNode(owner.name, owner.peer!, credentials, { name, sizeBytes, replicas, sync })) as unknown as VolumeInfo & { replicas?: string[] }, owner: owner.name };
      }
      return { ...(await this.createVolume(name, sizeBytes, replicas, sync, 'here')), owner: owner.name };
    }
    if (sync !== null && typeof replicationCredentials(this.config) === 'string') throw ChunkdError.invalid(`--sync needs this node's client certificate: ${replicationCredentials(this.config) as string}`);
    // Placed before anything is made, so that a cluster too small refuses with nothing left behind.
    const placement = replicas > 0 ? await this.#cluster!.placeReplicas(replicas) : [];
    // A role left from a replica of that name that never completed (roles.ts) must not apply to a new volume.
    if (!this.pool.hasVolume(name)) await this.roles.forget(name);
    // In a cluster, a renewal meanwhile must not record the new volume itself (without its replicas).
    const created = this.#cluster?.creating(name) ?? (() => {});
    let info: VolumeInfo;
    try {
      info = await this.pool.createVolume(name, sizeBytes);
      if (this.#cluster === null) return info;
      // Made here first, then recorded in etcd: until the record's transaction succeeds its writes are refused, and a
      // crash in between leaves a local volume that the next start records (cluster.ts).
      try {
        await this.#cluster.createVolume(name, sizeBytes, this.roles.epochOf(name), placement.map((node) => node.name), sync);
      } catch (error) {
        await this.pool.removeVolume(name).catch((removeError: unknown) => this.config.log(`volume ${name} was not recorded in etcd and could not be removed here: ${String(removeError)}`));
        throw error;
      }
    } finally {
      created();
    }
    if (sync !== null) {
      // Synchronous links, out of sync until their first resync (a new volume's: its holes, as trims); waited for
      // here, so that the volume is returned with its replicas in sync and recorded so in etcd.
      for (const node of placement) await this.#ensureSyncLink({ volume: name, peer: node.peer, timeoutMs: sync.timeoutMs });
      await this.#sync!.waitInSync(name, createSyncWaitMs).catch((error: unknown) => {
        const message = error instanceof Error ? error.message : String(error);
        throw ChunkdError.io(`volume ${name} was created and recorded with synchronous replicas on ${placement.map((node) => node.name).join(', ')}, but they are not in sync yet: ${message}; chunkd replica status ${name} shows them`, error);
      });
      return { ...info, replicas: placement.map((node) => node.name) };
    }
    for (const node of placement) {
      try {
        await this.replicator.add({ volume: name, peer: node.peer, everyMs: defaultEveryMs, maxRateBytesPerSecond: null });
        await this.replicator.sync(name, node.peer);
      } catch (error) {
        const message = error instanceof Error ? error.message : String(error);
        throw ChunkdError.io(`volume ${name} was created and recorded, but its replica on node ${node.name} (${node.peer}) failed: ${message}; add it with chunkd replica add ${name} --peer ${node.peer}`, error);
      }
    }
    return placement.length === 0 ? info : { ...info, replicas: placement.map((node) => node.name) };
  }

  /** A create another node of the cluster placed here (remote-create.ts): made as this node's own. */
  async #createForPeer(payload: Buffer, peerName: string): Promise<object> {
    const request = (await importRemoteCreate()).parseRemoteCreate(payload);
    if (this.#cluster === null) throw ChunkdError.invalid(`node ${peerName} asked this node to create volume ${request.name}, but this node is not in a cluster`);
    this.config.log(`volume ${request.name}: created here as asked by node ${peerName} (placement)`);
    return this.createVolume(request.name, request.sizeBytes, request.replicas, request.sync, 'here');
  }

  resizeVolume(name: string, sizeBytes: number, force: boolean): Promise<VolumeInfo> {
    this.roles.checkWritable(name, 'a resize');
    const local = (): Promise<VolumeInfo> => this.pool.resizeVolume(name, sizeBytes, force);
    return this.#sync?.resize(name, sizeBytes, force, local) ?? local();
  }

  async removeVolume(name: string): Promise<void> {
    const attachment = this.#attachments?.get(name);
    if (attachment !== undefined) throw ChunkdError.busy(`volume ${name} is attached at ${attachment.mountpoint}; detach it first`);
    if (this.roles.replicaOf(name) !== null) {
      await this.#syncServer?.forget(name);
      // A replica goes whole: its replication snapshots are its owner's to prune, so they go with it (a snapshot
      // a client has open refuses, and the replica stays as it was).
      if (this.#receiver.isActive(name)) throw ChunkdError.busy(`a stream into replica ${name} is running; remove the replica link on its owner first`);
      if ((await this.#receiver.interrupted(name)) !== null) await this.#receiver.abort(name);
      if (!this.pool.hasVolume(name)) {
        await this.roles.forget(name);
        return;
      }
      const open = this.pool.listSnapshots(name).filter((snapshot) => snapshot.openCount > 0);
      if (open.length > 0) throw ChunkdError.busy(`replica ${name} has snapshots in use (${open.map((s) => s.name).join(', ')}); disconnect their clients first`);
      for (const snapshot of this.pool.listSnapshots(name)) await this.pool.removeSnapshot(name, snapshot.name);
    }
    const owned = this.roles.replicaOf(name) === null;
    // Past a resync of its synchronous replicas, which holds no step of it open across the removal.
    const local = (): Promise<void> => this.pool.removeVolume(name);
    await (this.#sync?.removeVolume(name, local) ?? local());
    await this.roles.forget(name);
    await this.#replicator?.forgetVolume(name);
    await this.#sync?.forgetVolume(name);
    if (this.#cluster !== null && owned) await this.#cluster.removeVolume(name);
  }

  // ---- the cluster (serve --etcd) ----

  /** Every volume of the cluster as etcd has it (cluster/listing.ts), or null on a node not in one. */
  clusterVolumes(): Promise<ClusterVolume[]> | null {
    return this.#cluster?.volumes() ?? null;
  }

  /** The Docker plugin's Mount in a cluster: `volume` moved to this node if another owns it, and writable here. */
  async bringHere(volume: string): Promise<void> {
    if (this.#cluster === null) return;
    const result = await this.#cluster.requestMove(volume, this.#cluster.nodeName);
    if (result.moved) this.config.log(`volume ${volume} moved here from ${result.from} (epoch ${result.epoch}) for a Docker Mount`);
    await this.#cluster.waitWritable(volume);
  }

  /** `chunkd volume move VOL --to NODE`: recorded in etcd and performed by the owner (cluster.ts), from any node. */
  moveVolume(volume: string, to: string): Promise<unknown> {
    if (this.#cluster === null) throw ChunkdError.invalid(`chunkd volume move needs a cluster (chunkd serve --etcd URL --node-name NAME); without one, move a volume with chunkd volume handoff ${volume} --to HOST:PORT`);
    return this.#cluster.requestMove(volume, to);
  }

  /** `chunkd volume move --cancel VOL`: the move recorded in etcd stopped, unless past its point of no return (cluster.ts). */
  cancelMove(volume: string): Promise<unknown> {
    if (this.#cluster === null) throw ChunkdError.invalid('chunkd volume move --cancel needs a cluster (chunkd serve --etcd URL --node-name NAME)');
    return this.#cluster.cancelMove(volume);
  }

  /** The cluster as etcd has it; refused on a node that is not in one. */
  clusterStatus(): Promise<ClusterStatus> {
    if (this.#cluster === null) throw ChunkdError.invalid('this node is not in a cluster: start it with chunkd serve --etcd URL --node-name NAME');
    return this.#cluster.status();
  }

  #clusterHost(): ClusterHost {
    const roles = this.roles;
    return {
      poolId: this.poolId,
      log: this.config.log,
      peerAddress: () => this.#peer?.addresses()[0] ?? null,
      describe: async () => {
        const status = await this.pool.status();
        // Test hook: the free space reported (the cluster tests' pools all share one file system, so placement
        // by free space needs a node that says it has less).
        const freeBytes = process.env.CHUNKD_TEST_FREE_BYTES === undefined ? status.fileSystem.freeBytes : Number(process.env.CHUNKD_TEST_FREE_BYTES);
        return { capacityBytes: status.fileSystem.sizeBytes, freeBytes, health: status.failure === null ? 'ok' : `pool failed: ${status.failure}` };
      },
      epochOf: (volume) => (roles.replicaOf(volume) === null && roles.fenced(volume) === null && roles.handingOff(volume) === null ? roles.epochOf(volume) : null),
      // Fenced volumes and volumes being handed off are not this node's to record or confirm (their writes stay
      // refused by their roles either way).
      ownedVolumes: () => this.pool.listVolumes().flatMap((volume) => {
        const owned = roles.replicaOf(volume.name) === null && roles.fenced(volume.name) === null && roles.handingOff(volume.name) === null;
        return owned ? [{ name: volume.name, sizeBytes: volume.sizeBytes, epoch: roles.epochOf(volume.name) }] : [];
      }),
      replicaVolumes: () => this.pool.listVolumes().flatMap((volume) => {
        const role = roles.replicaOf(volume.name);
        if (role === null) return [];
        const newest = newestReplicationPoint(this.pool.listSnapshots(volume.name));
        return [{ name: volume.name, owner: role.owner, ownerEpoch: role.epoch, point: newest?.name ?? null, sync: roles.isSyncReplica(volume.name), stale: newest !== null && newest.uuid === roles.stalePoint(volume.name) }];
      }),
      promote: async (volume) => (await this.#promote(volume)).epoch,
      fencedVolumes: () => roles.fencedVolumes().map(([volume, fence]) => ({ name: volume, epoch: fence.epoch })),
      handingOffVolumes: () => roles.handoffs().map(([volume, role]) => ({ name: volume, epoch: role.epoch })),
      rejoin: async (volume, owner, ownerEpoch, ownerAddress, sync) => {
        if (sync) return this.#rejoinSync(volume, owner, ownerEpoch);
        if (roles.fenced(volume) === null) {
          await roles.set(volume, { role: 'fenced', epoch: roles.epochOf(volume), owner, ownerEpoch, ownerAddress });
          await this.pool.blockWrites(volume, roles.writeRefusal(volume, 'a write'));
        }
        await this.demote(volume, ownerAddress);
      },
      follow: async (volume, owner, ownerEpoch) => {
        if (roles.replicaOf(volume) === null) return;
        // Its newest point came from the previous owner: stale for this one until a stream from it arrives.
        const newest = roles.isSyncReplica(volume) ? null : newestReplicationPoint(this.pool.listSnapshots(volume));
        const stale = roles.stalePoint(volume) ?? newest?.uuid ?? null;
        await roles.set(volume, { role: 'replica', owner, epoch: ownerEpoch, ...(roles.isSyncReplica(volume) ? { sync: true } : {}), ...(stale === null ? {} : { stalePoint: stale }) });
        await this.pool.blockWrites(volume, roles.writeRefusal(volume, 'a write'));
      },
      ensureReplica: async (volume, peer) => {
        if (!this.#settingSync.has(volume)) await this.replicator.ensureLink(volume, peer, defaultEveryMs);
      },
      ensureSyncReplica: async (volume, peer, timeoutMs) => {
        if (!this.#settingSync.has(volume)) await this.#ensureSyncLink({ volume, peer, timeoutMs: timeoutMs ?? syncReplicaTimeoutMsDefault });
      },
      moveRefusal: (volume) => {
        if (this.#sync?.has(volume)) return 'it has synchronous replicas, which a handoff does not carry yet (issue 17)';
        const attachment = this.#attachments?.get(volume);
        return attachment === undefined ? null : `it is mounted at ${attachment.mountpoint} on node ${this.#cluster?.nodeName ?? '?'}${attachment.dockerIds.length > 0 ? ` for ${attachment.dockerIds.length} container(s)` : ''}; unmount it there first`;
      },
      move: async (volume, to, toAddress, epoch, cancelled) => {
        const role = roles.replicaOf(volume);
        // Handed over already (this run, or one a crash interrupted and the start settled): only etcd is left.
        if (role !== null && role.owner === to && role.epoch === epoch + 1) return;
        if (role !== null || roles.epochOf(volume) !== epoch) throw ChunkdError.invalid(`volume ${volume} is not this node's at epoch ${epoch}${role === null ? ` (its epoch here is ${roles.epochOf(volume)})` : ` (a replica of ${role.owner} here)`}: it cannot be moved from here`);
        await (await importHandoff()).handoff(this.#handoffContext(), volume, toAddress, cancelled);
      },
    };
  }

  createSnapshot(volume: string, snapshot: string): Promise<SnapshotInfo> {
    this.roles.checkWritable(volume, 'a snapshot');
    const local = (): Promise<SnapshotInfo> => this.pool.createSnapshot(volume, snapshot);
    return this.#sync?.createSnapshot(volume, snapshot, local) ?? local();
  }

  listSnapshots(volume: string): Promise<CountedSnapshotInfo[]> {
    return this.pool.countedSnapshots(volume);
  }

  async snapshotInfo(volume: string, snapshot: string): Promise<CountedSnapshotInfo> {
    return (await this.pool.countedSnapshots(volume, snapshot))[0]!;
  }

  removeSnapshot(volume: string, snapshot: string): Promise<void> {
    this.roles.checkWritable(volume, 'removing a snapshot (its owner prunes them)');
    const local = (): Promise<void> => this.pool.removeSnapshot(volume, snapshot);
    return this.#sync?.removeSnapshot(volume, snapshot, local) ?? local();
  }

  rollbackVolume(volume: string, snapshot: string): Promise<VolumeInfo> {
    this.roles.checkWritable(volume, 'a rollback');
    const local = (): Promise<VolumeInfo> => this.pool.rollbackVolume(volume, snapshot);
    return this.#sync?.rollback(volume, snapshot, local) ?? local();
  }

  cloneSnapshot(volume: string, snapshot: string, newName: string): Promise<VolumeInfo> {
    return this.pool.cloneSnapshot(volume, snapshot, newName);
  }

  async diff(volume: string, from: string, to: string | null): Promise<DiffReport> {
    const extents = (await this.pool.diff(volume, from, to)).map((extent) => ({ offsetBytes: extent.virtualChunk * chunkSizeBytes, lengthBytes: extent.chunkCount * chunkSizeBytes }));
    return { volume, from, to, changedBytes: extents.reduce((sum, e) => sum + e.lengthBytes, 0), extents };
  }

  async sendStream(request: { volume: string; snapshot: string; from: string | null } | { resumeToken: string }): Promise<PreparedSend> {
    const resolved = 'resumeToken' in request ? resumeRequest(this.pool, request.resumeToken) : { ...request, resumeOffsetBytes: 0 };
    return prepareSend(this.pool, resolved, this.config.log);
  }

  receiveStream(volume: string, body: AsyncIterable<Buffer>): Promise<ReceiveResult> {
    if (this.pool.hasVolume(volume)) this.roles.checkWritable(volume, 'a receive from a file or pipe');
    this.#sync?.checkUnreplicated(volume, 'a receive');
    return this.#receiver.receive(volume, body);
  }

  // ---- replication: replicas of this node's volumes on other nodes ----

  get roles(): VolumeRoles {
    if (this.#roles === null) throw new ChunkdError('ESHUTDOWN', 'the node is starting');
    return this.#roles;
  }

  get replicator(): Replicator {
    if (this.#replicator === null) throw new ChunkdError('ESHUTDOWN', 'the node is starting');
    return this.#replicator;
  }

  addReplica(settings: ReplicaSettings): Promise<ReplicaStatus> {
    if (this.#sync?.status(settings.volume).some((link) => link.peer === settings.peer)) throw ChunkdError.exists(`volume ${settings.volume} has a synchronous replica on ${settings.peer}; remove it first`);
    return this.replicator.add(settings);
  }

  /** A synchronous replica of a volume this node owns (replication/sync-replicas.ts). */
  async addSyncReplica(settings: SyncReplicaSettings): Promise<SyncReplicaStatus> {
    this.roles.checkWritable(settings.volume, 'a synchronous replica');
    if ((await this.replicator.statusOf(settings.volume)).some((link) => link.peer === settings.peer)) throw ChunkdError.exists(`volume ${settings.volume} is replicated to ${settings.peer} asynchronously; remove that link first`);
    if (this.#sync === null) throw new ChunkdError('ESHUTDOWN', 'the node is starting');
    return this.#sync.add(settings);
  }

  /** A synchronous link of a volume of this node's, added unless it exists (the cluster's step and a create may race). */
  async #ensureSyncLink(settings: SyncReplicaSettings): Promise<void> {
    if (this.#sync?.status(settings.volume).some((link) => link.peer === settings.peer)) return;
    await this.addSyncReplica(settings).catch((error: unknown) => {
      if (!(error instanceof ChunkdError && error.code === 'EEXIST' && this.#sync?.status(settings.volume).some((link) => link.peer === settings.peer))) throw error;
    });
  }

  /**
   * `volume set VOL --sync on|off`: the volume's replicas become synchronous (each asynchronous link a synchronous
   * one to the same peer, whose first resync compares the whole volume by checksums and sends what differs;
   * answered once they are in sync) or asynchronous again (from a replication point every replica holds,
   * SyncReplication.makeAsynchronous, so that the first cycle sends only what was written since). In a cluster the
   * volume's record says so too: made synchronous before the links are (an empty in-sync set, so a failover waits
   * for the links rather than promote by point), and asynchronous once the links are (their in-sync set emptied
   * first). Meanwhile the cluster's own link steps leave the volume alone.
   */
  async setVolumeSync(name: string, sync: { timeoutMs: number } | null): Promise<{ volume: string; sync: boolean; replicas: Array<ReplicaStatus | SyncReplicaStatus> }> {
    this.roles.checkWritable(name, 'a change of its replicas');
    if (this.#sync === null) throw new ChunkdError('ESHUTDOWN', 'the node is starting');
    const asynchronous = await this.replicator.statusOf(name);
    const synchronous = this.#sync.status(name);
    if (asynchronous.length + synchronous.length === 0) throw ChunkdError.invalid(`volume ${name} has no replicas to make ${sync === null ? 'asynchronous' : 'synchronous'}: add one (chunkd replica add ${name} --peer HOST:PORT${sync === null ? '' : ' --sync'})`);
    if (this.#settingSync.has(name)) throw ChunkdError.busy(`volume ${name}: its replicas are being changed already`);
    this.#settingSync.add(name);
    try {
      if (sync !== null) {
        const credentials = replicationCredentials(this.config);
        if (typeof credentials === 'string') throw ChunkdError.invalid(`synchronous replicas need this node's client certificate: ${credentials}`);
        for (const link of asynchronous) await this.replicator.remove(name, link.peer);
        try {
          await this.#cluster?.setSync(name, sync);
          for (const link of asynchronous) await this.#ensureSyncLink({ volume: name, peer: link.peer, timeoutMs: sync.timeoutMs, maxRateBytesPerSecond: link.maxRateBytesPerSecond });
        } catch (error) {
          // Never left without replicas: each peer that did not get its synchronous link gets its asynchronous one back.
          const made = new Set(this.#sync.status(name).map((link) => link.peer));
          for (const link of asynchronous) {
            if (made.has(link.peer)) continue;
            await this.replicator.add({ volume: name, peer: link.peer, everyMs: link.everyMs, maxRateBytesPerSecond: link.maxRateBytesPerSecond }).catch((failure: unknown) => this.config.log(`volume ${name}: its asynchronous replica on ${link.peer} could not be added back: ${(failure as Error).message}`, 'error'));
          }
          if (made.size === 0) await this.#cluster?.setSync(name, null).catch(() => {});
          throw error;
        }
      } else {
        if (synchronous.length > 0) {
          const point = uniqueSnapshotName(this.pool.listSnapshots(name).map((snapshot) => snapshot.name));
          const ended = await this.#sync.makeAsynchronous(name, point);
          for (const link of ended) await this.replicator.add({ volume: name, peer: link.peer, everyMs: defaultEveryMs, maxRateBytesPerSecond: link.maxRateBytesPerSecond ?? null });
        }
        await this.#cluster?.setSync(name, null);
      }
    } finally {
      this.#settingSync.delete(name);
    }
    if (sync !== null) {
      await this.#sync.waitInSync(name, createSyncWaitMs).catch((error: unknown) => {
        throw ChunkdError.io(`volume ${name}: its replicas are synchronous, but not in sync yet: ${error instanceof Error ? error.message : String(error)}; chunkd replica status ${name} shows them`, error);
      });
    } else {
      // A first cycle now: it finds the point on both sides, and sends what was written since.
      await this.replicator.sync(name, null).catch((error: unknown) => this.config.log(`volume ${name}: the first cycle of its asynchronous replicas failed: ${error instanceof Error ? error.message : String(error)} (tried again)`, 'warn'));
    }
    return { volume: name, sync: sync !== null, replicas: await this.listReplicas(name) };
  }

  async removeReplica(volume: string, peer: string): Promise<{ removed: string }> {
    if (!(await this.#sync?.remove(volume, peer))) await this.replicator.remove(volume, peer);
    return { removed: `${volume} -> ${peer}` };
  }

  async listReplicas(volume: string | null): Promise<Array<ReplicaStatus | SyncReplicaStatus>> {
    return [...(await (volume === null ? this.replicator.list() : this.replicator.statusOf(volume))), ...(this.#sync?.status(volume) ?? [])];
  }

  syncReplicas(volume: string, peer: string | null): Promise<CycleResult[]> {
    return this.replicator.sync(volume, peer);
  }

  /** Moves a volume to the node at `to` (its replica is made or updated first); see replication/handoff.ts. */
  handoff(volume: string, to: string): Promise<HandoffResult> {
    this.#refuseInCluster(`chunkd volume handoff ${volume}`);
    this.#sync?.checkUnreplicated(volume, 'a handoff');
    return importHandoff().then(({ handoff }) => handoff(this.#handoffContext(), volume, to));
  }

  #handoffContext(): HandoffContext {
    const own = this.#peer?.addresses()[0] ?? null;
    return {
      pool: this.pool,
      roles: this.roles,
      replicator: this.replicator,
      disconnect: async (volume) => this.nbd.disconnectExport(volume) + ((await this.#threads?.disconnectExport(volume)) ?? 0),
      // A wildcard listener's address is not one a peer can use: then the operator adds the replica back.
      ownAddress: own === null || /^(0\.0\.0\.0|\[::\]):/.test(own) ? null : own,
      log: this.config.log,
    };
  }

  /**
   * Failover: makes a replica whose owner is gone this node's own, at its last replicated point, with the epoch
   * one above the owner's. An interrupted receive is given up first (the volume goes back to its last complete
   * point). The old owner learns of the new epoch from its peers when it comes back, and is fenced.
   */
  async promote(volume: string): Promise<{ volume: string; epoch: number; snapshot: string; previousOwner: string }> {
    this.#refuseInCluster(`chunkd replica promote ${volume}`);
    // Only etcd's in-sync set says whether a synchronous replica holds every acknowledged write.
    if (this.roles.isSyncReplica(volume)) throw ChunkdError.invalid(`volume ${volume} is a synchronous replica: it is promoted by the cluster's failover only, which knows whether it is in sync (serve --etcd)`);
    return this.#promote(volume);
  }

  /**
   * A change of owner made by hand is not recorded in etcd: on a clustered node it would leave the new owner's
   * writes refused (etcd names the old one), so it is refused; `volume move` hands over through etcd (moveVolume),
   * and the cluster's own failover promotes (#promote).
   */
  #refuseInCluster(what: string): void {
    if (this.#cluster !== null) throw ChunkdError.invalid(`${what} is refused on a node in a cluster: a change of owner must be recorded in etcd: move a volume with chunkd volume move VOL --to NODE (the cluster promotes a replica by itself when an owner's lease expires)`);
  }

  async #promote(volume: string): Promise<{ volume: string; epoch: number; snapshot: string; previousOwner: string }> {
    const role = this.roles.replicaOf(volume);
    if (role === null) throw ChunkdError.invalid(`volume ${volume} is not a replica on this node; only a replica can be promoted`);
    if (this.roles.isSyncReplica(volume)) return this.#promoteSync(volume, role);
    if (this.#receiver.isActive(volume)) throw ChunkdError.busy(`a stream from ${role.owner} into ${volume} is running: its owner is alive; promote only a replica whose owner is gone (a planned move is a handoff)`);
    if ((await this.#receiver.interrupted(volume)) !== null) await this.#receiver.abort(volume);
    if (!this.pool.hasVolume(volume)) {
      await this.roles.forget(volume);
      throw ChunkdError.notFound(`replica ${volume} had not received its first snapshot; there is nothing to promote`);
    }
    const point = newestReplicationPoint(this.pool.listSnapshots(volume));
    if (point === null) throw ChunkdError.notFound(`replica ${volume} has no replicated snapshot; there is nothing to promote`);
    if ((await this.pool.diff(volume, point.name, null)).length > 0) await this.pool.rollbackVolume(volume, point.name);
    const epoch = role.epoch + 1;
    await this.roles.set(volume, { role: 'owner', epoch, keep: { uuid: point.uuid, until: role.owner } });
    await this.pool.blockWrites(volume, null);
    this.config.log(`volume ${volume} promoted: this node owns it at epoch ${epoch}, from ${point.name} (its last point from ${role.owner}, kept until ${role.owner} rejoins from it)`);
    return { volume, epoch, snapshot: point.name, previousOwner: role.owner };
  }

  /**
   * A synchronous replica promoted: it is the volume as its owner's writes reached it (no point to go back to;
   * that it holds every acknowledged write is the cluster's in-sync set's to say, failover.ts). The role changes
   * first (a syncWrite of the old owner's is refused from then on), then its sessions and handle go.
   */
  async #promoteSync(volume: string, role: { owner: string; epoch: number }): Promise<{ volume: string; epoch: number; snapshot: string; previousOwner: string }> {
    const epoch = role.epoch + 1;
    await this.roles.set(volume, { role: 'owner', epoch });
    await this.#syncServer?.forget(volume);
    await this.pool.blockWrites(volume, null);
    this.config.log(`volume ${volume} promoted: this node owns it at epoch ${epoch}, as its synchronous replica of ${role.owner} held it`);
    return { volume, epoch, snapshot: '', previousOwner: role.owner };
  }

  /**
   * A synchronous volume this node owned, that a failover gave to `owner` at `ownerEpoch` (a higher epoch):
   * it becomes a synchronous replica of it. What it holds that the new owner may not (writes it applied and never
   * acknowledged) is kept as snapshot fenced-<ms>; the new owner's link then resyncs the whole volume, so the
   * replica is its copy before it is recorded in sync. Its own links go (their replicas refuse them anyway).
   */
  async #rejoinSync(volume: string, owner: string, ownerEpoch: number): Promise<void> {
    await this.roles.set(volume, { role: 'replica', owner, epoch: ownerEpoch, sync: true });
    await this.pool.blockWrites(volume, this.roles.writeRefusal(volume, 'a write'));
    await this.#sync?.forgetVolume(volume);
    const keptAs = `fenced-${Date.now()}`;
    await this.pool.createSnapshot(volume, keptAs);
    this.config.log(`volume ${volume}: a synchronous replica of ${owner} (epoch ${ownerEpoch}) from now on; what it held as owner is kept in ${volume}@${keptAs}, and ${owner} resyncs it whole`);
  }

  /**
   * Turns a fenced volume into a replica of its new owner: its writes that never reached the new owner are kept as
   * snapshot fenced-<ms> (for the operator: clone it to see them), the volume goes back to the newest point both
   * nodes hold, and the new owner's replica link (chunkd replica add on it) then brings it up to date.
   */
  async demote(volume: string, ownerAddress: string | null): Promise<{ volume: string; owner: string; base: string; keptAs: string | null }> {
    const fence = this.roles.fenced(volume);
    if (fence === null) throw ChunkdError.invalid(`volume ${volume} is not fenced on this node; only a volume another node has taken over can be demoted`);
    const address = ownerAddress ?? fence.ownerAddress;
    if (address === null) throw ChunkdError.invalid(`the new owner of ${volume} is ${fence.owner}, at an address this node does not know: give it (chunkd replica demote ${volume} --owner HOST:PORT)`);
    const info = await this.replicator.askPeer(address, volume);
    const theirs = new Set(info.snapshots.map((snapshot) => snapshot.uuid));
    const base = this.pool.listSnapshots(volume).reverse().find((snapshot) => theirs.has(snapshot.uuid)) ?? null;
    if (base === null) throw ChunkdError.invalid(`volume ${volume} here shares no snapshot with ${fence.owner}'s; remove it here (chunkd volume rm ${volume}) and add a replica from ${fence.owner}`);
    let keptAs: string | null = null;
    if ((await this.pool.diff(volume, base.name, null)).length > 0) {
      keptAs = `fenced-${Date.now()}`;
      await this.pool.createSnapshot(volume, keptAs);
    }
    // Replication points of this node's that never reached the new owner would look like the replica's newest.
    for (const snapshot of this.pool.listSnapshots(volume)) {
      if (snapshot.name.startsWith(replicationSnapshotPrefix) && Date.parse(snapshot.createdAt) > Date.parse(base.createdAt) && !theirs.has(snapshot.uuid)) {
        await this.pool.removeSnapshot(volume, snapshot.name);
      }
    }
    await this.pool.rollbackVolume(volume, base.name);
    await this.replicator.forgetVolume(volume);
    await this.roles.set(volume, { role: 'replica', owner: fence.owner, epoch: fence.ownerEpoch });
    await this.pool.blockWrites(volume, this.roles.writeRefusal(volume, 'a write'));
    this.config.log(`volume ${volume} demoted: a replica of ${fence.owner} (epoch ${fence.ownerEpoch}) from ${base.name}${keptAs === null ? '' : `; this node's writes after it are kept in ${volume}@${keptAs}`}`);
    return { volume, owner: fence.owner, base: base.name, keptAs };
  }

  receiveToken(volume: string): Promise<unknown> {
    return this.#receiver.resumeToken(volume);
  }

  abortReceive(volume: string): Promise<unknown> {
    return this.#receiver.abort(volume);
  }

  /** A scrub of the volume; on the owner of one with synchronous replicas, repaired and verified against them too. */
  async scrub(volume: string, onProgress: (doneBytes: number, totalBytes: number) => void): Promise<ScrubReport> {
    const report = await this.pool.scrub(volume, onProgress);
    if (this.#sync === null || !this.#sync.has(volume) || this.roles.replicaOf(volume) !== null) return report;
    return this.#sync.scrubWithReplicas(volume, report);
  }

  async status(): Promise<NodeStatus> {
    const now = performance.eventLoopUtilization();
    const sinceLast = performance.eventLoopUtilization(now, this.#eventLoop);
    const longestPause = this.#loopPauses.longest();
    this.#eventLoop = now;
    return {
      pid: process.pid,
      uptimeSeconds: Math.round((Date.now() - this.#startedAt) / 1000),
      version: softwareVersion,
      nodeVersion: process.version,
      metricsListen: this.metricsAddress(),
      pool: { ...(await this.pool.status()), id: this.poolId },
      volumes: this.pool.listVolumes(),
      nbd: await this.#nbdStatus(),
      api: { socket: this.apiSocketPath, tls: this.api.tlsAddress() },
      peer: this.#peer?.stats() ?? null,
      replication: {
        replicas: (await this.#replicator?.list()) ?? [],
        syncReplicas: this.#sync?.status(null) ?? [],
        replicaVolumes: this.pool.listVolumes().flatMap((volume) => {
          const role = this.#roles?.replicaOf(volume.name) ?? null;
          return role === null ? [] : [{ volume: volume.name, owner: role.owner, epoch: role.epoch, receiving: this.pool.isReceiving(volume.name) }];
        }),
        fenced: (this.#roles?.fencedVolumes() ?? []).map(([volume, fence]) => ({ volume, ...fence })),
      },
      fuse: this.#fuse?.status() ?? null,
      attachments: this.#attachments?.list() ?? [],
      eventLoopUtilization: Number(sinceLast.utilization.toFixed(4)),
      eventLoopDelayMaxSeconds: longestPause?.delaySeconds ?? 0,
      eventLoopLongestPause: longestPause,
      io: this.pool.ioStatus(),
    };
  }

  /** Where peers reach the node (serve --peer-listen), or none. */
  /** HOST:PORT of the metrics port (serve --metrics-listen), or null. */
  metricsAddress(): string | null {
    return this.#metrics?.address() ?? null;
  }

  peerAddresses(): string[] {
    return this.#peer?.addresses() ?? [];
  }

  /** Where NBD clients reach the node: the protocol threads' TCP address, then the main thread's listeners. */
  nbdAddresses(): string[] {
    return [...(this.#threads?.addresses() ?? []), ...this.nbd.addresses()];
  }

  async #nbdStatus(): Promise<NodeStatus['nbd']> {
    const main = this.nbd.stats();
    const threads = this.#threads === null ? null : await this.#threads.stats();
    return {
      listen: this.nbdAddresses(),
      tls: this.config.tls ? { mode: this.config.tls.mode, verifyPeer: this.config.tls.verifyPeer } : { mode: 'off', verifyPeer: false },
      threads: this.#threads?.threadCount ?? 0,
      connectionsOpen: main.connectionsOpen + (threads?.connectionsOpen ?? 0),
      connectionsTotal: main.connectionsTotal + (threads?.connectionsTotal ?? 0),
      requestsTotal: main.requestsTotal + (threads?.requestsTotal ?? 0),
      requestErrorsTotal: main.requestErrorsTotal + (threads?.requestErrorsTotal ?? 0),
      idlePoll: threads === null ? main.idlePoll : addIdlePollCounters({ ...main.idlePoll }, threads.idlePoll),
    };
  }

  async metrics(): Promise<string> {
    const fronts = [this.nbd.stats().stages];
    if (this.#threads !== null) fronts.push((await this.#threads.stats()).stages);
    return renderMetrics(await this.status(), this.ioStats(), withProtocolStages(this.pool.stageTimes(), fronts));
  }

  checkpoint(): Promise<CheckpointReport> {
    return this.pool.checkpoint();
  }
}

export interface NodeStatus {
  pid: number;
  uptimeSeconds: number;
  /** chunkd's version (package.json). */
  version: string;
  nodeVersion: string;
  /** The metrics port (serve --metrics-listen), or null. */
  metricsListen: string | null;
  pool: Awaited<ReturnType<Pool['status']>> & { id: string };
  volumes: VolumeInfo[];
  nbd: { listen: string[]; tls: { mode: 'off' | 'on' | 'require'; verifyPeer: boolean }; threads: number; connectionsOpen: number; connectionsTotal: number; requestsTotal: number; requestErrorsTotal: number; idlePoll: IdlePollCounters };
  api: { socket: string; tls: string | null };
  peer: PeerServerStats | null;
  /** Replicas of this node's volumes elsewhere, and the volumes here that are replicas of others'. */
  replication: {
    replicas: ReplicaStatus[];
    /** Synchronous replicas of this node's volumes elsewhere. */
    syncReplicas: SyncReplicaStatus[];
    replicaVolumes: Array<{ volume: string; owner: string; epoch: number; receiving: boolean }>;
    /** Volumes this node owned until another node took them over (failover): writes refused until demoted. */
    fenced: Array<{ volume: string } & FencedRole>;
  };
  fuse: FuseStatus | null;
  attachments: AttachmentStatus[];
  eventLoopUtilization: number;
  /** The event loop's longest pause since the node started (from a 10 ms timer's lateness, so +-10 ms); 0 before any. */
  eventLoopDelayMaxSeconds: number;
  /** The longest gap between two ticks of a 10 ms timer on the main thread, split into its CPU, its wait for a CPU and the rest; null before two ticks. */
  eventLoopLongestPause: LoopPause | null;
  /** The chunk I/O engine: inline, or worker threads with each one's requests in flight. */
  io: IoEngineStatus;
}

/** Time each replica peer has to answer the ownership check at start. */
const ownershipCheckTimeoutMs = 3_000;

// Loaded when used (core/lazy-import.ts): a handoff, a create placed on another node of a cluster.
const importHandoff = () => needs('a handoff', () => import('../replication/handoff.ts'));
const importRemoteCreate = () => needs('a create on another node', () => import('../cluster/remote-create.ts'));

/** How long `volume create --sync` waits for its new replicas' first resync (a new volume's holes: quick). */
const createSyncWaitMs = 60_000;

/** This node's client pair for replication (the directory of its peer port, else of its API or NBD TLS), or why there is none. */
function replicationCredentials(config: NodeConfig): TlsCredentials | string {
  const directory = config.peer?.tlsDirectory ?? config.apiTls?.tlsDirectory ?? config.tls?.directory;
  if (directory === undefined) return 'start the node with --tls-dir DIR (its set from chunkd tls init, with client-cert.pem and client-key.pem), and --peer-listen so peers can replicate back';
  try {
    return loadCredentials(directory, 'client');
  } catch (error) {
    if (!(error instanceof ChunkdError)) throw error;
    return error.message;
  }
}
