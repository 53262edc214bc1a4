// Unix socket paths left behind by a crashed node are replaced; a socket something still answers on is not.
// Shared by the NBD listener, the management API and the Docker plugin socket.
import fs from 'node:fs';
import type http from 'node:http';
import net from 'node:net';
import { ChunkdError } from '../core/errors.ts';

/** Makes `socketPath` free to listen on: removes a stale socket, refuses a live one or a non-socket file. */
export async function claimSocketPath(socketPath: string): Promise<void> {
  let stats: fs.Stats;
  try {
    stats = fs.lstatSync(socketPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  if (!stats.isSocket()) throw ChunkdError.busy(`${socketPath} exists and is not a socket; refusing to replace it`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    // ECONNREFUSED: a socket file no process listens on (a crash left it); ENOENT: removed meanwhile.
    probe.once('error', () => resolve(false));
  });
  if (live) throw ChunkdError.busy(`${socketPath} is in use by a running process`);
  fs.rmSync(socketPath, { force: true });
}

/** Listens on `socketPath` readable by its owner only (no moment with a wider mode); a stale socket is replaced. */
export async function listenOwnerOnly(server: net.Server, socketPath: string): Promise<void> {
  await claimSocketPath(socketPath);
  const oldMask = process.umask(0o177);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } finally {
    process.umask(oldMask);
  }
  fs.chmodSync(socketPath, 0o600);
}

/** Closes an HTTP server on a unix socket: its connections at once, then the listener, then the socket file. */
export async function closeHttpServer(server: http.Server, socketPath: string | null): Promise<void> {
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (socketPath !== null) fs.rmSync(socketPath, { force: true });
}
