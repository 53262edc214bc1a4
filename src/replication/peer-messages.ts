// The payloads of replication's peer verbs (peer/protocol.ts numbers them), checked here once, at the edge:
// the replica side (replica-server.ts) parses requests, the owner side (replicator.ts) parses replies, and both
// assert what they got. Pure: bytes in, values out.
//
//   replicaInfo   {volume}                 -> what the node holds of it: whether it exists, its role (a replica
//                                             of whom, or its own, at which ownership epoch), its snapshots, and an
//                                             interrupted receive (so the owner resumes it, never starts over)
//   receiveOpen   {volume, epoch[, replace]}
//                                          -> {}: the connection now carries one stream into the volume; `replace`
//                                             (in a cluster): a replica that shares no snapshot with its owner (a
//                                             failover promoted another replica) takes a full stream in place: its
//                                             replication points go, its other snapshots stay
//   receiveData   raw stream bytes         -> {} once the receiver has taken them (that is the backpressure)
//   receiveClose  {}                       -> the receive's result, once the END record is applied and checked
//   receiveAbort  {volume}                 -> {}: an interrupted receive the owner cannot resume is discarded
//   replicaPrune  {volume, keep: [uuid]}   -> {removed, kept}: replication snapshots other than `keep` removed
//   takeOwnership {volume, epoch, snapshot, replicaBack}
//                                          -> {epoch}: a handoff's last step (handoff.ts): the replica, complete at
//                                             `snapshot`, becomes the owner at `epoch` (and replicates back to
//                                             `replicaBack`, HOST:PORT of the old owner, when given)
import { ChunkdError } from '../core/errors.ts';
import { parseHostPort } from '../core/host-port.ts';
import { checkName } from '../core/names.ts';
import { parseJsonObject } from '../peer/protocol.ts';
import { isSnapshotUuid } from '../store/metadata.ts';
import type { ReceiveResult } from './receive.ts';

/** Snapshots a replicator takes are named `repl-<milliseconds since 1970>`; only these are pruned. */
export const replicationSnapshotPrefix = 'repl-';

/** The most snapshot ids a replicaInfo reply or a prune request lists (a volume's snapshot cap is lower). */
const snapshotListMax = 1024;

export interface VolumeRequest {
  volume: string;
}

export interface ReceiveOpenRequest {
  volume: string;
  /** The sender's ownership epoch of the volume: a replica refuses a sender older than what it has seen. */
  epoch: number;
  /** A full stream replaces the replica in place (its replication points go, its other snapshots stay). */
  replace?: boolean;
}

export interface PruneRequest {
  volume: string;
  keep: string[];
}

export interface InterruptedReceive {
  base: string | null;
  target: string;
  offsetBytes: number;
}

export interface ReplicaInfo {
  volume: string;
  exists: boolean;
  /** null: the node does not know the volume as a replica (it owns a volume of that name, or has none). */
  replicaOf: { owner: string; epoch: number } | null;
  /** The answering node's ownership epoch when the volume is its own (fenced included), else null. */
  ownedEpoch: number | null;
  snapshots: Array<{ uuid: string; name: string }>;
  receive: InterruptedReceive | null;
}

export interface PruneReply {
  removed: string[];
  /** Replication snapshots that stay because a client has them open. */
  kept: string[];
}

export function parseVolumeRequest(payload: Buffer, what: string): VolumeRequest {
  const value = parseJsonObject(payload, what);
  return { volume: volumeField(value.volume, what) };
}

export function parseReceiveOpen(payload: Buffer): ReceiveOpenRequest {
  const value = parseJsonObject(payload, 'receiveOpen');
  if (value.replace !== undefined && typeof value.replace !== 'boolean') throw ChunkdError.protocol('receiveOpen: replace is true or false');
  return { volume: volumeField(value.volume, 'receiveOpen'), epoch: epochField(value.epoch, 'receiveOpen'), ...(value.replace === true ? { replace: true } : {}) };
}

export function parsePrune(payload: Buffer): PruneRequest {
  const value = parseJsonObject(payload, 'replicaPrune');
  if (!Array.isArray(value.keep) || value.keep.length > snapshotListMax || !value.keep.every(isSnapshotUuid)) {
    throw ChunkdError.protocol(`replicaPrune needs keep: a list of at most ${snapshotListMax} snapshot ids`);
  }
  return { volume: volumeField(value.volume, 'replicaPrune'), keep: value.keep as string[] };
}

export function parseReplicaInfo(payload: Buffer): ReplicaInfo {
  const value = parseJsonObject(payload, 'replicaInfo reply');
  const what = 'replicaInfo reply';
  if (typeof value.exists !== 'boolean') throw ChunkdError.protocol(`${what} without exists`);
  let replicaOf: ReplicaInfo['replicaOf'] = null;
  if (value.replicaOf !== null) {
    const of = value.replicaOf as Record<string, unknown> | undefined;
    if (typeof of !== 'object' || of === null || typeof of.owner !== 'string' || checkName(of.owner, 'node') !== null) throw ChunkdError.protocol(`${what}: replicaOf needs an owner node name`);
    replicaOf = { owner: of.owner, epoch: epochField(of.epoch, what) };
  }
  if (!Array.isArray(value.snapshots) || value.snapshots.length > snapshotListMax) throw ChunkdError.protocol(`${what} without a list of snapshots`);
  const snapshots = value.snapshots.map((item: unknown) => {
    const snapshot = item as Record<string, unknown> | null;
    if (typeof snapshot !== 'object' || snapshot === null || !isSnapshotUuid(snapshot.uuid) || typeof snapshot.name !== 'string' || checkName(snapshot.name, 'snapshot') !== null) {
      throw ChunkdError.protocol(`${what}: a snapshot needs a uuid and a name`);
    }
    return { uuid: snapshot.uuid as string, name: snapshot.name };
  });
  let receive: InterruptedReceive | null = null;
  if (value.receive !== null) {
    const r = value.receive as Record<string, unknown> | undefined;
    if (typeof r !== 'object' || r === null || !isSnapshotUuid(r.target) || (r.base !== null && !isSnapshotUuid(r.base)) || !Number.isSafeInteger(r.offsetBytes) || (r.offsetBytes as number) < 0) {
      throw ChunkdError.protocol(`${what}: receive needs base, target and offsetBytes`);
    }
    receive = { base: r.base as string | null, target: r.target as string, offsetBytes: r.offsetBytes as number };
  }
  const ownedEpoch = value.ownedEpoch === null ? null : epochField(value.ownedEpoch, what);
  return { volume: volumeField(value.volume, what), exists: value.exists, replicaOf, ownedEpoch, snapshots, receive };
}

export function parsePruneReply(payload: Buffer): PruneReply {
  const value = parseJsonObject(payload, 'replicaPrune reply');
  const names = (list: unknown): string[] => {
    if (!Array.isArray(list) || list.length > snapshotListMax || !list.every((name) => typeof name === 'string')) throw ChunkdError.protocol('replicaPrune reply needs lists of names');
    return list as string[];
  };
  return { removed: names(value.removed), kept: names(value.kept) };
}

export function parseReceiveResult(payload: Buffer): ReceiveResult {
  const value = parseJsonObject(payload, 'receiveClose reply');
  const counts = ['resumedFromBytes', 'streamBytes', 'dataBytes'] as const;
  if (typeof value.volume !== 'string' || typeof value.snapshot !== 'string' || !isSnapshotUuid(value.uuid) || typeof value.full !== 'boolean' ||
      counts.some((key) => !Number.isSafeInteger(value[key]))) {
    throw ChunkdError.protocol('receiveClose reply is not a receive result');
  }
  return value as unknown as ReceiveResult;
}

export interface TakeOwnershipRequest {
  volume: string;
  epoch: number;
  /** The id of the final increment's snapshot: the replica must be complete at exactly that point. */
  snapshot: string;
  replicaBack: string | null;
}

export function parseTakeOwnership(payload: Buffer): TakeOwnershipRequest {
  const value = parseJsonObject(payload, 'takeOwnership');
  if (!isSnapshotUuid(value.snapshot)) throw ChunkdError.protocol('takeOwnership needs the snapshot id the replica must hold');
  if (value.replicaBack !== null && parseHostPort(value.replicaBack) === null) {
    throw ChunkdError.protocol('takeOwnership: replicaBack is HOST:PORT or null');
  }
  return { volume: volumeField(value.volume, 'takeOwnership'), epoch: epochField(value.epoch, 'takeOwnership'), snapshot: value.snapshot, replicaBack: value.replicaBack as string | null };
}

/** A replica's last complete replicated point: its newest replication snapshot (others may be kept there too). */
export function newestReplicationPoint<T extends { name: string }>(snapshots: T[]): T | null {
  const points = snapshots.filter((snapshot) => snapshot.name.startsWith(replicationSnapshotPrefix));
  return points[points.length - 1] ?? null;
}

export function jsonPayload(value: object): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

function volumeField(value: unknown, what: string): string {
  if (typeof value !== 'string' || checkName(value) !== null) throw ChunkdError.protocol(`${what} needs a valid volume name`);
  return value;
}

function epochField(value: unknown, what: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) throw ChunkdError.protocol(`${what} needs an epoch, a whole number from 1`);
  return value;
}
