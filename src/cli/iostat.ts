// chunkd iostat [VOL] [INTERVAL]: live per-volume IOPS, MB/s and latency percentiles, as `zpool iostat` and
// `rbd perf image iostat` show them, with the average queue depth (iostat's aqu-sz). It samples the node's GET /v1/iostat (each export's counters and latency
// histograms since start, node/io-stats.ts) every INTERVAL seconds and prints what changed in between: one
// block per interval, one line per export that served anything (or the one named). --count N stops after N.
import { parseArgs } from 'node:util';
import { validateName } from '../core/names.ts';
import { quantileSeconds } from '../core/latency-histogram.ts';
import { ioStatsDelta, type ExportIoStats } from '../node/io-stats.ts';
import { callApi } from './api-client.ts';
import { parsing, UsageError } from './errors.ts';
import { commands } from './help.ts';

interface Sample {
  atMs: number;
  exports: Record<string, ExportIoStats>;
}

export interface IostatRow {
  export: string;
  readsPerSecond: number;
  writesPerSecond: number;
  readMBps: number;
  writeMBps: number;
  /** Latency percentiles in ms (bucket upper bounds), null where nothing was served. */
  readP50Ms: number | null;
  readP99Ms: number | null;
  writeP50Ms: number | null;
  writeP99Ms: number | null;
  /** Trims, write-zeroes and flushes per second. */
  otherPerSecond: number;
  /**
   * The average number of requests at the device over the interval (iostat's aqu-sz): the time they spent there,
   * summed, over the interval's length (Little's law).
   */
  queueDepth: number;
  errors: number;
}

const ms = (seconds: number | null): number | null => (seconds === null ? null : Number((seconds * 1000).toFixed(3)));

/** The interval's figures per export between two samples (pure). `only`: one export's name. */
export function iostatRows(before: Sample, after: Sample, only: string | null): IostatRow[] {
  const seconds = Math.max((after.atMs - before.atMs) / 1000, 0.001);
  const rows: IostatRow[] = [];
  for (const [name, stats] of Object.entries(after.exports)) {
    if (only !== null && name !== only && !name.startsWith(`${only}@`)) continue;
    const delta = ioStatsDelta(stats, before.exports[name]);
    const other = delta.trim.count + delta.zero.count + delta.flush.count;
    const errors = delta.read.errors + delta.write.errors + delta.trim.errors + delta.zero.errors + delta.flush.errors;
    const busySeconds = delta.read.seconds + delta.write.seconds + delta.trim.seconds + delta.zero.seconds + delta.flush.seconds;
    if (only === null && delta.read.count + delta.write.count + other === 0) continue;
    rows.push({
      export: name,
      readsPerSecond: Math.round(delta.read.count / seconds),
      writesPerSecond: Math.round(delta.write.count / seconds),
      readMBps: Number((delta.read.bytes / seconds / 1e6).toFixed(1)),
      writeMBps: Number((delta.write.bytes / seconds / 1e6).toFixed(1)),
      readP50Ms: ms(quantileSeconds(delta.read.buckets, 0.5)),
      readP99Ms: ms(quantileSeconds(delta.read.buckets, 0.99)),
      writeP50Ms: ms(quantileSeconds(delta.write.buckets, 0.5)),
      writeP99Ms: ms(quantileSeconds(delta.write.buckets, 0.99)),
      otherPerSecond: Math.round(other / seconds),
      queueDepth: Number((busySeconds / seconds).toFixed(1)),
      errors,
    });
  }
  return rows.sort((a, b) => a.export.localeCompare(b.export));
}

/** The rows as a table (a header, then one line each; "-" where nothing was served). */
export function formatIostat(rows: IostatRow[]): string {
  const cell = (value: number | null): string => (value === null ? '-' : value === Number.POSITIVE_INFINITY ? '>10000' : String(value));
  const header = ['volume', 'r/s', 'w/s', 'rMB/s', 'wMB/s', 'r p50 ms', 'r p99 ms', 'w p50 ms', 'w p99 ms', 'other/s', 'qd', 'errors'];
  const lines = rows.map((r) => [r.export, cell(r.readsPerSecond), cell(r.writesPerSecond), cell(r.readMBps), cell(r.writeMBps), cell(r.readP50Ms), cell(r.readP99Ms), cell(r.writeP50Ms), cell(r.writeP99Ms), cell(r.otherPerSecond), cell(r.queueDepth), cell(r.errors)]);
  const widths = header.map((title, i) => Math.max(title.length, ...lines.map((line) => line[i]!.length)));
  const format = (line: string[]): string => line.map((text, i) => (i === 0 ? text.padEnd(widths[i]!) : text.padStart(widths[i]!))).join('  ');
  return [format(header), ...(lines.length === 0 ? ['(no I/O)'] : lines.map(format))].join('\n');
}

export async function iostatCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const { values, positionals } = parsing(() => parseArgs({ args: argv, allowPositionals: true, options: commands.iostat.options }));
  const [volume, interval] = parsing(() => {
    if (positionals.length > 2) throw new UsageError(`usage: chunkd ${commands.iostat.usage[0]}`);
    // One argument: a number is the interval, anything else the volume (as zpool iostat reads its arguments).
    const numeric = (text: string | undefined): boolean => text !== undefined && /^\d+(\.\d+)?$/.test(text);
    const [first, second] = positionals;
    let name: string | null = null;
    if (first !== undefined && !(numeric(first) && second === undefined)) {
      validateName(first.split('@')[0]);
      name = first;
    }
    const seconds = Number((name === null ? first : second) ?? '1');
    if (!(seconds > 0 && seconds <= 3600)) throw new UsageError(`invalid interval "${name === null ? first : second}": seconds, more than 0 and at most 3600`);
    return [name, seconds] as const;
  });
  const count = values.count === undefined ? Number.POSITIVE_INFINITY : parsing(() => {
    const n = Number(values.count);
    if (!Number.isInteger(n) || n < 1) throw new UsageError(`invalid --count "${values.count}": a whole number of reports, 1 or more`);
    return n;
  });
  const socket = apiPath(values.api);
  const sample = async (): Promise<Sample> => (await callApi(socket, 'GET', '/v1/iostat')) as Sample;
  let before = await sample();
  for (let report = 0; report < count; report++) {
    await new Promise((resolve) => setTimeout(resolve, interval * 1000));
    const after = await sample();
    const rows = iostatRows(before, after, volume);
    process.stdout.write(values.json === true ? `${JSON.stringify({ atMs: after.atMs, intervalSeconds: (after.atMs - before.atMs) / 1000, volumes: rows })}\n` : `${formatIostat(rows)}\n\n`);
    before = after;
  }
  return 0;
}
