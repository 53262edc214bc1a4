// Worker round trip: one task to a piscina worker and its answer back, the payload in a SharedArrayBuffer slot.
// This is the fixed cost the worker I/O engine pays per request on top of the disk; the task itself
// (worker-task.ts) does no I/O, so the figure is the hand-off alone. Where the store's chunk I/O worker
// (workers/chunk-io.ts) exists, its real task is timed too: a 4 KiB chunk write and a verified 4 KiB read, on a
// chunk file in a temporary directory (page cache), so the gap between the two figures is the task's own work.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Piscina } from 'piscina';
import type { Bench } from 'tinybench';
import type { ChunkTaskResult, WorkerBatchResult, WorkerTask } from '../../src/store/chunk-task.ts';
import type { MicroModule } from './harness.ts';
import type { RoundTripResult, RoundTripTask } from './worker-task.ts';

const slotBytes = 4096;
const slotCount = 32;

export const worker: MicroModule = {
  name: 'worker',
  async register(bench: Bench) {
    const shared = new SharedArrayBuffer(slotBytes * slotCount);
    const pool = new Piscina<RoundTripTask, RoundTripResult>({
      filename: path.join(import.meta.dirname, 'worker-task.ts'),
      minThreads: 1,
      maxThreads: 1,
      workerData: { shared, slotBytes },
    });
    const check = (result: RoundTripResult): void => {
      if (result.code !== 'OK') throw new Error(`worker task answered ${result.code}`);
    };
    // Start the worker before measuring: thread start-up is not a round trip.
    check(await pool.run({ slot: 0, lengthBytes: slotBytes }));
    bench
      .add('round trip, 1 task, 4 KiB slot', async () => {
        check(await pool.run({ slot: 0, lengthBytes: slotBytes }));
      })
      .add('round trip, 32 tasks in flight, 4 KiB slots', async () => {
        const results = await Promise.all(Array.from({ length: slotCount }, (_, slot) => pool.run({ slot, lengthBytes: slotBytes })));
        results.forEach(check);
      });
    const chunkWorker = path.join(import.meta.dirname, '..', '..', 'workers', 'chunk-io.ts');
    let chunkPool: Piscina<WorkerTask, WorkerBatchResult> | null = null;
    let chunkDirectory: string | null = null;
    if (fs.existsSync(chunkWorker)) {
      chunkDirectory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-micro-'));
      chunkPool = new Piscina<WorkerTask, WorkerBatchResult>({ filename: chunkWorker, minThreads: 1, maxThreads: 1, workerData: { chunkDirectory, testHooks: false } });
      const memory = new SharedArrayBuffer(slotBytes);
      new Uint8Array(memory).fill(0x5a);
      const bytes = { slab: false as const, memory, byteOffset: 0, lengthBytes: slotBytes };
      const only = ({ results }: WorkerBatchResult): Extract<ChunkTaskResult, { ok: true }> => {
        const result = results[0];
        if (result === undefined || !result.ok) throw new Error(`chunk-io task failed: ${result === undefined ? 'no result' : result.code}`);
        return result;
      };
      const writeTask: WorkerTask = { op: 'batch', tasks: [{ op: 'write', physicalChunk: 0, bytes }] };
      const expected = only(await chunkPool.run(writeTask)).sums ?? new Uint32Array(1);
      // A read plan is triples: physical chunk, chunk count, chunk offset in the task's bytes.
      const readTask: WorkerTask = { op: 'batch', tasks: [{ op: 'read', bytes, plan: Float64Array.of(0, 1, 0), expected, verify: true }] };
      bench
        .add('chunk-io worker: 4 KiB chunk write (page cache)', async () => {
          only(await chunkPool!.run(writeTask));
        })
        .add('chunk-io worker: 4 KiB chunk read, verified (page cache)', async () => {
          if (only(await chunkPool!.run(readTask)).mismatch !== null) throw new Error('checksum mismatch');
        });
    }
    return async () => {
      await pool.close();
      await chunkPool?.close();
      if (chunkDirectory !== null) fs.rmSync(chunkDirectory, { recursive: true, force: true });
    };
  },
};
