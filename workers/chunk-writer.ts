// The chunk writer's thread (src/store/chunk-writer.ts): one pwrite at a time, handed over in shared memory.
import { workerData } from 'node:worker_threads';
import { runChunkWriter } from '../src/store/chunk-writer.ts';
import { fileLayerFromSpec, type FileLayerSpec } from '../src/store/file-layer.ts';

const files = workerData.files as FileLayerSpec | undefined;
// Over the real files it pwrites directly; under a test's layer, through it (faults, power cuts).
const layer = files === undefined || files.kind === 'real' ? null : await fileLayerFromSpec(files);
runChunkWriter(workerData.control as SharedArrayBuffer, workerData.slab as SharedArrayBuffer, layer);
