// An NBD protocol thread (src/node/nbd-threads.ts): its own TCP listener on the node's port (reusePort), its own
// connections, codec and socket I/O; every device call goes to the main thread (src/nbd/remote-device.ts).
// Once it serves, a bug on it ends the thread with the fail-stop code, and the main thread stops the node.
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { installFailStop } from '../src/core/fail-stop.ts';
import { SharedBufferPool } from '../src/core/shared-buffers.ts';
import { RemoteProvider } from '../src/nbd/remote-device.ts';
import { NbdServer } from '../src/nbd/server.ts';
import { tlsSettings, type TlsServerConfig } from '../src/nbd/tls.ts';

const { port, host, listenPort, index, tls, pollUs } = workerData as { port: MessagePort; host: string; listenPort: number; index: number; tls: TlsServerConfig | null; pollUs: number };
const parent = parentPort!;
const buffers = new SharedBufferPool();
const provider = new RemoteProvider(port, buffers.slab);
const server = new NbdServer({
  provider,
  log: (line, level) => parent.postMessage({ type: 'log', line: `nbd thread ${index}: ${line}`, level }),
  sharedBuffers: buffers,
  tls: tls === null ? null : tlsSettings(tls), // the main thread read and checked the credentials
  pollUs,
});

parent.on('message', (message: { type: 'stats'; id: number } | { type: 'disconnect'; id: number; exportName: string } | { type: 'stop' }) => {
  if (message.type === 'stats') {
    parent.postMessage({ type: 'stats', id: message.id, stats: server.stats() });
    return;
  }
  if (message.type === 'disconnect') {
    parent.postMessage({ type: 'disconnected', id: message.id, count: server.disconnectExport(message.exportName) });
    return;
  }
  void server.close().then(() => {
    parent.postMessage({ type: 'stopped' });
    port.close();
  });
});

// A failure before this point is a failed start (the main thread's start() reports it); a bug after it stops.
await provider.refreshList();
await server.listenTcp(host, listenPort, { reusePort: true });
installFailStop();
parent.postMessage({ type: 'ready', addresses: server.addresses() });
