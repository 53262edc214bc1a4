// The chunk writer's thread (src/store/chunk-writer.ts): one pwrite at a time, handed over in shared memory.
import { workerData } from 'node:worker_threads';
import { setThisThreadNice } from '../src/core/thread-priority.ts';
import { runChunkWriter } from '../src/store/chunk-writer.ts';
import type { FileLayerSpec } from '../src/store/file-layer.ts';

// Below the event loop's priority (src/core/thread-priority.ts).
if (typeof workerData.nice === 'number') setThisThreadNice(workerData.nice);
const files = workerData.files as FileLayerSpec | undefined;
// Over the real files it pwrites directly (nothing more loaded); under a test's layer, through it (faults and
// power cuts reach its writes).
const layer = files === undefined || files.kind === 'real' ? null : await (await import('../src/store/file-layer.ts')).fileLayerFromSpec(files);
runChunkWriter(workerData.control as SharedArrayBuffer, workerData.slab as SharedArrayBuffer, layer);
