// Request buffers in shared memory, so that a worker thread reads or writes a request's bytes in place: the NBD
// connection gathers a WRITE payload from the socket straight into one, and a worker preads a READ reply straight
// into one, with no copy on either side of the thread boundary. Node's own pooled buffers (socket chunks,
// Buffer.allocUnsafe) live in ordinary ArrayBuffers that another thread cannot see and that cannot be
// transferred without detaching Node's whole pool, hence this.
//
// Small buffers (up to sharedSlotBytes) are fixed slots of one SharedArrayBuffer slab, handed out from a stack
// of free slot numbers (the most recently freed first, so hot slots stay in cache). Larger ones are
// SharedArrayBuffers of their own, kept for reuse by size up to sharedLargeBytesHeldMax (free-list.ts). When
// every slot is taken, a small request gets its own SharedArrayBuffer too: slower, never an error.
import { assert } from './assert.ts';
import { SizedFreeList } from './free-list.ts';
import { sharedLargeBytesHeldMax, sharedSlotBytes, sharedSlotCount } from './limits.ts';

export class SharedBufferPool {
  readonly #slab = new SharedArrayBuffer(sharedSlotBytes * sharedSlotCount);
  readonly #freeSlots = new Int32Array(sharedSlotCount);
  #freeSlotCount = sharedSlotCount;
  readonly #large = new SizedFreeList(sharedLargeBytesHeldMax);

  constructor() {
    for (let i = 0; i < sharedSlotCount; i++) this.#freeSlots[i] = sharedSlotCount - 1 - i;
  }

  /** The slab's memory, for another thread to see it once (remote-device.ts registers it). */
  get slab(): SharedArrayBuffer {
    return this.#slab;
  }

  /** A buffer of exactly `size` bytes in shared memory, with unspecified contents. */
  readonly acquire = (size: number): Buffer => {
    if (size <= sharedSlotBytes && this.#freeSlotCount > 0) {
      const slot = this.#freeSlots[--this.#freeSlotCount]!;
      return Buffer.from(this.#slab, slot * sharedSlotBytes, size);
    }
    return this.#large.take(size) ?? Buffer.from(new SharedArrayBuffer(size));
  };

  /** Gives back a buffer from acquire(); nothing may use it any more. */
  readonly release = (buffer: Buffer): void => {
    if (buffer.buffer === this.#slab) {
      assert(buffer.byteOffset % sharedSlotBytes === 0, 'a slot is released whole');
      assert(this.#freeSlotCount < sharedSlotCount, 'a slot released twice');
      this.#freeSlots[this.#freeSlotCount++] = buffer.byteOffset / sharedSlotBytes;
      return;
    }
    if (buffer.length > sharedSlotBytes) this.#large.put(buffer);
  };
}

/** Whether a worker thread can see `buffer`'s bytes. */
export function isShared(buffer: Uint8Array): boolean {
  return buffer.buffer instanceof SharedArrayBuffer;
}
