// Bytes pushed by one side (the peer port's receiveData frames, as they arrive) and pulled by the other as an
// async iterable (the stream receiver). push() resolves once the consumer has taken that piece and asked for the
// next one, so the sender's window of unanswered frames is the whole buffer: memory is bounded by the window, and
// a slow disk slows the sender. end() ends the iteration after what was pushed; fail() makes the consumer's next
// pull throw (the link dropped: the receiver keeps what it has for a resume); close() settles what is left once
// the consumer is done (pieces after it are refused with the consumer's outcome).
import { ChunkdError } from '../core/errors.ts';

interface Piece {
  bytes: Buffer;
  taken: () => void;
  refused: (error: Error) => void;
}

export class ByteFeed implements AsyncIterable<Buffer> {
  readonly #queue: Piece[] = [];
  /** The piece handed to the consumer last, acknowledged when it asks for the next. */
  #current: Piece | null = null;
  #waiting: { resolve: (result: IteratorResult<Buffer>) => void; reject: (error: Error) => void } | null = null;
  #ended = false;
  #failure: Error | null = null;
  #closed: Error | null = null;

  /** Queues `bytes`; resolves when the consumer has taken them, rejects if the feed is closed or failed first. */
  push(bytes: Buffer): Promise<void> {
    if (this.#closed !== null) return Promise.reject(this.#closed);
    if (this.#ended || this.#failure !== null) return Promise.reject(ChunkdError.protocol('stream bytes after the stream was ended'));
    return new Promise<void>((taken, refused) => {
      this.#queue.push({ bytes, taken, refused });
      this.#serve();
    });
  }

  end(): void {
    this.#ended = true;
    this.#serve();
  }

  fail(error: Error): void {
    this.#failure ??= error;
    this.#serve();
  }

  /** The consumer is done (with `outcome` for any piece not taken): pending and later pushes are refused with it. */
  close(outcome: Error): void {
    this.#closed ??= outcome;
    this.#current?.taken();
    this.#current = null;
    for (const piece of this.#queue.splice(0)) piece.refused(outcome);
  }

  [Symbol.asyncIterator](): AsyncIterator<Buffer> {
    return {
      next: () => {
        this.#current?.taken();
        this.#current = null;
        return new Promise<IteratorResult<Buffer>>((resolve, reject) => {
          this.#waiting = { resolve, reject };
          this.#serve();
        });
      },
    };
  }

  #serve(): void {
    const waiting = this.#waiting;
    if (waiting === null) return;
    if (this.#failure !== null) {
      this.#waiting = null;
      waiting.reject(this.#failure);
      return;
    }
    const piece = this.#queue.shift();
    if (piece !== undefined) {
      this.#waiting = null;
      this.#current = piece;
      waiting.resolve({ done: false, value: piece.bytes });
    } else if (this.#ended) {
      this.#waiting = null;
      waiting.resolve({ done: true, value: undefined });
    }
  }
}
