// Per-export I/O statistics (issue 18's "why is it slow"): for each export (a volume, or VOL@SNAP) and each
// operation, requests, bytes, errors, the requests in flight and a latency histogram, kept where every front
// end's requests pass: the BlockDevice the node hands out (NBD on the main thread and on NBD threads, whose device
// calls come back to the main thread, FUSE, attachments). A request's latency here is the device's: from the front
// end's call to its completion (the wait for the range lock, chunk I/O in the workers, the commit for FLUSH and
// FUA), not the protocol's receive or reply (stages of their own: store/stage-times.ts). The histogram's buckets
// are fixed, Prometheus-style cumulative at render.
// Cost per request: two performance.now() calls, a short bucket scan and four increments (BENCHMARKS.md has
// the measured cost on 4 KiB random reads).
import { performance } from 'node:perf_hooks';
import { doneNow, type BlockDevice, type Extent, type WriteOptions, type ZeroOptions } from '../core/block-device.ts';
import { emptyHistogram, observeLatency, type LatencyHistogram } from '../core/latency-histogram.ts';
import { requestOverlap } from '../core/request-overlap.ts';

export const ioOperations = ['read', 'write', 'trim', 'zero', 'flush'] as const;
export type IoOperation = (typeof ioOperations)[number];

export interface OperationStats extends LatencyHistogram {
  bytes: number;
  errors: number;
  /** Requests at the device now (the queue depth the front ends keep), a gauge. */
  inFlight: number;
}

export type ExportIoStats = Record<IoOperation, OperationStats>;

export function emptyIoStats(): ExportIoStats {
  const stats = {} as ExportIoStats;
  for (const operation of ioOperations) stats[operation] = { ...emptyHistogram(), bytes: 0, errors: 0, inFlight: 0 };
  return stats;
}

/** Counts one request that took `seconds` (pure). */
export function observe(stats: OperationStats, bytes: number, seconds: number, failed: boolean): void {
  observeLatency(stats, seconds);
  stats.bytes += bytes;
  if (failed) stats.errors += 1;
}

/** `after` minus `before`, operation by operation (for an interval's figures: iostat). */
export function ioStatsDelta(after: ExportIoStats, before: ExportIoStats | undefined): ExportIoStats {
  const delta = emptyIoStats();
  for (const operation of ioOperations) {
    const a = after[operation];
    const b = before?.[operation];
    delta[operation] = {
      count: a.count - (b?.count ?? 0),
      bytes: a.bytes - (b?.bytes ?? 0),
      errors: a.errors - (b?.errors ?? 0),
      seconds: a.seconds - (b?.seconds ?? 0),
      buckets: a.buckets.map((count, i) => count - (b?.buckets[i] ?? 0)),
      inFlight: a.inFlight,
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

  /**
   * Runs `request`, counted. A request the device finished before it returned (block-device.ts's doneNow: a cached
   * read of a volume) is counted at once and gives doneNow on, with no promise of this layer's own.
   */
  #measure(operation: IoOperation, bytes: number, request: () => Promise<void>): Promise<void> {
    const stats = this.#stats[operation];
    const start = performance.now();
    stats.inFlight += 1;
    requestOverlap.started();
    let pending: Promise<void>;
    try {
      pending = request();
    } catch (error) {
      this.#done(stats, 0, start, true);
      return Promise.reject(error);
    }
    if (pending === doneNow) {
      this.#done(stats, bytes, start, false);
      return doneNow;
    }
    return pending.then(
      () => this.#done(stats, bytes, start, false),
      (error: unknown) => {
        this.#done(stats, 0, start, true);
        throw error;
      },
    );
  }

  #done(stats: OperationStats, bytes: number, start: number, failed: boolean): void {
    stats.inFlight -= 1;
    requestOverlap.ended();
    observe(stats, bytes, (performance.now() - start) / 1000, failed);
  }
}
