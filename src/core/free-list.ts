// Free buffers kept for reuse by exact size, up to a byte budget. A client streams requests of one or a few
// sizes, so a short list per size serves nearly every large request; allocating a fresh megabyte each time and
// leaving it to the garbage collector cost more CPU than the copy itself. The NBD connection's buffers
// (nbd/buffer-pool.ts) and the large shared buffers (shared-buffers.ts) both keep theirs here.

export class SizedFreeList {
  readonly #free = new Map<number, Buffer[]>();
  readonly #bytesMax: number;
  #bytesHeld = 0;

  /** Holds at most `bytesMax` bytes of free buffers. */
  constructor(bytesMax: number) {
    this.#bytesMax = bytesMax;
  }

  /** A free buffer of exactly `size` bytes (contents unspecified), or undefined when none is held. */
  take(size: number): Buffer | undefined {
    const buffer = this.#free.get(size)?.pop();
    if (buffer !== undefined) this.#bytesHeld -= size;
    return buffer;
  }

  /** Keeps `buffer` for a later take() unless that would pass the budget; nothing may use it any more. */
  put(buffer: Buffer): void {
    if (this.#bytesHeld + buffer.length > this.#bytesMax) return;
    let list = this.#free.get(buffer.length);
    if (list === undefined) {
      list = [];
      this.#free.set(buffer.length, list);
    }
    list.push(buffer);
    this.#bytesHeld += buffer.length;
  }
}
