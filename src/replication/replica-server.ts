// The replica side of replication on the peer port: the verbs an owner uses to keep a read-only replica of one
// of its volumes on this node (their payloads: peer-messages.ts). The owner drives; this side answers what it
// holds, applies one stream per connection through the same StreamReceiver as `chunkd receive` (so a stream here
// is as atomic, checked and resumable as one from a file), and removes the replication snapshots the owner says
// it no longer needs.
//
// Who may send: a volume this node does not have is created as a replica of the peer that sends it (the role is
// recorded before the volume exists: roles.ts). A volume this node owns is never written by a peer. A replica
// takes streams only from its owner, or from a node with a higher ownership epoch (a handoff or a promotion made
// it the owner); a sender with a lower epoch than the replica has seen is refused (fenced).
import { ChunkdError } from '../core/errors.ts';
import { SizedFreeList } from '../core/free-list.ts';
import { receiveFrameBufferStepBytes, receiveFrameBuffersHeldBytes } from '../core/limits.ts';
import { PeerVerb } from '../peer/protocol.ts';
import type { PeerRequestContext, VerbHandler } from '../peer/server.ts';
import type { Pool } from '../store/pool.ts';
import { ByteFeed } from './byte-feed.ts';
import { crashPoint } from '../core/crash-points.ts';
import {
  jsonPayload, newestReplicationPoint, parsePrune, parseReceiveOpen, parseTakeOwnership, parseVolumeRequest, replicationSnapshotPrefix,
  type PruneReply, type ReplicaInfo, type TakeOwnershipRequest,
} from './peer-messages.ts';
import type { ReceiveResult, StreamReceiver } from './receive.ts';
import type { VolumeRoles } from './roles.ts';
import type { Log } from '../core/log.ts';

interface Session {
  volume: string;
  feed: ByteFeed;
  result: Promise<ReceiveResult>;
  /** Forgets the session's close handler: the owner keeps its connection for the next cycle's stream. */
  forget: () => void;
}

export class ReplicaServer {
  readonly #pool: Pool;
  readonly #receiver: StreamReceiver;
  readonly #roles: VolumeRoles;
  readonly #log: Log;
  /** The stream each connection carries, by connection id. */
  readonly #sessions = new Map<number, Session>();
  /** receiveData payloads' buffers, reused once the receiver has written their bytes. */
  readonly #frameBuffers = new SizedFreeList(receiveFrameBuffersHeldBytes);
  /** The memory of every frame buffer bulkPayload made: only those go back to #frameBuffers. */
  readonly #made = new WeakSet<ArrayBufferLike>();

  /** Called once this node owns a volume handed to it, with the old owner's address to replicate back to (or null). */
  readonly #onTaken: (volume: string, replicaBack: string | null) => Promise<void>;
  /** Called before a stream into a volume starts: a synchronous replica's write handle goes (a receive needs it closed). */
  readonly #beforeStream: (volume: string) => Promise<void>;

  constructor(pool: Pool, receiver: StreamReceiver, roles: VolumeRoles, log: Log, onTaken: (volume: string, replicaBack: string | null) => Promise<void>, beforeStream: (volume: string) => Promise<void> = async () => {}) {
    this.#pool = pool;
    this.#receiver = receiver;
    this.#roles = roles;
    this.#log = log;
    this.#onTaken = onTaken;
    this.#beforeStream = beforeStream;
  }

  /** The verbs, for the peer server. */
  verbs(): Map<number, VerbHandler> {
    return new Map<number, VerbHandler>([
      [PeerVerb.replicaInfo, (payload) => this.#info(parseVolumeRequest(payload, 'replicaInfo').volume)],
      [PeerVerb.receiveOpen, (payload, context) => this.#open(payload, context)],
      [PeerVerb.receiveData, (payload, context) => this.#data(payload, context)],
      [PeerVerb.receiveClose, (_payload, context) => this.#close(context)],
      [PeerVerb.receiveAbort, (payload, context) => this.#abort(parseVolumeRequest(payload, 'receiveAbort').volume, context.peerName)],
      [PeerVerb.replicaPrune, (payload, context) => this.#prune(payload, context.peerName)],
      [PeerVerb.takeOwnership, (payload, context) => this.#take(parseTakeOwnership(payload), context.peerName)],
    ]);
  }

  async #info(volume: string): Promise<ReplicaInfo> {
    // A stream whose connection just dropped may still be winding up (saving what arrived): the owner asks again
    // shortly, rather than take a new snapshot that this receive would refuse.
    if (this.#receiver.isActive(volume)) throw ChunkdError.busy(`a stream into ${volume} is still being applied here; try again shortly`);
    const exists = this.#pool.hasVolume(volume);
    const replicaOf = this.#roles.replicaOf(volume);
    return {
      volume,
      exists,
      replicaOf,
      ownedEpoch: exists && replicaOf === null ? this.#roles.epochOf(volume) : null,
      snapshots: exists ? this.#pool.listSnapshots(volume).map((snapshot) => ({ uuid: snapshot.uuid, name: snapshot.name })) : [],
      receive: exists ? await this.#receiver.interrupted(volume) : null,
    };
  }

  /**
   * Where the peer server gathers a receiveData payload (PeerServerOptions.bulkPayload): buffers the receiver handed
   * back when it could. Plain memory, not shared: a stream's records are written inline (a record is at most
   * limits.streamDataRecordBytesMax, and only writes larger than limits.inlineWriteBytesMax go to a chunk I/O worker,
   * which stages bytes not in shared memory), while V8 copies out of shared memory word by word (its relaxed
   * memmove): the receiver's gathering of small records into one run was 6% of its CPU so (BENCHMARKS.md, issue 14).
   */
  readonly bulkPayload = (size: number): Buffer => {
    // Rounded up to a step: taken only at its exact size, a frame buffer was almost never reused (each frame of
    // small records has a size of its own), and a fresh 1 MiB of zeroed shared memory per frame, with the major
    // collections that much external memory brings, cost more than the receive's own work (BENCHMARKS.md, issue 14).
    const wholeBytes = frameBufferBytes(size);
    let buffer = this.#frameBuffers.take(wholeBytes);
    if (buffer === undefined) {
      buffer = Buffer.allocUnsafeSlow(wholeBytes);
      this.#made.add(buffer.buffer);
    }
    return buffer.subarray(0, size);
  };

  /** A piece the receiver is done with: its whole frame buffer is kept for reuse when it is one bulkPayload made. */
  #recycle(piece: Buffer): void {
    const memory = piece.buffer;
    if (!this.#made.has(memory) || piece.byteOffset !== 0 || memory.byteLength !== frameBufferBytes(piece.length)) return;
    this.#frameBuffers.put(Buffer.from(memory));
  }

  async #open(payload: Buffer, context: PeerRequestContext): Promise<object> {
    const { volume, epoch, replace } = parseReceiveOpen(payload);
    if (this.#sessions.has(context.connection.id)) throw ChunkdError.busy('this connection carries a stream already; close it first');
    await this.#checkSender(volume, context.peerName, epoch);
    await this.#beforeStream(volume);
    if (replace === true) await this.#prepareReplace(volume, context.peerName, epoch);
    // Recorded before the stream may create the volume, so a replica never exists without its role.
    await this.#roles.set(volume, { role: 'replica', owner: context.peerName, epoch });
    const feed = new ByteFeed();
    const session: Session = { volume, feed, result: this.#receiver.receive(volume, feed, { recycle: (piece) => this.#recycle(piece), replace }), forget: () => {} };
    this.#sessions.set(context.connection.id, session);
    session.result.then(
      () => feed.close(ChunkdError.protocol(`the stream into ${volume} is complete; no more bytes belong to it`)),
      (error: unknown) => feed.close(error as Error),
    );
    session.forget = context.connection.onClose(() => {
      feed.fail(ChunkdError.io(`the connection from ${context.peerName} closed`));
      this.#sessions.delete(context.connection.id);
      // The outcome is logged by the receiver; nobody is left to tell it to.
      session.result.catch(() => {});
    });
    return {};
  }

  async #data(payload: Buffer, context: PeerRequestContext): Promise<object> {
    const session = this.#sessions.get(context.connection.id);
    if (session === undefined) throw ChunkdError.invalid('no stream is open on this connection (receiveOpen first)');
    await session.feed.push(payload);
    return {};
  }

  async #close(context: PeerRequestContext): Promise<ReceiveResult> {
    const session = this.#sessions.get(context.connection.id);
    if (session === undefined) throw ChunkdError.invalid('no stream is open on this connection');
    session.feed.end();
    try {
      const result = await session.result;
      // A replica's own writes are refused in the pool too (the receiver writes past that): set once, when a
      // first stream has made the volume; the node sets it at start for every replica it has.
      if (this.#pool.writeBlock(session.volume) === null) await this.#pool.blockWrites(session.volume, this.#roles.writeRefusal(session.volume, 'a write'));
      return result;
    } finally {
      this.#sessions.delete(context.connection.id);
      session.forget();
      if (!this.#pool.hasVolume(session.volume)) await this.#roles.forget(session.volume);
    }
  }

  async #abort(volume: string, peerName: string): Promise<object> {
    this.#checkOwner(volume, peerName);
    await this.#receiver.abort(volume);
    if (!this.#pool.hasVolume(volume)) await this.#roles.forget(volume);
    return {};
  }

  async #prune(payload: Buffer, peerName: string): Promise<PruneReply> {
    const { volume, keep } = parsePrune(payload);
    this.#checkOwner(volume, peerName);
    const reply: PruneReply = { removed: [], kept: [] };
    for (const snapshot of this.#pool.listSnapshots(volume)) {
      if (!snapshot.name.startsWith(replicationSnapshotPrefix) || keep.includes(snapshot.uuid)) continue;
      if (snapshot.openCount > 0) {
        reply.kept.push(snapshot.name);
        continue;
      }
      // Recycled, not punched: what it alone held is what the next streams' data displaced (pool.ts removeSnapshot).
      await this.#pool.removeSnapshot(volume, snapshot.name, { recycle: true });
      reply.removed.push(snapshot.name);
    }
    return reply;
  }

  /**
   * A replica that shares no snapshot with its owner (in a cluster, after a failover promoted another replica whose
   * points this one never got) takes a full stream in place (receiveOpen's `replace`; replicator.ts asks only in a
   * cluster, where a volume's name and its epochs are the cluster's): its replication points go now, the stream
   * empties the volume and fills it, and its other snapshots (an old owner's fenced- writes) stay. Only its owner
   * or a node at a higher epoch gets here (#checkSender); refused while a stream into it is interrupted, or while
   * a client reads it.
   */
  async #prepareReplace(volume: string, peer: string, epoch: number): Promise<void> {
    if (this.#roles.replicaOf(volume) === null || !this.#pool.hasVolume(volume)) return;
    if (this.#receiver.isActive(volume) || (await this.#receiver.interrupted(volume)) !== null) throw ChunkdError.busy(`a stream into ${volume} is not complete here; resume or abort it first`);
    const snapshots = this.#pool.listSnapshots(volume);
    const open = snapshots.filter((snapshot) => snapshot.openCount > 0).map((snapshot) => snapshot.name);
    if (open.length > 0 || this.#pool.volumeInfo(volume).openCount > 0) throw ChunkdError.busy(`replica ${volume} is read by clients here (${open.length > 0 ? open.join(', ') : 'the volume'}); it is resent once they disconnect`);
    const points = snapshots.filter((snapshot) => snapshot.name.startsWith(replicationSnapshotPrefix));
    for (const snapshot of points) await this.#pool.removeSnapshot(volume, snapshot.name);
    const kept = snapshots.filter((snapshot) => !snapshot.name.startsWith(replicationSnapshotPrefix)).map((snapshot) => snapshot.name);
    this.#log(`replica ${volume} resent whole by ${peer} (epoch ${epoch}): it shared no snapshot with ${peer}'s ${volume}; its points here (${points.map((snapshot) => snapshot.name).join(', ') || 'none'}) are given up${kept.length > 0 ? `, its other snapshots stay (${kept.join(', ')})` : ''}`, 'warn');
  }

  /**
   * A handoff's last step: the owner has stopped writing and sent its final increment, and asks this replica to
   * own the volume at the next epoch. Checked: the sender is the replica's owner, the epoch is the next one, and
   * the replica is complete at exactly the final increment's snapshot. The new role is durable before the answer;
   * asked again after that (the answer was lost), it answers the same.
   */
  async #take(request: TakeOwnershipRequest, peer: string): Promise<object> {
    const { volume, epoch, snapshot } = request;
    if (this.#pool.hasVolume(volume) && this.#roles.replicaOf(volume) === null && this.#roles.fenced(volume) === null && this.#roles.epochOf(volume) === epoch) {
      return { epoch };
    }
    const role = this.#roles.replicaOf(volume);
    if (role === null || role.owner !== peer) throw ChunkdError.readOnly(`volume ${volume} on this node is not a replica of ${peer}; it cannot be handed over here`);
    if (epoch !== role.epoch + 1) throw ChunkdError.invalid(`a handoff of ${volume} must move it to epoch ${role.epoch + 1}, not ${epoch}`);
    if (this.#receiver.isActive(volume) || (await this.#receiver.interrupted(volume)) !== null) throw ChunkdError.busy(`a stream into ${volume} is not complete here; send the final increment first`);
    const point = newestReplicationPoint(this.#pool.listSnapshots(volume));
    if (point?.uuid !== snapshot) throw ChunkdError.invalid(`the replica of ${volume} here is complete at ${point?.name ?? 'nothing'} (id ${point?.uuid ?? '-'}), not at the final increment ${snapshot}`);
    if ((await this.#pool.diff(volume, point.name, null)).length > 0) throw ChunkdError.invalid(`the replica of ${volume} here differs from its last point ${point.name}`);
    crashPoint('handoff:before-take');
    await this.#roles.set(volume, { role: 'owner', epoch });
    await this.#pool.blockWrites(volume, null);
    crashPoint('handoff:after-take');
    this.#log(`volume ${volume} handed over by ${peer}: this node owns it at epoch ${epoch}, from ${point.name}`);
    await this.#onTaken(volume, request.replicaBack);
    return { epoch };
  }

  /** May `peer` at `epoch` send a stream into `volume`? Throws EPERM saying why not. */
  async #checkSender(volume: string, peer: string, epoch: number): Promise<void> {
    const role = this.#roles.replicaOf(volume);
    if (role === null) {
      if (this.#pool.hasVolume(volume)) throw ChunkdError.readOnly(`volume ${volume} on this node is its own (epoch ${this.#roles.epochOf(volume)}), not a replica: ${peer} cannot replicate into it (remove it, or replicate under another name)`);
      return;
    }
    if (epoch < role.epoch) {
      this.#log(`refused a stream into ${volume} from ${peer} at epoch ${epoch}: the replica has seen epoch ${role.epoch} (owner ${role.owner})`, 'warn');
      throw ChunkdError.readOnly(`fenced: ${peer} sends ${volume} at ownership epoch ${epoch}, but this replica follows ${role.owner} at epoch ${role.epoch}`);
    }
    if (role.owner !== peer && epoch === role.epoch) {
      throw ChunkdError.readOnly(`volume ${volume} on this node is a replica of ${role.owner} (epoch ${role.epoch}), not of ${peer}`);
    }
  }

  #checkOwner(volume: string, peer: string): void {
    const role = this.#roles.replicaOf(volume);
    if (role === null || role.owner !== peer) throw ChunkdError.readOnly(`volume ${volume} on this node is not a replica of ${peer}`);
  }
}

/** The size of the frame buffer a payload of `size` bytes is gathered in: rounded up to receiveFrameBufferStepBytes. */
function frameBufferBytes(size: number): number {
  return Math.max(1, Math.ceil(size / receiveFrameBufferStepBytes)) * receiveFrameBufferStepBytes;
}
