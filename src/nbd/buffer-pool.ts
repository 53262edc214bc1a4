// Reuses large buffers: WRITE payloads gathered from several socket chunks, and READ replies once written.
// Allocating a fresh megabyte per request and leaving it to the garbage collector cost more CPU than the copy
// itself; a client streams requests of one or a few sizes, so a small free list per size serves nearly all.
// Small payloads are left to Node's own buffer pool.

/** Payloads below this are not pooled. */
const pooledBytesMin = 64 * 1024;

export class BufferPool {
  readonly #free = new Map<number, Buffer[]>();
  readonly #bytesMax: number;
  #bytesHeld = 0;

  /** Keeps at most `bytesMax` bytes of free buffers. */
  constructor(bytesMax: number) {
    this.#bytesMax = bytesMax;
  }

  /** A buffer of exactly `size` bytes, with unspecified contents. */
  readonly acquire = (size: number): Buffer => {
    if (size < pooledBytesMin) return Buffer.allocUnsafe(size);
    const buffer = this.#free.get(size)?.pop();
    if (buffer === undefined) return Buffer.allocUnsafeSlow(size);
    this.#bytesHeld -= size;
    return buffer;
  };

  /** Gives a buffer from `acquire` back; it must no longer be in use. */
  release(buffer: Buffer): void {
    if (buffer.length < pooledBytesMin || this.#bytesHeld + buffer.length > this.#bytesMax) return;
    let list = this.#free.get(buffer.length);
    if (list === undefined) {
      list = [];
      this.#free.set(buffer.length, list);
    }
    list.push(buffer);
    this.#bytesHeld += buffer.length;
  }
}
