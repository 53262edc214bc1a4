// Synchronous replicas: every write this node acknowledges on a volume is on each of its in-sync replicas, as
// DRBD's protocol C, Portworx and Longhorn do. The owner side is here; the replica side is sync-replica-server.ts,
// the verbs' payloads sync-messages.ts, the dirty map and activity log dirty-map.ts.
//
// PROTOCOL. A link (one volume, one peer's --peer-listen) is one mutual-TLS peer connection. The owner sends
// syncOpen {volume, epoch, sizeBytes} (the peer makes the volume a synchronous replica of this node, durably, or
// refuses; it answers a session, and takes writes of that session only, so that an older connection's writes
// still buffered there are refused), then pipelines syncWrite requests (write, trim, write zeroes with their FUA
// and NO_HOLE flags, the owner's ownership epoch and the session in each) and syncFlush; each is answered once the
// replica has applied it (made it durable, for FUA and flush). A replica takes them only from its owner at exactly
// the epoch syncOpen recorded: an owner that a promotion or handoff replaced (the replica's epoch is higher) is
// refused, "fenced:", and from then on this node refuses every write to the volume (sticky) instead of going on
// without the replica.
//
// ORDERING ("acknowledged => on every in-sync replica"). SyncDevice wraps the volume an NBD or FUSE client writes:
//   1. The write takes its chunk range in this module's range lock (overlapping writes, and a resync's copy of a
//      region, go one at a time, so the owner and every replica apply overlapping writes in the same order;
//      writes that do not overlap are pipelined).
//   2. Its extents enter the activity log, and its regions the dirty map of every replica not in sync; when one is
//      new to either, the state file is written and synced before step 3 (write-ahead, see the crash rule). Writes
//      waiting for it at once share one state-file write (group commit).
//   3. The write is applied locally and sent to every in-sync replica, in parallel.
//   4. It is acknowledged only when the local write and every in-sync replica's answer are in. A replica that
//      answers with an error, drops the connection, or does not answer within the link's timeout is first marked
//      out of sync: the regions with writes in flight or not yet flushed on both sides (this write's among them;
//      an in-memory twin of the activity log, in regions) join its dirty map, and the state file is written and
//      synced; only then is the write acknowledged, without it.
//   5. In a cluster (IN-SYNC SET): before a write or flush is acknowledged, etcd must not list in sync a replica
//      that is not in sync here: when the set this node last wrote to etcd (the volume record's inSync, unknown at
//      start) holds one that is not, the current set is written first (cluster.ts recordInSync: a transaction on
//      the record's revision; callers meanwhile share one write). A link that turns in sync, or falls out between
//      writes, is recorded at once in the background. etcd does not answer: the write waits (tried again) until it
//      does, or until the lease clock refuses writes anyway. So the failover, which promotes only a replica of the
//      recorded set, never promotes one that lacks an acknowledged write.
// FLUSH is sent to the local volume and every in-sync replica in parallel and answered when all are durable; FUA
// travels with the write. A replica's answer to a write says "applied", not "durable", as NBD's does: the flush
// that follows covers it on both sides. Reads are local, but for REPAIR ON READ: a read that finds a block not
// matching its checksum here (DamagedDataError) takes the read's chunks in the range lock, as a write does, reads
// each block of the range here again, and asks an in-sync replica (syncRead, verified against its own checksums
// there) for each damaged one; the client gets the replica's bytes, the block is rewritten here (redirect-on-write:
// a new chunk, the damaged one freed; a snapshot that shares it keeps it, and scrub still names it there), and the
// link's readRepairsTotal counts it. With no in-sync replica, or none whose copy is good, the read fails with EIO as
// on any node. A resync's read of the live volume is repaired so too (#readForResync; DAMAGE AT RESYNC below for a
// block that no in-sync replica holds). SCRUB WITH REPLICAS repairs
// the live volume's damaged blocks a scrub found the same way, then verifies each in-sync replica by its recorded
// chunk checksums (scrubWithReplicas, verify). When the local write fails and a replica applied it, that replica is
// marked out of sync (the resync gives it the owner's bytes back).
//
// CONTROL: a snapshot (taken, removed), a resize and a rollback are applied here and then sent (syncControl) to
// every in-sync replica under the whole volume's lock, so no write is in flight anywhere: a snapshot holds the same
// writes on every copy, with the owner's id, and a failover to an in-sync replica keeps it. A replica that fails
// one is out of sync, as for a write (a rollback's changed regions, the snapshot's diff against the volume, are in
// the activity log first and in the dirty map of every replica out of sync, so a resync gives it the data); one out
// of sync takes the owner's size at its next syncOpen, and its resync gives it the snapshots taken meanwhile and
// removes those removed meanwhile (SNAPSHOTS AT RESYNC, #giveSnapshots). A shrink or a rollback needs the volume
// closed on both sides, as without replicas: by its clients, for a resync opens the volume only for a step, under
// the step's range lock, so a change under the whole volume's lock (and a removal of the volume, under it too)
// waits for the steps in flight and goes through. The resync then goes on, the regions a rollback changed dirty to
// it again; a change of the size makes it start again (a new syncOpen gives the replica the size), from the dirty
// map, where the chunks it copied already compare equal and are not sent again.
//
// DIRTY MAP AND CRASH RULE. <pool>/replication/sync.json holds, per volume, its links, each link's dirty regions
// (limits.syncRegionBytes, 64 KiB), and the volume's activity log (limits.syncActivityExtentBytes, 4 MiB extents,
// as DRBD's: a larger unit makes a state-file write on the write path rare, at the price of resending whole extents
// after an owner crash). A region or extent is in it (durably) before any write to it is applied anywhere, and
// leaves it only when both sides hold the same bytes durably: a dirty region once a resync copied it and the
// replica flushed; an extent once a flush that started after its last write finished (and one more, dirty-map.ts)
// has completed on the owner and every in-sync replica. So after an owner crash every region where a replica may
// differ (a write applied on one side and not the other, or never sent) is listed: at start every link's dirty map
// takes the activity log's extents in, every link starts out of sync, and only those regions are resent. A crash
// between syncing a region in and applying the write only resends a region that did not change.
//
// STATES of a link:
//
//   out-of-sync ──(connect, hello, syncOpen)──► resyncing ──(dirty regions copied, replica flushed, under the
//        ▲                                          │       whole volume's lock)──► in-sync
//        └──── error, timeout, closed connection ◄──┴──────────────────────────────────────┘
//
// Resync compares each dirty region under its range lock, chunk by chunk, by the checksums both sides recorded
// (the replica's asked for 4 MiB at a time, syncSums, a few steps ahead), and sends only the chunks that differ:
// holes as trims, data as writes (adjacent dirty regions go as one step of up to 1 MiB, a few steps in flight) (bytes counted; those found equal are counted too). So a replica whose dirty map says more than
// changed (after an owner crash, a failover, a link added back) receives what did change. A client write whose
// regions the resync has all copied is sent to the replica too, as to an in-sync one (DRBD's way; one that fails
// marks them again and restarts the resync on a new session); any other write marks its regions again; after at most syncResyncPassesMax passes, or one that leaves at
// most syncCatchUpRegionsMax regions, what is left is copied under the whole volume's lock (writes wait, briefly),
// so a resync under steady writes ends (DRBD's way). The link then turns in sync under that lock, so no write is in
// flight as it changes. A rate cap (--max-rate) paces the passes' data, not the last copy under the lock.
//
// DAMAGE AT RESYNC: a block of the live volume (or of a snapshot being given) that fails its checksum here when a
// resync reads it, and that no in-sync replica can give, is not sent: the step sends the rest, its region stays
// dirty, and after the pass (#stopAtDamage) what was copied is flushed there and leaves the dirty map, the blocks are
// named (an error log line with the volume and byte ranges, the link's damagedBlocks and lastError in `replica
// status` and the API, counted in damagedBlocksTotal) and the resync stops, out of sync: it is tried again when a
// client write (trim, zeroes) replaces a whole damaged block (a snapshot's: when the snapshot is removed), or after
// syncDamagedRetryMs, not every second as for a replica that is away. The replica is never in sync with a block
// the owner cannot read: after a failover to it, its older copy would be served as the acknowledged data. The
// resyncing replica's own copy is used only where it is the owner's: a resync reads a chunk only when its checksum
// differs from the one the replica recorded, so one whose checksum matches the owner's metadata is found equal, not
// read, the replica turns in sync, and a read here then repairs the block from it (REPAIR ON READ).
//
// IN A CLUSTER: `volume create --replicas N --sync` places N replicas as --replicas does and links them here;
// the record says the volume is synchronous, and its inSync set (step 5) is what failover promotes from: the
// replica promoted (node.ts #promoteSync: no point to roll back to) owns the volume at epoch + 1 and links to the
// others, which are resynced in full (their regions are all dirty to the new owner: compared, and only what differs
// sent) and then recorded in sync. The
// old owner, back, becomes one of them (node.ts #rejoinSync: what it held kept as snapshot fenced-<ms>).
//
// VOLUME SET --SYNC (node.ts setVolumeSync): `on` turns each asynchronous link into a link here (every region dirty,
// so compared whole, and only what the replica lacks sent); `off` (makeAsynchronous) needs every link in sync and,
// under the whole volume's lock, takes a replication point (repl-<ms>) here and on each replica, records the in-sync
// set without them, and ends each link with syncClose (the replica becomes an asynchronous one of this node at the
// same epoch), so that the asynchronous link's first cycle finds the point on both sides with no write after it.
// When a replica fails to take the point, the point is removed again (a snapshot removed: from a replica that took
// it late, at its resync), so a failed `off` leaves no repl- snapshot behind.
//
// NOT YET: a receive or handoff (each refused while a volume has synchronous replicas: the replicas would not
// follow, so `volume move` of a synchronous volume is refused too), snapshots removed here while a replica was away
// removed there after a failover (the new owner never knew them), a snapshot's damaged block repaired from an in-sync
// replica (a resync stops at it: DAMAGE AT RESYNC), a verify of a replica's data itself, `replica add --sync` by hand marking the
// volume synchronous in etcd (its in-sync set is recorded, but the failover treats the volume as asynchronous).
// Writes under way when a link is added pass through; the resync starts once they are done.
import path from 'node:path';
import { assert } from '../core/assert.ts';
import { ChunkdError, DamagedDataError } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
import { parseHostPort } from '../core/host-port.ts';
import { chunkSizeBytes, snapshotsPerVolumeMax, syncActivityExtentBytes, syncCatchUpRegionsMax, syncDamagedRetryMs, syncReconnectDelayMs, syncRegionBytes, syncResyncBatchBytes, syncResyncBatchesInFlight, syncResyncPassesMax, syncSumsChunksMax, volumeSizeMaxBytes } from '../core/limits.ts';
import { doneNow, ForwardingDevice, type BlockDevice, type Extent, type WriteOptions, type ZeroOptions } from '../core/block-device.ts';
import type { Log } from '../core/log.ts';
import { formatSize } from '../core/units.ts';
import { PeerClient } from '../peer/client.ts';
import type { TlsCredentials } from '../peer/credentials.ts';
import { PeerVerb } from '../peer/protocol.ts';
import type { Pool, SnapshotInfo, VolumeInfo } from '../store/pool.ts';
import type { ChangedExtent } from '../store/map-diff.ts';
import type { BadExtent, ScrubReport } from '../store/scrub.ts';
import { isSnapshotUuid } from '../store/metadata.ts';
import { RangeLock } from '../store/range-lock.ts';
import { ActivityLog, RegionSet, regionsOf } from './dirty-map.ts';
import { jsonPayload, parseReplicaInfo, replicationSnapshotPrefix } from './peer-messages.ts';
import { readStateFile, writeStateFile } from './state-file.ts';
import { encodeSyncWrite, isFencedRefusal, parseSyncOpenReply, parseSyncSumsReply, SyncOp, type SyncControlAction } from './sync-messages.ts';
import { RateLimiter } from './rate-limit.ts';

export interface SyncReplicaSettings {
  volume: string;
  /** HOST:PORT of the replica node's --peer-listen. */
  peer: string;
  /** A write or flush the replica leaves unanswered this long makes it out of sync. */
  timeoutMs: number;
  /** A resync sends at most this many data bytes a second (replica add --sync --max-rate); none: no cap. */
  maxRateBytesPerSecond?: number | null;
}

export type SyncLinkState = 'in-sync' | 'out-of-sync' | 'resyncing';

export interface SyncReplicaStatus extends SyncReplicaSettings {
  mode: 'sync';
  peerName: string | null;
  state: SyncLinkState;
  /** Bytes of regions the replica may lack (the dirty map). */
  dirtyBytes: number;
  /** The resync under way: bytes of dirty regions it started with (grows when writes dirty more) and copied so far. */
  resync: { totalBytes: number; copiedBytes: number } | null;
  /** Data bytes every resync sent (holes go as trims and count nothing). */
  resyncBytesTotal: number;
  /** Bytes of dirty regions every resync found the same on the replica by their chunks' checksums, and did not send. */
  resyncEqualBytesTotal: number;
  /** Writes and flushes sent to the replica. */
  requestsTotal: number;
  /** Times it went out of sync. */
  outOfSyncTotal: number;
  /** Blocks that failed their checksum here and were read from this replica and rewritten (REPAIR ON READ). */
  readRepairsTotal: number;
  /**
   * Blocks the last resync found damaged here with no good copy to repair them from (DAMAGE AT RESYNC): it stopped
   * there, the replica out of sync; byte ranges of the live volume (snapshot null) or of a snapshot it was giving.
   */
  damagedBlocks: DamagedRange[];
  /** Damaged blocks with no good copy that resyncs found, each counted once while it stays listed. */
  damagedBlocksTotal: number;
  lastError: { message: string; at: string } | null;
}

/** A run of blocks damaged here that no in-sync replica holds (SyncReplicaStatus.damagedBlocks). */
export interface DamagedRange {
  snapshot: string | null;
  offsetBytes: number;
  lengthBytes: number;
}

/** A scrub's report on an owner with synchronous replicas: what was repaired from one, and what verifying each found. */
export interface ScrubWithReplicas extends ScrubReport {
  repairedExtents?: BadExtent[];
  replicas?: ReplicaVerify[];
}

/** One in-sync replica verified: the bytes whose checksums were compared, and the extents where they differ. */
export interface ReplicaVerify {
  peer: string;
  peerName: string | null;
  comparedBytes: number;
  differingExtents: Array<{ offsetBytes: number; lengthBytes: number }>;
  /** Why the verify stopped short (the replica did not answer). */
  error?: string;
}

/** Where a repair reads this node's blocks and rewrites a damaged one: the volume under SyncDevice (not replicated). */
type RepairTarget = Pick<BlockDevice, 'read' | 'write'>;

/** One piece of data-path work to replicate: what SyncDevice passes in. */
interface SyncRequest {
  op: SyncOp;
  offsetBytes: number;
  lengthBytes: number;
  data: Buffer | null;
  fua: boolean;
  noHole: boolean;
}

export interface SyncReplicationOptions {
  pool: Pool;
  poolDirectory: string;
  /** This node's client pair (or why there is none: the message for an add). */
  credentials: TlsCredentials | string;
  log: Log;
  /** This node's ownership epoch of a volume it owns. */
  epochOf: (volume: string) => number;
  /** Why the volume would refuse a write now, or null: asked before a write is sent anywhere. */
  writeRefusal: (volume: string) => ChunkdError | null;
  /**
   * In a cluster: records in etcd the replicas (node names) this node holds in sync, `nodes()` read when the
   * write starts (cluster.ts recordInSync; IN-SYNC SET of the design note); null when the node is in no cluster.
   */
  recordInSync?: (volume: string, nodes: () => string[]) => Promise<void> | null;
}

interface StoredLink {
  peer: string;
  timeoutMs: number;
  maxRateBytesPerSecond?: number | null;
  peerName: string | null;
  state: SyncLinkState;
  dirty: Array<[number, number]>;
  /** Ids of snapshots removed here that the replica may still hold (SNAPSHOTS AT RESYNC). */
  snapshotsRemoved?: string[];
}

/** Every volume of this node with synchronous replicas, and the state file they share. */
export class SyncReplication {
  readonly #options: SyncReplicationOptions;
  readonly #file: string;
  readonly #volumes = new Map<string, SyncVolume>();
  /** Writes to volumes without synchronous replicas in flight, per volume: a link added waits for them (see NOT YET). */
  readonly #passing = new Map<string, { count: number; drained: Array<() => void> }>();
  /** The state file write under way, and the one that starts after it (which every save() meanwhile joins). */
  #runningSave: Promise<void> | null = null;
  #nextSave: Promise<void> | null = null;
  #closed = false;

  private constructor(options: SyncReplicationOptions) {
    this.#options = options;
    this.#file = path.join(options.poolDirectory, 'replication', 'sync.json');
  }

  /** Reads the state file; every link starts out of sync, its dirty map holding the activity log (the crash rule). */
  static async load(options: SyncReplicationOptions): Promise<SyncReplication> {
    const sync = new SyncReplication(options);
    const value = (await readStateFile(sync.#file)) as { volumes?: Record<string, { active?: unknown; replicas?: StoredLink[] }> } | null;
    for (const [volume, stored] of Object.entries(value?.volumes ?? {})) {
      if (!options.pool.hasVolume(volume)) continue;
      const sizeBytes = options.pool.volumeInfo(volume).sizeBytes;
      const regionCount = Math.ceil(sizeBytes / syncRegionBytes);
      const what = `${sync.#file}, volume ${volume}`;
      // A shrink the state file did not follow yet (a crash between the two) leaves runs past the end: dropped.
      const active = RegionSet.fromRuns(stored.active ?? [], Math.ceil(volumeSizeMaxBytes / syncActivityExtentBytes), what, Math.ceil(sizeBytes / syncActivityExtentBytes))
        .scaled(activityRegionsPerExtent, regionCount);
      const set = new SyncVolume(volume, sync, options);
      for (const link of stored.replicas ?? []) {
        if (typeof link.peer !== 'string' || parseHostPort(link.peer) === null || !Number.isSafeInteger(link.timeoutMs)) throw ChunkdError.corrupt(`${what}: a link is not a peer and a timeout`);
        const maxRate = link.maxRateBytesPerSecond ?? null;
        if (maxRate !== null && (!Number.isSafeInteger(maxRate) || maxRate < 1)) throw ChunkdError.corrupt(`${what}: a link's rate cap is not a whole number of bytes a second`);
        const dirty = RegionSet.fromRuns(link.dirty, Math.ceil(volumeSizeMaxBytes / syncRegionBytes), what, regionCount);
        dirty.addAll(active);
        const removed = link.snapshotsRemoved ?? [];
        if (!Array.isArray(removed) || !removed.every(isSnapshotUuid)) throw ChunkdError.corrupt(`${what}: a link's removed snapshots are not snapshot ids`);
        set.addLink({ volume, peer: link.peer, timeoutMs: link.timeoutMs, maxRateBytesPerSecond: maxRate }, dirty, link.peerName, removed);
      }
      if (set.linkCount > 0) sync.#volumes.set(volume, set);
    }
    return sync;
  }

  /** Starts every link's resync (each connects, catches up, and turns in sync). */
  start(): void {
    for (const set of this.#volumes.values()) set.start();
  }

  async stop(): Promise<void> {
    this.#closed = true;
    await Promise.all([...this.#volumes.values()].map((set) => set.stop()));
    await this.#nextSave?.catch(() => {});
    await this.#runningSave?.catch(() => {});
  }

  has(volume: string): boolean {
    return this.#volumes.has(volume);
  }

  /** Adds a synchronous replica: it starts out of sync with every region dirty, and a resync makes it a copy. */
  async add(settings: SyncReplicaSettings): Promise<SyncReplicaStatus> {
    if (typeof this.#options.credentials === 'string') throw ChunkdError.invalid(`synchronous replicas need this node's client certificate: ${this.#options.credentials}`);
    const { volume, peer } = settings;
    if (!this.#options.pool.hasVolume(volume)) throw ChunkdError.notFound(`volume ${volume} does not exist`);
    let set = this.#volumes.get(volume);
    if (set?.hasLink(peer)) throw ChunkdError.exists(`volume ${volume} has a synchronous replica on ${peer} already`);
    const created = set === undefined;
    set ??= new SyncVolume(volume, this, this.#options);
    const all = new RegionSet();
    all.addRange(0, Math.ceil(this.#options.pool.volumeInfo(volume).sizeBytes / syncRegionBytes));
    set.addLink(settings, all, null);
    this.#volumes.set(volume, set);
    await this.save();
    // Writes that began before the volume had links were not tracked: its resync copies no region under them.
    await this.#drained(volume);
    if (created) set.start();
    else set.startLink(peer);
    this.#options.log(`volume ${volume}: synchronous replica on ${peer} added; it is out of sync until its first resync completes`);
    return set.status().find((link) => link.peer === peer)!;
  }

  /** Stops replicating `volume` to `peer` synchronously; false when there was no such link. */
  async remove(volume: string, peer: string): Promise<boolean> {
    const set = this.#volumes.get(volume);
    if (set === undefined || !(await set.removeLink(peer))) return false;
    if (set.linkCount === 0) this.#volumes.delete(volume);
    await this.save();
    return true;
  }

  /**
   * `volume set --sync off`: every link of `volume` ends at a replication point, snapshot `point`, taken here and on
   * each replica (all must be in sync) with no write between it and the end of the links, and each replica made an
   * asynchronous replica of this node (syncClose); returns the links' settings, for asynchronous links to the same
   * peers, whose first cycle finds the point on both sides (replicator.ts) and sends what was written since.
   */
  async makeAsynchronous(volume: string, point: string): Promise<SyncReplicaSettings[]> {
    const set = this.#volumes.get(volume);
    if (set === undefined) throw ChunkdError.invalid(`volume ${volume} has no synchronous replicas`);
    const ended = await set.endAll(point);
    this.#volumes.delete(volume);
    await this.save();
    return ended;
  }

  /**
   * Removes `volume` from the pool (`local`) under its whole lock, so that no resync step has it open (a resync
   * under way does not refuse it), and its links with it (the replicas stay on their nodes); `local` alone when it
   * has no synchronous replicas. A refusal of `local` leaves the links as they were.
   */
  async removeVolume(volume: string, local: () => Promise<void>): Promise<void> {
    const set = this.#volumes.get(volume);
    if (set === undefined) return local();
    await set.removeWith(local);
    await this.forgetVolume(volume);
  }

  /** A volume removed from the pool: its links go (the replicas stay on their nodes). */
  async forgetVolume(volume: string): Promise<void> {
    const set = this.#volumes.get(volume);
    if (set === undefined) return;
    this.#volumes.delete(volume);
    await set.stop();
    await this.save();
  }

  /**
   * A snapshot of `volume` taken here and on every in-sync replica at the same point of the write stream (CONTROL
   * in the design note); `local` alone when the volume has no synchronous replicas. So are the three below.
   */
  createSnapshot(volume: string, name: string, local: () => Promise<SnapshotInfo>): Promise<SnapshotInfo> {
    return this.#volumes.get(volume)?.createSnapshot(name) ?? local();
  }

  removeSnapshot(volume: string, name: string, local: () => Promise<void>): Promise<void> {
    return this.#volumes.get(volume)?.removeSnapshot(name) ?? local();
  }

  resize(volume: string, sizeBytes: number, force: boolean, local: () => Promise<VolumeInfo>): Promise<VolumeInfo> {
    return this.#volumes.get(volume)?.resize(sizeBytes, force) ?? local();
  }

  rollback(volume: string, snapshot: string, local: () => Promise<VolumeInfo>): Promise<VolumeInfo> {
    return this.#volumes.get(volume)?.rollback(snapshot) ?? local();
  }

  /** Refuses a change that synchronous replicas do not follow yet (a receive, a handoff). */
  checkUnreplicated(volume: string, what: string): void {
    if (this.#volumes.has(volume)) throw ChunkdError.busy(`volume ${volume} has synchronous replicas, which do not follow ${what} yet: remove them first (chunkd replica remove ${volume} --peer HOST:PORT)`);
  }

  /** Waits until every link of `volume` is in sync and recorded so (in a cluster), at most `timeoutMs`. */
  async waitInSync(volume: string, timeoutMs: number): Promise<void> {
    const until = performance.now() + timeoutMs;
    for (;;) {
      const set = this.#volumes.get(volume);
      if (set === undefined || set.inSyncRecorded()) return;
      if (performance.now() > until || this.#closed) {
        const waiting = set.status().filter((link) => link.state !== 'in-sync');
        throw ChunkdError.busy(`${waiting.length > 0 ? waiting.map((link) => `${link.peer} is ${link.state}${link.lastError === null ? '' : ` (${link.lastError.message})`}`).join('; ') : 'the in-sync set is not recorded in etcd yet'} after ${timeoutMs / 1000} s`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  status(volume: string | null): SyncReplicaStatus[] {
    if (volume !== null) return this.#volumes.get(volume)?.status() ?? [];
    return [...this.#volumes.values()].flatMap((set) => set.status());
  }

  /** A write, trim or write zeroes of `volume`: replicated when it has synchronous replicas, else `local` alone. */
  async replicate(volume: string, request: SyncRequest, local: () => Promise<void>): Promise<void> {
    const set = this.#volumes.get(volume);
    if (set !== undefined) return set.replicate(request, local);
    return this.#pass(volume, local);
  }

  /**
   * A read of `volume` into `target` that found a damaged block here (`damage`): REPAIR ON READ of the design note.
   * Fills `target` from this node's good blocks and an in-sync replica's copies of the damaged ones, rewriting
   * those here through `device`; throws `damage` when no in-sync replica has a good copy.
   */
  repairRead(volume: string, offsetBytes: number, target: Buffer, damage: DamagedDataError, device: RepairTarget): Promise<void> {
    const set = this.#volumes.get(volume);
    if (set === undefined) return Promise.reject(damage);
    return set.repairRead(offsetBytes, target, damage, device);
  }

  /**
   * SCRUB WITH REPLICAS (chunkd scrub on the owner): the live volume's damaged extents that `report` names are
   * repaired from an in-sync replica as a client's read would be (REPAIR ON READ); a snapshot's stay damaged, as
   * do those no replica has a good copy of. Then each in-sync replica is verified (SyncVolume.verify).
   */
  async scrubWithReplicas(volume: string, report: ScrubReport): Promise<ScrubWithReplicas> {
    const set = this.#volumes.get(volume);
    if (set === undefined) return report;
    const repairedExtents: BadExtent[] = [];
    const badExtents: BadExtent[] = [];
    const device = this.#options.pool.openVolume(volume);
    try {
      for (const extent of report.badExtents) {
        if (extent.export === volume && (await set.repairExtent(extent, device))) repairedExtents.push(extent);
        else badExtents.push(extent);
      }
    } finally {
      await device.close();
    }
    const repairedChunks = repairedExtents.reduce((sum, extent) => sum + Math.ceil(extent.lengthBytes / chunkSizeBytes), 0);
    return { ...report, badExtents, badChunks: badExtents.length === 0 ? 0 : Math.max(1, report.badChunks - repairedChunks), repairedExtents, replicas: await set.verify() };
  }

  async flush(volume: string, local: () => Promise<void>): Promise<void> {
    const set = this.#volumes.get(volume);
    if (set !== undefined) return set.flush(local);
    return this.#pass(volume, local);
  }

  /**
   * Writes the state file as it is when the write starts; one caller's change is in it once its promise resolves.
   * One write runs at a time, and every caller while it runs shares the next one (a group commit: at a queue depth
   * of 32, the writes that mark new regions at once cost two state-file writes, not 32).
   */
  save(): Promise<void> {
    if (this.#nextSave !== null) return this.#nextSave;
    const next = (this.#runningSave ?? Promise.resolve()).catch(() => {}).then(() => {
      this.#nextSave = null;
      const volumes = Object.fromEntries([...this.#volumes].map(([name, set]) => [name, set.stored()]));
      const running = writeStateFile(this.#file, { volumes });
      this.#runningSave = running;
      return running.finally(() => {
        if (this.#runningSave === running) this.#runningSave = null;
      });
    });
    this.#nextSave = next;
    return next;
  }

  get closed(): boolean {
    return this.#closed;
  }

  async #pass(volume: string, local: () => Promise<void>): Promise<void> {
    let passing = this.#passing.get(volume);
    if (passing === undefined) this.#passing.set(volume, (passing = { count: 0, drained: [] }));
    passing.count += 1;
    try {
      await local();
    } finally {
      passing.count -= 1;
      if (passing.count === 0) {
        this.#passing.delete(volume);
        for (const resolve of passing.drained) resolve();
      }
    }
  }

  #drained(volume: string): Promise<void> {
    const passing = this.#passing.get(volume);
    if (passing === undefined) return Promise.resolve();
    return new Promise((resolve) => passing.drained.push(resolve));
  }
}

interface Unanswered {
  deadlineMs: number;
  reject: (error: unknown) => void;
}

/** One synchronous replica of a volume: its connection, state and dirty map. */
class SyncLink {
  readonly settings: SyncReplicaSettings;
  state: SyncLinkState = 'out-of-sync';
  peerName: string | null;
  readonly dirty: RegionSet;
  /** Dirty regions the resync under way has copied (a write to one marks it again: removed from here). */
  readonly copied = new Set<number>();
  /** Ids of snapshots removed here while the replica was not in sync (or that it failed to remove): its resync removes them there. */
  snapshotsRemoved: string[] = [];
  client: PeerClient | null = null;
  /** The session the replica's syncOpen answered on this connection (sync-messages.ts). */
  session = 0;
  /** The state file write that recorded the last fall out of sync: every write acknowledged after it waits for it. */
  outOfSyncSaved: Promise<void> = Promise.resolve();
  resync: { totalBytes: number; copiedBytes: number } | null = null;
  resyncBytesTotal = 0;
  resyncEqualBytesTotal = 0;
  requestsTotal = 0;
  outOfSyncTotal = 0;
  readRepairsTotal = 0;
  /** DAMAGE AT RESYNC: the runs the last resync stopped at (status), and the chunks the resync under way found. */
  damaged: DamagedRange[] = [];
  damagedBlocksTotal = 0;
  readonly found: Array<{ snapshot: string | null; chunk: number }> = [];
  lastError: { message: string; at: string } | null = null;
  running: Promise<void> | null = null;
  stopped = false;
  /** Why the resync under way was ended to start again (restart), or null. */
  restartReason: string | null = null;
  readonly #wakers = new Set<() => void>();

  /** The resync's rate cap (settings.maxRateBytesPerSecond), or none. */
  readonly limiter: RateLimiter | null;

  constructor(settings: SyncReplicaSettings, dirty: RegionSet, peerName: string | null) {
    this.settings = settings;
    this.limiter = (settings.maxRateBytesPerSecond ?? null) === null ? null : new RateLimiter(settings.maxRateBytesPerSecond!);
    this.dirty = dirty;
    this.peerName = peerName;
  }

  /** Marks [first, end) dirty for a write while out of sync; true when the state file must be written first. */
  markDirty(first: number, end: number): boolean {
    for (let region = first; region < end; region++) this.copied.delete(region);
    return this.dirty.addRange(first, end);
  }

  /** Whether the resync under way has copied every region of [first, end) (and no write marked one again since). */
  hasCopied(first: number, end: number): boolean {
    for (let region = first; region < end; region++) if (!this.copied.has(region)) return false;
    return true;
  }

  /** Forgets the regions from `limit` on (the volume shrank). */
  truncate(limit: number): void {
    this.dirty.truncate(limit);
    for (const region of this.copied) if (region >= limit) this.copied.delete(region);
  }

  /** Dirty regions the resync has still to copy. */
  pendingRegions(): number[] {
    return this.dirty.sorted().filter((region) => !this.copied.has(region));
  }

  /**
   * Sends a request on the link's connection; no answer within the link's timeout is an error. One timer for the
   * link, at the oldest unanswered request's deadline (#watch), not one set and cleared per request: on the write
   * path of every replicated write.
   */
  send(verb: number, payload: Buffer | Buffer[]): Promise<Buffer> {
    const client = this.client;
    if (client === null) return Promise.reject(ChunkdError.io(`not connected to ${this.settings.peer}`));
    this.requestsTotal += 1;
    const { promise, resolve, reject } = Promise.withResolvers<Buffer>();
    const entry: Unanswered = { deadlineMs: performance.now() + this.settings.timeoutMs, reject };
    this.#unanswered.add(entry);
    if (this.#watchdog === null) this.#watch();
    client.request(verb, payload).then((reply) => {
      this.#unanswered.delete(entry);
      resolve(reply);
    }, (error: unknown) => {
      this.#unanswered.delete(entry);
      reject(error);
    });
    return promise;
  }

  /** Requests sent and not answered, oldest first (a Set keeps the order they were added in). */
  readonly #unanswered = new Set<Unanswered>();
  #watchdog: NodeJS.Timeout | null = null;

  /** Fails the requests past their deadline, and sets the timer for the oldest one left (none: no timer). */
  readonly #watch = (): void => {
    this.#watchdog = null;
    const nowMs = performance.now();
    for (const entry of this.#unanswered) {
      if (entry.deadlineMs > nowMs) {
        this.#watchdog = setTimeout(this.#watch, entry.deadlineMs - nowMs);
        this.#watchdog.unref();
        return;
      }
      this.#unanswered.delete(entry);
      entry.reject(ChunkdError.io(`the synchronous replica on ${this.settings.peer} did not answer within ${this.settings.timeoutMs} ms`));
    }
  };

  disconnect(): void {
    this.client?.close();
    this.client = null;
  }

  /** Ends the resync under way so that it starts again at once (#run), from the dirty map, saying why. */
  restart(reason: string): void {
    this.restartReason = reason;
    this.disconnect();
  }

  /** Waits `ms` (before the next try, or the rate cap's time), or less when the link is stopped. */
  pause(ms: number): Promise<void> {
    if (this.stopped) return Promise.resolve();
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        this.#wakers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.#wakers.add(wake);
    });
  }

  stop(): void {
    this.stopped = true;
    this.disconnect();
    this.wake();
  }

  /** Ends a pause early (the link stopped). */
  wake(): void {
    for (const wake of this.#wakers) wake();
  }

  /** A write replaced a damaged block the resync found (or stopped at): it tries again, now or after its try under way. */
  wakeFromDamage(): void {
    this.#damageReplaced = true;
    this.wake();
  }

  /** The wait of a resync stopped at damage (DAMAGE AT RESYNC): none when a write replaced a damaged block meanwhile. */
  async pauseAtDamage(ms: number): Promise<void> {
    if (!this.#damageReplaced) await this.pause(ms);
    this.#damageReplaced = false;
  }

  /** Set by wakeFromDamage; cleared as each resync starts, and by pauseAtDamage. */
  #damageReplaced = false;

  /** A resync starts: damage it finds is its own (see pauseAtDamage). */
  beginResync(): void {
    this.found.length = 0;
    this.#damageReplaced = false;
  }

  /** Whether a write, trim or zeroing of [offsetBytes, +lengthBytes) replaces a whole damaged chunk of the live volume. */
  replacesDamaged(offsetBytes: number, lengthBytes: number): boolean {
    const from = Math.ceil(offsetBytes / chunkSizeBytes);
    const to = Math.floor((offsetBytes + lengthBytes) / chunkSizeBytes);
    return this.damaged.some((range) => range.snapshot === null && Math.max(from, range.offsetBytes / chunkSizeBytes) < Math.min(to, (range.offsetBytes + range.lengthBytes) / chunkSizeBytes))
      || this.found.some((entry) => entry.snapshot === null && entry.chunk >= from && entry.chunk < to);
  }

  fail(error: ChunkdError): void {
    this.lastError = { message: error.message, at: new Date().toISOString() };
  }
}

/** The synchronous replicas of one volume: the range lock, the activity log, the links. */
class SyncVolume {
  readonly #name: string;
  readonly #sync: SyncReplication;
  readonly #options: SyncReplicationOptions;
  readonly #links: SyncLink[] = [];
  readonly #lock = new RangeLock();
  /** The activity log, in extents: persisted, for an owner crash. */
  readonly #activity = new ActivityLog();
  /** The same in dirty-map regions, in memory only: what a replica that falls out of sync now may lack. */
  readonly #recent = new ActivityLog();
  /** Set once a replica refused this node as a stale owner: every later write and flush is refused with it. */
  #fenced: ChunkdError | null = null;
  /** The in-sync set (node names) etcd records, as far as this node knows: null until it first wrote it (IN-SYNC SET). */
  #recorded: Set<string> | null = null;
  /** A write of the in-sync set asked for whose set is not taken yet: callers meanwhile share it. */
  #queuedRecord: Promise<void> | null = null;

  constructor(name: string, sync: SyncReplication, options: SyncReplicationOptions) {
    this.#name = name;
    this.#sync = sync;
    this.#options = options;
  }

  get linkCount(): number {
    return this.#links.length;
  }

  hasLink(peer: string): boolean {
    return this.#links.some((link) => link.settings.peer === peer);
  }

  addLink(settings: SyncReplicaSettings, dirty: RegionSet, peerName: string | null, snapshotsRemoved: string[] = []): void {
    assert(!this.hasLink(settings.peer), 'one link per peer');
    const link = new SyncLink(settings, dirty, peerName);
    link.snapshotsRemoved = snapshotsRemoved;
    this.#links.push(link);
  }

  async removeLink(peer: string): Promise<boolean> {
    const index = this.#links.findIndex((link) => link.settings.peer === peer);
    if (index < 0) return false;
    // Under the whole volume's lock, so no write is sent to it half way; in a cluster, no write is acknowledged
    // without it while etcd may still list it in sync (IN-SYNC SET): the set without it is recorded first, and a
    // failure to record it keeps the link.
    const release = await this.#lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
    const [link] = this.#links.splice(index, 1);
    try {
      await this.#record();
    } catch (error) {
      this.#links.splice(index, 0, link!);
      throw error;
    } finally {
      release();
    }
    link!.stop();
    await link!.running;
    return true;
  }

  /** SyncReplication.removeVolume: `local` under the whole volume's lock, then every link stopped before it goes. */
  async removeWith(local: () => Promise<void>): Promise<void> {
    const release = await this.#lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      await local();
      for (const link of this.#links) link.stop();
    } finally {
      release();
    }
  }

  start(): void {
    for (const link of this.#links) this.startLink(link.settings.peer);
  }

  startLink(peer: string): void {
    const link = this.#links.find((candidate) => candidate.settings.peer === peer);
    assert(link !== undefined);
    if (link.running !== null || link.state === 'in-sync') return;
    link.running = this.#run(link).finally(() => {
      link.running = null;
      // Out of sync again before this run had quite ended (startLink found it still running): run again.
      if (link.state !== 'in-sync' && !link.stopped && !this.#sync.closed && this.#fenced === null) this.startLink(peer);
    });
  }

  async stop(): Promise<void> {
    for (const link of this.#links) link.stop();
    await Promise.all(this.#links.map((link) => link.running));
  }

  stored(): { active: Array<[number, number]>; replicas: StoredLink[] } {
    return {
      active: this.#activity.active.toRuns(),
      replicas: this.#links.map((link) => ({
        peer: link.settings.peer, timeoutMs: link.settings.timeoutMs, maxRateBytesPerSecond: link.settings.maxRateBytesPerSecond ?? null, peerName: link.peerName, state: link.state, dirty: link.dirty.toRuns(),
        ...(link.snapshotsRemoved.length > 0 ? { snapshotsRemoved: link.snapshotsRemoved } : {}),
      })),
    };
  }

  status(): SyncReplicaStatus[] {
    return this.#links.map((link) => ({
      ...link.settings,
      maxRateBytesPerSecond: link.settings.maxRateBytesPerSecond ?? null,
      mode: 'sync',
      peerName: link.peerName,
      state: link.state,
      dirtyBytes: link.dirty.size * syncRegionBytes,
      resync: link.resync === null ? null : { ...link.resync },
      resyncBytesTotal: link.resyncBytesTotal,
      resyncEqualBytesTotal: link.resyncEqualBytesTotal,
      requestsTotal: link.requestsTotal,
      outOfSyncTotal: link.outOfSyncTotal,
      readRepairsTotal: link.readRepairsTotal,
      damagedBlocks: link.damaged.map((range) => ({ ...range })),
      damagedBlocksTotal: link.damagedBlocksTotal,
      lastError: link.lastError,
    }));
  }

  /** Every link in sync, and etcd told so. */
  inSyncRecorded(): boolean {
    const names = this.#inSyncNames();
    return this.#links.every((link) => link.state === 'in-sync') && this.#recorded !== null && this.#recorded.size === names.length && names.every((name) => this.#recorded!.has(name));
  }

  #inSyncNames(): string[] {
    return this.#links.flatMap((link) => (link.state === 'in-sync' && link.peerName !== null ? [link.peerName] : []));
  }

  /**
   * Step 5 (IN-SYNC SET): before a request is acknowledged, etcd must not record in sync a replica that is not in
   * sync here (one that fell out, or any at start, when what etcd has is unknown): the set is written first.
   */
  async #recordIfStale(): Promise<void> {
    if (this.#recordIsStale()) await this.#record();
  }

  /** Whether etcd may record in sync a replica that is not (or what it records is unknown): step 5's test. */
  #recordIsStale(): boolean {
    const recorded = this.#recorded;
    if (recorded === null) return true;
    for (const name of recorded) if (!this.#links.some((link) => link.state === 'in-sync' && link.peerName === name)) return true;
    return false;
  }

  /** Writes the in-sync set to etcd as it is when the write starts; callers whose change is not taken yet share one. */
  #record(): Promise<void> {
    if (this.#queuedRecord !== null) return this.#queuedRecord;
    let taken: string[] | null = null;
    let queued: Promise<void> | null = null;
    const take = (): string[] => {
      if (queued !== null && this.#queuedRecord === queued) this.#queuedRecord = null;
      taken = this.#inSyncNames();
      return taken;
    };
    const call = this.#options.recordInSync?.(this.#name, take) ?? null;
    if (call === null) {
      this.#recorded = new Set(take());
      return Promise.resolve();
    }
    const wrapped: Promise<void> = call.then(() => {
      if (taken !== null) this.#recorded = new Set(taken);
    }).finally(() => {
      if (this.#queuedRecord === wrapped) this.#queuedRecord = null;
    });
    queued = wrapped;
    this.#queuedRecord = wrapped;
    return wrapped;
  }

  /** The in-sync set recorded in the background (a link turned in sync, or out between writes); a failure is logged. */
  #recordSoon(): void {
    void this.#record().catch((error: unknown) => this.#options.log(`volume ${this.#name}: its in-sync replicas were not recorded in etcd: ${expectedError(error, 'recording the in-sync set').message}`, 'warn'));
  }

  /** The ORDERING of the design note, steps 1 to 4. */
  async replicate(request: SyncRequest, local: () => Promise<void>): Promise<void> {
    if (this.#fenced !== null) throw this.#fenced;
    if (request.lengthBytes === 0) return local();
    const release = await this.#lock.acquire(...chunksOf(request.offsetBytes, request.lengthBytes), true);
    // Under the lock, as the volume checks it: a write the volume would refuse is not sent to a replica either.
    const refusal = this.#options.writeRefusal(this.#name);
    if (refusal !== null) {
      release();
      throw refusal;
    }
    const [first, end] = regionsOf(request.offsetBytes, request.lengthBytes, syncRegionBytes);
    const [firstExtent, endExtent] = regionsOf(request.offsetBytes, request.lengthBytes, syncActivityExtentBytes);
    let mustSave = this.#activity.begin(firstExtent, endExtent);
    this.#recent.begin(first, end);
    try {
      // A resyncing replica whose copy of each region of this write is done gets the write too (DRBD does), so that
      // the resync need not copy those regions again; otherwise the write marks them to copy (again).
      const following = this.#links.filter((link) => link.state === 'resyncing' && link.hasCopied(first, end));
      for (const link of this.#links) if (link.state !== 'in-sync' && !following.includes(link)) mustSave = link.markDirty(first, end) || mustSave;
      // A resync that stopped at a damaged block this write replaces tries again (its step waits for this write's lock).
      for (const link of this.#links) if ((link.damaged.length > 0 || link.found.length > 0) && link.replacesDamaged(request.offsetBytes, request.lengthBytes)) link.wakeFromDamage();
      if (mustSave) await this.#sync.save();
      const targets = this.#links.filter((link) => link.state === 'in-sync');
      const epoch = this.#options.epochOf(this.#name);
      const send = (link: SyncLink): Promise<ChunkdError | null> => link.send(PeerVerb.syncWrite, encodeSyncWrite({ ...request, volume: this.#name, epoch, session: link.session }))
        .then(() => null, (error: unknown) => expectedError(error, 'a synchronous write'));
      const answers = targets.map(send);
      const followed = following.map(send);
      let localError: unknown = null;
      await local().catch((error: unknown) => (localError = error));
      for (const [index, error] of (followed.length === 0 ? [] : await Promise.all(followed)).entries()) {
        const link = following[index]!;
        if (error === null && localError === null) continue;
        // The regions are copied again (they are dirty still: a resync clears the dirty map only when done), on a
        // new connection, whose session shuts out a write that timed out here and may still land there.
        link.markDirty(first, end);
        link.disconnect();
      }
      const errors = await Promise.all(answers);
      if (localError !== null || errors.some((error) => error !== null) || this.#fenced !== null) await this.#settle(targets, errors, localError !== null);
      if (localError !== null) throw localError;
      if (this.#recordIsStale()) await this.#record();
    } finally {
      this.#activity.end(firstExtent, endExtent);
      this.#recent.end(first, end);
      release();
    }
  }

  async flush(local: () => Promise<void>): Promise<void> {
    if (this.#fenced !== null) throw this.#fenced;
    const generation = this.#activity.flushStarted();
    const recentGeneration = this.#recent.flushStarted();
    const targets = this.#links.filter((link) => link.state === 'in-sync');
    const epoch = this.#options.epochOf(this.#name);
    const answers = targets.map((link) => link.send(PeerVerb.syncFlush, jsonPayload({ volume: this.#name, epoch, session: link.session }))
      .then(() => null, (error: unknown) => expectedError(error, 'a synchronous flush')));
    let localError: unknown = null;
    await local().catch((error: unknown) => (localError = error));
    await this.#settle(targets, await Promise.all(answers), false);
    if (localError !== null) throw localError;
    await this.#recordIfStale();
    // What left the log needs no write of its own (a stale entry only resends a region): the next one carries it.
    this.#activity.flushDone(generation);
    this.#recent.flushDone(recentGeneration);
  }

  /** REPAIR ON READ: see SyncReplication.repairRead. */
  async repairRead(offsetBytes: number, target: Buffer, damage: DamagedDataError, device: RepairTarget): Promise<void> {
    if (this.#fenced !== null || !this.#links.some((link) => link.state === 'in-sync')) throw damage;
    const sizeBytes = this.#options.pool.volumeInfo(this.#name).sizeBytes;
    const [firstChunk, endChunk] = chunksOf(offsetBytes, target.length);
    // Under the range lock, as a write: no write to these chunks runs meanwhile, so the replica's copy is the
    // bytes this node acknowledged last, and the rewrite cannot land over a newer write.
    const release = await this.#lock.acquire(firstChunk, endChunk, true);
    try {
      const block = Buffer.alloc(chunkSizeBytes);
      for (let chunk = firstChunk; chunk < endChunk; chunk++) {
        const startBytes = chunk * chunkSizeBytes;
        const bytes = block.subarray(0, Math.min(chunkSizeBytes, sizeBytes - startBytes));
        try {
          await device.read(startBytes, bytes);
        } catch (error) {
          if (!(error instanceof DamagedDataError)) throw error;
          await this.#repairBlock(startBytes, bytes, damage, device);
        }
        // The part of this block the read asked for.
        const from = Math.max(offsetBytes, startBytes);
        const to = Math.min(offsetBytes + target.length, startBytes + bytes.length);
        bytes.copy(target, from - offsetBytes, from - startBytes, to - startBytes);
      }
    } finally {
      release();
    }
  }

  /** Repairs a damaged extent of the live volume from an in-sync replica, a region at a time; false when it could not. */
  async repairExtent(extent: BadExtent, device: RepairTarget): Promise<boolean> {
    const endBytes = Math.min(extent.offsetBytes + extent.lengthBytes, this.#options.pool.volumeInfo(this.#name).sizeBytes);
    for (let at = extent.offsetBytes; at < endBytes; at += syncRegionBytes) {
      const target = Buffer.alloc(Math.min(syncRegionBytes, endBytes - at));
      try {
        await this.repairRead(at, target, new DamagedDataError(`volume ${this.#name}: a block at byte ${at} failed its checksum in a scrub`), device);
      } catch (error) {
        if (!(error instanceof ChunkdError)) throw error;
        return false;
      }
    }
    return true;
  }

  /**
   * DRBD's online verify, by recorded checksums: each in-sync replica's chunk checksums (syncSums) against this
   * node's, an activity extent at a time under its range lock, so that no write is in flight to it on either side.
   * A replica that differs anywhere is made out of sync with those regions dirty, and its resync sends what differs.
   * What it compares is what each side recorded: a block damaged on the replica under a good checksum is the
   * replica's own scrub's to find.
   */
  async verify(): Promise<ReplicaVerify[]> {
    const results: ReplicaVerify[] = [];
    for (const link of this.#links.filter((candidate) => candidate.state === 'in-sync')) {
      const result: ReplicaVerify = { peer: link.settings.peer, peerName: link.peerName, comparedBytes: 0, differingExtents: [] };
      const chunkCount = this.#options.pool.volumeInfo(this.#name).sizeBytes / chunkSizeBytes;
      for (let firstChunk = 0; firstChunk < chunkCount && link.state === 'in-sync'; firstChunk += syncSumsChunksMax) {
        const count = Math.min(syncSumsChunksMax, chunkCount - firstChunk);
        const release = await this.#lock.acquire(firstChunk, firstChunk + count, true);
        let ours: Uint32Array;
        let theirs: Uint32Array;
        try {
          if (link.state !== 'in-sync') break;
          ours = await this.#options.pool.chunkSums(this.#name, firstChunk, count);
          const reply = await link.send(PeerVerb.syncSums, jsonPayload({ volume: this.#name, epoch: this.#options.epochOf(this.#name), session: link.session, firstChunk, chunkCount: count }));
          theirs = parseSyncSumsReply(reply, count);
        } catch (error) {
          // The replica failing here fails the next write too (out of sync then); the scrub goes on.
          result.error = expectedError(error, 'verifying a replica').message;
          break;
        } finally {
          release();
        }
        result.comparedBytes += count * chunkSizeBytes;
        for (const [from, to] of differingRuns(ours, theirs)) result.differingExtents.push({ offsetBytes: (firstChunk + from) * chunkSizeBytes, lengthBytes: (to - from) * chunkSizeBytes });
      }
      if (result.differingExtents.length > 0 && link.state === 'in-sync') {
        for (const extent of result.differingExtents) link.dirty.addRange(...regionsOf(extent.offsetBytes, extent.lengthBytes, syncRegionBytes));
        await this.#outOfSync(link, ChunkdError.io(`a scrub found ${result.differingExtents.length} extent(s) whose checksums differ there`));
      }
      this.#options.log(`volume ${this.#name}: scrub verified the synchronous replica on ${link.settings.peer}: ${formatSize(result.comparedBytes)} compared by checksum, ${result.differingExtents.length} extent(s) differ${result.differingExtents.length > 0 ? ' (out of sync, resynced)' : ''}${result.error === undefined ? '' : `; stopped: ${result.error}`}`, result.differingExtents.length > 0 || result.error !== undefined ? 'warn' : 'info');
      results.push(result);
    }
    return results;
  }

  /**
   * CONTROL: a snapshot on every in-sync replica with the owner's id, under the whole volume's lock, so no write is
   * in flight anywhere: each copy holds exactly the writes acknowledged before it. A replica that fails it is out
   * of sync (it lacks the snapshot; a resync gives it the data, not the snapshot).
   */
  async createSnapshot(name: string): Promise<SnapshotInfo> {
    return this.#exclusive(async () => {
      const info = await this.#options.pool.createSnapshot(this.#name, name);
      await this.#control({ action: 'snapshot', name, uuid: info.uuid });
      return info;
    });
  }

  /**
   * Removed here, then on every in-sync replica; one that is not in sync, or fails (logged: its data is the same),
   * keeps it until its next resync removes it (SNAPSHOTS AT RESYNC).
   */
  async removeSnapshot(name: string): Promise<void> {
    await this.#exclusive(() => this.#removeSnapshot(name));
  }

  /** removeSnapshot's work; the caller holds the whole volume's lock. */
  async #removeSnapshot(name: string): Promise<void> {
    const { uuid } = this.#options.pool.snapshotInfo(this.#name, name);
    await this.#options.pool.removeSnapshot(this.#name, name);
    // A resync that stopped at a damaged block of this snapshot tries again: it no longer gives it (DAMAGE AT RESYNC).
    for (const link of this.#links) if (link.damaged.some((range) => range.snapshot === name)) link.wakeFromDamage();
    const kept: SyncLink[] = this.#links.filter((link) => link.state !== 'in-sync');
    const targets = this.#links.filter((link) => link.state === 'in-sync');
    await Promise.all(targets.map((link) => link.send(PeerVerb.syncControl, this.#controlPayload(link, { action: 'remove-snapshot', name, uuid })).catch((error: unknown) => {
      this.#options.log(`volume ${this.#name}: the synchronous replica on ${link.settings.peer} keeps snapshot ${name} until its next resync: ${expectedError(error, 'removing a snapshot').message}`, 'warn');
      kept.push(link);
    })));
    if (kept.length === 0) return;
    // Bounded as a volume's snapshots are: past that, the oldest ids are forgotten (they stay on the replica).
    for (const link of kept) link.snapshotsRemoved = [...link.snapshotsRemoved, uuid].slice(-snapshotsPerVolumeMax);
    await this.#sync.save();
  }

  /**
   * A grow or a shrink here, then on every in-sync replica (one out of sync takes the owner's size at its next
   * syncOpen). Dirty maps and the activity log lose what lies past a shrink; a grow is dirty for every replica
   * out of sync (it may hold other bytes there, from before a shrink it missed).
   */
  async resize(sizeBytes: number, force: boolean): Promise<VolumeInfo> {
    return this.#exclusive(async () => {
      const before = this.#options.pool.volumeInfo(this.#name).sizeBytes;
      const info = await this.#options.pool.resizeVolume(this.#name, sizeBytes, force);
      const regionsBefore = Math.ceil(before / syncRegionBytes);
      const regionsAfter = Math.ceil(sizeBytes / syncRegionBytes);
      for (const link of this.#links) {
        if (sizeBytes < before) link.truncate(regionsAfter);
        else if (link.state !== 'in-sync') link.markDirty(regionsBefore, regionsAfter);
        // A resync under way opened the replica at the old size: it starts again, and syncOpen gives the new one.
        if (link.state === 'resyncing' && sizeBytes !== before) link.restart(`the volume was resized from ${formatSize(before)} to ${formatSize(sizeBytes)}`);
      }
      if (sizeBytes < before) {
        this.#activity.truncate(Math.ceil(sizeBytes / syncActivityExtentBytes));
        this.#recent.truncate(regionsAfter);
      }
      if (sizeBytes !== before) await this.#sync.save();
      await this.#control({ action: 'resize', sizeBytes });
      return info;
    });
  }

  /**
   * A rollback here, then on every in-sync replica, which holds the snapshot when it was in sync when it was
   * taken. The regions it changes (the snapshot's diff against the volume) enter the activity log first, as a
   * write's would, and the dirty map of every replica out of sync; a replica that fails the rollback (it lacks
   * the snapshot, or a reader has its export open) is out of sync with them dirty, and a resync gives it the data.
   */
  async rollback(snapshot: string): Promise<VolumeInfo> {
    return this.#exclusive(async () => {
      const pool = this.#options.pool;
      const { uuid, sizeBytes } = pool.snapshotInfo(this.#name, snapshot);
      const before = pool.volumeInfo(this.#name).sizeBytes;
      const changed = regionRuns(await pool.diff(this.#name, snapshot, null), Math.max(before, sizeBytes));
      let mustSave = false;
      for (const [first, end] of changed) {
        const [firstExtent, endExtent] = regionsOf(first * syncRegionBytes, (end - first) * syncRegionBytes, syncActivityExtentBytes);
        mustSave = this.#activity.begin(firstExtent, endExtent) || mustSave;
        this.#recent.begin(first, end);
        for (const link of this.#links) if (link.state !== 'in-sync') mustSave = link.markDirty(first, end) || mustSave;
      }
      try {
        if (mustSave) await this.#sync.save();
        const info = await pool.rollbackVolume(this.#name, snapshot);
        if (sizeBytes < before) {
          for (const link of this.#links) link.truncate(Math.ceil(sizeBytes / syncRegionBytes));
          await this.#sync.save();
        }
        // A resync under way goes on: the regions the rollback changed are dirty to it again. At another size, it
        // starts again (a new syncOpen gives the replica the size), from its dirty map.
        for (const link of this.#links) {
          if (link.state === 'resyncing' && sizeBytes !== before) link.restart(`the volume was rolled back to ${snapshot}, of ${formatSize(sizeBytes)}`);
        }
        await this.#control({ action: 'rollback', name: snapshot, uuid });
        this.#options.log(`volume ${this.#name} rolled back to ${snapshot}, with its in-sync replicas`);
        return info;
      } finally {
        for (const [first, end] of changed) {
          const [firstExtent, endExtent] = regionsOf(first * syncRegionBytes, (end - first) * syncRegionBytes, syncActivityExtentBytes);
          this.#activity.end(firstExtent, endExtent);
          this.#recent.end(first, end);
        }
      }
    });
  }

  /**
   * SyncReplication.makeAsynchronous: the point on every replica, then every link ended, under the whole volume's
   * lock. When it fails before the links end, the point goes again (here, and from each replica, now or at its next
   * resync, as a snapshot removed): a failed command leaves no repl- snapshot behind, and a retry takes a new one.
   */
  async endAll(point: string): Promise<SyncReplicaSettings[]> {
    return this.#exclusive(async () => {
      const away = this.#links.filter((link) => link.state !== 'in-sync');
      if (away.length > 0) {
        throw ChunkdError.busy(`volume ${this.#name}: ${away.map((link) => `the synchronous replica on ${link.settings.peer} is ${link.state}`).join('; ')}: a replica becomes asynchronous from a point it holds, so it must be in sync first (chunkd replica status ${this.#name}), or be removed (chunkd replica remove ${this.#name} --peer HOST:PORT)`);
      }
      const { uuid } = await this.#options.pool.createSnapshot(this.#name, point);
      let links: SyncLink[];
      try {
        links = await this.#takePoint(point, uuid);
      } catch (error) {
        await this.#removeSnapshot(point).catch((failure: unknown) => this.#options.log(`volume ${this.#name}: the replication point ${point} of a failed change to asynchronous replicas stays: ${expectedError(failure, 'removing it').message} (chunkd snapshot rm ${this.#name} ${point})`, 'warn'));
        throw error;
      }
      const epoch = this.#options.epochOf(this.#name);
      // A replica that misses this stays a synchronous one until the first stream into it (replica-server.ts).
      await Promise.all(links.map((link) => link.send(PeerVerb.syncClose, jsonPayload({ volume: this.#name, epoch, session: link.session })).catch((error: unknown) => {
        this.#options.log(`volume ${this.#name}: the replica on ${link.settings.peer} was not told it is asynchronous now: ${expectedError(error, 'syncClose').message}`, 'warn');
      })));
      for (const link of links) link.stop();
      this.#options.log(`volume ${this.#name}: its replicas on ${links.map((link) => link.settings.peer).join(', ')} are asynchronous from ${point} on`);
      return links.map((link) => link.settings);
    });
  }

  /**
   * endAll's point, taken here already, sent to every replica; then the links taken out, the in-sync set without
   * them recorded (in a cluster, none is left in it before a write goes on without them: IN-SYNC SET; the volume's
   * record turns asynchronous next, node.ts). Throws, the links kept, when a replica fails it or etcd does.
   */
  async #takePoint(point: string, uuid: string): Promise<SyncLink[]> {
    await this.#control({ action: 'snapshot', name: point, uuid });
    const failed = this.#links.filter((link) => link.state !== 'in-sync');
    if (failed.length > 0) throw ChunkdError.io(`volume ${this.#name}: the synchronous replica on ${failed.map((link) => link.settings.peer).join(', ')} did not take the replication point ${point}, and is out of sync: the replicas stay synchronous (${failed[0]!.lastError?.message ?? 'no answer'})`);
    const links = this.#links.splice(0);
    try {
      await this.#record();
    } catch (error) {
      this.#links.push(...links);
      throw error;
    }
    return links;
  }

  /** `change` under the whole volume's lock, once nothing is in flight; refused as a write would be. */
  async #exclusive<T>(change: () => Promise<T>): Promise<T> {
    if (this.#fenced !== null) throw this.#fenced;
    const release = await this.#lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      if (this.#fenced !== null) throw this.#fenced;
      const refusal = this.#options.writeRefusal(this.#name);
      if (refusal !== null) throw refusal;
      return await change();
    } finally {
      release();
    }
  }

  /**
   * A resync's read of `device` (the live volume, or `snapshot`'s export); a block of the live volume that fails
   * its checksum is read from another, in-sync replica and rewritten here (REPAIR ON READ, under the step's range
   * lock, which the caller holds), so that the resyncing replica gets the right bytes. Returns the chunks (volume
   * chunk numbers, ascending) that failed their checksum and that no in-sync replica could give (a snapshot's are
   * not repaired): DAMAGE AT RESYNC. Their bytes in `target` are not the volume's.
   */
  async #readForResync(device: RepairTarget, snapshot: string | null, offsetBytes: number, target: Buffer): Promise<number[]> {
    try {
      await device.read(offsetBytes, target);
      return [];
    } catch (error) {
      if (!(error instanceof DamagedDataError)) throw error;
    }
    assert(offsetBytes % chunkSizeBytes === 0, 'a resync reads whole chunks');
    const lost: number[] = [];
    for (let at = 0; at < target.length; at += chunkSizeBytes) {
      const bytes = target.subarray(at, Math.min(target.length, at + chunkSizeBytes));
      try {
        await device.read(offsetBytes + at, bytes);
      } catch (error) {
        if (!(error instanceof DamagedDataError)) throw error;
        try {
          if (snapshot !== null) throw error;
          await this.#repairBlock(offsetBytes + at, bytes, error, device);
        } catch (failure) {
          if (!(failure instanceof DamagedDataError)) throw failure;
          lost.push((offsetBytes + at) / chunkSizeBytes);
        }
      }
    }
    return lost;
  }

  /**
   * DAMAGE AT RESYNC: the resync under way found blocks damaged here that no in-sync replica could give (link.found).
   * What it copied is made durable there and leaves the dirty map (under the whole volume's lock, as the turn to in
   * sync: no write follows the link meanwhile), the blocks are named (log, status) and counted, and the resync ends
   * with ResyncStoppedError: #run waits for a write that replaces them, or syncDamagedRetryMs, not a second.
   */
  async #stopAtDamage(link: SyncLink, locked: boolean): Promise<never> {
    const release = locked ? null : await this.#lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      if (link.state === 'resyncing' && link.client !== null) {
        link.state = 'out-of-sync';
        if (link.copied.size > 0) {
          await link.send(PeerVerb.syncFlush, jsonPayload({ volume: this.#name, epoch: this.#options.epochOf(this.#name), session: link.session }));
          for (const region of link.copied) link.dirty.delete(region);
          link.copied.clear();
          await this.#sync.save();
        }
      }
    } finally {
      release?.();
    }
    const before = new Set(link.damaged.flatMap((range) => chunkKeys(range)));
    const damaged = damagedRanges(link.found);
    const fresh = damaged.flatMap((range) => chunkKeys(range)).filter((key) => !before.has(key));
    link.damagedBlocksTotal += fresh.length;
    link.damaged = damaged;
    const named = damaged.map((range) => `bytes ${range.offsetBytes}-${range.offsetBytes + range.lengthBytes - 1} (${formatSize(range.lengthBytes)})${range.snapshot === null ? '' : ` of snapshot ${range.snapshot}`}`).join(', ');
    const snapshots = [...new Set(damaged.flatMap((range) => (range.snapshot === null ? [] : [range.snapshot])))];
    const until = snapshots.length === 0
      ? 'the replica was given every other block, and is out of sync until a write replaces them'
      : `the replica is not given snapshot ${snapshots.join(', ')}, and is out of sync until it is removed here`;
    const message = `the resync stopped: ${named} fail their checksum here, and no in-sync replica holds a copy to repair them from; ${until} (tried again then, or in ${syncDamagedRetryMs / 1000} s)`;
    if (fresh.length > 0) this.#options.log(`volume ${this.#name}: synchronous replica on ${link.settings.peer}: ${message}`, 'error');
    link.disconnect();
    throw new ResyncStoppedError(message);
  }

  /** Reads the block at `startBytes` into `bytes` from the first in-sync replica that has a good copy, and rewrites it here. */
  async #repairBlock(startBytes: number, bytes: Buffer, damage: DamagedDataError, device: RepairTarget): Promise<void> {
    const epoch = this.#options.epochOf(this.#name);
    for (const link of this.#links.filter((candidate) => candidate.state === 'in-sync')) {
      let copy: Buffer;
      try {
        copy = await link.send(PeerVerb.syncRead, jsonPayload({ volume: this.#name, epoch, session: link.session, offsetBytes: startBytes, lengthBytes: bytes.length }));
        if (copy.length !== bytes.length) throw ChunkdError.protocol(`the replica answered ${copy.length} bytes for ${bytes.length}`);
      } catch (error) {
        this.#options.log(`volume ${this.#name}: the block at byte ${startBytes} failed its checksum here, and the synchronous replica on ${link.settings.peer} could not give it: ${expectedError(error, 'a repair read').message}`, 'warn');
        continue;
      }
      copy.copy(bytes);
      try {
        await device.write(startBytes, bytes);
      } catch (error) {
        // The client still gets the right bytes; the block stays damaged here until a write or a later read.
        this.#options.log(`volume ${this.#name}: the block at byte ${startBytes} was read from the synchronous replica on ${link.settings.peer}, but not rewritten here: ${expectedError(error, 'a repair write').message}`, 'warn');
        return;
      }
      link.readRepairsTotal += 1;
      this.#options.log(`volume ${this.#name}: the block at byte ${startBytes} failed its checksum here; repaired from the synchronous replica on ${link.settings.peer} (${link.peerName ?? '?'})`, 'warn');
      return;
    }
    throw damage;
  }

  /** Sends a change to every in-sync replica; one that fails it is out of sync (step 4) before this returns. */
  async #control(action: SyncControlAction): Promise<void> {
    const targets = this.#links.filter((link) => link.state === 'in-sync');
    const answers = targets.map((link) => link.send(PeerVerb.syncControl, this.#controlPayload(link, action))
      .then(() => null, (error: unknown) => expectedError(error, `a synchronous ${action.action}`)));
    await this.#settle(targets, await Promise.all(answers), false);
    await this.#recordIfStale();
  }

  #controlPayload(link: SyncLink, action: SyncControlAction): Buffer {
    return jsonPayload({ volume: this.#name, epoch: this.#options.epochOf(this.#name), session: link.session, ...action });
  }

  /** Step 4: each failed answer makes its link out of sync, durably, before the request is answered; a fence refuses it. */
  async #settle(targets: SyncLink[], errors: Array<ChunkdError | null>, localFailed: boolean): Promise<void> {
    const saves: Array<Promise<void>> = [];
    for (const [index, link] of targets.entries()) {
      const error = errors[index];
      if (error !== null && error !== undefined && isFencedRefusal(error)) this.#fence(error);
      else if (error !== null && error !== undefined) saves.push(this.#outOfSync(link, error));
      else if (localFailed) saves.push(this.#outOfSync(link, ChunkdError.io('the owner failed a write that the replica applied')));
    }
    await Promise.all(saves);
    if (this.#fenced !== null) throw this.#fenced;
  }

  #fence(error: ChunkdError): void {
    if (this.#fenced !== null) return;
    this.#fenced = ChunkdError.readOnly(`volume ${this.#name}: writes refused: a synchronous replica refused this node as its owner (${error.message})`);
    this.#options.log(this.#fenced.message, 'error');
  }

  #outOfSync(link: SyncLink, error: ChunkdError): Promise<void> {
    if (link.state === 'in-sync' && !link.stopped) {
      link.state = 'out-of-sync';
      link.outOfSyncTotal += 1;
      link.fail(error);
      // Every region with a write in flight or not yet flushed on both sides may be missing there.
      link.dirty.addAll(this.#recent.active);
      link.copied.clear();
      link.disconnect();
      this.#options.log(`volume ${this.#name}: synchronous replica on ${link.settings.peer} is out of sync, writes go on without it: ${error.message}`, 'warn');
      link.outOfSyncSaved = this.#sync.save();
      this.#recordSoon();
      this.startLink(link.settings.peer);
    }
    return link.outOfSyncSaved;
  }

  async #run(link: SyncLink): Promise<void> {
    while (!link.stopped && !this.#sync.closed && link.state !== 'in-sync' && this.#fenced === null) {
      try {
        await this.#resync(link);
      } catch (caught) {
        link.disconnect();
        if (link.stopped) break;
        link.resync = null;
        if (link.restartReason !== null) {
          this.#options.log(`volume ${this.#name}: the resync of the synchronous replica on ${link.settings.peer} starts again, from its dirty map: ${link.restartReason}`);
          link.restartReason = null;
          link.state = 'out-of-sync';
          continue;
        }
        if (caught instanceof ResyncStoppedError) {
          // DAMAGE AT RESYNC: no loop. It waits for a write over the blocks (which replaces them), or a while.
          link.fail(caught);
          link.state = 'out-of-sync';
          await link.pauseAtDamage(syncDamagedRetryMs);
          continue;
        }
        const error = expectedError(caught, `the resync of ${this.#name} on ${link.settings.peer}`);
        if (isFencedRefusal(error)) {
          this.#fence(error);
          break;
        }
        if (link.lastError?.message !== error.message) this.#options.log(`volume ${this.#name}: synchronous replica on ${link.settings.peer}: ${error.message}; trying again`, 'warn');
        link.fail(error);
        link.state = 'out-of-sync';
        await link.pause(syncReconnectDelayMs);
      }
    }
  }

  /** out-of-sync -> resyncing -> in-sync, or throws (the link stays out of sync). */
  async #resync(link: SyncLink): Promise<void> {
    const address = parseHostPort(link.settings.peer);
    assert(address !== null && typeof this.#options.credentials !== 'string');
    link.client = await PeerClient.connect({ host: address.host, port: address.port, credentials: this.#options.credentials, timeoutMs: Math.max(link.settings.timeoutMs, 1_000) });
    if (link.stopped) return link.disconnect();
    link.peerName = link.client.hello.name;
    const sizeBytes = this.#options.pool.volumeInfo(this.#name).sizeBytes;
    link.session = parseSyncOpenReply(await link.send(PeerVerb.syncOpen, jsonPayload({ volume: this.#name, epoch: this.#options.epochOf(this.#name), sizeBytes })));
    link.restartReason = null;
    link.state = 'resyncing';
    link.copied.clear();
    link.beginResync();
    link.resync = { totalBytes: link.dirty.size * syncRegionBytes, copiedBytes: 0 };
    const started = performance.now();
    const sentBefore = link.resyncBytesTotal;
    const equalBefore = link.resyncEqualBytesTotal;
    // Passes while writes go on (each copies what the one before left, writes dirty it again), at most
    // syncResyncPassesMax; then what is left is copied under the whole volume's lock, writes waiting (DRBD's way), so
    // a resync under steady writes ends. A pass that leaves little is the last one too.
    // Each pass gives the replica the snapshots it lacks first (SNAPSHOTS AT RESYNC), and so does the last step,
    // under the lock, where none is taken or removed: a snapshot taken during the passes is there too.
    let passes = 0;
    for (;;) {
      if (passes < syncResyncPassesMax) {
        await this.#giveSnapshots(link, false);
        await this.#copyPending(link, false);
        if (link.found.length > 0) await this.#stopAtDamage(link, false);
        passes += 1;
      }
      const release = await this.#lock.acquire(0, Number.MAX_SAFE_INTEGER, true);
      try {
        if (link.state !== 'resyncing' || link.client === null) throw ChunkdError.io(`the resync of ${this.#name} on ${link.settings.peer} was interrupted`);
        // The replica took the size syncOpen gave: one changed since (a resize or a rollback just before the state
        // said resyncing, so that it did not restart this resync) needs another syncOpen.
        if (this.#options.pool.volumeInfo(this.#name).sizeBytes !== sizeBytes) {
          link.restart(`the volume's size changed since the replica was opened`);
          throw ChunkdError.io(`the resync of ${this.#name} on ${link.settings.peer} was interrupted`);
        }
        if (link.pendingRegions().length > syncCatchUpRegionsMax && passes < syncResyncPassesMax) continue;
        await this.#giveSnapshots(link, true);
        if (link.pendingRegions().length > 0) await this.#copyPending(link, true);
        if (link.found.length > 0) await this.#stopAtDamage(link, true);
        // The copies durable there before the dirty map forgets them.
        await link.send(PeerVerb.syncFlush, jsonPayload({ volume: this.#name, epoch: this.#options.epochOf(this.#name), session: link.session }));
        link.dirty.clear();
        link.copied.clear();
        link.state = 'in-sync';
        // A replica that goes away between writes is out of sync at once, not at the next write.
        const client = link.client!;
        void client.ended.then((error) => {
          if (link.client === client) void this.#outOfSync(link, error).catch((failure: unknown) => this.#options.log(`volume ${this.#name}: ${expectedError(failure, 'the sync state file').message}`, 'error'));
        });
        link.resync = null;
        link.lastError = null;
        link.damaged = [];
        await this.#sync.save();
      } finally {
        release();
      }
      const seconds = (performance.now() - started) / 1000;
      const equal = link.resyncEqualBytesTotal - equalBefore;
      this.#options.log(`volume ${this.#name}: synchronous replica on ${link.settings.peer} (${link.peerName}) is in sync: resync sent ${formatSize(link.resyncBytesTotal - sentBefore)} in ${seconds.toFixed(2)} s (${passes} pass${passes === 1 ? '' : 'es'}${equal > 0 ? `; ${formatSize(equal)} found the same by checksum, not sent` : ''})`);
      this.#recordSoon();
      return;
    }
  }

  /**
   * SNAPSHOTS AT RESYNC: the replica gets each snapshot of the volume that it lacks (taken while it was not in
   * sync, or before it was added), oldest first, with the owner's id and content, and loses those removed here
   * meanwhile (snapshotsRemoved), so that a failover to it keeps the volume's snapshots. A snapshot is given by
   * making the replica's volume its image (its size, then its chunks that differ from the replica's, compared in
   * the dirty regions only: the replica's volume differs from any state of the owner's since the two were last the
   * same only there) and taking it there (syncControl); then the resync compares every dirty region again. A
   * snapshot smaller than the volume shrinks the replica for a while: the regions it gives up are dirty (durably)
   * first. Replication snapshots (repl-*) are not given: the asynchronous replicator takes and prunes them on its
   * own. The replica's snapshots that the owner never had (fenced-<ms> of a rejoined old owner) stay. `locked`: the
   * caller holds the whole volume's lock.
   */
  async #giveSnapshots(link: SyncLink, locked: boolean): Promise<void> {
    const pool = this.#options.pool;
    const info = parseReplicaInfo(await link.send(PeerVerb.replicaInfo, jsonPayload({ volume: this.#name })));
    const theirs = new Map(info.snapshots.map((snapshot) => [snapshot.uuid, snapshot.name]));
    const removed = new Set<string>();
    for (const uuid of link.snapshotsRemoved) {
      const name = theirs.get(uuid);
      if (name === undefined) {
        removed.add(uuid);
        continue;
      }
      try {
        await link.send(PeerVerb.syncControl, this.#controlPayload(link, { action: 'remove-snapshot', name, uuid }));
        theirs.delete(uuid);
        removed.add(uuid);
      } catch (error) {
        // A reader of that snapshot there, say: it stays listed for the next resync.
        this.#options.log(`volume ${this.#name}: the synchronous replica on ${link.settings.peer} keeps snapshot ${name}, removed here: ${expectedError(error, 'removing a snapshot').message}`, 'warn');
      }
    }
    if (removed.size > 0) {
      link.snapshotsRemoved = link.snapshotsRemoved.filter((uuid) => !removed.has(uuid));
      await this.#sync.save();
    }
    const names = new Set(theirs.values());
    const missing = pool.listSnapshots(this.#name).filter((snapshot) => !theirs.has(snapshot.uuid) && !snapshot.name.startsWith(replicationSnapshotPrefix));
    if (missing.length === 0) return;
    const volumeBytes = pool.volumeInfo(this.#name).sizeBytes;
    const volumeRegions = Math.ceil(volumeBytes / syncRegionBytes);
    const floorRegion = Math.floor(Math.min(volumeBytes, ...missing.map((snapshot) => snapshot.sizeBytes)) / syncRegionBytes);
    if (link.markDirty(floorRegion, volumeRegions)) await this.#sync.save();
    // The replica's volume is a snapshot's image for a while: no region of it is a copy of the volume's (so no
    // client write is sent there), and each is compared again afterwards.
    link.copied.clear();
    // syncOpen gave the replica the volume's size (a resize here since then has interrupted this resync).
    let replicaBytes = volumeBytes;
    const resize = async (sizeBytes: number): Promise<void> => {
      if (sizeBytes === replicaBytes) return;
      await link.send(PeerVerb.syncControl, this.#controlPayload(link, { action: 'resize', sizeBytes }));
      replicaBytes = sizeBytes;
    };
    for (const snapshot of missing) {
      if (names.has(snapshot.name)) {
        this.#options.log(`volume ${this.#name}: the synchronous replica on ${link.settings.peer} holds another snapshot named ${snapshot.name}: it does not get this node's (id ${snapshot.uuid})`, 'warn');
        continue;
      }
      const sentBefore = link.resyncBytesTotal;
      await resize(snapshot.sizeBytes);
      const snapshotRegions = Math.ceil(snapshot.sizeBytes / syncRegionBytes);
      const regions = new Set(link.dirty.sorted().filter((region) => region < snapshotRegions));
      for (let region = floorRegion; region < snapshotRegions; region++) regions.add(region);
      try {
        await this.#copyRegions(link, { snapshot: snapshot.name, sizeBytes: snapshot.sizeBytes }, [...regions].sort((a, b) => a - b), locked);
      } catch (error) {
        // Removed here meanwhile (between two regions: each is copied under its lock, as a removal runs under the
        // whole volume's): not given; what it left there is in dirty regions, which the resync compares again.
        if (!locked && pool.findSnapshot(snapshot.uuid, this.#name) === null) continue;
        throw error;
      }
      // A block of it damaged here with no copy to repair it from: the replica does not get it (DAMAGE AT RESYNC).
      if (link.found.length > 0) await this.#stopAtDamage(link, locked);
      await link.send(PeerVerb.syncControl, this.#controlPayload(link, { action: 'snapshot', name: snapshot.name, uuid: snapshot.uuid }));
      this.#options.log(`volume ${this.#name}: snapshot ${snapshot.name} given to the synchronous replica on ${link.settings.peer}, which was not in sync when it was taken (${formatSize(link.resyncBytesTotal - sentBefore)} sent)`);
    }
    await resize(volumeBytes);
  }

  /** Copies the regions still dirty of the live volume (`locked`: the caller holds the whole volume's lock). */
  async #copyPending(link: SyncLink, locked: boolean): Promise<void> {
    const pending = link.pendingRegions();
    link.resync!.totalBytes = Math.max(link.resync!.totalBytes, link.resync!.copiedBytes + pending.length * syncRegionBytes);
    await this.#copyRegions(link, { snapshot: null, sizeBytes: this.#options.pool.volumeInfo(this.#name).sizeBytes }, pending, locked);
  }

  /**
   * Copies `regions` of `source` to the replica's volume, runs of adjacent regions (up to syncResyncBatchBytes) at a
   * time, a few runs at once, each under its range lock (`locked`: the caller holds the whole volume's). Each
   * region's chunks are compared first by their recorded checksums (the replica's asked for an activity extent at a
   * time, syncSums): only those that differ are sent, so a replica whose dirty map says more than changed (after an
   * owner crash, a failover, a link added to a replica that has the data) receives what did change. The price, as
   * content-digest.ts names it: two different chunks with the same CRC-32 at the same place go unseen (2^-32 per
   * chunk that differs), DRBD's csums-alg with crc32c.
   */
  async #copyRegions(link: SyncLink, source: CopySource, regions: number[], locked: boolean): Promise<void> {
    const sizeBytes = source.sizeBytes;
    // The replica's checksums, fetched once a run per extent: its chunks change meanwhile only by this run's copies,
    // each of a region compared before, and by client writes to regions copied already (not compared again).
    // Asked for ahead of the copies (the next steps' extents while these are copied), so that no step waits for a
    // round trip at each extent; a region's are still fetched before it is copied, as the above needs.
    const extents = new Map<number, Promise<Uint32Array>>();
    const extentSums = (region: number): Promise<Uint32Array> => {
      const extent = Math.floor(region / activityRegionsPerExtent);
      let sums = extents.get(extent);
      if (sums === undefined) {
        const firstChunk = extent * syncSumsChunksMax;
        const chunkCount = Math.min(syncSumsChunksMax, sizeBytes / chunkSizeBytes - firstChunk);
        sums = link.send(PeerVerb.syncSums, jsonPayload({ volume: this.#name, epoch: this.#options.epochOf(this.#name), session: link.session, firstChunk, chunkCount }))
          .then((reply) => parseSyncSumsReply(reply, chunkCount));
        sums.catch(() => {});
        extents.set(extent, sums);
      }
      return sums;
    };
    const theirSums = async (first: number, end: number): Promise<Uint32Array> => {
      const from = (first % activityRegionsPerExtent) * regionChunks;
      return (await extentSums(first)).subarray(from, from + (end - first) * regionChunks);
    };
    const batches = regionBatches(regions, syncResyncBatchBytes / syncRegionBytes, activityRegionsPerExtent);
    let next = 0;
    let failure: unknown = null;
    const worker = async (): Promise<void> => {
      // Each step's data is read into its worker's buffer (a fresh 1 MiB per step cost the owner about as much in
      // garbage collection as the reads): a step's syncWrites are answered before its next read.
      const scratch = Buffer.alloc(syncResyncBatchBytes);
      while (next < batches.length && failure === null) {
        const ahead = batches[next + syncResyncBatchesInFlight];
        if (ahead !== undefined) void extentSums(ahead[0]);
        const [first, end] = batches[next++]!;
        await this.#copyBatch(link, source, sizeBytes, first, end, theirSums, locked, scratch).catch((error: unknown) => (failure ??= error));
      }
    };
    await Promise.all(Array.from({ length: syncResyncBatchesInFlight }, worker));
    if (failure !== null) throw failure;
  }

  /** Copies the adjacent regions [first, end) of one activity extent (#copyRegions), reading into `scratch`. */
  async #copyBatch(link: SyncLink, source: CopySource, sizeBytes: number, first: number, end: number, theirSums: (first: number, end: number) => Promise<Uint32Array>, locked: boolean, scratch: Buffer): Promise<void> {
    const startBytes = first * syncRegionBytes;
    const endBytes = Math.min(sizeBytes, end * syncRegionBytes);
    if (endBytes <= startBytes) return;
    const theirs = await theirSums(first, end);
    const release = locked ? null : await this.#lock.acquire(...chunksOf(startBytes, endBytes - startBytes), true);
    const snapshot = source.snapshot;
    let sentBytes = 0;
    try {
      // A resize or rollback that changed the size since the pass began has restarted the resync (it needs a new
      // syncOpen); a volume removed has stopped it.
      if (link.state !== 'resyncing' || link.client === null || link.stopped || (snapshot === null && this.#options.pool.volumeInfo(this.#name).sizeBytes !== sizeBytes)) {
        throw ChunkdError.io(`the resync of ${this.#name} on ${link.settings.peer} was interrupted`);
      }
      // The regions still to copy, checked under the lock (a write may have copied one meanwhile).
      const wanted = new Uint32Array(end - first);
      for (let region = first; region < end; region++) wanted[region - first] = snapshot !== null || (link.dirty.has(region) && !link.copied.has(region)) ? 1 : 0;
      if (!wanted.includes(1)) return;
      const ours = await this.#options.pool.chunkSums(this.#name, startBytes / chunkSizeBytes, (endBytes - startBytes) / chunkSizeBytes, snapshot);
      // The volume or snapshot is open only under the region's lock, so that a change under the whole volume's lock
      // (a rollback, a shrink, a removal) never finds the resync holding it open.
      const device = snapshot === null ? this.#options.pool.openVolume(this.#name) : this.#options.pool.openSnapshot(this.#name, snapshot);
      const epoch = this.#options.epochOf(this.#name);
      let wantedChunks = 0;
      let differingChunks = 0;
      // Regions (from `first`) with a damaged chunk that no copy could repair: not copied, they stay dirty.
      const lostRegions = new Set<number>();
      const sendRange = async (offsetBytes: number, data: Buffer | null, lengthBytes: number): Promise<void> => {
        const request = { op: data === null ? SyncOp.trim : SyncOp.write, offsetBytes, lengthBytes, data, fua: false, noHole: false, volume: this.#name, epoch, session: link.session } as const;
        await link.send(PeerVerb.syncWrite, encodeSyncWrite(request));
        sentBytes += data?.length ?? 0;
      };
      try {
        for (const [fromRegion, toRegion] of differingRuns(wanted, new Uint32Array(wanted.length))) {
          const fromChunk = fromRegion * regionChunks;
          const toChunk = Math.min(ours.length, toRegion * regionChunks);
          wantedChunks += toChunk - fromChunk;
          for (const [runFrom, runTo] of differingRuns(ours.subarray(fromChunk, toChunk), theirs.subarray(fromChunk, toChunk))) {
            differingChunks += runTo - runFrom;
            const runEnd = startBytes + (fromChunk + runTo) * chunkSizeBytes;
            for (let at = startBytes + (fromChunk + runFrom) * chunkSizeBytes; at < runEnd;) {
              const [extent] = await device.blockStatus(at, runEnd - at) as [Extent];
              const lengthBytes = Math.min(extent.lengthBytes, runEnd - at);
              if (extent.zero) await sendRange(at, null, lengthBytes);
              else {
                const data = scratch.subarray(0, lengthBytes);
                const lost = await this.#readForResync(device, snapshot, at, data);
                // What is left between the lost chunks goes; the lost ones are named (#stopAtDamage) and not sent.
                let from = at;
                for (const chunk of lost) {
                  link.found.push({ snapshot, chunk });
                  lostRegions.add(Math.floor(chunk / regionChunks) - first);
                  const lostAt = chunk * chunkSizeBytes;
                  if (lostAt > from) await sendRange(from, data.subarray(from - at, lostAt - at), lostAt - from);
                  from = lostAt + chunkSizeBytes;
                }
                if (at + lengthBytes > from) await sendRange(from, data.subarray(from - at), at + lengthBytes - from);
              }
              at += lengthBytes;
            }
          }
        }
      } finally {
        await device.close();
      }
      link.resyncBytesTotal += sentBytes;
      if (snapshot === null) {
        link.resyncEqualBytesTotal += (wantedChunks - differingChunks) * chunkSizeBytes;
        wanted.forEach((copy, index) => {
          if (!copy || lostRegions.has(index)) return;
          link.copied.add(first + index);
          link.resync!.copiedBytes += syncRegionBytes;
        });
      }
    } finally {
      release?.();
    }
    // The rate cap, paid after the copy, outside the lock (a client's write to the regions does not wait for it); the
    // catch-up under the whole volume's lock is not capped, so that writes wait as little as they can.
    const waitMs = locked || sentBytes === 0 ? 0 : link.limiter?.settle(sentBytes, performance.now()) ?? 0;
    if (waitMs > 0) await link.pause(waitMs);
  }
}

/** A resync that stopped at blocks damaged here with no good copy (DAMAGE AT RESYNC): #run does not try again at once. */
class ResyncStoppedError extends ChunkdError {
  constructor(message: string) {
    super('EIO', message);
  }
}

/** Runs of damaged chunks, by snapshot (null: the live volume first), in bytes. */
function damagedRanges(found: ReadonlyArray<{ snapshot: string | null; chunk: number }>): DamagedRange[] {
  const sorted = [...new Map(found.map((entry) => [`${entry.snapshot ?? ''}\0${entry.chunk}`, entry])).values()]
    .sort((a, b) => (a.snapshot ?? '').localeCompare(b.snapshot ?? '') || a.chunk - b.chunk);
  const ranges: DamagedRange[] = [];
  for (const { snapshot, chunk } of sorted) {
    const last = ranges.at(-1);
    if (last !== undefined && last.snapshot === snapshot && last.offsetBytes + last.lengthBytes === chunk * chunkSizeBytes) last.lengthBytes += chunkSizeBytes;
    else ranges.push({ snapshot, offsetBytes: chunk * chunkSizeBytes, lengthBytes: chunkSizeBytes });
  }
  return ranges;
}

function chunkKeys(range: DamagedRange): string[] {
  return Array.from({ length: range.lengthBytes / chunkSizeBytes }, (_, index) => `${range.snapshot ?? ''}\0${range.offsetBytes / chunkSizeBytes + index}`);
}

/**
 * What a resync copies from: the live volume (snapshot null) at the size it had when the pass began, or one of its
 * snapshots (SNAPSHOTS AT RESYNC). Each step opens it under its range lock and closes it before the lock goes.
 */
interface CopySource {
  snapshot: string | null;
  sizeBytes: number;
}

const activityRegionsPerExtent = syncActivityExtentBytes / syncRegionBytes;
const regionChunks = syncRegionBytes / chunkSizeBytes;

/** Runs [from, to) of chunk indexes where `ours` and `theirs` differ (checksums, position by position). */
export function differingRuns(ours: Uint32Array, theirs: Uint32Array): Array<[number, number]> {
  assert(ours.length === theirs.length, 'checksums of the same chunks');
  const runs: Array<[number, number]> = [];
  for (let index = 0; index < ours.length; index++) {
    if (ours[index] === theirs[index]) continue;
    const last = runs[runs.length - 1];
    if (last !== undefined && last[1] === index) last[1] = index + 1;
    else runs.push([index, index + 1]);
  }
  return runs;
}

/**
 * Sorted `regions` as runs [first, end) of adjacent regions, each at most `batchRegions` long and within one
 * extent of `extentRegions` (one syncSums reply covers it): the steps of a resync.
 */
export function regionBatches(regions: readonly number[], batchRegions: number, extentRegions: number): Array<[number, number]> {
  const batches: Array<[number, number]> = [];
  for (const region of regions) {
    const last = batches[batches.length - 1];
    const sameExtent = last !== undefined && Math.floor(last[0] / extentRegions) === Math.floor(region / extentRegions);
    if (last !== undefined && last[1] === region && sameExtent && region - last[0] < batchRegions) last[1] = region + 1;
    else {
      assert(last === undefined || region >= last[1], 'regions sorted, each once');
      batches.push([region, region + 1]);
    }
  }
  return batches;
}

/** Changed chunk extents (a diff) as runs of regions [first, end), below the regions of `sizeBytes`. */
function regionRuns(extents: ChangedExtent[], sizeBytes: number): Array<[number, number]> {
  const limit = Math.ceil(sizeBytes / syncRegionBytes);
  const runs: Array<[number, number]> = [];
  for (const extent of extents) {
    const [first, end] = regionsOf(extent.virtualChunk * chunkSizeBytes, extent.chunkCount * chunkSizeBytes, syncRegionBytes);
    const last = runs[runs.length - 1];
    if (last !== undefined && last[1] >= first) last[1] = Math.max(last[1], Math.min(end, limit));
    else if (first < limit) runs.push([first, Math.min(end, limit)]);
  }
  return runs;
}

/** The chunks [first, end) that bytes [offsetBytes, offsetBytes + lengthBytes) touch: the range lock's unit. */
function chunksOf(offsetBytes: number, lengthBytes: number): [number, number] {
  return [Math.floor(offsetBytes / chunkSizeBytes), Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes)];
}

/**
 * A volume as its clients write it on a node with synchronous replication: reads go to the volume, writes, trims,
 * write zeroes and flushes through SyncReplication (replicated when the volume has synchronous replicas, at the
 * time of each request, so a link added while a client is connected applies to it).
 */
export class SyncDevice extends ForwardingDevice {
  readonly #sync: SyncReplication;

  constructor(inner: BlockDevice, sync: SyncReplication) {
    assert(!inner.readOnly, 'SyncDevice over a writable volume');
    super(inner);
    this.#sync = sync;
  }

  /**
   * A read that failed on a damaged block is repaired from a replica (SyncReplication.repairRead). One the volume
   * finished before it returned (block-device.ts's doneNow: a cached read) found no damage: it gives doneNow on, with
   * no promise of this layer's own.
   */
  override read(offsetBytes: number, target: Buffer): Promise<void> {
    let reading: Promise<void>;
    try {
      reading = this.inner.read(offsetBytes, target);
    } catch (error) {
      reading = Promise.reject(error);
    }
    if (reading === doneNow) return doneNow;
    return reading.then(undefined, (error: unknown) => {
      if (!(error instanceof DamagedDataError)) throw error;
      return this.#sync.repairRead(this.name, offsetBytes, target, error, this.inner);
    });
  }

  override write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const request = { op: SyncOp.write, offsetBytes, lengthBytes: data.length, data, fua: options?.fua === true, noHole: false };
    return this.#sync.replicate(this.name, request, () => this.inner.write(offsetBytes, data, options));
  }

  override trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    const request = { op: SyncOp.trim, offsetBytes, lengthBytes, data: null, fua: options?.fua === true, noHole: false };
    return this.#sync.replicate(this.name, request, () => this.inner.trim(offsetBytes, lengthBytes, options));
  }

  override writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    const request = { op: SyncOp.zeroes, offsetBytes, lengthBytes, data: null, fua: options?.fua === true, noHole: options?.noHole === true };
    return this.#sync.replicate(this.name, request, () => this.inner.writeZeroes(offsetBytes, lengthBytes, options));
  }

  override flush(): Promise<void> {
    return this.#sync.flush(this.name, () => this.inner.flush());
  }
}
