// A real etcd on loopback for the cluster's tests (Debian's etcd-server, /usr/bin/etcd; scripts/setup.sh installs
// it): one member, or three for the partition cases, each on free ports with its data in a temporary directory
// that stop() removes. A member can be paused (SIGSTOP, the way a partition or a stalled disk looks to clients),
// resumed, killed and restarted on the same ports and data.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { haveTool, makeTempDir, stablePort } from './node-process.ts';

export interface EtcdMember {
  name: string;
  /** http://127.0.0.1:PORT, what clients (chunkd serve --etcd) are given. */
  clientUrl: string;
  peerUrl: string;
  dataDirectory: string;
  /** The running process, or null after kill(). */
  process: ChildProcess | null;
  pause(): void;
  resume(): void;
  /** SIGKILL and wait for it to exit. */
  kill(): Promise<void>;
  /** Starts it again on the same ports and data (after kill) and waits until it answers /health. */
  restart(): Promise<void>;
  stderr(): string;
}

export interface EtcdCluster {
  members: EtcdMember[];
  /** Every member's client URL, comma-separated, as --etcd takes them. */
  endpoints: string;
  /** Kills every member and removes the data directories. */
  stop(): Promise<void>;
}

/** Whether the etcd server binary is installed (tests skip without it). */
/**
 * The members' election timeout. A leader cut off from its quorum steps down within two of them (raft's CheckQuorum
 * looks once per timeout), and until it does it still renews leases (etcd renews without consensus; a new leader
 * extends every lease by a timeout to cover this): so a keepalive may be confirmed up to this long after the quorum is lost.
 */
export const etcdElectionTimeoutMs = 500;

export function haveEtcd(): boolean {
  return haveTool('etcd');
}

/**
 * TLS for etcd's client port (`tlsDirectory`: a set from `chunkd tls init`, e.g. DIR/etcd): etcd serves its
 * server-cert.pem and asks every client for a certificate signed by its ca-cert.pem (--client-cert-auth); the
 * client URLs are https://.
 */
export interface EtcdOptions {
  tlsDirectory?: string;
}

/** Starts `size` etcd members (1 or 3) on loopback and waits until each answers /health. */
export async function startEtcd(size: 1 | 3 = 1, options: EtcdOptions = {}): Promise<EtcdCluster> {
  const root = makeTempDir('etcd');
  const layout: Array<{ name: string; clientPort: number; peerPort: number }> = [];
  for (let index = 0; index < size; index += 1) layout.push({ name: `etcd${index}`, clientPort: await stablePort(), peerPort: await stablePort() });
  const initialCluster = layout.map((member) => `${member.name}=http://127.0.0.1:${member.peerPort}`).join(',');
  const members = layout.map((spec) => makeMember(spec, path.join(root, spec.name), initialCluster, options.tlsDirectory ?? null));
  const cluster: EtcdCluster = {
    members,
    endpoints: members.map((member) => member.clientUrl).join(','),
    stop: async () => {
      for (const member of members) {
        member.resume();
        await member.kill();
      }
      fs.rmSync(root, { recursive: true, force: true });
    },
  };
  try {
    await Promise.all(members.map((member) => member.restart()));
    // Every member answers; with three, wait for the cluster to have elected a leader too.
    if (size > 1) await waitHealthy(members[0]!, 1, options.tlsDirectory ?? null);
  } catch (error) {
    await cluster.stop();
    throw error;
  }
  return cluster;
}

function makeMember(spec: { name: string; clientPort: number; peerPort: number }, dataDirectory: string, initialCluster: string, tlsDirectory: string | null): EtcdMember {
  let stderr = '';
  let exited: Promise<void> = Promise.resolve();
  const member: EtcdMember = {
    name: spec.name,
    clientUrl: `${tlsDirectory === null ? 'http' : 'https'}://127.0.0.1:${spec.clientPort}`,
    peerUrl: `http://127.0.0.1:${spec.peerPort}`,
    dataDirectory,
    process: null,
    pause: () => {
      member.process?.kill('SIGSTOP');
    },
    resume: () => {
      member.process?.kill('SIGCONT');
    },
    kill: async () => {
      if (member.process === null) return;
      member.process.kill('SIGCONT');
      member.process.kill('SIGKILL');
      await exited;
      member.process = null;
    },
    restart: async () => {
      if (member.process !== null) throw new Error(`etcd member ${spec.name} is running`);
      const child = spawn(
        'etcd',
        [
          '--name', spec.name,
          '--data-dir', dataDirectory,
          '--listen-client-urls', member.clientUrl,
          '--advertise-client-urls', member.clientUrl,
          '--listen-peer-urls', member.peerUrl,
          '--initial-advertise-peer-urls', member.peerUrl,
          '--initial-cluster', initialCluster,
          '--initial-cluster-state', 'new',
          '--initial-cluster-token', `chunkd-test-${path.basename(path.dirname(dataDirectory))}`,
          // Short elections on loopback, so that a three-member cluster recovers from a lost member in a second.
          '--heartbeat-interval', '50',
          '--election-timeout', String(etcdElectionTimeoutMs),
          '--logger', 'zap',
          '--log-level', 'warn',
          ...(tlsDirectory === null
            ? []
            : ['--cert-file', path.join(tlsDirectory, 'server-cert.pem'), '--key-file', path.join(tlsDirectory, 'server-key.pem'), '--trusted-ca-file', path.join(tlsDirectory, 'ca-cert.pem'), '--client-cert-auth']),
        ],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      child.stderr!.on('data', (chunk: Buffer) => {
        stderr += chunk.toString();
      });
      exited = new Promise((resolve) => child.once('exit', () => resolve()));
      member.process = child;
      await waitHealthy(member, size(initialCluster), tlsDirectory);
    },
    stderr: () => stderr,
  };
  return member;
}

/** GET /health over TLS with the client pair of `tlsDirectory` (fetch takes no client certificate). */
function healthOverTls(url: string, tlsDirectory: string): Promise<unknown> {
  const file = (name: string): Buffer => fs.readFileSync(path.join(tlsDirectory, name));
  return new Promise((resolve, reject) => {
    const request = https.get(url, { ca: file('ca-cert.pem'), cert: file('client-cert.pem'), key: file('client-key.pem'), timeout: 1000 }, (response) => {
      let text = '';
      response.on('data', (chunk: Buffer) => (text += chunk.toString()));
      response.on('end', () => {
        try {
          resolve(JSON.parse(text));
        } catch (error) {
          reject(error as Error);
        }
      });
    });
    request.on('timeout', () => request.destroy(new Error('timed out')));
    request.on('error', reject);
  });
}

function size(initialCluster: string): number {
  return initialCluster.split(',').length;
}

/**
 * Waits until the member answers /health with a leader. A member of three cannot have one before a second member
 * runs, so for those it is enough that the client port answers at all.
 */
async function waitHealthy(member: EtcdMember, clusterSize: number, tlsDirectory: string | null): Promise<void> {
  const deadline = Date.now() + 20_000;
  let last = '';
  while (Date.now() < deadline) {
    if (member.process?.exitCode !== null) throw new Error(`etcd member ${member.name} exited (${member.process?.exitCode}): ${member.stderr()}`);
    try {
      const body = (tlsDirectory === null
        ? await (await fetch(`${member.clientUrl}/health`, { signal: AbortSignal.timeout(1000) })).json()
        : await healthOverTls(`${member.clientUrl}/health`, tlsDirectory)) as { health?: string };
      if (body.health === 'true' || clusterSize > 1) return;
      last = JSON.stringify(body);
    } catch (error) {
      last = String(error);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`etcd member ${member.name} did not become healthy in 20 s (${last}): ${member.stderr()}`);
}
