// piscina task module: chunk reads, writes and checksums on a worker thread (the logic: src/store/chunk-task.ts).
import { workerData } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { setThisThreadNice } from '../src/core/thread-priority.ts';
import { ChunkTaskRunner, type WorkerBatchResult, type WorkerTask } from '../src/store/chunk-task.ts';
import { fileLayerFromSpec, type FileLayerSpec } from '../src/store/file-layer.ts';

// Below the event loop's priority (src/core/thread-priority.ts).
if (typeof workerData.nice === 'number') setThisThreadNice(workerData.nice);
const files = await fileLayerFromSpec((workerData.files as FileLayerSpec | undefined) ?? { kind: 'real' });
const runner = new ChunkTaskRunner(workerData.chunkDirectory as string, files, (workerData.slab as SharedArrayBuffer | undefined) ?? null, workerData.testHooks === true);

export default function chunkTasks(task: WorkerTask): WorkerBatchResult | Promise<WorkerBatchResult> {
  // When the batch is taken up: the main thread counts the time before it as the wait for a worker.
  const startedAtMs = performance.timeOrigin + performance.now();
  const results = runner.runBatch(task);
  return results instanceof Promise ? results.then((done) => ({ startedAtMs, results: done })) : { startedAtMs, results };
}
