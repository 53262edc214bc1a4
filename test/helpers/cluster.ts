// The cluster tests' setup, shared: a real etcd (one or three members), certificates for the named nodes (peer
// ports with mutual TLS), a scratch directory, and nodes started in the cluster with a short lease TTL, each on the
// same peer port across restarts. clusterFixture() registers the file's beforeAll/afterAll hooks itself.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { Etcd3 } from 'etcd3';
import { clusterNodeArgs, rolesOf, waitFor, type PoolRoles } from '../../src/testing/cluster-node.ts';
import { haveEtcd, startEtcd, type EtcdCluster } from '../../src/testing/etcd-process.ts';
import { chunkdBin, haveTool, makeTempDir, mustRun, stablePort, startNode, type RunningNode } from './node-process.ts';
import assert from 'node:assert/strict';
import { parseVolumeRecord, volumeKey, type VolumeRecord } from '../../src/cluster/records.ts';
import { ok, stopAndCheck } from './stream-pipe.ts';

export interface Member {
  node: RunningNode;
  name: string;
  /** 127.0.0.1:PORT of its peer port; '' for a node started without one (no certificates asked for). */
  address: string;
}

export interface ClusterFixture {
  /** True when etcd (or openssl, for certificates) is missing: the file's tests skip. */
  readonly skip: boolean;
  readonly ttlMs: number;
  scratch: string;
  tlsDir: string;
  etcd: EtcdCluster;
  /** A client of the test's own, to read or change what the nodes wrote. */
  client: Etcd3;
  /**
   * Starts node `name` (pool scratch/NAME) in the cluster. With `crashAt`, its CHUNKD_TEST_CRASH_AT hook
   * (core/crash-points.ts) kills it at that step; `env`: variables set for it (test hooks).
   */
  start(name: string, extra?: string[], options?: { crashAt?: string; env?: Record<string, string> }): Promise<Member>;
}

export function clusterFixture(label: string, options: { nodes?: string[]; etcdMembers?: 1 | 3; ttlMs?: number } = {}): ClusterFixture {
  const nodes = options.nodes ?? [];
  const ports = new Map<string, number>();
  const fixture = {
    skip: !haveEtcd() || (nodes.length > 0 && !haveTool('openssl')),
    ttlMs: options.ttlMs ?? 3_000,
    async start(name: string, extra: string[] = [], startOptions: { crashAt?: string; env?: Record<string, string> } = {}): Promise<Member> {
      let address = '';
      if (nodes.includes(name)) {
        if (!ports.has(name)) ports.set(name, await stablePort());
        address = `127.0.0.1:${ports.get(name)}`;
      }
      const peer = address === '' ? undefined : { address, tlsDir: path.join(fixture.tlsDir, name) };
      const args = [...clusterNodeArgs({ name, etcd: fixture.etcd.endpoints, ttlMs: fixture.ttlMs, peer }), ...extra];
      const env = { ...startOptions.env, ...(startOptions.crashAt === undefined ? {} : { CHUNKD_TEST_CRASH_AT: startOptions.crashAt }) };
      Object.assign(process.env, env);
      try {
        return { node: await startNode(path.join(fixture.scratch, name), args), name, address };
      } finally {
        for (const key of Object.keys(env)) delete process.env[key];
      }
    },
  } as ClusterFixture;
  beforeAll(async () => {
    if (fixture.skip) return;
    fixture.scratch = makeTempDir(label);
    fixture.tlsDir = path.join(fixture.scratch, 'tls');
    if (nodes.length > 0) await mustRun(process.execPath, [chunkdBin, 'tls', 'init', fixture.tlsDir, ...nodes.flatMap((name) => ['--node', name])]);
    fixture.etcd = await startEtcd(options.etcdMembers ?? 1);
    fixture.client = new Etcd3({ hosts: fixture.etcd.endpoints });
  });
  afterAll(async () => {
    if (fixture.skip) return;
    fixture.client?.close();
    await fixture.etcd?.stop();
    fs.rmSync(fixture.scratch, { recursive: true, force: true });
  });
  return fixture;
}

export interface ClusterStatusJson {
  self: string;
  lease: { live: boolean; ttlMs: number };
  nodes: Array<{ name: string; alive: boolean; peer: string | null; capacityBytes: number; freeBytes: number; version: string; health: string; volumes: string[] }>;
  volumes: Array<{ name: string; sizeBytes: number; owner: string; epoch: number; replicas: string[] }>;
}

export async function clusterStatus(node: RunningNode): Promise<ClusterStatusJson> {
  return JSON.parse(await ok(node, 'cluster', 'status', '--json'));
}

export { waitFor };

/** The roles file of a node's pool (replication/roles.ts): volume -> role. */
export function roles(node: RunningNode): PoolRoles {
  return rolesOf(node.pool);
}

/** The volume's record in etcd (cluster/records.ts), read with the test's own client; it must exist. */
export async function volumeRecord(fixture: ClusterFixture, volume: string): Promise<VolumeRecord> {
  const kv = (await fixture.client.get(volumeKey(volume)).exec()).kvs[0];
  assert.ok(kv !== undefined, `no record of ${volume} in etcd`);
  return parseVolumeRecord(volumeKey(volume), kv.value);
}

/** Stops each member (resumed first, in case a test left it stopped), killing it when it does not stop cleanly. */
export async function stopMembers(members: Member[]): Promise<void> {
  for (const member of members) {
    member.node.process.kill('SIGCONT');
    await stopAndCheck(member.node).catch(() => member.node.kill());
  }
}

/** Each member's log on stderr, for a failed test. */
export function dumpMembers(members: Member[]): void {
  for (const member of members) process.stderr.write(`--- ${member.name}:\n${member.node.stderr()}\n`);
}

/** 4 KiB block `index`: its index in its first bytes, then a byte of it, so that each block written is told apart. */
export function numberedBlock(index: number): Buffer {
  const data = Buffer.alloc(4096, (index * 7 + 1) % 256);
  data.writeUInt32LE(index, 0);
  return data;
}
