// The pure half of the benchmark suite: the rows (fio jobs) it can run, the numbers it keeps per sample, the
// summary (median, spread, ratios to the raw disk and to the best peer) and the text and Markdown tables. No
// processes, no files: bench/suite.ts does the I/O and hands samples in here; bench/charts.ts draws them.

export type Metric = 'iops' | 'mbps';

/** One fio workload, measured on every system with the same options. */
export interface RowSpec {
  id: string;
  title: string;
  rw: 'randread' | 'randwrite' | 'randrw' | 'read' | 'write';
  blockSize: '4k' | '1M';
  iodepth: number;
  /** fio jobs (numjobs), each its own NBD connection; more than one needs a server that allows multi-conn. */
  connections: number;
  /** What the row is judged on: IOPS for small random I/O, MB/s (10^6 bytes) for large sequential I/O. */
  metric: Metric;
  /** Share of reads in a mixed row (fio --rwmixread); null for single-direction rows. */
  readPercent: number | null;
}

function row(rw: RowSpec['rw'], blockSize: RowSpec['blockSize'], iodepth: number, connections: number): RowSpec {
  const kind = { randread: 'random read', randwrite: 'random write', randrw: 'random 70/30 read/write', read: 'sequential read', write: 'sequential write' }[rw];
  const size = blockSize === '4k' ? '4 KiB' : '1 MiB';
  const conns = connections === 1 ? '' : `, ${connections} conns`;
  return {
    id: `${rw}-${blockSize.toLowerCase()}-qd${iodepth}-c${connections}`,
    title: `${size} ${kind}, QD${iodepth}${conns}`,
    rw,
    blockSize,
    iodepth,
    connections,
    metric: blockSize === '4k' ? 'iops' : 'mbps',
    readPercent: rw === 'randrw' ? 70 : null,
  };
}

/** Every job the suite knows: each workload at 1 and 4 connections. */
export const allRows: readonly RowSpec[] = [
  ...(['randread', 'randwrite', 'randrw'] as const).flatMap((rw) => [1, 32].flatMap((iodepth) => [1, 4].map((connections) => row(rw, '4k', iodepth, connections)))),
  ...(['read', 'write'] as const).flatMap((rw) => [1, 4].map((connections) => row(rw, '1M', 8, connections))),
];

/**
 * The rows a run measures unless --only says otherwise: every workload on one connection, and the three queue
 * depth 32 workloads also on four (where multi-conn matters most). The other four-connection rows exist
 * (`--only all`) but do not fit a ~20 minute run on a 2-core machine.
 */
export const defaultRowIds: readonly string[] = [
  'randread-4k-qd1-c1', 'randread-4k-qd32-c1', 'randread-4k-qd32-c4',
  'randwrite-4k-qd1-c1', 'randwrite-4k-qd32-c1', 'randwrite-4k-qd32-c4',
  'randrw-4k-qd1-c1', 'randrw-4k-qd32-c1', 'randrw-4k-qd32-c4',
  'read-1m-qd8-c1', 'write-1m-qd8-c1',
];

/** The rows named by --only (comma-separated ids or prefixes such as "randread", or "all"); throws on a name matching none. */
export function selectRows(only: string | undefined): RowSpec[] {
  if (only === undefined) return allRows.filter((spec) => defaultRowIds.includes(spec.id));
  if (only === 'all') return [...allRows];
  const wanted = only.split(',').map((name) => name.trim()).filter((name) => name !== '');
  for (const name of wanted) {
    if (!allRows.some((spec) => spec.id === name || spec.id.startsWith(`${name}-`))) {
      throw new Error(`--only: no row "${name}" (rows: ${allRows.map((spec) => spec.id).join(', ')})`);
    }
  }
  return allRows.filter((spec) => wanted.some((name) => spec.id === name || spec.id.startsWith(`${name}-`)));
}

export type SystemKind = 'raw' | 'peer' | 'chunkd';

/** A system as the report sees it: what it is, and whether it lets several connections share one export. */
export interface SystemInfo {
  id: string;
  title: string;
  kind: SystemKind;
  /** Whether a row with several connections may run on it; null when it never started. */
  multiConn: boolean | null;
  /** The command that served it (null for the raw file system, or when skipped). */
  command: string[] | null;
  /** Why it was not measured: a missing tool, a failed start. */
  skipped: string | null;
  /** The preparation before the rows (fill, snapshots), for the report. */
  preparation: string | null;
}

/** One fio run of one row on one system. A failed run keeps its error and no figures. */
export interface Sample {
  rowId: string;
  system: string;
  run: number;
  /** Reads plus writes per second. */
  iops: number | null;
  /** Reads plus writes, 10^6 bytes per second. */
  mbps: number | null;
  /** Completion latency percentiles in µs (fio clat): of the reads in a mixed row, else of the row's direction. */
  latencyUsP50: number | null;
  latencyUsP99: number | null;
  latencyUsP999: number | null;
  /** p99 of the writes in a mixed row; null otherwise. */
  writeLatencyUsP99: number | null;
  ioBytes: number | null;
  /** Server process CPU (user + system, all threads) over the measured window, from /proc/PID/stat; null for raw. */
  serverCpuSeconds: number | null;
  serverCpuSecondsPerGB: number | null;
  /** fio's own CPU use (usr + sys, percent of one core, summed over its jobs): the client shares the cores. */
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
  latencyUsP999: number | null;
  serverCpuSecondsPerGB: number | null;
  failedRuns: number;
  /** Why this row did not run on this system (for instance: no multi-conn); null when it ran. */
  notRun: string | null;
  /** Median over the raw file system's median; null when either is missing. */
  ratioToRaw: number | null;
  /** Median over the best peer's median (the best other one, for a peer); null when there is none. */
  ratioToBestPeer: number | null;
}

export interface RowSummary {
  rowId: string;
  title: string;
  metric: Metric;
  /** The peer with the highest median on this row. */
  bestPeer: string | null;
  systems: Record<string, SystemSummary>;
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

export function metricOf(metric: Metric, sample: Sample): number | null {
  return metric === 'iops' ? sample.iops : sample.mbps;
}

/** Why a row cannot run on a system, or null when it can. */
export function rowBlocked(spec: RowSpec, system: SystemInfo): string | null {
  if (spec.connections > 1 && system.multiConn !== true) return 'no multi-conn';
  return null;
}

/** Medians, spreads and ratios of one row over every system. */
export function summariseRow(spec: RowSpec, systems: readonly SystemInfo[], samples: readonly Sample[]): RowSummary {
  const result: Record<string, SystemSummary> = {};
  for (const system of systems) {
    const mine = samples.filter((sample) => sample.rowId === spec.id && sample.system === system.id);
    const good = mine.filter((sample) => sample.error === null);
    const values = good.map((sample) => metricOf(spec.metric, sample)).filter((value): value is number => value !== null);
    result[system.id] = {
      value: spread(values),
      latencyUsP50: medianOrNull(good.map((sample) => sample.latencyUsP50)),
      latencyUsP99: medianOrNull(good.map((sample) => sample.latencyUsP99)),
      latencyUsP999: medianOrNull(good.map((sample) => sample.latencyUsP999)),
      serverCpuSecondsPerGB: medianOrNull(good.map((sample) => sample.serverCpuSecondsPerGB)),
      failedRuns: mine.length - good.length,
      notRun: system.skipped ?? (mine.length === 0 ? rowBlocked(spec, system) ?? 'not run' : null),
      ratioToRaw: null,
      ratioToBestPeer: null,
    };
  }
  const medianOf = (id: string): number | null => result[id]?.value?.median ?? null;
  const raw = systems.find((system) => system.kind === 'raw');
  const rawMedian = raw === undefined ? null : medianOf(raw.id);
  const peers = systems.filter((system) => system.kind === 'peer' && medianOf(system.id) !== null);
  const best = (exclude: string | null): SystemInfo | null =>
    peers.filter((peer) => peer.id !== exclude).reduce<SystemInfo | null>((top, peer) => (top === null || medianOf(peer.id)! > medianOf(top.id)! ? peer : top), null);
  for (const system of systems) {
    const summary = result[system.id]!;
    const mine = medianOf(system.id);
    if (mine === null) continue;
    if (rawMedian !== null && rawMedian > 0) summary.ratioToRaw = mine / rawMedian;
    const bestPeer = best(system.kind === 'peer' ? system.id : null);
    if (bestPeer !== null && system.kind !== 'raw') summary.ratioToBestPeer = mine / medianOf(bestPeer.id)!;
  }
  return { rowId: spec.id, title: spec.title, metric: spec.metric, bestPeer: best(null)?.id ?? null, systems: result };
}

// ---- formatting ----

export function formatNumber(value: number): string {
  if (value >= 100) return Math.round(value).toLocaleString('en-US');
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

function formatOptional(value: number | null): string {
  return value === null ? '-' : formatNumber(value);
}

export function unitOf(metric: Metric): string {
  return metric === 'iops' ? 'IOPS' : 'MB/s';
}

/** "12,345 (12,000–12,500)": median, then min–max over the runs. */
export function formatSpread(value: Spread | null): string {
  if (value === null) return '-';
  const range = value.count > 1 ? ` (${formatNumber(value.min)}–${formatNumber(value.max)})` : '';
  return `${formatNumber(value.median)}${range}`;
}

export function formatRatio(ratio: number | null): string {
  return ratio === null ? '-' : `${ratio.toFixed(2)}x`;
}

function cellOrReason(summary: SystemSummary | undefined, text: (summary: SystemSummary) => string): string {
  if (summary === undefined) return '-';
  if (summary.value === null) return summary.notRun !== null ? `n/a (${summary.notRun})` : summary.failedRuns > 0 ? 'failed' : '-';
  return text(summary);
}

/** One line per sample, printed as the suite goes. */
export function formatSampleLine(spec: RowSpec, sample: Sample, runCount: number): string {
  const head = `${spec.id.padEnd(20)} ${sample.system.padEnd(18)} run ${sample.run}/${runCount}`;
  if (sample.error !== null) return `${head}  FAILED: ${sample.error}`;
  const value = `${formatOptional(metricOf(spec.metric, sample))} ${unitOf(spec.metric)}`;
  const latency = `p50 ${formatOptional(sample.latencyUsP50)} µs, p99 ${formatOptional(sample.latencyUsP99)} µs, p99.9 ${formatOptional(sample.latencyUsP999)} µs`;
  const cpu = sample.serverCpuSecondsPerGB === null ? '' : `  server CPU ${formatOptional(sample.serverCpuSecondsPerGB)} s/GB`;
  return `${head}  ${value.padStart(14)}  ${latency}${cpu}`;
}

function padTable(lines: string[][]): string {
  const widths = lines[0]!.map((_, column) => Math.max(...lines.map((line) => line[column]!.length)));
  return lines.map((line) => line.map((cell, column) => cell.padEnd(widths[column]!)).join('  ').trimEnd()).join('\n');
}

/** The final table for a terminal: medians, and each system's ratio to the raw disk. */
export function formatTextTable(summaries: readonly RowSummary[], systems: readonly SystemInfo[]): string {
  const measured = systems.filter((system) => system.skipped === null);
  const header = ['row', ...measured.map((system) => system.id)];
  const body = summaries.map((summary) => [
    `${summary.title} (${unitOf(summary.metric)})`,
    ...measured.map((system) => cellOrReason(summary.systems[system.id], (entry) => `${formatNumber(entry.value!.median)}${entry.ratioToRaw === null || system.kind === 'raw' ? '' : ` ${formatRatio(entry.ratioToRaw)}`}`)),
  ]);
  return padTable([header, ...body]);
}

export function markdownTable(header: string[], body: string[][]): string {
  const line = (cells: string[]): string => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...body.map(line)].join('\n');
}

export interface ReportContext {
  runs: number;
  runtimeSeconds: number;
  rampSeconds: number;
  volumeBytes: number;
  cache: 'warm' | 'cold';
  /** Bytes written between flushes in the write rows; null: no flush during a row. */
  flushEveryBytes: number | null;
}

/** The Markdown tables: throughput, ratios, latency, server CPU. Charts are added by the caller. */
export function formatMarkdownTables(summaries: readonly RowSummary[], systems: readonly SystemInfo[], context: ReportContext): string {
  const measured = systems.filter((system) => system.skipped === null);
  const ids = measured.map((system) => system.id);
  const throughput = markdownTable(
    ['row', 'unit', ...ids],
    summaries.map((summary) => [summary.title, unitOf(summary.metric), ...measured.map((system) => cellOrReason(summary.systems[system.id], (entry) => formatSpread(entry.value)))]),
  );
  const nonRaw = measured.filter((system) => system.kind !== 'raw');
  const ratios = markdownTable(
    ['row', 'best peer', ...nonRaw.map((system) => system.id)],
    summaries.map((summary) => [
      summary.title,
      summary.bestPeer ?? '-',
      ...nonRaw.map((system) => cellOrReason(summary.systems[system.id], (entry) => `${formatRatio(entry.ratioToRaw)} / ${formatRatio(entry.ratioToBestPeer)}`)),
    ]),
  );
  const latency = markdownTable(
    ['row', ...ids],
    summaries.map((summary) => [
      summary.title,
      ...measured.map((system) =>
        cellOrReason(summary.systems[system.id], (entry) => `${formatOptional(entry.latencyUsP50)} / ${formatOptional(entry.latencyUsP99)} / ${formatOptional(entry.latencyUsP999)}`),
      ),
    ]),
  );
  const servers = measured.filter((system) => system.kind !== 'raw');
  const cpu = markdownTable(
    ['row', ...servers.map((system) => system.id)],
    summaries.map((summary) => [summary.title, ...servers.map((system) => cellOrReason(summary.systems[system.id], (entry) => formatOptional(entry.serverCpuSecondsPerGB)))]),
  );
  const volumeMiB = context.volumeBytes / 2 ** 20;
  const notes = [
    `${context.runs} run(s) per row and system, the systems interleaved within each run, ${context.runtimeSeconds} s each after a ${context.rampSeconds} s ramp; ${volumeMiB} MiB per export, filled before the rows.`,
    context.cache === 'warm'
      ? 'Page cache warm: the exports were just filled, so reads mostly come from memory and the rows measure each system\'s request path.'
      : 'Page cache cold: before every sample the target is synced and the cached pages of every file the system uses are dropped, so reads go to the target.',
    context.flushEveryBytes === null
      ? 'Write rows do not flush during the row.'
      : `Write rows flush every ${context.flushEveryBytes / 2 ** 20} MiB written (fio --fsync), so the target's write speed is measured, not the page cache's.`,
    'Latency is fio completion latency (clat), of the reads in a mixed row. CPU is the server process (user + system, all threads) per 10^9 bytes moved.',
  ];
  return [
    '## Throughput (median, min–max)', '', throughput, '',
    '## Ratios: to the raw file system / to the best peer', '',
    'A peer is compared with the best other peer.', '', ratios, '',
    '## Latency, µs: p50 / p99 / p99.9 (medians)', '', latency, '',
    '## Server CPU seconds per GB (medians)', '', cpu, '',
    ...notes.map((note) => `- ${note}`), '',
  ].join('\n');
}
