// A byte-rate limit for a sender (replica add --max-rate): before sending n bytes, ask how long to wait. The
// sender's schedule advances by n / rate for every piece; a sender that falls behind (a slow link) does not bank
// the time it lost beyond a small burst, so the average over any second stays at or under the rate. Pure: the
// caller passes the clock.
export class RateLimiter {
  readonly #bytesPerMs: number;
  readonly #burstMs: number;
  /** When the bytes reserved so far are all due, in the caller's clock. */
  #dueMs = -Infinity;

  constructor(bytesPerSecond: number, burstMs = 50) {
    this.#bytesPerMs = bytesPerSecond / 1000;
    this.#burstMs = burstMs;
  }

  /** Reserves `bytes` at time `nowMs`; returns how many milliseconds to wait before sending them. */
  reserve(bytes: number, nowMs: number): number {
    const start = Math.max(this.#dueMs, nowMs - this.#burstMs);
    this.#dueMs = start + bytes / this.#bytesPerMs;
    return Math.max(0, start - nowMs);
  }

  /**
   * For a sender that pays after it sends: accounts for `bytes` already sent by `nowMs`; returns how many
   * milliseconds to wait before sending more, so that those bytes too are inside the rate (reserve lets the last
   * piece go unpaid, which is right before a send and lets a pay-after sender run a piece ahead of its rate).
   */
  settle(bytes: number, nowMs: number): number {
    this.reserve(bytes, nowMs);
    return Math.max(0, this.#dueMs - nowMs);
  }
}
