// Fencing by time, the pure part: whether this node may still acknowledge writes to the volumes it owns, from the
// monotonic time at which it last SENT a lease grant or keepalive that etcd then confirmed.
//
// etcd starts the lease's new TTL when it handles the request, which is after we sent it; so the lease lives in
// etcd at least until sentAt + TTL (by etcd's clock, which runs at about the rate of ours). We stop acknowledging at
// sentAt + TTL - margin: before etcd can expire the lease and another node can take the volume over. The clock is
// the monotonic one (performance.now()): it keeps running while the process is stopped (SIGSTOP, a long GC pause), so
// a process resumed after its lease ran out finds its renewal stale at its next write, before any timer of its own
// has had a chance to run.
import { ChunkdError } from '../core/errors.ts';

export interface LeaseTiming {
  ttlMs: number;
  /** Writes stop this long before the TTL can have run out. */
  marginMs: number;
}

/** The margin for a TTL: a fifth of it, at least 500 ms (clock rates, a write already past its check). */
export function leaseTiming(ttlMs: number): LeaseTiming {
  return { ttlMs, marginMs: Math.max(500, Math.round(ttlMs / 5)) };
}

/** How often the lease is renewed: three times per TTL, as etcd's own Go client does. */
export function keepaliveIntervalMs(timing: LeaseTiming): number {
  return Math.max(100, Math.floor(timing.ttlMs / 3));
}

export class LeaseClock {
  readonly timing: LeaseTiming;
  /** performance.now() when the last confirmed grant or keepalive was sent; null: no live lease. */
  #renewedAt: number | null = null;

  constructor(timing: LeaseTiming) {
    this.timing = timing;
  }

  /** A grant or keepalive sent at `sentAt` was confirmed by etcd (a later one never moves the time back). */
  renewed(sentAt: number): void {
    this.#renewedAt = this.#renewedAt === null ? sentAt : Math.max(this.#renewedAt, sentAt);
  }

  /** The lease is gone (expired in etcd, revoked, or a new one is being granted). */
  lost(): void {
    this.#renewedAt = null;
  }

  /** Milliseconds since the last confirmed renewal was sent, or null without a lease. */
  ageMs(now: number): number | null {
    return this.#renewedAt === null ? null : now - this.#renewedAt;
  }

  /** Whether writes may be acknowledged at `now`. */
  live(now: number): boolean {
    const age = this.ageMs(now);
    return age !== null && age < this.timing.ttlMs - this.timing.marginMs;
  }

  /** Null while writes may be acknowledged; else the error a client gets for a write to `volume`. */
  refusal(volume: string, now: number): ChunkdError | null {
    if (this.live(now)) return null;
    const age = this.ageMs(now);
    const why = age === null
      ? 'this node has no live lease in etcd'
      : `this node has not renewed its etcd lease for ${(age / 1000).toFixed(1)} s (TTL ${this.timing.ttlMs / 1000} s, writes stop ${this.timing.marginMs / 1000} s before it can expire)`;
    return ChunkdError.readOnly(`volume ${volume}: writes refused: ${why}, so another node may be taking it over; reads continue, writes resume when the lease is renewed and ownership re-checked`);
  }
}
