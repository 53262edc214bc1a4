// Replies waiting to be written over TLS, handed to the socket a slice at a time.
//
// Why: a TLS socket encrypts everything one write gives it before it sends the first byte, and takes its next
// write only when the last one has left for the kernel. Replies that pile up while a write is out (Node's stream
// hands them on together) were one write of several MiB: the node encrypted it while the client, having read
// what the kernel held, waited; then the client decrypted while the node waited. Measured on 1 MiB reads at QD8,
// each side was idle half the time. Writes of at most a slice keep both busy: the node encrypts the next slice
// while the client reads the last one out of the socket's send buffer (connection.ts widens it for this).
//
// Pure: the queue plans slices and says which queued buffers are wholly written; the connection does the I/O.
import { assert } from '../core/assert.ts';

interface QueuedReply {
  buffer: Buffer;
  /** Bytes of `buffer` already handed out in slices. */
  sentBytes: number;
  /** The buffer goes back to its pool once written. */
  pooled: boolean;
  /** When the device answered the request (performance.now()), for the `reply` stage; null: not timed. */
  answeredAt: number | null;
}

/** One write's worth of queued replies. */
export interface ReplySlice {
  /** Views of the queued buffers, in order; their total is at most the slice size asked for. */
  pieces: Buffer[];
  /** Pooled buffers whose last byte is in this slice: they go back once the slice is written. */
  finished: Buffer[];
  /** When each timed reply whose last byte is in this slice was answered: its `reply` stage ends with the write. */
  answeredAt: number[];
}

export class ReplyQueue {
  readonly #replies: QueuedReply[] = [];
  #queuedBytes = 0;

  /** Bytes queued and not yet handed out in a slice. */
  get queuedBytes(): number {
    return this.#queuedBytes;
  }

  /** Queues a whole reply; it is written after everything queued before it. */
  push(buffer: Buffer, pooled: boolean, answeredAt: number | null = null): void {
    assert(buffer.length > 0, 'a reply has bytes');
    this.#replies.push({ buffer, sentBytes: 0, pooled, answeredAt });
    this.#queuedBytes += buffer.length;
  }

  /** The next slice of at most `sliceBytes`, or null when nothing is queued. */
  take(sliceBytes: number): ReplySlice | null {
    assert(sliceBytes > 0, 'a slice has room');
    if (this.#queuedBytes === 0) return null;
    const pieces: Buffer[] = [];
    const finished: Buffer[] = [];
    const answeredAt: number[] = [];
    let takenBytes = 0;
    while (takenBytes < sliceBytes && this.#replies.length > 0) {
      const reply = this.#replies[0]!;
      const count = Math.min(reply.buffer.length - reply.sentBytes, sliceBytes - takenBytes);
      pieces.push(reply.buffer.subarray(reply.sentBytes, reply.sentBytes + count));
      reply.sentBytes += count;
      takenBytes += count;
      if (reply.sentBytes === reply.buffer.length) {
        this.#replies.shift();
        if (reply.pooled) finished.push(reply.buffer);
        if (reply.answeredAt !== null) answeredAt.push(reply.answeredAt);
      }
    }
    this.#queuedBytes -= takenBytes;
    assert(this.#queuedBytes >= 0 && (this.#queuedBytes === 0) === (this.#replies.length === 0), 'queued bytes match the queue');
    return { pieces, finished, answeredAt };
  }

  /** Empties the queue (the socket is gone); returns the pooled buffers, including any partly handed out. */
  clear(): Buffer[] {
    const pooled = this.#replies.filter((reply) => reply.pooled).map((reply) => reply.buffer);
    this.#replies.length = 0;
    this.#queuedBytes = 0;
    return pooled;
  }
}
