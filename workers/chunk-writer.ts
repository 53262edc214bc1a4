// The chunk writer's thread (src/store/chunk-writer.ts): one pwrite at a time, handed over in shared memory.
import { workerData } from 'node:worker_threads';
import { runChunkWriter } from '../src/store/chunk-writer.ts';

runChunkWriter(workerData.control as SharedArrayBuffer, workerData.slab as SharedArrayBuffer);
