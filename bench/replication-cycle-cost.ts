// The CPU per client 4 KiB write of a replication link's cycles, in process, stage by stage: a volume filled with
// random data, then random 4 KiB writes --qd at a time (as the NBD front end hands a turn's writes to Volume.write),
// and after every --writes-per-cycle of them what the replicator's cycle does on the owner: a snapshot taken
// (repl-N), the diff from the last one (prepareSend), the stream's records read, verified and built, framed and sent
// as the replicator sends them (sendWindowed; with --tls over a PeerClient with mutual TLS to a peer server in a
// child process that answers each frame and keeps nothing, else to a request that answers at once), and the
// previous point removed (recycled), as #landed does. With --receive, the stream's frames (copied, as the peer
// server holds them) are also applied by a StreamReceiver into a second pool, and its older points pruned: the
// replica's side (no TLS). Rounds alternate cycles with the same writes and no cycles (a cycles round starts with
// a cycle not counted, so that it ships only its own writes). Prints per client write the CPU µs of the main thread
// (process.threadCpuUsage) and of all threads (process.cpuUsage) for each stage, medians over the rounds (the
// first round is a warm-up, not counted). --stream-laps N: only one cycle's stream, made once and sent N times
// (for a profiler), its main thread's CPU per chunk sent. The same file runs in another checkout (copied there).
// Usage: node bench/replication-cycle-cost.ts [--size-mib 1024] [--writes-per-cycle 14000] [--cycles 4] [--rounds 3] [--qd 32] [--tls] [--receive] [--stream-laps N] [--dir /tmp/X]
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
import { sendWindowed } from '../src/replication/replicator.ts';
import { StreamReceiver } from '../src/replication/receive.ts';
import { prepareSend } from '../src/replication/send.ts';
import { Pool } from '../src/store/pool.ts';

const MiB = 1024 * 1024;
const log = (): void => {};

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '1024' }, 'writes-per-cycle': { type: 'string', default: '14000' }, cycles: { type: 'string', default: '4' },
    rounds: { type: 'string', default: '3' }, receive: { type: 'boolean', default: false }, 'stream-laps': { type: 'string', default: '0' }, qd: { type: 'string', default: '32' }, tls: { type: 'boolean', default: false }, dir: { type: 'string', default: os.tmpdir() },
  },
});
const sizeBytes = Number(values['size-mib']) * MiB;
const perCycle = Number(values['writes-per-cycle']);
const cycles = Number(values.cycles);
const rounds = Number(values.rounds);
const qd = Number(values.qd);
const root = fs.mkdtempSync(path.join(values.dir!, 'cycle-cost-'));
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
let child: ReturnType<typeof fork> | null = null;
try {
  let client: PeerClient | null = null;
  if (values.tls) {
    await initTls({ directory: root, nodes: ['alpha', 'beta'], clients: [], sans: [], days: 1, mode: 'new' });
    // replication-send-cost.ts's child: a peer server whose receiveData answers at once and keeps nothing.
    child = fork(new URL('./replication-send-cost.ts', import.meta.url).pathname, ['--serve', root], { stdio: 'inherit' });
    const port = await new Promise<number>((resolve) => child!.once('message', (message) => resolve(message as number)));
    client = await PeerClient.connect({ host: '127.0.0.1', port, credentials: loadCredentials(path.join(root, 'alpha'), 'client') });
  }
  const request = client === null ? async (): Promise<void> => {} : (pieces: Buffer[]) => client.request(PeerVerb.receiveData, pieces);
  const pool = await Pool.open({ directory: path.join(root, 'a') });
  await pool.createVolume('v', sizeBytes);
  const volume = pool.openVolume('v');
  const fill = Buffer.alloc(MiB);
  for (let offset = 0; offset < sizeBytes; offset += MiB) {
    crypto.randomFillSync(fill);
    await volume.write(offset, fill);
  }
  await volume.flush();
  const chunks = sizeBytes / 4096;
  const peer = values.receive ? await Pool.open({ directory: path.join(root, 'b') }) : null;
  const receiver = peer === null ? null : new StreamReceiver(peer, log);
  // A pool of random blocks to write from (fio's --refill_buffers: each write's bytes differ).
  const blocks = Array.from({ length: 4096 }, () => crypto.randomBytes(4096));
  let written = 0;
  const writeSome = async (count: number): Promise<void> => {
    for (let done = 0; done < count; done += qd) {
      const batch: Promise<void>[] = [];
      for (let i = 0; i < qd && done + i < count; i++) batch.push(volume.write(Math.floor(Math.random() * chunks) * 4096, blocks[written++ % blocks.length]!));
      await Promise.all(batch);
    }
  };
  type Stage = 'writes' | 'snapshot' | 'diff' | 'stream' | 'remove' | 'receive' | 'prune';
  const stageNames: Stage[] = ['writes', 'snapshot', 'diff', 'stream', 'remove', ...(receiver === null ? [] : (['receive', 'prune'] as const))];
  type Times = Record<Stage, { main: number; all: number }>;
  const timed = async (into: Times | null, stage: Stage, work: () => Promise<unknown>): Promise<void> => {
    const thread = process.threadCpuUsage();
    const all = process.cpuUsage();
    await work();
    const t = process.threadCpuUsage(thread);
    const a = process.cpuUsage(all);
    if (into === null) return;
    into[stage].main += t.user + t.system;
    into[stage].all += a.user + a.system;
  };
  const empty = (): Times => Object.fromEntries(stageNames.map((s) => [s, { main: 0, all: 0 }])) as Times;
  const results: Record<'none' | 'cycles', Times[]> = { none: [], cycles: [] };
  const streamChunks: number[] = [];
  let previous: string | null = null;
  let serial = 0;
  /** One cycle as the replicator runs it (and, with --receive, the peer's side), its stages added to `into` (null: not counted). */
  const cycle = async (into: Times | null): Promise<void> => {
    const name = `repl-${++serial}`;
    await timed(into, 'snapshot', () => pool.createSnapshot('v', name));
    let prepared: Awaited<ReturnType<typeof prepareSend>> | null = null;
    await timed(into, 'diff', async () => (prepared = await prepareSend(pool, { volume: 'v', snapshot: name, from: previous, resumeOffsetBytes: 0 }, log)));
    if (into !== null) streamChunks.push(prepared!.header.dataBytes / 4096);
    if (receiver === null) {
      await timed(into, 'stream', () => sendWindowed(prepared!, null, request));
    } else if (previous === null) {
      // The first, full stream: piped straight into the receiver, not counted.
      await receiver.receive('v', (async function* () {
        for await (const batch of prepared!.batches) for (const record of batch) yield Buffer.concat(record);
      })());
      await prepared!.batches.return(undefined);
    } else {
      // The stream's frames kept (a copy each, as the peer server's frame buffers hold them), then received.
      const frames: Buffer[] = [];
      await timed(into, 'stream', () => sendWindowed(prepared!, null, async (pieces) => void frames.push(Buffer.concat(pieces))));
      await timed(into, 'receive', () => receiver.receive('v', (async function* () {
        yield* frames;
      })()));
      await timed(into, 'prune', async () => {
        for (const snapshot of peer!.listSnapshots('v')) if (snapshot.name !== name) await peer!.removeSnapshot('v', snapshot.name, { recycle: true });
      });
    }
    if (previous !== null) await timed(into, 'remove', () => pool.removeSnapshot('v', previous!, { recycle: true }));
    previous = name;
  };
  for (let round = 0; round <= rounds; round++) {
    for (const mode of round % 2 === 0 ? (['none', 'cycles'] as const) : (['cycles', 'none'] as const)) {
      const into = empty();
      // A cycles round starts from a point just taken: what the writes of a round without cycles changed is not its.
      if (mode === 'cycles') await cycle(null);
      for (let c = 0; c < cycles; c++) {
        await timed(into, 'writes', () => writeSome(perCycle));
        if (mode === 'cycles') await cycle(into);
      }
      if (round > 0) results[mode].push(into);
    }
  }
  const writes = cycles * perCycle;
  const line = (mode: 'none' | 'cycles', stage: Stage, kind: 'main' | 'all'): string => {
    const xs = results[mode].map((r) => r[stage][kind] / writes);
    return `${median(xs).toFixed(2)} [${xs.map((x) => x.toFixed(2)).join(' ')}]`;
  };
  console.log(`${sizeBytes / MiB} MiB volume, ${writes} random 4 KiB writes at QD${qd} a round, a cycle every ${perCycle} (${cycles} a round), ${rounds} rounds${values.tls ? ', sent over TLS' : ', sent to no peer'}; ${median(streamChunks)} chunks a cycle's stream; load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  console.log('| CPU µs per client write | main thread | all threads |');
  console.log('| --- | --- | --- |');
  console.log(`| writes, no cycles | ${line('none', 'writes', 'main')} | ${line('none', 'writes', 'all')} |`);
  for (const stage of stageNames) console.log(`| ${stage}, cycles | ${line('cycles', stage, 'main')} | ${line('cycles', stage, 'all')} |`);
  await volume.close();
  await pool.close();
  await peer?.close();
  client?.close();
} finally {
  child?.disconnect();
  fs.rmSync(root, { recursive: true, force: true });
}
