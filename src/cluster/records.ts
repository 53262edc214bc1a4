// The cluster's keys in etcd and the records under them (JSON), checked when read: pure, no I/O. The design note
// (which key exists, who writes it, why two nodes never both own a volume) is at the top of cluster.ts.
import { ChunkdError } from '../core/errors.ts';
import { checkName } from '../core/names.ts';

/** Every key of the cluster is under this prefix: a layout change gets a new version, never a silent reinterpretation. */
export const keyPrefix = '/chunkd/v1/';

export const nodesPrefix = `${keyPrefix}nodes/`;
export const volumesPrefix = `${keyPrefix}volumes/`;

export function nodeKey(name: string): string {
  return `${nodesPrefix}${name}`;
}

export function volumeKey(name: string): string {
  return `${volumesPrefix}${name}`;
}

/** /chunkd/v1/nodes/NAME: written by node NAME only, under its lease (gone when the lease expires). */
export interface NodeRecord {
  name: string;
  /** The pool's identity: a node restarted on the same pool may take over its own registration. */
  poolId: string;
  /** HOST:PORT of its peer port, or null without one. */
  peer: string | null;
  capacityBytes: number;
  freeBytes: number;
  version: string;
  /** 'ok', or why not ('pool unhealthy: ...'). */
  health: string;
  /** ISO time of the last update of this record. */
  updatedAt: string;
}

/** /chunkd/v1/volumes/NAME: written by transactions only, each comparing the key's mod revision it read. */
export interface VolumeRecord {
  name: string;
  sizeBytes: number;
  /** The node that may write it, at `epoch`. */
  owner: string;
  /** The ownership epoch: raised by one at every change of owner (roles.ts holds the same number on the owner). */
  epoch: number;
  /** Nodes that hold read-only replicas. */
  replicas: string[];
  createdAt: string;
  /** A synchronous volume (volume create --sync): its replicas are synchronous links, and only an in-sync one may take it over. */
  sync?: true;
  /** Of a synchronous volume: its links' timeout (volume create --sync-timeout), for every owner's links. */
  syncTimeoutMs?: number;
  /**
   * Of a synchronous volume: the replicas the owner at `epoch` holds in sync (every write it acknowledged is on
   * each), written by that owner only (cluster.ts, recordInSync). Nodes not in it may lack acknowledged writes.
   */
  inSync?: { epoch: number; nodes: string[] };
}

export function parseNodeRecord(key: string, value: Buffer): NodeRecord {
  const record = parseJson(key, value) as Partial<NodeRecord>;
  const valid = typeof record.name === 'string' && checkName(record.name, 'node') === null && typeof record.poolId === 'string'
    && (record.peer === null || typeof record.peer === 'string') && Number.isSafeInteger(record.capacityBytes) && Number.isSafeInteger(record.freeBytes)
    && typeof record.version === 'string' && typeof record.health === 'string' && typeof record.updatedAt === 'string';
  if (!valid || `${nodesPrefix}${record.name}` !== key) throw ChunkdError.corrupt(`etcd key ${key} does not hold a node record: ${value.toString().slice(0, 200)}`);
  return record as NodeRecord;
}

export function parseVolumeRecord(key: string, value: Buffer): VolumeRecord {
  const record = parseJson(key, value) as Partial<VolumeRecord>;
  const valid = typeof record.name === 'string' && checkName(record.name) === null && Number.isSafeInteger(record.sizeBytes)
    && typeof record.owner === 'string' && checkName(record.owner, 'node') === null && Number.isSafeInteger(record.epoch) && record.epoch! >= 1
    && Array.isArray(record.replicas) && record.replicas.every((name) => typeof name === 'string') && typeof record.createdAt === 'string'
    && (record.sync === undefined || record.sync === true) && (record.syncTimeoutMs === undefined || Number.isSafeInteger(record.syncTimeoutMs))
    && (record.inSync === undefined || (typeof record.inSync === 'object' && record.inSync !== null && Number.isSafeInteger(record.inSync.epoch) && Array.isArray(record.inSync.nodes) && record.inSync.nodes.every((name) => typeof name === 'string')));
  if (!valid || `${volumesPrefix}${record.name}` !== key) throw ChunkdError.corrupt(`etcd key ${key} does not hold a volume record: ${value.toString().slice(0, 200)}`);
  return record as VolumeRecord;
}

function parseJson(key: string, value: Buffer): unknown {
  try {
    return JSON.parse(value.toString());
  } catch {
    throw ChunkdError.corrupt(`etcd key ${key} does not hold JSON: ${value.toString().slice(0, 200)}`);
  }
}

/**
 * Parses --etcd URL[,URL...]: http:// or https:// with a host and a port, nothing after it, all of one scheme. The
 * etcd client takes them as they are; a wrong one is refused here, before anything starts, with the one that is
 * wrong.
 */
export function parseEtcdEndpoints(text: string): string[] {
  const urls = text.split(',').map((item) => item.trim()).filter((item) => item !== '');
  if (urls.length === 0) throw ChunkdError.invalid('--etcd needs at least one URL, e.g. http://127.0.0.1:2379');
  for (const url of urls) {
    let parsed: URL | null = null;
    try {
      parsed = new URL(url);
    } catch {}
    if (parsed === null || (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') || parsed.hostname === '' || parsed.port === '' || (parsed.pathname !== '/' && parsed.pathname !== '') || parsed.search !== '') {
      throw ChunkdError.invalid(`invalid --etcd URL "${url}": use http://HOST:PORT or https://HOST:PORT, e.g. http://127.0.0.1:2379, several separated by commas`);
    }
  }
  const schemes = new Set(urls.map((url) => new URL(url).protocol));
  if (schemes.size > 1) throw ChunkdError.invalid(`--etcd "${text}": all http:// or all https://, not both`);
  return urls.map((url) => url.replace(/\/$/, ''));
}

export const replicasPrefix = `${keyPrefix}replicas/`;

/** /chunkd/v1/replicas/VOL/NODE: written by node NODE only, under its lease, while it holds a replica of VOL. */
export function replicaKey(volume: string, node: string): string {
  return `${replicasPrefix}${volume}/${node}`;
}

export interface ReplicaRecord {
  volume: string;
  node: string;
  /** The owner and its epoch this replica follows (roles.ts). */
  owner: string;
  ownerEpoch: number;
  /** Its newest complete replicated point: the snapshot's name (repl-<owner's ms>) and that time, for comparing replicas. */
  point: string;
  pointMs: number;
  /** A synchronous replica: it has no replicated points (point 'sync', pointMs 0); whether it holds every write is the volume record's inSync. */
  sync?: true;
  /** Its point came from an earlier owner (it follows this one since a failover, and has received nothing from it yet): no successor. */
  stale?: true;
}

export function parseReplicaRecord(key: string, value: Buffer): ReplicaRecord {
  const record = parseJson(key, value) as Partial<ReplicaRecord>;
  const valid = typeof record.volume === 'string' && checkName(record.volume) === null && typeof record.node === 'string' && checkName(record.node, 'node') === null
    && typeof record.owner === 'string' && Number.isSafeInteger(record.ownerEpoch) && typeof record.point === 'string' && Number.isSafeInteger(record.pointMs)
    && (record.sync === undefined || record.sync === true) && (record.stale === undefined || record.stale === true);
  if (!valid || replicaKey(record.volume!, record.node!) !== key) throw ChunkdError.corrupt(`etcd key ${key} does not hold a replica record: ${value.toString().slice(0, 200)}`);
  return record as ReplicaRecord;
}

export const movesPrefix = `${keyPrefix}operations/move/`;

/** /chunkd/v1/operations/move/VOL: a move asked for (chunkd volume move), until the volume's record names `to`. */
export function moveKey(volume: string): string {
  return `${movesPrefix}${volume}`;
}

export interface MoveRecord {
  volume: string;
  /** The owner and epoch the move starts from (the volume's record when it was asked for); `to` owns it at epoch + 1. */
  from: string;
  epoch: number;
  to: string;
  /** The node that recorded it, and when (ISO). */
  requestedBy: string;
  requestedAt: string;
  /** Why the owner refused it (a volume mounted there): the asking node reports it and deletes the move. */
  refused?: string;
  /**
   * chunkd volume move --cancel: the owner stops the handoff before the target takes the volume (rolled back, writes
   * resume) and deletes the move; past that point the move completes all the same.
   */
  cancelled?: { by: string; at: string };
}

export function parseMoveRecord(key: string, value: Buffer): MoveRecord {
  const record = parseJson(key, value) as Partial<MoveRecord>;
  const node = (name: unknown): boolean => typeof name === 'string' && checkName(name, 'node') === null;
  const valid = typeof record.volume === 'string' && checkName(record.volume) === null && node(record.from) && node(record.to) && record.from !== record.to
    && Number.isSafeInteger(record.epoch) && record.epoch! >= 1 && node(record.requestedBy) && typeof record.requestedAt === 'string'
    && (record.refused === undefined || typeof record.refused === 'string')
    && (record.cancelled === undefined || (typeof record.cancelled === 'object' && record.cancelled !== null && node(record.cancelled.by) && typeof record.cancelled.at === 'string'));
  if (!valid || moveKey(record.volume!) !== key) throw ChunkdError.corrupt(`etcd key ${key} does not hold a move record: ${value.toString().slice(0, 200)}`);
  return record as MoveRecord;
}
