// A thread of its own for small chunk writes, handed over in shared memory, that the main thread waits for
// briefly instead of coming back for the answer through the event loop.
//
// Why: a 4 KiB write at queue depth 1 through libuv's pool costs the main thread a round of its event loop: the
// pool thread's answer comes back through an eventfd, an epoll wake-up, libuv's async handle and a callback,
// while the pwrite itself (into the page cache) takes a few microseconds. Doing the pwrite on the main thread
// was measured and dropped (BENCHMARKS.md, issue 19): ext4 blocks a pwrite for milliseconds now and then, and the
// event loop with it. Here the main thread hands the write to this thread (its bytes are in the shared slab
// already: the NBD payload buffers) and waits for it on a futex for at most `waitMs`: the usual pwrite is over
// well within that and the request goes on at once, with no round of the event loop; one that ext4 holds up is
// waited for asynchronously (Atomics.waitAsync) while the event loop serves other requests.
//
// One write at a time, and at most one per turn of the event loop (so that a busy turn, queue depth 32, does not
// wait for its writes one after another: the others go through libuv's pool as before). `write` answers null
// when it does not take a write, and the caller writes another way.
//
// A failed pwrite (or a thread that died with a write in hand: EIO) rejects that write with its code, as the file
// layer's write would: the chunk store gives the chunks back and the client gets the error (ENOSPC, EIO), and no
// record names them, so no commit ever does. The thread writes through the pool's file layer when that is a
// test's twin (test-files.ts, power-loss.ts: rebuilt in the thread from its spec, counters and freeze shared), so
// that injected failures and power cuts reach its writes too; over the real files it pwrites directly. Any other
// pwrite made here (say, on the calling thread) must go through a test's layer the same way (`files.writeSync`),
// or the fault and power-loss tests miss it, as they missed this thread's until it did.
import { Worker } from 'node:worker_threads';
import fs from 'node:fs';
import util from 'node:util';
import { ownModule } from '../core/source-files.ts';
import type { FileLayer, FileLayerSpec } from './file-layer.ts';

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

export interface ChunkWriterOptions {
  /** See chunkWriterWaitMs. */
  waitMs?: number;
  /** The pool's file layer (default the real files): a test's twin, the thread writes through (see the top). */
  files?: FileLayer;
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

export class ChunkWriter {
  readonly #control = new SharedArrayBuffer(controlBytes);
  readonly #slots = new Int32Array(this.#control, 0, positionByte / 4);
  readonly #position = new Float64Array(this.#control, positionByte, 1);
  readonly #slab: SharedArrayBuffer;
  readonly #waitMs: number;
  readonly #worker: Worker;
  #seq = 0;
  #busy = false;
  #turnUsed = false;
  #closed = false;

  /** `slab`: the shared memory whose bytes it writes (the NBD payload buffers). */
  constructor(slab: SharedArrayBuffer, options: ChunkWriterOptions = {}) {
    this.#slab = slab;
    this.#waitMs = options.waitMs ?? chunkWriterWaitMs;
    const files: FileLayerSpec = options.files?.workerSpec ?? { kind: 'real' };
    this.#worker = new Worker(ownModule('workers', 'chunk-writer'), { workerData: { control: this.#control, slab, files } });
    this.#worker.unref();
    // A thread that could not start or died: the write it held fails (EIO) and writes go another way from now on.
    this.#worker.on('error', () => {});
    this.#worker.on('exit', () => this.#lost());
  }

  /**
   * Writes all of `data` at `positionBytes` of `fd` on the writer thread; null when it takes no write now (one
   * is in flight, it wrote one in this turn already, or `data` is not in its slab): the caller writes another way.
   * The descriptor must stay open until the promise settles.
   */
  write(fd: number, data: Uint8Array, positionBytes: number): Promise<void> | null {
    if (this.#busy || this.#turnUsed || this.#closed || data.buffer !== this.#slab) return null;
    this.#busy = true;
    this.#turnUsed = true;
    setImmediate(this.#nextTurn);
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
    const result = this.#slots[resultSlot]!;
    if (result === lengthBytes) return Promise.resolve();
    const code = util.getSystemErrorName(result);
    const error: NodeJS.ErrnoException = new Error(`${code}: write failed`);
    error.code = code;
    error.errno = result;
    error.syscall = 'write';
    return Promise.reject(error);
  }
}
