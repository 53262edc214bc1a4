// The metadata page writer's thread (src/store/page-writer.ts): a batch of page images a message, pwritten to
// every copy of the page file, opened here through the pool's file layer.
import { parentPort, workerData } from 'node:worker_threads';
import { setThisThreadNice } from '../src/core/thread-priority.ts';
import { fileLayerFromSpec, type FileLayer, type FileLayerSpec } from '../src/store/file-layer.ts';
import { pageBytes, sealPageImage } from '../src/store/page-file.ts';
import type { PageWriterAnswer, PageWriterRequest } from '../src/store/page-writer.ts';

/**
 * The thread's side: seals each page of a batch's runs (`[slab page, pages, file page]` triples: the main thread
 * encoded them but for their checksums) and writes each run to every copy, in order. Answers the first failure
 * (the rest of the batch is not written), or null.
 */
function writeBatch(files: FileLayer, fds: readonly number[], slab: Buffer, runs: Float64Array): { code: string; message: string } | null {
  try {
    for (let at = 0; at < runs.length; at += 3) {
      const start = runs[at]! * pageBytes;
      const bytes = slab.subarray(start, start + runs[at + 1]! * pageBytes);
      for (let page = 0; page < bytes.length; page += pageBytes) sealPageImage(bytes.subarray(page, page + pageBytes));
      for (const fd of fds) files.writeSync(fd, bytes, runs[at + 2]! * pageBytes);
    }
    return null;
  } catch (error) {
    return failureOf(error);
  }
}

/** An error as the main thread rebuilds it: its system code (EIO where it has none) and message. */
function failureOf(error: unknown): { code: string; message: string } {
  const code = (error as NodeJS.ErrnoException).code;
  return { code: typeof code === 'string' ? code : 'EIO', message: (error as Error).message };
}

const port = parentPort!;
// Below the event loop's priority (thread-priority.ts): a checkpoint's 8,000 pages are one stretch of this
// thread's CPU, which on 2 vCPUs with the client beside the node kept the event loop waiting for a CPU.
if (typeof workerData.nice === 'number') setThisThreadNice(workerData.nice);
const files = await fileLayerFromSpec(workerData.files as FileLayerSpec);
const slabs = (workerData.slabs as SharedArrayBuffer[]).map((slab) => Buffer.from(slab));
const fds: number[] = [];
try {
  for (const path of workerData.paths as string[]) fds.push(files.openSync(path, 'write'));
  port.postMessage({ ready: true } satisfies PageWriterAnswer);
} catch (error) {
  for (const fd of fds) files.close(fd);
  port.postMessage({ ready: false, ...failureOf(error) } satisfies PageWriterAnswer);
  process.exit(0);
}
port.on('message', (request: PageWriterRequest) => {
  if ('stop' in request) {
    for (const fd of fds) files.close(fd);
    port.close();
    return;
  }
  port.postMessage({ id: request.id, error: writeBatch(files, fds, slabs[request.slab]!, request.runs) } satisfies PageWriterAnswer);
});
