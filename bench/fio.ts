// Running fio and reading its JSON: one measured sample of a row on a system, and the fills and writes that
// prepare a system. The server's CPU is read from /proc/PID/stat over the measured window only: from the end of
// fio's ramp (timed from its first connection, or from its start for a file) to its exit.
import type { ChildProcess } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { processCpuSeconds, spawnTracked, tail, type Tools } from './processes.ts';
import type { RowSpec, Sample } from './report.ts';

/** fio is killed if a time-based sample overruns its runtime by this much (a hung server). */
const sampleSlackMs = 60_000;
const fillTimeoutMs = 30 * 60_000;

export interface FioRun {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Server CPU seconds from the end of the ramp to fio's exit; null without a server or if fio never got that far. */
  serverCpuSeconds: number | null;
}

/** Runs fio; with a server pid, measures its CPU from `rampSeconds` after fio starts its I/O until fio exits. */
export function runFio(tools: Tools, args: string[], timeoutMs: number, serverPid: number | null, rampSeconds: number, nbd: boolean, env?: NodeJS.ProcessEnv): Promise<FioRun> {
  return new Promise((resolve, reject) => {
    let child: ChildProcess;
    try {
      child = spawnTracked(tools.get('fio'), args, { env });
    } catch (error) {
      return reject(error);
    }
    let stdout = '';
    const stderr = tail(child.stderr, 64 * 1024);
    let cpuAtRampEnd: number | null = null;
    let rampTimer: NodeJS.Timeout | undefined;
    const startRamp = (): void => {
      if (serverPid === null || rampTimer !== undefined) return;
      rampTimer = setTimeout(() => {
        cpuAtRampEnd = processCpuSeconds(serverPid);
      }, rampSeconds * 1000);
    };
    // fio's nbd engine prints "connected to NBD server" once a job has connected: its ramp starts then.
    if (!nbd) startRamp();
    const killTimer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      if (nbd && stdout.includes('connected to NBD server')) startRamp();
    });
    child.stderr!.on('data', (chunk: Buffer) => {
      if (nbd && chunk.toString().includes('connected to NBD server')) startRamp();
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

// The subset of fio's JSON output the suite reads.
interface FioDirection {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  clat_ns: { percentile?: Record<string, number> };
}
export interface FioJob {
  error: number;
  read: FioDirection;
  write: FioDirection;
  usr_cpu: number;
  sys_cpu: number;
}

/** The first job of fio's JSON (the group with --group_reporting); text before the JSON (nbd's notices) is skipped. */
export function parseFioJson(stdout: string): FioJob {
  const start = stdout.startsWith('{') ? 0 : stdout.indexOf('\n{') + 1;
  if (start === 0 && !stdout.startsWith('{')) throw new Error('no JSON in fio output');
  const job = (JSON.parse(stdout.slice(start)) as { jobs?: FioJob[] }).jobs?.[0];
  if (job === undefined) throw new Error('fio JSON has no job');
  return job;
}

export function fioFailure(run: FioRun): string {
  const lines = (run.stderr + '\n' + run.stdout).split('\n').filter((line) => /error|fail|fio:/i.test(line) && !line.includes('connected to NBD'));
  return `fio exited ${run.code}: ${lines.slice(0, 3).join(' | ') || run.stderr.trim().slice(0, 300)}`;
}

/** What fio is pointed at: an NBD export (its engine and URI) or a file (io_uring, buffered like the servers). */
export interface FioTarget {
  kind: 'nbd' | 'file';
  args: string[];
  /** fio's environment, when it differs from ours (TLS: a HOME whose ~/.pki/libnbd holds the client credentials). */
  env?: NodeJS.ProcessEnv;
}

export function nbdTarget(uri: string, env?: NodeJS.ProcessEnv): FioTarget {
  return { kind: 'nbd', args: ['--ioengine=nbd', `--uri=${uri}`], ...(env === undefined ? {} : { env }) };
}

/** A file, through the page cache as every server here uses it; fio must not drop its cache itself (--invalidate=0). */
export function fileTarget(file: string): FioTarget {
  return { kind: 'file', args: ['--ioengine=io_uring', `--filename=${file}`, '--direct=0', '--invalidate=0'] };
}

/** Writes the whole target once (1 MiB, QD8) and flushes, so that rows read real data and overwrite allocated blocks. */
export async function fill(tools: Tools, target: FioTarget, sizeBytes: number): Promise<{ seconds: number; mbps: number }> {
  const args = ['--name=fill', ...target.args, `--size=${sizeBytes}`, '--rw=write', '--bs=1M', '--iodepth=8', '--end_fsync=1', '--output-format=json'];
  const started = performance.now();
  const run = await runFio(tools, args, fillTimeoutMs, null, 0, target.kind === 'nbd', target.env);
  const seconds = (performance.now() - started) / 1000;
  if (run.code !== 0) throw new Error(fioFailure(run));
  const job = parseFioJson(run.stdout);
  if (job.error !== 0) throw new Error(`fio job error ${job.error}`);
  return { seconds, mbps: (sizeBytes / seconds) / 1e6 };
}

/** `count` 4 KiB random writes with a seed, then a flush: what each snapshot of the snapshot system holds. */
export async function randomWrites(tools: Tools, target: FioTarget, sizeBytes: number, count: number, seed: number): Promise<void> {
  const args = ['--name=scatter', ...target.args, `--size=${sizeBytes}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', `--io_size=${count * 4096}`, `--randseed=${seed}`, '--end_fsync=1', '--output-format=json'];
  const run = await runFio(tools, args, fillTimeoutMs, null, 0, target.kind === 'nbd', target.env);
  if (run.code !== 0) throw new Error(fioFailure(run));
}

export interface MeasureOptions {
  runtimeSeconds: number;
  rampSeconds: number;
  sizeBytes: number;
  /** fio --fsync for rows that write: writes between flushes, or null. */
  flushEveryBytes: number | null;
}

/** The fio arguments of a row (without the target). */
export function rowArgs(spec: RowSpec, options: MeasureOptions): string[] {
  const args = [
    `--name=${spec.id}`, `--size=${options.sizeBytes}`, `--rw=${spec.rw}`, `--bs=${spec.blockSize}`, `--iodepth=${spec.iodepth}`,
    `--numjobs=${spec.connections}`, '--group_reporting', '--time_based', `--runtime=${options.runtimeSeconds}`, `--ramp_time=${options.rampSeconds}`,
    '--output-format=json',
  ];
  if (spec.readPercent !== null) args.push(`--rwmixread=${spec.readPercent}`);
  if (options.flushEveryBytes !== null && spec.rw !== 'randread' && spec.rw !== 'read') {
    const blockBytes = spec.blockSize === '4k' ? 4096 : 2 ** 20;
    args.push(`--fsync=${Math.max(1, Math.round(options.flushEveryBytes / blockBytes))}`);
  }
  return args;
}

function emptySample(spec: RowSpec, system: string, run: number, error: string): Sample {
  return {
    rowId: spec.id, system, run, iops: null, mbps: null, latencyUsP50: null, latencyUsP99: null, latencyUsP999: null, writeLatencyUsP99: null,
    ioBytes: null, serverCpuSeconds: null, serverCpuSecondsPerGB: null, clientCpuPercent: null, error,
  };
}

/** One time-based fio run of a row. A failure becomes a sample with an error, not a throw. */
export async function measure(tools: Tools, target: FioTarget, serverPid: number | null, spec: RowSpec, system: string, run: number, options: MeasureOptions): Promise<Sample> {
  const args = [...rowArgs(spec, options), ...target.args];
  const fio = await runFio(tools, args, (options.runtimeSeconds + options.rampSeconds) * 1000 + sampleSlackMs, serverPid, options.rampSeconds, target.kind === 'nbd', target.env);
  if (fio.code !== 0) return emptySample(spec, system, run, fioFailure(fio));
  let job: FioJob;
  try {
    job = parseFioJson(fio.stdout);
  } catch (error) {
    return emptySample(spec, system, run, (error as Error).message);
  }
  if (job.error !== 0) return emptySample(spec, system, run, `fio job error ${job.error}`);
  // The latency of a mixed row is its reads' (what an application waits on); its writes' p99 is kept beside.
  const primary = spec.rw === 'randwrite' || spec.rw === 'write' ? job.write : job.read;
  const percentile = (side: FioDirection, key: string): number | null => {
    const value = side.clat_ns.percentile?.[key];
    return value === undefined || value === 0 ? null : value / 1000;
  };
  const ioBytes = job.read.io_bytes + job.write.io_bytes;
  const gigabytes = ioBytes / 1e9;
  return {
    rowId: spec.id,
    system,
    run,
    iops: job.read.iops + job.write.iops,
    mbps: (job.read.bw_bytes + job.write.bw_bytes) / 1e6,
    latencyUsP50: percentile(primary, '50.000000'),
    latencyUsP99: percentile(primary, '99.000000'),
    latencyUsP999: percentile(primary, '99.900000'),
    writeLatencyUsP99: spec.rw === 'randrw' ? percentile(job.write, '99.000000') : null,
    ioBytes,
    serverCpuSeconds: fio.serverCpuSeconds,
    serverCpuSecondsPerGB: fio.serverCpuSeconds !== null && gigabytes > 0 ? fio.serverCpuSeconds / gigabytes : null,
    clientCpuPercent: job.usr_cpu + job.sys_cpu,
    error: null,
  };
}
