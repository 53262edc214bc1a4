// npm run bench: chunkd against qemu-nbd through fio's nbd engine, on one target directory, in one run.
//
// Design note. Both servers run side by side for the whole run, each on its own unix socket, serving a volume
// (chunkd) or a raw file (qemu-nbd) of the same size in one fresh directory on the target, so that disk,
// file system and transport are equal. Each is filled first (1 MiB sequential writes, then a flush), so that
// reads hit real data and writes overwrite allocated blocks. Then every row runs `--runs` times per system,
// interleaved (chunkd, qemu-nbd, chunkd, ...), because on a small shared machine noise comes in bursts and
// should hit both sides alike. A row reports the median and the min–max over its runs, and the ratio of the
// medians. Server CPU is read from /proc/PID/stat over the measured window only (from the end of fio's ramp to
// its exit), so setup does not count. fio runs on the same cores as the servers: on a 2-core machine the
// client's own CPU is part of every number, for both systems alike.
//
// Everything this process starts is tracked; on exit, error or SIGINT/SIGTERM the servers are stopped and the
// temporary directories removed. Pure logic (rows, statistics, tables) lives in bench/report.ts.
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs, promisify } from 'node:util';
import {
  formatMarkdown,
  formatSampleLine,
  formatTextTable,
  rows,
  summariseRow,
  type RowSpec,
  type Sample,
  type SystemName,
} from './report.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const execFileAsync = promisify(execFile);

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const rampSeconds = 1;
const serverStartTimeoutMs = 30_000;
const serverStopGraceMs = 15_000;
/** fio is killed if a time-based sample overruns its runtime by this much (a hung server). */
const sampleSlackMs = 60_000;
const fillTimeoutMs = 30 * 60_000;

interface Options {
  targetDirectory: string;
  runs: number;
  runtimeSeconds: number;
  volumeBytes: number;
  outDirectory: string;
  /** The checkout whose bin/chunkd.js is measured: this one, or another to compare (a branch, a release). */
  chunkdCheckout: string;
  quick: boolean;
}

const usage = `usage: npm run bench -- [--target DIR] [--runs N] [--runtime S] [--size-gib G] [--quick] [--out DIR]
  --target DIR   directory on the disk to measure (a fresh temporary directory is made inside; default: .)
  --runs N       runs per row and system, interleaved (default 3)
  --runtime S    seconds per run after a ${rampSeconds} s ramp (default 8)
  --size-gib G   volume / file size in GiB (default 1)
  --quick        smoke mode: 1 run, 2 s, 256 MiB (explicit options still win)
  --out DIR      where results.json and results.md go (default bench/results/<timestamp>/)
  --chunkd DIR   measure the chunkd of another checkout (its bin/chunkd.js; default: this checkout)`;

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      target: { type: 'string' },
      runs: { type: 'string' },
      runtime: { type: 'string' },
      'size-gib': { type: 'string' },
      quick: { type: 'boolean', default: false },
      out: { type: 'string' },
      chunkd: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    process.exit(0);
  }
  const quick = values.quick;
  const positive = (name: string, text: string | undefined, fallback: number): number => {
    if (text === undefined) return fallback;
    const value = Number(text);
    if (!Number.isFinite(value) || value <= 0) throw new Error(`--${name} must be a positive number, not "${text}"`);
    return value;
  };
  // chunkd volumes are a multiple of 4 KiB; whole MiB keeps both systems' sizes identical and simple to print.
  const volumeMiB = Math.round(positive('size-gib', values['size-gib'], quick ? 0.25 : 1) * 1024);
  if (volumeMiB < 16) throw new Error('--size-gib must give at least 16 MiB');
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  return {
    targetDirectory: path.resolve(values.target ?? '.'),
    runs: Math.max(1, Math.round(positive('runs', values.runs, quick ? 1 : 3))),
    runtimeSeconds: Math.max(1, Math.round(positive('runtime', values.runtime, quick ? 2 : 8))),
    volumeBytes: volumeMiB * MiB,
    outDirectory: path.resolve(values.out ?? path.join(repoRoot, 'bench', 'results', stamp)),
    chunkdCheckout: path.resolve(values.chunkd ?? repoRoot),
    quick,
  };
}

// ---- processes and cleanup ----

const liveChildren = new Set<ChildProcess>();
const temporaryDirectories: string[] = [];
let stopping = false;

function haveTool(name: string): boolean {
  return (process.env.PATH ?? '').split(':').some((dir) => dir !== '' && fs.existsSync(path.join(dir, name)));
}

/** Spawns a child that cleanup() will stop; refuses once we are stopping, so an interrupt starts nothing new. */
function spawnTracked(command: string, args: string[]): ChildProcess {
  if (stopping) throw new Error('interrupted');
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
  // A failed spawn emits 'error' (the tools are checked on PATH first); without a listener it would be thrown.
  child.once('error', () => liveChildren.delete(child));
  return child;
}

function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (hasExited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), timeoutMs);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** SIGTERM, and SIGKILL if it has not gone after the grace period (chunkd commits before it exits). */
async function stopChild(child: ChildProcess): Promise<void> {
  if (hasExited(child)) return;
  child.kill('SIGTERM');
  if (await waitForExit(child, serverStopGraceMs)) return;
  child.kill('SIGKILL');
  await waitForExit(child, 5_000);
}

async function cleanup(): Promise<void> {
  stopping = true;
  await Promise.all([...liveChildren].map(stopChild));
  for (const directory of temporaryDirectories.splice(0)) fs.rmSync(directory, { recursive: true, force: true });
}

function onSignal(signal: NodeJS.Signals): void {
  if (stopping) return;
  process.stderr.write(`\nbench: ${signal}, stopping servers and removing temporary files\n`);
  void cleanup().finally(() => process.exit(130));
}

/** Keeps the last bytes of a stream, for an error message when a server dies. */
function tail(stream: NodeJS.ReadableStream | null, limitBytes = 8192): () => string {
  let text = '';
  stream?.on('data', (chunk: Buffer) => {
    text = (text + chunk.toString()).slice(-limitBytes);
  });
  return () => text;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

// ---- servers ----

interface Server {
  name: SystemName;
  pid: number;
  /** libnbd URI of the export over its unix socket, as fio's nbd engine takes it. */
  uri: string;
  /** The command line, for the report. */
  command: string[];
  stop(): Promise<void>;
}

interface Workspace {
  /** On the target: the pool and the raw file. */
  dataDirectory: string;
  /** Short path under the OS temp dir: unix socket paths are limited to 108 bytes, targets may be deep. */
  socketDirectory: string;
}

function nbdUri(socketPath: string): string {
  return `nbd+unix:///default?socket=${socketPath}`;
}

/** Starts `chunkd serve` with one volume "default" and waits for its "chunkd ready" line. */
async function startChunkd(workspace: Workspace, options: Options): Promise<Server> {
  const socketPath = path.join(workspace.socketDirectory, 'chunkd.sock');
  const args = [
    path.join(options.chunkdCheckout, 'bin', 'chunkd.js'), 'serve',
    '--pool', path.join(workspace.dataDirectory, 'pool'),
    '--listen', 'none',
    '--socket', socketPath,
    '--api', path.join(workspace.socketDirectory, 'api.sock'),
    '--default-volume', `default:${options.volumeBytes / MiB}MiB`,
  ];
  // process.execPath is the Node 24 this bench runs on (npm run bench puts node_modules/.bin first on PATH).
  const child = spawnTracked(process.execPath, args);
  const stderr = tail(child.stderr);
  await new Promise<void>((resolve, reject) => {
    let stdout = '';
    const timer = setTimeout(() => reject(new Error(`chunkd was not ready in ${serverStartTimeoutMs / 1000} s: ${stderr()}`)), serverStartTimeoutMs);
    child.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      if (stdout.includes('chunkd ready')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`chunkd exited (${code ?? signal}) before it was ready: ${stderr().trim()}`));
    });
  });
  return { name: 'chunkd', pid: child.pid!, uri: nbdUri(socketPath), command: [process.execPath, ...args], stop: () => stopChild(child) };
}

/** Resolves once something accepts connections on the unix socket (qemu-nbd prints no ready line). */
async function waitForSocket(socketPath: string, child: ChildProcess, stderr: () => string): Promise<void> {
  const deadline = Date.now() + serverStartTimeoutMs;
  while (Date.now() < deadline) {
    if (hasExited(child)) throw new Error(`qemu-nbd exited (${child.exitCode ?? child.signalCode}) before it was ready: ${stderr().trim()}`);
    const connected = await new Promise<boolean>((resolve) => {
      const socket = net.connect(socketPath, () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (connected) return;
    await sleep(50);
  }
  throw new Error(`qemu-nbd was not ready in ${serverStartTimeoutMs / 1000} s: ${stderr()}`);
}

/**
 * Starts qemu-nbd on a sparse raw file of the volume's size, with what a user would type: raw format, a named
 * export, persistent (-t, so it outlives one fio), and its defaults spelled out (host page cache in writeback
 * mode, I/O through its thread pool), one client at a time (its default; fio opens one connection).
 */
async function startQemuNbd(workspace: Workspace, options: Options): Promise<Server> {
  const file = path.join(workspace.dataDirectory, 'qemu.raw');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, options.volumeBytes);
  const socketPath = path.join(workspace.socketDirectory, 'qemu.sock');
  const args = ['-f', 'raw', '-k', socketPath, '-x', 'default', '-t', '--cache=writeback', '--aio=threads', file];
  const child = spawnTracked('qemu-nbd', args);
  await waitForSocket(socketPath, child, tail(child.stderr));
  return { name: 'qemu-nbd', pid: child.pid!, uri: nbdUri(socketPath), command: ['qemu-nbd', ...args], stop: () => stopChild(child) };
}

// ---- fio ----

let clockTicksPerSecond = 100;

/** User + system CPU seconds of a process and all its threads so far; null once it has gone (it died, or an interrupt stopped it). */
function processCpuSeconds(pid: number): number | null {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // Field 2 (comm) is in parentheses and may hold spaces; fields 14 and 15 (utime, stime) count from field 3.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[14 - 3]) + Number(fields[15 - 3])) / clockTicksPerSecond;
}

interface FioRun {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Server CPU seconds from the end of the ramp to fio's exit; null if fio never got that far. */
  serverCpuSeconds: number | null;
}

/** Runs fio; if asked, measures the server's CPU from `rampSeconds` after fio connects until fio exits. */
function runFio(args: string[], timeoutMs: number, serverPid: number | null): Promise<FioRun> {
  return new Promise((resolve, reject) => {
    let child: ChildProcess;
    try {
      child = spawnTracked('fio', args);
    } catch (error) {
      return reject(error);
    }
    let stdout = '';
    const stderr = tail(child.stderr, 64 * 1024);
    let cpuAtRampEnd: number | null = null;
    let rampTimer: NodeJS.Timeout | undefined;
    const killTimer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      // fio prints this line when its job has connected; its ramp starts then.
      if (serverPid !== null && rampTimer === undefined && stdout.includes('connected to NBD server')) {
        rampTimer = setTimeout(() => {
          cpuAtRampEnd = processCpuSeconds(serverPid);
        }, rampSeconds * 1000);
      }
    });
    child.once('error', (error) => {
      clearTimeout(killTimer);
      clearTimeout(rampTimer);
      reject(error);
    });
    child.once('close', (code) => {
      clearTimeout(killTimer);
      clearTimeout(rampTimer);
      const cpuAtExit = serverPid === null ? null : processCpuSeconds(serverPid);
      const serverCpuSeconds = cpuAtExit !== null && cpuAtRampEnd !== null ? cpuAtExit - cpuAtRampEnd : null;
      resolve({ code, stdout, stderr: stderr(), serverCpuSeconds });
    });
  });
}

// The subset of fio's JSON output this bench reads.
interface FioDirection {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  clat_ns: { percentile?: Record<string, number> };
}
interface FioJob {
  error: number;
  read: FioDirection;
  write: FioDirection;
  usr_cpu: number;
  sys_cpu: number;
}

/** The first job of fio's JSON; fio's nbd engine prints "fio: connected to NBD server" before the JSON. */
function parseFioJson(stdout: string): FioJob {
  const start = stdout.startsWith('{') ? 0 : stdout.indexOf('\n{') + 1;
  if (start === 0 && !stdout.startsWith('{')) throw new Error('no JSON in fio output');
  const job = (JSON.parse(stdout.slice(start)) as { jobs?: FioJob[] }).jobs?.[0];
  if (job === undefined) throw new Error('fio JSON has no job');
  return job;
}

function fioBaseArgs(name: string, uri: string, volumeBytes: number): string[] {
  return ['--name=' + name, '--ioengine=nbd', '--uri=' + uri, '--size=' + volumeBytes, '--output-format=json'];
}

function fioFailure(run: FioRun): string {
  const lines = (run.stderr + '\n' + run.stdout).split('\n').filter((line) => /error|fail|fio:/i.test(line) && !line.includes('connected to NBD'));
  return `fio exited ${run.code}: ${lines.slice(0, 3).join(' | ') || run.stderr.trim().slice(0, 300)}`;
}

/** Writes the whole volume once (1 MiB, QD8) and flushes, so rows read real data and overwrite allocated blocks. */
async function fill(server: Server, volumeBytes: number): Promise<{ seconds: number; mbps: number }> {
  const args = [...fioBaseArgs('fill', server.uri, volumeBytes), '--rw=write', '--bs=1M', '--iodepth=8', '--end_fsync=1'];
  const started = performance.now();
  const run = await runFio(args, fillTimeoutMs, null);
  const seconds = (performance.now() - started) / 1000;
  if (run.code !== 0) throw new Error(fioFailure(run));
  const job = parseFioJson(run.stdout);
  if (job.error !== 0) throw new Error(`fio job error ${job.error}`);
  return { seconds, mbps: job.write.bw_bytes / 1e6 };
}

function emptySample(row: RowSpec, system: SystemName, run: number, error: string): Sample {
  return { rowId: row.id, system, run, iops: null, mbps: null, latencyUsP50: null, latencyUsP99: null, ioBytes: null, serverCpuSeconds: null, serverCpuSecondsPerGB: null, clientCpuPercent: null, error };
}

/** One time-based fio run of a row against a server. A failure becomes a sample with an error, not a throw. */
async function measure(server: Server, row: RowSpec, run: number, options: Options): Promise<Sample> {
  const args = [
    ...fioBaseArgs(row.id, server.uri, options.volumeBytes),
    `--rw=${row.rw}`, `--bs=${row.blockSize}`, `--iodepth=${row.iodepth}`,
    '--time_based', `--runtime=${options.runtimeSeconds}`, `--ramp_time=${rampSeconds}`,
  ];
  const fio = await runFio(args, (options.runtimeSeconds + rampSeconds) * 1000 + sampleSlackMs, server.pid);
  if (fio.code !== 0) return emptySample(row, server.name, run, fioFailure(fio));
  let job: FioJob;
  try {
    job = parseFioJson(fio.stdout);
  } catch (error) {
    return emptySample(row, server.name, run, (error as Error).message);
  }
  if (job.error !== 0) return emptySample(row, server.name, run, `fio job error ${job.error}`);
  const side = job[row.direction];
  const percentiles = side.clat_ns.percentile ?? {};
  const microseconds = (key: string): number | null => (percentiles[key] === undefined ? null : percentiles[key] / 1000);
  const gigabytes = side.io_bytes / 1e9;
  return {
    rowId: row.id,
    system: server.name,
    run,
    iops: side.iops,
    mbps: side.bw_bytes / 1e6,
    latencyUsP50: microseconds('50.000000'),
    latencyUsP99: microseconds('99.000000'),
    ioBytes: side.io_bytes,
    serverCpuSeconds: fio.serverCpuSeconds,
    serverCpuSecondsPerGB: fio.serverCpuSeconds !== null && gigabytes > 0 ? fio.serverCpuSeconds / gigabytes : null,
    clientCpuPercent: job.usr_cpu + job.sys_cpu,
    error: null,
  };
}

// ---- the machine ----

async function commandOutput(command: string, args: string[], cwd?: string): Promise<string | null> {
  try {
    return (await execFileAsync(command, args, { cwd })).stdout.trim();
  } catch {
    return null;
  }
}

/** The machine, the tools' versions, and the commit of the chunkd measured (dirty: it has uncommitted changes). */
async function machineInfo(options: Options): Promise<Record<string, unknown>> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const checkout = options.chunkdCheckout;
  const gitStatus = await commandOutput('git', ['status', '--porcelain', '--untracked-files=no'], checkout);
  return {
    nproc: Number(await commandOutput('nproc', [])) || os.availableParallelism(),
    cpuModel: /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? null,
    memoryGiB: Math.round((os.totalmem() / GiB) * 10) / 10,
    // Other work on the machine skews every figure; the load average says how busy it was when we began.
    loadAverageAtStart: os.loadavg().map((load) => Math.round(load * 100) / 100),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    fio: await commandOutput('fio', ['--version']),
    qemuNbd: (await commandOutput('qemu-nbd', ['--version']))?.split('\n')[0] ?? null,
    uvThreadpoolSize: process.env.UV_THREADPOOL_SIZE ?? 'chunkd default (bin/chunkd.js sets 16)',
    chunkdCheckout: checkout,
    gitCommit: await commandOutput('git', ['rev-parse', 'HEAD'], checkout),
    gitDirty: gitStatus === null ? null : gitStatus !== '',
  };
}

// ---- the run ----

type Starter = (workspace: Workspace, options: Options) => Promise<Server>;
const starters: Record<SystemName, { tool: string; start: Starter }> = {
  chunkd: { tool: process.execPath, start: startChunkd },
  'qemu-nbd': { tool: 'qemu-nbd', start: startQemuNbd },
};

interface SystemRecord {
  name: SystemName;
  command: string[] | null;
  fill: { seconds: number; mbps: number } | null;
  skipped: string | null;
}

/** Starts and fills each system; a missing tool or a failed start skips that system with a line, not a crash. */
async function prepareSystems(workspace: Workspace, options: Options): Promise<{ servers: Server[]; records: SystemRecord[]; failed: boolean }> {
  const servers: Server[] = [];
  const records: SystemRecord[] = [];
  let failed = false;
  for (const name of ['chunkd', 'qemu-nbd'] as const) {
    const starter = starters[name];
    if (!fs.existsSync(starter.tool) && !haveTool(starter.tool)) {
      process.stdout.write(`${name}: skipped, ${starter.tool} not found on PATH\n`);
      records.push({ name, command: null, fill: null, skipped: `${starter.tool} not found` });
      continue;
    }
    let server: Server | null = null;
    try {
      server = await starter.start(workspace, options);
      process.stdout.write(`${name}: pid ${server.pid}: ${server.command.join(' ')}\n`);
      const filled = await fill(server, options.volumeBytes);
      process.stdout.write(`${name}: filled ${options.volumeBytes / MiB} MiB in ${filled.seconds.toFixed(1)} s (${filled.mbps.toFixed(0)} MB/s, 1 MiB writes, QD8, then flush)\n`);
      servers.push(server);
      records.push({ name, command: server.command, fill: filled, skipped: null });
    } catch (error) {
      if (stopping) throw error;
      failed = true;
      process.stdout.write(`${name}: skipped, it failed to start or fill: ${(error as Error).message}\n`);
      records.push({ name, command: server?.command ?? null, fill: null, skipped: (error as Error).message });
      await server?.stop();
    }
  }
  return { servers, records, failed };
}

/** Every row, `runs` times, the systems interleaved within each run. */
async function runRows(servers: Server[], options: Options): Promise<Sample[]> {
  const samples: Sample[] = [];
  for (const row of rows) {
    for (let run = 1; run <= options.runs; run++) {
      for (const server of servers) {
        const sample = await measure(server, row, run, options);
        if (stopping) throw new Error('interrupted');
        samples.push(sample);
        process.stdout.write(`${formatSampleLine(row, sample, options.runs)}\n`);
      }
    }
  }
  return samples;
}

function writeResults(options: Options, report: object, markdown: string): void {
  fs.mkdirSync(options.outDirectory, { recursive: true });
  fs.writeFileSync(path.join(options.outDirectory, 'results.json'), `${JSON.stringify(report, null, 2)}\n`);
  fs.writeFileSync(path.join(options.outDirectory, 'results.md'), markdown);
}

async function main(): Promise<number> {
  const options = parseOptions(process.argv.slice(2));
  if (!haveTool('fio')) {
    process.stderr.write('bench: fio not found on PATH; install it (scripts/setup.sh does) to benchmark\n');
    return 1;
  }
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  clockTicksPerSecond = Number(await commandOutput('getconf', ['CLK_TCK'])) || 100;
  const startedAt = new Date().toISOString();
  const machine = await machineInfo(options);
  process.stdout.write(`machine: ${JSON.stringify(machine)}\n`);

  fs.mkdirSync(options.targetDirectory, { recursive: true });
  const workspace: Workspace = {
    dataDirectory: fs.mkdtempSync(path.join(options.targetDirectory, '.chunkd-bench-')),
    socketDirectory: fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-bench-')),
  };
  temporaryDirectories.push(workspace.dataDirectory, workspace.socketDirectory);
  process.stdout.write(`target: ${workspace.dataDirectory}; ${options.runs} run(s) per row, ${options.runtimeSeconds} s each, volume ${options.volumeBytes / MiB} MiB\n`);

  try {
    const { servers, records, failed } = await prepareSystems(workspace, options);
    const samples = await runRows(servers, options);
    const summaries = rows.map((row) => summariseRow(row, samples));
    const markdown = formatMarkdown(summaries, options);
    const report = {
      version: 1,
      startedAt,
      finishedAt: new Date().toISOString(),
      argv: process.argv.slice(2),
      options: { ...options, rampSeconds },
      machine: { ...machine, loadAverageAtEnd: os.loadavg().map((load) => Math.round(load * 100) / 100) },
      target: { directory: options.targetDirectory },
      systems: records,
      rows,
      samples,
      summaries,
    };
    writeResults(options, report, `# chunkd vs qemu-nbd over NBD (fio)\n\n${startedAt}, commit ${machine.gitCommit ?? 'unknown'}${machine.gitDirty ? ' (with local changes)' : ''}, ${machine.nproc} CPUs (${machine.cpuModel}), ${machine.kernel}\n\n${markdown}`);
    process.stdout.write(`\n${formatTextTable(summaries)}\n\nresults: ${path.join(options.outDirectory, 'results.json')} and results.md\n`);
    const sampleFailures = samples.filter((sample) => sample.error !== null).length;
    if (sampleFailures > 0) process.stdout.write(`${sampleFailures} sample(s) failed\n`);
    return failed || sampleFailures > 0 ? 1 : 0;
  } finally {
    await cleanup();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  async (error: unknown) => {
    await cleanup();
    if (stopping && (error as Error).message === 'interrupted') return;
    process.stderr.write(`bench: ${(error as Error).message}\n`);
    process.exitCode = 1;
  },
);
