// Starts a real `chunkd serve` process for integration tests and tools to drive it with real clients. It lives
// in src/testing rather than test/ because the benchmarks use it too (bench/snapshots.ts), and bench/ must not
// import test/; test/helpers/node-process.ts re-exports it for the tests.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { runTool, type ToolOptions, type ToolResult } from '../core/run-tool.ts';
import { testMetadata } from './test-metadata.ts';

export { runTool, type ToolResult };

export const repoRoot = path.resolve(import.meta.dirname, '..', '..');
export const nodeBinary = process.execPath;
export const chunkdBin = path.join(repoRoot, 'bin', 'chunkd.js');

export interface RunningNode {
  process: ChildProcess;
  pool: string;
  nbdSocket: string;
  apiSocket: string;
  tcpPort: number;
  /** The "chunkd ready: ..." line the node printed (it names the peer port, when there is one). */
  readyLine: string;
  /** NBD URI of an export over the unix socket, as libnbd and qemu take it. */
  uri(exportName?: string): string;
  /** qemu's spelling of the same export (for qemu-io/qemu-img "nbd:unix:...:exportname=..."). */
  qemuUri(exportName?: string): string;
  /** Runs the chunkd CLI against this node. */
  cli(...args: string[]): Promise<ToolResult>;
  /** SIGTERM and wait for exit; returns the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait for exit. */
  kill(): Promise<void>;
  stderr(): string;
}

export function makeTempDir(label: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `chunkd-${label}-`));
}

/** How a test runs chunkd: by default this checkout's bin/chunkd.js under this Node.js. */
export interface Launcher {
  command: string;
  /** The arguments before chunkd's own. */
  prefix: string[];
  env?: NodeJS.ProcessEnv;
}

const checkoutLauncher: Launcher = { command: nodeBinary, prefix: [chunkdBin] };

/**
 * Starts a node on `pool` (TCP on a free port, NBD and API unix sockets inside the pool) and waits until ready
 * (20 s unless `readyTimeoutMs`: a pool with much metadata takes longer, bench/scale.ts measures how much).
 * `launcher`: how chunkd is run (another install of it: test/e2e/install.test.ts).
 */
export async function startNode(pool: string, extraArgs: string[] = [], options: { readyTimeoutMs?: number; launcher?: Launcher } = {}): Promise<RunningNode> {
  const readyTimeoutMs = options.readyTimeoutMs ?? 20_000;
  const launcher = options.launcher ?? checkoutLauncher;
  const nbdSocket = path.join(pool, 'nbd.sock');
  const apiSocket = path.join(pool, 'api.sock');
  // CHUNKD_TEST_WORKERS / CHUNKD_TEST_NBD_THREADS run tests against other thread layouts. npm test's test:layouts
  // runs the files whose work depends on the layout: with --workers 0 (chunk I/O and checksums on the main thread,
  // not in worker threads as by default) the clients, bad input, CLI, snapshot, integrity, crash, full-disk and
  // mount files; with --workers 1 --nbd-threads 2 only those that connect over TCP, which the NBD threads serve
  // (clients, and crash's FLUSH on another connection). The others connect over the unix socket, which the main
  // thread serves whatever --nbd-threads says, so for them that pass changes only the count of chunk I/O workers
  // (1 instead of the default, the same code as the main run).
  const layout = [
    ...(process.env.CHUNKD_TEST_WORKERS !== undefined && !extraArgs.includes('--workers') ? ['--workers', process.env.CHUNKD_TEST_WORKERS] : []),
    ...(process.env.CHUNKD_TEST_NBD_THREADS !== undefined && !extraArgs.includes('--nbd-threads') ? ['--nbd-threads', process.env.CHUNKD_TEST_NBD_THREADS] : []),
    // CHUNKD_TEST_METADATA=paged: pools made by the tests' nodes get paged metadata (test-metadata.ts).
    ...(testMetadata() !== undefined && !extraArgs.includes('--metadata') ? ['--metadata', testMetadata()!, '--metadata-cache', '4MiB'] : []),
  ];
  const child = spawn(launcher.command, [...launcher.prefix, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--socket', nbdSocket, '--api', apiSocket, ...layout, ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: launcher.env ?? process.env,
  });
  let stdout = '';
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const tcpPort = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`chunkd did not start in ${readyTimeoutMs / 1000} s: ${stderr}`)), readyTimeoutMs);
    child.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      const match = /chunkd ready: .*nbd .*?127\.0\.0\.1:(\d+).*\n/.exec(stdout);
      if (match) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`chunkd exited with ${code} before it was ready: ${stderr}`));
    });
  });
  return {
    process: child,
    pool,
    nbdSocket,
    apiSocket,
    tcpPort,
    readyLine: stdout.split('\n')[0]!,
    uri: (exportName = 'default') => `nbd+unix:///${exportName}?socket=${nbdSocket}`,
    qemuUri: (exportName = 'default') => `nbd:unix:${nbdSocket}:exportname=${exportName}`,
    cli: (...args) => runTool(launcher.command, [...launcher.prefix, ...args], { env: { ...(launcher.env ?? process.env), CHUNKD_API: apiSocket } }),
    stop: async () => {
      child.kill('SIGTERM');
      return exited;
    },
    kill: async () => {
      child.kill('SIGKILL');
      await exited;
    },
    stderr: () => stderr,
  };
}

/** Runs a program and fails with its output unless it exits 0. */
export async function mustRun(command: string, args: string[], options: ToolOptions = {}): Promise<string> {
  const result = await runTool(command, args, options);
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${result.code}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`);
  return result.stdout;
}

/** Whether a program is on PATH (integration tests need the real clients; .ci/run installs them). */
export function haveTool(name: string): boolean {
  return (process.env.PATH ?? '').split(':').some((dir) => fs.existsSync(path.join(dir, name)));
}

/** A TCP port on 127.0.0.1 that nothing listens on now (for a node that must keep its port across restarts). */
/**
 * A free port for a listener that is restarted on the same port (a node's peer port, an etcd member's ports): taken
 * below the kernel's ephemeral range, so that while it is down no port-0 listener (a node's NBD --listen
 * 127.0.0.1:0) and no outgoing connection can be given it. freePort's ports come from that range, and one of them
 * reused after a restart collided with a new NBD listener (EADDRINUSE, cluster-move.test.ts).
 */
export async function stablePort(): Promise<number> {
  let ephemeralLow = 32_768;
  try {
    ephemeralLow = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || ephemeralLow;
  } catch {}
  const low = 10_000;
  const high = Math.max(low + 1000, Math.min(ephemeralLow, 32_768));
  for (let attempt = 0; attempt < 200; attempt += 1) {
    const port = low + Math.floor(Math.random() * (high - low));
    const free = await new Promise<boolean>((resolve) => {
      const server = net.createServer();
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error(`no free port found between ${low} and ${high}`);
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}
