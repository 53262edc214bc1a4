// What a chunk I/O worker does with one task (workers/chunk-io.ts is the thin piscina entry): a read of whole
// chunks into shared memory, verified against their checksums, or a write of whole chunks from shared memory,
// returning their checksums. The I/O is synchronous: a piscina worker must finish its I/O before the task
// returns (an idle worker sits in Atomics.wait), and a blocked worker thread blocks nobody else. Results carry
// an error code instead of throwing (STYLE.md 8), so a disk error crosses the thread boundary intact.
import fs from 'node:fs';
import path from 'node:path';
import { chunkSizeBytes, chunksPerFile, openChunkFilesMax } from '../core/limits.ts';
import { chunkSums, firstPlanMismatch, type Mismatch } from './chunk-io.ts';

const fileBytes = chunksPerFile * chunkSizeBytes;

/** A task's bytes: in the slab the worker was given at start (named, so no SharedArrayBuffer is cloned per task), or in a shared buffer of their own. */
export type TaskMemory = { slab: true; byteOffset: number; lengthBytes: number } | { slab: false; memory: SharedArrayBuffer; byteOffset: number; lengthBytes: number };

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

/** A worker's own descriptors of the chunk files (opened on first use; all closed past openChunkFilesMax). */
export class ChunkTaskRunner {
  readonly #directory: string;
  readonly #testHooks: boolean;
  readonly #slab: SharedArrayBuffer | null;
  readonly #fds = new Map<number, number>();

  constructor(directory: string, slab: SharedArrayBuffer | null, testHooks: boolean) {
    this.#directory = directory;
    this.#slab = slab;
    this.#testHooks = testHooks;
  }

  #view(bytes: TaskMemory): Uint8Array {
    const memory = bytes.slab ? this.#slab : bytes.memory;
    if (memory === null) throw Object.assign(new Error('a task names a slab this worker was not given'), { code: 'EINVAL' });
    return new Uint8Array(memory, bytes.byteOffset, bytes.lengthBytes);
  }

  /** Runs a batch in order; each task succeeds or fails on its own. */
  runBatch(task: WorkerTask): ChunkTaskResult[] {
    if (task.op === 'die') return [this.run(task)];
    return task.tasks.map((one) => this.run(one));
  }

  run(task: ChunkTask): ChunkTaskResult {
    try {
      switch (task.op) {
        case 'read': {
          const target = this.#view(task.bytes);
          for (let p = 0; p < task.plan.length; p += 3) {
            const start = task.plan[p + 2]! * chunkSizeBytes;
            this.#each(task.plan[p]!, target.subarray(start, start + task.plan[p + 1]! * chunkSizeBytes), (fd, part, position) => readFully(fd, part, position));
          }
          return { ok: true, mismatch: task.verify ? firstPlanMismatch(target, task.plan, task.expected) : null, sums: null, filesWritten: [] };
        }
        case 'write': {
          const data = this.#view(task.bytes);
          const sums = chunkSums(data);
          const filesWritten = this.#each(task.physicalChunk, data, (fd, part, position) => writeFully(fd, part, position));
          return { ok: true, mismatch: null, sums, filesWritten };
        }
        case 'die': {
          if (!this.#testHooks) return { ok: false, code: 'EINVAL', message: 'test hooks are off' };
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, task.afterMs);
          process.exit(70);
        }
      }
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      return { ok: false, code: typeof code === 'string' ? code : 'EIO', message: (error as Error).message };
    }
  }

  close(): void {
    for (const fd of this.#fds.values()) fs.closeSync(fd);
    this.#fds.clear();
  }

  /** Runs `action` on each chunk file's part of a span of chunks; returns the file indexes touched. */
  #each(physicalChunk: number, bytes: Uint8Array, action: (fd: number, part: Uint8Array, position: number) => void): number[] {
    const files: number[] = [];
    let done = 0;
    while (done < bytes.length) {
      const position = physicalChunk * chunkSizeBytes + done;
      const fileIndex = Math.floor(position / fileBytes);
      const inFile = position - fileIndex * fileBytes;
      const length = Math.min(bytes.length - done, fileBytes - inFile);
      action(this.#fd(fileIndex), bytes.subarray(done, done + length), inFile);
      files.push(fileIndex);
      done += length;
    }
    return files;
  }

  #fd(fileIndex: number): number {
    let fd = this.#fds.get(fileIndex);
    if (fd === undefined) {
      if (this.#fds.size >= openChunkFilesMax) this.close();
      fd = fs.openSync(path.join(this.#directory, `${fileIndex.toString().padStart(8, '0')}.chunk`), fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
      this.#fds.set(fileIndex, fd);
    }
    return fd;
  }
}

/** Reads until full; past the end of a sparse file reads zeros. */
function readFully(fd: number, target: Uint8Array, position: number): void {
  let done = 0;
  while (done < target.length) {
    const n = fs.readSync(fd, target, done, target.length - done, position + done);
    if (n === 0) {
      target.fill(0, done);
      return;
    }
    done += n;
  }
}

/** Writes all of it; a short write is looped, not an error. */
function writeFully(fd: number, data: Uint8Array, position: number): void {
  let done = 0;
  while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, position + done);
}
