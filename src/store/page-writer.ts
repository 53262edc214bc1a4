// A checkpoint's page writes on a thread of their own, a batch of pages a message (page-file.ts's `writePages`).
//
// Why: past the page cache's fill, random writes into a large volume dirty a leaf each at about a leaf a write
// (a 1 TiB volume's map has some 500,000 leaves, a checkpoint some 8,000 dirty ones), and copy-on-write puts the
// new leaves into the pages the last checkpoints freed, scattered through the file: a checkpoint's pages lie in
// runs of one or two, not the runs `writeRun` joins. Each was a job of libuv's pool per copy: a thread's wake-up,
// a pwrite, the answer back through the event loop and a promise: 27 to 51 us of the process's CPU a page (both
// copies) and 14 to 25 of the main thread's, writing 8,192 scattered pages through PageFile; through this thread,
// 256 a message, 15 to 22 and 5 to 7 (the images' encoding, on the main thread). And the pool's 32 jobs in flight
// were the CPU the event loop waited for (BENCHMARKS.md, issue 15, "Who holds the CPUs" and "A checkpoint's
// scattered pages on a thread of their own").
//
// The images go through shared memory: `slabCount` slabs of `batchPages` pages, so that the main thread encodes a
// batch while the thread writes the one before. The thread opens the page file's copies itself, through the
// pool's file layer rebuilt from its spec (as the chunk writer and the chunk I/O workers do), so that a test's
// injected failures, crash points and power cuts reach these writes, named by their paths. A batch's answer is its
// first failure (the rest of the batch is not written), which fails the checkpoint as a failed write through
// libuv's pool would. A thread that dies fails the batches it held (EIO) and is not started again: the page file
// writes those pages again through libuv's pool, and every later checkpoint's.
import { Worker } from 'node:worker_threads';
import type { Log } from '../core/log.ts';
import { ownModule } from '../core/source-files.ts';
import { helperThreadNice } from '../core/thread-priority.ts';
import type { FileLayer, FileLayerSpec } from './file-layer.ts';

/** Pages a batch (a slab) holds: 1 MiB. */
export const batchPages = 256;
/** Slabs, as many batches in flight (one written while the next is encoded). */
export const slabCount = 2;
/** A commit of at least this many pages writes through the thread by default (fewer: libuv's pool, no thread started). */
export const pageWriterMinPages = 256;

/** What the main thread posts: a batch, or the end. */
export type PageWriterRequest = { id: number; slab: number; runs: Float64Array } | { stop: true };
/** What the thread posts: ready (its descriptors open), or a batch's outcome. */
export type PageWriterAnswer = { ready: true } | { ready: false; code: string; message: string } | { id: number; error: { code: string; message: string } | null };

/** A failed write as libuv's would reject: an error with the system's code (ENOSPC, EIO, ...). */
function writeError(code: string, message: string): NodeJS.ErrnoException {
  return Object.assign(new Error(message.startsWith(code) ? message : `${code}: ${message}`), { code, syscall: 'write' });
}

interface Waiting {
  slab: number;
  resolve: () => void;
  reject: (error: Error) => void;
}

export class PageWriter {
  readonly #worker: Worker;
  readonly #slabs: SharedArrayBuffer[];
  readonly #images: Buffer[];
  readonly #freeSlabs: number[];
  readonly #slabWaiters: Array<(slab: number) => void> = [];
  readonly #pending = new Map<number, Waiting>();
  #nextId = 1;
  #ready = false;
  #lost = false;
  #closed = false;

  /**
   * Starts the thread for the copies at `paths`, opened through `files` (its spec) there, with slabs of
   * `slabBytes` (`batchPages` page images); usable once `ready`.
   */
  constructor(files: FileLayer, paths: readonly string[], slabBytes: number, log: Log = () => {}) {
    this.#slabs = Array.from({ length: slabCount }, () => new SharedArrayBuffer(slabBytes));
    this.#images = this.#slabs.map((slab) => Buffer.from(slab));
    this.#freeSlabs = this.#slabs.map((_, index) => index);
    const spec: FileLayerSpec = files.workerSpec;
    this.#worker = new Worker(ownModule('workers', 'page-writer'), { name: 'chunkd-pages', workerData: { files: spec, paths, slabs: this.#slabs, nice: helperThreadNice() } });
    this.#worker.unref();
    this.#worker.on('message', (answer: PageWriterAnswer) => {
      if ('ready' in answer) {
        if (answer.ready) this.#ready = true;
        else {
          log(`metadata page writer thread could not open the page file (${answer.code}: ${answer.message}); checkpoints write through libuv's pool`, 'error');
          this.#lose();
        }
        return;
      }
      const waiting = this.#pending.get(answer.id);
      if (waiting === undefined) return;
      this.#pending.delete(answer.id);
      this.release(waiting.slab);
      if (answer.error === null) waiting.resolve();
      else waiting.reject(writeError(answer.error.code, answer.error.message));
    });
    this.#worker.on('error', (error: Error) => log(`metadata page writer thread failed: ${error.message}`, 'error'));
    this.#worker.on('exit', (code: number) => {
      if (!this.#closed) log(`metadata page writer thread ended (exit code ${code}); checkpoints write through libuv's pool`, 'error');
      this.#lose();
    });
  }

  /** The thread is up with its descriptors open, and neither lost nor closed. */
  get ready(): boolean {
    return this.#ready && !this.#lost && !this.#closed;
  }

  /** The thread ended or failed: no batch will be taken again. */
  get lost(): boolean {
    return this.#lost;
  }

  /** A slab free to encode a batch into (waits while every slab is in flight): its index. */
  acquire(): Promise<number> {
    const free = this.#freeSlabs.pop();
    if (free !== undefined) return Promise.resolve(free);
    return new Promise((resolve) => this.#slabWaiters.push(resolve));
  }

  /** Slab `index`'s bytes (`batchPages` pages). */
  images(index: number): Buffer {
    return this.#images[index]!;
  }

  /**
   * Writes the runs of slab `slab` (`[slab page, pages, file page]` triples) to every copy on the thread; the slab
   * is free again when the promise settles (rejected with the first failure's code).
   */
  write(slab: number, runs: Float64Array): Promise<void> {
    if (!this.ready) {
      this.release(slab);
      return Promise.reject(writeError('EIO', 'the page writer thread is gone'));
    }
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { slab, resolve, reject });
      this.#worker.postMessage({ id, slab, runs } satisfies PageWriterRequest);
    });
  }

  /** Ends the thread once it has written what it holds (its descriptors closed there). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#worker.postMessage({ stop: true } satisfies PageWriterRequest);
  }

  /** Test hook: ends the thread as a crash would, and resolves once it is gone. */
  async stopThreadForTest(): Promise<void> {
    await this.#worker.terminate();
  }

  /** Gives back a slab taken with `acquire` and not written. */
  release(slab: number): void {
    const waiter = this.#slabWaiters.shift();
    if (waiter !== undefined) waiter(slab);
    else this.#freeSlabs.push(slab);
  }

  #lose(): void {
    this.#lost = true;
    for (const [id, waiting] of this.#pending) {
      this.#pending.delete(id);
      this.release(waiting.slab);
      waiting.reject(writeError('EIO', 'the page writer thread ended'));
    }
  }
}
