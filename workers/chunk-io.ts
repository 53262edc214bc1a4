// piscina task module: chunk reads, writes and checksums on a worker thread (the logic: src/store/chunk-task.ts).
import { workerData } from 'node:worker_threads';
import { ChunkTaskRunner, type ChunkTask, type ChunkTaskResult } from '../src/store/chunk-task.ts';

const runner = new ChunkTaskRunner(workerData.chunkDirectory as string, (workerData.slab as SharedArrayBuffer | undefined) ?? null, workerData.testHooks === true);

export default function chunkTask(task: ChunkTask): ChunkTaskResult {
  return runner.run(task);
}
