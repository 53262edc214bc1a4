// npm run bench:threads: what chunkd's threads buy on this machine (the worker-thread issue's measurements).
//
// Design note. Every system serves a 1 GiB export over TCP on 127.0.0.1 (NBD protocol threads listen only on
// TCP, so every system gets the same transport): qemu-nbd on a raw file (the peer), and chunkd with its chunk
// I/O on the main thread (--workers 0), on one worker, on the default (one per CPU), the default plus two NBD
// protocol threads, and the default with read verification off (only for the 1 MiB rows: what checking costs).
// Each is filled first (1 MiB writes, then a flush). The rows are the node issue's six fio rows, 4 KiB random
// read and write at queue depth 8 over 1, 2 and 4 connections (multi-conn), and last a 1 MiB sequential read
// of the range the write rows rewrote at random (redirect-on-write scattered it). Every row runs `--runs` times
// per system, the systems interleaved. For chunkd, the main thread's event-loop utilisation over each sample
// comes from its status API (utilisation since the previous status call, made just before the sample).
// Everything started is stopped, also on error or interrupt (bench/processes.ts). Shared fio plumbing:
// bench/fio.ts.
import http from 'node:http';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { freePort } from '../src/testing/node-process.ts';
import { fill, measure, nbdTarget, type MeasureOptions } from './fio.ts';
import { cleanup, cleanupOnSignals, commandOutput, onCleanup, setClockTicks, spawnTracked, stopChild, tail, Tools } from './processes.ts';
import type { RowSpec, Sample } from './report.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const MiB = 2 ** 20;
const serverStartTimeoutMs = 30_000;

interface System {
  id: string;
  title: string;
  /** chunkd serve arguments, or null for qemu-nbd. */
  chunkdArgs: string[] | null;
  /** Rows this system runs (all when null). */
  onlyRows: string[] | null;
  /** The chunkd checkout it runs (this one unless --baseline adds a twin from another). */
  checkout?: string;
}

interface Running {
  pid: number;
  uri: string;
  apiSocket: string | null;
  stop: () => Promise<void>;
}

function rowSpec(id: string, rw: RowSpec['rw'], blockSize: RowSpec['blockSize'], iodepth: number, connections: number): RowSpec {
  return { id, title: id, rw, blockSize, iodepth, connections, metric: blockSize === '4k' ? 'iops' : 'mbps', readPercent: null };
}

const rows: RowSpec[] = [
  rowSpec('randread-4k-qd1', 'randread', '4k', 1, 1),
  rowSpec('randread-4k-qd32', 'randread', '4k', 32, 1),
  rowSpec('read-1m-qd8', 'read', '1M', 8, 1),
  rowSpec('randread-4k-qd8-c1', 'randread', '4k', 8, 1),
  rowSpec('randread-4k-qd8-c2', 'randread', '4k', 8, 2),
  rowSpec('randread-4k-qd8-c4', 'randread', '4k', 8, 4),
  rowSpec('randwrite-4k-qd1', 'randwrite', '4k', 1, 1),
  rowSpec('randwrite-4k-qd32', 'randwrite', '4k', 32, 1),
  rowSpec('write-1m-qd8', 'write', '1M', 8, 1),
  rowSpec('randwrite-4k-qd8-c1', 'randwrite', '4k', 8, 1),
  rowSpec('randwrite-4k-qd8-c2', 'randwrite', '4k', 8, 2),
  rowSpec('randwrite-4k-qd8-c4', 'randwrite', '4k', 8, 4),
  rowSpec('read-1m-qd8-rewritten', 'read', '1M', 8, 1),
];

const systems: System[] = [
  { id: 'qemu-nbd', title: 'qemu-nbd on a raw file (-e 8: multi-conn)', chunkdArgs: null, onlyRows: null },
  { id: 'chunkd-w0', title: 'chunkd --workers 0 (all chunk I/O on the main thread)', chunkdArgs: ['--workers', '0'], onlyRows: null },
  { id: 'chunkd-w1', title: 'chunkd --workers 1', chunkdArgs: ['--workers', '1'], onlyRows: null },
  { id: 'chunkd', title: `chunkd, default (--workers ${os.availableParallelism()})`, chunkdArgs: [], onlyRows: null },
  { id: 'chunkd-nt2', title: 'chunkd, default workers, --nbd-threads 2', chunkdArgs: ['--nbd-threads', '2'], onlyRows: null },
  { id: 'chunkd-noverify', title: 'chunkd, default workers, --verify-reads off', chunkdArgs: ['--verify-reads', 'off'], onlyRows: ['read-1m-qd8', 'write-1m-qd8'] },
];

const usage = `usage: npm run bench:threads -- [--target DIR] [--runs N] [--runtime S] [--size-mib N] [--rows ID,...] [--systems ID,...] [--baseline DIR] [--quick] [--out FILE]
  --baseline DIR  also run every chosen chunkd system from another checkout (\`git worktree add DIR COMMIT\`), as ID@base,
                  interleaved with this one, and print current / baseline per row: a change's cost, measured in one run`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      target: { type: 'string', default: '.' },
      runs: { type: 'string' },
      runtime: { type: 'string' },
      'size-mib': { type: 'string' },
      quick: { type: 'boolean', default: false },
      out: { type: 'string' },
      rows: { type: 'string' },
      systems: { type: 'string' },
      baseline: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    return;
  }
  const quick = values.quick === true;
  const runs = Number(values.runs ?? (quick ? 1 : 3));
  const options: MeasureOptions = { runtimeSeconds: Number(values.runtime ?? (quick ? 1 : 3)), rampSeconds: quick ? 0 : 1, sizeBytes: Number(values['size-mib'] ?? (quick ? 128 : 1024)) * MiB, flushEveryBytes: null };
  const selected = values.rows === undefined ? rows : rows.filter((row) => values.rows!.split(',').includes(row.id));
  if (selected.length === 0) throw new Error(`--rows matches none of: ${rows.map((row) => row.id).join(', ')}`);
  const tools = new Tools(new Map());
  if (tools.find('fio') === null) throw new Error('fio is not installed (scripts/setup.sh installs it)');
  setClockTicks(Number((await commandOutput('getconf', ['CLK_TCK'])) ?? '100'));
  cleanupOnSignals();
  const workspace = fs.mkdtempSync(path.join(path.resolve(values.target!), '.chunkd-threads-'));
  onCleanup('workspace', () => fs.rmSync(workspace, { recursive: true, force: true }));

  const chosen = values.systems === undefined ? systems : systems.filter((system) => values.systems!.split(',').includes(system.id));
  if (chosen.length === 0) throw new Error(`--systems matches none of: ${systems.map((system) => system.id).join(', ')}`);
  const baseline = values.baseline === undefined ? null : path.resolve(values.baseline);
  if (baseline !== null && !fs.existsSync(path.join(baseline, 'bin', 'chunkd.js'))) throw new Error(`${baseline} holds no chunkd checkout (bin/chunkd.js)`);
  const withBaseline = baseline === null ? chosen : chosen.flatMap((system) => (system.chunkdArgs === null ? [system] : [{ ...system, id: `${system.id}@base`, title: `${system.title}, baseline ${baseline}`, checkout: baseline }, system]));
  const active = withBaseline.filter((system) => {
    if (system.chunkdArgs === null && tools.find('qemu-nbd') === null) {
      process.stderr.write('skipping qemu-nbd: not installed\n');
      return false;
    }
    return true;
  });
  const running = new Map<string, Running>();
  for (const system of active) {
    process.stderr.write(`starting and filling ${system.id}\n`);
    const server = system.chunkdArgs === null ? await startQemuNbd(tools, workspace, options.sizeBytes) : await startChunkd(workspace, system, options.sizeBytes);
    await fill(tools, nbdTarget(server.uri), options.sizeBytes);
    running.set(system.id, server);
  }

  const samples: Array<Sample & { eventLoopUtilization: number | null }> = [];
  for (const row of selected) {
    for (let run = 0; run < runs; run++) {
      for (const system of active) {
        if (system.onlyRows !== null && !system.onlyRows.includes(row.id)) continue;
        const server = running.get(system.id)!;
        if (server.apiSocket !== null) await status(server.apiSocket); // starts the utilisation window
        const sample = await measure(tools, nbdTarget(server.uri), server.pid, row, system.id, run, options);
        const after = server.apiSocket !== null ? await status(server.apiSocket) : null;
        samples.push({ ...sample, eventLoopUtilization: after?.eventLoopUtilization ?? null });
        const value = row.metric === 'iops' ? `${Math.round(sample.iops ?? 0)} IOPS` : `${Math.round(sample.mbps ?? 0)} MB/s`;
        process.stderr.write(`${row.id} ${system.id} run ${run + 1}: ${sample.error ?? value}${after ? `, event loop ${(after.eventLoopUtilization * 100).toFixed(0)}%` : ''}\n`);
      }
    }
  }
  const machine = { cpus: os.availableParallelism(), cpuModel: os.cpus()[0]?.model ?? null, kernel: os.release(), node: process.version, loadAverage: os.loadavg() };
  const report = { command: `npm run bench:threads -- ${process.argv.slice(2).join(' ')}`.trim(), machine, options, runs, systems: active, rows: selected, samples, table: tabulate(active, selected, samples) };
  const out = values.out ?? path.join(repoRoot, 'bench', 'results', `threads-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, `${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(`${formatTable(active, selected, report.table)}\n${baseline === null ? '' : `${formatRatios(active, selected, report.table)}\n`}results: ${out}\n`);
}

/** Median, min and max per row and system, and the median event-loop utilisation. */
function tabulate(active: System[], rows: RowSpec[], samples: Array<Sample & { eventLoopUtilization: number | null }>): Record<string, Record<string, { median: number; min: number; max: number; eventLoop: number | null } | null>> {
  const table: Record<string, Record<string, { median: number; min: number; max: number; eventLoop: number | null } | null>> = {};
  for (const row of rows) {
    table[row.id] = {};
    for (const system of active) {
      const mine = samples.filter((sample) => sample.rowId === row.id && sample.system === system.id && sample.error === null);
      const values = mine.map((sample) => (row.metric === 'iops' ? sample.iops! : sample.mbps!)).sort((a, b) => a - b);
      const loops = mine.map((sample) => sample.eventLoopUtilization).filter((value): value is number => value !== null).sort((a, b) => a - b);
      table[row.id]![system.id] = values.length === 0 ? null : { median: median(values), min: values[0]!, max: values[values.length - 1]!, eventLoop: loops.length === 0 ? null : median(loops) };
    }
  }
  return table;
}

function median(sorted: number[]): number {
  const middle = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

function formatTable(active: System[], rows: RowSpec[], table: ReturnType<typeof tabulate>): string {
  const lines = [`| row | ${active.map((system) => system.id).join(' | ')} |`, `|---|${active.map(() => '---|').join('')}`];
  for (const row of rows) {
    const cells = active.map((system) => {
      const cell = table[row.id]![system.id];
      if (cell === null || cell === undefined) return '';
      const unit = row.metric === 'iops' ? '' : ' MB/s';
      const loop = cell.eventLoop === null ? '' : ` (loop ${(cell.eventLoop * 100).toFixed(0)}%)`;
      return `${Math.round(cell.median)}${unit} [${Math.round(cell.min)}–${Math.round(cell.max)}]${loop}`;
    });
    lines.push(`| ${row.id} | ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}

/** Current / baseline medians for every system run from both checkouts (--baseline). */
function formatRatios(active: System[], rows: RowSpec[], table: ReturnType<typeof tabulate>): string {
  const pairs = active.filter((system) => system.checkout === undefined && system.chunkdArgs !== null && active.some((other) => other.id === `${system.id}@base`));
  const lines = [`| row | ${pairs.map((system) => `${system.id} / ${system.id}@base`).join(' | ')} |`, `|---|${pairs.map(() => '---|').join('')}`];
  for (const row of rows) {
    const cells = pairs.map((system) => {
      const current = table[row.id]![system.id];
      const base = table[row.id]![`${system.id}@base`];
      return current && base ? `${(current.median / base.median).toFixed(2)}x` : '';
    });
    lines.push(`| ${row.id} | ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}

async function startQemuNbd(tools: Tools, workspace: string, sizeBytes: number): Promise<Running> {
  const file = path.join(workspace, 'qemu.raw');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, sizeBytes);
  const port = await freePort();
  const child = spawnTracked(tools.get('qemu-nbd'), ['-f', 'raw', '-x', 'default', '-t', '-e', '8', '--cache=writeback', '--aio=threads', '-b', '127.0.0.1', '-p', String(port), file]);
  const stop = onCleanup('qemu-nbd', () => stopChild(child));
  const stderr = tail(child.stderr);
  const deadline = Date.now() + serverStartTimeoutMs;
  while (!(await canConnect(port))) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`qemu-nbd did not start: ${stderr()}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return { pid: child.pid!, uri: `nbd://127.0.0.1:${port}/default`, apiSocket: null, stop };
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

async function startChunkd(workspace: string, system: System, sizeBytes: number): Promise<Running> {
  const pool = path.join(workspace, `${system.id}-pool`);
  const apiSocket = path.join(workspace, `${system.id}-api.sock`);
  const args = [path.join(system.checkout ?? repoRoot, 'bin', 'chunkd.js'), 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--api', apiSocket, '--default-volume', `default:${sizeBytes / MiB}MiB`, ...system.chunkdArgs!];
  const child = spawnTracked(process.execPath, args);
  const stop = onCleanup(system.id, () => stopChild(child));
  const stderr = tail(child.stderr);
  const port = await new Promise<number>((resolve, reject) => {
    let stdout = '';
    const timer = setTimeout(() => reject(new Error(`${system.id} was not ready: ${stderr()}`)), serverStartTimeoutMs);
    child.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      const match = /chunkd ready: .*nbd 127\.0\.0\.1:(\d+)/.exec(stdout);
      if (match) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${system.id} exited ${code}: ${stderr()}`));
    });
  });
  return { pid: child.pid!, uri: `nbd://127.0.0.1:${port}/default`, apiSocket, stop };
}

function status(apiSocket: string): Promise<{ eventLoopUtilization: number }> {
  return new Promise((resolve, reject) => {
    const request = http.request({ socketPath: apiSocket, path: '/v1/status', agent: false }, (response) => {
      let body = '';
      response.on('data', (chunk: Buffer) => (body += chunk.toString()));
      response.on('end', () => resolve(JSON.parse(body) as { eventLoopUtilization: number }));
    });
    request.on('error', reject);
    request.end();
  });
}

main()
  .catch((error: unknown) => {
    process.stderr.write(`bench:threads: ${(error as Error).message}\n`);
    process.exitCode = 1;
  })
  .finally(() => cleanup());
