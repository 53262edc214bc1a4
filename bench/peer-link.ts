// The peer link alone (issues 14 and 17): a PeerServer in a child process whose syncWrite verb answers at once,
// and a PeerClient here sending syncWrite frames over mutual TLS on loopback, as a resync (1 MiB, 4 in flight) or
// a synchronous replica's small writes (4 KiB, 32 in flight) do. Prints, per run: MB/s, the client's and the
// server's CPU seconds per GB and CPU microseconds per message (process.cpuUsage of each process), the cipher suite.
//   node bench/peer-link.ts [--size-mib 512] [--piece-kib 1024] [--depth 4] [--rounds 1] [--cpu-prof DIR]
import { fork } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { initTls } from '../src/peer/certificates.ts';
import { PeerClient } from '../src/peer/client.ts';
import { loadCredentials } from '../src/peer/credentials.ts';
import { PeerVerb } from '../src/peer/protocol.ts';
import { PeerServer } from '../src/peer/server.ts';

const { values } = parseArgs({ options: {
  'size-mib': { type: 'string', default: '512' }, 'piece-kib': { type: 'string', default: '1024' }, depth: { type: 'string', default: '4' },
  rounds: { type: 'string', default: '1' }, 'cpu-prof': { type: 'string' }, serve: { type: 'string' },
} });

if (values.serve !== undefined) {
  // The child: serve until told to stop, then report this process's CPU since it was told to start counting.
  // Payload buffers are reused once answered, as a node's synchronous replica server does (takePayload).
  const free: Buffer[] = [];
  const server = new PeerServer({
    credentials: loadCredentials(path.join(values.serve, 'b'), 'server'), allow: null, poolId: '00000000-0000-4000-8000-000000000000',
    software: 'bench', log: () => {},
    verbs: new Map([[PeerVerb.syncWrite, async (payload: Buffer) => {
      free.push(payload);
      return {};
    }]]),
    bulkPayload: (size) => {
      const index = free.findIndex((buffer) => buffer.length === size);
      return index < 0 ? Buffer.from(new SharedArrayBuffer(size)) : free.splice(index, 1)[0]!;
    },
  });
  await server.listen('127.0.0.1', 0);
  let mark = process.cpuUsage();
  process.on('message', (message: string) => {
    if (message === 'mark') {
      mark = process.cpuUsage();
      process.send!('marked');
    } else if (message === 'report') {
      const used = process.cpuUsage(mark);
      process.send!({ cpu: (used.user + used.system) / 1e6 });
    } else if (message === 'stop') {
      void server.close().then(() => process.exit(0));
    }
  });
  process.send!({ port: Number(server.addresses()[0]!.split(':').pop()) });
} else {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'peer-link-'));
  await initTls({ directory: dir, nodes: ['a', 'b'], clients: [], sans: [], days: 1, mode: 'new' });
  const execArgv = values['cpu-prof'] === undefined ? [] : ['--cpu-prof', '--cpu-prof-dir', values['cpu-prof']];
  const child = fork(new URL(import.meta.url).pathname, ['--serve', dir], { execArgv });
  const next = (): Promise<unknown> => new Promise((resolve) => child.once('message', resolve));
  const { port } = (await next()) as { port: number };
  const client = await PeerClient.connect({ host: '127.0.0.1', port, credentials: loadCredentials(path.join(dir, 'a'), 'client') });
  const pieceBytes = Number(values['piece-kib']) * 1024;
  const totalBytes = Number(values['size-mib']) * 1048576;
  const depth = Number(values.depth);
  // A syncWrite payload as the owner sends it: a small header, then the data (pieces, not joined).
  const header = Buffer.alloc(36, 1);
  const data = Buffer.alloc(pieceBytes, 7);
  for (let round = 0; round < Number(values.rounds); round++) {
    child.send('mark');
    await next();
    const cpu = process.cpuUsage();
    const started = performance.now();
    let sent = 0;
    const lane = async (): Promise<void> => {
      while (sent < totalBytes) {
        sent += pieceBytes;
        await client.request(PeerVerb.syncWrite, [header, data]);
      }
    };
    await Promise.all(Array.from({ length: depth }, lane));
    const seconds = (performance.now() - started) / 1000;
    const used = process.cpuUsage(cpu);
    child.send('report');
    const { cpu: serverCpu } = (await next()) as { cpu: number };
    const clientCpu = (used.user + used.system) / 1e6;
    const gb = totalBytes / 1e9;
    const messages = totalBytes / pieceBytes;
    console.log(`piece ${pieceBytes / 1024} KiB depth ${depth}: ${(totalBytes / 1e6 / seconds).toFixed(0)} MB/s, CPU s/GB client ${(clientCpu / gb).toFixed(2)} server ${(serverCpu / gb).toFixed(2)}; us/message client ${(clientCpu * 1e6 / messages).toFixed(1)} server ${(serverCpu * 1e6 / messages).toFixed(1)}; load ${os.loadavg()[0]!.toFixed(1)}`);
  }
  client.close();
  child.send('stop');
  await new Promise((resolve) => child.once('exit', resolve));
  fs.rmSync(dir, { recursive: true, force: true });
}
