// Which volumes of this pool are read-only replicas of another node's, and at which ownership epoch:
// <pool>/replication/roles.json, written whole and durably (state-file.ts). A volume with no entry is this node's
// own, at epoch 1. Every front end and every control verb that changes a volume asks here first (node.ts), so a
// replica is never written but by the stream that feeds it.
//
// Order that keeps it true across a crash: the entry is written before a first stream creates the volume, so a
// replica volume never exists without it. An entry whose volume is gone (the first stream was refused, or the
// replica was removed) is dropped at load, so a volume made later under that name is not taken for a replica.
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';
import { readStateFile, writeStateFile } from './state-file.ts';

export interface ReplicaRole {
  /** The node that owns the volume and sends it here (its certificate's name). */
  owner: string;
  /** The owner's ownership epoch, as last seen from it: a sender with a lower one is refused. */
  epoch: number;
}

export class VolumeRoles {
  readonly #file: string;
  #replicas = new Map<string, ReplicaRole>();

  private constructor(file: string) {
    this.#file = file;
  }

  /** Reads the roles of the pool at `poolDirectory`, keeping only those whose volume `exists`. */
  static async load(poolDirectory: string, exists: (volume: string) => boolean): Promise<VolumeRoles> {
    const roles = new VolumeRoles(path.join(poolDirectory, 'replication', 'roles.json'));
    const value = (await readStateFile(roles.#file)) as { replicas?: Record<string, ReplicaRole> } | null;
    let stale = false;
    for (const [volume, role] of Object.entries(value?.replicas ?? {})) {
      if (checkName(volume) !== null || typeof role?.owner !== 'string' || checkName(role.owner, 'node') !== null || !Number.isSafeInteger(role.epoch)) {
        throw ChunkdError.corrupt(`${roles.#file}: the entry for ${JSON.stringify(volume)} is not a replica role`);
      }
      if (exists(volume)) roles.#replicas.set(volume, { owner: role.owner, epoch: role.epoch });
      else stale = true;
    }
    if (stale) await roles.#save();
    return roles;
  }

  /** The volume's role when it is a replica, or null when it is this node's own. */
  replicaOf(volume: string): ReplicaRole | null {
    return this.#replicas.get(volume) ?? null;
  }

  /** Refuses a change to a replica with one line that says what it is. */
  checkWritable(volume: string, what: string): void {
    const role = this.#replicas.get(volume);
    if (role !== undefined) {
      throw ChunkdError.readOnly(`volume ${volume} is a read-only replica of node ${role.owner} (epoch ${role.epoch}); ${what} is refused: clone one of its snapshots to get a writable copy`);
    }
  }

  async setReplica(volume: string, role: ReplicaRole): Promise<void> {
    const current = this.#replicas.get(volume);
    if (current?.owner === role.owner && current.epoch === role.epoch) return;
    this.#replicas.set(volume, role);
    await this.#save();
  }

  async forget(volume: string): Promise<void> {
    if (!this.#replicas.delete(volume)) return;
    await this.#save();
  }

  async #save(): Promise<void> {
    await writeStateFile(this.#file, { replicas: Object.fromEntries(this.#replicas) });
  }
}
