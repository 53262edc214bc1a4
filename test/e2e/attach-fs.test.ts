// chunkd attach / detach with real parts: loop devices over FUSE (and nbdfuse) files, ext4 and xfs made only on
// volumes never written (raw data and a damaged superblock are refused unless --format), files with known
// checksums across detach, fsck and a new attach, a read-only loop mount of a snapshot file, errors that leave
// nothing half-done, and attachments across a stop and a crash of the node.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { makeTempDir, mustRun, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';
import { cleanupMounts, loopDevicesUnder, mountsUnder } from '../helpers/mounts.ts';

const MiB = 1024 * 1024;

function sha256(data: Buffer): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}

/** Writes files of known content under `directory`; returns relative path → sha256. */
function writeFiles(directory: string, label: string, count: number): Map<string, string> {
  const files = new Map<string, string>();
  fs.mkdirSync(path.join(directory, label, 'nested'), { recursive: true });
  for (let i = 0; i < count; i++) {
    const data = crypto.randomBytes(i * 1024 * 1024 + 777 * (i + 1));
    const name = path.join(label, i % 2 === 0 ? '' : 'nested', `file-${i}.bin`);
    fs.writeFileSync(path.join(directory, name), data);
    files.set(name, sha256(data));
  }
  return files;
}

function verifyFiles(directory: string, files: Map<string, string>): void {
  for (const [name, sum] of files) assert.equal(sha256(fs.readFileSync(path.join(directory, name))), sum, name);
}

async function cli(node: RunningNode, ...args: string[]): Promise<string> {
  const result = await node.cli(...args);
  assert.equal(result.code, 0, `chunkd ${args.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

async function refused(node: RunningNode, pattern: RegExp, ...args: string[]): Promise<void> {
  const result = await node.cli(...args);
  assert.notEqual(result.code, 0, `chunkd ${args.join(' ')} should fail`);
  assert.match(result.stderr, pattern);
  assert.equal(result.stderr.trim().split('\n').length, 1, 'one line on stderr');
}

async function attachments(node: RunningNode): Promise<Array<{ volume: string; mountpoint: string; state: string; loopDevice: string | null; fsType: string; via: string }>> {
  return JSON.parse(await cli(node, 'status', '--json')).attachments;
}

/** Read-only loop device over a FUSE file, for fsck or a read-only mount; detached by the caller. */
async function readOnlyLoop(file: string): Promise<string> {
  return (await mustRun('losetup', ['--find', '--show', '--read-only', file])).trim();
}

async function fsck(fsType: string, device: string): Promise<void> {
  const result = fsType === 'xfs' ? await runTool('xfs_repair', ['-n', device]) : await runTool('e2fsck', ['-fn', device]);
  assert.equal(result.code, 0, `${fsType} check of ${device}: ${result.stdout}${result.stderr}`);
}

async function withNode(label: string, body: (node: RunningNode, scratch: string, fuseDir: string) => Promise<RunningNode | void>): Promise<void> {
  const scratch = makeTempDir(label);
  const fuseDir = path.join(scratch, 'fuse');
  let node: RunningNode | null = await startNode(path.join(scratch, 'pool'), ['--fuse', fuseDir]);
  try {
    node = (await body(node, scratch, fuseDir)) ?? node;
  } finally {
    if (node !== null && node.process.exitCode === null) assert.equal(await node.stop(), 0, node.stderr());
    await cleanupMounts(scratch);
    assert.deepEqual(mountsUnder(scratch), []);
    assert.deepEqual(loopDevicesUnder(scratch), []);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

for (const fsType of ['ext4', 'xfs'] as const) {
  test(`attach ${fsType}: files survive detach, fsck and a new attach (also through nbdfuse); fio verify inside`, { timeout: 300_000 }, async () => {
    await withNode(`attach-${fsType}`, async (node, scratch, fuseDir) => {
      await cli(node, 'volume', 'create', 'vol', '--size', '512MiB');
      const mountpoint = path.join(scratch, 'mnt');
      assert.match(await cli(node, 'attach', 'vol', '--mountpoint', mountpoint, '--fs', fsType), new RegExp(`attached volume vol at ${mountpoint} \\(${fsType} on /dev/loop\\d+ via fuse\\)`));
      const [attached] = await attachments(node);
      assert.equal(attached?.state, 'attached');
      assert.equal(attached?.fsType, fsType);
      assert.match(await cli(node, 'status'), /attachments: 1\n {2}vol\t.*\tattached/);
      const files = writeFiles(mountpoint, 'first', 6);

      const fio = await runTool('fio', [
        '--name=inside', `--directory=${mountpoint}`, '--ioengine=libaio', '--direct=1', '--iodepth=16', '--rw=randwrite',
        '--bs=4k', '--size=32M', '--verify=crc32c', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
      ]);
      assert.equal(fio.code, 0, `fio: ${fio.stdout.slice(-1500)}${fio.stderr}`);
      assert.equal(JSON.parse(fio.stdout).jobs[0].error, 0);

      await cli(node, 'detach', 'vol');
      assert.deepEqual(mountsUnder(mountpoint), []);
      assert.deepEqual(loopDevicesUnder(fuseDir), []);
      assert.deepEqual(await attachments(node), []);

      const loop = await readOnlyLoop(path.join(fuseDir, 'vol'));
      try {
        await fsck(fsType, loop);
      } finally {
        await runTool('losetup', ['-d', loop]);
      }

      // Attached again, without --fs: blkid finds the file system and nothing is formatted.
      await cli(node, 'attach', 'vol', '--mountpoint', mountpoint);
      verifyFiles(mountpoint, files);
      assert.equal(node.stderr().match(/has no file system: making/g)?.length, 1, 'formatted once, on the first attach only');
      const more = writeFiles(mountpoint, 'second', 3);
      await cli(node, 'detach', 'vol');

      // The same volume through nbdfuse + loop over our NBD socket sees the same file system.
      await cli(node, 'attach', 'vol', '--mountpoint', mountpoint, '--via', 'nbdfuse');
      assert.equal((await attachments(node))[0]?.via, 'nbdfuse');
      verifyFiles(mountpoint, files);
      verifyFiles(mountpoint, more);
      await cli(node, 'detach', 'vol');
      assert.deepEqual(mountsUnder(scratch), [fuseDir], 'nbdfuse is unmounted after detach');
    });
  });
}

test('fstrim in a mounted ext4 gives the space of deleted files back to the pool', { timeout: 180_000 }, async () => {
  await withNode('attach-trim', async (node, scratch) => {
    await cli(node, 'volume', 'create', 'trim', '--size', '256MiB');
    const mountpoint = path.join(scratch, 'mnt');
    await cli(node, 'attach', 'trim', '--mountpoint', mountpoint);
    fs.writeFileSync(path.join(mountpoint, 'big'), crypto.randomBytes(64 * MiB));
    await mustRun('sync', ['-f', mountpoint]);
    const full = JSON.parse(await cli(node, 'volume', 'info', 'trim', '--json')).allocatedBytes;
    fs.rmSync(path.join(mountpoint, 'big'));
    // ext4 frees a deleted file's blocks when its journal commits; fstrim sees them after that.
    await mustRun('sync', ['-f', mountpoint]);
    await mustRun('fstrim', [mountpoint]);
    const trimmed = JSON.parse(await cli(node, 'volume', 'info', 'trim', '--json')).allocatedBytes;
    assert.ok(trimmed < full - 48 * MiB, `fstrim gave space back: ${full} -> ${trimmed}`);
    await cli(node, 'detach', 'trim');
  });
});

test('a snapshot of an attached volume mounts read-only from .snapshots/VOL@SNAP', { timeout: 180_000 }, async () => {
  await withNode('attach-snap', async (node, scratch, fuseDir) => {
    await cli(node, 'volume', 'create', 'data', '--size', '256MiB');
    const mountpoint = path.join(scratch, 'mnt');
    await cli(node, 'attach', 'data', '--mountpoint', mountpoint);
    const before = writeFiles(mountpoint, 'kept', 4);
    await cli(node, 'detach', 'data');
    await cli(node, 'snapshot', 'create', 'data', 'monday');
    await cli(node, 'attach', 'data', '--mountpoint', mountpoint);
    for (const name of before.keys()) fs.writeFileSync(path.join(mountpoint, name), 'overwritten after the snapshot');
    writeFiles(mountpoint, 'later', 2);
    await mustRun('sync', ['-f', mountpoint]);

    const snapshotMount = path.join(scratch, 'snap');
    fs.mkdirSync(snapshotMount);
    const loop = await readOnlyLoop(path.join(fuseDir, '.snapshots', 'data@monday'));
    try {
      await mustRun('mount', ['-o', 'ro,noload', loop, snapshotMount]);
      try {
        verifyFiles(snapshotMount, before);
        assert.equal(fs.existsSync(path.join(snapshotMount, 'later')), false);
        assert.throws(() => fs.writeFileSync(path.join(snapshotMount, 'x'), 'x'), { code: 'EROFS' });
      } finally {
        await mustRun('umount', [snapshotMount]);
      }
      await fsck('ext4', loop);
    } finally {
      await runTool('losetup', ['-d', loop]);
    }
    await cli(node, 'detach', 'data');
  });
});

test('attach and detach errors are clear and leave nothing half-done', { timeout: 180_000 }, async () => {
  await withNode('attach-errors', async (node, scratch, fuseDir) => {
    await cli(node, 'volume', 'create', 'a', '--size', '128MiB');
    await cli(node, 'volume', 'create', 'b', '--size', '128MiB');
    const noLoops = (): void => assert.deepEqual(loopDevicesUnder(fuseDir), [], 'no loop device left behind');

    await refused(node, /no volume named missing/, 'attach', 'missing', '--mountpoint', path.join(scratch, 'm-missing'));
    assert.equal(fs.existsSync(path.join(scratch, 'm-missing')), false);

    const full = path.join(scratch, 'full');
    fs.mkdirSync(full);
    fs.writeFileSync(path.join(full, 'something'), 'x');
    await refused(node, /not empty/, 'attach', 'a', '--mountpoint', full);
    noLoops();
    assert.deepEqual(mountsUnder(full), []);

    const mountA = path.join(scratch, 'ma');
    await cli(node, 'attach', 'a', '--mountpoint', mountA, '--fs', 'ext4');
    await refused(node, /already attached at/, 'attach', 'a', '--mountpoint', path.join(scratch, 'other'));
    await refused(node, /overlaps/, 'attach', 'b', '--mountpoint', mountA);
    await refused(node, /attached at .*detach it first/, 'volume', 'rm', 'a');
    await refused(node, /--fs must be ext4 or xfs/, 'attach', 'b', '--mountpoint', path.join(scratch, 'mb'), '--fs', 'btrfs');

    // b gets ext4, is detached, then asked for as xfs: refused, never reformatted, nothing left attached.
    const mountB = path.join(scratch, 'mb');
    await cli(node, 'attach', 'b', '--mountpoint', mountB);
    fs.writeFileSync(path.join(mountB, 'keep'), 'precious');
    await cli(node, 'detach', 'b');
    await refused(node, /holds ext4, not xfs/, 'attach', 'b', '--mountpoint', mountB, '--fs', 'xfs');
    assert.deepEqual(mountsUnder(mountB), []);
    assert.equal(loopDevicesUnder(fuseDir).length, 1, 'only a\'s loop device');

    // Busy: a process with its working directory inside.
    const holder = (await import('node:child_process')).spawn('sleep', ['60'], { cwd: mountA, stdio: 'ignore' });
    try {
      await refused(node, /in use/, 'detach', 'a');
      assert.equal(mountsUnder(mountA).length, 1, 'still mounted');
      assert.equal((await attachments(node))[0]?.state, 'attached');
    } finally {
      holder.kill('SIGKILL');
      await new Promise((resolve) => holder.once('exit', resolve));
    }
    await cli(node, 'detach', 'a');
    await refused(node, /not attached/, 'detach', 'a');
    noLoops();

    await cli(node, 'attach', 'b', '--mountpoint', mountB);
    assert.equal(fs.readFileSync(path.join(mountB, 'keep'), 'utf8'), 'precious');
    await cli(node, 'detach', 'b');
  });
});

/** Bytes that differ between a snapshot and the live volume, from the node's metadata: 0 when nothing was written. */
async function changedBytesSince(node: RunningNode, volume: string, snapshot: string): Promise<number> {
  return JSON.parse(await cli(node, 'snapshot', 'diff', volume, snapshot, '--json')).changedBytes;
}

/** sha256 of a whole volume, read through NBD. */
async function volumeDigest(node: RunningNode, volume: string, scratch: string): Promise<string> {
  const image = path.join(scratch, `${volume}.img`);
  await mustRun('nbdcopy', [node.uri(volume), image]);
  const digest = sha256(fs.readFileSync(image));
  fs.rmSync(image);
  return digest;
}

test('attach never formats a volume holding raw data: refused, data unchanged; --format makes the file system', { timeout: 180_000 }, async () => {
  await withNode('attach-raw', async (node, scratch, fuseDir) => {
    await cli(node, 'volume', 'create', 'raw', '--size', '128MiB');
    await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('raw'), '-c', 'write -P 0xa5 0 1M', '-c', 'write -P 0x5a 64M 1M']);
    await cli(node, 'snapshot', 'create', 'raw', 'written');
    const mountpoint = path.join(scratch, 'mnt');
    const message = /^chunkd: volume raw holds 2 MiB \(2097152 bytes\) of data but no file system blkid recognises \(raw data, or a damaged superblock\); chunkd never formats a volume that was written: attach it with --format to make a new file system on it, destroying its contents$/m;
    await refused(node, message, 'attach', 'raw', '--mountpoint', mountpoint);
    await refused(node, /holds 2 MiB .* of data but no file system blkid recognises/, 'attach', 'raw', '--mountpoint', mountpoint, '--fs', 'xfs');
    await refused(node, /holds 2 MiB .* of data but no file system blkid recognises/, 'attach', 'raw', '--mountpoint', mountpoint, '--via', 'nbdfuse');
    assert.equal(fs.existsSync(mountpoint), false, 'the mountpoint the attach made is gone again');
    assert.deepEqual(loopDevicesUnder(scratch), []);
    assert.deepEqual(mountsUnder(scratch), [fuseDir]);
    assert.deepEqual(await attachments(node), []);
    assert.doesNotMatch(node.stderr(), /making/, 'no mkfs ran');
    assert.equal(await changedBytesSince(node, 'raw', 'written'), 0, 'nothing was written to the volume');
    const reread = await mustRun('qemu-io', ['-r', '-f', 'raw', node.qemuUri('raw'), '-c', 'read -P 0xa5 0 1M', '-c', 'read -P 0 1M 63M', '-c', 'read -P 0x5a 64M 1M', '-c', 'read -P 0 65M 63M']);
    assert.doesNotMatch(reread, /Pattern verification failed/);

    // --format: the data goes, a file system comes; the next attach, --format or not, mounts that one.
    assert.match(await cli(node, 'attach', 'raw', '--mountpoint', mountpoint, '--format'), /attached volume raw at .* \(ext4 on \/dev\/loop\d+ via fuse\)/);
    assert.match(node.stderr(), /volume raw holds 2097152 bytes but no file system: making ext4, as --format asks/);
    fs.writeFileSync(path.join(mountpoint, 'after-format'), 'fresh');
    await cli(node, 'detach', 'raw');
    await cli(node, 'attach', 'raw', '--mountpoint', mountpoint, '--format');
    assert.equal(fs.readFileSync(path.join(mountpoint, 'after-format'), 'utf8'), 'fresh');
    assert.equal(node.stderr().match(/making/g)?.length, 1, 'formatted once: --format never reformats a file system blkid recognises');
    await cli(node, 'detach', 'raw');
  });
});

test('attach never formats an ext4 volume whose superblock is damaged; e2fsck repairs it from a backup', { timeout: 180_000 }, async () => {
  await withNode('attach-damaged', async (node, scratch, fuseDir) => {
    await cli(node, 'volume', 'create', 'dmg', '--size', '64MiB');
    const mountpoint = path.join(scratch, 'mnt');
    await cli(node, 'attach', 'dmg', '--mountpoint', mountpoint, '--fs', 'ext4');
    const files = writeFiles(mountpoint, 'kept', 3);
    await cli(node, 'detach', 'dmg');
    assert.equal(node.stderr().match(/making/g)?.length, 1);

    // ext4's primary superblock starts at byte 1024 and holds its magic 0xEF53 (little-endian) at +0x38.
    const magicOffset = 1024 + 0x38;
    const magic = await mustRun('qemu-io', ['-r', '-f', 'raw', node.qemuUri('dmg'), '-c', `read -P 0x53 ${magicOffset} 1`, '-c', `read -P 0xef ${magicOffset + 1} 1`]);
    assert.doesNotMatch(magic, /Pattern verification failed/, 'the magic is where ext4 keeps it');
    await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('dmg'), '-c', `write -P 0 ${magicOffset} 2`]);
    await cli(node, 'snapshot', 'create', 'dmg', 'damaged');
    const digest = await volumeDigest(node, 'dmg', scratch);

    await refused(node, /^chunkd: volume dmg holds .* \(\d+ bytes\) of data but no file system blkid recognises \(raw data, or a damaged superblock\); .* --format /m, 'attach', 'dmg', '--mountpoint', mountpoint);
    await refused(node, /volume dmg holds .* of data but no file system blkid recognises/, 'attach', 'dmg', '--mountpoint', mountpoint, '--fs', 'ext4');
    assert.equal(node.stderr().match(/making/g)?.length, 1, 'no mkfs ran after the first attach');
    assert.equal(await changedBytesSince(node, 'dmg', 'damaged'), 0, 'nothing was written to the volume');
    assert.equal(await volumeDigest(node, 'dmg', scratch), digest, 'every byte of the volume is as it was');
    assert.deepEqual(loopDevicesUnder(scratch), []);
    assert.deepEqual(await attachments(node), []);

    // What refusing kept: e2fsck finds a backup superblock, and the files are all there.
    const loop = (await mustRun('losetup', ['--find', '--show', '--direct-io=on', path.join(fuseDir, 'dmg')])).trim();
    try {
      const repair = await runTool('e2fsck', ['-fy', loop]);
      assert.ok(repair.code === 0 || repair.code === 1, `e2fsck -fy (exit ${repair.code}): ${repair.stdout}${repair.stderr}`);
      assert.match(repair.stdout + repair.stderr, /trying backup blocks/);
    } finally {
      await runTool('losetup', ['-d', loop]);
    }
    await cli(node, 'attach', 'dmg', '--mountpoint', mountpoint);
    verifyFiles(mountpoint, files);
    await cli(node, 'detach', 'dmg');
  });
});

test('attachments across a stop (clean unmount, re-attached at start) and a crash (dead mount replaced)', { timeout: 240_000 }, async () => {
  await withNode('attach-restart', async (node, scratch, fuseDir) => {
    const pool = node.pool;
    await cli(node, 'volume', 'create', 'r', '--size', '256MiB');
    const mountpoint = path.join(scratch, 'mnt');
    await cli(node, 'attach', 'r', '--mountpoint', mountpoint);
    const first = writeFiles(mountpoint, 'first', 3);

    // Stop: the file system is unmounted cleanly and the loop device detached; the record stays.
    assert.equal(await node.stop(), 0, node.stderr());
    assert.deepEqual(mountsUnder(scratch), []);
    assert.deepEqual(loopDevicesUnder(scratch), []);
    assert.equal(JSON.parse(fs.readFileSync(path.join(pool, 'attachments.json'), 'utf8')).attachments[0].volume, 'r');

    node = await startNode(pool, ['--fuse', fuseDir]);
    assert.match(node.stderr(), /re-attached volume r at/);
    verifyFiles(mountpoint, first);
    const second = writeFiles(mountpoint, 'second', 2);
    await mustRun('sync', ['-f', mountpoint]);

    // Crash: the mount stays behind on a loop device over a dead FUSE file; the next start replaces it.
    await node.kill();
    node = await startNode(pool, ['--fuse', fuseDir]);
    assert.match(node.stderr(), /left mounted by a node that died/);
    const [record] = await attachments(node);
    assert.equal(record?.state, 'attached');
    verifyFiles(mountpoint, first);
    verifyFiles(mountpoint, second);
    await cli(node, 'detach', 'r');
    const loop = await readOnlyLoop(path.join(fuseDir, 'r'));
    try {
      await fsck('ext4', loop);
    } finally {
      await runTool('losetup', ['-d', loop]);
    }
    return node;
  });
});

test('without --fuse, the first attach mounts the front end at <pool>/.fuse; stop unmounts it', { timeout: 120_000 }, async () => {
  const scratch = makeTempDir('attach-internal');
  const node = await startNode(path.join(scratch, 'pool'));
  try {
    const internal = path.join(node.pool, '.fuse');
    assert.deepEqual(mountsUnder(scratch), [], 'nothing mounted before an attach');
    await cli(node, 'volume', 'create', 'i', '--size', '128MiB');
    const mountpoint = path.join(scratch, 'mnt');
    await cli(node, 'attach', 'i', '--mountpoint', mountpoint);
    assert.deepEqual(mountsUnder(scratch).sort(), [internal, mountpoint].sort());
    assert.equal(JSON.parse(await cli(node, 'status', '--json')).fuse.mountpoint, internal);
    fs.writeFileSync(path.join(mountpoint, 'x'), 'y');
    await cli(node, 'detach', 'i');
    assert.equal(await node.stop(), 0);
    assert.deepEqual(mountsUnder(scratch), []);
  } finally {
    if (node.process.exitCode === null) await node.stop();
    await cleanupMounts(scratch);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
