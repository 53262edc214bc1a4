// What the cluster's tests (test/helpers/cluster.ts) and its soak (bench/soak-cluster.ts) share to run chunkd nodes
// in a cluster on loopback: the arguments of a clustered `chunkd serve`, a node's roles file read from outside, and
// a poll until something holds. In src/testing because bench/ must not import test/.
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

export interface ClusterNodeSpec {
  name: string;
  /** etcd's client URLs, comma-separated (EtcdCluster.endpoints). */
  etcd: string;
  ttlMs: number;
  /** The peer port (127.0.0.1:PORT) and the node's certificate directory (`chunkd tls init DIR --node NAME`: DIR/NAME). */
  peer?: { address: string; tlsDir: string };
}

/** The arguments of `chunkd serve` (after --pool and the sockets, which startNode gives) for a node of the cluster. */
export function clusterNodeArgs(spec: ClusterNodeSpec): string[] {
  const peer = spec.peer === undefined ? [] : ['--peer-listen', spec.peer.address, '--tls-dir', spec.peer.tlsDir];
  return [...peer, '--etcd', spec.etcd, '--node-name', spec.name, '--lease-ttl', `${spec.ttlMs / 1000}s`];
}

export type PoolRoles = Record<string, { role: string; epoch: number; owner?: string; ownerEpoch?: number; keep?: { uuid: string; until: string } }>;

/** The roles file of the pool at `pool` (replication/roles.ts): volume -> role; written whole by rename, so read whole. */
export function rolesOf(pool: string): PoolRoles {
  const file = path.join(pool, 'replication', 'roles.json');
  return fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, 'utf8')).volumes : {};
}

/** Polls `probe` every 20 ms until it gives something other than null (or false); its value. */
export async function waitFor<T>(what: string, probe: () => Promise<T | null | false> | T | null | false, timeoutMs: number): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== null && value !== false) return value;
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
