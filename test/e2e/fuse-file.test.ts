// The FUSE front end with real parts: `serve --fuse DIR`, files read and written by this process and by fio
// against a model, punch holes and zero ranges through fallocate(2), fsync durable across kill -9, a stale
// mount left by the crash replaced at the next start, truncation refused, snapshots read-only.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import koffi from 'koffi';
import { makeTempDir, mustRun, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';
import { cleanupMounts, mountsUnder } from '../helpers/mounts.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const MiB = 1024 * 1024;
const libc = koffi.load('libc.so.6');
const fallocate = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
const FALLOC_FL_KEEP_SIZE = 1;
const FALLOC_FL_PUNCH_HOLE = 2;
const FALLOC_FL_ZERO_RANGE = 0x10;

async function status(node: RunningNode): Promise<{ fuse: { mountpoint: string; writeSizes: Record<string, number>; readSizes: Record<string, number>; writeBytesMax: number; readBytesMax: number } }> {
  const result = await node.cli('status', '--json');
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout);
}

test('FUSE file: random writes, reads, punch holes and zero ranges against a model; fsync survives kill -9', { timeout: 240_000 }, async () => {
  const seed = testSeed('fuse-file model');
  const random = makeRandom(seed);
  const scratch = makeTempDir('fuse-file');
  const pool = path.join(scratch, 'pool');
  const fuseDir = path.join(scratch, 'fuse');
  let node: RunningNode | null = await startNode(pool, ['--fuse', fuseDir]);
  try {
    const sizeBytes = 64 * MiB;
    assert.equal((await node.cli('volume', 'create', 'f', '--size', '64MiB')).code, 0);
    const file = path.join(fuseDir, 'f');
    let stats = await fs.promises.stat(file);
    assert.equal(stats.size, sizeBytes);
    assert.equal(stats.blocks, 0, 'a new thin volume has nothing allocated');
    assert.deepEqual((await fs.promises.readdir(fuseDir)).sort(), ['.snapshots', 'f']);

    const model = Buffer.alloc(sizeBytes);
    const handle = await fs.promises.open(file, 'r+');
    try {
      for (let op = 0; op < 300; op++) {
        const kind = random();
        const offset = randomInt(random, sizeBytes);
        const length = 1 + randomInt(random, Math.min(sizeBytes - offset, random() < 0.3 ? 2 * MiB : 64 * 1024));
        if (kind < 0.45) {
          const data = crypto.randomBytes(length);
          await handle.write(data, 0, length, offset);
          data.copy(model, offset);
        } else if (kind < 0.75) {
          const target = Buffer.alloc(length);
          const { bytesRead } = await handle.read(target, 0, length, offset);
          assert.equal(bytesRead, length);
          assert.ok(target.equals(model.subarray(offset, offset + length)), `op ${op}: read ${length} at ${offset} differs (SEED=${seed})`);
        } else if (kind < 0.9) {
          assert.equal(fallocate(handle.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length), 0, `punch hole errno ${koffi.errno()}`);
          model.fill(0, offset, offset + length);
        } else {
          assert.equal(fallocate(handle.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length), 0, `zero range errno ${koffi.errno()}`);
          model.fill(0, offset, offset + length);
        }
      }
      await handle.sync();
      // Plain allocation cannot be promised by a thin pool.
      assert.equal(fallocate(handle.fd, 0, 0, 4096), -1);
      assert.equal(koffi.errno(), 95);
      // A file of a volume never grows or shrinks.
      await assert.rejects(handle.truncate(MiB), { code: 'EPERM' });
      await assert.rejects(handle.write(Buffer.alloc(4096), 0, 4096, sizeBytes), { code: 'ENOSPC' });
    } finally {
      await handle.close();
    }
    const before = crypto.createHash('sha256').update(model).digest('hex');
    assert.equal(crypto.createHash('sha256').update(await fs.promises.readFile(file)).digest('hex'), before);
    stats = await fs.promises.stat(file);
    const info = JSON.parse((await node.cli('volume', 'info', 'f', '--json')).stdout);
    assert.equal(stats.blocks * 512, info.allocatedBytes, 'stat blocks are the volume\'s allocated bytes');
    assert.ok(info.allocatedBytes < sizeBytes, 'punched holes gave space back');

    // Punch a large aligned range: the space goes back to the pool.
    const punchFd = fs.openSync(file, 'r+');
    assert.equal(fallocate(punchFd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 32 * MiB), 0);
    fs.fsyncSync(punchFd);
    fs.closeSync(punchFd);
    model.fill(0, 0, 32 * MiB);
    const afterPunch = JSON.parse((await node.cli('volume', 'info', 'f', '--json')).stdout);
    assert.ok(afterPunch.allocatedBytes <= sizeBytes - 32 * MiB, `allocated ${afterPunch.allocatedBytes} after punching 32 MiB`);

    // Everything above was fsynced: a crash now loses none of it, and the dead mount is replaced at restart.
    await node.kill();
    node = null;
    assert.ok(mountsUnder(scratch).includes(fuseDir), 'the crash left the FUSE mount behind');
    await assert.rejects(fs.promises.stat(file), { code: 'ENOTCONN' });
    node = await startNode(pool, ['--fuse', fuseDir]);
    assert.match(node.stderr(), /replaced a stale FUSE mount/);
    assert.ok((await fs.promises.readFile(file)).equals(model), 'every fsynced write reads back after kill -9');
  } finally {
    if (node !== null) assert.equal(await node.stop(), 0);
    await cleanupMounts(scratch);
    assert.deepEqual(mountsUnder(scratch), []);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('FUSE file: 1 MiB requests arrive whole; snapshots are read-only files; an open file keeps its volume', { timeout: 120_000 }, async () => {
  const scratch = makeTempDir('fuse-snap');
  const fuseDir = path.join(scratch, 'fuse');
  const node = await startNode(path.join(scratch, 'pool'), ['--fuse', fuseDir]);
  try {
    assert.equal((await node.cli('volume', 'create', 's', '--size', '32MiB')).code, 0);
    const file = path.join(fuseDir, 's');
    const image = crypto.randomBytes(16 * MiB);
    fs.writeFileSync(path.join(scratch, 'image'), image);
    await mustRun('dd', [`if=${path.join(scratch, 'image')}`, `of=${file}`, 'bs=1M', 'oflag=direct', 'conv=notrunc,fsync', 'status=none']);
    await mustRun('dd', [`if=${file}`, `of=${path.join(scratch, 'back')}`, 'bs=1M', 'count=16', 'iflag=direct', 'status=none']);
    assert.ok(fs.readFileSync(path.join(scratch, 'back')).equals(image));
    const fuse = (await status(node)).fuse;
    assert.equal(fuse.writeBytesMax, MiB, `largest write that arrived: ${fuse.writeBytesMax} (${JSON.stringify(fuse.writeSizes)})`);
    assert.equal(fuse.readBytesMax, MiB, `largest read that arrived: ${fuse.readBytesMax} (${JSON.stringify(fuse.readSizes)})`);
    assert.ok((fuse.writeSizes['1MiB'] ?? 0) >= 16);

    assert.equal((await node.cli('snapshot', 'create', 's', 'before')).code, 0);
    const snapshotFile = path.join(fuseDir, '.snapshots', 's@before');
    const overwrite = Buffer.alloc(MiB, 0x5a);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, overwrite, 0, MiB, 0);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const snapshotStats = await fs.promises.stat(snapshotFile);
    assert.equal(snapshotStats.size, 32 * MiB);
    assert.equal(snapshotStats.mode & 0o777, 0o400);
    assert.ok(snapshotStats.blocks * 512 >= 16 * MiB, `snapshot blocks ${snapshotStats.blocks}`);
    assert.ok(fs.readFileSync(snapshotFile).subarray(0, 16 * MiB).equals(image), 'the snapshot keeps the image');
    assert.ok(fs.readFileSync(file).subarray(0, MiB).equals(overwrite));
    await assert.rejects(fs.promises.open(snapshotFile, 'r+'), { code: 'EROFS' });
    assert.deepEqual(await fs.promises.readdir(path.join(fuseDir, '.snapshots')), ['s@before']);

    // An open FUSE file is an open export: the volume cannot be removed under it.
    const held = await fs.promises.open(file, 'r');
    try {
      assert.equal((await node.cli('snapshot', 'rm', 's', 'before')).code, 0);
      const rm = await node.cli('volume', 'rm', 's');
      assert.notEqual(rm.code, 0);
      assert.match(rm.stderr, /open|busy|in use/i);
    } finally {
      await held.close();
    }
    // Names are made through the API only.
    await assert.rejects(fs.promises.writeFile(path.join(fuseDir, 'new'), 'x'), { code: 'EPERM' });
    await assert.rejects(fs.promises.unlink(file), { code: 'EPERM' });
  } finally {
    assert.equal(await node.stop(), 0);
    await cleanupMounts(scratch);
    assert.deepEqual(mountsUnder(scratch), []);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('fio verify on the FUSE file (mixed sizes, iodepth 16); discard through a loop device punches holes', { timeout: 180_000 }, async () => {
  const scratch = makeTempDir('fuse-fio');
  const fuseDir = path.join(scratch, 'fuse');
  const node = await startNode(path.join(scratch, 'pool'), ['--fuse', fuseDir]);
  try {
    assert.equal((await node.cli('volume', 'create', 'fio', '--size', '128MiB')).code, 0);
    const fio = await runTool('fio', [
      '--name=verify', `--filename=${path.join(fuseDir, 'fio')}`, '--ioengine=libaio', '--direct=1', '--iodepth=16',
      '--rw=randwrite', '--bsrange=4k-256k', '--size=64M', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--verify_state_save=0', '--randrepeat=0', '--output-format=json',
    ], { timeoutMs: 150_000 });
    assert.equal(fio.code, 0, `fio: ${fio.stdout.slice(-2000)}${fio.stderr}`);
    const job = JSON.parse(fio.stdout).jobs[0];
    assert.equal(job.error, 0);
    assert.ok(job.write.io_bytes >= 64 * MiB && job.read.io_bytes >= 64 * MiB, 'fio wrote the range and read it all back to verify');
    // fio trims only block devices (BLKDISCARD): discard through a loop device over the file, which the loop
    // driver turns into fallocate(PUNCH_HOLE) on it, as under a mounted file system.
    const before = JSON.parse((await node.cli('volume', 'info', 'fio', '--json')).stdout).allocatedBytes;
    const loop = (await mustRun('losetup', ['--find', '--show', '--direct-io=on', path.join(fuseDir, 'fio')])).trim();
    try {
      await mustRun('blkdiscard', ['-o', '0', '-l', String(16 * MiB), loop]);
    } finally {
      await runTool('losetup', ['-d', loop]);
    }
    const after = JSON.parse((await node.cli('volume', 'info', 'fio', '--json')).stdout).allocatedBytes;
    assert.ok(after <= before - 8 * MiB, `discard gave space back: ${before} -> ${after}`);
    const head = Buffer.alloc(16 * MiB);
    const fd = fs.openSync(path.join(fuseDir, 'fio'), 'r');
    fs.readSync(fd, head, 0, head.length, 0);
    fs.closeSync(fd);
    assert.ok(head.every((byte) => byte === 0), 'trimmed range reads as zeros');
  } finally {
    assert.equal(await node.stop(), 0);
    await cleanupMounts(scratch);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
