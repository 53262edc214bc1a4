// The owner's CPU per MiB a replication link sends, in process: a volume written in 1 MiB pieces of random data (as
// the 1 MiB sequential writer of bench:replication leaves it), its full stream made by the sender (prepareSend) and
// framed as the replicator frames it (receiveData frames of about 1 MiB, 8 in flight, paced by --max-rate when
// given), sent over a PeerClient with mutual TLS to a peer server in a child process that answers each frame and
// keeps nothing. So this process does what a sending node's threads do for a link (the verified chunk reads, the
// records' checksums, TLS, TCP) and nothing of the receiver's. Prints, per MiB of stream sent, the CPU µs of this
// process's main thread (process.threadCpuUsage) and of all its threads (process.cpuUsage), medians of --runs
// (each run sends the stream --laps times; the first run is a warm-up, not counted: the page cache, the JIT).
// The same file runs against another checkout's src/ when copied into it (old and new interleaved by the caller);
// one from before replicator.ts exported sendWindowed (its framing, window and pacing) needs that function copied in with it.
// Usage: node bench/replication-send-cost.ts [--size-mib 256] [--runs 5] [--laps 2] [--max-rate MiB/s] [--dir /tmp/X]
import { fork } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { initTls } from '../src/peer/certificates.ts';
import { PeerClient } from '../src/peer/client.ts';
import { loadCredentials } from '../src/peer/credentials.ts';
import { PeerVerb } from '../src/peer/protocol.ts';
import { PeerServer } from '../src/peer/server.ts';
import { sendWindowed } from '../src/replication/replicator.ts';
import { prepareSend } from '../src/replication/send.ts';
import { Pool } from '../src/store/pool.ts';

const poolId = '0b0e8d1c-6a53-4c5e-9d0f-1f1e2d3c4b5a';
const MiB = 1024 * 1024;
const log = (): void => {};

if (process.argv[2] === '--serve') {
  // The child: a peer server whose receiveData answers at once and keeps nothing.
  const server = new PeerServer({
    credentials: loadCredentials(path.join(process.argv[3]!, 'beta'), 'server'), allow: null, poolId, software: 'bench', log,
    verbs: new Map([[PeerVerb.receiveData, async () => ({})]]),
  });
  await server.listen('127.0.0.1', 0);
  process.send!(Number(server.addresses()[0]!.split(':').pop()));
  process.on('disconnect', () => process.exit(0));
} else {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string', default: '256' }, runs: { type: 'string', default: '5' }, laps: { type: 'string', default: '2' }, 'max-rate': { type: 'string' }, dir: { type: 'string', default: os.tmpdir() } } });
  const sizeBytes = Number(values['size-mib']) * MiB;
  const runs = Number(values.runs);
  const laps = Number(values.laps);
  const rate = values['max-rate'] === undefined ? null : Number(values['max-rate']) * MiB;
  const root = fs.mkdtempSync(path.join(values.dir!, 'send-cost-'));
  const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  await initTls({ directory: root, nodes: ['alpha', 'beta'], clients: [], sans: [], days: 1, mode: 'new' });
  const child = fork(new URL(import.meta.url).pathname, ['--serve', root], { stdio: 'inherit' });
  try {
    const port = await new Promise<number>((resolve) => child.once('message', (message) => resolve(message as number)));
    const source = await Pool.open({ directory: path.join(root, 'a') });
    await source.createVolume('v', sizeBytes);
    const volume = source.openVolume('v');
    const data = Buffer.alloc(MiB);
    for (let offset = 0; offset < sizeBytes; offset += MiB) {
      crypto.randomFillSync(data);
      await volume.write(offset, data);
    }
    await volume.flush();
    await volume.close();
    await source.createSnapshot('v', 's1');
    const client = await PeerClient.connect({ host: '127.0.0.1', port, credentials: loadCredentials(path.join(root, 'alpha'), 'client') });
    const mainUs: number[] = [];
    const allUs: number[] = [];
    for (let run = 0; run <= runs; run++) {
      const thread = process.threadCpuUsage();
      const all = process.cpuUsage();
      let sent = 0;
      for (let lap = 0; lap < laps; lap++) sent += await sendOnce(source, client, rate);
      const threadUsed = process.threadCpuUsage(thread);
      const allUsed = process.cpuUsage(all);
      if (run === 0) continue;
      mainUs.push((threadUsed.user + threadUsed.system) / (sent / MiB));
      allUs.push((allUsed.user + allUsed.system) / (sent / MiB));
    }
    client.close();
    console.log(`${sizeBytes / MiB} MiB of 1 MiB writes sent ${laps}x a run, ${runs} runs${rate === null ? '' : `, paced at ${rate / MiB} MiB/s`}: CPU µs per MiB sent, main thread ${median(mainUs).toFixed(0)} [${mainUs.map((x) => x.toFixed(0)).join(' ')}], all threads ${median(allUs).toFixed(0)} [${allUs.map((x) => x.toFixed(0)).join(' ')}]; load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
    await source.close();
  } finally {
    child.disconnect();
    fs.rmSync(root, { recursive: true, force: true });
  }
}

/** One full stream of v@s1, framed and sent as Replicator's #stream does (sendWindowed); returns its bytes. */
async function sendOnce(source: Pool, client: PeerClient, rate: number | null): Promise<number> {
  const prepared = await prepareSend(source, { volume: 'v', snapshot: 's1', from: null, resumeOffsetBytes: 0 }, log);
  const sentBytes = await sendWindowed(prepared, rate, (pieces) => client.request(PeerVerb.receiveData, pieces));
  if (prepared.failure() !== null) throw prepared.failure()!;
  return sentBytes;
}
