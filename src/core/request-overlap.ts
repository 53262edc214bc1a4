// Whether this thread's event loop serves requests one at a time now (a client at queue depth 1) or several at once.
// The node's devices count every front end's requests here as they reach a volume (node/io-stats.ts); the chunk
// writer pwrites a small write on the event loop's own thread only while requests come one at a time
// (store/chunk-writer.ts): then nothing else waits for the event loop while the kernel holds that pwrite up, and
// under a stream of writes it does, for 118-141 ms at a time into a 1 TiB volume at queue depth 32 (the throttling of
// writers past the dirty limit, or a journal commit; BENCHMARKS.md, issue 15, "Where a pause goes").
//
// "Several at once" starts with the first request that starts while another is in flight, and ends only after
// `aloneStreakToClear` requests in a row started alone: a client at queue depth 32 whose requests all happen to be
// answered before its next ones arrive does not look like one at queue depth 1 for that one request. Nothing counted
// (a store used without the node's devices, as the tests do) reads as one at a time.

/** Requests in a row that must start with nothing else in flight before the loop counts as serving one at a time. */
export const aloneStreakToClear = 8;

export class RequestOverlap {
  #inFlight = 0;
  #aloneStreak = aloneStreakToClear;

  started(): void {
    if (this.#inFlight > 0) this.#aloneStreak = 0;
    else if (this.#aloneStreak < aloneStreakToClear) this.#aloneStreak += 1;
    this.#inFlight += 1;
  }

  ended(): void {
    this.#inFlight -= 1;
  }

  /** Whether requests overlapped lately (see the top). */
  get overlapping(): boolean {
    return this.#aloneStreak < aloneStreakToClear;
  }
}

/** This thread's (each worker thread has its own module instance). */
export const requestOverlap = new RequestOverlap();
