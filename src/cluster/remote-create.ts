// A new volume placed on another node (volume create without --node, or with --node NAME: placement.ts): the node
// asked forwards the create over the peer port (mutual TLS, the cluster's CA) as verb volumeCreate, and the owner
// runs it as a create of its own: the volume made there, recorded in etcd under it, its replicas placed and linked.
// Its answer is the created volume. The payload is checked here, at the edge.
//
//   volumeCreate  {name, sizeBytes, replicas, sync: {timeoutMs} | null}  -> the volume (VolumeInfo, replicas)
import { ChunkdError } from '../core/errors.ts';
import { parseHostPort } from '../core/host-port.ts';
import { checkName } from '../core/names.ts';
import { PeerClient } from '../peer/client.ts';
import type { TlsCredentials } from '../peer/credentials.ts';
import { parseJsonObject, PeerVerb } from '../peer/protocol.ts';

/** Where a new volume goes: this node, the one placement chooses, or a named node of the cluster. */
export type VolumePlacement = 'here' | 'placed' | { node: string };

export interface RemoteCreateRequest {
  name: string;
  sizeBytes: number;
  replicas: number;
  sync: { timeoutMs: number } | null;
}

/** How long the node asked waits for the owner's answer: a create with synchronous replicas waits for them to be in sync. */
const remoteCreateTimeoutMs = 120_000;

export function parseRemoteCreate(payload: Buffer): RemoteCreateRequest {
  const value = parseJsonObject(payload, 'volumeCreate');
  const sync = value.sync as { timeoutMs?: unknown } | null;
  const valid = typeof value.name === 'string' && checkName(value.name) === null && Number.isSafeInteger(value.sizeBytes) && (value.sizeBytes as number) > 0
    && Number.isSafeInteger(value.replicas) && (value.replicas as number) >= 0 && (value.replicas as number) <= 8
    && (sync === null || (typeof sync === 'object' && Number.isSafeInteger(sync.timeoutMs) && (sync.timeoutMs as number) > 0));
  if (!valid) throw ChunkdError.protocol('volumeCreate needs {name, sizeBytes, replicas (0 to 8), sync: {timeoutMs} or null}');
  return { name: value.name as string, sizeBytes: value.sizeBytes as number, replicas: value.replicas as number, sync: sync === null ? null : { timeoutMs: sync.timeoutMs as number } };
}

/** Asks node `node` at `address` (its peer port) to create the volume as its own; resolves with its answer. */
export async function createOnNode(node: string, address: string, credentials: TlsCredentials, request: RemoteCreateRequest): Promise<Record<string, unknown>> {
  const where = parseHostPort(address);
  if (where === null) throw ChunkdError.invalid(`node ${node}'s peer address ${JSON.stringify(address)} is not HOST:PORT`);
  const client = await PeerClient.connect({ host: where.host, port: where.port, credentials, expectName: node });
  const timer = setTimeout(() => client.close(), remoteCreateTimeoutMs);
  try {
    return parseJsonObject(await client.request(PeerVerb.volumeCreate, Buffer.from(JSON.stringify(request), 'utf8')), 'volumeCreate reply');
  } catch (error) {
    if (error instanceof ChunkdError && error.code === 'ESHUTDOWN') throw ChunkdError.io(`node ${node} did not answer the create of volume ${request.name} within ${remoteCreateTimeoutMs / 1000} s; chunkd volume list shows whether it was made`, error);
    throw error;
  } finally {
    clearTimeout(timer);
    client.close();
  }
}
