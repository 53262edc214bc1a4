// The checksums of a large WRITE payload, computed while it arrives from the socket rather than after.
//
// Why: at 1 MiB writes, queue depth 8, the event loop is the node's one serial stage, and a request's turn on it
// was its payload's receive (about 7 socket reads a MiB, each waiting for the client to refill its 208 KiB send
// buffer) followed by the payload's 256 CRCs (0.15-0.19 ms a MiB); during the CRCs nobody drained the socket, so
// the client, its send buffer full, waited too, and the next request's receive started only after them
// (BENCHMARKS.md, issue 19, ninth pass). Summed as each socket read lands, a payload's chunks are checked while
// the client refills the buffer, and only the last read's chunks are left when the payload is whole.
//
// How it stays true: the receiver (nbd/receiver.ts) sums a chunk only once every byte of it is in the payload
// buffer, and nothing writes a payload buffer after its bytes arrived. The sums are attached to the payload Buffer
// object itself when it is whole (`finish`), taken by the one who writes it (volume.ts, for a write whose chunks
// are the payload's chunks, at a chunk-aligned offset), and dropped by the connection before the buffer goes back
// to its pool (`dropPayloadSums`), so that sums never outlive the request they were computed for, whatever device
// the payload went to. A layer that copies or changes the payload passes another Buffer, which has no sums: its
// checksums are computed from its bytes, as before.
import { assert } from '../core/assert.ts';
import { chunkSizeBytes, inlineWriteBytesMax } from '../core/limits.ts';
import { chunkSumsInto } from './chunk-io.ts';

/** Payloads smaller than this are summed when written, as before: they arrive in one or two reads anyway. */
export const arrivingSumsBytesMin = 32 * chunkSizeBytes;
/**
 * Nor larger than this: with chunk I/O workers such writes go to a worker, which sums them beside its pwrite, off
 * the event loop (worker-io.ts); summed here as well, they would cost this thread a CRC the worker computes anyway.
 */
export const arrivingSumsBytesMax = inlineWriteBytesMax;

const payloadSums = new WeakMap<Buffer, Uint32Array>();

/** One payload's checksums as its bytes arrive, from the first byte on. */
export class ArrivingSums {
  readonly #payload: Buffer;
  readonly #sums: Uint32Array;
  /** Chunks summed so far, from the first. */
  #summedChunks = 0;

  private constructor(payload: Buffer) {
    this.#payload = payload;
    this.#sums = new Uint32Array(payload.length / chunkSizeBytes);
  }

  /** For a payload of whole chunks, arrivingSumsBytesMin to arrivingSumsBytesMax; null for others (summed when written). */
  static for(payload: Buffer): ArrivingSums | null {
    if (payload.length < arrivingSumsBytesMin || payload.length > arrivingSumsBytesMax || payload.length % chunkSizeBytes !== 0) return null;
    payloadSums.delete(payload);
    return new ArrivingSums(payload);
  }

  /** The payload's first `filledBytes` are in and final: sums the chunks among them not summed yet. */
  arrived(filledBytes: number): void {
    assert(filledBytes <= this.#payload.length);
    const wholeChunks = Math.floor(filledBytes / chunkSizeBytes);
    if (wholeChunks <= this.#summedChunks) return;
    chunkSumsInto(this.#payload, this.#sums, this.#summedChunks, wholeChunks);
    this.#summedChunks = wholeChunks;
  }

  /** The payload is whole: its sums go with it, for takePayloadSums. */
  finish(): void {
    this.arrived(this.#payload.length);
    payloadSums.set(this.#payload, this.#sums);
  }
}

/** The checksums of `payload`'s chunks when they were computed as it arrived (this very Buffer), once; else undefined. */
export function takePayloadSums(payload: Buffer): Uint32Array | undefined {
  const sums = payloadSums.get(payload);
  if (sums !== undefined) payloadSums.delete(payload);
  return sums;
}

/** Forgets `payload`'s sums, if no one took them: the request is over and its buffer goes back to be reused. */
export function dropPayloadSums(payload: Buffer): void {
  payloadSums.delete(payload);
}
