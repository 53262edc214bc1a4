// Nodes with peer ports for the replication tests: started on a pool under `scratch` with their set from
// `chunkd tls init` under `tlsDir`, their replica links read straight from the API (polling through the CLI is too
// slow to catch a stream or a state), and a poll with a deadline.
import http from 'node:http';
import path from 'node:path';
import { startNode, type RunningNode } from './node-process.ts';

export interface PeerNode {
  node: RunningNode;
  name: string;
  /** HOST:PORT of its --peer-listen. */
  address: string;
}

/** Starts (or restarts, on the same pool and port) the node `name` with its peer port. */
export async function startPeerNode(scratch: string, tlsDir: string, name: string, port: number, extra: string[] = []): Promise<PeerNode> {
  const node = await startNode(path.join(scratch, name), ['--peer-listen', `127.0.0.1:${port}`, '--tls-dir', path.join(tlsDir, name), ...extra]);
  return { node, name, address: `127.0.0.1:${port}` };
}

/** The owner's replica links of `volume` (asynchronous and synchronous), from GET /v1/volumes/VOL/replicas. */
export async function replicaLinks(owner: PeerNode, volume: string): Promise<Array<Record<string, any>>> {
  const body = await new Promise<string>((resolve, reject) => {
    http.get({ socketPath: owner.node.apiSocket, path: `/v1/volumes/${volume}/replicas` }, (response) => {
      let text = '';
      response.on('data', (chunk: Buffer) => (text += chunk.toString()));
      response.on('end', () => resolve(text));
    }).on('error', reject);
  });
  return JSON.parse(body).replicas;
}

/** Polls `probe` every 50 ms until it gives a value; past the deadline fails with `diagnose`'s text. */
export async function waitFor<T>(what: string, probe: () => Promise<T | null>, diagnose?: () => Promise<string>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== null) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${diagnose === undefined ? '' : `: ${await diagnose()}`}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
