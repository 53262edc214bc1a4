// Replies waiting to be written over TLS, handed to the socket a slice at a time.
//
// Why: a TLS socket encrypts everything one write gives it before it sends the first byte, and takes its next
// write only when the last one has left for the kernel. Replies that pile up while a write is out (Node's stream
// hands them on together) were one write of several MiB: the node encrypted it while the client, having read
// what the kernel held, waited; then the client decrypted while the node waited. Measured on 1 MiB reads at QD8,
// each side was idle half the time. Writes of at most a slice keep both busy: the node encrypts the next slice
// while the client reads the last one out of the socket's send buffer (connection.ts widens it for this).
//
// Node's TLS socket copies a write of several buffers into one before encrypting it (a copy of every byte); a
// write of one buffer is encrypted where it lies. So a large piece is a slice of its own, and only small pieces
// (headers, small reads' replies, up to joinBytes each) share a slice; and a large reply's last bytes, when few,
// go with the slice before them rather than start one that the next reply would join. Measured on 1 MiB reads at
// QD8 (a reply is 1 MiB and a header), that join copied a quarter of every reply.
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

  /**
   * The next slice, or null when nothing is queued: one piece of a reply of at most `sliceBytes` (or the whole rest
   * of it when that is at most `sliceBytes + joinBytes`), or pieces of at most `joinBytes` each, at most
   * `sliceBytes` together.
   */
  take(sliceBytes: number, joinBytes: number): ReplySlice | null {
    assert(sliceBytes > 0 && joinBytes >= 0, 'a slice has room');
    if (this.#queuedBytes === 0) return null;
    const pieces: Buffer[] = [];
    const finished: Buffer[] = [];
    const answeredAt: number[] = [];
    let takenBytes = 0;
    while (takenBytes < sliceBytes && this.#replies.length > 0) {
      const reply = this.#replies[0]!;
      const leftBytes = reply.buffer.length - reply.sentBytes;
      let count = Math.min(leftBytes, sliceBytes - takenBytes);
      if (pieces.length === 0) {
        if (leftBytes <= sliceBytes + joinBytes) count = leftBytes;
      } else if (pieces[0]!.length > joinBytes || leftBytes > joinBytes || leftBytes > sliceBytes - takenBytes) {
        break; // a large piece goes alone; small replies join a slice whole
      }
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
