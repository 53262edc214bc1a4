// Automatic failover, the pure part: which volumes have lost their owner, and which replica takes each over.
// The decision is only a proposal: the chosen node makes it true by one transaction on the volume's record that
// compares the revision it read and that the owner's registration is gone (cluster.ts), so of several nodes that
// decide at once on different views, at most one wins, and it raises the epoch by one.
//
// A synchronous volume (record.sync) is taken over only by a replica its owner recorded in sync at the owner's
// epoch (record.inSync): such a replica holds every write the owner acknowledged. Any other replica may lack some,
// so none is chosen: the volume waits for an in-sync replica (or its owner) to come back. The transaction's
// revision compare covers the in-sync set too (it is in the same record), so a set the owner changed meanwhile
// fails the takeover.
import type { ReplicaRecord, VolumeRecord } from './records.ts';

/** Volumes whose owner has no live registration (its lease expired), with the replicas that could take them over. */
export function orphanedVolumes(volumes: VolumeRecord[], aliveNodes: Set<string>, replicas: ReplicaRecord[]): Array<{ volume: VolumeRecord; candidates: ReplicaRecord[] }> {
  return volumes
    .filter((volume) => !aliveNodes.has(volume.owner))
    .map((volume) => ({
      volume,
      // A replica of this owner at this epoch, on a live node: what it holds is the owner's, replicated.
      candidates: replicas.filter((replica) => replica.volume === volume.name && replica.owner === volume.owner && replica.ownerEpoch === volume.epoch && aliveNodes.has(replica.node) && eligible(volume, replica.node)),
    }));
}

/** Whether `node` may take `volume` over: any replica of an asynchronous volume; one recorded in sync at the owner's epoch of a synchronous one. */
export function eligible(volume: VolumeRecord, node: string): boolean {
  if (volume.sync !== true) return true;
  return volume.inSync !== undefined && volume.inSync.epoch === volume.epoch && volume.inSync.nodes.includes(node);
}

/** The replica with the newest replicated point; on a tie, the first node name (every node picks the same). */
export function chooseSuccessor(candidates: ReplicaRecord[]): ReplicaRecord | null {
  let best: ReplicaRecord | null = null;
  for (const candidate of candidates) {
    if (best === null || candidate.pointMs > best.pointMs || (candidate.pointMs === best.pointMs && candidate.node < best.node)) best = candidate;
  }
  return best;
}

/**
 * Why a volume whose owner is down is not taken over (for cluster status), or null when it has an owner or a
 * candidate. A synchronous volume waits for a replica of its in-sync set.
 */
export function failoverWait(volume: VolumeRecord, aliveNodes: Set<string>, candidates: ReplicaRecord[]): string | null {
  if (aliveNodes.has(volume.owner) || candidates.length > 0) return null;
  if (volume.sync !== true) return `its owner ${volume.owner} has no live lease and no live replica follows it at epoch ${volume.epoch}`;
  const inSync = volume.inSync?.epoch === volume.epoch ? volume.inSync.nodes : [];
  return `its owner ${volume.owner} has no live lease, and no replica recorded in sync at epoch ${volume.epoch} is live${inSync.length > 0 ? ` (in sync: ${inSync.join(', ')})` : ' (none was in sync)'}: it waits for one of them, or its owner, to come back`;
}
