// Read defragmentation (volume.ts's #defragment): a large read that finds its range in many small pieces (a range
// rewritten at random), the second time one does, rewrites it as one fresh run from the bytes it just read and verified. The bytes read the
// same before and after, and after a reopen; a later read finds one piece (nothing more is rewritten); a write that
// comes between the read and its rewrite wins; nothing is rewritten while the pool holds a snapshot or with the
// option off; and a power loss at any point of the rewrite and its commit leaves the same bytes, fsck clean.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, test } from 'vitest';
import { fsckPool } from '../../src/store/fsck.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { Pool } from '../../src/store/pool.ts';
import { PowerLossFiles } from '../../src/testing/power-loss.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';
import { makeRandom, randomInt } from '../../src/core/random.ts';

const MiB = 1024 * 1024;
const chunk = 4096;
const volumeBytes = 2 * MiB;
const directories: string[] = [];

afterEach(() => {
  for (const directory of directories.splice(0)) fs.rmSync(directory, { recursive: true, force: true });
});

function freshDirectory(): string {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'read-defrag-'));
  directories.push(directory);
  return directory;
}

function openPool(directory: string, options: { files?: FileLayer; readDefrag?: boolean } = {}): Promise<Pool> {
  return Pool.open({ directory, ...testPoolOptions(), ...options });
}

/**
 * Volume "v": its first MiB written whole, then 64 of its chunks rewritten one by one at random places (each in a
 * fresh place of its own, as redirect-on-write puts them), flushed. Returns what the volume holds.
 */
async function scatter(pool: Pool, seed = 7): Promise<Buffer> {
  await pool.createVolume('v', volumeBytes);
  const volume = pool.openVolume('v');
  const expected = Buffer.alloc(volumeBytes);
  for (let i = 0; i < MiB; i++) expected[i] = (i * 31 + (i >> 12)) & 0xff;
  await volume.write(0, expected.subarray(0, MiB));
  const random = makeRandom(seed);
  for (let n = 0; n < 64; n++) {
    const at = randomInt(random, MiB / chunk) * chunk;
    const data = Buffer.alloc(chunk, 1 + n);
    data.copy(expected, at);
    await volume.write(at, data);
  }
  await volume.flush();
  await volume.close();
  return expected;
}

async function readMiB(pool: Pool): Promise<Buffer> {
  const volume = pool.openVolume('v');
  const bytes = Buffer.alloc(MiB);
  await volume.read(0, bytes);
  await volume.close();
  return bytes;
}

async function defragBytes(pool: Pool): Promise<number> {
  return (await pool.status()).readDefragBytesTotal;
}

test('a scattered range read whole is rewritten as one run: the same bytes, now and after a reopen, and the next read rewrites nothing', async () => {
  const directory = freshDirectory();
  const pool = await openPool(directory);
  const expected = await scatter(pool);
  assert.ok((await readMiB(pool)).equals(expected.subarray(0, MiB)));
  await pool.readDefragsSettled();
  assert.equal(await defragBytes(pool), 0, 'a range read once is left as it is');
  assert.ok((await readMiB(pool)).equals(expected.subarray(0, MiB)));
  await pool.readDefragsSettled();
  assert.equal(await defragBytes(pool), MiB, 'the second read rewrote the range');
  assert.ok((await readMiB(pool)).equals(expected.subarray(0, MiB)));
  await pool.readDefragsSettled();
  assert.equal(await defragBytes(pool), MiB, 'the second read found the range in one piece');
  // A read that is not large enough, and one over a hole (the second MiB), rewrite nothing.
  const volume = pool.openVolume('v');
  await volume.read(0, Buffer.alloc(64 * 1024));
  await volume.read(MiB / 2, Buffer.alloc(MiB));
  await volume.close();
  await pool.readDefragsSettled();
  assert.equal(await defragBytes(pool), MiB);
  await pool.close();
  const reopened = await openPool(directory);
  assert.ok((await readMiB(reopened)).equals(expected.subarray(0, MiB)), 'after a reopen');
  await reopened.close();
  assert.ok((await fsckPool(directory)).clean);
});

test('a write that comes between the read and its rewrite wins', async () => {
  const directory = freshDirectory();
  const pool = await openPool(directory);
  const expected = await scatter(pool);
  const volume = pool.openVolume('v');
  const bytes = Buffer.alloc(MiB);
  await volume.read(0, bytes); // the first read that finds it scattered
  // A write of the same bytes holds the range first, so that the read waits for it and then holds the range while
  // the write below asks for it: a read granted at once of bytes in the page cache is done before it returns, and
  // its rewrite asks for the range before that write could.
  const ahead = volume.write(7 * chunk, Buffer.from(expected.subarray(7 * chunk, 8 * chunk)));
  const read = volume.read(0, bytes);
  // Asked for while the read holds the range: granted before the rewrite's request, made when the read ends.
  const data = Buffer.alloc(chunk, 0xee);
  const write = volume.write(5 * chunk, data);
  await Promise.all([ahead, read, write]);
  assert.ok(bytes.equals(expected.subarray(0, MiB)));
  data.copy(expected, 5 * chunk);
  await pool.readDefragsSettled();
  const after = Buffer.alloc(MiB);
  await volume.read(0, after);
  assert.ok(after.equals(expected.subarray(0, MiB)), 'the write is not undone by a rewrite of what was read before it');
  assert.equal(await defragBytes(pool), 0, 'the map changed under the rewrite: nothing rewritten');
  await volume.close();
  await pool.readDefragsSettled();
  await pool.close();
});

test('nothing is rewritten while the pool holds a snapshot, nor with the option off', async () => {
  const directory = freshDirectory();
  const pool = await openPool(directory);
  const expected = await scatter(pool);
  await pool.createSnapshot('v', 's');
  assert.ok((await readMiB(pool)).equals(expected.subarray(0, MiB)));
  assert.ok((await readMiB(pool)).equals(expected.subarray(0, MiB)));
  await pool.readDefragsSettled();
  assert.equal(await defragBytes(pool), 0);
  await pool.close();
  const off = await openPool(freshDirectory(), { readDefrag: false });
  const offExpected = await scatter(off);
  assert.ok((await readMiB(off)).equals(offExpected.subarray(0, MiB)));
  assert.ok((await readMiB(off)).equals(offExpected.subarray(0, MiB)));
  await off.readDefragsSettled();
  assert.equal(await defragBytes(off), 0);
  await off.close();
});

test('a power loss at any point of a rewrite and its commit leaves the same bytes, fsck clean', { timeout: 180_000 }, async () => {
  const source = freshDirectory();
  const setup = await openPool(source);
  const expected = (await scatter(setup)).subarray(0, MiB);
  await setup.close();
  const copyOfSource = (): string => {
    const directory = freshDirectory();
    fs.cpSync(source, directory, { recursive: true });
    return directory;
  };

  // One run without a cut: the changes to files the open makes, and those the read's rewrite and a flush make.
  const counted = copyOfSource();
  const counting = new PowerLossFiles(counted);
  const pool = await openPool(counted, { files: counting });
  await readMiB(pool); // the first read that finds it scattered: no change to any file
  const opened = counting.inner.changeCount;
  await readMiB(pool);
  await pool.readDefragsSettled();
  assert.equal(await defragBytes(pool), MiB);
  await pool.openVolume('v').flush();
  const total = counting.inner.changeCount;
  await pool.abandon();
  assert.ok(total > opened, 'the rewrite changed files');

  // Every change when they are few (memory metadata: about a dozen), else the first twelve and twelve more spread
  // over the rest (paged metadata writes pages too), so that the test stays a few seconds.
  const points: number[] = [];
  for (let crashAt = opened + 1; crashAt <= total; crashAt++) points.push(crashAt);
  const chosen = points.length <= 24 ? points : [...points.slice(0, 12), ...Array.from({ length: 12 }, (_, i) => points[12 + Math.floor(((points.length - 13) * (i + 1)) / 12)]!)];
  let cutsDuringRewrite = 0;
  for (const crashAt of chosen) {
    const directory = copyOfSource();
    const files = new PowerLossFiles(directory, { crashAtChange: crashAt });
    let crashed: Pool | null = null;
    const live = async (): Promise<void> => {
      crashed = await openPool(directory, { files });
      await readMiB(crashed);
      await readMiB(crashed);
      await crashed.readDefragsSettled();
      await crashed.openVolume('v').flush();
    };
    await Promise.race([live().catch((error: unknown) => {
      if (!files.inner.frozen) throw error;
    }), files.inner.untilFrozen()]);
    if (files.inner.frozen) cutsDuringRewrite += 1;
    files.inner.freeze();
    await (crashed as Pool | null)?.abandon();
    await files.cut(makeRandom(crashAt));
    const report = await fsckPool(directory);
    assert.ok(report.clean, `fsck after a cut at change ${crashAt}: ${report.errors.join('; ')}`);
    const after = await openPool(directory, { files: realFiles });
    assert.ok((await readMiB(after)).equals(expected), `the bytes after a cut at change ${crashAt}`);
    await after.readDefragsSettled();
    await after.close();
  }
  assert.ok(cutsDuringRewrite >= 2, `cuts landed during the rewrite (${cutsDuringRewrite} of ${chosen.length}, of ${total - opened} changes)`);
  console.log(`read defrag power loss: ${chosen.length} cuts of ${total - opened} changes, ${cutsDuringRewrite} during the rewrite`);
});

test('copyBytes copies bytes in shared memory, and a part of them, as they are', async () => {
  const { copyBytes } = await import('../../src/store/native.ts');
  const source = Buffer.from(new SharedArrayBuffer(64 * 1024));
  for (let i = 0; i < source.length; i++) source[i] = (i * 7 + (i >> 8)) & 0xff;
  const whole = Buffer.alloc(source.length + 16, 0xaa);
  copyBytes(whole, source);
  assert.ok(whole.subarray(0, source.length).equals(source));
  assert.ok(whole.subarray(source.length).equals(Buffer.alloc(16, 0xaa)), 'nothing past the source is written');
  const part = Buffer.alloc(100);
  copyBytes(part, source.subarray(1000, 1100));
  assert.ok(part.equals(source.subarray(1000, 1100)));
  assert.throws(() => copyBytes(Buffer.alloc(1), source), RangeError);
});

test('a volume whose read left a rewrite running can be removed once its clients are gone', async () => {
  const pool = await openPool(freshDirectory());
  await scatter(pool);
  await readMiB(pool);
  await readMiB(pool); // closes its handle; the rewrite it asked for may still run
  await pool.removeVolume('v');
  await pool.readDefragsSettled();
  assert.deepEqual(pool.listVolumes(), []);
  await pool.close();
});
