// Bytes received from a socket and not yet consumed, kept as the list of chunks the socket delivered.
// Nothing is copied on arrival: a decoder gets a view of the first chunk when the bytes it needs lie inside it,
// and only a message that straddles chunks is gathered into a new buffer (a small header, or a WRITE payload
// that arrived in pieces). Buffers handed out are never written again, so a view stays valid while it is held.
import { assert } from '../core/assert.ts';

export class InputQueue {
  #chunks: Buffer[] = [];
  /** Bytes of #chunks[0] already consumed. */
  #headOffset = 0;
  #length = 0;

  /** Bytes queued and not yet consumed. */
  get length(): number {
    return this.#length;
  }

  /** Appends bytes received from the socket. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  /**
   * Gives the next `count` bytes, unconsumed, as a contiguous run at buffer[offset..]; null when fewer are queued.
   * The buffer may hold more bytes after the run.
   */
  contiguous(count: number): { buffer: Buffer; offset: number } | null {
    assert(Number.isInteger(count) && count >= 0, 'contiguous: a byte count');
    if (count > this.#length) return null;
    const first = this.#chunks[0];
    if (first === undefined) return { buffer: Buffer.alloc(0), offset: 0 };
    if (first.length - this.#headOffset >= count) return { buffer: first, offset: this.#headOffset };
    const merged = this.#gather(count);
    // #headOffset belongs to the chunk that becomes second: fold it into that chunk first.
    if (this.#headOffset > 0) this.#chunks[0] = this.#chunks[0]!.subarray(this.#headOffset);
    this.#chunks.unshift(merged);
    this.#headOffset = 0;
    this.#length += count;
    return { buffer: merged, offset: 0 };
  }

  /**
   * Consumes and returns the next `count` bytes: a view when they lie in one chunk, else one copy, into a buffer
   * from `allocate` when given. `gathered` tells which.
   */
  take(count: number, allocate?: (size: number) => Buffer, alwaysCopy = false): Buffer {
    assert(Number.isInteger(count) && count >= 0 && count <= this.#length, 'take: no more than what is queued');
    const first = this.#chunks[0];
    if (!alwaysCopy && first !== undefined && first.length - this.#headOffset >= count) {
      const view = first.subarray(this.#headOffset, this.#headOffset + count);
      this.#consumeFromHead(count);
      this.gathered = false;
      return view;
    }
    this.gathered = true;
    return this.#gather(count, allocate);
  }

  /** Whether the last take() copied into a new buffer (true) or returned a view of a socket chunk. */
  gathered = false;

  /** Consumes up to `count` bytes without looking at them; returns how many were consumed. */
  skip(count: number): number {
    assert(Number.isInteger(count) && count >= 0, 'skip: a byte count');
    let skipped = 0;
    while (skipped < count && this.#chunks.length > 0) {
      const available = this.#chunks[0]!.length - this.#headOffset;
      const step = Math.min(available, count - skipped);
      this.#consumeFromHead(step);
      skipped += step;
    }
    return skipped;
  }

  /** Drops everything queued (the connection is going away). */
  clear(): void {
    this.#chunks = [];
    this.#headOffset = 0;
    this.#length = 0;
  }

  /** Consumes the next `count` bytes, copying them to target[offset..]. */
  takeInto(target: Buffer, offset: number, count: number): void {
    assert(Number.isInteger(count) && count >= 0 && count <= this.#length && offset + count <= target.length, 'takeInto: queued bytes that fit');
    let copied = 0;
    while (copied < count) {
      const chunk = this.#chunks[0]!;
      const step = Math.min(chunk.length - this.#headOffset, count - copied);
      chunk.copy(target, offset + copied, this.#headOffset, this.#headOffset + step);
      this.#consumeFromHead(step);
      copied += step;
    }
  }

  /** Consumes `count` bytes into a new buffer. */
  #gather(count: number, allocate?: (size: number) => Buffer): Buffer {
    const target = allocate !== undefined ? allocate(count) : Buffer.allocUnsafe(count);
    this.takeInto(target, 0, count);
    return target;
  }

  #consumeFromHead(count: number): void {
    const first = this.#chunks[0]!;
    this.#headOffset += count;
    this.#length -= count;
    if (this.#headOffset === first.length) {
      this.#chunks.shift();
      this.#headOffset = 0;
    }
  }
}
