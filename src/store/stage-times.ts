// Where a request's time goes inside the store, pool-wide (issue 18's "why is it slow"): the chunk I/O a volume
// asks of the chunk store (reads with their checksum checks; writes of fresh runs with their checksums; zeroing),
// wherever it runs (this thread, libuv's pool, the chunk I/O workers), and the metadata commits volumes wait for
// (FLUSH, FUA: the journal append and its fdatasync, shared by concurrent callers). A device's whole latency is in
// node/io-stats.ts; what it has beyond these stages is the wait for the range lock and the front end's own work.
// The volume store is wrapped once, in the pool: volume.ts is unchanged.
import { performance } from 'node:perf_hooks';
import { emptyHistogram, observeLatency, type LatencyHistogram } from '../core/latency-histogram.ts';
import type { VolumeStore } from './volume.ts';

export const stages = ['chunk_read', 'chunk_write', 'chunk_zero', 'commit'] as const;
export type Stage = (typeof stages)[number];
export type StageTimes = Record<Stage, LatencyHistogram>;

export function emptyStageTimes(): StageTimes {
  return { chunk_read: emptyHistogram(), chunk_write: emptyHistogram(), chunk_zero: emptyHistogram(), commit: emptyHistogram() };
}

/** Times `work` into `histogram` (failed work too: its time was spent). */
async function timed<T>(histogram: LatencyHistogram, work: () => Promise<T>): Promise<T> {
  const start = performance.now();
  try {
    return await work();
  } finally {
    observeLatency(histogram, (performance.now() - start) / 1000);
  }
}

/** `store` with each chunk verb and each commit timed into `times`. */
export function timedVolumeStore<T extends VolumeStore>(store: T, times: StageTimes): T {
  const { chunks, metadata } = store;
  return {
    ...store,
    chunks: {
      read: (...args: Parameters<typeof chunks.read>) => timed(times.chunk_read, () => chunks.read(...args)),
      write: (...args: Parameters<typeof chunks.write>) => timed(times.chunk_write, () => chunks.write(...args)),
      zero: (...args: Parameters<typeof chunks.zero>) => timed(times.chunk_zero, () => chunks.zero(...args)),
    },
    metadata: {
      record: (...args: Parameters<typeof metadata.record>) => metadata.record(...args),
      checkHealthy: () => metadata.checkHealthy(),
      commit: () => timed(times.commit, () => metadata.commit()),
    },
  };
}
