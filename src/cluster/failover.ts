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
import type { MoveRecord, ReplicaRecord, VolumeRecord } from './records.ts';

/** Volumes whose owner has no live registration (its lease expired), with the replicas that could take them over. */
export function orphanedVolumes(volumes: VolumeRecord[], aliveNodes: Set<string>, replicas: ReplicaRecord[]): Array<{ volume: VolumeRecord; candidates: ReplicaRecord[] }> {
  return volumes
    .filter((volume) => !aliveNodes.has(volume.owner))
    .map((volume) => ({
      volume,
      // A replica of this owner at this epoch, on a live node: what it holds is the owner's, replicated (a stale one
      // holds only an earlier owner's point: none of this owner's writes, so it is passed over).
      candidates: replicas.filter((replica) => replica.volume === volume.name && replica.owner === volume.owner && replica.ownerEpoch === volume.epoch && replica.stale !== true && aliveNodes.has(replica.node) && eligible(volume, replica.node)),
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
 * A move recorded from the volume's owner (now gone) at its epoch to a live node that is not among its replica
 * candidates: that node has taken the volume over already (the handoff's last step ran there) and records the move
 * itself, or it has no replicated point and drops the move once the owner has been gone a TTL (cluster.ts). Until
 * then no replica takes the volume over: the target may hold it newer than any of them. Its name, or null.
 */
export function pendingMoveTarget(volume: VolumeRecord, moves: MoveRecord[], aliveNodes: Set<string>, candidates: ReplicaRecord[]): string | null {
  const move = moves.find((candidate) => candidate.volume === volume.name && candidate.from === volume.owner && candidate.epoch === volume.epoch && candidate.refused === undefined);
  if (move === undefined || aliveNodes.has(volume.owner) || !aliveNodes.has(move.to) || candidates.some((candidate) => candidate.node === move.to)) return null;
  return move.to;
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

/**
 * How long each owner has been seen unregistered, continuously, by this node's monotonic clock. A failover waits
 * until the owner has been gone for a whole TTL: etcd before 3.4.28 and 3.5.11 (Debian's 3.4.23 among them) lets a
 * leader that was stalled and deposed revoke leases it believes expired (etcd-io/etcd#15247), so an owner's lease can
 * vanish just after a renewal etcd confirmed, while that owner still acknowledges writes for up to TTL - margin
 * after that renewal (npm run soak:cluster found it: an etcd member paused, then the owner's lease revoked 1.3 s
 * after its last confirmed renewal, and two owners acknowledging writes at once). The renewal is older than the
 * revocation, so a TTL after seeing the owner gone it has stopped; and an owner that comes back meanwhile
 * re-registers, and the takeover's transaction (its registration must still be absent) fails.
 * Observations further apart than `maxGapMs` (this node's own beats stalled) start the count again.
 */
export class AbsenceClock {
  readonly #since = new Map<string, number>();
  #lastAt: number | null = null;
  readonly maxGapMs: number;

  constructor(maxGapMs: number) {
    this.maxGapMs = maxGapMs;
  }

  /** The owners seen unregistered at `now` (monotonic ms); for each, how long it has been so without a gap. */
  observe(absent: readonly string[], now: number): Map<string, number> {
    if (this.#lastAt === null || now - this.#lastAt > this.maxGapMs) this.#since.clear();
    this.#lastAt = now;
    for (const node of [...this.#since.keys()]) if (!absent.includes(node)) this.#since.delete(node);
    for (const node of absent) if (!this.#since.has(node)) this.#since.set(node, now);
    return new Map([...this.#since].map(([node, since]) => [node, now - since]));
  }
}
