// Small chunk writes without a round of the event loop: pwritten on the calling thread, or, while ext4 is seen to
// hold such writes up, on a thread of their own, handed over in shared memory, that the main thread waits for
// briefly instead of coming back for the answer through the event loop.
//
// Why: a 4 KiB write at queue depth 1 through libuv's pool costs the main thread a round of its event loop: the
// pool thread's answer comes back through an eventfd, an epoll wake-up, libuv's async handle and a callback,
// while the pwrite itself (into the page cache) takes a few microseconds. Handed to this module's thread it costs
// two thread switches instead (the thread's wake-up and the main thread's), which on a small busy machine are
// most of a QD1 write's CPU (BENCHMARKS.md, issue 19). So the main thread does the pwrite itself, as nbdkit's
// threads do, and times it: ext4 blocks a pwrite for milliseconds now and then (a journal commit, writeback), and
// the event loop with it, so one that took longer than `inlineStallMs` sends the writes of the next
// `inlinePauseMs` to the thread: the event loop waits on a pwrite for longer than that at most once per pause.
// (Measured at queue depth 1 on 2 busy vCPUs: 99.7% of these pwrites took under 0.1 ms, about one in 5,000 over
// 1 ms, one in 20,000 over 5 ms.) And only while requests come one at a time (core/request-overlap.ts): under a
// stream of writes the kernel holds a writer up now and then (the throttling of writers past the dirty limit, or a
// journal commit), for 118-141 ms at a time into a 1 TiB volume at queue depth 32, and an inline pwrite held the
// event loop that long (BENCHMARKS.md, issue 15, "Where a pause goes"); at queue depth 1 nothing else waits for the
// event loop meanwhile.
//
// The thread: the main thread hands the write over (its bytes are in the shared slab already: the NBD payload
// buffers) and waits for it on a futex for at most `waitMs`: the usual pwrite is over well within that and the
// request goes on at once; one that ext4 holds up is waited for asynchronously (Atomics.waitAsync) while the
// event loop serves other requests.
//
// Either way a write is complete (in the page cache, or failed) when its promise settles, as through libuv: the
// caller records its chunks and marks the file for the next sync only then.
//
// A failed pwrite (or a thread that died with a write in hand: EIO) rejects that write with its code, as the file
// layer's write would: the chunk store gives the chunks back and the client gets the error (ENOSPC, EIO), and no
// record names them, so no commit ever does. Both ways write through the pool's file layer when that is a test's
// twin (test-files.ts, power-loss.ts; in the thread rebuilt from its spec, counters and freeze shared), so that
// injected failures and power cuts reach these writes too; over the real files they pwrite directly.
//
// One write at a time, and at most one per turn of the event loop (so that a busy turn, queue depth 32, does not
// wait for its writes one after another: the others go through libuv's pool as before). `write` answers null
// when it does not take a write, and the caller writes another way.
import { Worker } from 'node:worker_threads';
import fs from 'node:fs';
import util from 'node:util';
import type { FileLayer, FileLayerSpec } from './file-layer.ts';
import { ownModule } from '../core/source-files.ts';
import { helperThreadNice } from '../core/thread-priority.ts';
import type { Log } from '../core/log.ts';
import { requestOverlap } from '../core/request-overlap.ts';

/** Slots of the control block (an Int32Array); the position is a Float64 at positionByte. */
const seqSlot = 0;
const doneSlot = 1;
const fdSlot = 2;
const offsetSlot = 3;
const lengthSlot = 4;
const resultSlot = 5;
const positionByte = 32;
const controlBytes = 64;
/** SEQ's value that tells the thread to end. */
const stopSeq = -1;
/** Job numbers run 1..seqMax and round again (never 0, the start, nor stopSeq). */
const seqMax = 1 << 30;

/** How long the main thread waits for a write before it waits asynchronously, by default. */
export const chunkWriterWaitMs = 0.2;
/**
 * A pwrite on the calling thread that took longer than this (ms, wall time) sends the next writes to the thread, by
 * default. Above the few milliseconds a busy machine's scheduler takes the thread away for (a 1 ms bound sent a
 * third of the writes to the thread on 2 vCPUs at a load of 15, for no pwrite of ext4's own).
 */
export const inlineStallMs = 5;
/** For how long (ms) after such a pwrite writes go to the thread (ext4's stalls come one at a time, seconds apart). */
export const inlinePauseMs = 500;

export interface ChunkWriterOptions {
  /** See chunkWriterWaitMs. */
  waitMs?: number;
  /** See inlineStallMs; null: every write goes to the thread. */
  inlineStallMs?: number | null;
  /** See inlinePauseMs. */
  inlinePauseMs?: number;
  /** The pool's file layer (default the real files): a test's twin, both ways write through (see the top). */
  files?: FileLayer;
  /** Where a thread that failed or ended on its own is reported (the node's log); none: not reported. */
  log?: Log;
}

/**
 * The thread's loop: waits for a job, pwrites it whole, posts the result (bytes written or -errno), again;
 * through `layer` when given (a test's file layer), else directly.
 */
export function runChunkWriter(control: SharedArrayBuffer, slab: SharedArrayBuffer, layer: FileLayer | null = null): void {
  const slots = new Int32Array(control, 0, positionByte / 4);
  const position = new Float64Array(control, positionByte, 1);
  const bytes = new Uint8Array(slab);
  let seen = 0;
  for (;;) {
    Atomics.wait(slots, seqSlot, seen);
    const seq = Atomics.load(slots, seqSlot);
    if (seq === stopSeq) return;
    if (seq === seen) continue;
    seen = seq;
    slots[resultSlot] = writeAll(layer, slots[fdSlot]!, bytes, slots[offsetSlot]!, slots[lengthSlot]!, position[0]!);
    Atomics.store(slots, doneSlot, seq);
    Atomics.notify(slots, doneSlot);
  }
}

function writeAll(layer: FileLayer | null, fd: number, bytes: Uint8Array, offset: number, length: number, position: number): number {
  let done = 0;
  try {
    if (layer !== null) {
      layer.writeSync(fd, bytes.subarray(offset, offset + length), position);
      return length;
    }
    while (done < length) done += fs.writeSync(fd, bytes, offset + done, length - done, position + done);
    return done;
  } catch (error) {
    return (error as NodeJS.ErrnoException).errno ?? -5; // -EIO for an error without a number
  }
}

export interface SmallWriteCounts {
  inline: number;
  thread: number;
  longestInlineSeconds: number;
}

export class ChunkWriter {
  readonly #control = new SharedArrayBuffer(controlBytes);
  readonly #slots = new Int32Array(this.#control, 0, positionByte / 4);
  readonly #position = new Float64Array(this.#control, positionByte, 1);
  readonly #slab: SharedArrayBuffer;
  readonly #waitMs: number;
  readonly #inlineStallMs: number | null;
  readonly #inlinePauseMs: number;
  readonly #worker: Worker;
  /** A test's file layer, which inline writes go through; null over the real files. */
  readonly #layer: FileLayer | null;
  /** Until when (performance.now(), ms) writes go to the thread rather than inline. */
  #threadUntilMs = 0;
  #inlineCount = 0;
  #threadCount = 0;
  /** The longest pwrite on the calling thread so far, ms: the longest the event loop waited on one. */
  #longestInlineMs = 0;
  #seq = 0;
  #busy = false;
  #turnUsed = false;
  #closed = false;

  /** `slab`: the shared memory whose bytes it writes (the NBD payload buffers). */
  constructor(slab: SharedArrayBuffer, options: ChunkWriterOptions = {}) {
    this.#slab = slab;
    this.#waitMs = options.waitMs ?? chunkWriterWaitMs;
    this.#inlineStallMs = options.inlineStallMs === undefined ? inlineStallMs : options.inlineStallMs;
    this.#inlinePauseMs = options.inlinePauseMs ?? inlinePauseMs;
    const files: FileLayerSpec = options.files?.workerSpec ?? { kind: 'real' };
    this.#layer = files.kind === 'real' ? null : options.files!;
    this.#worker = new Worker(ownModule('workers', 'chunk-writer'), { name: 'chunkd-writer', workerData: { control: this.#control, slab, files, nice: helperThreadNice() } });
    this.#worker.unref();
    // A thread that could not start or died: the write it held fails (EIO) and writes go another way from now on.
    const log = options.log ?? ((): void => {});
    this.#worker.on('error', (error: Error) => log(`chunk writer thread failed: ${error.message}`, 'error'));
    this.#worker.on('exit', (code: number) => {
      if (!this.#closed) log(`chunk writer thread ended (exit code ${code}); small writes go to the chunk I/O workers from now on`, 'error');
      this.#lost();
    });
  }

  /**
   * Writes all of `data` at `positionBytes` of `fd`, here or on the writer thread; null when it takes no write
   * now (one is in flight, it wrote one in this turn already, or `data` is not in its slab): the caller writes
   * another way. The descriptor must stay open until the promise settles.
   */
  write(fd: number, data: Uint8Array, positionBytes: number): Promise<void> | null {
    if (this.#busy || this.#turnUsed || this.#closed || data.buffer !== this.#slab) return null;
    this.#turnUsed = true;
    setImmediate(this.#nextTurn);
    if (this.#inlineStallMs !== null && !requestOverlap.overlapping) {
      const startMs = performance.now();
      if (startMs >= this.#threadUntilMs) {
        this.#inlineCount += 1;
        const result = writeAll(this.#layer, fd, data, 0, data.length, positionBytes);
        const endMs = performance.now();
        if (endMs - startMs > this.#longestInlineMs) this.#longestInlineMs = endMs - startMs;
        if (endMs - startMs > this.#inlineStallMs) this.#threadUntilMs = endMs + this.#inlinePauseMs;
        return settled(result, data.length);
      }
    }
    this.#busy = true;
    this.#threadCount += 1;
    const slots = this.#slots;
    const previous = this.#seq;
    const seq = (this.#seq = (previous % seqMax) + 1);
    slots[fdSlot] = fd;
    slots[offsetSlot] = data.byteOffset;
    slots[lengthSlot] = data.length;
    this.#position[0] = positionBytes;
    Atomics.store(slots, seqSlot, seq);
    Atomics.notify(slots, seqSlot, 1);
    if (Atomics.wait(slots, doneSlot, previous, this.#waitMs) !== 'timed-out') return this.#result(data.length);
    const waiting = Atomics.waitAsync(slots, doneSlot, previous);
    if (!waiting.async) return this.#result(data.length);
    return waiting.value.then(() => this.#result(data.length));
  }

  /** Writes done on the calling thread and on the writer thread since it started, and the longest inline one's time. */
  counts(): SmallWriteCounts {
    return { inline: this.#inlineCount, thread: this.#threadCount, longestInlineSeconds: this.#longestInlineMs / 1000 };
  }

  /** Ends the thread (a write in flight finishes first, on its own). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    Atomics.store(this.#slots, seqSlot, stopSeq);
    Atomics.notify(this.#slots, seqSlot);
  }

  /** Test hook: ends the thread as a crash would, and resolves once it is gone. */
  async stopThreadForTest(): Promise<void> {
    await this.#worker.terminate();
  }

  #lost(): void {
    this.#closed = true;
    if (!this.#busy || Atomics.load(this.#slots, doneSlot) === this.#seq) return;
    this.#slots[resultSlot] = -5; // EIO
    Atomics.store(this.#slots, doneSlot, this.#seq);
    Atomics.notify(this.#slots, doneSlot);
  }

  readonly #nextTurn = (): void => {
    this.#turnUsed = false;
  };

  #result(lengthBytes: number): Promise<void> {
    this.#busy = false;
    return settled(this.#slots[resultSlot]!, lengthBytes);
  }
}

const resolved = Promise.resolve();

/** writeAll's result as a promise: resolved when all `lengthBytes` were written, else rejected with the errno's code. */
function settled(result: number, lengthBytes: number): Promise<void> {
  if (result === lengthBytes) return resolved;
  const code = util.getSystemErrorName(result);
  const error: NodeJS.ErrnoException = new Error(`${code}: write failed`);
  error.code = code;
  error.errno = result;
  error.syscall = 'write';
  return Promise.reject(error);
}
