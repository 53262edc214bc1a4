// Chunk I/O on worker threads (piscina): each read or write of whole chunks is one task, run by one of N workers
// that each hold their own descriptors of the chunk files (chunk-task.ts). Bytes never cross the boundary by
// copy when they live in shared memory (shared-buffers.ts: the NBD server's request buffers); any other buffer
// is staged through a shared one. A request is one task however many runs of chunks it covers; a worker reads
// what the page cache holds at once and the rest through libuv's pool, many at a time (chunk-task.ts). Per-block
// order is the volume's range lock's business, upstream of here.
//
// A worker that dies (an exception that escapes, out of memory, the test hook) makes piscina reject the task it
// was running: that request fails with EIO, piscina starts a replacement, and the node goes on serving. Tasks
// queued behind it are not lost: they stay in piscina's queue and run on the replacement.
import os from 'node:os';
import { Piscina } from 'piscina';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, inlineCachedReadBytesMax, inlineReadBytesMax, inlineWriteBytesMax, workerTasksQueuedMax } from '../core/limits.ts';
import { isShared, SharedBufferPool } from '../core/shared-buffers.ts';
import { sharedBytesOf } from '../core/shared-bytes.ts';
import { TurnBatch } from '../core/turn-batch.ts';
import type { ChunkFiles } from './chunk-files.ts';
import { ChunkWriter } from './chunk-writer.ts';
import { InlineChunkIo, type ChunkIo, type IoEngineStatus, type Mismatch } from './chunk-io.ts';
import type { ChunkTask, ChunkTaskResult, TaskMemory, WorkerBatchResult, WorkerTask } from './chunk-task.ts';
import { observeLatency, type LatencyHistogram } from '../core/latency-histogram.ts';
import { performance } from 'node:perf_hooks';
import { ownModule } from '../core/source-files.ts';
import { helperThreadNice } from '../core/thread-priority.ts';
import type { Log } from '../core/log.ts';

const workerModule = ownModule('workers', 'chunk-io');

type PendingTask = { task: ChunkTask; askedAtMs: number; resolve: (result: ChunkTaskResult) => void; reject: (error: Error) => void };

/** piscina's live view of one worker (its getters read the worker's state now). */
interface WorkerView {
  readonly id: number;
  readonly currentUsage: number;
  readonly destroyed: boolean;
}

export interface WorkerIoOptions {
  workerCount: number;
  /** Shared buffers for staging bytes that are not in shared memory already. */
  buffers: SharedBufferPool;
  log: Log;
  /** Lets tests kill a worker (the 'die' task). */
  testHooks?: boolean;
  /** Where each task's wait for a worker (from being asked to a worker taking its batch up) is counted. */
  waitTimes?: LatencyHistogram;
  /**
   * The threads (the workers and the chunk writer's) start when this settles, not at once: a node starts them
   * after its ready line, so that their boots (a Node realm and modules each, about 45 ms of CPU for three) do
   * not take CPU from its start (BENCHMARKS.md, issue 15, "The fixed part of a node's start"). Until then all
   * I/O is done as with no workers (InlineChunkIo: this thread and libuv's pool).
   */
  threadsAfter?: Promise<void>;
}

/** The default worker count: one per CPU the process may use. */
export function defaultWorkerCount(): number {
  return os.availableParallelism();
}

export class WorkerChunkIo implements ChunkIo {
  /** Small requests (and, until the threads start, all of them), done on this thread. */
  #inline: InlineChunkIo;
  /** Small writes whose bytes are in the shared slab, when it takes them (chunk-writer.ts); null until the threads start. */
  #writer: ChunkWriter | null = null;
  /** Null until the threads start (options.threadsAfter). */
  #pool: Piscina<WorkerTask, WorkerBatchResult> | null = null;
  readonly #files: ChunkFiles;
  readonly #options: WorkerIoOptions;
  readonly #workerCount: number;
  /** Tasks asked for in this turn of the event loop, handed out together at its end (#dispatch). */
  readonly #pending = new TurnBatch<PendingTask>((pending) => this.#dispatch(pending));
  readonly #buffers: SharedBufferPool;
  readonly #log: Log;
  readonly #waitTimes: LatencyHistogram | undefined;
  /** Workers, with the thread id each had when it started (the view's id reads -1 once its thread is gone). */
  readonly #workers = new Map<WorkerView, number>();
  #restarts = 0;
  #closing = false;

  constructor(files: ChunkFiles, options: WorkerIoOptions) {
    this.#files = files;
    this.#options = options;
    this.#inline = new InlineChunkIo(files);
    this.#buffers = options.buffers;
    this.#log = options.log;
    this.#waitTimes = options.waitTimes;
    this.#workerCount = options.workerCount;
    if (options.threadsAfter === undefined) this.#startThreads();
    else {
      // After a node's ready line a failure to start them (no thread or memory to be had) must not stop the node:
      // its I/O goes on here, as with --workers 0, and the log says so.
      options.threadsAfter.then(() => this.#startThreads()).catch((error: unknown) => {
        this.#log(`chunk I/O threads did not start (${error instanceof Error ? error.message : String(error)}): chunk I/O stays on the main thread`, 'error');
      });
    }
  }

  /** Starts the chunk writer's thread and the workers (once; never after close). */
  #startThreads(): void {
    if (this.#closing || this.#pool !== null) return;
    const files = this.#files;
    const options = this.#options;
    // Under a test's file layer (a faulty or power-loss twin) too: the writer's thread writes through it.
    this.#writer = new ChunkWriter(options.buffers.slab, { files: files.layer, log: options.log });
    this.#inline = new InlineChunkIo(files, this.#writer);
    this.#pool = new Piscina<WorkerTask, WorkerBatchResult>({
      filename: workerModule,
      minThreads: options.workerCount,
      maxThreads: options.workerCount,
      idleTimeout: Number.MAX_SAFE_INTEGER,
      concurrentTasksPerWorker: 1 + workerTasksQueuedMax,
      workerData: { chunkDirectory: files.directory, files: files.layer.workerSpec, slab: options.buffers.slab, testHooks: options.testHooks === true, nice: helperThreadNice() },
    });
    this.#pool.on('workerCreate', (worker: WorkerView) => this.#workers.set(worker, worker.id));
    this.#pool.on('workerDestroy', () => {
      // The view given here is a new object: find the destroyed worker among those we know.
      let id: number | undefined;
      for (const [view, viewId] of this.#workers) {
        if (!view.destroyed) continue;
        id = viewId;
        this.#workers.delete(view);
      }
      if (this.#closing) return;
      this.#restarts += 1;
      this.#log(`chunk I/O worker ${id} died; its requests failed with EIO and a new worker takes its place`, 'error');
    });
    // A worker error outside any task (piscina emits it here): log it rather than crash the node.
    this.#pool.on('error', (error: Error) => this.#log(`chunk I/O worker error: ${error.message}`, 'error'));
  }

  readChunks(target: Buffer, plan: Float64Array, expected: Uint32Array, verify: boolean): Mismatch | null | Promise<Mismatch | null> {
    // A small request whose bytes are in the page cache costs a microsecond or two here, and a hand-off to a
    // worker and back costs more than that: it stays on this thread, and so does one that misses the cache (its
    // read goes to libuv's pool from here: through a worker it would cross two more threads, and its checksum is
    // well under a microsecond). A large one goes to a worker whole, as one task however many runs it is made of
    // (a range rewritten at random), so its reads and checksums leave here.
    if (target.length <= inlineReadBytesMax || this.#pool === null) return this.#inline.readChunks(target, plan, expected, verify);
    // A larger one (up to 1 MiB) whose bytes are all in the page cache is read here too: its copy and checksum
    // cost this thread about 0.2 ms per MiB, and the hand-off to a worker and back cost more CPU than that in all
    // (thread wake-ups, piscina's messages), taken from cores that are busy anyway on a small machine (fio, this
    // thread, other work): 1 MiB reads at QD8 went from about 0.7 to about 0.45 CPU seconds per GB on 2 vCPUs
    // (BENCHMARKS.md, issue 19). What misses the cache, and larger reads, still go to a worker.
    if (target.length <= inlineCachedReadBytesMax) {
      const mismatch = this.#inline.readCachedChunks(target, plan, expected, verify);
      if (mismatch !== undefined) return mismatch;
    }
    return this.#readInWorker(target, plan, expected, verify);
  }

  async #readInWorker(target: Buffer, plan: Float64Array, expected: Uint32Array, verify: boolean): Promise<Mismatch | null> {
    const staged = isShared(target) ? null : this.#buffers.acquire(target.length);
    const memory = staged ?? target;
    try {
      const result = await this.#run({ op: 'read', bytes: this.#taskMemory(memory), plan, expected, verify });
      if (staged !== null) {
        for (let p = 0; p < plan.length; p += 3) {
          const start = plan[p + 2]! * chunkSizeBytes;
          staged.copy(target, start, start, start + plan[p + 1]! * chunkSizeBytes);
        }
      }
      return result.mismatch;
    } finally {
      if (staged !== null) this.#buffers.release(staged);
    }
  }

  async writeSummed(physicalChunk: number, data: Buffer, sums?: Uint32Array): Promise<Uint32Array> {
    // A write's checksums cost well under a microsecond per 4 KiB here (about 0.1 ms per MiB), and libuv's pool
    // takes its pwrite with a lighter hand-off than a worker task (4 KiB at QD1: 40k/s against 17k/s through a
    // worker; 1 MiB at QD8: less CPU per GB, limits.ts), and the chunk writer (chunk-writer.ts) a lighter one
    // still for a turn's first small write. Only writes larger than 1 MiB go to a worker.
    // Given sums go with an inline write; a worker sums what it writes (it reads the bytes anyway).
    if (data.length <= inlineWriteBytesMax || this.#pool === null) return this.#inline.writeSummed(physicalChunk, data, sums);
    let staged: Buffer | null = null;
    if (!isShared(data)) {
      staged = this.#buffers.acquire(data.length);
      data.copy(staged);
    }
    const memory = staged ?? data;
    try {
      const result = await this.#run({ op: 'write', physicalChunk, bytes: this.#taskMemory(memory) });
      for (const fileIndex of result.filesWritten) this.#files.markDirty(fileIndex);
      return result.sums!;
    } finally {
      if (staged !== null) this.#buffers.release(staged);
    }
  }

  /** Test hook: one worker dies `afterMs` into its task (the pool must have been made with testHooks). */
  async killOneWorkerForTest(afterMs: number): Promise<void> {
    assert(this.#pool !== null, 'the workers have started');
    await this.#pool.run({ op: 'die', afterMs }).catch((error: Error) => {
      throw ChunkdError.io(`chunk I/O worker failed: ${error.message}`, error);
    });
  }

  status(): IoEngineStatus {
    return {
      engine: 'workers',
      workers: [...this.#workers].map(([worker, id]) => ({ id, inFlight: worker.currentUsage })),
      queued: this.#pool?.queueSize ?? 0,
      workerRestarts: this.#restarts,
      ...(this.#writer === null ? {} : { smallWrites: this.#writer.counts() }),
    };
  }

  async close(options?: { force?: boolean }): Promise<void> {
    this.#closing = true;
    this.#writer?.close();
    if (this.#pool === null) return;
    if (options?.force) await this.#pool.destroy();
    else await this.#pool.close();
  }

  /**
   * Hands this turn's tasks to the workers, spread evenly, one batch per worker: waking a worker thread costs
   * more than a small read or write itself (measured on 2 vCPUs: piscina's postTask took 14 us per task), so
   * a busy turn pays it once per worker instead of once per request.
   */
  #dispatch(pending: PendingTask[]): void {
    const pool = this.#pool;
    // Tasks are queued (#run) only once the workers have started, and they are never stopped but by close.
    assert(pool !== null, 'tasks are queued for started workers only');
    const waitTimes = this.#waitTimes;
    const batchCount = Math.min(this.#workerCount, pending.length);
    for (let b = 0; b < batchCount; b++) {
      const batch = pending.filter((_, i) => i % batchCount === b);
      pool.run({ op: 'batch', tasks: batch.map((entry) => entry.task) }).then(
        ({ startedAtMs, results }) => {
          if (waitTimes !== undefined) for (const entry of batch) observeLatency(waitTimes, Math.max(0, startedAtMs - entry.askedAtMs) / 1000);
          batch.forEach((entry, i) => entry.resolve(results[i]!));
        },
        (error: Error) => {
          const failure = ChunkdError.io(`chunk I/O worker failed: ${error.message}`, error);
          for (const entry of batch) entry.reject(failure);
        },
      );
    }
  }

  /** The worker was given the slab at start as slab 0 (workerData). */
  #taskMemory(buffer: Buffer): TaskMemory {
    return sharedBytesOf(buffer, this.#buffers.slab, 0);
  }

  async #run(task: ChunkTask): Promise<Extract<ChunkTaskResult, { ok: true }>> {
    const result = await new Promise<ChunkTaskResult>((resolve, reject) => {
      this.#pending.add({ task, askedAtMs: performance.timeOrigin + performance.now(), resolve, reject });
    });
    if (!result.ok) {
      const error = Object.assign(new Error(result.message), { code: result.code }) as NodeJS.ErrnoException;
      throw error;
    }
    return result;
  }
}
