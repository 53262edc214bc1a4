// Who may write each volume of this pool, and at which ownership epoch: <pool>/replication/roles.json, written
// whole and durably (state-file.ts). A volume with no entry is this node's own, at epoch 1. The other roles:
//
//   owner    this node's own at a higher epoch: it was promoted from a replica (failover) or handed over here;
//            after a promotion, `keep` names the point it was promoted at, kept for the old owner to rejoin from
//   replica  a read-only copy of `owner`'s volume at `epoch`, fed only by streams from it (or a higher epoch);
//            `stalePoint`: set when it began to follow a new owner (a failover), the id of its newest point then,
//            which came from the previous owner: until a stream from the new owner replaces the role, that point
//            says nothing of the new owner's data (the cluster does not let it take the volume over)
//   fenced   this node owned it at `epoch`, and `owner` (at `ownerAddress`) has since become the owner at
//            `ownerEpoch`: writes are refused until the operator demotes it to a replica
//   handing-off  this node owns it at `epoch` and is handing it to `to` (handoff.ts): writes are refused (the
//            protocol's shutdown error) until the handoff completes (a replica here) or is rolled back
//
// Every front end and every control verb that changes a volume asks here first (node.ts); a fenced volume's
// writes are also refused in the pool itself (Pool.blockWrites), so clients connected before the fence get EPERM.
//
// Order that keeps it true across a crash: a replica's entry is written before a first stream creates the volume,
// so a replica never exists without it; a promotion writes its entry after the replica is rolled to its last
// complete point and before it takes a write. An entry whose volume is gone (a first stream refused, a volume
// removed) is dropped at load, so a volume made later under that name starts as this node's own.
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { readStateFile, writeStateFile } from './state-file.ts';

export type VolumeRole =
  | { role: 'owner'; epoch: number; keep?: KeptBase }
  | { role: 'replica'; owner: string; epoch: number; sync?: boolean; stalePoint?: string }
  | { role: 'fenced'; epoch: number; owner: string; ownerEpoch: number; ownerAddress: string | null }
  | { role: 'handing-off'; epoch: number; to: string; toAddress: string };

/**
 * On a node promoted from a replica: the replication point it was promoted at, kept (replicator.ts does not prune
 * it) until `until`, the previous owner, has rejoined as its replica and taken a point from it, since that point
 * is the one snapshot both are sure to hold (the old owner rolls back to it, then takes increments from it).
 */
export interface KeptBase {
  uuid: string;
  until: string;
}

export interface ReplicaRole {
  /** The node that owns the volume and sends it here (its certificate's name). */
  owner: string;
  /** The owner's ownership epoch, as last seen from it: a sender with a lower one is refused. */
  epoch: number;
}

export type FencedRole = Extract<VolumeRole, { role: 'fenced' }>;
export type HandoffRole = Extract<VolumeRole, { role: 'handing-off' }>;

export class VolumeRoles {
  readonly #file: string;
  readonly #roles = new Map<string, VolumeRole>();

  private constructor(file: string) {
    this.#file = file;
  }

  /** Reads the roles of the pool at `poolDirectory`, keeping only those whose volume `exists`. */
  static async load(poolDirectory: string, exists: (volume: string) => boolean): Promise<VolumeRoles> {
    const roles = new VolumeRoles(path.join(poolDirectory, 'replication', 'roles.json'));
    const value = (await readStateFile(roles.#file)) as { volumes?: Record<string, VolumeRole> } | null;
    let stale = false;
    for (const [volume, role] of Object.entries(value?.volumes ?? {})) {
      if (checkName(volume) !== null || !isRole(role)) throw ChunkdError.corrupt(`${roles.#file}: the entry for ${JSON.stringify(volume)} is not a volume role`);
      if (exists(volume)) roles.#roles.set(volume, role);
      else stale = true;
    }
    if (stale) await roles.#save();
    return roles;
  }

  /** The volume's role when it is a replica, or null. */
  replicaOf(volume: string): ReplicaRole | null {
    const role = this.#roles.get(volume);
    return role?.role === 'replica' ? { owner: role.owner, epoch: role.epoch } : null;
  }

  /** Of a replica that follows a new owner and has received nothing from it yet: its newest point then (from the previous owner), else null. */
  stalePoint(volume: string): string | null {
    const role = this.#roles.get(volume);
    return role?.role === 'replica' ? role.stalePoint ?? null : null;
  }

  /** Whether the volume is a synchronous replica (sync-replica-server.ts): written by its owner's syncWrite requests, not by streams. */
  isSyncReplica(volume: string): boolean {
    const role = this.#roles.get(volume);
    return role?.role === 'replica' && role.sync === true;
  }

  /** The fence on a volume this node owned before another node took it over, or null. */
  fenced(volume: string): FencedRole | null {
    const role = this.#roles.get(volume);
    return role?.role === 'fenced' ? role : null;
  }

  /** This node's ownership epoch of a volume it owns (or owned, when fenced): 1 unless promoted or handed over. */
  epochOf(volume: string): number {
    const role = this.#roles.get(volume);
    return role === undefined || role.role === 'replica' ? 1 : role.epoch;
  }

  /** The replication point a promoted owner keeps for its previous owner's rejoin (KeptBase), or null. */
  keptBase(volume: string): KeptBase | null {
    const role = this.#roles.get(volume);
    return role?.role === 'owner' ? role.keep ?? null : null;
  }

  /** The previous owner `node` has taken a point from this owner: the kept base is no longer needed for it. */
  async releaseBase(volume: string, node: string): Promise<void> {
    const role = this.#roles.get(volume);
    if (role?.role !== 'owner' || role.keep?.until !== node) return;
    await this.set(volume, { role: 'owner', epoch: role.epoch });
  }

  /** The handoff of a volume in progress on this node (it was the owner), or null. */
  handingOff(volume: string): HandoffRole | null {
    const role = this.#roles.get(volume);
    return role?.role === 'handing-off' ? role : null;
  }

  /** Volumes that are fenced, for the pool's write blocks at start. */
  fencedVolumes(): Array<[string, FencedRole]> {
    return [...this.#roles].flatMap(([volume, role]) => (role.role === 'fenced' ? [[volume, role] as [string, FencedRole]] : []));
  }

  /** Every volume this node may not write (replicas, fenced, being handed off): each gets a pool write block at start. */
  readOnlyVolumes(): string[] {
    return [...this.#roles].flatMap(([volume, role]) => (role.role === 'owner' ? [] : [volume]));
  }

  handoffs(): Array<[string, HandoffRole]> {
    return [...this.#roles].flatMap(([volume, role]) => (role.role === 'handing-off' ? [[volume, role] as [string, HandoffRole]] : []));
  }

  /** Refuses a change to a volume that is not this node's to change, with one line that says whose it is. */
  checkWritable(volume: string, what: string): void {
    const error = this.writeRefusal(volume, what);
    if (error !== null) throw error;
  }

  writeRefusal(volume: string, what: string): ChunkdError | null {
    const role = this.#roles.get(volume);
    if (role?.role === 'replica') {
      return ChunkdError.readOnly(`volume ${volume} is a read-only replica of node ${role.owner} (epoch ${role.epoch}); ${what} is refused: clone one of its snapshots to get a writable copy`);
    }
    if (role?.role === 'handing-off') {
      return new ChunkdError('ESHUTDOWN', `volume ${volume} is being handed off to node ${role.to} (${role.toAddress}); ${what} is refused: reconnect to the new owner`);
    }
    if (role?.role === 'fenced') {
      return ChunkdError.readOnly(`volume ${volume} is fenced: node ${role.owner}${role.ownerAddress === null ? '' : ` (${role.ownerAddress})`} owns it now at epoch ${role.ownerEpoch}, this node's epoch ${role.epoch} is over; ${what} is refused: make it a replica of the new owner with chunkd replica demote ${volume}`);
    }
    return null;
  }

  async set(volume: string, role: VolumeRole): Promise<void> {
    if (JSON.stringify(this.#roles.get(volume)) === JSON.stringify(role)) return;
    this.#roles.set(volume, role);
    await this.#save();
  }

  async forget(volume: string): Promise<void> {
    if (!this.#roles.delete(volume)) return;
    await this.#save();
  }

  /** Writes the roles as they are now (writeStateFile queues writes of one file, so two saves never mix). */
  #save(): Promise<void> {
    return writeStateFile(this.#file, { volumes: Object.fromEntries(this.#roles) });
  }
}

function isRole(value: unknown): value is VolumeRole {
  const role = value as Record<string, unknown> | null;
  if (typeof role !== 'object' || role === null || !Number.isSafeInteger(role.epoch) || (role.epoch as number) < 1) return false;
  const nodeName = (name: unknown): boolean => typeof name === 'string' && checkName(name, 'node') === null;
  if (role.role === 'owner') {
    const keep = role.keep as Record<string, unknown> | undefined;
    return keep === undefined || (typeof keep === 'object' && keep !== null && typeof keep.uuid === 'string' && nodeName(keep.until));
  }
  if (role.role === 'replica') return nodeName(role.owner) && (role.sync === undefined || typeof role.sync === 'boolean') && (role.stalePoint === undefined || typeof role.stalePoint === 'string');
  if (role.role === 'fenced') return nodeName(role.owner) && Number.isSafeInteger(role.ownerEpoch) && (role.ownerAddress === null || typeof role.ownerAddress === 'string');
  if (role.role === 'handing-off') return nodeName(role.to) && typeof role.toAddress === 'string';
  return false;
}
