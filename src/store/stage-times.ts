// Where a request's time goes inside the store, pool-wide (issue 18's "why is it slow"): the chunk I/O a volume
// asks of the chunk store (reads with their checksum checks; writes of fresh runs with their checksums; zeroing),
// wherever it runs (this thread, libuv's pool, the chunk I/O workers), and the metadata commits volumes wait for
// (FLUSH, FUA: the journal append and its fdatasync, shared by concurrent callers). A device's whole latency is in
// node/io-stats.ts; what it has beyond these stages is the wait for the range lock and the front end's own work.
// The volume store is wrapped once, in the pool: volume.ts is unchanged. Two more stages are the store's too: the
// wait of a chunk task for a worker thread (from being asked to a worker taking its batch up; worker-io.ts), and
// the NBD front end's own, counted by its connections (nbd/connection.ts), on whichever thread runs them: `receive`,
// a WRITE's payload arriving (from its header decoded to its last byte in memory), and `reply`, from the device's
// answer to the reply handed to the kernel (under TLS: encrypted, the last slice holding it written).
// A header's decoding and validation is synchronous and takes under a microsecond: it has no stage of its own.
import { performance } from 'node:perf_hooks';
import { addHistogram, emptyHistogram, observeLatency, type LatencyHistogram } from '../core/latency-histogram.ts';
import type { VolumeStore } from './volume.ts';

/** In the order a request meets them. */
export const stages = ['receive', 'worker_wait', 'chunk_read', 'chunk_write', 'chunk_zero', 'commit', 'reply'] as const;
export type Stage = (typeof stages)[number];
export type StageTimes = Record<Stage, LatencyHistogram>;
/** The NBD front end's stages, counted per server (and per NBD thread) and summed for /metrics. */
export type ProtocolStageTimes = Pick<StageTimes, 'receive' | 'reply'>;

export function emptyStageTimes(): StageTimes {
  return Object.fromEntries(stages.map((stage) => [stage, emptyHistogram()])) as StageTimes;
}

export function emptyProtocolStageTimes(): ProtocolStageTimes {
  return { receive: emptyHistogram(), reply: emptyHistogram() };
}

/** The store's stages with the front ends' (each NBD server's, each NBD thread's) summed in, for one report. */
export function withProtocolStages(store: StageTimes, fronts: ProtocolStageTimes[]): StageTimes {
  const receive = emptyHistogram();
  const reply = emptyHistogram();
  for (const front of fronts) {
    addHistogram(receive, front.receive);
    addHistogram(reply, front.reply);
  }
  return { ...store, receive, reply };
}

/** Times `work` into `histogram` (failed work too: its time was spent); a throw becomes the promise's rejection. */
function timed<T>(histogram: LatencyHistogram, work: () => Promise<T>): Promise<T> {
  const start = performance.now();
  const observe = (): void => observeLatency(histogram, (performance.now() - start) / 1000);
  let pending: Promise<T>;
  try {
    pending = work();
  } catch (error) {
    observe();
    return Promise.reject(error);
  }
  return pending.then(
    (value) => {
      observe();
      return value;
    },
    (error: unknown) => {
      observe();
      throw error;
    },
  );
}

/** timed, for work that may be done at once (undefined, or a throw) rather than give a promise: it stays so. */
function timedNowOrLater(histogram: LatencyHistogram, work: () => Promise<void> | undefined): Promise<void> | undefined {
  const start = performance.now();
  let pending: Promise<void> | undefined;
  try {
    pending = work();
  } finally {
    if (pending === undefined) observeLatency(histogram, (performance.now() - start) / 1000);
  }
  if (pending === undefined) return undefined;
  return pending.finally(() => observeLatency(histogram, (performance.now() - start) / 1000));
}

/** `store` with each chunk verb and each commit timed into `times`. */
export function timedVolumeStore<T extends VolumeStore>(store: T, times: StageTimes): T {
  const { chunks, metadata } = store;
  return {
    ...store,
    chunks: {
      read: (...args: Parameters<typeof chunks.read>) => timedNowOrLater(times.chunk_read, () => chunks.read(...args)),
      // Many reads in one call, not one request's latency: not timed.
      readCachedMany: (...args: Parameters<typeof chunks.readCachedMany>) => chunks.readCachedMany(...args),
      write: (...args: Parameters<typeof chunks.write>) => timed(times.chunk_write, () => chunks.write(...args)),
      zero: (...args: Parameters<typeof chunks.zero>) => timed(times.chunk_zero, () => chunks.zero(...args)),
    },
    metadata: {
      record: (...args: Parameters<typeof metadata.record>) => metadata.record(...args),
      checkHealthy: () => metadata.checkHealthy(),
      lookup: (...args: Parameters<typeof metadata.lookup>) => metadata.lookup(...args),
      commit: () => timed(times.commit, () => metadata.commit()),
    },
  };
}
