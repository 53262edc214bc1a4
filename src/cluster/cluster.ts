// A node's membership of a cluster coordinated through etcd (serve --etcd URL,... --node-name NAME): registration
// under a lease kept alive, the volumes' ownership records, and fencing by time. Without --etcd none of this runs.
//
// Design note: the keys (all under /chunkd/v1/, records.ts) and who writes each
//
//   nodes/NAME    {name, poolId, peer, capacityBytes, freeBytes, version, health, updatedAt}
//                 Written by node NAME only, attached to NAME's lease: it exists exactly while the lease lives (etcd
//                 deletes it when the lease expires or is revoked). Created by a transaction that compares the key's
//                 version with 0 (a name a live node holds is refused), or its mod revision when the record is this
//                 same pool's from a previous run (the pool's lock says that process is gone).
//   volumes/NAME  {name, sizeBytes, owner, epoch, replicas, createdAt[, sync, syncTimeoutMs, inSync: {epoch, nodes}]}
//                 Not under any lease: it outlives its owner. Created by the owner in a transaction comparing the
//                 key's version with 0; every later change is a transaction comparing the mod revision it read, so of
//                 two concurrent writers exactly one wins and the other re-reads.
//                 A synchronous volume (volume create --replicas N --sync) has `sync` and its links' timeout, and
//                 `inSync`: the replicas its owner holds in sync (every write it acknowledged is on each), at the
//                 owner's epoch, written by that owner only (recordInSync, a transaction comparing the mod revision
//                 and its registration under its lease): before it acknowledges a write or flush without a replica
//                 the set lists (one that fell out of sync; or any, at its start, when it does not know the set), and
//                 after a resync brings one back in sync. So etcd never lists in sync a replica that lacks an
//                 acknowledged write; it may lag behind one that came back (it is then passed over, never wrongly
//                 chosen). The set is in the volume's record, not a key of its own, so that the failover's
//                 transaction, which compares the record's revision, also compares the set it chose by: a set
//                 changed after the successor read it fails the takeover, with no second compare to keep in step.
//                 The cost: each change of the set changes the record's revision, and a concurrent writer of the
//                 record (a move being recorded) re-reads; the set changes only when a replica falls out or
//                 comes back.
//   replicas/VOL/NODE  {volume, node, owner, ownerEpoch, point, pointMs[, stale]}
//                 Written by node NODE only, under its lease, while it holds a replica of VOL: the owner and epoch it
//                 follows and its newest complete replicated point (repl-<owner's ms>). Read by every node to pick
//                 the successor of an owner whose lease expired (failover.ts). `stale`: the point came from an
//                 earlier owner (the replica followed this one after a failover and has received nothing from it):
//                 the owner still replicates to it, but it is no successor.
//   operations/move/VOL  {volume, from, epoch, to, requestedBy, requestedAt}
//                 A move asked for (chunkd volume move, on any node): created by a transaction comparing the volume
//                 record's mod revision read (so it starts from that owner and epoch) and that no move is recorded
//                 (or the stale one read). Not under a lease: it outlives the nodes, so that a crash resumes it.
//                 Deleted in the same transaction that records the new owner (by the old owner after its handoff,
//                 or by the target, which owns the volume locally at epoch + 1 once the handoff's last step ran
//                 there: a node that owns a volume at the epoch after its record's records itself, move or not),
//                 or by any node once it no longer starts from the volume's record (removed, failed over).
//                 The owner may instead refuse it before anything starts (the volume is mounted there): it writes
//                 `refused` into the record (transaction on its revision), and the asking node reports the reason
//                 and deletes it. The Docker plugin's Mount on a node that does not own the volume is such a move.
//                 `volume move --cancel` (any node) writes `cancelled` into it (transaction on its revision): the
//                 owner's handoff stops at its next step, before the target is asked to take the volume (rolled
//                 back: writes resume), and the owner deletes the move; a handoff past that point completes and is
//                 recorded as any other. The target deletes a move whose owner has been gone a TTL when it neither
//                 took the volume nor holds a replica that may take it over; so a move is never left pending.
//
// Why two nodes never both own a volume (both acknowledging writes to it):
//   1. A node acknowledges a write to a volume only while (a) it has confirmed, by a transaction that also
//      compares that nodes/ITSELF is attached to its current lease, that volumes/V names it as owner at the epoch
//      its roles.json holds (the same number roles.ts keeps), and (b) its lease clock is live: less than
//      TTL - margin since it sent the last keepalive etcd confirmed (lease-clock.ts). Every write checks both, under
//      the volume's lock, before it is applied and again before it is acknowledged (store/volume.ts's write gate).
//   2. Another node may become V's owner only by a transaction on volumes/V that raises the epoch and compares that
//      nodes/OWNER does not exist, i.e. that the owner's lease has expired in etcd, which happens no earlier than
//      TTL after the owner sent its last renewal: by then the owner stopped acknowledging (1b), however long it was
//      paused, since its check reads the monotonic clock at the write. And it tries only once it has seen nodes/OWNER
//      absent for a whole TTL (failover.ts's AbsenceClock): etcd before 3.4.28/3.5.11 can revoke a lease early (a
//      stalled, deposed leader revokes what it believes expired, etcd-io/etcd#15247), and the owner's last renewal
//      is older than that revocation, so a TTL after it the owner has stopped even then.
//   3. An owner whose lease was lost does not resume on a new lease until step 1a holds again: its confirmation is
//      cleared with the lease, and a lapse of the clock (even without losing the lease) re-checks too.
//   Automatic failover is step 2: every node, at each renewal, looks for volumes whose owner is unregistered; the
//   live replica of that owner and epoch with the newest point (ties: the first name) runs the transaction (which
//   also compares its own registration under its lease), then promotes its replica locally (node.promote, epoch + 1,
//   the same number). Of nodes deciding at once on different views, the revision compare lets one win.
//   A synchronous volume goes only to a live replica of its inSync set at the owner's epoch (failover.ts; ties:
//   the first name), which holds every acknowledged write; with none live it waits (cluster status says why).
//   The new owner's record has inSync {epoch + 1, []}: it links synchronously to each other replica the record
//   names (#converge; the replica takes its syncOpen at the higher epoch, so the old owner is fenced there too),
//   resyncs it in full, and records it in sync when done.
//   A transaction compares revisions in etcd, which is linearizable: of a takeover and the owner's confirmation,
//   one is ordered first, and the other sees its effect.
//   A move is the handoff (replication/handoff.ts) run by the owner when it sees the operation: it stops writing
//   durably (role handing-off) before the target may own the volume (takeOwnership, durable there at epoch + 1),
//   and the target's writes still wait for step 1a: etcd naming it at epoch + 1, which the record's change gives
//   (one transaction on the volume's and the move's revisions), confirmed by the same transaction as at join
//   (it looks for the record every 0.1 s after it took the volume, and at every renewal). A crash is settled
//   by the handoff's own resolve() at the old owner's start (asks the target: completed, or rolled back and then
//   performed again from etcd), and a target that took the volume records the move itself. Of a move and a
//   failover at once, the revision compare lets one win; the move's operation is then stale and deleted. While a
//   move to a live target is recorded and the target is not among the owner's replica candidates (it took the
//   volume, and records the move itself), no replica takes the volume over (failover.ts pendingMoveTarget): the
//   target may hold writes no replica has.
import { performance } from 'node:perf_hooks';
import { Etcd3, EtcdLeaseInvalidError, type IKeyValue } from 'etcd3';
import { HostCooldown, type HostPolicy } from './etcd-hosts.ts';
import { ChunkdError } from '../core/errors.ts';
import { softwareVersion } from '../core/version.ts';
import { keepaliveIntervalMs, LeaseClock, leaseTiming } from './lease-clock.ts';
import { moveKey, movesPrefix, nodeKey, nodesPrefix, parseMoveRecord, parseNodeRecord, parseReplicaRecord, parseVolumeRecord, replicaKey, replicasPrefix, volumeKey, volumesPrefix, type MoveRecord, type NodeRecord, type ReplicaRecord, type VolumeRecord } from './records.ts';
import { AbsenceClock, chooseSuccessor, orphanedVolumes, pendingMoveTarget } from './failover.ts';
import { describeVolumes, type ClusterVolume } from './listing.ts';
import { chooseOwner, chooseReplicaNodes } from './placement.ts';

export interface ClusterConfig {
  endpoints: string[];
  nodeName: string;
  leaseTtlMs: number;
  /**
   * For https:// endpoints: the CA that signed etcd's certificate, and the client pair this node presents (etcd's
   * --client-cert-auth); PEM text from --tls-dir. Null for http://.
   */
  tls?: { ca: string; cert: string; key: string } | null;
}

/** What the node tells the cluster about itself, and the volumes it owns locally (roles.ts). */
export interface ClusterHost {
  poolId: string;
  peerAddress(): string | null;
  describe(): Promise<{ capacityBytes: number; freeBytes: number; health: string }>;
  /** This node's ownership epoch of a volume it owns now (roles.ts), or null (a replica, fenced, being handed off). */
  epochOf(volume: string): number | null;
  /** Volumes this node owns in its pool (not replicas), with its ownership epoch (roles.ts) and size. */
  ownedVolumes(): Array<{ name: string; sizeBytes: number; epoch: number }>;
  /**
   * Volumes this node holds as replicas: the owner and epoch each follows, and its newest complete replicated point
   * (a synchronous replica, `sync`, has none: the owner's in-sync set says what it holds).
   */
  replicaVolumes(): Array<{ name: string; owner: string; ownerEpoch: number; point: string | null; sync: boolean; stale?: boolean }>;
  /** Makes the replica `volume` this node's own at its last replicated point (node.promote); the new epoch. */
  promote(volume: string): Promise<number>;
  /** Volumes this node owned and another has since taken over here (roles.ts fenced), with this node's old epoch. */
  fencedVolumes(): Array<{ name: string; epoch: number }>;
  /** Volumes this node is handing off (roles.ts handing-off: writes frozen), with its epoch. */
  handingOffVolumes(): Array<{ name: string; epoch: number }>;
  /** Turns a volume another node owns now at a higher epoch into a replica of it (fenced first, then node.demote). */
  rejoin(volume: string, owner: string, ownerEpoch: number, ownerAddress: string, sync: boolean): Promise<void>;
  /** A replica whose owner was replaced (failover): it follows the new owner at its epoch from now on. */
  follow(volume: string, owner: string, ownerEpoch: number): Promise<void>;
  /**
   * Hands this node's volume, owned at `epoch`, over to node `to` at `toAddress` (replication/handoff.ts), or
   * settles one a crash interrupted; returns at once when the volume is already `to`'s replica here at epoch + 1.
   */
  move(volume: string, to: string, toAddress: string, epoch: number, cancelled: () => Promise<boolean>): Promise<void>;
  /** Why this node's volume may not be moved away now (mounted here), or null. */
  moveRefusal(volume: string): string | null;
  /** Makes sure this node replicates its volume to the node at `peer` (a replica that follows it). */
  ensureReplica(volume: string, peer: string): Promise<void>;
  /** Makes sure this node's synchronous volume has a synchronous link to the node at `peer` (sync-replicas.ts). */
  ensureSyncReplica(volume: string, peer: string, timeoutMs: number | null): Promise<void>;
  log: (line: string) => void;
}

export interface ClusterStatus {
  self: string;
  lease: { id: string; ttlMs: number; marginMs: number; renewedAgoMs: number | null; live: boolean };
  nodes: Array<NodeRecord & { alive: boolean; volumes: string[] }>;
  volumes: Array<Omit<ClusterVolume, 'replicas' | 'ownerAlive' | 'move'> & { replicas: string[] }>;
}

/**
 * The etcd client's fault handling overall: none. Its default retries a failed call three times and opens a circuit
 * breaker for 5 s after three failures, which would keep writes refused that long after etcd returns; the keepalive
 * loop retries on its own schedule instead. (Only `execute` is what etcd3 calls.) Per member: HostCooldown
 * (etcd-hosts.ts), a member that does not answer is passed over while another may.
 */
const noFaultHandling = {
  execute: (fn: (context: { signal: AbortSignal }) => unknown, signal?: AbortSignal) => Promise.resolve().then(() => fn({ signal: signal ?? new AbortController().signal })),
} as unknown as HostPolicy;

/** How long a member that did not answer a call is passed over (while another member is not). */
const hostCooldownMs = 5_000;

/** How long one call to etcd may take before it counts as unanswered (at start, and for commands). */
const callTimeoutMs = 3_000;

/** How long `volume move` waits for the move it recorded, and how often it looks. */
const moveWaitMs = 10 * 60_000;
const movePollMs = 100;

/** The keepalive loop's pause after a failed beat before it tries again. */
const retryDelayMs = 50;

export class ClusterMember {
  readonly config: ClusterConfig;
  readonly #host: ClusterHost;
  readonly #client: Etcd3;
  readonly #clock: LeaseClock;
  #leaseId: string | null = null;
  /** Volumes whose ownership this node confirmed under its current lease, with the epoch confirmed. */
  readonly #confirmed = new Map<string, number>();
  /** Why a volume's ownership is not confirmed, when etcd said something else. */
  readonly #unconfirmed = new Map<string, string>();
  #stopping = false;
  #loop: Promise<void> | null = null;
  #wake: (() => void) | null = null;
  #lastError: string | null = null;
  /**
   * How long each call of the keepalive loop may take: half a renewal period (at least 0.5 s), so that a call that
   * hit an etcd member that does not answer (paused, partitioned) leaves time to try another before the margin.
   */
  readonly #loopTimeoutMs: number;
  /** callTimeoutMs while the node joins at start (a clear error if etcd does not answer), then #loopTimeoutMs. */
  #timeoutMs = callTimeoutMs;
  /** The replica records this node last wrote (volume -> JSON), so that only changes are written. */
  readonly #published = new Map<string, string>();
  /** Volumes being created here (createVolume's caller, between the local volume and its record): not recorded by a renewal. */
  readonly #creating = new Set<string>();
  /** The in-sync set's write running per volume (recordInSync): one at a time, in the order asked. */
  readonly #inSyncWrites = new Map<string, Promise<void>>();
  /** Volumes whose move running here was cancelled (volume move --cancel): the handoff asks between its steps. */
  readonly #cancelledMoves = new Set<string>();
  /** Background steps running (#converge), by volume, and the last failure of each. */
  readonly #steps = new Map<string, Promise<void>>();
  readonly #stepErrors = new Map<string, string>();
  /** How long each volume owner has been seen unregistered (a failover waits a TTL: failover.ts). */
  readonly #absences: AbsenceClock;

  private constructor(config: ClusterConfig, host: ClusterHost) {
    this.config = config;
    this.#host = host;
    this.#clock = new LeaseClock(leaseTiming(config.leaseTtlMs));
    this.#absences = new AbsenceClock(2 * keepaliveIntervalMs(this.#clock.timing));
    this.#loopTimeoutMs = Math.min(callTimeoutMs, Math.max(500, Math.floor(keepaliveIntervalMs(this.#clock.timing) / 2)));
    const tls = config.tls ?? null;
    const hosts = new HostCooldown(config.endpoints, hostCooldownMs);
    this.#client = new Etcd3({
      hosts: config.endpoints,
      dialTimeout: callTimeoutMs,
      faultHandling: { host: (name) => hosts.policy(name), global: noFaultHandling },
      ...(tls === null ? {} : { credentials: { rootCertificate: Buffer.from(tls.ca), certChain: Buffer.from(tls.cert), privateKey: Buffer.from(tls.key) } }),
    });
  }

  /**
   * Joins the cluster: a lease, this node's record under it, and the ownership of its volumes confirmed (or
   * recorded, for a volume etcd does not know yet). Refused with a clear error when etcd does not answer or the
   * name is held by another live node; nothing is left behind then.
   */
  static async start(config: ClusterConfig, host: ClusterHost): Promise<ClusterMember> {
    const member = new ClusterMember(config, host);
    try {
      await member.#join(true);
    } catch (error) {
      await member.#revoke();
      member.#client.close();
      if (error instanceof ChunkdError) throw error;
      throw ChunkdError.io(`etcd at ${config.endpoints.join(',')} is unreachable or failed: ${describeError(error)}`, error);
    }
    member.#timeoutMs = member.#loopTimeoutMs;
    member.#loop = member.#keepalive();
    host.log(`cluster: node ${config.nodeName} registered in etcd ${config.endpoints.join(',')} (lease ${member.#leaseId}, TTL ${config.leaseTtlMs / 1000} s; writes stop ${member.#clock.timing.marginMs / 1000} s before it can expire)`);
    return member;
  }

  get nodeName(): string {
    return this.config.nodeName;
  }

  /** Null when a write to `volume` may be acknowledged now; else the error for the client (store/volume.ts asks at each write). */
  writeRefusal(volume: string): ChunkdError | null {
    const lapse = this.#clock.refusal(volume, performance.now());
    if (lapse !== null) {
      // A lapse seen by a write (the process was paused, its timers have not run yet): the next renewal re-checks.
      if (this.#confirmed.size > 0) this.#forgetConfirmations();
      return lapse;
    }
    // The epoch confirmed in etcd must still be the one this node writes at (roles.ts).
    const confirmed = this.#confirmed.get(volume);
    if (confirmed !== undefined && confirmed === this.#host.epochOf(volume)) return null;
    const why = this.#unconfirmed.get(volume) ?? 'its ownership is not confirmed in etcd yet';
    return ChunkdError.readOnly(`volume ${volume}: writes refused on node ${this.nodeName}: ${why}`);
  }

  /**
   * A volume handed over to this node (the handoff's last step ran here): its record is looked at every
   * movePollMs for up to a TTL and confirmed (#confirmRecorded) as soon as the old owner has recorded the move,
   * so that writes start then rather than at this node's next renewal.
   */
  expectOwnership(volume: string): void {
    this.#background(`${volume}:taken`, 'confirming its ownership here', async () => {
      const until = performance.now() + this.#clock.timing.ttlMs;
      while (!this.#stopping && performance.now() < until && this.#confirmed.get(volume) !== this.#host.epochOf(volume)) {
        if (this.#clock.live(performance.now())) {
          const kv = await this.#get(volumeKey(volume));
          if (kv !== null) await this.#confirmRecorded([kv]);
        }
        await new Promise((resolve) => setTimeout(resolve, movePollMs));
      }
    });
  }

  /** Waits until a write to `volume` would be acknowledged here (a volume just moved here: its next renewal), at most a TTL. */
  async waitWritable(volume: string): Promise<void> {
    const until = performance.now() + this.#clock.timing.ttlMs;
    for (;;) {
      const refusal = this.writeRefusal(volume);
      if (refusal === null) return;
      if (performance.now() > until || this.#stopping) throw refusal;
      await new Promise((resolve) => setTimeout(resolve, movePollMs));
    }
  }

  /**
   * The owner of a new volume asked for here (placement.ts): node `named` when given (it must be live), else the
   * live node with the most free space; `forward`: whether this node can reach other nodes' peer ports.
   */
  async placeOwner(named: string | null, forward: boolean): Promise<NodeRecord> {
    const nodes = (await this.#range(nodesPrefix, deadline())).map((kv) => parseNodeRecord(kv.key.toString(), kv.value));
    if (named === null) return chooseOwner(nodes, this.nodeName, forward);
    const node = nodes.find((candidate) => candidate.name === named);
    if (node === undefined) throw ChunkdError.invalid(`node ${named} is not a live member of the cluster (chunkd cluster status lists them)`);
    if (named !== this.nodeName && node.peer === null) throw ChunkdError.invalid(`node ${named} has no peer port (serve --peer-listen): a volume cannot be created there from another node`);
    return node;
  }

  /** Where `count` replicas of a new volume of this node's go (placement.ts), from the live nodes' records. */
  async placeReplicas(count: number): Promise<Array<{ name: string; peer: string }>> {
    const nodes = await this.#range(nodesPrefix, deadline());
    return chooseReplicaNodes(nodes.map((kv) => parseNodeRecord(kv.key.toString(), kv.value)), this.nodeName, count);
  }

  /**
   * Marks `name` as being created here until the returned function is called: a renewal meanwhile (which records
   * local volumes etcd does not know, #confirmOwnership) leaves it to createVolume, whose record says its replicas.
   */
  creating(name: string): () => void {
    this.#creating.add(name);
    return () => this.#creating.delete(name);
  }

  /** Records a new volume owned by this node at `epoch`; refused when etcd already has a volume of that name. */
  async createVolume(name: string, sizeBytes: number, epoch: number, replicas: string[] = [], sync: { timeoutMs: number } | null = null): Promise<VolumeRecord> {
    const record: VolumeRecord = { name, sizeBytes, owner: this.nodeName, epoch, replicas, createdAt: new Date().toISOString(), ...(sync !== null ? { sync: true, syncTimeoutMs: sync.timeoutMs, inSync: { epoch, nodes: [] } } as const : {}) };
    const result = await this.#client
      .if(volumeKey(name), 'Version', '==', 0)
      .and(nodeKey(this.nodeName), 'Lease', '==', this.#requireLease())
      .then(this.#client.put(volumeKey(name)).value(JSON.stringify(record)))
      .else(this.#client.get(volumeKey(name)), this.#client.get(nodeKey(this.nodeName)))
      .options(deadline())
      .commit();
    if (!result.succeeded) {
      const existing = result.responses[0]?.response_range.kvs[0];
      if (existing === undefined) throw ChunkdError.io(`volume ${name} was not recorded in etcd: node ${this.nodeName} is not registered under its current lease (it is being renewed); try again`);
      const other = parseVolumeRecord(volumeKey(name), existing.value);
      throw ChunkdError.exists(`volume ${name} already exists in the cluster (owner ${other.owner}, epoch ${other.epoch})`);
    }
    this.#confirm(name, epoch);
    return record;
  }

  /**
   * Records in etcd which replicas of `volume` this node holds in sync at its epoch (the record's inSync; the
   * design note of sync-replicas.ts says when): `nodes()` is read when the write starts, so that of calls made
   * one after another the newest set is the one that stays. One call runs at a time per volume. Each is a
   * transaction comparing the record's revision read (and this node's registration under its lease); a record
   * changed meanwhile (another field) is read again. Refused when etcd does not name this node as the owner at its
   * epoch, or when etcd does not answer while writes to the volume are allowed here (then they are refused anyway).
   */
  recordInSync(volume: string, nodes: () => string[]): Promise<void> {
    const previous = this.#inSyncWrites.get(volume) ?? Promise.resolve();
    const next = previous.catch(() => {}).then(() => this.#writeInSync(volume, nodes));
    this.#inSyncWrites.set(volume, next);
    void next.catch(() => {}).finally(() => {
      if (this.#inSyncWrites.get(volume) === next) this.#inSyncWrites.delete(volume);
    });
    return next;
  }

  async #writeInSync(volume: string, nodes: () => string[]): Promise<void> {
    for (let attempt = 0; attempt < 1000; attempt += 1) {
      const epoch = this.#host.epochOf(volume);
      if (epoch === null) throw ChunkdError.readOnly(`volume ${volume}: its in-sync replicas are not recorded: this node does not own it now`);
      try {
        const kv = await this.#get(volumeKey(volume));
        const record = kv === null ? null : parseVolumeRecord(volumeKey(volume), kv.value);
        if (record === null || record.owner !== this.nodeName || record.epoch !== epoch) {
          throw new InSyncRefusal(`volume ${volume}: its in-sync replicas cannot be recorded: etcd ${record === null ? 'has no record of it' : `records ${record.owner} as its owner at epoch ${record.epoch}`}, this node's epoch is ${epoch}`);
        }
        const set = [...new Set(nodes())].sort();
        if (record.inSync?.epoch === epoch && record.inSync.nodes.join(',') === set.join(',')) return;
        const next: VolumeRecord = { ...record, inSync: { epoch, nodes: set } };
        const result = await this.#client
          .if(volumeKey(volume), 'Mod', '==', kv!.mod_revision)
          .and(nodeKey(this.nodeName), 'Lease', '==', this.#requireLease())
          .then(this.#client.put(volumeKey(volume)).value(JSON.stringify(next)))
          .options(this.#deadline())
          .commit();
        if (result.succeeded) {
          this.#host.log(`cluster: volume ${volume}: etcd records its replicas in sync at epoch ${epoch}: ${set.length > 0 ? set.join(', ') : 'none'}`);
          return;
        }
      } catch (error) {
        if (error instanceof InSyncRefusal) throw ChunkdError.readOnly(error.message);
        // etcd did not answer: tried again while writes are allowed here (the lease clock ends that).
        const refusal = this.writeRefusal(volume);
        if (refusal !== null || this.#stopping) throw refusal ?? ChunkdError.io(`volume ${volume}: its in-sync replicas were not recorded in etcd: ${describeError(error)}`);
        await new Promise((resolve) => setTimeout(resolve, retryDelayMs));
      }
    }
    throw ChunkdError.busy(`volume ${volume}: its record in etcd kept changing while its in-sync replicas were recorded`);
  }

  /**
   * Records a volume of this node's as synchronous (`sync`: its links' timeout; an in-sync set not yet recorded
   * starts empty, filled by the owner's links as they come in sync) or asynchronous (null: the set goes): volume set
   * --sync, node.ts. A transaction on the record's revision, refused unless etcd names this node its owner at its
   * epoch; a record changed meanwhile (its in-sync set) is read again.
   */
  async setSync(volume: string, sync: { timeoutMs: number } | null): Promise<void> {
    for (let attempt = 0; attempt < 100; attempt += 1) {
      const epoch = this.#host.epochOf(volume);
      const kv = await this.#get(volumeKey(volume), deadline());
      const record = kv === null ? null : parseVolumeRecord(volumeKey(volume), kv.value);
      if (record === null || record.owner !== this.nodeName || record.epoch !== epoch) {
        throw ChunkdError.readOnly(`volume ${volume} cannot be made ${sync === null ? 'asynchronous' : 'synchronous'} here: etcd ${record === null ? 'has no record of it' : `records ${record.owner} as its owner at epoch ${record.epoch}`}, this node's epoch is ${epoch ?? 'none'}`);
      }
      const { sync: _sync, syncTimeoutMs: _timeout, inSync, ...rest } = record;
      const next: VolumeRecord = sync === null ? rest : { ...rest, sync: true, syncTimeoutMs: sync.timeoutMs, inSync: inSync?.epoch === epoch ? inSync : { epoch, nodes: [] } };
      if (JSON.stringify(next) === JSON.stringify(record)) return;
      const result = await this.#client
        .if(volumeKey(volume), 'Mod', '==', kv!.mod_revision)
        .and(nodeKey(this.nodeName), 'Lease', '==', this.#requireLease())
        .then(this.#client.put(volumeKey(volume)).value(JSON.stringify(next)))
        .options(deadline())
        .commit();
      if (result.succeeded) {
        this.#host.log(`cluster: volume ${volume} is recorded ${sync === null ? 'asynchronous' : 'synchronous'} in etcd`);
        return;
      }
    }
    throw ChunkdError.busy(`volume ${volume}: its record in etcd kept changing while it was made ${sync === null ? 'asynchronous' : 'synchronous'}`);
  }

  /**
   * Removes a volume's record after the volume was removed here: a transaction on the revision read. A record that
   * names another owner is that node's (this node's copy was fenced or stale): it stays.
   */
  async removeVolume(name: string): Promise<void> {
    this.#confirmed.delete(name);
    this.#unconfirmed.delete(name);
    const kv = await this.#get(volumeKey(name), deadline());
    if (kv === null) return;
    const record = parseVolumeRecord(volumeKey(name), kv.value);
    if (record.owner !== this.nodeName) return;
    const result = await this.#client.if(volumeKey(name), 'Mod', '==', kv.mod_revision).then(this.#client.delete().key(volumeKey(name))).options(deadline()).commit();
    if (!result.succeeded) throw ChunkdError.busy(`volume ${name} was removed here, but its record in etcd changed meanwhile and stays (remove it with etcdctl del /chunkd/v1/volumes/${name} once checked)`);
  }

  /**
   * `chunkd volume move VOL --to NODE`, from any node: records the move in etcd (operations/move/VOL, by a
   * transaction comparing the volume record's revision, so it starts from the owner and epoch read), then waits
   * until the record names NODE (the owner performs the handoff and records the change: #advanceMoves). A move
   * recorded already to the same node is waited for; a move to another node is refused.
   */
  async requestMove(volume: string, to: string, waitMs = moveWaitMs): Promise<{ volume: string; from: string; to: string; epoch: number; moved: boolean }> {
    const [volumeKv, targetKv, moveKv] = await Promise.all([this.#get(volumeKey(volume), deadline()), this.#get(nodeKey(to), deadline()), this.#get(moveKey(volume), deadline())]);
    if (volumeKv === null) throw ChunkdError.notFound(`volume ${volume} is not in the cluster`);
    const record = parseVolumeRecord(volumeKey(volume), volumeKv.value);
    if (record.owner === to) return { volume, from: to, to, epoch: record.epoch, moved: false };
    let pending = moveKv === null ? null : parseMoveRecord(moveKey(volume), moveKv.value);
    // A move that no longer starts from the volume's record (done, failed over), or that the owner refused, is
    // stale: replaced below.
    if (pending !== null && (pending.from !== record.owner || pending.epoch !== record.epoch || pending.refused !== undefined)) pending = null;
    if (pending?.cancelled !== undefined) throw ChunkdError.busy(`the move of volume ${volume} to ${pending.to} is being cancelled (asked on ${pending.cancelled.by}); try again once it is settled`);
    if (pending !== null && pending.to !== to) throw ChunkdError.busy(`volume ${volume} is being moved to ${pending.to} already (asked on ${pending.requestedBy} at ${pending.requestedAt}); wait for it to finish`);
    if (pending === null) {
      if (targetKv === null) throw ChunkdError.invalid(`node ${to} is not a live member of the cluster (chunkd cluster status lists them)`);
      if (parseNodeRecord(nodeKey(to), targetKv.value).peer === null) throw ChunkdError.invalid(`node ${to} has no peer port (serve --peer-listen): a volume cannot be moved there`);
      if ((await this.#get(nodeKey(record.owner), deadline())) === null) throw ChunkdError.io(`the owner of ${volume}, node ${record.owner}, has no live lease: it cannot hand the volume over (a replica takes it over on its own when it has one)`);
      const move: MoveRecord = { volume, from: record.owner, epoch: record.epoch, to, requestedBy: this.nodeName, requestedAt: new Date().toISOString() };
      const unchanged = this.#client.if(volumeKey(volume), 'Mod', '==', volumeKv.mod_revision);
      const result = await (moveKv === null ? unchanged.and(moveKey(volume), 'Version', '==', 0) : unchanged.and(moveKey(volume), 'Mod', '==', moveKv.mod_revision))
        .then(this.#client.put(moveKey(volume)).value(JSON.stringify(move)))
        .options(deadline())
        .commit();
      if (!result.succeeded) throw ChunkdError.busy(`volume ${volume}'s record or its move changed in etcd meanwhile; try again`);
      this.#host.log(`cluster: move of volume ${volume} from ${record.owner} (epoch ${record.epoch}) to ${to} recorded in etcd`);
      pending = move;
    }
    // Waited for in etcd: whichever node performs it, and across their restarts.
    const until = performance.now() + waitMs;
    let cancelledBy: string | null = null;
    for (;;) {
      const [kv, opKv] = await Promise.all([this.#get(volumeKey(volume), deadline()), this.#get(moveKey(volume), deadline())]);
      const now = kv === null ? null : parseVolumeRecord(volumeKey(volume), kv.value);
      if (now?.owner === to && now.epoch > pending.epoch) return { volume, from: pending.from, to, epoch: now.epoch, moved: true };
      if (now === null || now.epoch !== pending.epoch) throw ChunkdError.io(`volume ${volume} ${now === null ? 'was removed' : `changed owner otherwise (${now.owner} at epoch ${now.epoch})`} while it was being moved to ${to}`);
      if (opKv === null) {
        if (cancelledBy !== null) throw ChunkdError.busy(`the move of volume ${volume} to ${to} was cancelled (chunkd volume move --cancel, on ${cancelledBy}); ${volume} stays on ${pending.from}`);
        throw ChunkdError.io(`the move of volume ${volume} to ${to} was given up (the owner ${pending.from}'s log says why); ${volume} stays on ${pending.from}`);
      }
      const operation = parseMoveRecord(moveKey(volume), opKv.value);
      cancelledBy = operation.cancelled?.by ?? cancelledBy;
      const refused = operation.refused;
      if (refused !== undefined) {
        await this.#client.if(moveKey(volume), 'Mod', '==', opKv.mod_revision).then(this.#client.delete().key(moveKey(volume))).options(deadline()).commit();
        throw ChunkdError.busy(`node ${pending.from} refused to move volume ${volume} to ${to}: ${refused}`);
      }
      if (this.#stopping) throw new ChunkdError('ESHUTDOWN', `node ${this.nodeName} is stopping; the move of ${volume} to ${to} goes on (recorded in etcd)`);
      if (performance.now() > until) throw ChunkdError.busy(`the move of volume ${volume} to ${to} has not finished within ${waitMs / 1000} s; it goes on (recorded in etcd): chunkd volume list shows it`);
      await new Promise((resolve) => setTimeout(resolve, movePollMs));
    }
  }

  /**
   * `chunkd volume move --cancel VOL`, from any node: marks the move recorded in etcd cancelled (a transaction on
   * its revision), then waits until the owner has deleted it (its handoff stopped before the target took the
   * volume: it stays where it was) or the volume's record changed (the handoff was past its point of no return and
   * completed, or a failover took the volume: the move is void). A move that no longer starts from the volume's
   * record is deleted here.
   */
  async cancelMove(volume: string, waitMs = moveWaitMs): Promise<{ volume: string; cancelled: boolean; owner: string; epoch: number }> {
    const [volumeKv, moveKv] = await Promise.all([this.#get(volumeKey(volume), deadline()), this.#get(moveKey(volume), deadline())]);
    if (moveKv === null) throw ChunkdError.notFound(`volume ${volume} has no move in progress${volumeKv === null ? ' (and is not in the cluster)' : ''}`);
    const move = parseMoveRecord(moveKey(volume), moveKv.value);
    const record = volumeKv === null ? null : parseVolumeRecord(volumeKey(volume), volumeKv.value);
    const drop = () => this.#client.if(moveKey(volume), 'Mod', '==', moveKv.mod_revision).then(this.#client.delete().key(moveKey(volume))).options(deadline()).commit();
    if (record === null || record.owner !== move.from || record.epoch !== move.epoch || move.refused !== undefined) {
      await drop();
      if (record === null) throw ChunkdError.notFound(`volume ${volume} is not in the cluster; its stale move record was deleted`);
      return { volume, cancelled: true, owner: record.owner, epoch: record.epoch };
    }
    if (move.cancelled === undefined) {
      const cancelled: MoveRecord = { ...move, cancelled: { by: this.nodeName, at: new Date().toISOString() } };
      const result = await this.#client.if(moveKey(volume), 'Mod', '==', moveKv.mod_revision).then(this.#client.put(moveKey(volume)).value(JSON.stringify(cancelled))).options(deadline()).commit();
      if (!result.succeeded) throw ChunkdError.busy(`the move of volume ${volume} changed in etcd meanwhile; try again`);
      this.#host.log(`cluster: move of volume ${volume} from ${move.from} to ${move.to} marked cancelled in etcd`);
    }
    const until = performance.now() + waitMs;
    for (;;) {
      const [kv, opKv] = await Promise.all([this.#get(volumeKey(volume), deadline()), this.#get(moveKey(volume), deadline())]);
      const now = kv === null ? null : parseVolumeRecord(volumeKey(volume), kv.value);
      if (now === null) throw ChunkdError.notFound(`volume ${volume} was removed while its move was being cancelled`);
      if (now.owner !== move.from || now.epoch !== move.epoch) return { volume, cancelled: false, owner: now.owner, epoch: now.epoch };
      if (opKv === null) return { volume, cancelled: true, owner: now.owner, epoch: now.epoch };
      if (this.#stopping) throw new ChunkdError('ESHUTDOWN', `node ${this.nodeName} is stopping; the move of ${volume} stays marked cancelled in etcd`);
      if (performance.now() > until) throw ChunkdError.busy(`the owner ${move.from} has not settled the cancelled move of ${volume} within ${waitMs / 1000} s; it stays marked cancelled in etcd (chunkd volume list shows it)`);
      await new Promise((resolve) => setTimeout(resolve, movePollMs));
    }
  }

  /** The cluster as etcd has it: nodes (alive: registered under a live lease), volumes, and which node owns each. */
  async status(): Promise<ClusterStatus> {
    const { nodes, volumes } = await this.#read();
    const nodeRecords: ClusterStatus['nodes'] = nodes.map((node) => ({ ...node, alive: true, volumes: [] }));
    // An owner named by a volume but without a live registration is down (its lease expired).
    for (const volume of volumes) {
      let node = nodeRecords.find((candidate) => candidate.name === volume.owner);
      if (node === undefined) {
        node = { name: volume.owner, poolId: '', peer: null, capacityBytes: 0, freeBytes: 0, version: '', health: 'down: no live lease', updatedAt: '', alive: false, volumes: [] };
        nodeRecords.push(node);
      }
      node.volumes.push(volume.name);
    }
    nodeRecords.sort((a, b) => a.name.localeCompare(b.name));
    const now = performance.now();
    const timing = this.#clock.timing;
    return {
      self: this.nodeName,
      lease: { id: this.#leaseId ?? '', ttlMs: timing.ttlMs, marginMs: timing.marginMs, renewedAgoMs: roundOrNull(this.#clock.ageMs(now)), live: this.#clock.live(now) },
      nodes: nodeRecords,
      volumes: volumes.map(({ replicas, ownerAlive: _alive, move: _move, ...volume }) => ({ ...volume, replicas: replicas.map((replica) => replica.node) })),
    };
  }

  /** Every volume of the cluster (listing.ts): owner, epoch, replicas and whether each is live, a move in progress. */
  async volumes(): Promise<ClusterVolume[]> {
    return (await this.#read()).volumes;
  }

  async #read(): Promise<{ nodes: NodeRecord[]; volumes: ClusterVolume[] }> {
    const [nodes, volumes, replicas, moves] = await Promise.all([nodesPrefix, volumesPrefix, replicasPrefix, movesPrefix].map((prefix) => this.#range(prefix, deadline())));
    const nodeRecords = nodes!.map((kv) => parseNodeRecord(kv.key.toString(), kv.value));
    const listing = describeVolumes(
      volumes!.map((kv) => parseVolumeRecord(kv.key.toString(), kv.value)),
      replicas!.map((kv) => parseReplicaRecord(kv.key.toString(), kv.value)),
      new Set(nodeRecords.map((node) => node.name)),
      moves!.map((kv) => parseMoveRecord(kv.key.toString(), kv.value)),
      Date.now(),
    );
    return { nodes: nodeRecords, volumes: listing };
  }

  /** Leaves the cluster: the lease is revoked, so this node's record goes at once (its volumes' records stay). */
  async stop(): Promise<void> {
    this.#stopping = true;
    this.#wake?.();
    await this.#loop;
    await Promise.all(this.#steps.values());
    this.#clock.lost();
    await this.#revoke();
    this.#client.close();
  }

  // ---- joining: lease, registration, ownership ----

  async #join(first: boolean): Promise<void> {
    this.#forgetConfirmations();
    this.#clock.lost();
    const sentAt = performance.now();
    const grant = await this.#client.leaseClient.leaseGrant({ TTL: Math.ceil(this.config.leaseTtlMs / 1000), ID: 0 }, this.#deadline());
    this.#leaseId = grant.ID;
    this.#clock.renewed(sentAt);
    await this.#register(first);
    await this.#confirmOwnership();
  }

  async #register(first: boolean): Promise<void> {
    const key = nodeKey(this.nodeName);
    const record = JSON.stringify(await this.#record());
    const result = await this.#client
      .if(key, 'Version', '==', 0)
      .then(this.#client.put(key).value(record).lease(this.#leaseId!))
      .else(this.#client.get(key))
      .options(this.#deadline())
      .commit();
    if (result.succeeded) return;
    const existing = result.responses[0]?.response_range.kvs[0];
    if (existing === undefined) return this.#register(first);
    const other = parseNodeRecord(key, existing.value);
    if (other.poolId !== this.#host.poolId) {
      throw ChunkdError.exists(`node name ${this.nodeName} is already registered in etcd by a live node (pool ${other.poolId}${other.peer === null ? '' : `, peer ${other.peer}`}, updated ${other.updatedAt}): choose another --node-name, or stop that node (its registration goes when its lease expires, within its --lease-ttl)`);
    }
    // This pool's own record from a previous run (that process is gone: this one holds the pool's lock): take it over.
    const takeover = await this.#client
      .if(key, 'Mod', '==', existing.mod_revision)
      .then(this.#client.put(key).value(record).lease(this.#leaseId!))
      .options(this.#deadline())
      .commit();
    if (!takeover.succeeded) return this.#register(first);
    if (existing.lease !== '0' && existing.lease !== this.#leaseId) await this.#client.leaseClient.leaseRevoke({ ID: existing.lease }, deadline()).catch(() => {});
    if (first) this.#host.log(`cluster: node ${this.nodeName}'s registration from a previous run of this pool was taken over`);
  }

  async #record(): Promise<NodeRecord> {
    const description = await this.#host.describe();
    return { name: this.nodeName, poolId: this.#host.poolId, peer: this.#host.peerAddress(), ...description, version: softwareVersion, updatedAt: new Date().toISOString() };
  }

  /**
   * For each volume this node owns locally: records it when etcd has no record (a volume from before the node
   * joined), else confirms it when the record names this node at the local epoch. Each is one transaction that also
   * compares that this node is registered under its current lease.
   */
  async #confirmOwnership(): Promise<void> {
    const lease = this.#requireLease();
    const registered = (): ['Lease', '==', string] => ['Lease', '==', lease];
    for (const volume of this.#host.ownedVolumes()) {
      if (this.#creating.has(volume.name)) continue;
      const record: VolumeRecord = { name: volume.name, sizeBytes: volume.sizeBytes, owner: this.nodeName, epoch: volume.epoch, replicas: [], createdAt: new Date().toISOString() };
      const result = await this.#client
        .if(nodeKey(this.nodeName), ...registered())
        .then(this.#client.get(volumeKey(volume.name)))
        .options(this.#deadline())
        .commit();
      if (!result.succeeded) throw ChunkdError.io(`node ${this.nodeName}'s registration is no longer under lease ${lease} while confirming its volumes`);
      const kv = result.responses[0]?.response_range.kvs[0];
      if (kv === undefined) {
        const created = await this.#client
          .if(volumeKey(volume.name), 'Version', '==', 0)
          .and(nodeKey(this.nodeName), ...registered())
          .then(this.#client.put(volumeKey(volume.name)).value(JSON.stringify(record)))
          .options(this.#deadline())
          .commit();
        if (created.succeeded) {
          this.#host.log(`cluster: volume ${volume.name} recorded in etcd, owned by ${this.nodeName} at epoch ${volume.epoch}`);
          this.#confirm(volume.name, volume.epoch);
        } else this.#unconfirmed.set(volume.name, 'another node recorded a volume of that name at the same time; restart to re-check');
        continue;
      }
      const existing = parseVolumeRecord(volumeKey(volume.name), kv.value);
      if (existing.owner === this.nodeName && existing.epoch === volume.epoch) this.#confirm(volume.name, volume.epoch);
      else {
        const why = `etcd records node ${existing.owner} as its owner at epoch ${existing.epoch}, and this node's epoch is ${volume.epoch}`;
        this.#unconfirmed.set(volume.name, why);
        this.#host.log(`cluster: volume ${volume.name}: writes refused: ${why}`);
      }
    }
  }

  #confirm(volume: string, epoch: number): void {
    this.#confirmed.set(volume, epoch);
    this.#unconfirmed.delete(volume);
  }

  #forgetConfirmations(): void {
    this.#confirmed.clear();
    this.#unconfirmed.clear();
  }

  // ---- keeping the lease alive ----

  /**
   * Renews the lease three times per TTL. A keepalive that etcd does not confirm leaves the clock to run out
   * (writes stop at TTL - margin); a renewal after a lapse re-checks ownership before writes resume; a lease etcd
   * says is gone is replaced by a new one, re-registered and re-checked the same way.
   */
  async #keepalive(): Promise<void> {
    const interval = keepaliveIntervalMs(this.#clock.timing);
    let beats = 0;
    let failed = false;
    // When the last keepalive etcd confirmed was sent: the next is due an interval after it, however long the rest of
    // its beat (the reconcile's calls) took, so that the time left before the margin for retries does not shrink.
    let renewalSentAt = performance.now();
    while (!this.#stopping) {
      // After a failure, again at once (a call that hit a member that does not answer is tried on another).
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, failed ? retryDelayMs : Math.max(retryDelayMs, renewalSentAt + interval - performance.now()));
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      if (this.#stopping) break;
      try {
        const sentAt = performance.now();
        let lapsed = !this.#clock.live(sentAt) || this.#confirmed.size === 0;
        const ttl = this.#leaseId === null ? 0 : await this.#keepaliveOnce(this.#leaseId);
        // A lapse while the keepalive was in flight counts too: writes resume only after ownership is re-checked.
        lapsed ||= !this.#clock.live(performance.now());
        if (lapsed) this.#forgetConfirmations();
        if (ttl <= 0) {
          this.#host.log(`cluster: lease ${this.#leaseId} of node ${this.nodeName} is gone in etcd; writes stay refused until a new lease is granted and ownership re-checked`);
          await this.#join(false);
          this.#host.log(`cluster: node ${this.nodeName} registered again (lease ${this.#leaseId}); ${this.#confirmed.size} volume(s) confirmed`);
        } else {
          this.#clock.renewed(sentAt);
          renewalSentAt = sentAt;
          // After a lapse, registered again under this lease before the re-check (which compares that): a join whose
          // registration failed after its lease was granted (timed out on a loaded etcd, or refused while another
          // pool's record held the name) leaves this lease alive without it, and the re-check alone would fail at
          // every beat, writes refused until a restart.
          if (lapsed) {
            await this.#register(false);
            await this.#confirmOwnership();
          }
          beats += 1;
          if (this.#clock.live(performance.now())) await this.#reconcile();
          if (beats % 3 === 0) await this.#client.put(nodeKey(this.nodeName)).value(JSON.stringify(await this.#record())).lease(this.#leaseId!).options(this.#deadline()).exec();
        }
        if (this.#lastError !== null) this.#host.log(`cluster: etcd answers again (${this.#confirmed.size} volume(s) confirmed)`);
        this.#lastError = null;
        failed = false;
      } catch (error) {
        failed = true;
        const message = describeError(error);
        if (message !== this.#lastError) this.#host.log(`cluster: etcd ${this.config.endpoints.join(',')}: ${message}; writes to owned volumes stop ${((this.#clock.timing.ttlMs - this.#clock.timing.marginMs) / 1000).toFixed(1)} s after the last renewal`);
        this.#lastError = message;
      }
    }
  }

  // ---- automatic failover ----

  /**
   * Once per renewal: publishes this node's replicas (newest point of each, under its lease), then, for every
   * volume whose owner's registration is gone, the replica with the newest point takes it over if that is this
   * node: a transaction on the volume's record comparing the revision read, that the owner is still unregistered and
   * that this node is registered under its lease; the epoch rises by one. Then the replica is promoted here.
   */
  async #reconcile(): Promise<void> {
    const lease = this.#requireLease();
    const mine = this.#host.replicaVolumes();
    for (const replica of mine) {
      const pointMs = replica.sync ? 0 : replica.point === null ? Number.NaN : Number(replica.point.slice(replica.point.indexOf('-') + 1));
      if ((replica.point === null && !replica.sync) || !Number.isSafeInteger(pointMs)) continue;
      // A synchronous replica publishes no point: the owner's in-sync set (the volume's record) says what it holds.
      const record: ReplicaRecord = replica.sync
        ? { volume: replica.name, node: this.nodeName, owner: replica.owner, ownerEpoch: replica.ownerEpoch, point: 'sync', pointMs, sync: true }
        : { volume: replica.name, node: this.nodeName, owner: replica.owner, ownerEpoch: replica.ownerEpoch, point: replica.point!, pointMs, ...(replica.stale === true ? { stale: true } as const : {}) };
      const value = JSON.stringify(record);
      if (this.#published.get(replica.name) === `${lease}:${value}`) continue;
      await this.#client.put(replicaKey(replica.name, this.nodeName)).value(value).lease(lease).options(this.#deadline()).exec();
      this.#published.set(replica.name, `${lease}:${value}`);
    }
    for (const volume of [...this.#published.keys()]) {
      if (mine.some((replica) => replica.name === volume)) continue;
      await this.#client.delete().key(replicaKey(volume, this.nodeName)).options(this.#deadline()).exec();
      this.#published.delete(volume);
    }
    const [nodes, volumes, replicas, moves] = await Promise.all([this.#range(nodesPrefix), this.#range(volumesPrefix), this.#range(replicasPrefix), this.#range(movesPrefix)]);
    const alive = new Set(nodes.map((kv) => kv.key.toString().slice(nodesPrefix.length)));
    // Known unregistered no later than now (the reads are done): a takeover waits a TTL from here (failover.ts).
    const goneFor = this.#absences.observe([...new Set(volumes.map((kv) => parseVolumeRecord(kv.key.toString(), kv.value).owner))].filter((owner) => !alive.has(owner)), performance.now());
    const peers = new Map(nodes.map((kv) => {
      const record = parseNodeRecord(kv.key.toString(), kv.value);
      return [record.name, record.peer] as const;
    }));
    const volumeRevisions = new Map(volumes.map((kv) => [kv.key.toString(), kv.mod_revision]));
    const volumeRecords = volumes.map((kv) => parseVolumeRecord(kv.key.toString(), kv.value));
    const replicaRecords = replicas.map((kv) => parseReplicaRecord(kv.key.toString(), kv.value));
    await this.#confirmRecorded(volumes);
    await this.#advanceMoves(moves, volumeRecords, peers, { goneFor, alive, replicas: replicaRecords });
    this.#converge(volumeRecords, replicaRecords, peers, mine);
    if (mine.length === 0) return;
    const orphans = orphanedVolumes(volumeRecords, alive, replicaRecords);
    const moveRecords = moves.map((kv) => parseMoveRecord(kv.key.toString(), kv.value));
    for (const { volume, candidates } of orphans) {
      // A move's target that took the volume (or gives the move up) goes first (failover.ts).
      if (pendingMoveTarget(volume, moveRecords, alive, candidates) !== null) continue;
      const successor = chooseSuccessor(candidates);
      if (successor?.node !== this.nodeName || !mine.some((replica) => replica.name === volume.name && replica.owner === volume.owner && replica.ownerEpoch === volume.epoch)) continue;
      if ((goneFor.get(volume.owner) ?? 0) < this.#clock.timing.ttlMs) continue;
      const epoch = volume.epoch + 1;
      // A synchronous volume's new owner holds no replica in sync yet: each is recorded once its resync is done.
      // (The old owner stays one of its replicas: back, it rejoins as a synchronous replica and is resynced.)
      const record: VolumeRecord = volume.sync === true
        ? { ...volume, owner: this.nodeName, epoch, replicas: [...new Set([...volume.replicas, volume.owner])].filter((name) => name !== this.nodeName).sort(), inSync: { epoch, nodes: [] } }
        : { ...volume, owner: this.nodeName, epoch, replicas: volume.replicas.filter((name) => name !== this.nodeName) };
      const result = await this.#client
        .if(volumeKey(volume.name), 'Mod', '==', volumeRevisions.get(volumeKey(volume.name))!)
        .and(nodeKey(volume.owner), 'Version', '==', 0)
        .and(nodeKey(this.nodeName), 'Lease', '==', lease)
        .then(this.#client.put(volumeKey(volume.name)).value(JSON.stringify(record)), this.#client.delete().key(replicaKey(volume.name, this.nodeName)))
        .options(this.#deadline())
        .commit();
      if (!result.succeeded) {
        this.#host.log(`cluster: failover of volume ${volume.name} not taken: its record or ${volume.owner}'s registration changed meanwhile`);
        continue;
      }
      this.#published.delete(volume.name);
      this.#host.log(`cluster: node ${volume.owner}, owner of volume ${volume.name} at epoch ${volume.epoch}, has no live lease; this node takes it over at epoch ${epoch} ${volume.sync === true ? `(a synchronous replica recorded in sync: ${volume.inSync!.nodes.join(', ')})` : `from ${successor.point}`}`);
      try {
        await this.#promoteTo(volume.name, epoch);
      } catch (error) {
        this.#unconfirmed.set(volume.name, `its promotion here failed after etcd recorded this node as owner at epoch ${epoch} (tried again): ${describeError(error)}`);
        this.#host.log(`cluster: volume ${volume.name}: ${this.#unconfirmed.get(volume.name)}`);
      }
    }
  }

  /**
   * Confirms this node's volumes that etcd records under it at the local epoch but that are not confirmed yet (one
   * moved here: the old owner or this node recorded the change after the handoff): a transaction comparing the
   * record's revision read and that this node is registered under its current lease, as at join.
   */
  async #confirmRecorded(volumes: IKeyValue[]): Promise<void> {
    const lease = this.#requireLease();
    for (const owned of this.#host.ownedVolumes()) {
      if (this.#confirmed.get(owned.name) === owned.epoch) continue;
      const kv = volumes.find((candidate) => candidate.key.toString() === volumeKey(owned.name));
      const record = kv === undefined ? null : parseVolumeRecord(volumeKey(owned.name), kv.value);
      if (kv === undefined || record?.owner !== this.nodeName || record.epoch !== owned.epoch) continue;
      const result = await this.#client
        .if(volumeKey(owned.name), 'Mod', '==', kv.mod_revision)
        .and(nodeKey(this.nodeName), 'Lease', '==', lease)
        .then(this.#client.get(volumeKey(owned.name)))
        .options(this.#deadline())
        .commit();
      if (!result.succeeded) continue;
      this.#confirm(owned.name, owned.epoch);
      this.#host.log(`cluster: volume ${owned.name}: etcd records this node as its owner at epoch ${owned.epoch}; writes accepted`);
    }
  }

  /**
   * Moves recorded in etcd (operations/move/VOL), once per renewal, each in the background under its volume's name:
   *   - on the owner it names: the handoff to the target's peer address (handoff.ts: its steps are durable, and a
   *     crash is settled at the next start), then the change of owner recorded;
   *   - on the target, once it owns the volume at epoch + 1 (the handoff's last step happened here): the change of
   *     owner recorded, in case the old owner cannot (it crashed after that step);
   *   - a move that no longer starts from the volume's record (removed, failed over meanwhile) is deleted.
   * Recording is one transaction comparing the volume's and the move's revisions, so it happens once.
   */
  async #advanceMoves(moves: IKeyValue[], volumes: VolumeRecord[], peers: Map<string, string | null>, view: { goneFor: Map<string, number>; alive: Set<string>; replicas: ReplicaRecord[] }): Promise<void> {
    for (const kv of moves) {
      const move = parseMoveRecord(kv.key.toString(), kv.value);
      const record = volumes.find((volume) => volume.name === move.volume);
      if (record?.owner !== move.from || record.epoch !== move.epoch) {
        const dropped = await this.#client.if(moveKey(move.volume), 'Mod', '==', kv.mod_revision).then(this.#client.delete().key(moveKey(move.volume))).options(this.#deadline()).commit();
        if (dropped.succeeded) this.#host.log(`cluster: move of volume ${move.volume} to ${move.to} dropped: ${record === undefined ? 'the volume is gone' : `its record changed meanwhile (${record.owner} at epoch ${record.epoch})`}`);
        continue;
      }
      const address = peers.get(move.to) ?? null;
      // The target, when the owner has been gone a whole TTL and this node has neither taken the volume nor a
      // replica that may take it over: the move is over (a failover by another replica, which waits for this:
      // failover.ts pendingMoveTarget). A target that is a candidate itself takes part in the failover instead.
      const taken = this.#host.ownedVolumes().some((owned) => owned.name === move.volume && owned.epoch === move.epoch + 1);
      const candidate = orphanedVolumes([record], view.alive, view.replicas)[0]?.candidates.some((replica) => replica.node === this.nodeName) ?? false;
      if (move.to === this.nodeName && !taken && !candidate && (view.goneFor.get(move.from) ?? 0) >= this.#clock.timing.ttlMs) {
        const dropped = await this.#client.if(moveKey(move.volume), 'Mod', '==', kv.mod_revision).then(this.#client.delete().key(moveKey(move.volume))).options(this.#deadline()).commit();
        if (dropped.succeeded) this.#host.log(`cluster: move of volume ${move.volume} to this node dropped: its owner ${move.from} has had no live lease for a TTL, and the volume was not handed over here`);
        continue;
      }
      if (move.from !== this.nodeName || move.refused !== undefined) continue;
      if (move.cancelled !== undefined) {
        // Cancelled: a handoff running here stops at its next step (rolled back before the target takes the
        // volume, or completed past that point: then its record changes and the move goes with it). With none
        // running, and the volume this node's own again (not frozen), the move is deleted.
        if (this.#steps.has(move.volume)) {
          if (!this.#cancelledMoves.has(move.volume)) this.#host.log(`cluster: move of volume ${move.volume} to ${move.to} cancelled (asked on ${move.cancelled.by}); its handoff stops at its next step`);
          this.#cancelledMoves.add(move.volume);
          continue;
        }
        this.#cancelledMoves.delete(move.volume);
        if (this.#host.epochOf(move.volume) !== move.epoch) continue;
        const dropped = await this.#client.if(moveKey(move.volume), 'Mod', '==', kv.mod_revision).then(this.#client.delete().key(moveKey(move.volume))).options(this.#deadline()).commit();
        if (dropped.succeeded) this.#host.log(`cluster: move of volume ${move.volume} to ${move.to} cancelled (asked on ${move.cancelled.by}): this node keeps it at epoch ${move.epoch}`);
        continue;
      }
      // Refused before anything starts (a volume mounted here): said in the record for the node that asked.
      const refusal = this.#steps.has(move.volume) ? null : this.#host.moveRefusal(move.volume);
      if (refusal !== null) {
        const refused: MoveRecord = { ...move, refused: refusal };
        await this.#client.if(moveKey(move.volume), 'Mod', '==', kv.mod_revision).then(this.#client.put(moveKey(move.volume)).value(JSON.stringify(refused))).options(this.#deadline()).commit();
        this.#host.log(`cluster: move of volume ${move.volume} to ${move.to} refused: ${refusal}`);
        continue;
      }
      if (address !== null) {
        this.#background(move.volume, `moving it to ${move.to} (epoch ${move.epoch + 1})`, async () => {
          try {
            await this.#host.move(move.volume, move.to, address, move.epoch, () => this.#moveCancelled(move.volume));
          } catch (error) {
            // Stopped as cancelled (rolled back before the target took it): the next renewal deletes the move.
            if (this.#host.epochOf(move.volume) === move.epoch && (await this.#moveCancelled(move.volume))) {
              this.#cancelledMoves.add(move.volume);
              throw new StepEnded(`cluster: move of volume ${move.volume} to ${move.to} stopped, as cancelled: ${describeError(error)}`);
            }
            throw error;
          }
          await this.#recordMove(move);
        });
      }
    }
    // A volume this node owns at the epoch after the record's, under another owner: the handoff's last step ran
    // here (nothing else gives a node an epoch etcd has not recorded yet), and the old owner did not record it.
    for (const owned of this.#host.ownedVolumes()) {
      const record = volumes.find((volume) => volume.name === owned.name);
      if (record === undefined || record.owner === this.nodeName || record.epoch !== owned.epoch - 1) continue;
      this.#background(owned.name, `recording its handoff from ${record.owner} here (epoch ${owned.epoch})`, () => this.#recordMove({ volume: owned.name, from: record.owner, epoch: record.epoch, to: this.nodeName }));
    }
  }

  /**
   * Whether the move of `volume` running here was cancelled: seen at a renewal, or read from etcd now (the handoff
   * asks between its steps, so a cancel recorded before its point of no return is never missed). etcd not
   * answering: not cancelled (the move was asked for; it goes on as before).
   */
  async #moveCancelled(volume: string): Promise<boolean> {
    if (this.#cancelledMoves.has(volume)) return true;
    const kv = await this.#get(moveKey(volume)).catch(() => null);
    return kv !== null && parseMoveRecord(moveKey(volume), kv.value).cancelled !== undefined;
  }

  /**
   * A handoff that completed (the target owns the volume at epoch + 1) recorded: the volume's record names the
   * target at epoch + 1, and the move's operation, when it is this one, is deleted; one transaction on their
   * revisions. Recorded also when the operation was deleted meanwhile: the handoff happened all the same.
   */
  async #recordMove(move: Pick<MoveRecord, 'volume' | 'from' | 'epoch' | 'to'>): Promise<void> {
    const [kv, moveKv] = await Promise.all([this.#get(volumeKey(move.volume)), this.#get(moveKey(move.volume))]);
    if (kv === null) return;
    const record = parseVolumeRecord(volumeKey(move.volume), kv.value);
    if (record.owner !== move.from || record.epoch !== move.epoch) return;
    const operation = moveKv === null ? null : parseMoveRecord(moveKey(move.volume), moveKv.value);
    const ours = operation !== null && operation.from === move.from && operation.epoch === move.epoch && operation.to === move.to;
    const next: VolumeRecord = { ...record, owner: move.to, epoch: move.epoch + 1, replicas: [...new Set([...record.replicas.filter((name) => name !== move.to), move.from])].sort() };
    const put = this.#client.put(volumeKey(move.volume)).value(JSON.stringify(next));
    const unchanged = this.#client.if(volumeKey(move.volume), 'Mod', '==', kv.mod_revision);
    const result = await (ours ? unchanged.and(moveKey(move.volume), 'Mod', '==', moveKv!.mod_revision).then(put, this.#client.delete().key(moveKey(move.volume))) : unchanged.then(put))
      .options(this.#deadline())
      .commit();
    if (!result.succeeded) throw ChunkdError.busy(`the record of volume ${move.volume} changed while its move was recorded`);
    this.#host.log(`cluster: volume ${move.volume} moved from ${move.from} to ${move.to}: etcd records ${move.to} as its owner at epoch ${move.epoch + 1}`);
  }

  /** Promotes the local replica to the epoch etcd records for this node, and confirms it. */
  async #promoteTo(volume: string, epoch: number): Promise<void> {
    const promoted = await this.#host.promote(volume);
    if (promoted !== epoch) throw ChunkdError.corrupt(`the local promotion of ${volume} gave epoch ${promoted}, etcd records ${epoch}`);
    this.#confirm(volume, epoch);
  }

  /**
   * Brings this node in line with what etcd records, in the background (each step talks to peers and may take a
   * while; the keepalive loop must not wait for it), one step per volume at a time:
   *   - a volume this node owns (or owned, or is handing off) that etcd gives another live owner at a higher
   *     epoch: rejoin as its replica (its writes after the last common point are kept aside as a snapshot,
   *     node.demote);
   *   - a replica of this node's whose owner etcd replaced at a higher epoch: follow the new owner;
   *   - a volume this node owns: replicate it to every live node that publishes a replica following it.
   */
  #converge(volumes: VolumeRecord[], replicas: ReplicaRecord[], peers: Map<string, string | null>, mine: Array<{ name: string; owner: string; ownerEpoch: number }>): void {
    const records = new Map(volumes.map((volume) => [volume.name, volume]));
    // A volume frozen by a handoff whose outcome this node could not learn (the target was down), that etcd now
    // gives another owner at a higher epoch (the target recorded it, or a failover), rejoins the same way; while a
    // move step runs for it, that step settles it instead (#background runs one step per volume).
    const local = [...this.#host.ownedVolumes(), ...this.#host.fencedVolumes(), ...this.#host.handingOffVolumes()];
    for (const volume of local) {
      const record = records.get(volume.name);
      const address = record === undefined ? null : peers.get(record.owner) ?? null;
      if (record === undefined || record.owner === this.nodeName || record.epoch <= volume.epoch || address === null) continue;
      this.#background(volume.name, `rejoining as a replica of ${record.owner} (epoch ${record.epoch})`, () => this.#host.rejoin(volume.name, record.owner, record.epoch, address, record.sync === true));
    }
    for (const replica of mine) {
      const record = records.get(replica.name);
      // Won by this node's failover transaction, but the promotion here failed (a stream still ending): again.
      if (record?.owner === this.nodeName && record.epoch === replica.ownerEpoch + 1) {
        this.#background(replica.name, `promoting it (etcd records this node as owner at epoch ${record.epoch})`, () => this.#promoteTo(replica.name, record.epoch));
        continue;
      }
      if (record === undefined || record.owner === this.nodeName || record.epoch <= replica.ownerEpoch) continue;
      this.#background(replica.name, `following its new owner ${record.owner} (epoch ${record.epoch})`, () => this.#host.follow(replica.name, record.owner, record.epoch));
    }
    // A synchronous volume of this node's: a synchronous link to each replica its record names (one that followed
    // the previous owner takes this node's syncOpen at the higher epoch, and is resynced before it is in sync).
    for (const record of volumes) {
      if (record.sync !== true || record.owner !== this.nodeName || this.#confirmed.get(record.name) !== record.epoch) continue;
      for (const node of record.replicas) {
        const address = peers.get(node) ?? null;
        if (node === this.nodeName || address === null) continue;
        this.#background(`${record.name}->${node}`, `keeping a synchronous replica on ${node}`, () => this.#host.ensureSyncReplica(record.name, address, record.syncTimeoutMs ?? null));
      }
    }
    for (const follower of replicas) {
      const record = records.get(follower.volume);
      const address = peers.get(follower.node) ?? null;
      if (record?.sync === true) continue;
      if (record?.owner !== this.nodeName || follower.owner !== this.nodeName || follower.ownerEpoch !== record.epoch || !this.#confirmed.has(record.name) || address === null) continue;
      this.#background(`${record.name}->${follower.node}`, `replicating to ${follower.node}`, () => this.#host.ensureReplica(record.name, address));
    }
  }

  /** Runs `step` unless one for `key` is running; logs a failure once per message (it is tried again next beat). */
  #background(key: string, what: string, step: () => Promise<void>): void {
    if (this.#steps.has(key) || this.#stopping) return;
    const running = step().then(
      () => {
        if (this.#stepErrors.has(key) || !(what.startsWith('replicating') || what.startsWith('keeping'))) this.#host.log(`cluster: ${key}: done ${what}`);
        this.#stepErrors.delete(key);
      },
      (error: unknown) => {
        if (error instanceof StepEnded) {
          this.#host.log(error.message);
          this.#stepErrors.delete(key);
          return;
        }
        const message = describeError(error);
        if (this.#stepErrors.get(key) !== message) this.#host.log(`cluster: ${key}: ${what} failed: ${message}; tried again`);
        this.#stepErrors.set(key, message);
      },
    ).finally(() => this.#steps.delete(key));
    this.#steps.set(key, running);
  }

  /** One keepalive: the TTL etcd answers (0 or less: the lease is gone). */
  async #keepaliveOnce(id: string): Promise<number> {
    const stream = await this.#client.leaseClient.leaseKeepAlive(this.#deadline());
    try {
      const response = await new Promise<{ TTL: string }>((resolve, reject) => {
        stream.on('data', resolve);
        stream.on('error', reject);
        stream.write({ ID: id });
      });
      return Number(response.TTL);
    } catch (error) {
      // etcd answers a keepalive of a lease it no longer has with an error on some versions, TTL 0 on others.
      if (error instanceof EtcdLeaseInvalidError) return 0;
      throw error;
    } finally {
      stream.end();
    }
  }

  // ---- small helpers ----

  #deadline(): { deadline: Date } {
    return deadline(this.#timeoutMs);
  }

  #requireLease(): string {
    if (this.#leaseId === null) throw ChunkdError.io(`node ${this.nodeName} holds no etcd lease right now`);
    return this.#leaseId;
  }

  async #get(key: string, options = this.#deadline()): Promise<IKeyValue | null> {
    const response = await this.#client.get(key).options(options).exec();
    return response.kvs[0] ?? null;
  }

  async #range(prefix: string, options = this.#deadline()): Promise<IKeyValue[]> {
    const response = await this.#client.getAll().prefix(prefix).options(options).exec();
    return response.kvs;
  }

  async #revoke(): Promise<void> {
    if (this.#leaseId === null) return;
    const id = this.#leaseId;
    this.#leaseId = null;
    await this.#client.leaseClient.leaseRevoke({ ID: id }, { deadline: new Date(Date.now() + 1000) }).catch(() => {});
  }
}

/** etcd names another owner or epoch: recording the in-sync set is refused, not tried again. */
class InSyncRefusal extends Error {}

/** A background step that ended without doing its work, on purpose (a cancelled move): said once, not tried again. */
class StepEnded extends Error {}

/** Call options that give up after `timeoutMs` (default callTimeoutMs; the keepalive loop's calls use less). */
function deadline(timeoutMs = callTimeoutMs): { deadline: Date } {
  return { deadline: new Date(Date.now() + timeoutMs) };
}

function roundOrNull(value: number | null): number | null {
  return value === null ? null : Math.round(value);
}

function describeError(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  return message.split('\n')[0]!.replace(/\s*Resolution note:\s*$/, '');
}
