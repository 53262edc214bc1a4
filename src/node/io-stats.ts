// Per-export I/O statistics (issue 18's "why is it slow"): for each export (a volume, or VOL@SNAP) and each
// operation, requests, bytes, errors and a latency histogram, kept where every front end's requests pass: the
// BlockDevice the node hands out (NBD on the main thread and on NBD threads, whose device calls come back to the
// main thread, FUSE, attachments). A request's latency here is the device's: from the front end's call to its
// completion (the wait for the range lock, chunk I/O in the workers, the commit for FLUSH and FUA), not the
// protocol's decode or reply. The histogram's buckets are fixed, Prometheus-style cumulative at render.
// Cost per request: two performance.now() calls, a short bucket scan and four increments (BENCHMARKS.md has
// the measured cost on 4 KiB random reads).
import { performance } from 'node:perf_hooks';
import type { BlockDevice, Extent, WriteOptions, ZeroOptions } from '../core/block-device.ts';

export const ioOperations = ['read', 'write', 'trim', 'zero', 'flush'] as const;
export type IoOperation = (typeof ioOperations)[number];

/** Upper bounds of the latency buckets, in seconds (the last bucket, +Inf, is implied). */
export const latencyBucketsSeconds = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10] as const;

export interface OperationStats {
  requests: number;
  bytes: number;
  errors: number;
  /** Sum of latencies, seconds. */
  seconds: number;
  /** Count per bucket (not cumulative); one more than latencyBucketsSeconds, the last for +Inf. */
  buckets: number[];
}

export type ExportIoStats = Record<IoOperation, OperationStats>;

export function emptyIoStats(): ExportIoStats {
  const stats = {} as ExportIoStats;
  for (const operation of ioOperations) stats[operation] = { requests: 0, bytes: 0, errors: 0, seconds: 0, buckets: new Array<number>(latencyBucketsSeconds.length + 1).fill(0) };
  return stats;
}

/** Counts one request that took `seconds` (pure). */
export function observe(stats: OperationStats, bytes: number, seconds: number, failed: boolean): void {
  stats.requests += 1;
  stats.bytes += bytes;
  if (failed) stats.errors += 1;
  stats.seconds += seconds;
  let bucket = 0;
  while (bucket < latencyBucketsSeconds.length && seconds > latencyBucketsSeconds[bucket]!) bucket++;
  stats.buckets[bucket]! += 1;
}

/**
 * The latency at quantile `q` (0..1) of the requests counted in `buckets`, as the upper bound of the bucket it
 * falls in (Prometheus' histogram_quantile interpolates; a bound is honest about the resolution); null for none.
 */
export function quantileSeconds(buckets: readonly number[], q: number): number | null {
  const total = buckets.reduce((sum, count) => sum + count, 0);
  if (total === 0) return null;
  const rank = q * total;
  let seen = 0;
  for (const [bucket, count] of buckets.entries()) {
    seen += count;
    if (seen >= rank && count > 0) return latencyBucketsSeconds[bucket] ?? Number.POSITIVE_INFINITY;
  }
  return Number.POSITIVE_INFINITY;
}

/** `after` minus `before`, operation by operation (for an interval's figures: iostat). */
export function ioStatsDelta(after: ExportIoStats, before: ExportIoStats | undefined): ExportIoStats {
  const delta = emptyIoStats();
  for (const operation of ioOperations) {
    const a = after[operation];
    const b = before?.[operation];
    delta[operation] = {
      requests: a.requests - (b?.requests ?? 0),
      bytes: a.bytes - (b?.bytes ?? 0),
      errors: a.errors - (b?.errors ?? 0),
      seconds: a.seconds - (b?.seconds ?? 0),
      buckets: a.buckets.map((count, i) => count - (b?.buckets[i] ?? 0)),
    };
  }
  return delta;
}

/** A device whose every request is counted in `stats` (the rest passes straight through). */
export class MeasuredDevice implements BlockDevice {
  readonly #device: BlockDevice;
  readonly #stats: ExportIoStats;

  constructor(device: BlockDevice, stats: ExportIoStats) {
    this.#device = device;
    this.#stats = stats;
  }

  get name(): string {
    return this.#device.name;
  }

  get sizeBytes(): number {
    return this.#device.sizeBytes;
  }

  get readOnly(): boolean {
    return this.#device.readOnly;
  }

  read(offsetBytes: number, target: Buffer): Promise<void> {
    return this.#measure('read', target.length, () => this.#device.read(offsetBytes, target));
  }

  write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.#measure('write', data.length, () => this.#device.write(offsetBytes, data, options));
  }

  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    return this.#measure('trim', lengthBytes, () => this.#device.trim(offsetBytes, lengthBytes, options));
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    return this.#measure('zero', lengthBytes, () => this.#device.writeZeroes(offsetBytes, lengthBytes, options));
  }

  flush(): Promise<void> {
    return this.#measure('flush', 0, () => this.#device.flush());
  }

  blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return this.#device.blockStatus(offsetBytes, lengthBytes);
  }

  close(): Promise<void> {
    return this.#device.close();
  }

  async #measure(operation: IoOperation, bytes: number, request: () => Promise<void>): Promise<void> {
    const start = performance.now();
    let failed = true;
    try {
      await request();
      failed = false;
    } finally {
      observe(this.#stats[operation], failed ? 0 : bytes, (performance.now() - start) / 1000, failed);
    }
  }
}
