// The cluster's volumes as `chunkd volume list` shows them on a clustered node, the pure part: each volume's record
// with its owner's liveness, its replicas (named in the record, or publishing a replica that follows the current
// owner and epoch) with whether each is live and its newest replicated point, and a move in progress.
import { failoverWait, orphanedVolumes, pendingMoveTarget } from './failover.ts';
import type { MoveRecord, ReplicaRecord, VolumeRecord } from './records.ts';

export interface ClusterVolume {
  name: string;
  sizeBytes: number;
  owner: string;
  /** The owner is registered under a live lease. */
  ownerAlive: boolean;
  epoch: number;
  createdAt: string;
  /**
   * live: the node publishes, under its live lease, a replica following this owner at this epoch; point: its newest
   * complete replicated point (null: none published), pointAgeMs: how old that point is by the owner's clock.
   */
  replicas: Array<{ node: string; live: boolean; point: string | null; pointAgeMs: number | null }>;
  /** A `chunkd volume move` recorded in etcd and not finished. */
  move: { to: string; requestedBy: string; requestedAt: string } | null;
  /** A synchronous volume (volume create --sync), and the replicas its owner records in sync at its epoch (null: not synchronous). */
  sync: boolean;
  inSync: string[] | null;
  /** Why a volume whose owner is down is not taken over (failover.ts), or null. */
  waiting: string | null;
}

export function describeVolumes(volumes: VolumeRecord[], replicas: ReplicaRecord[], aliveNodes: Set<string>, moves: MoveRecord[], nowMs: number): ClusterVolume[] {
  const orphans = new Map(orphanedVolumes(volumes, aliveNodes, replicas).map(({ volume, candidates }) => {
    const target = pendingMoveTarget(volume, moves, aliveNodes, candidates);
    return [volume.name, target !== null ? `its owner ${volume.owner} has no live lease while moving it to ${target}: ${target} records the move, or drops it, before a replica takes it over` : failoverWait(volume, aliveNodes, candidates)];
  }));
  return volumes
    .map((volume) => {
      const following = new Map(replicas.filter((replica) => replica.volume === volume.name && replica.owner === volume.owner && replica.ownerEpoch === volume.epoch && aliveNodes.has(replica.node)).map((replica) => [replica.node, replica]));
      const names = [...new Set([...volume.replicas, ...following.keys()])].filter((node) => node !== volume.owner).sort();
      const move = moves.find((candidate) => candidate.volume === volume.name && candidate.from === volume.owner && candidate.epoch === volume.epoch && candidate.refused === undefined);
      return {
        name: volume.name,
        sizeBytes: volume.sizeBytes,
        owner: volume.owner,
        ownerAlive: aliveNodes.has(volume.owner),
        epoch: volume.epoch,
        createdAt: volume.createdAt,
        replicas: names.map((node) => {
          const replica = following.get(node);
          return { node, live: replica !== undefined, point: replica?.point ?? null, pointAgeMs: replica === undefined ? null : Math.max(0, nowMs - replica.pointMs) };
        }),
        move: move === undefined ? null : { to: move.to, requestedBy: move.requestedBy, requestedAt: move.requestedAt },
        sync: volume.sync === true,
        inSync: volume.sync !== true ? null : volume.inSync?.epoch === volume.epoch ? volume.inSync.nodes : [],
        waiting: orphans.get(volume.name) ?? null,
      };
    })
    .sort((a, b) => a.name.localeCompare(b.name));
}
