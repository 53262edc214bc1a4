// Processes, tools and cleanup for the benchmark suite. Everything the suite makes (a server, a FUSE mount, a loop
// device, a mount, a temporary directory) registers its undo on one stack as soon as it exists; cleanup runs the
// stack last-in first-out (servers stop before the file system under them is unmounted), on success, on error and
// on SIGINT/SIGTERM. Children are also tracked one by one, so that an interrupt stops a running fio too.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { runTool, type ToolFailure, type ToolResult } from '../src/core/run-tool.ts';

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

const serverStopGraceMs = 15_000;

interface Undo {
  label: string;
  run(): Promise<void> | void;
}

const undoStack: Undo[] = [];
const liveChildren = new Set<ChildProcess>();
let stopping = false;

export function isStopping(): boolean {
  return stopping;
}

/** Registers the undo of something just made; cleanup() runs it, newest first. Returns a function that runs it now (and unregisters it). */
export function onCleanup(label: string, run: () => Promise<void> | void): () => Promise<void> {
  const undo: Undo = { label, run };
  undoStack.push(undo);
  return async () => {
    const index = undoStack.indexOf(undo);
    if (index < 0) return;
    undoStack.splice(index, 1);
    await undo.run();
  };
}

/** Stops every child and undoes everything made, newest first; a failing undo is reported and the rest still run. */
export async function cleanup(): Promise<void> {
  stopping = true;
  while (undoStack.length > 0) {
    const undo = undoStack.pop()!;
    try {
      await undo.run();
    } catch (error) {
      process.stderr.write(`bench: cleanup of ${undo.label} failed: ${(error as Error).message}\n`);
    }
  }
  await Promise.all([...liveChildren].map((child) => stopChild(child)));
}

/** Installs SIGINT/SIGTERM handlers that clean up and exit 130. */
export function cleanupOnSignals(): void {
  const handler = (signal: NodeJS.Signals): void => {
    if (stopping) return;
    process.stderr.write(`\nbench: ${signal}, stopping servers, unmounting and removing temporary files\n`);
    void cleanup().finally(() => process.exit(130));
  };
  process.once('SIGINT', handler);
  process.once('SIGTERM', handler);
}

/** Tools by name, with --tool NAME=PATH overrides; a tool is missing when neither the override nor PATH has it. */
export class Tools {
  readonly overrides: Map<string, string>;
  constructor(overrides: Map<string, string>) {
    this.overrides = overrides;
  }

  /** The path to run, or null when the tool is missing. */
  find(name: string): string | null {
    const override = this.overrides.get(name);
    if (override !== undefined) return fs.existsSync(override) ? override : null;
    for (const directory of (process.env.PATH ?? '').split(':')) {
      if (directory === '') continue;
      const candidate = path.join(directory, name);
      if (fs.existsSync(candidate)) return candidate;
    }
    return null;
  }

  /** The path of a tool that must be there. */
  get(name: string): string {
    const found = this.find(name);
    if (found === null) throw new Error(`${name} not found${this.overrides.has(name) ? ` at ${this.overrides.get(name)}` : ' on PATH'}`);
    return found;
  }
}

/** Spawns a child that cleanup() will stop; refuses once we are stopping, so an interrupt starts nothing new. */
export function spawnTracked(command: string, args: string[], options: { env?: NodeJS.ProcessEnv } = {}): ChildProcess {
  if (stopping) throw new Error('interrupted');
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env });
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
  // A failed spawn emits 'error'; without a listener it would be thrown.
  child.once('error', () => liveChildren.delete(child));
  return child;
}

export function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

export function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
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
export async function stopChild(child: ChildProcess, graceMs = serverStopGraceMs): Promise<void> {
  if (hasExited(child) || child.pid === undefined) return;
  child.kill('SIGTERM');
  if (await waitForExit(child, graceMs)) return;
  child.kill('SIGKILL');
  await waitForExit(child, 5_000);
}

/** Keeps the last bytes of a stream, for an error message when a child dies. */
export function tail(stream: NodeJS.ReadableStream | null, limitBytes = 8192): () => string {
  let text = '';
  stream?.on('data', (chunk: Buffer) => {
    text = (text + chunk.toString()).slice(-limitBytes);
  });
  return () => text;
}

/**
 * Runs a program to completion (src/core/run-tool.ts) and never throws: a missing program is code 127, one that
 * was killed (a timeout) code 1, with the reason as its stderr when it wrote none.
 */
export function runCommand(command: string, args: string[], options: { timeoutMs?: number; cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<ToolResult> {
  return runTool(command, args, options).catch((error: ToolFailure) => ({ code: error.code === 'ENOENT' ? 127 : 1, stdout: error.stdout, stderr: error.stderr || error.message }));
}

/** Runs a program and throws with its output unless it exits 0; returns stdout. */
export async function mustRun(command: string, args: string[], options: { timeoutMs?: number; cwd?: string } = {}): Promise<string> {
  const result = await runCommand(command, args, options);
  if (result.code !== 0) throw new Error(`${path.basename(command)} ${args.join(' ')} exited ${result.code}: ${(result.stderr || result.stdout).trim().slice(0, 400)}`);
  return result.stdout;
}

/** The trimmed stdout of a command, or null if it fails. */
export async function commandOutput(command: string, args: string[], cwd?: string): Promise<string | null> {
  const result = await runCommand(command, args, { cwd, timeoutMs: 20_000 });
  return result.code === 0 ? result.stdout.trim() : null;
}

/** Resolves once something accepts connections on the unix socket (qemu-nbd and nbdkit print no ready line). */
export async function waitForSocket(socketPath: string, child: ChildProcess, stderr: () => string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (hasExited(child)) throw new Error(`exited (${child.exitCode ?? child.signalCode}) before it was ready: ${stderr().trim().slice(0, 400)}`);
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
  throw new Error(`not ready in ${timeoutMs / 1000} s: ${stderr().trim().slice(0, 400)}`);
}

/** The machine's CPU time so far, all CPUs together, in clock ticks (/proc/stat's `cpu` line). */
export interface MachineCpuTicks {
  /** Every state's ticks (user, nice, system, idle, iowait, irq, softirq, steal). */
  total: number;
  /** Idle and iowait. */
  idle: number;
  /** Time the hypervisor ran something else while a virtual CPU had work (0 on bare metal). */
  steal: number;
}

/** Parses /proc/stat's first line ("cpu  user nice system idle iowait irq softirq steal guest guest_nice"). */
export function parseMachineCpuTicks(text: string): MachineCpuTicks | null {
  const match = /^cpu +(\d+(?: +\d+){7,})/m.exec(text);
  if (match === null) return null;
  // guest and guest_nice are already counted in user and nice.
  const [user, nice, system, idle, iowait, irq, softirq, steal] = match[1]!.split(/ +/).slice(0, 8).map(Number) as [number, number, number, number, number, number, number, number];
  return { total: user + nice + system + idle + iowait + irq + softirq + steal, idle: idle + iowait, steal };
}

/** The machine's CPU time so far; null where there is no /proc/stat. */
export function machineCpuTicks(): MachineCpuTicks | null {
  try {
    return parseMachineCpuTicks(fs.readFileSync('/proc/stat', 'latin1'));
  } catch {
    return null;
  }
}

/** How the machine's CPU time went between two readings, in percent of it: stolen by the hypervisor, idle. */
export function machineCpuShares(before: MachineCpuTicks | null, after: MachineCpuTicks | null): { stealPercent: number; idlePercent: number } | null {
  if (before === null || after === null || after.total <= before.total) return null;
  const total = after.total - before.total;
  return { stealPercent: ((after.steal - before.steal) / total) * 100, idlePercent: ((after.idle - before.idle) / total) * 100 };
}

let clockTicksPerSecond = 100;

export function setClockTicks(ticks: number): void {
  if (ticks > 0) clockTicksPerSecond = ticks;
}

/** User + system CPU seconds of a process and all its threads so far; null once it has gone. */
export function processCpuSeconds(pid: number): number | null {
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
