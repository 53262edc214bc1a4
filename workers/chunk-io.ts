// piscina task module: chunk reads, writes and checksums on a worker thread (the logic: src/store/chunk-task.ts).
import { workerData } from 'node:worker_threads';
import { ChunkTaskRunner, type ChunkTaskResult, type WorkerTask } from '../src/store/chunk-task.ts';
import { fileLayerFromSpec, type FileLayerSpec } from '../src/store/file-layer.ts';

const files = await fileLayerFromSpec((workerData.files as FileLayerSpec | undefined) ?? { kind: 'real' });
const runner = new ChunkTaskRunner(workerData.chunkDirectory as string, files, (workerData.slab as SharedArrayBuffer | undefined) ?? null, workerData.testHooks === true);

export default function chunkTasks(task: WorkerTask): ChunkTaskResult[] | Promise<ChunkTaskResult[]> {
  return runner.runBatch(task);
}
