// The systems the suite measures, each as a user would run it, on the same target directory:
//   raw                 fio on a file of the target's file system (io_uring, buffered): the physical limit
//   qemu-nbd-raw        qemu-nbd on a raw file
//   qemu-nbd-qcow2      qemu-nbd on a thin qcow2 file (64 KiB clusters, copy-on-write): the closest peer
//   qemu-nbd-qcow2-snap the same after one internal snapshot (qemu-img snapshot -c): writes copy clusters
//   nbdkit-file         nbdkit's file plugin on a raw file
//   chunkd              chunkd over NBD, a fresh volume
//   chunkd-10snap       chunkd over NBD, a volume with 10 snapshots, each holding some overwritten blocks
//   chunkd-NAME         chunkd started with extra serve arguments (--chunkd-variant NAME=ARGS), from another
//                       checkout with NAME@DIR=ARGS (an old and a new tree interleaved in one run)
//   chunkd-mounted      chunkd through the mounted path (FUSE file, loop, ext4), when chunkd has it
//   tls-qemu-nbd-raw    qemu-nbd on a raw file over TLS 1.3 (tls-creds-x509), the peer for chunkd over TLS
//   tls-chunkd          chunkd over NBD with --tls require, the same certificates (made by chunkd tls init)
// Every server listens on a unix socket in a short directory of its own, so that no one pays for TCP. Each system
// is started and filled once (1 MiB sequential writes, then a flush), then serves every row.
import fs from 'node:fs';
import path from 'node:path';
import { callApi } from '../src/cli/api-client.ts';
import { initTls } from '../src/peer/certificates.ts';
import { fileTarget, fill, nbdTarget, randomWrites, type FioTarget } from './fio.ts';
import { mustRun, onCleanup, runCommand, spawnTracked, stopChild, tail, waitForSocket, type Tools } from './processes.ts';
import type { SystemInfo, SystemKind } from './report.ts';

const MiB = 2 ** 20;
const serverStartTimeoutMs = 30_000;

export interface Workspace {
  /** On the target: pools and files. */
  dataDirectory: string;
  /** Short path under the OS temp dir: unix socket paths are limited to 108 bytes, targets may be deep. */
  socketDirectory: string;
  volumeBytes: number;
  tools: Tools;
  /** The checkout whose bin/chunkd.js is measured. */
  chunkdCheckout: string;
  log(line: string): void;
}

export interface RunningSystem {
  info: SystemInfo;
  /** The process whose CPU is charged to the system; null for the raw file system. */
  serverPid: number | null;
  target: FioTarget;
  /** Files and directories whose cached pages a cold sample drops. */
  cachePaths: string[];
  stop(): Promise<void>;
  /** Bytes fio may use, when less than the workspace's volume size (a file inside a file system). */
  sizeBytes?: number;
}

export interface SystemDefinition {
  id: string;
  title: string;
  kind: SystemKind;
  /** Tools it needs besides fio; a missing one skips the system with a line. */
  tools: string[];
  /** Starts, fills and prepares it; registers its own cleanup. */
  start(workspace: Workspace): Promise<RunningSystem>;
}

function nbdUri(socketPath: string, exportName = 'default'): string {
  return `nbd+unix:///${exportName}?socket=${socketPath}`;
}

/** Whether the export advertises NBD_FLAG_CAN_MULTI_CONN (asked with nbdinfo); null when nbdinfo is missing. */
async function advertisesMultiConn(tools: Tools, uri: string): Promise<boolean | null> {
  const nbdinfo = tools.find('nbdinfo');
  if (nbdinfo === null) return null;
  const result = await runCommand(nbdinfo, ['--json', uri], { timeoutMs: 20_000 });
  if (result.code !== 0) return null;
  return (JSON.parse(result.stdout) as { exports?: { can_multi_conn?: boolean }[] }).exports?.[0]?.can_multi_conn === true;
}

function sparseFile(file: string, sizeBytes: number): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, sizeBytes);
}

interface StartedServer {
  pid: number;
  command: string[];
  stop(): Promise<void>;
}

/** Spawns a server that listens on `socketPath` and prints no ready line; its stop is registered for cleanup. */
async function startSocketServer(label: string, command: string, args: string[], socketPath: string): Promise<StartedServer> {
  const child = spawnTracked(command, args);
  const stopNow = onCleanup(label, () => stopChild(child));
  try {
    await waitForSocket(socketPath, child, tail(child.stderr), serverStartTimeoutMs);
  } catch (error) {
    await stopNow();
    throw new Error(`${label} ${(error as Error).message}`);
  }
  return { pid: child.pid!, command: [path.basename(command), ...args], stop: stopNow };
}

function info(definition: SystemDefinition, command: string[] | null, multiConn: boolean | null, preparation: string): SystemInfo {
  return { id: definition.id, title: definition.title, kind: definition.kind, multiConn, command, skipped: null, preparation };
}

function describeFill(filled: { seconds: number; mbps: number }, bytes: number): string {
  return `filled ${bytes / MiB} MiB in ${filled.seconds.toFixed(1)} s (${filled.mbps.toFixed(0)} MB/s, 1 MiB writes, QD8, then flush)`;
}

const raw: SystemDefinition = {
  id: 'raw',
  title: 'the target\'s file system: fio on a file (io_uring, buffered)',
  kind: 'raw',
  tools: [],
  async start(workspace) {
    const file = path.join(workspace.dataDirectory, 'raw.img');
    const target = fileTarget(file);
    const filled = await fill(workspace.tools, target, workspace.volumeBytes);
    return { info: info(this, null, true, describeFill(filled, workspace.volumeBytes)), serverPid: null, target, cachePaths: [file], stop: async () => {} };
  },
};

/** Where the TLS systems' certificates are: `dir` in qemu's layout (server and client pairs), `home` for libnbd. */
interface TlsFiles {
  dir: string;
  /** A HOME whose ~/.pki/libnbd is `dir`: fio's nbd engine takes no tls-certificates in its URI. */
  home: string;
}

const tlsFilesByWorkspace = new WeakMap<Workspace, Promise<TlsFiles>>();

/** One CA and one node's set for every TLS system of a run (chunkd tls init), made at the first use. */
function tlsFiles(workspace: Workspace): Promise<TlsFiles> {
  let files = tlsFilesByWorkspace.get(workspace);
  if (files === undefined) {
    files = (async () => {
      const dir = path.join(workspace.socketDirectory, 'tls');
      await initTls({ directory: dir, nodes: ['bench'], clients: [], sans: [], days: 2, mode: 'new' });
      const home = path.join(workspace.socketDirectory, 'tls-home');
      fs.mkdirSync(path.join(home, '.pki'), { recursive: true });
      fs.symlinkSync(dir, path.join(home, '.pki', 'libnbd'));
      return { dir, home };
    })();
    tlsFilesByWorkspace.set(workspace, files);
  }
  return files;
}

/** The TLS spelling of an export on a unix socket: fio's target (credentials found through HOME), and nbdinfo's URI. */
function tlsTarget(socketPath: string, files: TlsFiles): { target: FioTarget; nbdinfoUri: string } {
  const uri = `nbds+unix:///default?socket=${socketPath}`;
  return { target: nbdTarget(uri, { ...process.env, HOME: files.home }), nbdinfoUri: `${uri}&tls-certificates=${files.dir}` };
}

/** qemu-nbd as a user would start it: a named export, persistent, up to 4 clients (-e 4: it then advertises multi-conn), its defaults spelled out. */
function qemuNbdArgs(format: 'raw' | 'qcow2', socketPath: string, file: string): string[] {
  return ['-f', format, '-k', socketPath, '-x', 'default', '-t', '-e', '4', '--cache=writeback', '--aio=threads', file];
}

function qemuNbd(id: string, format: 'raw' | 'qcow2', snapshot: boolean, title: string): SystemDefinition {
  return {
    id,
    title,
    kind: 'peer',
    tools: format === 'qcow2' ? ['qemu-nbd', 'qemu-img'] : ['qemu-nbd'],
    async start(workspace) {
      const { tools } = workspace;
      const file = path.join(workspace.dataDirectory, `${id}.${format}`);
      if (format === 'raw') sparseFile(file, workspace.volumeBytes);
      // Thin: no preallocation, default 64 KiB clusters, as `qemu-img create` makes it.
      else await mustRun(tools.get('qemu-img'), ['create', '-q', '-f', 'qcow2', file, String(workspace.volumeBytes)]);
      const socketPath = path.join(workspace.socketDirectory, `${id}.sock`);
      const args = qemuNbdArgs(format, socketPath, file);
      let server = await startSocketServer(id, tools.get('qemu-nbd'), args, socketPath);
      const uri = nbdUri(socketPath);
      const filled = await fill(tools, nbdTarget(uri), workspace.volumeBytes);
      let preparation = describeFill(filled, workspace.volumeBytes);
      if (snapshot) {
        // An internal snapshot (refcounted clusters in the same file, as chunkd's snapshots share chunks) needs the image closed.
        await server.stop();
        await mustRun(tools.get('qemu-img'), ['snapshot', '-c', 'snap1', file]);
        server = await startSocketServer(id, tools.get('qemu-nbd'), args, socketPath);
        preparation += '; then one internal snapshot (qemu-img snapshot -c snap1)';
      }
      const multiConn = await advertisesMultiConn(tools, uri);
      return { info: info(this, server.command, multiConn, preparation), serverPid: server.pid, target: nbdTarget(uri), cachePaths: [file], stop: server.stop };
    },
  };
}

/**
 * qemu-nbd on a raw file over TLS (tls-creds-x509, endpoint=server). verify-peer=off, as tls-chunkd runs without
 * --tls-verify-peer: both authenticate the server only (libnbd does not present a client certificate it finds
 * through HOME, the only way fio's nbd engine gets credentials).
 */
const tlsQemuNbdRaw: SystemDefinition = {
  id: 'tls-qemu-nbd-raw',
  title: 'qemu-nbd on a raw file, over TLS 1.3 (tls-creds-x509)',
  kind: 'peer',
  tools: ['qemu-nbd', 'nbdinfo'],
  async start(workspace) {
    const { tools } = workspace;
    const files = await tlsFiles(workspace);
    const file = path.join(workspace.dataDirectory, 'tls-qemu-nbd.raw');
    sparseFile(file, workspace.volumeBytes);
    const socketPath = path.join(workspace.socketDirectory, 'tls-qemu-nbd.sock');
    const args = ['--object', `tls-creds-x509,id=tls0,dir=${files.dir},endpoint=server,verify-peer=off`, '--tls-creds', 'tls0', ...qemuNbdArgs('raw', socketPath, file)];
    const server = await startSocketServer(this.id, tools.get('qemu-nbd'), args, socketPath);
    const { target, nbdinfoUri } = tlsTarget(socketPath, files);
    const filled = await fill(tools, target, workspace.volumeBytes);
    const multiConn = await advertisesMultiConn(tools, nbdinfoUri);
    return { info: info(this, server.command, multiConn, describeFill(filled, workspace.volumeBytes)), serverPid: server.pid, target, cachePaths: [file], stop: server.stop };
  },
};

const nbdkitFile: SystemDefinition = {
  id: 'nbdkit-file',
  title: 'nbdkit\'s file plugin on a raw file',
  kind: 'peer',
  tools: ['nbdkit'],
  async start(workspace) {
    const { tools } = workspace;
    const file = path.join(workspace.dataDirectory, 'nbdkit.raw');
    sparseFile(file, workspace.volumeBytes);
    const socketPath = path.join(workspace.socketDirectory, 'nbdkit.sock');
    // Its defaults: 16 threads per connection, the page cache in writeback mode.
    const args = ['--foreground', '--exit-with-parent', '--unix', socketPath, 'file', file];
    const server = await startSocketServer('nbdkit', tools.get('nbdkit'), args, socketPath);
    const uri = nbdUri(socketPath);
    const filled = await fill(tools, nbdTarget(uri), workspace.volumeBytes);
    const multiConn = await advertisesMultiConn(tools, uri);
    return { info: info(this, server.command, multiConn, describeFill(filled, workspace.volumeBytes)), serverPid: server.pid, target: nbdTarget(uri), cachePaths: [file], stop: server.stop };
  },
};

interface ChunkdNode {
  pid: number;
  command: string[];
  nbdSocket: string;
  apiSocket: string;
  pool: string;
  stop(): Promise<void>;
}

/** Starts `chunkd serve` on a fresh pool with one volume "default" and waits for its "chunkd ready" line. */
export async function startChunkd(workspace: Workspace, id: string, extraArgs: readonly string[], checkout = workspace.chunkdCheckout): Promise<ChunkdNode> {
  const pool = path.join(workspace.dataDirectory, `${id}-pool`);
  const nbdSocket = path.join(workspace.socketDirectory, `${id}.sock`);
  const apiSocket = path.join(workspace.socketDirectory, `${id}-api.sock`);
  const args = [
    path.join(checkout, 'bin', 'chunkd.js'), 'serve',
    '--pool', pool, '--listen', 'none', '--socket', nbdSocket, '--api', apiSocket,
    '--default-volume', `default:${workspace.volumeBytes / MiB}MiB`, ...extraArgs,
  ];
  // process.execPath is the Node 24 this suite runs on.
  const child = spawnTracked(process.execPath, args);
  const stopNow = onCleanup(id, () => stopChild(child));
  const stderr = tail(child.stderr);
  try {
    await new Promise<void>((resolve, reject) => {
      let stdout = '';
      const timer = setTimeout(() => reject(new Error(`was not ready in ${serverStartTimeoutMs / 1000} s: ${stderr()}`)), serverStartTimeoutMs);
      child.stdout!.on('data', (chunk: Buffer) => {
        stdout += chunk.toString();
        if (stdout.includes('chunkd ready')) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`exited (${code ?? signal}) before it was ready: ${stderr().trim().split('\n').slice(-3).join(' | ')}`));
      });
    });
  } catch (error) {
    await stopNow();
    throw new Error(`chunkd serve ${extraArgs.join(' ')}: ${(error as Error).message}`.replace('  ', ' '));
  }
  return { pid: child.pid!, command: ['node', ...args], nbdSocket, apiSocket, pool, stop: stopNow };
}

function chunkd(id: string, title: string, extraArgs: readonly string[], snapshotCount: number, checkout?: string): SystemDefinition {
  return {
    id,
    title,
    kind: 'chunkd',
    tools: [],
    async start(workspace) {
      const { tools } = workspace;
      const node = await startChunkd(workspace, id, extraArgs, checkout);
      const uri = nbdUri(node.nbdSocket);
      const target = nbdTarget(uri);
      const filled = await fill(tools, target, workspace.volumeBytes);
      let preparation = describeFill(filled, workspace.volumeBytes);
      if (snapshotCount > 0) {
        // Each snapshot holds the volume as it was, and 256 random 4 KiB blocks are overwritten after it, so that
        // the snapshots differ from each other and from the volume (as in bench/snapshots.ts).
        for (let index = 1; index <= snapshotCount; index++) {
          await callApi(node.apiSocket, 'POST', '/v1/volumes/default/snapshots', { name: `s${index}` });
          await randomWrites(tools, target, workspace.volumeBytes, 256, index);
        }
        preparation += `; then ${snapshotCount} snapshots, each followed by 256 random 4 KiB writes`;
      }
      const multiConn = await advertisesMultiConn(tools, uri);
      return { info: info(this, node.command, multiConn, preparation), serverPid: node.pid, target, cachePaths: [node.pool], stop: node.stop };
    },
  };
}

/** chunkd over TLS: serve --tls require with the same certificates as tls-qemu-nbd-raw. */
const tlsChunkd: SystemDefinition = {
  id: 'tls-chunkd',
  title: 'chunkd over NBD over TLS 1.3 (--tls require), a fresh volume',
  kind: 'chunkd',
  tools: ['nbdinfo'],
  async start(workspace) {
    const files = await tlsFiles(workspace);
    const node = await startChunkd(workspace, this.id, ['--tls', 'require', '--tls-dir', files.dir]);
    const { target, nbdinfoUri } = tlsTarget(node.nbdSocket, files);
    const filled = await fill(workspace.tools, target, workspace.volumeBytes);
    const multiConn = await advertisesMultiConn(workspace.tools, nbdinfoUri);
    return { info: info(this, node.command, multiConn, describeFill(filled, workspace.volumeBytes)), serverPid: node.pid, target, cachePaths: [node.pool], stop: node.stop };
  },
};

/** What the suite uses of bench/mounted.ts (written with the FUSE front end; the suite never edits it). */
interface MountedModule {
  startBenchNode(directory: string): Promise<{ pool: string; pid: number; stop(): Promise<void> }>;
  setupMountedVolume(node: unknown, options: { volume: string; sizeBytes: number; via: 'fuse'; mountpoint: string }): Promise<{ directory: string; cleanup(): Promise<void> }>;
}

export type MountedLoader = () => Promise<{ module: unknown } | { missing: string }>;

/**
 * chunkd through the mounted path: a node with its FUSE front end, the volume's FUSE file on a loop device with
 * ext4 on it (bench/mounted.ts does this through the node's own attach), and fio on a file in that ext4. fio uses
 * O_DIRECT here, unlike on the other systems: otherwise the ext4 page cache above the loop device would answer and
 * chunkd would not be measured at all. Below, chunkd uses the page cache of its pool as on the NBD systems.
 */
function chunkdMounted(loadMounted: MountedLoader): SystemDefinition {
  return {
    id: 'chunkd-mounted',
    title: 'chunkd through the mounted path: its FUSE file, a loop device, ext4; fio with O_DIRECT on a file in it',
    kind: 'chunkd',
    tools: ['losetup', 'mkfs.ext4', 'mount', 'umount'],
    async start(workspace) {
      const loaded = await loadMounted();
      if ('missing' in loaded) throw new Error(loaded.missing);
      const mounted = loaded.module as Partial<MountedModule>;
      if (typeof mounted.startBenchNode !== 'function' || typeof mounted.setupMountedVolume !== 'function') {
        throw new Error('bench/mounted.ts does not export startBenchNode and setupMountedVolume');
      }
      const directory = path.join(workspace.dataDirectory, 'chunkd-mounted');
      const node = await mounted.startBenchNode(directory);
      onCleanup('chunkd-mounted node', async () => {
        // The node unmounts what it attached on SIGTERM; a node that hangs is killed after the grace period.
        const timer = setTimeout(() => {
          try {
            process.kill(node.pid, 'SIGKILL');
          } catch {
            // already gone
          }
        }, 20_000);
        await node.stop();
        clearTimeout(timer);
      });
      const mountpoint = path.join(workspace.dataDirectory, 'chunkd-mounted-mnt');
      fs.mkdirSync(mountpoint);
      const volume = await mounted.setupMountedVolume(node, { volume: 'bench', sizeBytes: workspace.volumeBytes, via: 'fuse', mountpoint });
      onCleanup('chunkd-mounted volume', () => volume.cleanup());
      const file = path.join(volume.directory, 'bench.dat');
      const target: FioTarget = { kind: 'file', args: ['--ioengine=io_uring', `--filename=${file}`, '--direct=1'] };
      // The file takes most of the volume: ext4 needs some of it for itself.
      const fileBytes = Math.floor((workspace.volumeBytes * 0.85) / MiB) * MiB;
      const filled = await fill(workspace.tools, target, fileBytes);
      const command = ['node', 'bin/chunkd.js', 'serve', '--pool', node.pool, '--fuse', path.join(directory, 'fuse'), '...', '+ chunkd attach bench --via fuse --fs ext4'];
      return {
        info: info(this, command, true, `${describeFill(filled, fileBytes)} into ${file} (O_DIRECT)`),
        serverPid: node.pid,
        target,
        cachePaths: [node.pool],
        stop: async () => {},
        sizeBytes: fileBytes,
      };
    },
  };
}

export interface VariantSpec {
  name: string;
  args: string[];
  /** Another checkout whose bin/chunkd.js runs it (NAME@DIR), so that two trees are interleaved in one run. */
  checkout?: string;
}

/** Parses --chunkd-variant NAME[@DIR]=ARGS (ARGS split on white space; DIR made absolute). */
export function parseVariant(text: string): VariantSpec {
  const at = text.indexOf('=');
  const head = at < 0 ? text : text.slice(0, at);
  const checkoutAt = head.indexOf('@');
  const name = checkoutAt < 0 ? head : head.slice(0, checkoutAt);
  if (!/^[A-Za-z0-9_.]{1,32}$/.test(name)) throw new Error(`--chunkd-variant: "${name}" is not a name (letters, digits, _ and ., up to 32)`);
  const args = at < 0 ? [] : text.slice(at + 1).trim().split(/\s+/).filter((arg) => arg !== '');
  if (checkoutAt < 0) return { name, args };
  const checkout = head.slice(checkoutAt + 1);
  if (checkout === '') throw new Error(`--chunkd-variant: "${head}" names no checkout after @`);
  return { name, args, checkout: path.resolve(checkout) };
}

/** Every system in report order: raw, the peers, chunkd and its variants. */
export function systemDefinitions(variants: readonly VariantSpec[], loadMounted: MountedLoader): SystemDefinition[] {
  return [
    raw,
    qemuNbd('qemu-nbd-raw', 'raw', false, 'qemu-nbd on a raw file'),
    qemuNbd('qemu-nbd-qcow2', 'qcow2', false, 'qemu-nbd on a thin qcow2 file (64 KiB clusters)'),
    qemuNbd('qemu-nbd-qcow2-snap', 'qcow2', true, 'qemu-nbd on a qcow2 file after one internal snapshot'),
    nbdkitFile,
    chunkd('chunkd', 'chunkd over NBD, a fresh volume', [], 0),
    chunkd('chunkd-10snap', 'chunkd over NBD, a volume with 10 snapshots', [], 10),
    ...variants.map((variant) => {
      const from = variant.checkout === undefined ? '' : ` (the checkout ${variant.checkout})`;
      return chunkd(`chunkd-${variant.name}`, `chunkd over NBD, a fresh volume, serve ${variant.args.join(' ')}${from}`, variant.args, 0, variant.checkout);
    }),
    chunkdMounted(loadMounted),
    tlsQemuNbdRaw,
    tlsChunkd,
  ];
}
