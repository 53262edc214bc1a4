// Reuses large buffers: WRITE payloads gathered from several socket chunks, and READ replies once written, kept
// by size in a free list (core/free-list.ts). Small payloads are left to Node's own buffer pool.
import { SizedFreeList } from '../core/free-list.ts';
import { smallRequestBytesMax } from '../core/limits.ts';

/** Payloads below this are not pooled. */
const pooledBytesMin = smallRequestBytesMax;

export class BufferPool {
  readonly #free: SizedFreeList;

  /** Keeps at most `bytesMax` bytes of free buffers. */
  constructor(bytesMax: number) {
    this.#free = new SizedFreeList(bytesMax);
  }

  /** A buffer of exactly `size` bytes, with unspecified contents. */
  readonly acquire = (size: number): Buffer => {
    if (size < pooledBytesMin) return Buffer.allocUnsafe(size);
    return this.#free.take(size) ?? Buffer.allocUnsafeSlow(size);
  };

  /** Gives a buffer from `acquire` back; it must no longer be in use. */
  release(buffer: Buffer): void {
    if (buffer.length >= pooledBytesMin) this.#free.put(buffer);
  }
}
