// A latency histogram with fixed buckets, as Prometheus' histograms are rendered (cumulative at render): the per
// volume request latencies (node/io-stats.ts) and the store's stages (store/stage-times.ts) use it. Pure.

/** Upper bounds of the buckets, in seconds (the last bucket, +Inf, is implied). */
export const latencyBucketsSeconds = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10] as const;

export interface LatencyHistogram {
  count: number;
  /** Sum of the latencies, seconds. */
  seconds: number;
  /** Count per bucket (not cumulative); one more than latencyBucketsSeconds, the last for +Inf. */
  buckets: number[];
}

export function emptyHistogram(): LatencyHistogram {
  return { count: 0, seconds: 0, buckets: new Array<number>(latencyBucketsSeconds.length + 1).fill(0) };
}

/** `into` plus what `from` counted (histograms kept on other threads, summed for one report). */
export function addHistogram(into: LatencyHistogram, from: LatencyHistogram): void {
  into.count += from.count;
  into.seconds += from.seconds;
  for (const [bucket, count] of from.buckets.entries()) into.buckets[bucket]! += count;
}

/** Counts one latency. */
export function observeLatency(histogram: LatencyHistogram, seconds: number): void {
  histogram.count += 1;
  histogram.seconds += seconds;
  let bucket = 0;
  while (bucket < latencyBucketsSeconds.length && seconds > latencyBucketsSeconds[bucket]!) bucket++;
  histogram.buckets[bucket]! += 1;
}

/**
 * The latency at quantile `q` (0..1) of what `buckets` counted, as the upper bound of the bucket it falls in
 * (Prometheus' histogram_quantile interpolates; a bound is honest about the resolution); null for none.
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

/** The Prometheus text lines of one histogram series (`labels`: `a="x",b="y"`). */
export function histogramLines(name: string, labels: string, histogram: LatencyHistogram): string[] {
  const lines: string[] = [];
  let cumulative = 0;
  for (const [i, count] of histogram.buckets.entries()) {
    cumulative += count;
    lines.push(`${name}_bucket{${labels},le="${i < latencyBucketsSeconds.length ? latencyBucketsSeconds[i] : '+Inf'}"} ${cumulative}`);
  }
  lines.push(`${name}_sum{${labels}} ${Number(histogram.seconds.toFixed(6))}`, `${name}_count{${labels}} ${histogram.count}`);
  return lines;
}
