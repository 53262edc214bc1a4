// Automatic failover, the pure part: which volumes have lost their owner, and which replica takes each over.
// The decision is only a proposal: the chosen node makes it true by one transaction on the volume's record that
// compares the revision it read and that the owner's registration is gone (cluster.ts), so of several nodes that
// decide at once on different views, at most one wins, and it raises the epoch by one.
import type { ReplicaRecord, VolumeRecord } from './records.ts';

/** Volumes whose owner has no live registration (its lease expired), with the replicas that could take them over. */
export function orphanedVolumes(volumes: VolumeRecord[], aliveNodes: Set<string>, replicas: ReplicaRecord[]): Array<{ volume: VolumeRecord; candidates: ReplicaRecord[] }> {
  return volumes
    .filter((volume) => !aliveNodes.has(volume.owner))
    .map((volume) => ({
      volume,
      // A replica of this owner at this epoch, on a live node: what it holds is the owner's, replicated.
      candidates: replicas.filter((replica) => replica.volume === volume.name && replica.owner === volume.owner && replica.ownerEpoch === volume.epoch && aliveNodes.has(replica.node)),
    }));
}

/** The replica with the newest replicated point; on a tie, the first node name (every node picks the same). */
export function chooseSuccessor(candidates: ReplicaRecord[]): ReplicaRecord | null {
  let best: ReplicaRecord | null = null;
  for (const candidate of candidates) {
    if (best === null || candidate.pointMs > best.pointMs || (candidate.pointMs === best.pointMs && candidate.node < best.node)) best = candidate;
  }
  return best;
}
