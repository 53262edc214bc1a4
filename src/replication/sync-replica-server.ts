// The replica side of synchronous replicas (sync-replicas.ts has the design): the peer verbs syncOpen, syncWrite
// and syncFlush (payloads: sync-messages.ts). A synchronous replica is a volume with a replica role (roles.ts)
// marked sync; clients may read it (node.ts exports it read-only), only its owner writes it, through these verbs.
//
// Fencing: every request names the sender's ownership epoch. syncOpen records the owner and epoch durably before
// anything else (a replica never exists without its role), and moves a replica to a newer owner at a higher epoch;
// a write or flush is taken only from the owner at exactly the recorded epoch, so an owner that another node has
// replaced (a promotion or a handoff raised the epoch here) is refused with EPERM, and stops acknowledging writes.
import { assert } from '../core/assert.ts';
import { ForwardingDevice } from '../core/block-device.ts';
import { ChunkdError } from '../core/errors.ts';
import { PeerVerb } from '../peer/protocol.ts';
import type { PeerRequestContext, VerbHandler } from '../peer/server.ts';
import type { Pool } from '../store/pool.ts';
import type { Volume } from '../store/volume.ts';
import { encodeSyncSumsReply, fencedRefusalPrefix, parseSyncControl, parseSyncSums, parseSyncFlush, parseSyncOpen, parseSyncRead, parseSyncWrite, SyncOp, type SyncControlRequest, type SyncSumsRequest, type SyncWriteRequest } from './sync-messages.ts';
import type { VolumeRoles } from './roles.ts';
import type { Log } from '../core/log.ts';
import { formatSize } from '../core/units.ts';
import { chunkSizeBytes, syncPayloadsHeldBytes } from '../core/limits.ts';
import { SizedFreeList } from '../core/free-list.ts';

export class SyncReplicaServer {
  readonly #pool: Pool;
  readonly #roles: VolumeRoles;
  readonly #log: Log;
  /** One handle per replica volume, past its write block (pool.openVolumeForSync), kept while the volume exists. */
  readonly #handles = new Map<string, Volume>();
  /** Per volume, the session of the owner's newest syncOpen: writes of any other are refused (sync-messages.ts). */
  readonly #sessions = new Map<string, number>();
  #sessionsOpened = 0;
  /** syncWrite payloads applied, for reuse (takePayload). */
  readonly #payloads = new SizedFreeList(syncPayloadsHeldBytes);

  constructor(pool: Pool, roles: VolumeRoles, log: Log) {
    this.#pool = pool;
    this.#roles = roles;
    this.#log = log;
  }

  verbs(): Map<number, VerbHandler> {
    return new Map<number, VerbHandler>([
      [PeerVerb.syncOpen, (payload, context) => this.#open(payload, context)],
      // Once the write is applied (or refused) nothing holds its payload: it is kept for a later one (takePayload).
      [PeerVerb.syncWrite, (payload, context) => this.#write(parseSyncWrite(payload), context).finally(() => this.#payloads.put(payload))],
      [PeerVerb.syncFlush, (payload, context) => this.#flush(payload, context)],
      [PeerVerb.syncControl, (payload, context) => this.#control(parseSyncControl(payload), context)],
      [PeerVerb.syncSums, (payload, context) => this.#sums(parseSyncSums(payload), context)],
      [PeerVerb.syncRead, (payload, context) => this.#read(payload, context)],
      [PeerVerb.syncClose, (payload, context) => this.#close(payload, context)],
    ]);
  }

  /**
   * A buffer of `size` bytes that a syncWrite's payload had, for the peer server to gather the next bulk payload in
   * (PeerServerOptions.bulkPayload), or undefined. Plain memory since the stream's frames are (replica-server.ts): a
   * synchronous write over limits.inlineWriteBytesMax (1 MiB) is then copied by the chunk I/O worker that writes it.
   */
  takePayload(size: number): Buffer | undefined {
    return this.#payloads.take(size);
  }

  /** Drops the handle of a volume being removed (node.ts, before the pool removes it). */
  async forget(volume: string): Promise<void> {
    this.#sessions.delete(volume);
    await this.#closeHandle(volume);
  }

  async #open(payload: Buffer, context: PeerRequestContext): Promise<object> {
    const { volume, epoch, sizeBytes } = parseSyncOpen(payload);
    const peer = context.peerName;
    const role = this.#roles.replicaOf(volume);
    if (role === null) {
      if (this.#pool.hasVolume(volume)) throw ChunkdError.readOnly(`volume ${volume} on this node is its own (epoch ${this.#roles.epochOf(volume)}), not a replica: ${peer} cannot keep a synchronous replica in it`);
      // The role first: a crash between the two leaves a role without a volume, dropped at the next start.
      await this.#roles.set(volume, { role: 'replica', owner: peer, epoch, sync: true });
      await this.#pool.createVolume(volume, sizeBytes);
      await this.#pool.blockWrites(volume, this.#roles.writeRefusal(volume, 'a write'));
      this.#log(`volume ${volume} created as a synchronous replica of ${peer} (epoch ${epoch})`);
      return { session: this.#newSession(volume) };
    }
    if (epoch < role.epoch || (epoch === role.epoch && role.owner !== peer)) throw this.#fenced(volume, peer, epoch, role);
    await this.#roles.set(volume, { role: 'replica', owner: peer, epoch, sync: true });
    if (this.#pool.writeBlock(volume) === null) await this.#pool.blockWrites(volume, this.#roles.writeRefusal(volume, 'a write'));
    // The owner resized while this replica was out of sync: it takes the owner's size (its dirty map covers what
    // a grow adds); a shrink needs no reader of the replica's export.
    if (this.#pool.volumeInfo(volume).sizeBytes !== sizeBytes) await this.#resize(volume, sizeBytes);
    return { session: this.#newSession(volume) };
  }

  #newSession(volume: string): number {
    this.#sessionsOpened = (this.#sessionsOpened + 1) % 0x100000000;
    this.#sessions.set(volume, this.#sessionsOpened);
    return this.#sessionsOpened;
  }

  async #write(request: SyncWriteRequest, context: PeerRequestContext): Promise<object> {
    const handle = this.#handle(request.volume, context.peerName, request.epoch, request.session);
    if (request.offsetBytes + request.lengthBytes > handle.sizeBytes) {
      throw ChunkdError.invalid(`a synchronous write to ${request.volume} at ${request.offsetBytes} (${request.lengthBytes} bytes) ends past its ${handle.sizeBytes} bytes`);
    }
    // Applied in arrival order; the small plain writes one turn brought in (the owner sends a burst in one writev)
    // are written by the volume as one run and one pwrite (Volume.write's turn batch), where each alone would cost a
    // pwrite of its own, most of a replicated 4 KiB write's CPU here.
    const options = { fua: request.fua };
    if (request.op === SyncOp.write) await handle.write(request.offsetBytes, request.data!, options);
    else if (request.op === SyncOp.trim) await handle.trim(request.offsetBytes, request.lengthBytes, options);
    else await handle.writeZeroes(request.offsetBytes, request.lengthBytes, { ...options, noHole: request.noHole });
    return {};
  }

  async #flush(payload: Buffer, context: PeerRequestContext): Promise<object> {
    const { volume, epoch, session } = parseSyncFlush(payload);
    await this.#handle(volume, context.peerName, epoch, session).flush();
    return {};
  }

  /** The checksums of a range of chunks, for a resync to skip those that match the owner's. */
  async #sums(request: SyncSumsRequest, context: PeerRequestContext): Promise<object> {
    const handle = this.#handle(request.volume, context.peerName, request.epoch, request.session);
    const endChunk = Math.min(request.firstChunk + request.chunkCount, handle.sizeBytes / chunkSizeBytes);
    if (endChunk <= request.firstChunk) throw ChunkdError.invalid(`syncSums of ${request.volume} from chunk ${request.firstChunk}: past its ${handle.sizeBytes} bytes`);
    return encodeSyncSumsReply(await this.#pool.chunkSums(request.volume, request.firstChunk, endChunk - request.firstChunk));
  }

  /** A snapshot, resize or rollback from the owner, sent with no write in flight, or by a resync (sync-messages.ts). */
  async #control(request: SyncControlRequest, context: PeerRequestContext): Promise<object> {
    const { volume } = request;
    this.#handle(volume, context.peerName, request.epoch, request.session);
    if (request.action === 'resize') {
      await this.#resize(volume, request.sizeBytes);
      return {};
    }
    const held = this.#pool.findSnapshot(request.uuid, volume);
    if (request.action === 'snapshot') {
      if (held?.snapshot !== request.name) await this.#pool.createSnapshot(volume, request.name, request.uuid);
    } else if (request.action === 'remove-snapshot') {
      if (held !== null) await this.#pool.removeSnapshot(volume, held.snapshot);
    } else {
      if (held === null) throw ChunkdError.notFound(`the synchronous replica of ${volume} here lacks snapshot ${request.name} (id ${request.uuid}): it was out of sync when the owner took it`);
      await this.#closeHandle(volume);
      await this.#pool.rollbackVolume(volume, held.snapshot);
      this.#log(`volume ${volume} rolled back to ${held.snapshot} as its owner ${context.peerName} did`);
    }
    return {};
  }

  /**
   * The owner made the volume's replicas asynchronous (volume set --sync off): this one is an asynchronous replica of
   * it from now on, at the same epoch, fed by streams (the role without `sync`); the owner's syncWrites end here.
   */
  async #close(payload: Buffer, context: PeerRequestContext): Promise<object> {
    const { volume, epoch, session } = parseSyncFlush(payload);
    await this.#handle(volume, context.peerName, epoch, session).flush();
    this.#sessions.delete(volume);
    await this.#closeHandle(volume);
    await this.#roles.set(volume, { role: 'replica', owner: context.peerName, epoch });
    this.#log(`volume ${volume}: an asynchronous replica of ${context.peerName} (epoch ${epoch}) from now on, as its owner asked`);
    return {};
  }

  /** Grows or shrinks a replica to its owner's size (a shrink discards the tail, as the owner's did). */
  async #resize(volume: string, sizeBytes: number): Promise<void> {
    await this.#closeHandle(volume);
    const before = this.#pool.volumeInfo(volume).sizeBytes;
    await this.#pool.resizeVolume(volume, sizeBytes, true);
    this.#log(`volume ${volume} resized from ${formatSize(before)} to ${formatSize(sizeBytes)}, as its owner was`);
  }

  /** Closes the write handle (a shrink and a rollback need the volume closed); the next write opens it again. */
  async #closeHandle(volume: string): Promise<void> {
    const handle = this.#handles.get(volume);
    this.#handles.delete(volume);
    await handle?.close();
  }

  /**
   * The owner's copy of a block failed its checksum: the bytes here, which the read checks against their own
   * checksums (a block damaged here too fails with EIO, and the owner tries another replica). Asked only of its
   * owner at its epoch and session, as a write: another node's view of this volume is not a source of repairs.
   */
  async #read(payload: Buffer, context: PeerRequestContext): Promise<Buffer> {
    const request = parseSyncRead(payload);
    const handle = this.#handle(request.volume, context.peerName, request.epoch, request.session);
    if (request.offsetBytes + request.lengthBytes > handle.sizeBytes) {
      throw ChunkdError.invalid(`a synchronous read of ${request.volume} at ${request.offsetBytes} (${request.lengthBytes} bytes) ends past its ${handle.sizeBytes} bytes`);
    }
    const data = Buffer.alloc(request.lengthBytes);
    await handle.read(request.offsetBytes, data);
    return data;
  }

  /** The handle to write `volume` with, once `peer` at `epoch` is its owner; EPERM otherwise. */
  #handle(volume: string, peer: string, epoch: number, session: number): Volume {
    const role = this.#roles.replicaOf(volume);
    if (role === null || !this.#roles.isSyncReplica(volume) || !this.#pool.hasVolume(volume)) {
      throw ChunkdError.readOnly(`volume ${volume} on this node is not a synchronous replica of ${peer}${this.#pool.hasVolume(volume) ? '' : ' (it does not exist)'}; syncOpen first`);
    }
    if (role.owner !== peer || role.epoch !== epoch) throw this.#fenced(volume, peer, epoch, role);
    if (this.#sessions.get(volume) !== session) throw ChunkdError.io(`a synchronous write to ${volume} from an older connection of ${peer} (session ${session}) is refused: the owner has opened another since`);
    let handle = this.#handles.get(volume);
    if (handle === undefined) {
      handle = this.#pool.openVolumeForSync(volume);
      this.#handles.set(volume, handle);
    }
    return handle;
  }

  #fenced(volume: string, peer: string, epoch: number, role: { owner: string; epoch: number }): ChunkdError {
    if (epoch < role.epoch) this.#log(`refused a synchronous write to ${volume} from ${peer} at epoch ${epoch}: the replica follows ${role.owner} at epoch ${role.epoch}`, 'warn');
    return epoch < role.epoch
      ? ChunkdError.readOnly(`${fencedRefusalPrefix}${peer} writes ${volume} at ownership epoch ${epoch}, but this replica follows ${role.owner} at epoch ${role.epoch}`)
      : ChunkdError.readOnly(`volume ${volume} on this node is a replica of ${role.owner} at epoch ${role.epoch}, not of ${peer} at epoch ${epoch}${epoch > role.epoch ? ' (syncOpen first)' : ''}`);
  }
}

/**
 * A synchronous replica as its clients see it: the volume itself, read-only (the NBD edge refuses writes to a
 * read-only export). It is as current as the owner's acknowledged writes, not a frozen point as an asynchronous
 * replica's export is: a reader sees the owner's writes as they arrive.
 */
export class SyncReplicaExport extends ForwardingDevice {
  override get readOnly(): boolean {
    return true;
  }

  override write(): Promise<void> {
    return refuse();
  }

  override trim(): Promise<void> {
    return refuse();
  }

  override writeZeroes(): Promise<void> {
    return refuse();
  }

  override async flush(): Promise<void> {}
}

function refuse(): Promise<void> {
  assert(false, 'a write reached a synchronous replica\'s read-only export: the NBD edge must refuse it');
}
