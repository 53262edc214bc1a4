// CPU per replicated chunk, in process (no TLS, no peer port): a volume with scattered 4 KiB chunks written (as a
// random writer leaves it), its full stream made by the sender (prepareSend, records iterated as the replicator
// does, each frame's read buffers recycled), then applied by the receiver (StreamReceiver, in 1 MiB pieces) into
// a second pool. Prints CPU µs per chunk for each side (process.cpuUsage: every thread of the process), medians
// of --runs. The same file runs against another checkout's src/ when copied into it (old and new interleaved).
// Usage: node bench/replication-chunk-cost.ts [--chunks 16384] [--runs 5] [--dir /tmp/X]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Pool } from '../src/store/pool.ts';
import { prepareSend } from '../src/replication/send.ts';
import { StreamReceiver } from '../src/replication/receive.ts';

const { values } = parseArgs({ options: { chunks: { type: 'string', default: '16384' }, runs: { type: 'string', default: '5' }, dir: { type: 'string', default: os.tmpdir() } } });
const chunkCount = Number(values.chunks);
const runs = Number(values.runs);
const volumeBytes = 4 * 1024 ** 3;
const log = (): void => {};
const root = fs.mkdtempSync(path.join(values.dir!, 'chunk-cost-'));
const cpuUs = (): number => {
  const usage = process.cpuUsage();
  return usage.user + usage.system;
};
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

try {
  const source = await Pool.open({ directory: path.join(root, 'a') });
  await source.createVolume('v', volumeBytes);
  const volume = source.openVolume('v');
  // Scattered chunks, in random order, none adjacent (every 4th chunk of a random subset).
  const slots = Array.from({ length: volumeBytes / 4096 / 4 }, (_, i) => i * 4);
  for (let i = slots.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [slots[i], slots[j]] = [slots[j]!, slots[i]!];
  }
  const data = Buffer.alloc(4096);
  for (let i = 0; i < chunkCount; i++) {
    data.writeUInt32LE(i + 1, 0);
    data.writeUInt32LE(Math.random() * 2 ** 32, 8);
    await volume.write(slots[i]! * 4096, data);
  }
  await volume.flush();
  await volume.close();
  await source.createSnapshot('v', 's1');
  const target = await Pool.open({ directory: path.join(root, 'b') });
  const receiver = new StreamReceiver(target, log);
  const send: number[] = [];
  const receive: number[] = [];
  for (let run = 0; run < runs; run++) {
    let started = cpuUs();
    const prepared = await prepareSend(source, { volume: 'v', snapshot: 's1', from: null, resumeOffsetBytes: 0 }, log);
    const frames: Buffer[] = [];
    let pieces: Buffer[] = [];
    let records: Buffer[][] = [];
    let bytes = 0;
    for await (const record of prepared.records) {
      records.push(record);
      for (const piece of record) {
        pieces.push(piece);
        bytes += piece.length;
      }
      if (bytes >= 1024 * 1024) {
        frames.push(Buffer.concat(pieces));
        prepared.recycle(records);
        pieces = [];
        records = [];
        bytes = 0;
      }
    }
    frames.push(Buffer.concat(pieces));
    send.push((cpuUs() - started) / chunkCount);
    started = cpuUs();
    const name = `r${run}`;
    await receiver.receive(name, (async function* () {
      yield* frames;
    })());
    receive.push((cpuUs() - started) / chunkCount);
    await target.removeSnapshot(name, 's1');
    await target.removeVolume(name);
  }
  console.log(`${chunkCount} scattered 4 KiB chunks, ${runs} runs: CPU µs per chunk, send ${median(send).toFixed(1)} [${send.map((x) => x.toFixed(1)).join(' ')}], receive ${median(receive).toFixed(1)} [${receive.map((x) => x.toFixed(1)).join(' ')}]`);
  await target.close();
  await source.close();
} finally {
  fs.rmSync(root, { recursive: true, force: true });
}
