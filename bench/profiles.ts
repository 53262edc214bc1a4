// Target profiles: what the disk under the benchmark behaves like, and how the page cache is handled.
//
// Design note. `local` measures the target as it is. A cloud profile builds a target that behaves like a cloud
// block volume, from real parts, and is an emulation, not the real thing:
//
//   sparse file on the real target ── nbdkit file plugin, filters: rate (bandwidth), delay (latency)
//        └─ served to nbdfuse (one connection, or several) ── FUSE file ── loop device (direct I/O) ── ext4 ── mount = target
//
// nbdkit 1.32 has no IOPS filter, so the IOPS cap comes from Little's law: every request sleeps `latencyMs` in the
// delay filter while it holds one of the volume's request slots, which caps the rate near slots / (latency +
// service time). The slots are nbdkit's threads with one nbdfuse connection (nbdkit then runs as nbdfuse's own
// subprocess), or nbdfuse's connections with one thread each (nbdkit on a unix socket, multi-conn): one nbdfuse
// connection keeps about one request in flight however many threads nbdkit has (measured here), so a profile that
// needs more than ~3 requests in flight uses connections. The FUSE and loop path adds service time of its own on
// a small machine, so a profile gets about twice IOPS x latency slots, and the raw-file-system row of each run
// reports what the emulated volume really reached. The rate filter's
// bucket is kept small (burstiness 0.5 s; its default 2 s would let the first seconds of every sample run at
// memory speed). Requests larger than a cloud volume's I/O unit count once against the slots, unlike EBS, which
// counts 256 KiB units; at these caps the 1 MiB rows are bound by bandwidth either way.
//
// The page cache: on `local` the exports are filled just before the rows and stay in memory (the rows measure
// each system's request path, as on any machine whose working set fits in memory). On a cloud profile every
// sample starts cold (the target is synced and the cached pages of the system's files dropped with
// posix_fadvise(DONTNEED), no global drop_caches), and the write rows flush every few MiB, so that buffered
// servers cannot hide the volume behind memory; on a real cloud volume pass the same --cache cold and
// --flush-every-mib with --profile local.
import fs from 'node:fs';
import path from 'node:path';
import koffi from 'koffi';
import { mustRun, onCleanup, runCommand, sleep, spawnTracked, stopChild, tail, waitForSocket, type Tools } from './processes.ts';

export interface Emulation {
  /** The volume's documented baseline, for the report. */
  iops: number;
  bandwidthMiBps: number;
  latencyMs: number;
  /** nbdkit request slots per connection (see the design note). */
  threads: number;
  /** nbdfuse connections: 1 runs nbdkit as nbdfuse's subprocess; more serve it on a unix socket (multi-conn). */
  connections: number;
}

export interface Profile {
  name: string;
  title: string;
  /** Where the figures come from. */
  source: string;
  emulation: Emulation | null;
  cache: 'warm' | 'cold';
  /** Bytes written between flushes in write rows (fio --fsync in writes of the row's block size); null: none. */
  flushEveryBytes: number | null;
}

const MiB = 2 ** 20;

export const profiles: Record<string, Profile> = {
  local: {
    name: 'local',
    title: 'the target as it is (a local SSD, or a real cloud volume\'s mount)',
    source: 'none: the target itself',
    emulation: null,
    cache: 'warm',
    flushEveryBytes: null,
  },
  'ebs-gp3': {
    name: 'ebs-gp3',
    title: 'AWS EBS gp3 at its baseline, emulated: 3,000 IOPS, 125 MiB/s, ~1 ms',
    source:
      'AWS EBS User Guide, "General Purpose SSD volumes" (https://docs.aws.amazon.com/ebs/latest/userguide/general-purpose.html): gp3 baseline 3,000 IOPS and 125 MiB/s at any size, "single-digit millisecond" latency; ~1 ms is the usual figure for 4 KiB at low queue depth',
    emulation: { iops: 3000, bandwidthMiBps: 125, latencyMs: 1, threads: 6, connections: 1 },
    cache: 'cold',
    flushEveryBytes: 4 * MiB,
  },
  'pd-balanced': {
    name: 'pd-balanced',
    title: 'GCP pd-balanced at its baseline, emulated: 3,000 IOPS, 140 MiB/s, ~2 ms',
    source:
      'Google Cloud, "About Persistent Disk performance" (https://cloud.google.com/compute/docs/disks/performance): pd-balanced gives a baseline of 3,000 IOPS and 140 MiB/s per disk plus 6 IOPS and 0.28 MiB/s per GiB; it is "designed for sub-millisecond latencies", observed 1-2 ms for 4 KiB from a VM: we take 2 ms, the flatter end',
    emulation: { iops: 3000, bandwidthMiBps: 140, latencyMs: 2, threads: 1, connections: 8 },
    cache: 'cold',
    flushEveryBytes: 4 * MiB,
  },
};

export function profileByName(name: string): Profile {
  const profile = profiles[name];
  if (profile === undefined) throw new Error(`--profile: no profile "${name}" (profiles: ${Object.keys(profiles).join(', ')})`);
  return profile;
}

/** The tools a profile needs to build its target. */
export function profileTools(profile: Profile): string[] {
  return profile.emulation === null ? [] : ['nbdkit', 'nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'mount', 'umount'];
}

/** The nbdkit command line that emulates the volume (listening on `socketPath`, or socket-activated by nbdfuse when null). */
export function emulationCommand(emulation: Emulation, backingFile: string, socketPath: string | null): string[] {
  const bitsPerSecond = emulation.bandwidthMiBps * MiB * 8;
  return [
    'nbdkit', '--exit-with-parent', ...(socketPath === null ? [] : ['--foreground', '--unix', socketPath]), '--threads', String(emulation.threads), '--filter=rate', '--filter=delay',
    'file', backingFile, `delay-read=${emulation.latencyMs}ms`, `delay-write=${emulation.latencyMs}ms`, `rate=${bitsPerSecond}`, 'burstiness=0.5',
  ];
}

export interface EmulatedTarget {
  directory: string;
  loopDevice: string;
  commands: string[][];
}

/**
 * Builds the emulated volume of `diskBytes` under `realTarget` and mounts it; every step registers its undo, so
 * cleanup() takes it all down (unmount, loop device, FUSE mount and nbdkit, files) even after an interrupt.
 */
export async function buildEmulatedTarget(profile: Profile, realTarget: string, diskBytes: number, tools: Tools, log: (line: string) => void): Promise<EmulatedTarget> {
  const emulation = profile.emulation!;
  const root = fs.mkdtempSync(path.join(realTarget, '.chunkd-bench-emu-'));
  onCleanup(`directory ${root}`, () => fs.rmSync(root, { recursive: true, force: true }));
  const backing = path.join(root, 'volume.img');
  fs.writeFileSync(backing, '');
  fs.truncateSync(backing, diskBytes);
  const fuseDirectory = path.join(root, 'fuse');
  const mountDirectory = path.join(root, 'mnt');
  fs.mkdirSync(fuseDirectory);
  fs.mkdirSync(mountDirectory);
  const fuseFile = path.join(fuseDirectory, 'volume');

  // One connection: nbdkit is nbdfuse's own subprocess (socket activation), so its threads are the only slots.
  // Several: nbdkit listens on a unix socket and nbdfuse opens that many connections (multi-conn), because a
  // single nbdfuse connection keeps only about one request in flight whatever nbdkit's threads (measured here).
  const socketPath = emulation.connections === 1 ? null : path.join(root, 'nbdkit.sock');
  const nbdkitArgs = emulationCommand(emulation, backing, socketPath);
  nbdkitArgs[0] = tools.get('nbdkit');
  if (socketPath !== null) {
    const nbdkit = spawnTracked(nbdkitArgs[0], nbdkitArgs.slice(1));
    onCleanup('nbdkit (emulated volume)', () => stopChild(nbdkit, 5_000));
    await waitForSocket(socketPath, nbdkit, tail(nbdkit.stderr));
  }
  const nbdfuseArgs = socketPath === null ? [fuseFile, '[', ...nbdkitArgs, ']'] : ['-C', String(emulation.connections), fuseFile, '--unix', socketPath];
  const nbdfuse = spawnTracked(tools.get('nbdfuse'), nbdfuseArgs);
  const nbdfuseLog = tail(nbdfuse.stderr);
  onCleanup('nbdfuse', async () => {
    // fusermount3 -u makes nbdfuse exit (and a subprocess nbdkit with it: --exit-with-parent); retry while the kernel lets go.
    for (let attempt = 0; attempt < 20; attempt++) {
      if (nbdfuse.exitCode !== null || nbdfuse.signalCode !== null) break;
      const result = await runCommand(tools.get('fusermount3'), ['-u', fuseDirectory]);
      if (result.code === 0) break;
      await sleep(250);
    }
    await stopChild(nbdfuse, 5_000);
  });
  const deadline = Date.now() + 30_000;
  while (!(fs.existsSync(fuseFile) && fs.statSync(fuseFile).size === diskBytes)) {
    if (nbdfuse.exitCode !== null) throw new Error(`nbdfuse exited ${nbdfuse.exitCode}: ${nbdfuseLog().trim()}`);
    if (Date.now() > deadline) throw new Error(`nbdfuse did not show ${fuseFile} in 30 s: ${nbdfuseLog().trim()}`);
    await sleep(100);
  }

  // Direct I/O from the loop device to the FUSE file: no second page cache between ext4 and the emulated volume.
  const loopDevice = (await mustRun(tools.get('losetup'), ['--find', '--show', '--direct-io=on', fuseFile])).trim();
  onCleanup(`loop device ${loopDevice}`, async () => {
    await mustRun(tools.get('losetup'), ['-d', loopDevice]);
  });
  const mkfsArgs = ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', loopDevice];
  await mustRun(tools.get('mkfs.ext4'), mkfsArgs, { timeoutMs: 300_000 });
  await mustRun(tools.get('mount'), [loopDevice, mountDirectory]);
  onCleanup(`mount ${mountDirectory}`, async () => {
    await runCommand('sync', ['-f', mountDirectory], { timeoutMs: 300_000 });
    for (let attempt = 0; attempt < 20; attempt++) {
      const result = await runCommand(tools.get('umount'), [mountDirectory]);
      if (result.code === 0) return;
      await sleep(250);
    }
    await mustRun(tools.get('umount'), ['-l', mountDirectory]);
  });
  log(`profile ${profile.name}: emulated volume ${diskBytes / 2 ** 30} GiB on ${loopDevice}, ext4 mounted at ${mountDirectory} (${nbdkitArgs.slice(1).join(' ')})`);
  const shown = (args: string[]): string[] => args.map((arg) => (arg === nbdkitArgs[0] ? 'nbdkit' : arg));
  return {
    directory: mountDirectory,
    loopDevice,
    commands: [
      ...(socketPath === null ? [] : [shown(nbdkitArgs)]),
      ['nbdfuse', ...shown(nbdfuseArgs)],
      ['losetup', '--find', '--show', '--direct-io=on', fuseFile], ['mkfs.ext4', ...mkfsArgs], ['mount', loopDevice, mountDirectory],
    ],
  };
}

// ---- the page cache ----

const libc = koffi.load('libc.so.6');
const posixFadvise = libc.func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)');
const POSIX_FADV_DONTNEED = 4;

function* regularFiles(entry: string): Generator<string> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(entry);
  } catch {
    return;
  }
  if (stat.isFile()) yield entry;
  else if (stat.isDirectory()) for (const name of fs.readdirSync(entry)) yield* regularFiles(path.join(entry, name));
}

/**
 * Writes back the file system under `syncPath` and drops the cached pages of every regular file under `paths`
 * (dirty pages cannot be dropped, hence the sync first). Only those files: other work on the machine keeps its cache.
 */
export async function dropCaches(syncPath: string, paths: readonly string[]): Promise<number> {
  await runCommand('sync', ['-f', syncPath], { timeoutMs: 600_000 });
  let files = 0;
  for (const root of paths) {
    for (const file of regularFiles(root)) {
      let fd: number;
      try {
        fd = fs.openSync(file, 'r');
      } catch {
        continue; // a socket or a file that went away
      }
      try {
        posixFadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        files += 1;
      } finally {
        fs.closeSync(fd);
      }
    }
  }
  return files;
}
