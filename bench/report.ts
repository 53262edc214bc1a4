// The pure half of the NBD benchmark: the rows it measures, the numbers it keeps per sample, the summary
// (median, spread, ratio, goal) and the text and Markdown tables. No processes, no files: bench/nbd-fio.ts does
// the I/O and hands samples in here.

export type SystemName = 'chunkd' | 'qemu-nbd';
export const systemNames: readonly SystemName[] = ['chunkd', 'qemu-nbd'];

/** One fio workload, measured on every system. */
export interface RowSpec {
  id: string;
  title: string;
  rw: 'randread' | 'randwrite' | 'read' | 'write';
  direction: 'read' | 'write';
  blockSize: '4k' | '1M';
  iodepth: number;
  /** What the row is judged on: IOPS for small random I/O, MB/s (10^6 bytes) for large sequential I/O. */
  metric: 'iops' | 'mbps';
  /** chunkd's median over qemu-nbd's median must reach this (the goals of the benchmark issue). */
  goalRatio: number;
}

export const rows: readonly RowSpec[] = [
  { id: 'randread-4k-qd1', title: '4 KiB random read, QD1', rw: 'randread', direction: 'read', blockSize: '4k', iodepth: 1, metric: 'iops', goalRatio: 0.8 },
  { id: 'randread-4k-qd32', title: '4 KiB random read, QD32', rw: 'randread', direction: 'read', blockSize: '4k', iodepth: 32, metric: 'iops', goalRatio: 1.0 },
  { id: 'randwrite-4k-qd1', title: '4 KiB random write, QD1', rw: 'randwrite', direction: 'write', blockSize: '4k', iodepth: 1, metric: 'iops', goalRatio: 0.8 },
  { id: 'randwrite-4k-qd32', title: '4 KiB random write, QD32', rw: 'randwrite', direction: 'write', blockSize: '4k', iodepth: 32, metric: 'iops', goalRatio: 0.8 },
  { id: 'read-1m-qd8', title: '1 MiB sequential read, QD8', rw: 'read', direction: 'read', blockSize: '1M', iodepth: 8, metric: 'mbps', goalRatio: 0.8 },
  { id: 'write-1m-qd8', title: '1 MiB sequential write, QD8', rw: 'write', direction: 'write', blockSize: '1M', iodepth: 8, metric: 'mbps', goalRatio: 0.8 },
];

/** One fio run of one row on one system. A failed run keeps its error and no figures. */
export interface Sample {
  rowId: string;
  system: SystemName;
  run: number;
  iops: number | null;
  mbps: number | null;
  latencyUsP50: number | null;
  latencyUsP99: number | null;
  ioBytes: number | null;
  /** Server process CPU (user + system, all threads) over the measured window, from /proc/PID/stat. */
  serverCpuSeconds: number | null;
  serverCpuSecondsPerGB: number | null;
  /** fio's own CPU use (usr + sys, percent of one core): the client shares this machine's cores. */
  clientCpuPercent: number | null;
  error: string | null;
}

export interface Spread {
  median: number;
  min: number;
  max: number;
  count: number;
}

export interface SystemSummary {
  value: Spread | null;
  latencyUsP50: number | null;
  latencyUsP99: number | null;
  serverCpuSecondsPerGB: number | null;
  failedRuns: number;
}

export type Verdict = 'PASS' | 'MISS' | 'n/a';

export interface RowSummary {
  rowId: string;
  title: string;
  metric: RowSpec['metric'];
  systems: Record<SystemName, SystemSummary>;
  /** chunkd median / qemu-nbd median of the row's metric; null when either side has no figure. */
  ratio: number | null;
  goalRatio: number;
  verdict: Verdict;
}

/** The median of a non-empty list (the mean of the middle two for an even count). */
export function median(values: readonly number[]): number {
  if (values.length === 0) throw new Error('median of nothing');
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

function spread(values: readonly number[]): Spread | null {
  if (values.length === 0) return null;
  return { median: median(values), min: Math.min(...values), max: Math.max(...values), count: values.length };
}

function medianOrNull(values: readonly (number | null)[]): number | null {
  const present = values.filter((value): value is number => value !== null && Number.isFinite(value));
  return present.length === 0 ? null : median(present);
}

function metricOf(row: RowSpec, sample: Sample): number | null {
  return row.metric === 'iops' ? sample.iops : sample.mbps;
}

function summariseSystem(row: RowSpec, samples: readonly Sample[]): SystemSummary {
  const good = samples.filter((sample) => sample.error === null);
  const values = good.map((sample) => metricOf(row, sample)).filter((value): value is number => value !== null);
  return {
    value: spread(values),
    latencyUsP50: medianOrNull(good.map((sample) => sample.latencyUsP50)),
    latencyUsP99: medianOrNull(good.map((sample) => sample.latencyUsP99)),
    serverCpuSecondsPerGB: medianOrNull(good.map((sample) => sample.serverCpuSecondsPerGB)),
    failedRuns: samples.length - good.length,
  };
}

/** Medians, spreads, the chunkd/qemu-nbd ratio and the verdict against the row's goal. */
export function summariseRow(row: RowSpec, samples: readonly Sample[]): RowSummary {
  const mine = samples.filter((sample) => sample.rowId === row.id);
  const systems = {
    chunkd: summariseSystem(row, mine.filter((sample) => sample.system === 'chunkd')),
    'qemu-nbd': summariseSystem(row, mine.filter((sample) => sample.system === 'qemu-nbd')),
  };
  const ours = systems.chunkd.value?.median;
  const theirs = systems['qemu-nbd'].value?.median;
  const ratio = ours !== undefined && theirs !== undefined && theirs > 0 ? ours / theirs : null;
  const verdict: Verdict = ratio === null ? 'n/a' : ratio >= row.goalRatio ? 'PASS' : 'MISS';
  return { rowId: row.id, title: row.title, metric: row.metric, systems, ratio, goalRatio: row.goalRatio, verdict };
}

// ---- formatting ----

function formatNumber(value: number): string {
  if (value >= 100) return Math.round(value).toLocaleString('en-US');
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

function formatOptional(value: number | null, unit = ''): string {
  return value === null ? '-' : `${formatNumber(value)}${unit}`;
}

function unitOf(metric: RowSpec['metric']): string {
  return metric === 'iops' ? 'IOPS' : 'MB/s';
}

/** "12,345 IOPS (12,000–12,500)": median, then min–max over the runs. */
export function formatSpread(value: Spread | null, metric: RowSpec['metric']): string {
  if (value === null) return '-';
  const range = value.count > 1 ? ` (${formatNumber(value.min)}–${formatNumber(value.max)})` : '';
  return `${formatNumber(value.median)} ${unitOf(metric)}${range}`;
}

export function formatRatio(ratio: number | null): string {
  return ratio === null ? '-' : `${ratio.toFixed(2)}x`;
}

/** One line per sample, printed as the benchmark goes. */
export function formatSampleLine(row: RowSpec, sample: Sample, runCount: number): string {
  const head = `${row.id.padEnd(18)} ${sample.system.padEnd(8)} run ${sample.run}/${runCount}`;
  if (sample.error !== null) return `${head}  FAILED: ${sample.error}`;
  const value = row.metric === 'iops' ? `${formatOptional(sample.iops)} IOPS` : `${formatOptional(sample.mbps)} MB/s`;
  const latency = `p50 ${formatOptional(sample.latencyUsP50)} µs, p99 ${formatOptional(sample.latencyUsP99)} µs`;
  return `${head}  ${value.padStart(14)}  ${latency}  server CPU ${formatOptional(sample.serverCpuSecondsPerGB)} s/GB`;
}

function padTable(lines: string[][]): string {
  const widths = lines[0]!.map((_, column) => Math.max(...lines.map((line) => line[column]!.length)));
  return lines.map((line) => line.map((cell, column) => cell.padEnd(widths[column]!)).join('  ').trimEnd()).join('\n');
}

/** The final table for a terminal. */
export function formatTextTable(summaries: readonly RowSummary[]): string {
  const header = ['row', 'chunkd', 'qemu-nbd', 'ratio', 'goal', 'result', 'p50/p99 µs chunkd', 'p50/p99 µs qemu-nbd', 'CPU s/GB chunkd', 'CPU s/GB qemu-nbd'];
  const body = summaries.map((summary) => [
    summary.title,
    formatSpread(summary.systems.chunkd.value, summary.metric),
    formatSpread(summary.systems['qemu-nbd'].value, summary.metric),
    formatRatio(summary.ratio),
    `≥ ${summary.goalRatio.toFixed(1)}x`,
    summary.verdict,
    `${formatOptional(summary.systems.chunkd.latencyUsP50)} / ${formatOptional(summary.systems.chunkd.latencyUsP99)}`,
    `${formatOptional(summary.systems['qemu-nbd'].latencyUsP50)} / ${formatOptional(summary.systems['qemu-nbd'].latencyUsP99)}`,
    formatOptional(summary.systems.chunkd.serverCpuSecondsPerGB),
    formatOptional(summary.systems['qemu-nbd'].serverCpuSecondsPerGB),
  ]);
  return padTable([header, ...body]);
}

function markdownTable(header: string[], body: string[][]): string {
  const line = (cells: string[]): string => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...body.map(line)].join('\n');
}

/** The Markdown report: throughput against the goals, then latency and server CPU per GB. */
export function formatMarkdown(summaries: readonly RowSummary[], context: { runs: number; runtimeSeconds: number; volumeBytes: number }): string {
  const throughput = markdownTable(
    ['row', 'chunkd, median (min–max)', 'qemu-nbd, median (min–max)', 'chunkd / qemu-nbd', 'goal', 'result'],
    summaries.map((summary) => [
      summary.title,
      formatSpread(summary.systems.chunkd.value, summary.metric),
      formatSpread(summary.systems['qemu-nbd'].value, summary.metric),
      formatRatio(summary.ratio),
      `≥ ${summary.goalRatio.toFixed(1)}x`,
      `**${summary.verdict}**`,
    ]),
  );
  const detail = markdownTable(
    ['row', 'chunkd p50 / p99 µs', 'qemu-nbd p50 / p99 µs', 'chunkd CPU s/GB', 'qemu-nbd CPU s/GB'],
    summaries.map((summary) => [
      summary.title,
      `${formatOptional(summary.systems.chunkd.latencyUsP50)} / ${formatOptional(summary.systems.chunkd.latencyUsP99)}`,
      `${formatOptional(summary.systems['qemu-nbd'].latencyUsP50)} / ${formatOptional(summary.systems['qemu-nbd'].latencyUsP99)}`,
      formatOptional(summary.systems.chunkd.serverCpuSecondsPerGB),
      formatOptional(summary.systems['qemu-nbd'].serverCpuSecondsPerGB),
    ]),
  );
  const volumeMiB = context.volumeBytes / 2 ** 20;
  const notes = [
    `${context.runs} run(s) per row and system, interleaved, ${context.runtimeSeconds} s each after a 1 s ramp; ${volumeMiB} MiB volume, filled before the rows.`,
    'Latency is fio completion latency (clat); CPU is the server process (user + system, all threads) per 10^9 bytes moved.',
  ];
  return ['## Throughput against the goals', '', throughput, '', '## Latency and server CPU (medians)', '', detail, '', ...notes.map((note) => `- ${note}`), ''].join('\n');
}
