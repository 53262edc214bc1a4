// Handoff: the owner of a volume moves it to a node that holds its replica, in two phases as Flocker did, and
// keeps a read-only replica itself. Run on the owner (chunkd volume handoff VOL --to HOST:PORT):
//
//   1. increments while clients keep writing (replica sync), until what is left is small
//   2. freeze ─► final increment ─► takeOwnership ─► replica here
//      freeze: the role "handing-off" is written (durable), then the pool refuses writes with the protocol's
//      shutdown error (writes in flight finish, a commit), and NBD clients of the volume are disconnected;
//      final increment: a replication cycle sends what changed since the last point (the content is frozen);
//      takeOwnership: the peer checks it is complete at that snapshot and owns the volume at epoch + 1 (durable
//      there before it answers);
//      replica here: this node's role becomes a replica of the new owner at epoch + 1.
//
// Never two writable owners: this node stops writing (durably) before the peer may start, and the peer starts only
// once it holds everything this node acknowledged. A crash at any step is resolved when this node starts again,
// or when the handoff is run again (resolve()): it asks the peer. Peer owns it at epoch + 1: the handoff completed
// there, this node becomes its replica. Peer still a replica of this node: the handoff is rolled back, this node
// takes writes again. Peer unreachable: the volume stays frozen, since this node cannot know, and says so.
// The write pause clients see runs from the freeze to the peer's answer: the final increment is what it costs.
import { performance } from 'node:perf_hooks';
import { ChunkdError } from '../core/errors.ts';
import { crashPoint } from '../core/crash-points.ts';
import { formatSize } from '../core/units.ts';
import type { Pool } from '../store/pool.ts';
import { defaultEveryMs, type Replicator } from './replicator.ts';
import type { VolumeRoles } from './roles.ts';
import type { Log } from '../core/log.ts';

/** Phase 1 stops when an increment leaves at most this much changed (or after handoffIncrementsMax of them). */
const handoffRemainderBytes = 16 * 1024 * 1024;
const handoffIncrementsMax = 8;

export interface HandoffContext {
  pool: Pool;
  roles: VolumeRoles;
  replicator: Replicator;
  /** Ends the NBD connections to an export; returns how many. */
  /** Ends the NBD connections to `volume` (main thread and NBD threads); how many. */
  disconnect: (volume: string) => Promise<number>;
  /** This node's peer port as the new owner can reach it (to replicate back), or null when it cannot tell. */
  ownAddress: string | null;
  log: Log;
}

export interface HandoffResult {
  volume: string;
  to: string;
  epoch: number;
  /** Increments sent while clients kept writing, and the final one's bytes. */
  increments: number;
  finalBytes: number;
  /** Seconds writes were refused: from the freeze to the new owner's answer. */
  pauseSeconds: number;
  disconnected: number;
  /** An earlier, interrupted run had completed it already (this run only learned so). */
  completedEarlier: boolean;
}

/**
 * `cancelled` (volume move --cancel, in a cluster) is asked between steps: before each increment and the freeze,
 * and once more after the final increment, before takeOwnership (the point of no return): a handoff cancelled
 * after the freeze is rolled back here (writes resume). It then fails (EBUSY, "cancelled").
 */
export async function handoff(context: HandoffContext, volume: string, address: string, cancelled: () => boolean | Promise<boolean> = () => false): Promise<HandoffResult> {
  const { pool, roles, replicator, log } = context;
  const stopIfCancelled = async (): Promise<void> => {
    if (!(await cancelled())) return;
    const frozen = roles.handingOff(volume);
    if (frozen !== null) await rollBack(context, volume, frozen.epoch);
    log(`handoff of ${volume} to ${address} cancelled${frozen === null ? '' : ' after the freeze: rolled back, this node takes writes again'}`);
    throw ChunkdError.busy(`the handoff of ${volume} to ${address} was cancelled`);
  };
  pool.volumeInfo(volume);
  const pending = roles.handingOff(volume);
  if (pending !== null && pending.toAddress !== address) throw ChunkdError.busy(`volume ${volume} is being handed off to ${pending.to} at ${pending.toAddress}, not ${address}: run that handoff again to finish it`);
  if (pending === null) {
    roles.checkWritable(volume, 'a handoff');
    await replicator.ensureLink(volume, address, defaultEveryMs);
  } else {
    const outcome = await resolve(context, volume);
    // The earlier attempt had completed on the peer (its answer was lost): nothing is left to do.
    if (outcome === 'completed') return { volume, to: pending.to, epoch: pending.epoch + 1, increments: 0, finalBytes: 0, pauseSeconds: 0, disconnected: 0, completedEarlier: true };
    if (outcome === 'fenced') throw ChunkdError.readOnly(`volume ${volume} was taken over by ${pending.to} otherwise (a failover) while it was being handed off; this node is fenced`);
  }
  let increments = 0;
  if (roles.handingOff(volume) === null) {
    // Phase 1: increments while clients write, until the rest is small.
    for (;;) {
      await stopIfCancelled();
      await replicator.sync(volume, address);
      increments += 1;
      const remaining = (await replicator.statusOf(volume)).find((link) => link.peer === address)?.bytesPending ?? 0;
      if (remaining <= handoffRemainderBytes || increments >= handoffIncrementsMax) break;
    }
  }
  // Phase 2.
  const link = (await replicator.statusOf(volume)).find((status) => status.peer === address);
  const to = link?.peerName ?? pending?.to;
  if (to === undefined || to === null) throw ChunkdError.io(`the peer at ${address} has not answered yet`);
  const epoch = roles.epochOf(volume);
  await stopIfCancelled();
  const frozenAt = performance.now();
  await roles.set(volume, { role: 'handing-off', epoch, to, toAddress: address });
  await pool.blockWrites(volume, roles.writeRefusal(volume, 'a write'));
  const disconnected = await context.disconnect(volume);
  crashPoint('handoff:after-freeze');
  log(`handoff of ${volume} to ${to}: writes stopped (${disconnected} NBD connection(s) ended), sending the final increment`);
  const [final] = await replicator.sync(volume, address);
  crashPoint('handoff:after-final');
  const target = pool.snapshotInfo(volume, final!.snapshot);
  await stopIfCancelled();
  await replicator.takeOwnership(address, { volume, epoch: epoch + 1, snapshot: target.uuid, replicaBack: context.ownAddress });
  const pauseSeconds = (performance.now() - frozenAt) / 1000;
  crashPoint('handoff:after-taken');
  await becomeReplica(context, volume, to, epoch + 1);
  log(`handoff of ${volume} to ${to} done: it owns it at epoch ${epoch + 1}; writes were refused for ${pauseSeconds.toFixed(3)} s (final increment ${formatSize(final!.dataBytes)}); this node keeps a replica`);
  return { volume, to, epoch: epoch + 1, increments, finalBytes: final!.dataBytes, pauseSeconds, disconnected, completedEarlier: false };
}

/**
 * Settles a handoff a crash interrupted (see the top): 'completed', 'rolled-back', 'fenced' (the peer owns it, but
 * not from this node's last point: a failover), or 'frozen' when the peer cannot be asked (or has not taken the
 * volume and the caller goes on with it).
 */
export async function resolve(context: HandoffContext, volume: string): Promise<'completed' | 'rolled-back' | 'frozen' | 'fenced'> {
  const { roles, pool, replicator, log } = context;
  const pending = roles.handingOff(volume);
  if (pending === null) return 'rolled-back';
  let info;
  try {
    info = await replicator.askPeer(pending.toAddress, volume);
  } catch (error) {
    log(`handoff of ${volume} to ${pending.to} is in doubt: ${pending.toAddress} does not answer (${(error as Error).message}); writes stay refused until it does (run chunkd volume handoff ${volume} --to ${pending.toAddress} again)`, 'error');
    return 'frozen';
  }
  if (info.ownedEpoch !== null && info.ownedEpoch > pending.epoch) {
    // The peer owns it at a higher epoch: the handoff completed there, or (in a cluster) a failover promoted it
    // meanwhile, from an older point of this node's. Only a volume that is exactly one of the peer's points may
    // simply follow it; any other is fenced, and its rejoin (node.demote) keeps aside what the peer lacks.
    const theirs = new Set(info.snapshots.map((snapshot) => snapshot.uuid));
    const base = pool.listSnapshots(volume).reverse().find((snapshot) => theirs.has(snapshot.uuid)) ?? null;
    if (base !== null && (await pool.diff(volume, base.name, null)).length === 0) {
      await becomeReplica(context, volume, pending.to, info.ownedEpoch);
      log(`handoff of ${volume} to ${pending.to} had completed there (epoch ${info.ownedEpoch}); this node is its replica`);
      return 'completed';
    }
    await roles.set(volume, { role: 'fenced', epoch: pending.epoch, owner: pending.to, ownerEpoch: info.ownedEpoch, ownerAddress: pending.toAddress });
    await pool.blockWrites(volume, roles.writeRefusal(volume, 'a write'));
    log(`handoff of ${volume} to ${pending.to}: it owns the volume at epoch ${info.ownedEpoch}, but not from this node's last point (${base === null ? 'no snapshot in common' : `changed since ${base.name}`}): it was taken over otherwise (a failover); this node is fenced`, 'warn');
    return 'fenced';
  }
  if (info.replicaOf !== null && info.replicaOf.epoch === pending.epoch) {
    await rollBack(context, volume, pending.epoch);
    log(`handoff of ${volume} to ${pending.to} rolled back: it had not taken the volume; this node takes writes again`);
    return 'rolled-back';
  }
  log(`handoff of ${volume} to ${pending.to} is in doubt: the peer holds neither the volume nor its replica as expected; writes stay refused`, 'error');
  return 'frozen';
}

/** A handoff undone before the peer took the volume: this node owns it again at `epoch`, and takes writes. */
async function rollBack(context: HandoffContext, volume: string, epoch: number): Promise<void> {
  await (epoch === 1 ? context.roles.forget(volume) : context.roles.set(volume, { role: 'owner', epoch }));
  await context.pool.blockWrites(volume, null);
}

async function becomeReplica(context: HandoffContext, volume: string, owner: string, epoch: number): Promise<void> {
  await context.replicator.forgetVolume(volume);
  await context.roles.set(volume, { role: 'replica', owner, epoch });
  // The pool block stays, now with the replica's reason: clients that still hold the volume cannot write it.
  await context.pool.blockWrites(volume, context.roles.writeRefusal(volume, 'a write'));
}
