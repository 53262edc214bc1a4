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
import { PeerVerb } from '../peer/protocol.ts';
import type { PeerRequestContext, VerbHandler } from '../peer/server.ts';
import type { Pool } from '../store/pool.ts';
import { ByteFeed } from './byte-feed.ts';
import {
  jsonPayload, parsePrune, parseReceiveOpen, parseVolumeRequest, replicationSnapshotPrefix, type PruneReply, type ReplicaInfo,
} from './peer-messages.ts';
import type { ReceiveResult, StreamReceiver } from './receive.ts';
import type { VolumeRoles } from './roles.ts';

interface Session {
  volume: string;
  feed: ByteFeed;
  result: Promise<ReceiveResult>;
}

export class ReplicaServer {
  readonly #pool: Pool;
  readonly #receiver: StreamReceiver;
  readonly #roles: VolumeRoles;
  readonly #log: (line: string) => void;
  /** The stream each connection carries, by connection id. */
  readonly #sessions = new Map<number, Session>();

  constructor(pool: Pool, receiver: StreamReceiver, roles: VolumeRoles, log: (line: string) => void) {
    this.#pool = pool;
    this.#receiver = receiver;
    this.#roles = roles;
    this.#log = log;
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
    ]);
  }

  async #info(volume: string): Promise<ReplicaInfo> {
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

  async #open(payload: Buffer, context: PeerRequestContext): Promise<object> {
    const { volume, epoch } = parseReceiveOpen(payload);
    if (this.#sessions.has(context.connection.id)) throw ChunkdError.busy('this connection carries a stream already; close it first');
    await this.#checkSender(volume, context.peerName, epoch);
    // Recorded before the stream may create the volume, so a replica never exists without its role.
    await this.#roles.set(volume, { role: 'replica', owner: context.peerName, epoch });
    const feed = new ByteFeed();
    const session: Session = { volume, feed, result: this.#receiver.receive(volume, feed) };
    this.#sessions.set(context.connection.id, session);
    session.result.then(
      () => feed.close(ChunkdError.protocol(`the stream into ${volume} is complete; no more bytes belong to it`)),
      (error: unknown) => feed.close(error as Error),
    );
    context.connection.onClose(() => {
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
      return await session.result;
    } finally {
      this.#sessions.delete(context.connection.id);
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
      await this.#pool.removeSnapshot(volume, snapshot.name);
      reply.removed.push(snapshot.name);
    }
    return reply;
  }

  /** May `peer` at `epoch` send a stream into `volume`? Throws EPERM saying why not. */
  async #checkSender(volume: string, peer: string, epoch: number): Promise<void> {
    const role = this.#roles.replicaOf(volume);
    if (role === null) {
      if (this.#pool.hasVolume(volume)) throw ChunkdError.readOnly(`volume ${volume} on this node is its own (epoch ${this.#roles.epochOf(volume)}), not a replica: ${peer} cannot replicate into it (remove it, or replicate under another name)`);
      return;
    }
    if (epoch < role.epoch) {
      this.#log(`refused a stream into ${volume} from ${peer} at epoch ${epoch}: the replica has seen epoch ${role.epoch} (owner ${role.owner})`);
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
