// The mounted path benchmark (issue 5): the same fio jobs on an ext4 file system that lives
//   (a) on a chunkd volume through chunkd's own FUSE file + a loop device,
//   (b) on a chunkd volume through nbdfuse (libnbd's FUSE file over chunkd's NBD unix socket) + a loop device,
//   (c) directly on the target's file system (the physical limit),
// with runs interleaved (every row and system once, then again) and the median of the runs reported.
// Both chunkd paths are made by the node's own `attach` (loop device with direct I/O, ext4 made the same way),
// so they differ only in the FUSE server. Results: JSON and Markdown under bench/results/mounted-<time>/.
//
//   node bench/mounted.ts [--target DIR] [--runs N] [--runtime S] [--size-mib M] [--quick] [--out DIR] [--rows ID,ID]
//
// setupMountedVolume() and startBenchNode() are exported for other benchmark suites: each returns what it made
// and a cleanup that undoes it.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { callApi } from '../src/cli/api-client.ts';
import { runCommand } from './processes.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const chunkdBin = path.join(repoRoot, 'bin', 'chunkd.js');

export type MountedVia = 'fuse' | 'nbdfuse';

export interface BenchNode {
  pool: string;
  apiSocket: string;
  nbdSocket: string;
  fuseDirectory: string;
  pid: number;
  /** The node's `status` (FUSE request sizes included). */
  status(): Promise<Record<string, unknown>>;
  /** SIGTERM and wait; the node unmounts what it attached. */
  stop(): Promise<void>;
}

/** Starts `chunkd serve` on `directory/pool` with the FUSE front end at `directory/fuse` and NBD on a unix socket. */
export async function startBenchNode(directory: string): Promise<BenchNode> {
  fs.mkdirSync(directory, { recursive: true });
  const pool = path.join(directory, 'pool');
  const apiSocket = path.join(directory, 'api.sock');
  const nbdSocket = path.join(directory, 'nbd.sock');
  const fuseDirectory = path.join(directory, 'fuse');
  const child = spawn(process.execPath, [chunkdBin, 'serve', '--pool', pool, '--listen', 'none', '--socket', nbdSocket, '--api', apiSocket, '--fuse', fuseDirectory], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-8192);
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    let stdout = '';
    const timer = setTimeout(() => reject(new Error(`chunkd did not start: ${stderr}`)), 30_000);
    child.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      if (stdout.includes('chunkd ready')) {
        clearTimeout(timer);
        resolve();
      }
    });
    void exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`chunkd exited before it was ready: ${stderr}`));
    });
  });
  return {
    pool,
    apiSocket,
    nbdSocket,
    fuseDirectory,
    pid: child.pid!,
    status: async () => (await callApi(apiSocket, 'GET', '/v1/status')) as Record<string, unknown>,
    stop: async () => {
      if (child.exitCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

export interface MountedVolume {
  /** The mounted ext4 file system: run fio in here. */
  directory: string;
  /** Detaches the volume (unmount, loop device, flush) and removes it. */
  cleanup(): Promise<void>;
}

/** Creates a volume on a running node and attaches it with ext4 through `via`; returns the mounted directory. */
export async function setupMountedVolume(node: BenchNode, options: { volume: string; sizeBytes: number; via: MountedVia; mountpoint: string }): Promise<MountedVolume> {
  await callApi(node.apiSocket, 'POST', '/v1/volumes', { name: options.volume, sizeBytes: options.sizeBytes });
  try {
    await callApi(node.apiSocket, 'POST', `/v1/volumes/${options.volume}/attach`, { mountpoint: options.mountpoint, fs: 'ext4', via: options.via });
  } catch (error) {
    await callApi(node.apiSocket, 'DELETE', `/v1/volumes/${options.volume}`).catch(() => {});
    throw error;
  }
  return {
    directory: options.mountpoint,
    cleanup: async () => {
      await callApi(node.apiSocket, 'POST', `/v1/volumes/${options.volume}/detach`);
      await callApi(node.apiSocket, 'DELETE', `/v1/volumes/${options.volume}`);
    },
  };
}

interface Row {
  id: string;
  title: string;
  rw: 'read' | 'write' | 'randread' | 'randwrite';
  blockSize: string;
  iodepth: number;
  /** What the table shows: MB/s for sequential rows, IOPS for random ones. */
  unit: 'MB/s' | 'IOPS';
}

const rowSpecs: Row[] = [
  { id: 'seq-read-1m', title: '1 MiB sequential read, QD8', rw: 'read', blockSize: '1M', iodepth: 8, unit: 'MB/s' },
  { id: 'seq-write-1m', title: '1 MiB sequential write, QD8', rw: 'write', blockSize: '1M', iodepth: 8, unit: 'MB/s' },
  { id: 'rand-read-4k', title: '4 KiB random read, QD32', rw: 'randread', blockSize: '4k', iodepth: 32, unit: 'IOPS' },
  { id: 'rand-write-4k', title: '4 KiB random write, QD32', rw: 'randwrite', blockSize: '4k', iodepth: 32, unit: 'IOPS' },
];

const systemNames = ['chunkd-fuse', 'nbdfuse', 'raw'] as const;
type SystemName = (typeof systemNames)[number];
const systemTitles: Record<SystemName, string> = { 'chunkd-fuse': '(a) chunkd FUSE + loop + ext4', nbdfuse: '(b) nbdfuse + loop + ext4 (chunkd NBD)', raw: '(c) raw file system' };

interface Sample {
  system: SystemName;
  row: string;
  run: number;
  value: number | null;
  latencyUsP50: number | null;
  latencyUsP99: number | null;
  error: string | null;
}

const fileName = 'bench.dat';

async function layOut(directory: string, sizeMiB: number): Promise<void> {
  const result = await runCommand('fio', ['--name=layout', `--directory=${directory}`, `--filename=${fileName}`, `--size=${sizeMiB}M`, '--rw=write', '--bs=1M', '--ioengine=libaio', '--iodepth=8', '--direct=1', '--end_fsync=1'], { timeoutMs: 30 * 60_000 });
  if (result.code !== 0) throw new Error(`laying out ${directory}/${fileName} failed: ${result.stderr}${result.stdout.slice(-500)}`);
}

async function sample(system: SystemName, directory: string, row: Row, run: number, runtimeS: number, sizeMiB: number): Promise<Sample> {
  const result = await runCommand(
    'fio',
    [
      `--name=${row.id}`, `--directory=${directory}`, `--filename=${fileName}`, `--size=${sizeMiB}M`, `--rw=${row.rw}`, `--bs=${row.blockSize}`,
      '--ioengine=libaio', `--iodepth=${row.iodepth}`, '--direct=1', '--time_based', `--runtime=${runtimeS}`, '--ramp_time=1',
      '--randrepeat=0', '--norandommap', '--output-format=json',
    ],
    { timeoutMs: (runtimeS + 120) * 1000 },
  );
  if (result.code !== 0) return { system, row: row.id, run, value: null, latencyUsP50: null, latencyUsP99: null, error: `fio exit ${result.code}: ${result.stderr.trim().slice(-300)}` };
  const job = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))).jobs[0];
  const side = row.rw.includes('read') ? job.read : job.write;
  const percentiles = side.clat_ns?.percentile ?? {};
  return {
    system,
    row: row.id,
    run,
    value: row.unit === 'IOPS' ? Math.round(side.iops) : Math.round((side.bw_bytes / 1e6) * 10) / 10,
    latencyUsP50: percentiles['50.000000'] !== undefined ? Math.round(percentiles['50.000000'] / 100) / 10 : null,
    latencyUsP99: percentiles['99.000000'] !== undefined ? Math.round(percentiles['99.000000'] / 100) / 10 : null,
    error: null,
  };
}

function median(values: number[]): number | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

export interface MountedSummary {
  row: string;
  title: string;
  unit: string;
  medians: Record<SystemName, number | null>;
  p99Us: Record<SystemName, number | null>;
  /** (a) / (b): the goal is at least 1 on every row. */
  fuseOverNbdfuse: number | null;
  fuseOverRaw: number | null;
  pass: boolean;
}

export function summarise(samples: Sample[]): MountedSummary[] {
  return rowSpecs.filter((row) => samples.some((s) => s.row === row.id)).map((row) => {
    const pick = (system: SystemName, field: 'value' | 'latencyUsP99'): number | null =>
      median(samples.filter((s) => s.row === row.id && s.system === system && s[field] !== null).map((s) => s[field]!));
    const medians = Object.fromEntries(systemNames.map((system) => [system, pick(system, 'value')])) as Record<SystemName, number | null>;
    const p99Us = Object.fromEntries(systemNames.map((system) => [system, pick(system, 'latencyUsP99')])) as Record<SystemName, number | null>;
    const ratio = (a: number | null, b: number | null): number | null => (a !== null && b !== null && b > 0 ? Math.round((a / b) * 100) / 100 : null);
    const fuseOverNbdfuse = ratio(medians['chunkd-fuse'], medians.nbdfuse);
    return { row: row.id, title: row.title, unit: row.unit, medians, p99Us, fuseOverNbdfuse, fuseOverRaw: ratio(medians['chunkd-fuse'], medians.raw), pass: fuseOverNbdfuse !== null && fuseOverNbdfuse >= 1 };
  });
}

function formatMarkdown(summary: MountedSummary[], meta: Record<string, unknown>, fuseSizes: unknown): string {
  const cell = (value: number | null, p99Us: number | null): string =>
    value === null ? 'failed' : `${Math.round(value).toLocaleString('en-US')}${p99Us !== null ? ` (p99 ${(p99Us / 1000).toFixed(1)} ms)` : ''}`;
  const lines = [
    `# Mounted path: ext4 on a chunkd volume (issue 5)`,
    '',
    `${String(meta.date)} · ${String(meta.runs)} runs × ${String(meta.runtimeS)} s per row and system (after a 1 s ramp), medians · ${String(meta.sizeMiB)} MiB file · fio libaio, direct=1 · ${String(meta.cpus)} CPUs · kernel ${String(meta.kernel)}`,
    '',
    `| row | ${systemNames.map((s) => systemTitles[s]).join(' | ')} | (a)/(b) | (a)/(c) | goal (a) ≥ (b) |`,
    `|---|${systemNames.map(() => '---:').join('|')}|---:|---:|---|`,
    ...summary.map(
      (row) =>
        `| ${row.title} (${row.unit}) | ${systemNames.map((s) => cell(row.medians[s], row.p99Us[s])).join(' | ')} | ${row.fuseOverNbdfuse ?? '-'} | ${row.fuseOverRaw ?? '-'} | ${row.pass ? 'PASS' : 'FAIL'} |`,
    ),
    '',
    `Request sizes that reached chunkd's FUSE server during the run: ${JSON.stringify(fuseSizes)}`,
    '',
  ];
  return lines.join('\n');
}

export interface MountedBenchOptions {
  target: string;
  runs: number;
  runtimeS: number;
  sizeMiB: number;
  out: string;
  log: (line: string) => void;
  /** Row ids to run (default: all). */
  rows?: string[];
}

/** Runs the whole benchmark; cleans up everything it made, whatever happens. */
export async function runMountedBench(options: MountedBenchOptions): Promise<{ summary: MountedSummary[]; samples: Sample[]; markdown: string }> {
  const work = fs.mkdtempSync(path.join(path.resolve(options.target), '.chunkd-bench-mounted-'));
  const undo: Array<() => Promise<void>> = [];
  const volumeBytes = Math.max(512, options.sizeMiB * 2) * 1024 * 1024;
  try {
    const node = await startBenchNode(path.join(work, 'node'));
    undo.push(() => node.stop());
    const directories: Record<SystemName, string> = { 'chunkd-fuse': '', nbdfuse: '', raw: path.join(work, 'raw') };
    fs.mkdirSync(directories.raw);
    for (const [system, via] of [['chunkd-fuse', 'fuse'], ['nbdfuse', 'nbdfuse']] as const) {
      const mounted = await setupMountedVolume(node, { volume: `bench-${via}`, sizeBytes: volumeBytes, via, mountpoint: path.join(work, `mnt-${via}`) });
      undo.push(() => mounted.cleanup());
      directories[system] = mounted.directory;
    }
    for (const system of systemNames) {
      options.log(`laying out ${options.sizeMiB} MiB on ${system}`);
      await layOut(directories[system], options.sizeMiB);
    }
    const samples: Sample[] = [];
    for (let run = 1; run <= options.runs; run++) {
      for (const row of rowSpecs.filter((spec) => options.rows === undefined || options.rows.includes(spec.id))) {
        for (const system of systemNames) {
          const result = await sample(system, directories[system], row, run, options.runtimeS, options.sizeMiB);
          options.log(`run ${run} ${row.id} ${system}: ${result.value ?? result.error} ${row.unit}`);
          samples.push(result);
        }
      }
    }
    const fuse = ((await node.status()).fuse ?? {}) as { readSizes?: unknown; writeSizes?: unknown };
    const fuseSizes = { reads: fuse.readSizes, writes: fuse.writeSizes };
    const summary = summarise(samples);
    const meta = { date: new Date().toISOString(), runs: options.runs, runtimeS: options.runtimeS, sizeMiB: options.sizeMiB, cpus: os.cpus().length, kernel: os.release(), target: path.resolve(options.target) };
    const markdown = formatMarkdown(summary, meta, fuseSizes);
    fs.mkdirSync(options.out, { recursive: true });
    fs.writeFileSync(path.join(options.out, 'results.json'), `${JSON.stringify({ meta, summary, samples, fuseSizes }, null, 2)}\n`);
    fs.writeFileSync(path.join(options.out, 'results.md'), markdown);
    return { summary, samples, markdown };
  } finally {
    for (const step of undo.reverse()) {
      await step().catch((error: unknown) => options.log(`cleanup: ${(error as Error).message}`));
    }
    fs.rmSync(work, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: '.' },
      runs: { type: 'string' },
      runtime: { type: 'string' },
      'size-mib': { type: 'string' },
      quick: { type: 'boolean', default: false },
      out: { type: 'string' },
      rows: { type: 'string' },
    },
  });
  const quick = values.quick;
  const options: MountedBenchOptions = {
    target: values.target,
    runs: Number(values.runs ?? (quick ? 1 : 3)),
    runtimeS: Number(values.runtime ?? (quick ? 2 : 10)),
    sizeMiB: Number(values['size-mib'] ?? (quick ? 64 : 1024)),
    out: values.out ?? path.join(repoRoot, 'bench', 'results', `mounted-${new Date().toISOString().replace(/[:.]/g, '-')}`),
    log: (line) => process.stderr.write(`${line}\n`),
    ...(values.rows !== undefined ? { rows: values.rows.split(',') } : {}),
  };
  const { markdown, summary } = await runMountedBench(options);
  process.stdout.write(`${markdown}\nresults in ${options.out}\n`);
  process.exitCode = summary.every((row) => row.medians['chunkd-fuse'] !== null) ? 0 : 1;
}
