// What a chunk I/O worker does with one task (workers/chunk-io.ts is the thin piscina entry): a read of whole
// chunks into shared memory, verified against their checksums, or a write of whole chunks from shared memory,
// returning their checksums. Results carry an error code instead of throwing (STYLE.md 8), so a disk error
// crosses the thread boundary intact.
//
// Reads whose bytes are in the page cache are done right here (preadv2 RWF_NOWAIT, native.ts); the rest go
// through libuv's pool (the process's one), many at once: a worker blocked in a synchronous read of a slow disk
// would hold every request queued behind it, and on an emulated EBS volume (1 ms a request) two workers reading
// synchronously gave 1 MiB sequential reads 38 MB/s against 133 for every peer. A task still finishes all its
// I/O before it returns (piscina's caveat: an idle worker sits in Atomics.wait, and nothing pending would run).
// Writes stay synchronous: they land in the page cache.
import { chunkFileBytes, chunkFilePath } from './chunk-file-layout.ts';
import { readFully, type FileLayer } from './file-layer.ts';
import { chunkSizeBytes, openChunkFilesMax } from '../core/limits.ts';
import { sharedView, type SharedBytes } from '../core/shared-bytes.ts';
import { chunkSums, firstPlanMismatch, type Mismatch } from './chunk-io.ts';

/** A task's bytes: in slab 0, the one the worker was given at start, or in a shared buffer of their own (shared-bytes.ts). */
export type TaskMemory = SharedBytes;

export type ChunkTask =
  | { op: 'read'; bytes: TaskMemory; plan: Float64Array; expected: Uint32Array; verify: boolean }
  | { op: 'write'; physicalChunk: number; bytes: TaskMemory }
  /** Test hook (only when the pool was made with testHooks): the worker dies mid-task, as on a fatal error. */
  | { op: 'die'; afterMs: number };

export type ChunkTaskResult =
  | { ok: true; mismatch: Mismatch | null; sums: Uint32Array | null; filesWritten: number[] }
  | { ok: false; code: string; message: string };

/** What a worker runs: several chunk tasks at once (one hand-off, one wake-up of the thread, for all), or the test hook. */
export type WorkerTask = { op: 'batch'; tasks: ChunkTask[] } | Extract<ChunkTask, { op: 'die' }>;
/** A batch's results, and when the worker took it up (ms on the clock threads share: timeOrigin + now). */
export interface WorkerBatchResult {
  startedAtMs: number;
  results: ChunkTaskResult[];
}

/** A worker's own descriptors of the chunk files (opened on first use; all closed past openChunkFilesMax). */
export class ChunkTaskRunner {
  readonly #directory: string;
  readonly #files: FileLayer;
  readonly #testHooks: boolean;
  /** The slab the worker was given at start, as slab 0, or none. */
  readonly #slabs = new Map<number, SharedArrayBuffer>();
  /** Open chunk files; `reads`: asynchronous reads still using the descriptor, which must not be closed under them. */
  readonly #fds = new Map<number, { fd: number; reads: number }>();
  /** Descriptors dropped from #fds while reads still used them: closed when the last one ends. */
  readonly #closing = new Map<number, { fd: number; reads: number }>();

  constructor(directory: string, files: FileLayer, slab: SharedArrayBuffer | null, testHooks: boolean) {
    this.#directory = directory;
    this.#files = files;
    if (slab !== null) this.#slabs.set(0, slab);
    this.#testHooks = testHooks;
  }

  #view(bytes: TaskMemory): Uint8Array {
    const view = sharedView(bytes, this.#slabs);
    if (view === null) throw Object.assign(new Error('a task names a slab this worker was not given'), { code: 'EINVAL' });
    return view;
  }

  /** Runs a batch, its tasks side by side; each succeeds or fails on its own. */
  runBatch(task: WorkerTask): ChunkTaskResult[] | Promise<ChunkTaskResult[]> {
    if (task.op === 'die') return [this.run(task) as ChunkTaskResult];
    const results = task.tasks.map((one) => this.run(one));
    return results.some((result) => result instanceof Promise) ? Promise.all(results) : (results as ChunkTaskResult[]);
  }

  /** A task's result: at once when every byte it read was in the page cache, else once its reads are done. */
  run(task: ChunkTask): ChunkTaskResult | Promise<ChunkTaskResult> {
    // Reads still running: every one settles before the task answers, also when one fails or a later step throws,
    // so that none lands in the buffer after the main thread has taken it back.
    const waits: Array<Promise<void>> = [];
    const afterReads = (result: () => ChunkTaskResult): ChunkTaskResult | Promise<ChunkTaskResult> => {
      if (waits.length === 0) return result();
      return Promise.allSettled(waits).then((settled) => {
        const failed = settled.find((outcome) => outcome.status === 'rejected');
        if (failed !== undefined) return failure(failed.reason);
        try {
          return result();
        } catch (error) {
          return failure(error);
        }
      });
    };
    try {
      switch (task.op) {
        case 'read': {
          const target = this.#view(task.bytes);
          for (let p = 0; p < task.plan.length; p += 3) {
            const start = task.plan[p + 2]! * chunkSizeBytes;
            this.#each(task.plan[p]!, target.subarray(start, start + task.plan[p + 1]! * chunkSizeBytes), (file, part, position) => {
              const waiting = readCachedOrLater(this.#files, file.fd, part, position);
              if (waiting !== null) waits.push(this.#using(file, waiting));
            });
          }
          return afterReads(() => ({ ok: true, mismatch: task.verify ? firstPlanMismatch(target, task.plan, task.expected) : null, sums: null, filesWritten: [] }));
        }
        case 'write': {
          const data = this.#view(task.bytes);
          const sums = chunkSums(data);
          const filesWritten = this.#each(task.physicalChunk, data, (file, part, position) => this.#files.writeSync(file.fd, part, position));
          return { ok: true, mismatch: null, sums, filesWritten };
        }
        case 'die': {
          if (!this.#testHooks) return { ok: false, code: 'EINVAL', message: 'test hooks are off' };
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, task.afterMs);
          process.exit(70);
        }
      }
    } catch (error) {
      return afterReads(() => failure(error));
    }
  }

  /** Closes every descriptor no read is using; the others close when their last read ends. */
  close(): void {
    for (const [fileIndex, file] of this.#fds) {
      if (file.reads === 0) this.#files.close(file.fd);
      else this.#closing.set(file.fd, file);
      this.#fds.delete(fileIndex);
    }
  }

  /** Counts an asynchronous read against its descriptor until it settles. */
  #using(file: { fd: number; reads: number }, read: Promise<void>): Promise<void> {
    file.reads += 1;
    return read.finally(() => {
      file.reads -= 1;
      if (file.reads === 0 && this.#closing.delete(file.fd)) this.#files.close(file.fd);
    });
  }

  /** Runs `action` on each chunk file's part of a span of chunks; returns the file indexes touched. */
  #each(physicalChunk: number, bytes: Uint8Array, action: (file: { fd: number; reads: number }, part: Uint8Array, position: number) => void): number[] {
    const files: number[] = [];
    let done = 0;
    while (done < bytes.length) {
      const position = physicalChunk * chunkSizeBytes + done;
      const fileIndex = Math.floor(position / chunkFileBytes);
      const inFile = position - fileIndex * chunkFileBytes;
      const length = Math.min(bytes.length - done, chunkFileBytes - inFile);
      action(this.#fd(fileIndex), bytes.subarray(done, done + length), inFile);
      files.push(fileIndex);
      done += length;
    }
    return files;
  }

  #fd(fileIndex: number): { fd: number; reads: number } {
    let file = this.#fds.get(fileIndex);
    if (file === undefined) {
      if (this.#fds.size >= openChunkFilesMax) this.close();
      const fd = this.#files.openSync(chunkFilePath(this.#directory, fileIndex), 'create');
      file = { fd, reads: 0 };
      this.#fds.set(fileIndex, file);
    }
    return file;
  }
}

function failure(error: unknown): ChunkTaskResult {
  const code = (error as NodeJS.ErrnoException).code;
  return { ok: false, code: typeof code === 'string' ? code : 'EIO', message: (error as Error).message };
}

/**
 * Fills `target` from `position` now with what the page cache holds, and returns null when that was all of it;
 * else returns the read of the rest through libuv's pool. Past the end of a sparse file reads zeros.
 */
function readCachedOrLater(files: FileLayer, fd: number, target: Uint8Array, position: number): Promise<void> | null {
  const cached = files.readCached(fd, target, position);
  if (cached === 0) target.fill(0);
  if (cached === 0 || cached === target.length) return null;
  const done = Math.max(cached, 0);
  return readFully(files, fd, target.subarray(done), position + done);
}
