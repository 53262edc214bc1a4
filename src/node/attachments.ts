// Attach and detach: a volume becomes a block device (a loop device over its FUSE file, or over an nbdfuse file
// fed by our own NBD listener), gets a file system only when blkid -p recognises nothing on it and it was never
// written, or `--format` asks (planFileSystem decides; a volume holding one is never reformatted), and is mounted. Every attachment is recorded in `<pool>/attachments.json` (written
// atomically) so that `chunkd detach`, `chunkd status` and the next start of the node know about it.
//
// Life cycle: attach → (node stop: sync, unmount, detach the loop device; the record stays) → (node start: each
// recorded attachment is made again at its mountpoint; one left mounted by a crash is lazily unmounted first)
// → detach (unmount, detach the loop device, flush the volume, drop the record). A loop device cannot outlive
// the process that serves its backing file, so stopping the node cannot leave a working mount behind; it leaves
// a clean file system on the volume instead, and the restart brings the mount back.
//
// Every step that runs a program is asynchronous: the programs open our FUSE files, which this event loop serves.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { runTool as runProgram, type ToolResult } from '../core/run-tool.ts';
import { mountAt } from '../fuse/session.ts';
import { AttachmentTable, planFileSystem, type AttachmentRecord, type AttachRequest, type FsType } from './attachment-table.ts';
import type { Log } from '../core/log.ts';

export interface AttachmentHost {
  poolDirectory: string;
  log: Log;
  /** Throws ENOENT when the volume does not exist; allocatedBytes 0: never written, it reads as zeros. */
  volumeInfo(name: string): { sizeBytes: number; allocatedBytes: number };
  /** The path of a volume's FUSE file, mounting the FUSE front end first if needed. */
  fuseFile(volume: string): Promise<string>;
  /** An NBD URI of the volume on this node, for nbdfuse; null when the node has no NBD listener. */
  nbdUri(volume: string): string | null;
  /** Commits every acknowledged write of the volume (detach ends with it). */
  flushVolume(volume: string): Promise<void>;
}

export interface AttachmentStatus extends AttachmentRecord {
  state: 'attached' | 'detached' | 'failed';
  loopDevice: string | null;
  error: string | null;
}

interface Runtime {
  loopDevice: string | null;
  nbdfuse: ChildProcess | null;
  nbdfuseDir: string | null;
  state: AttachmentStatus['state'];
  error: string | null;
}

/** What #mount may do beyond mounting the file system it finds. */
interface MountOptions {
  wantedFs: FsType | null;
  format: boolean;
  reattach: boolean;
}

const toolTimeoutMs = 300_000;

/** Runs a program (core/run-tool.ts); one that could not run, or was killed, is an EIO. */
function runTool(command: string, args: string[]): Promise<ToolResult> {
  return runProgram(command, args, { timeoutMs: toolTimeoutMs, outputBytesMax: 16 * 1024 * 1024 }).catch((error: Error) => {
    throw ChunkdError.io(`${command} could not run: ${error.message}`, error);
  });
}

async function mustRun(command: string, args: string[]): Promise<string> {
  const result = await runTool(command, args);
  if (result.code !== 0) throw ChunkdError.io(`${command} ${args.join(' ')} failed (exit ${result.code}): ${(result.stderr || result.stdout).trim().split('\n').at(-1) ?? ''}`);
  return result.stdout;
}

/** Bytes read from each end of a device to show that blkid could read it: its probers look there. */
const probeRegionBytes = 1024 * 1024;

/** Reads the first and the last MiB of a block device; throws EIO when either read fails or comes back short. */
async function checkReadable(device: string, volume: string): Promise<void> {
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(device, 'r');
  } catch (error) {
    throw ChunkdError.io(`cannot open ${device} (volume ${volume}) to check blkid's answer: ${(error as NodeJS.ErrnoException).code ?? String(error)}`, error);
  }
  try {
    const sizeBytes = Number((await fs.promises.readFile(`/sys/class/block/${path.basename(device)}/size`, 'utf8')).trim()) * 512;
    const buffer = Buffer.alloc(Math.min(probeRegionBytes, sizeBytes));
    for (const positionBytes of new Set([0, sizeBytes - buffer.length])) {
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, positionBytes);
      if (bytesRead !== buffer.length) throw ChunkdError.io(`${device} (volume ${volume}) read ${bytesRead} of ${buffer.length} bytes at ${positionBytes}`);
    }
  } catch (error) {
    if (error instanceof ChunkdError) throw error;
    throw ChunkdError.io(`${device} (volume ${volume}) cannot be read, so blkid's "nothing found" means nothing: ${(error as NodeJS.ErrnoException).code ?? String(error)}`, error);
  } finally {
    await handle.close();
  }
}

/** The file a loop device reads, from sysfs; null when the device is not set up. */
function loopBackingFile(loopDevice: string): string | null {
  try {
    return fs.readFileSync(`/sys/block/${path.basename(loopDevice)}/loop/backing_file`, 'utf8').trim();
  } catch {
    return null;
  }
}

export class Attachments {
  readonly #host: AttachmentHost;
  readonly #filePath: string;
  readonly #table: AttachmentTable;
  readonly #runtime = new Map<string, Runtime>();
  /** One attach or detach at a time: they are rare, and each is a sequence of steps that must not interleave. */
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(host: AttachmentHost, table: AttachmentTable) {
    this.#host = host;
    this.#filePath = path.join(host.poolDirectory, 'attachments.json');
    this.#table = table;
  }

  /** Loads `<pool>/attachments.json` (none yet: no attachments). */
  static load(host: AttachmentHost): Attachments {
    const filePath = path.join(host.poolDirectory, 'attachments.json');
    let table = new AttachmentTable();
    if (fs.existsSync(filePath)) table = AttachmentTable.decode(fs.readFileSync(filePath, 'utf8'));
    const attachments = new Attachments(host, table);
    for (const record of table.list()) attachments.#runtime.set(record.volume, { loopDevice: null, nbdfuse: null, nbdfuseDir: null, state: 'detached', error: null });
    return attachments;
  }

  get size(): number {
    return this.#table.list().length;
  }

  get(volume: string): AttachmentRecord | undefined {
    return this.#table.get(volume);
  }

  list(): AttachmentStatus[] {
    return this.#table.list().map((record) => {
      const runtime = this.#runtime.get(record.volume);
      return { ...record, dockerIds: [...record.dockerIds], state: runtime?.state ?? 'detached', loopDevice: runtime?.loopDevice ?? null, error: runtime?.error ?? null };
    });
  }

  /** Whether a volume is attached (its file system mounted); `volume rm` and Docker Remove are refused then. */
  isAttached(volume: string): boolean {
    return this.#table.get(volume) !== undefined;
  }

  #serialise<T>(step: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(step, step);
    this.#queue = run.catch(() => {});
    return run;
  }

  /** Attaches a volume; on any failure every step already taken is undone and the error is thrown. */
  attach(request: AttachRequest, owner: AttachmentRecord['owner'] = 'cli'): Promise<AttachmentStatus> {
    return this.#serialise(async () => {
      this.#host.volumeInfo(request.volume);
      this.#table.checkAttach(request);
      const record: AttachmentRecord = { volume: request.volume, mountpoint: request.mountpoint, fsType: request.fsType ?? 'ext4', via: request.via, owner, dockerIds: [], attachedAt: new Date().toISOString() };
      const runtime = await this.#mount(record, { wantedFs: request.fsType, format: request.format, reattach: false });
      this.#table.add(record);
      this.#runtime.set(record.volume, runtime);
      try {
        await this.#save();
      } catch (error) {
        this.#table.remove(record.volume);
        this.#runtime.delete(record.volume);
        await this.#unmount(record, runtime, false).catch(() => {});
        throw error;
      }
      this.#host.log(`attached volume ${record.volume} at ${record.mountpoint} (${record.fsType} on ${runtime.loopDevice} via ${record.via})`);
      return this.list().find((status) => status.volume === record.volume)!;
    });
  }

  /** Unmounts, detaches the block device, flushes the volume and forgets the attachment; EBUSY while in use. */
  detach(volume: string): Promise<void> {
    return this.#serialise(async () => {
      const record = this.#table.get(volume);
      if (record === undefined) throw ChunkdError.notFound(`volume ${volume} is not attached`);
      const runtime = this.#runtime.get(volume) ?? { loopDevice: null, nbdfuse: null, nbdfuseDir: null, state: 'detached', error: null };
      // A record whose attach failed at start mounted nothing: whatever is at its mountpoint is not ours to take.
      if (runtime.state === 'attached') await this.#unmount(record, runtime, false);
      else await this.#stopNbdfuse(runtime);
      this.#table.remove(volume);
      this.#runtime.delete(volume);
      await this.#save();
      await this.#host.flushVolume(volume).catch((error: unknown) => {
        if (!(error instanceof ChunkdError && error.code === 'ENOENT')) throw error;
      });
      this.#host.log(`detached volume ${volume} from ${record.mountpoint}`);
    });
  }

  /** Docker Mount: attaches if needed (at `mountpoint`), then counts the caller. */
  dockerMount(volume: string, id: string, mountpoint: string): Promise<AttachmentRecord> {
    return this.#serialise(async () => {
      let record = this.#table.get(volume);
      if (record === undefined) {
        this.#host.volumeInfo(volume);
        this.#table.checkAttach({ volume, mountpoint });
        record = { volume, mountpoint, fsType: 'ext4', via: 'fuse', owner: 'docker', dockerIds: [], attachedAt: new Date().toISOString() };
        // A volume Docker created was never written and gets ext4; one that holds data without a file system is
        // refused, as `chunkd attach` without --format refuses it.
        const runtime = await this.#mount(record, { wantedFs: null, format: false, reattach: false });
        this.#table.add(record);
        this.#runtime.set(volume, runtime);
      } else if (this.#runtime.get(volume)?.state !== 'attached') {
        throw ChunkdError.busy(`volume ${volume} is recorded as attached at ${record.mountpoint} but is ${this.#runtime.get(volume)?.state ?? 'detached'}: ${this.#runtime.get(volume)?.error ?? ''}`);
      }
      this.#table.addDockerId(volume, id);
      await this.#save();
      return { ...record, dockerIds: [...record.dockerIds] };
    });
  }

  /** Docker Unmount: drops the caller; the last one detaches a volume the plugin attached. */
  dockerUnmount(volume: string, id: string): Promise<void> {
    return this.#serialise(async () => {
      const record = this.#table.get(volume);
      if (record === undefined) throw ChunkdError.notFound(`volume ${volume} is not mounted`);
      if (!record.dockerIds.includes(id)) throw ChunkdError.notFound(`volume ${volume} is not mounted for ${id}`);
      const remaining = record.dockerIds.filter((held) => held !== id);
      if (remaining.length === 0 && record.owner === 'docker') {
        const runtime = this.#runtime.get(volume)!;
        await this.#unmount(record, runtime, false);
        this.#table.remove(volume);
        this.#runtime.delete(volume);
        await this.#save();
        await this.#host.flushVolume(volume);
        this.#host.log(`detached volume ${volume}: its last container unmounted it`);
        return;
      }
      this.#table.removeDockerId(volume, id);
      await this.#save();
    });
  }

  /** At start: makes every recorded attachment again; one that fails is reported in status, the node runs on. */
  recoverAll(): Promise<void> {
    return this.#serialise(async () => {
      for (const record of this.#table.list()) {
        try {
          await this.#clearLeftovers(record);
          const runtime = await this.#mount(record, { wantedFs: null, format: false, reattach: true });
          this.#runtime.set(record.volume, runtime);
          this.#host.log(`re-attached volume ${record.volume} at ${record.mountpoint} (${runtime.loopDevice})`);
        } catch (error) {
          const message = error instanceof Error ? error.message : String(error);
          this.#runtime.set(record.volume, { loopDevice: null, nbdfuse: null, nbdfuseDir: null, state: 'failed', error: message });
          this.#host.log(`could not re-attach volume ${record.volume} at ${record.mountpoint}: ${message}`, 'error');
        }
      }
    });
  }

  /**
   * At stop: every attachment's file system is synced and unmounted (lazily when something still uses it: that
   * user's later I/O fails) and its loop device detached, so the volume holds a clean file system; records stay.
   */
  stopAll(): Promise<void> {
    return this.#serialise(async () => {
      for (const record of this.#table.list()) {
        const runtime = this.#runtime.get(record.volume);
        if (runtime === undefined || runtime.state !== 'attached') continue;
        try {
          await this.#unmount(record, runtime, true);
        } catch (error) {
          this.#host.log(`stopping attachment of ${record.volume}: ${(error as Error).message}`, 'warn');
        }
        runtime.state = 'detached';
      }
    });
  }

  async #save(): Promise<void> {
    const temporary = `${this.#filePath}.tmp`;
    const handle = await fs.promises.open(temporary, 'w', 0o600);
    try {
      await handle.writeFile(this.#table.encode());
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.promises.rename(temporary, this.#filePath);
    const directory = await fs.promises.open(this.#host.poolDirectory, 'r');
    try {
      await directory.sync();
    } finally {
      await directory.close();
    }
  }

  /** Undoes what a crash left: the old file system still mounted on a loop device whose backing file is dead. */
  async #clearLeftovers(record: AttachmentRecord): Promise<void> {
    const entry = mountAt(record.mountpoint);
    if (entry !== null) {
      const backing = entry.source.startsWith('/dev/loop') ? loopBackingFile(entry.source) : null;
      const ours = backing !== null && (backing.includes(`/${record.volume}`) || backing.includes('/.nbdfuse/'));
      if (!ours) throw ChunkdError.busy(`${record.mountpoint} holds another mount (${entry.fsType} from ${entry.source})`);
      this.#host.log(`${record.mountpoint} was left mounted by a node that died: unmounting it lazily`);
      await runTool('umount', ['-l', record.mountpoint]);
      await runTool('losetup', ['-d', entry.source]);
    }
    const nbdfuseDir = path.join(this.#host.poolDirectory, '.nbdfuse', record.volume);
    if (mountAt(nbdfuseDir) !== null) await runTool('umount', ['-l', nbdfuseDir]);
  }

  async #checkMountpoint(mountpoint: string): Promise<boolean> {
    let stats: fs.Stats;
    try {
      stats = await fs.promises.stat(mountpoint);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw ChunkdError.invalid(`mountpoint ${mountpoint}: ${(error as NodeJS.ErrnoException).code}`);
      await fs.promises.mkdir(mountpoint, { recursive: true });
      return true;
    }
    if (!stats.isDirectory()) throw ChunkdError.invalid(`mountpoint ${mountpoint} is not a directory`);
    if (mountAt(mountpoint) !== null) throw ChunkdError.busy(`mountpoint ${mountpoint} is already a mount point`);
    if ((await fs.promises.readdir(mountpoint)).length > 0) throw ChunkdError.busy(`mountpoint ${mountpoint} is not empty`);
    return false;
  }

  /** Makes the block device, the file system when planFileSystem says so, and the mount; undoes all on failure. */
  async #mount(record: AttachmentRecord, options: MountOptions): Promise<Runtime> {
    const runtime: Runtime = { loopDevice: null, nbdfuse: null, nbdfuseDir: null, state: 'detached', error: null };
    let createdMountpoint = false;
    let mounted = false;
    try {
      createdMountpoint = await this.#checkMountpoint(record.mountpoint);
      // Mount tables name real paths: a mountpoint reached through a symbolic link is recorded as where it leads.
      record.mountpoint = await fs.promises.realpath(record.mountpoint);
      const backingFile = record.via === 'fuse' ? await this.#host.fuseFile(record.volume) : await this.#startNbdfuse(record.volume, runtime);
      // Direct I/O: the loop device's requests go to the file as they come, many at once, without a second copy
      // in the page cache of the backing file.
      runtime.loopDevice = (await mustRun('losetup', ['--find', '--show', '--direct-io=on', backingFile])).trim();
      const result = await runTool('blkid', ['-p', '-o', 'export', runtime.loopDevice]);
      const probe = { exitCode: result.code, stdout: result.stdout, stderr: result.stderr };
      // blkid -p also exits 2, silently, when a read of the device fails: "nothing found" counts only if the
      // places where signatures live read without error.
      if (probe.exitCode === 2) await checkReadable(runtime.loopDevice, record.volume);
      const { allocatedBytes } = this.#host.volumeInfo(record.volume);
      const plan = planFileSystem({ volume: record.volume, device: runtime.loopDevice, probe, allocatedBytes, ...options });
      if (plan.action === 'format') {
        this.#host.log(allocatedBytes === 0 ? `volume ${record.volume} has no file system: making ${plan.fsType}` : `volume ${record.volume} holds ${allocatedBytes} bytes but no file system: making ${plan.fsType}, as --format asks`);
        // No discard at mkfs: the volume is thin, and a fresh one reads as zeros already.
        if (plan.fsType === 'ext4') await mustRun('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=1', runtime.loopDevice]);
        else await mustRun('mkfs.xfs', ['-q', '-f', '-K', runtime.loopDevice]);
      }
      record.fsType = plan.fsType;
      await mustRun('mount', ['-t', record.fsType, runtime.loopDevice, record.mountpoint]);
      mounted = true;
      runtime.state = 'attached';
      return runtime;
    } catch (error) {
      if (mounted) await runTool('umount', [record.mountpoint]);
      if (runtime.loopDevice !== null) await runTool('losetup', ['-d', runtime.loopDevice]);
      await this.#stopNbdfuse(runtime);
      if (createdMountpoint) await fs.promises.rmdir(record.mountpoint).catch(() => {});
      throw error;
    }
  }

  /** Unmounts the file system (EBUSY while in use, unless `lazyWhenBusy`), detaches the loop device, stops nbdfuse. */
  async #unmount(record: AttachmentRecord, runtime: Runtime, lazyWhenBusy: boolean): Promise<void> {
    const entry = mountAt(record.mountpoint);
    if (entry !== null && entry.source === runtime.loopDevice) {
      const result = await runTool('umount', [record.mountpoint]);
      if (result.code !== 0) {
        if (!/busy/i.test(result.stderr)) throw ChunkdError.io(`umount ${record.mountpoint} failed: ${result.stderr.trim()}`);
        if (!lazyWhenBusy) throw ChunkdError.busy(`${record.mountpoint} is in use (umount: target is busy); stop what uses it, then detach again`);
        this.#host.log(`${record.mountpoint} is in use at stop: syncing it and unmounting it lazily (its users' later I/O fails)`, 'warn');
        await runTool('sync', ['-f', record.mountpoint]);
        await runTool('umount', ['-l', record.mountpoint]);
      }
    }
    if (runtime.loopDevice !== null) {
      if (loopBackingFile(runtime.loopDevice) !== null) await mustRun('losetup', ['-d', runtime.loopDevice]);
      runtime.loopDevice = null;
    }
    await this.#stopNbdfuse(runtime);
    runtime.state = 'detached';
  }

  async #startNbdfuse(volume: string, runtime: Runtime): Promise<string> {
    const uri = this.#host.nbdUri(volume);
    if (uri === null) throw ChunkdError.invalid('--via nbdfuse needs the node to listen for NBD (--socket PATH or --listen HOST:PORT)');
    const directory = path.join(this.#host.poolDirectory, '.nbdfuse', volume);
    await fs.promises.mkdir(directory, { recursive: true });
    if (mountAt(directory) !== null) await runTool('umount', ['-l', directory]);
    const pidFile = path.join(this.#host.poolDirectory, '.nbdfuse', `${volume}.pid`);
    await fs.promises.rm(pidFile, { force: true });
    let stderr = '';
    const child = spawn('nbdfuse', ['-P', pidFile, directory, uri], { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    runtime.nbdfuse = child;
    runtime.nbdfuseDir = directory;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    // nbdfuse writes its pid file once the FUSE mount is up.
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (fs.existsSync(pidFile) && mountAt(directory) !== null) break;
      if (child.exitCode !== null || Date.now() > deadline) throw ChunkdError.io(`nbdfuse for ${volume} did not start: ${stderr.trim()}`);
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 50))]);
    }
    return path.join(directory, 'nbd');
  }

  async #stopNbdfuse(runtime: Runtime): Promise<void> {
    const child = runtime.nbdfuse;
    if (child === null) return;
    if (runtime.nbdfuseDir !== null && mountAt(runtime.nbdfuseDir) !== null) await runTool('fusermount3', ['-u', runtime.nbdfuseDir]);
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    runtime.nbdfuse = null;
  }
}
