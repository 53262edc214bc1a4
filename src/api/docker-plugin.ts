// The Docker volume plugin protocol (docs.docker.com/engine/extend/plugins_volume) on its own unix socket, so a
// container engine can create a chunkd volume, have it mounted and bind-mount the path it gets back.
// Every request is a POST with a JSON body; every reply is JSON with `Err` ("" on success; on failure the
// message, with status 500, as Docker's go-plugins-helpers answer; 400 for a body that is not a JSON object, 404
// for a route the protocol does not have).
//
// Mount attaches the volume at <pool>/mounts/<name> (ext4 made on a volume never written; one that holds data
// but no file system is refused, never formatted) and counts the caller's ID; the last Unmount detaches it again. Remove is refused while the volume is mounted. The counting lives in the
// attachment records (attachment-table.ts), so it survives a restart of the node.
// In a cluster (serve --etcd), containers follow their data: Mount of a volume another node owns moves it here
// first (chunkd volume move, through etcd) and waits until this node takes its writes; List and Get answer with the
// cluster's volumes, and Create of a name the cluster has is the idempotent answer for it.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
import { validateName } from '../core/names.ts';
import { parseSize } from '../core/units.ts';
import { closeHttpServer, listenOwnerOnly } from '../core/unix-socket.ts';
import { readBody, requestUrl } from './server.ts';
import type { Log } from '../core/log.ts';

/** Size of a volume Docker creates without `-o size=...`. */
export const dockerDefaultSizeBytes = 10 * 1024 * 1024 * 1024;
const contentType = 'application/vnd.docker.plugins.v1+json';
const pluginRoutes = new Set(['/Plugin.Activate', '/VolumeDriver.Capabilities', '/VolumeDriver.Create', '/VolumeDriver.Remove', '/VolumeDriver.Mount',
  '/VolumeDriver.Unmount', '/VolumeDriver.Path', '/VolumeDriver.Get', '/VolumeDriver.List']);

/** What the plugin needs from the node. */
export interface PluginBackend {
  listVolumes(): Array<{ name: string; sizeBytes: number; allocatedBytes: number }>;
  /** Throws ChunkdError ENOENT for a missing volume. */
  volumeInfo(name: string): { name: string; sizeBytes: number; allocatedBytes: number };
  createVolume(name: string, sizeBytes: number): Promise<unknown>;
  /** In a cluster (serve --etcd): every volume of the cluster, whichever node owns it; null on a node alone. */
  clusterVolumes(): Promise<Array<{ name: string; sizeBytes: number; owner: string }>> | null;
  /** In a cluster: moves `volume` to this node (volume move) if another owns it, and waits until it takes writes here. */
  bringHere(volume: string): Promise<void>;
  removeVolume(name: string): Promise<void>;
  attachments: {
    get(volume: string): { mountpoint: string; dockerIds: string[] } | undefined;
    dockerMount(volume: string, id: string, mountpoint: string): Promise<{ mountpoint: string }>;
    dockerUnmount(volume: string, id: string): Promise<void>;
  };
}

function stringField(body: Record<string, unknown>, field: string): string {
  const value = body[field];
  if (typeof value !== 'string' || value === '') throw ChunkdError.invalid(`${field} is required`);
  return value;
}

/** Answers one plugin request (route like "/VolumeDriver.Mount"); throws ChunkdError for the Err field. */
export async function handlePluginRequest(backend: PluginBackend, mountRoot: string, route: string, body: Record<string, unknown>): Promise<Record<string, unknown>> {
  switch (route) {
    case '/Plugin.Activate':
      return { Implements: ['VolumeDriver'] };
    case '/VolumeDriver.Capabilities':
      return { Capabilities: { Scope: 'local' } };
    case '/VolumeDriver.Create': {
      const name = validateName(stringField(body, 'Name'));
      const options = (typeof body.Opts === 'object' && body.Opts !== null ? body.Opts : {}) as Record<string, unknown>;
      for (const key of Object.keys(options)) if (key !== 'size') throw ChunkdError.invalid(`unknown option "${key}" (chunkd takes: size)`);
      const sizeBytes = options.size === undefined ? null : parseSize(String(options.size));
      // In a cluster, a volume another node owns exists too (Docker calls Create before Mount on any node).
      const existing = backend.listVolumes().find((volume) => volume.name === name) ?? (await backend.clusterVolumes())?.find((volume) => volume.name === name);
      if (existing !== undefined) {
        // Create is idempotent for a volume that is already as asked (Docker may call it again).
        if (sizeBytes !== null && sizeBytes !== existing.sizeBytes) throw ChunkdError.exists(`volume ${name} exists with size ${existing.sizeBytes} bytes`);
        return {};
      }
      await backend.createVolume(name, sizeBytes ?? dockerDefaultSizeBytes);
      return {};
    }
    case '/VolumeDriver.Remove': {
      const name = validateName(stringField(body, 'Name'));
      backend.volumeInfo(name);
      const attachment = backend.attachments.get(name);
      if (attachment !== undefined) throw ChunkdError.busy(`volume ${name} is mounted at ${attachment.mountpoint}${attachment.dockerIds.length > 0 ? ` for ${attachment.dockerIds.length} container(s)` : ''}; unmount it first`);
      await backend.removeVolume(name);
      return {};
    }
    case '/VolumeDriver.Mount': {
      const name = validateName(stringField(body, 'Name'));
      const id = stringField(body, 'ID');
      // Containers follow their data: in a cluster, a volume another node owns is moved here first.
      await backend.bringHere(name);
      const record = await backend.attachments.dockerMount(name, id, path.join(mountRoot, name));
      return { Mountpoint: record.mountpoint };
    }
    case '/VolumeDriver.Unmount': {
      const name = validateName(stringField(body, 'Name'));
      await backend.attachments.dockerUnmount(name, stringField(body, 'ID'));
      return {};
    }
    case '/VolumeDriver.Path': {
      const name = validateName(stringField(body, 'Name'));
      backend.volumeInfo(name);
      return { Mountpoint: backend.attachments.get(name)?.mountpoint ?? '' };
    }
    case '/VolumeDriver.Get': {
      const name = validateName(stringField(body, 'Name'));
      const cluster = await backend.clusterVolumes();
      if (cluster !== null) {
        const volume = cluster.find((candidate) => candidate.name === name);
        if (volume === undefined) throw ChunkdError.notFound(`volume ${name} is not in the cluster`);
        return { Volume: { Name: name, Mountpoint: backend.attachments.get(name)?.mountpoint ?? '', Status: { sizeBytes: volume.sizeBytes, owner: volume.owner } } };
      }
      const volume = backend.volumeInfo(name);
      return { Volume: { Name: name, Mountpoint: backend.attachments.get(name)?.mountpoint ?? '', Status: { sizeBytes: volume.sizeBytes, allocatedBytes: volume.allocatedBytes } } };
    }
    case '/VolumeDriver.List': {
      // In a cluster, the cluster's volumes (mounted here or not); alone, this node's.
      const volumes = (await backend.clusterVolumes()) ?? backend.listVolumes();
      return { Volumes: volumes.map((volume) => ({ Name: volume.name, Mountpoint: backend.attachments.get(volume.name)?.mountpoint ?? '' })) };
    }
    default:
      throw ChunkdError.notFound(`unknown plugin route ${route}`);
  }
}

export class DockerPluginServer {
  readonly #backend: PluginBackend;
  readonly #mountRoot: string;
  readonly #log: Log;
  readonly #server: http.Server;
  #socketPath: string | null = null;

  constructor(backend: PluginBackend, mountRoot: string, log: Log) {
    this.#backend = backend;
    this.#mountRoot = mountRoot;
    this.#log = log;
    this.#server = http.createServer((request, response) => {
      this.#handle(request, response).catch((error: unknown) => send(response, 500, { Err: expectedError(error, 'a Docker plugin request').message }));
    });
  }

  /** Listens on `socketPath` (mode 0600; its directory is created); a stale socket file is replaced. */
  async listen(socketPath: string): Promise<void> {
    fs.mkdirSync(path.dirname(socketPath), { recursive: true });
    await listenOwnerOnly(this.#server, socketPath);
    this.#socketPath = socketPath;
  }

  close(): Promise<void> {
    return closeHttpServer(this.#server, this.#socketPath);
  }

  async #handle(request: http.IncomingMessage, response: http.ServerResponse): Promise<void> {
    // A route the protocol does not have, or a URL or body that does not parse, is the client's mistake (4xx); a
    // request the backend refuses is answered 500, as Docker's go-plugins-helpers do.
    let route: string;
    let body: Record<string, unknown>;
    try {
      route = requestUrl(request).pathname;
      body = await readBody(request);
    } catch (error) {
      return this.#refuse(response, 400, expectedError(error, 'a Docker plugin request').message);
    }
    if (!pluginRoutes.has(route)) return this.#refuse(response, 404, `unknown plugin route ${route}`);
    const reply = await handlePluginRequest(this.#backend, this.#mountRoot, route, body);
    send(response, 200, route === '/Plugin.Activate' || route === '/VolumeDriver.Capabilities' ? reply : { ...reply, Err: '' });
  }

  #refuse(response: http.ServerResponse, status: number, message: string): void {
    this.#log(`docker plugin: refused a request: ${message}`, 'warn');
    send(response, status, { Err: message });
  }
}

function send(response: http.ServerResponse, status: number, value: unknown): void {
  if (response.headersSent) return void response.destroy();
  const text = `${JSON.stringify(value)}\n`;
  response.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(text) });
  response.end(text);
}
