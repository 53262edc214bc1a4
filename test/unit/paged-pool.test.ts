// A pool on paged metadata (`--metadata paged`, pool format 4; paged-backend.ts), beyond what the store's crash,
// model and power-loss tests check over it (npm run test:paged): the kind is recorded at creation and kept; a
// reopen reads the root and replays only the journal commits after the last checkpoint; a failed checkpoint
// makes the pool refuse writes until a restart, with everything acknowledged back after it; fsck walks the maps
// and finds a chunk file cut short; scrub walks them and finds a damaged chunk; snapshot diffs and content digests
// equal a memory pool's for the same writes, a diff reads only the pages that differ, as do what each snapshot holds
// alone, and replication streams go
// from either kind of pool into the other; control verbs called at once each see what those before them did; a
// volume of many map pages removed gives its pages back, reused after a reopen, none lost or named twice.
// (fsck --repair of a paged pool: paged-repair.test.ts.)
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { StreamReceiver } from '../../src/replication/receive.ts';
import { prepareSend } from '../../src/replication/send.ts';
import { chunkFilePath } from '../../src/store/chunk-file-layout.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import type { MetaRecord } from '../../src/store/metadata.ts';
import { replayBatchRecords, replayBatches, replayPaged } from '../../src/store/paged-backend.ts';
import { walkMaps } from '../../src/store/paged-check.ts';
import { firstDataPage } from '../../src/store/page-file.ts';
import { Pool, type PoolOptions } from '../../src/store/pool.ts';
import { chunksDirectory, journalGenerations, markerPath } from '../../src/store/pool-layout.ts';
import { PowerLossFiles } from '../../src/testing/power-loss.ts';
import { TestFiles } from '../../src/testing/test-files.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';
import { inScratch } from '../helpers/scratch.ts';

const MiB = 1024 * 1024;
const block = (fill: number): Buffer => Buffer.alloc(4096, fill);

function open(directory: string, options: Partial<PoolOptions> = {}): Promise<Pool> {
  return Pool.open({ directory, metadata: 'paged', metadataCacheBytes: 64 * 1024, ...options });
}

/** The node's process dies: nothing more is written, its descriptors close (what it made durable stays). */
async function killed(pool: Pool, files: TestFiles): Promise<void> {
  await pool.abandon();
  for (const fd of files.openDescriptors()) files.close(fd);
}

/** Each block of volume v written at `indexes` (the i-th write's fill 1 + i % 250) reads back with its last write's fill. */
async function lastFillsReadBack(pool: Pool, indexes: readonly number[]): Promise<void> {
  const last = new Map(indexes.map((index, i) => [index, 1 + (i % 250)]));
  for (const [index, fill] of last) assert.equal(await readBlock(pool, 'v', index), fill, `block ${index}`);
}

/** Counts the reads of the metadata page files (a page read from the OS page cache in one call, or else a read). */
class CountingFiles extends TestFiles {
  pageReads = 0;
  override read(fd: number, target: Uint8Array, positionBytes: number): Promise<number> {
    if (path.basename(this.pathOf(fd)).startsWith('metadata.')) this.pageReads += 1;
    return super.read(fd, target, positionBytes);
  }

  override readCached(fd: number, target: Uint8Array, positionBytes: number): number {
    const bytesRead = super.readCached(fd, target, positionBytes);
    if (bytesRead === target.length && path.basename(this.pathOf(fd)).startsWith('metadata.')) this.pageReads += 1;
    return bytesRead;
  }
}

async function readBlock(pool: Pool, volume: string, index: number): Promise<number> {
  const device = pool.openVolume(volume);
  try {
    const out = Buffer.alloc(4096);
    await device.read(index * 4096, out);
    assert.ok(out.every((byte) => byte === out[0]), `block ${index} of ${volume} is one fill`);
    return out[0]!;
  } finally {
    await device.close();
  }
}

test('a paged pool keeps its kind, and a reopen reads its root and replays only the commits after the last checkpoint', async () => {
  await inScratch('paged-pool', async (directory) => {
    const files = new TestFiles();
    let pool = await open(directory, { files });
    await pool.createVolume('v', 4 * MiB);
    let volume = pool.openVolume('v');
    for (let i = 0; i < 3; i++) await volume.write(i * 4096, block(i + 1));
    await volume.flush();
    await pool.createSnapshot('v', 's');
    await pool.checkpoint();
    await volume.write(0, block(9));
    await volume.write(10 * 4096, block(10));
    await volume.flush();
    // The process dies (a clean close ends with a checkpoint: the next open would replay nothing).
    await killed(pool, files);

    const marker = JSON.parse(fs.readFileSync(markerPath(directory), 'utf8')) as { formatVersion: number; metadata: string };
    assert.deepEqual([marker.formatVersion, marker.metadata], [4, 'paged']);
    assert.ok(fs.existsSync(path.join(directory, 'metadata.0')) && fs.existsSync(path.join(directory, 'metadata.1')));
    assert.ok(!fs.existsSync(path.join(directory, 'checkpoint.0')), 'no whole checkpoint: the pages are the metadata');

    const lines: string[] = [];
    // No metadata option: the pool keeps the kind it was made with.
    pool = await Pool.open({ directory, log: (line) => lines.push(line) });
    try {
      assert.equal((await pool.status()).formatVersion, 4);
      assert.deepEqual(
        lines.filter((line) => line.includes('replayed')),
        [`pool ${directory}: replayed 2 journal records`],
        'the two writes after the checkpoint, not the creation, the first writes or the snapshot',
      );
      assert.deepEqual(await Promise.all([0, 1, 2, 10].map((i) => readBlock(pool, 'v', i))), [9, 2, 3, 10]);
      const snapshot = pool.openSnapshot('v', 's');
      const out = Buffer.alloc(4096);
      await snapshot.read(0, out);
      assert.equal(out[0], 1, 'the snapshot keeps what it held');
      await snapshot.close();
      assert.equal(pool.volumeInfo('v').allocatedBytes, 4 * 4096);
    } finally {
      await pool.close();
    }
    lines.length = 0;
    pool = await Pool.open({ directory, log: (line) => lines.push(line) });
    volume = pool.openVolume('v');
    await volume.write(11 * 4096, block(11));
    await volume.close();
    await pool.close();
    assert.deepEqual(lines.filter((line) => line.includes('replayed')), [], 'the open wrote a root covering what it replayed');
    pool = await Pool.open({ directory, log: (line) => lines.push(line) });
    assert.equal(await readBlock(pool, 'v', 11), 11);
    await pool.close();
    assert.deepEqual(lines.filter((line) => line.includes('replayed')), [], 'a clean close wrote a root covering the write after the open');
    const report = await fsckPool(directory);
    assert.ok(report.clean, report.errors.join('; '));
    assert.deepEqual([report.volumeCount, report.snapshotCount, report.mappedBytes], [1, 1, 5 * 4096 + 3 * 4096]);
  });
});

test('a failed page write at a checkpoint makes a paged pool refuse writes until a restart; reads go on; the restart has every acknowledged write', async () => {
  const files = new TestFiles([{ op: 'write', path: 'metadata.', nth: 1, code: 'EIO', armed: false }]);
  await inScratch('paged-pool', async (directory) => {
    const pool = await open(directory, { files: files as FileLayer });
    try {
      await pool.createVolume('v', 4 * MiB);
      const volume = pool.openVolume('v');
      await volume.write(0, block(1));
      await volume.flush();
      files.arm(0);
      await assert.rejects(pool.checkpoint(), (error) => error instanceof ChunkdError && error.code === 'EIO');
      assert.equal(files.fired(0), 1);
      assert.match((await pool.status()).failure ?? '', /refuses writes until the node restarts/);
      await assert.rejects(volume.write(4096, block(2)), (error) => error instanceof ChunkdError && error.code === 'EIO', 'writes are refused');
      assert.equal(await readBlock(pool, 'v', 0), 1, 'reads go on');
      await volume.close();
    } finally {
      await pool.close();
    }
    const again = await Pool.open({ directory, files: realFiles });
    try {
      assert.equal(await readBlock(again, 'v', 0), 1);
      assert.equal(await readBlock(again, 'v', 1), 0);
    } finally {
      await again.close();
    }
  });
});

test('fsck of a paged pool walks its maps: a chunk file cut short is damage', async () => {
  await inScratch('paged-pool', async (directory) => {
    const pool = await open(directory);
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    await volume.write(0, Buffer.alloc(64 * 1024, 5));
    await volume.close();
    await pool.createSnapshot('v', 's');
    await pool.close();
    assert.ok((await fsckPool(directory)).clean);
    fs.truncateSync(chunkFilePath(chunksDirectory(directory), 0), 8192);
    const report = await fsckPool(directory);
    assert.ok(!report.clean);
    assert.deepEqual(report.errors, ['chunk file 0 is 8192 bytes, shorter than its referenced chunks (65536)']);
  });
});

/** Volume `v` written whole, snapshot `a`, three blocks changed, snapshot `b`, then zeros and a trim. */
async function writeHistory(pool: Pool, sizeBytes = 64 * MiB): Promise<void> {
  await pool.createVolume('v', sizeBytes);
  const volume = pool.openVolume('v');
  const stride = 256 * 1024;
  // Distinct contents per write (and one write of zeros, which a digest leaves out as it leaves holes out).
  for (let offset = 0; offset < sizeBytes; offset += stride) await volume.write(offset, Buffer.alloc(stride, offset === 4 * stride ? 0 : (offset / stride) % 251 + 1));
  await volume.flush();
  await pool.createSnapshot('v', 'a');
  for (const index of changedBlocks(sizeBytes)) await volume.write(index * 4096, block(0xee));
  await volume.flush();
  await pool.createSnapshot('v', 'b');
  await volume.write(5 * 4096, block(0));
  await volume.trim(MiB, 64 * 1024);
  await volume.flush();
  await volume.close();
}

/** The blocks that differ between snapshots `a` and `b`: one near the start, one in the middle, one near the end. */
const changedBlocks = (sizeBytes: number): number[] => [100, sizeBytes / 8192, sizeBytes / 4096 - 384];
const diffCases: Array<[string | null, string | null]> = [
  ['a', 'b'],
  ['b', 'a'],
  ['a', null],
  ['b', null],
  [null, 'a'],
  [null, null],
];

/** A memory pool and a paged one, each in a fresh directory, open while `run` runs; the paged one's directory after. */
async function withPools(run: (memory: Pool, paged: Pool) => Promise<void>, after: (pagedDirectory: string) => Promise<void> = async () => {}): Promise<void> {
  await inScratch('paged-pool', async (memoryDirectory) => {
    await inScratch('paged-pool', async (directory) => {
      const memory = await Pool.open({ directory: memoryDirectory });
      const paged = await open(directory);
      try {
        await run(memory, paged);
      } finally {
        await memory.close();
        await paged.close();
      }
      await after(directory);
    });
  });
}

test('snapshot diffs and content digests of a paged pool equal a memory pool\'s for the same writes; a diff of a snapshot against its child reads only the pages that differ', { timeout: 60_000 }, async () => {
  await withPools(
    async (memory, paged) => {
      await writeHistory(memory);
      await writeHistory(paged);
      assert.deepEqual(await paged.diff('v', 'a', 'b'), changedBlocks(64 * MiB).map((virtualChunk) => ({ virtualChunk, chunkCount: 1 })));
      for (const [from, to] of diffCases) assert.deepEqual(await paged.diff('v', from, to), await memory.diff('v', from, to), `diff ${from} ${to}`);
      const digests = await Promise.all(['a', 'b', null].map((snapshot) => paged.contentDigest('v', snapshot)));
      for (const [i, snapshot] of ['a', 'b', null].entries()) assert.ok(digests[i]!.equals(await memory.contentDigest('v', snapshot)), `digest of ${snapshot}`);
      assert.equal(new Set(digests.map((digest) => digest.toString('hex'))).size, 3, 'three contents, three digests');
    },
    async (directory) => {
      // Cold: every page read counted. The two snapshots share all but the paths to three leaves.
      const files = new CountingFiles();
      const pool = await open(directory, { files });
      try {
        let reads = files.pageReads;
        assert.equal((await pool.diff('v', 'a', 'b')).length, 3);
        const small = files.pageReads - reads;
        reads = files.pageReads;
        const whole = await pool.diff('v', null, 'a');
        assert.deepEqual(whole, [{ virtualChunk: 0, chunkCount: 16_384 }]);
        const all = files.pageReads - reads;
        assert.ok(all >= 64, `a diff against an empty map reads every leaf (${all} pages)`);
        assert.ok(small <= 16, `a diff of a snapshot against its child reads the paths that differ: ${small} pages (${all} for the whole map)`);
      } finally {
        await pool.close();
      }
    },
  );
});

test('what each snapshot holds alone is the same on a paged pool as on a memory pool, after the same writes, snapshots and a clone', { timeout: 60_000 }, async () => {
  const held = async (pool: Pool, volume: string): Promise<Array<[string, number]>> => (await pool.countedSnapshots(volume)).map((s) => [s.name, s.uniqueBytes]);
  await withPools(async (memory, paged) => {
    const steps: Array<(pool: Pool) => Promise<void>> = [
      (pool) => writeHistory(pool),
      async (pool) => {
        await pool.cloneSnapshot('v', 'a', 'c');
        const clone = pool.openVolume('c');
        await clone.write(100 * 4096, block(0x77));
        await pool.createSnapshot('c', 'x');
        await clone.write(32 * MiB, Buffer.alloc(MiB, 0x55));
        await pool.createSnapshot('c', 'y');
        await clone.write(32 * MiB, Buffer.alloc(64 * 1024, 0x66));
        await clone.close();
      },
      (pool) => pool.removeSnapshot('c', 'x'),
    ];
    const expected = [
      // a alone holds the three blocks changed after it; b shares all it holds with v, or with a and v.
      { v: [['a', 3 * 4096], ['b', 0]] },
      // The clone c of a changed one of the three, then (after x) a MiB over another: x holds that one's old
      // block with a; y holds alone the 64 KiB c wrote over since.
      { v: [['a', 4096], ['b', 0]], c: [['x', 0], ['y', 64 * 1024]] },
      // x removed: a alone holds the block it shared with x.
      { v: [['a', 2 * 4096], ['b', 0]], c: [['y', 64 * 1024]] },
    ];
    for (const [i, step] of steps.entries()) {
      await step(memory);
      await step(paged);
      for (const [volume, figures] of Object.entries(expected[i]!)) {
        assert.deepEqual(await held(memory, volume), figures, `memory, step ${i}, ${volume}`);
        assert.deepEqual(await held(paged, volume), figures, `paged, step ${i}, ${volume}`);
      }
    }
    const [info] = await paged.countedSnapshots('c', 'y');
    assert.deepEqual([info!.name, info!.uniqueBytes], ['y', 64 * 1024]);
    await assert.rejects(paged.countedSnapshots('c', 'x'), (error: ChunkdError) => error.code === 'ENOENT');
  });
});

/** Sends `v@snapshot` (from `base`, or whole) out of `source` and receives it into `target`'s volume `into`. */
async function stream(source: Pool, target: Pool, into: string, snapshot: string, base: string | null): Promise<void> {
  const prepared = await prepareSend(source, { volume: 'v', snapshot, from: base, resumeOffsetBytes: 0 }, () => {});
  async function* bytes(): AsyncGenerator<Buffer> {
    for await (const record of prepared.records) yield* record;
  }
  // The receiver checks the stream's digest (the sender's catalog's) against its own before the snapshot appears.
  const received = await new StreamReceiver(target, () => {}).receive(into, bytes());
  assert.deepEqual([received.snapshot, received.full], [snapshot, base === null]);
  assert.ok((await target.contentDigest(into, snapshot)).equals(await source.contentDigest('v', snapshot)));
  assert.ok((await exportBytes(target, into, snapshot)).equals(await exportBytes(source, 'v', snapshot)), `${into}@${snapshot} holds what v@${snapshot} holds`);
}

/** The bytes of a volume, or of one of its snapshots. */
async function exportBytes(pool: Pool, volume: string, snapshot: string | null): Promise<Buffer> {
  const device = snapshot === null ? pool.openVolume(volume) : pool.openSnapshot(volume, snapshot);
  try {
    const out = Buffer.alloc(pool.volumeInfo(volume).sizeBytes);
    await device.read(0, out);
    return out;
  } finally {
    await device.close();
  }
}

test('replication streams go from a memory pool into a paged one and back, full and incremental: the digests agree and the data arrives', { timeout: 60_000 }, async () => {
  await withPools(async (memory, paged) => {
    await writeHistory(memory, 16 * MiB);
    await stream(memory, paged, 'v', 'a', null);
    await stream(memory, paged, 'v', 'b', 'a');
    assert.deepEqual(await paged.diff('v', 'a', 'b'), await memory.diff('v', 'a', 'b'));
    // Back: a change made on the paged side, as an increment into the memory pool (at b again), and whole.
    const device = paged.openVolume('v');
    await device.write(7 * 4096, block(0x42));
    await device.close();
    await paged.createSnapshot('v', 'c');
    await memory.rollbackVolume('v', 'b');
    await stream(paged, memory, 'v', 'c', 'b');
    await stream(paged, memory, 'copy', 'c', null);
    assert.ok((await exportBytes(memory, 'v', null)).equals(await exportBytes(paged, 'v', null)));
  });
});

test('scrub of a paged pool reads each chunk of a volume and its snapshots once, and reports a damaged one in every export that names it', async () => {
  await inScratch('paged-pool', async (directory) => {
    const pool = await open(directory);
    try {
      await pool.createVolume('v', 4 * MiB);
      const volume = pool.openVolume('v');
      await volume.write(0, Buffer.alloc(16 * 4096, 5));
      await volume.flush();
      await pool.createSnapshot('v', 's');
      await volume.write(0, block(6));
      await volume.flush();
      const clean = await pool.scrub('v');
      assert.deepEqual([clean.checkedBytes, clean.badChunks, clean.exports], [17 * 4096, 0, ['v', 'v@s']]);
      // The fresh pool's first write took chunks 0 to 15: chunk 3 is block 3 of both the volume and the snapshot.
      const fd = fs.openSync(chunkFilePath(chunksDirectory(directory), 0), 'r+');
      fs.writeSync(fd, Buffer.from([0xff, 0x00, 0xff]), 0, 3, 3 * 4096 + 100);
      fs.closeSync(fd);
      const damaged = await pool.scrub('v');
      assert.equal(damaged.badChunks, 1);
      assert.deepEqual(damaged.badExtents, [
        { export: 'v', offsetBytes: 3 * 4096, lengthBytes: 4096 },
        { export: 'v@s', offsetBytes: 3 * 4096, lengthBytes: 4096 },
      ]);
      await volume.close();
    } finally {
      await pool.close();
    }
  });
});

test('control verbs called at once on a paged pool each see what those before them did: distinct ids, one of two same names refused', async () => {
  await inScratch('paged-pool', async (directory) => {
    const pool = await open(directory);
    try {
      await Promise.all(['a', 'b', 'c'].map((name) => pool.createVolume(name, 4 * MiB)));
      await Promise.all([pool.createSnapshot('a', 's'), pool.createSnapshot('b', 's'), pool.cloneSnapshot('a', 's', 'd').catch((error: unknown) => error)]);
      const results = await Promise.allSettled([pool.createVolume('e', 4 * MiB), pool.createVolume('e', 4 * MiB)]);
      assert.deepEqual(results.map((r) => r.status).sort(), ['fulfilled', 'rejected']);
      assert.equal((results.find((r) => r.status === 'rejected') as PromiseRejectedResult).reason.code, 'EEXIST');
      const status = await pool.status();
      assert.equal(status.failure, null, 'no record was refused at its apply');
      assert.deepEqual(pool.listVolumes().map((v) => v.name), ['a', 'b', 'c', 'd', 'e']);
    } finally {
      await pool.close();
    }
  });
});

test('a byte of a paged pool\'s metadata flipped in one copy (every 509th byte of each, in turn): the pool opens and reads back every block, its volume\'s and its snapshot\'s', { timeout: 120_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    let pool = await open(directory, { metadataCacheBytes: 16 * 1024 });
    await pool.createVolume('v', 4 * MiB);
    let volume = pool.openVolume('v');
    for (let i = 0; i < 48; i++) await volume.write(i * 8192, block(i + 1));
    await pool.createSnapshot('v', 's');
    for (let i = 0; i < 48; i += 3) await volume.write(i * 8192, block(100 + i));
    await volume.close();
    await pool.checkpoint();
    await pool.close();
    const contents = async (opened: Pool): Promise<Buffer> => {
      const out = Buffer.alloc(2 * 48 * 8192);
      const device = opened.openVolume('v');
      await device.read(0, out.subarray(0, 48 * 8192));
      await device.close();
      const snapshot = opened.openSnapshot('v', 's');
      await snapshot.read(0, out.subarray(48 * 8192));
      await snapshot.close();
      return out;
    };
    // The metadata files as the clean close left them: each trial starts from them (an open starts a generation).
    const metadataFiles = (): string[] => fs.readdirSync(directory).filter((name) => /^(metadata\.\d|journal-\d+\.\d)$/.test(name));
    const pristine = new Map(metadataFiles().map((name) => [name, fs.readFileSync(path.join(directory, name))]));
    pool = await Pool.open({ directory });
    const expected = await contents(pool);
    await pool.close();
    let trials = 0;
    for (const copy of ['metadata.0', 'metadata.1']) {
      for (let at = 0; at < pristine.get(copy)!.length; at += 509) {
        for (const name of metadataFiles()) fs.rmSync(path.join(directory, name));
        for (const [name, bytes] of pristine) fs.writeFileSync(path.join(directory, name), bytes);
        const damaged = Buffer.from(pristine.get(copy)!);
        damaged[at]! ^= 0x5a;
        fs.writeFileSync(path.join(directory, copy), damaged);
        pool = await Pool.open({ directory, metadataCacheBytes: 16 * 1024 });
        try {
          assert.ok((await contents(pool)).equals(expected), `${copy} byte ${at} flipped: the pool reads what it held`);
        } finally {
          await pool.close();
        }
        trials += 1;
      }
    }
    assert.ok(trials > 40, `${trials} trials`);
  });
});

test('a paged open reads no page of chunk counts: the free chunks below the top are punched out after it, beside writes, never one a record names', { timeout: 60_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    // 12 pages of counts (2,032 chunks each), each with one free chunk in it: 12 part-free pages.
    const pages = 12;
    const perPage = 2032;
    let pool = await open(directory);
    await pool.createVolume('v', pages * perPage * 4096);
    let volume = pool.openVolume('v');
    const mebibyte = Buffer.alloc(MiB, 1);
    for (let offset = 0; offset < pages * perPage * 4096; offset += MiB) await volume.write(offset, mebibyte.subarray(0, Math.min(MiB, pages * perPage * 4096 - offset)));
    const freed = Array.from({ length: pages }, (_, page) => page * perPage + 1000);
    for (const chunk of freed) await volume.trim(chunk * 4096, 4096);
    await volume.close();
    await pool.close();
    // Data no metadata names in the free chunks (writes a crash left uncommitted); written in order, so a
    // volume's chunk sits at its own index.
    const plant = (): void => {
      const fd = fs.openSync(chunkFilePath(chunksDirectory(directory), 0), 'r+');
      for (const chunk of freed) fs.writeSync(fd, block(0xee), 0, 4096, chunk * 4096);
      fs.closeSync(fd);
    };
    const planted = (): number => {
      const fd = fs.openSync(chunkFilePath(chunksDirectory(directory), 0), 'r');
      const out = Buffer.alloc(4096);
      const found = freed.filter((chunk) => fs.readSync(fd, out, 0, 4096, chunk * 4096) === 4096 && out[0] === 0xee).length;
      fs.closeSync(fd);
      return found;
    };
    plant();

    const files = new CountingFiles();
    pool = await open(directory, { files });
    const readsAtOpen = files.pageReads;
    // Before: the open read every part-free page of counts (20 reads here, against 10 now), as many as the pool had.
    assert.ok(readsAtOpen < pages, `the open read ${readsAtOpen} metadata pages (${pages} pages of counts are part free)`);
    await pool.freeSpacePunched();
    assert.equal(planted(), 0, 'the background punch gave the unnamed chunks back');
    assert.ok(files.pageReads >= readsAtOpen + pages / 2, `the punch read the part-free pages of counts after the open (${readsAtOpen}, then ${files.pageReads})`);
    await pool.close();

    // Writes at once with the punch (they take the free chunks it holds, or others): every one reads back,
    // after the punch ended and after a reopen.
    plant();
    const killable = new TestFiles();
    pool = await open(directory, { files: killable });
    volume = pool.openVolume('v');
    const targets = [...freed, ...freed.map((chunk) => chunk + 7)];
    await Promise.all(targets.map((chunk, index) => volume.write(chunk * 4096, block(index + 2))));
    await volume.flush();
    await pool.freeSpacePunched();
    for (const [index, chunk] of targets.entries()) assert.equal(await readBlock(pool, 'v', chunk), index + 2, `block ${chunk}`);
    await volume.close();
    await killed(pool, killable);
    pool = await open(directory);
    try {
      await pool.freeSpacePunched();
      for (const [index, chunk] of targets.entries()) assert.equal(await readBlock(pool, 'v', chunk), index + 2, `block ${chunk} after a replay`);
      assert.equal(await readBlock(pool, 'v', 5), 1);
    } finally {
      await pool.close();
    }
    const report = await fsckPool(directory);
    assert.ok(report.clean, report.errors.join('; '));
  });
});

test('a replay applies consecutive map records of one volume in one batch, and every other record alone, in order', () => {
  const map = (volumeId: number, virtualChunk: number): MetaRecord => ({ type: 'map', volumeId, virtualChunk, physicalChunk: virtualChunk, chunkCount: 1, sums: Uint32Array.of(0) });
  const records: MetaRecord[] = [
    map(1, 0),
    map(1, 5),
    map(2, 0),
    { type: 'snapshot', volumeId: 1, snapshotId: 1, name: 's', createdAtMs: 1 },
    map(1, 5),
    { type: 'unmap', volumeId: 1, virtualChunk: 0, chunkCount: 1 },
    ...Array.from({ length: replayBatchRecords + 1 }, (_, i) => map(1, i)),
  ];
  const batches = replayBatches(records);
  assert.deepEqual(batches.flat(), records, 'every record once, in order');
  assert.deepEqual(
    batches.map((batch) => batch.length),
    [2, 1, 1, 1, 1, replayBatchRecords, 1],
  );
});

test('map nodes changed since the last checkpoint past their memory limit start a checkpoint, the journal far from full; a crash then loses nothing', { timeout: 60_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    // 3,000 writes at random into 4 GiB: about 20 leaves changed, 120 KB of journal (a checkpoint at 2 MiB).
    const blocks = (4 * 1024 * MiB) / 4096;
    const random = makeRandom(15);
    const indexes = Array.from({ length: 3000 }, () => Math.floor(random() * blocks));
    const checkpointsAfter = async (dirtyBytes: number | undefined, at: string, files?: TestFiles): Promise<{ pool: Pool; checkpoints: number }> => {
      const pool = await open(at, { files, metadataDirtyBytes: dirtyBytes });
      await pool.createVolume('v', blocks * 4096);
      const volume = pool.openVolume('v');
      for (const [i, index] of indexes.entries()) await volume.write(index * 4096, block(1 + (i % 250)));
      await volume.flush();
      await volume.close();
      return { pool, checkpoints: (await pool.status()).checkpointsTotal };
    };
    const plain = await checkpointsAfter(undefined, `${directory}-default`);
    await plain.pool.close();
    fs.rmSync(`${directory}-default`, { recursive: true, force: true });
    assert.equal(plain.checkpoints, 0, 'the default limit (16 MiB at least) is not reached: only a full journal would start one');
    // 64 KiB: the memory of six full leaves.
    const files = new TestFiles();
    const limited = await checkpointsAfter(64 * 1024, directory, files);
    assert.ok(limited.checkpoints >= 2, `${limited.checkpoints} checkpoints started by the dirty nodes' memory`);
    await killed(limited.pool, files);
    const reopened = await open(directory);
    try {
      const last = new Map(indexes.map((index, i) => [index, 1 + (i % 250)]));
      for (const [index, fill] of [...last].slice(0, 300)) assert.equal(await readBlock(reopened, 'v', index), fill, `block ${index}`);
    } finally {
      await reopened.close();
    }
  });
});

/** Test files whose page file syncs (metadata.0, .1) wait while `held`: a checkpoint stuck behind a slow disk. */
class SlowCheckpointFiles extends TestFiles {
  #release: (() => void) | null = null;
  #gate: Promise<void> | null = null;
  hold(): void {
    this.#gate = new Promise((resolve) => (this.#release = resolve));
  }
  let(): void {
    this.#release?.();
    this.#gate = null;
  }
  /** The held syncs fail (EIO) when let go, and every later one of the page file. */
  failing = false;
  override fdatasync(fd: number): Promise<void> {
    const gate = this.#gate;
    const sync = (): Promise<void> => (this.failing ? Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' })) : super.fdatasync(fd));
    if (!path.basename(this.pathOf(fd)).startsWith('metadata.')) return super.fdatasync(fd);
    return gate !== null ? gate.then(sync) : sync();
  }
}

/**
 * A pool whose page file syncs are held (SlowCheckpointFiles), a checkpoint at 4 map nodes changed (writes held at
 * 16), and 8 writers of 6,000 writes at random into 4 GiB (about 45 leaves) started; it returns once the hold is
 * logged, or after 30 s (`heldLine` undefined), or once every write is done.
 */
async function writersBehindHeldCheckpoint(directory: string, seed: number) {
  const blocks = (4 * 1024 * MiB) / 4096;
  const random = makeRandom(seed);
  const indexes = Array.from({ length: 6_000 }, () => Math.floor(random() * blocks));
  const files = new SlowCheckpointFiles();
  const logged: string[] = [];
  const pool = await open(directory, { files, metadataCacheBytes: 4 * MiB, metadataDirtyPages: 4, log: (line) => logged.push(line) });
  await pool.createVolume('v', blocks * 4096);
  const volume = pool.openVolume('v');
  files.hold();
  const progress = { next: 0, done: 0 };
  const writing = Promise.allSettled(
    Array.from({ length: 8 }, async () => {
      while (progress.next < indexes.length) {
        const i = progress.next++;
        await volume.write(indexes[i]! * 4096, block(1 + (i % 250)));
        progress.done += 1;
      }
    }),
  );
  const held = (): string | undefined => logged.find((line) => line.startsWith('writes held'));
  for (let waited = 0; held() === undefined && progress.done < indexes.length && waited < 30_000; waited += 20) await sleep(20);
  return { pool, volume, files, indexes, progress, writing, heldLine: held() };
}

test('writes held behind a checkpoint whose sync fails are let go: each completes or fails, none waits for ever', { timeout: 60_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    const { pool, files, writing, heldLine } = await writersBehindHeldCheckpoint(directory, 22);
    try {
      assert.ok(heldLine !== undefined, 'writes held and logged');
      files.failing = true;
      files.let();
      const outcome = await Promise.race([writing.then(() => 'settled'), sleep(20_000).then(() => 'hung')]);
      assert.equal(outcome, 'settled', 'every writer settled once the checkpoint failed');
    } finally {
      files.let();
      await pool.close().catch(() => {});
    }
  });
});

test('while a checkpoint is behind, writes wait once the map nodes changed are four times past their limit, and go on once it is durable', { timeout: 60_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    const { pool, volume, files, indexes, progress, writing, heldLine } = await writersBehindHeldCheckpoint(directory, 21);
    try {
      assert.ok(heldLine !== undefined, `writes held and logged (${progress.done} of ${indexes.length} done)`);
      const dirty = Number(/(\d+) map nodes changed/.exec(heldLine)![1]);
      // 16 when the first write was held; the writes already past the gate (8 at most) change a leaf and its parent each.
      assert.ok(dirty >= 16 && dirty <= 16 + 8 * 2, `${dirty} map nodes changed when writes were held`);
      // The writes already past the gate (8 at most) may still complete; then none does.
      const atHold = progress.done;
      await sleep(300);
      assert.ok(progress.done - atHold <= 8, `at most the 8 writes past the gate complete after the hold (${atHold}, then ${progress.done})`);
      const stuck = progress.done;
      await sleep(300);
      assert.ok(progress.done === stuck && progress.done < indexes.length, `no write completes while the checkpoint is stuck (${stuck}, then ${progress.done})`);
      files.let();
      for (const outcome of await writing) assert.equal(outcome.status, 'fulfilled', String((outcome as PromiseRejectedResult).reason));
      await volume.flush();
      await volume.close();
      await lastFillsReadBack(pool, indexes);
    } finally {
      files.let();
      await pool.close();
    }
  });
});

test("map nodes changed since the last checkpoint past their count start a checkpoint whatever the cache: a crash leaves only the last checkpoints' records to replay, and loses nothing", { timeout: 60_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    // 6,000 writes at random into 4 GiB: about 30 leaves, all changed (a 2 MiB journal and a 64 MiB cache are far off).
    const blocks = (4 * 1024 * MiB) / 4096;
    const random = makeRandom(16);
    const indexes = Array.from({ length: 6000 }, () => Math.floor(random() * blocks));
    const files = new TestFiles();
    const pool = await open(directory, { files, metadataCacheBytes: 64 * MiB, metadataDirtyPages: 8 });
    await pool.createVolume('v', blocks * 4096);
    const volume = pool.openVolume('v');
    for (const [i, index] of indexes.entries()) await volume.write(index * 4096, block(1 + (i % 250)));
    await volume.flush();
    await volume.close();
    const checkpoints = (await pool.status()).checkpointsTotal;
    // At least two, not three: records go on applying while a checkpoint writes, and on a loaded machine the base
    // tree too saw two (1 run in 3 at a load of 20).
    assert.ok(checkpoints >= 2, `${checkpoints} checkpoints started by the count of changed map nodes`);
    await killed(pool, files);
    const copy = `${directory}-copy`;
    fs.cpSync(directory, copy, { recursive: true });
    try {
      // What the crash left: the records after the last durable root (all 6,000 without the bound; with it, those
      // of the last checkpoints' intervals, each a few records and what arrived while the one before it wrote),
      // and the nodes they change again (each read from the page file, the cache cold; about 25 without the bound).
      const replayed = await replayPaged(realFiles, copy, { cacheBytes: 64 * MiB });
      const changed = replayed.catalog.dirtyPages;
      await replayed.catalog.close();
      assert.ok(replayed.replayedRecords < 3000, `${replayed.replayedRecords} records replayed (${changed} map nodes)`);
    } finally {
      fs.rmSync(copy, { recursive: true, force: true });
    }
    const reopened = await open(directory);
    try {
      await lastFillsReadBack(reopened, indexes);
    } finally {
      await reopened.close();
    }
    const report = await fsckPool(directory);
    assert.ok(report.clean, report.errors.join('; '));
  });
});

test("the estimated cost of the replay a crash would leave starts a checkpoint: after a snapshot, the copies of its shared leaves count; a crash then replays a few times the bound at most and loses nothing", { timeout: 60_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    // 192 MiB written in 1 MiB writes (about 390 leaves, half full), a snapshot, then 600 writes of 4 KiB at
    // random: most land in a leaf the snapshot shares, copy it and count up its chunks (about 127 each). Far from
    // a 2 MiB journal, a 64 MiB cache's memory and the count bound of 8,192 nodes.
    const blocks = (256 * MiB) / 4096;
    const prefillWrites = 192;
    const random = makeRandom(17);
    const indexes = Array.from({ length: 600 }, () => Math.floor(random() * prefillWrites * 256));
    const boundUs = 6000;
    const run = async (at: string, files: TestFiles, replayCostMaxUs?: number): Promise<{ pool: Pool; checkpoints: number }> => {
      const pool = await open(at, { files, metadataCacheBytes: 64 * MiB, metadataReplayCostMaxUs: replayCostMaxUs });
      await pool.createVolume('v', blocks * 4096);
      const volume = pool.openVolume('v');
      for (let i = 0; i < prefillWrites; i++) await volume.write(i * MiB, Buffer.alloc(MiB, 255));
      await volume.flush();
      await pool.createSnapshot('v', 's');
      const before = (await pool.status()).checkpointsTotal;
      for (const [i, index] of indexes.entries()) await volume.write(index * 4096, block(1 + (i % 250)));
      await volume.flush();
      await volume.close();
      return { pool, checkpoints: (await pool.status()).checkpointsTotal - before };
    };
    const plainFiles = new TestFiles();
    const plain = await run(`${directory}-default`, plainFiles);
    await killed(plain.pool, plainFiles);
    assert.equal(plain.checkpoints, 0, 'the default bound is far: nothing starts a checkpoint');
    // Everything since the pool's creation is left to replay: the prefill's chunks counted up once each, each 4 KiB
    // write's chunk up and the one it replaces down, and the copies of the shared leaves (about 300, 127 chunks each).
    const unbounded = await replayPaged(realFiles, `${directory}-default`, { cacheBytes: 64 * MiB });
    const unboundedLoad = unbounded.catalog.replayLoad;
    await unbounded.catalog.close();
    fs.rmSync(`${directory}-default`, { recursive: true, force: true });
    assert.ok(unboundedLoad.countChanges > prefillWrites * 256 + 2 * indexes.length + 10_000, `the copies of shared leaves counted: ${JSON.stringify(unboundedLoad)}`);
    const files = new TestFiles();
    const bounded = await run(directory, files, boundUs);
    // Records go on applying while a checkpoint writes (more of them on a loaded machine): at least two, not a count.
    assert.ok(bounded.checkpoints >= 2, `${bounded.checkpoints} checkpoints after the snapshot started by the replay's estimated cost`);
    await killed(bounded.pool, files);
    const copy = `${directory}-copy`;
    fs.cpSync(directory, copy, { recursive: true });
    try {
      // The replay does again what the records since the last durable root did: its estimate is what the crash left.
      const replayed = await replayPaged(realFiles, copy, { cacheBytes: 64 * MiB });
      const load = replayed.catalog.replayLoad;
      const costUs = replayed.catalog.replayCostUs;
      await replayed.catalog.close();
      assert.equal(load.records, replayed.replayedRecords);
      assert.ok(costUs < 3 * boundUs + 4000, `a replay estimated at ${Math.round(costUs)} us (${JSON.stringify(load)})`);
      assert.ok(replayed.replayedRecords < indexes.length / 2, `${replayed.replayedRecords} records replayed (${JSON.stringify(load)})`);
    } finally {
      fs.rmSync(copy, { recursive: true, force: true });
    }
    const reopened = await open(directory);
    try {
      await lastFillsReadBack(reopened, indexes);
      const snapshot = reopened.openSnapshot('v', 's');
      try {
        const out = Buffer.alloc(4096);
        for (const index of indexes.slice(0, 100)) {
          await snapshot.read(index * 4096, out);
          assert.ok(out.every((byte) => byte === 255), `block ${index} of the snapshot`);
        }
      } finally {
        await snapshot.close();
      }
    } finally {
      await reopened.close();
    }
    const report = await fsckPool(directory);
    assert.ok(report.clean, report.errors.join('; '));
  });
});

test("a replay after a crash over a cold cache builds what was written, whether its prefetch reads every page a batch visits or stops at the cache's size", { timeout: 60_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    const files = new TestFiles();
    const blocks = 16384;
    /** The fill of each block written, in the order written. */
    const model = new Map<number, number>();
    const writeAtRandom = async (pool: Pool, count: number, seed: number, fills: number): Promise<void> => {
      const volume = pool.openVolume('v');
      for (let i = 0; i < count; i++) {
        // The second call rewrites blocks the first wrote (other fills), and writes blocks it did not.
        const index = ((i + seed) * 7919) % blocks;
        const fill = 1 + ((i + fills) % 250);
        await volume.write(index * 4096, block(fill));
        model.set(index, fill);
      }
      await volume.flush();
      await volume.close();
    };
    let pool = await open(directory, { files });
    await pool.createVolume('v', blocks * 4096);
    await writeAtRandom(pool, 3000, 0, 0);
    // A clean close: the leaves of those writes are on disk under the root, none in any cache after it.
    await pool.close();
    pool = await open(directory, { files });
    await writeAtRandom(pool, 1500, 2000, 77);
    // The map as the live pool had it: each mapped chunk's checksum by its place in the volume (content-digest.ts).
    const digest = await pool.contentDigest('v', null);
    await killed(pool, files);

    // Over a cache that holds every page a batch visits (the prefetch reads them all, and the pages of chunk counts),
    // and over one of 4 pages (the prefetch stops at a level that would not fit: the pass reads the rest; the batch
    // is cut in halves, down to replayBatchRecordsMin, applied in order).
    for (const [cacheBytes, prefetches] of [[MiB, true], [16 * 1024, false]] as const) {
      const copy = `${directory}-${cacheBytes}`;
      fs.cpSync(directory, copy, { recursive: true });
      try {
        const replayed = await replayPaged(realFiles, copy, { cacheBytes });
        const { prefetchedPages } = replayed;
        const { passRestarts } = replayed.catalog.pageReads;
        await replayed.catalog.close();
        // Read ahead whole, the pages of counts with the map's, a batch's pass runs once (1 restart before the
        // pages of page counts were read ahead). Over 4 pages the batch is cut in halves (none fits) and passes read.
        if (prefetches) assert.equal(passRestarts, 0, `passes started over with a cache of ${cacheBytes} bytes`);
        assert.equal(replayed.replayedRecords > 1000, true, `${replayed.replayedRecords} records replayed`);
        assert.equal(prefetchedPages > 1, prefetches, `${prefetchedPages} pages read ahead with a cache of ${cacheBytes} bytes`);
        const reopened = await open(copy, { metadataCacheBytes: cacheBytes });
        try {
          assert.ok((await reopened.contentDigest('v', null)).equals(digest), `the map replayed with a cache of ${cacheBytes} bytes is the live one`);
          // Every block written (the replay built the last 1,500) and every 97th of the others (holes).
          for (let index = 0; index < blocks; index++) {
            if (!model.has(index) && index % 97 !== 0) continue;
            assert.equal(await readBlock(reopened, 'v', index), model.get(index) ?? 0, `block ${index} with a cache of ${cacheBytes} bytes`);
          }
        } finally {
          await reopened.close();
        }
        const report = await fsckPool(copy);
        assert.ok(report.clean, report.errors.join('; '));
      } finally {
        fs.rmSync(copy, { recursive: true, force: true });
      }
    }
  });
});

test('a journal past its checkpoint size is committed and checkpointed without waiting for a FLUSH, so a crash replays about one journal at most', async () => {
  await inScratch('paged-pool', async (directory) => {
    const files = new TestFiles();
    const journalCheckpointBytes = 16 * 1024;
    // No background commit within the test: only the journal's size can start a commit before the FLUSH.
    let pool = await open(directory, { files, journalCheckpointBytes, backgroundCommitIntervalMs: 3_600_000 });
    await pool.createVolume('v', 64 * MiB);
    const volume = pool.openVolume('v');
    const writes = 2000; // about 80 KiB of records: five journals' worth
    for (let i = 0; i < writes; i++) await volume.write(((i * 7919) % 16384) * 4096, block(1 + (i % 250)));
    // The first commit starts at about 16 KiB of records, and the one after it takes every record that came
    // meanwhile (more than a journal's worth): both checkpoint. Without the trigger nothing commits until the FLUSH.
    for (let waitedMs = 0; (await pool.status()).checkpointsTotal < 2; waitedMs += 10) {
      assert.ok(waitedMs < 20_000, `${(await pool.status()).checkpointsTotal} checkpoints 20 s after the writes, before any FLUSH`);
      await sleep(10);
    }
    await volume.flush();
    await killed(pool, files);

    const lines: string[] = [];
    pool = await Pool.open({ directory, log: (line) => lines.push(line) });
    try {
      const replayed = lines.map((line) => /replayed (\d+) journal records/.exec(line)).find((match) => match !== null);
      const records = replayed === undefined ? 0 : Number(replayed[1]);
      // A record of one 4 KiB write is about 40 bytes: one journal holds about 400.
      assert.ok(records <= 2 * (journalCheckpointBytes / 40), `${records} records replayed of ${writes}`);
      for (let i = 0; i < writes; i += 97) assert.equal(await readBlock(pool, 'v', (i * 7919) % 16384), 1 + (i % 250));
    } finally {
      await pool.close();
    }
  });
});

/** Once `hold` is set, the metadata page files' fdatasyncs wait for `release` (a root write that takes its time). */
class PageSyncsHeld extends TestFiles {
  hold = false;
  readonly held: Array<() => void> = [];
  override fdatasync(fd: number): Promise<void> {
    if (!this.hold || !path.basename(this.pathOf(fd)).startsWith('metadata.')) return super.fdatasync(fd);
    return new Promise((resolve, reject) => this.held.push(() => super.fdatasync(fd).then(resolve, reject)));
  }
}

/** `count` 4 KiB writes into `v` (block `(first + i) * 7 % 4096`, fill `fill + i`), then a FLUSH; the model updated. */
async function writeFlushed(pool: Pool, model: Map<number, number>, first: number, count: number, fill: number): Promise<void> {
  const volume = pool.openVolume('v');
  for (let i = 0; i < count; i++) {
    const index = ((first + i) * 7) % 4096;
    await volume.write(index * 4096, block(1 + ((fill + i) % 250)));
    model.set(index, 1 + ((fill + i) % 250));
  }
  await volume.flush();
  await volume.close();
}

/** A pool with volume `v` of 16 MiB and `writes` blocks written and flushed (in `model`), then the process dies. */
async function crashedWith(directory: string, files: TestFiles, model: Map<number, number>, writes: number): Promise<void> {
  const pool = await open(directory, { files });
  await pool.createVolume('v', 16 * MiB);
  await writeFlushed(pool, model, 0, writes, 0);
  await killed(pool, files);
}

test('an open after a crash serves before the root covering its replay is durable; a crash before that root loses nothing acknowledged', async () => {
  await inScratch('paged-pool', async (directory) => {
    const files = new PageSyncsHeld();
    const model = new Map<number, number>();
    await crashedWith(directory, files, model, 300);
    let pool: Pool;

    // The root after the replay cannot become durable: the open still returns, and the pool serves.
    files.hold = true;
    const opened = await Promise.race([open(directory, { files }), sleep(20_000).then(() => null)]);
    assert.ok(opened !== null, 'the open returned while the root covering its replay was held');
    pool = opened;
    for (let waitedMs = 0; files.held.length === 0; waitedMs += 5) {
      assert.ok(waitedMs < 10_000, 'the root after the replay reached its fdatasync');
      await sleep(5);
    }
    const journals = journalGenerations(directory);
    assert.ok(journals.length >= 2, `the replayed journal stays until the root covering it is durable (journals ${journals.join(', ')})`);
    await writeFlushed(pool, model, 300, 200, 100);
    for (const [index, fill] of model) assert.equal(await readBlock(pool, 'v', index), fill, `block ${index} while the root is held`);
    // The crash before the root: the old root stands, with the replayed journal and the new one after it.
    await killed(pool, files);

    pool = await Pool.open({ directory, metadataCacheBytes: 64 * 1024 });
    try {
      for (const [index, fill] of model) assert.equal(await readBlock(pool, 'v', index), fill, `block ${index} after the crash`);
      await pool.freeSpacePunched();
    } finally {
      await pool.close();
    }
    const report = await fsckPool(directory);
    assert.ok(report.clean, report.errors.join('; '));
  });
});

/** Counts the writes to the metadata page files. */
class PageWritesCounted extends TestFiles {
  pageWrites = 0;
  override write(fd: number, data: Uint8Array, positionBytes: number): Promise<void> {
    if (path.basename(this.pathOf(fd)).startsWith('metadata.')) this.pageWrites += 1;
    return super.write(fd, data, positionBytes);
  }

  override writev(fd: number, parts: readonly Uint8Array[], positionBytes: number): Promise<void> {
    if (path.basename(this.pathOf(fd)).startsWith('metadata.')) this.pageWrites += 1;
    return super.writev(fd, parts, positionBytes);
  }
}

test("the root after an open's replay waits for metadataRootAfter (a node's start), unless a write or a close comes first: no page written meanwhile, nothing lost", async () => {
  await inScratch('paged-pool', async (directory) => {
    const files = new PageWritesCounted();
    const model = new Map<number, number>();
    await crashedWith(directory, files, model, 300);
    const neverBefore = async (pool: Pool, what: string): Promise<void> => {
      // Turns of the event loop and time enough for a root's encoding and writes (a few ms here) to begin.
      for (let i = 0; i < 20; i++) await sleep(5);
      assert.equal(files.pageWrites, 0, `no page written before ${what}`);
      assert.ok(journalGenerations(directory).length >= 2, 'the replayed journal stays: no root covers it yet');
      for (const [index, fill] of model) assert.equal(await readBlock(pool, 'v', index), fill, `block ${index} read before ${what}`);
    };

    // Released by the caller: the root is written then, and the replayed journal removed.
    files.pageWrites = 0;
    let release = (): void => {};
    let pool = await open(directory, { files, metadataRootAfter: new Promise<void>((resolve) => (release = resolve)) });
    await neverBefore(pool, 'the release');
    release();
    await pool.freeSpacePunched();
    assert.ok(files.pageWrites > 0, 'the root written once released');
    assert.equal(journalGenerations(directory).length, 1, 'the replayed journal removed once the root covering it is durable');
    await writeFlushed(pool, model, 300, 50, 100);
    await killed(pool, files);

    // Never released: the first write goes first (it would otherwise wait for the root, and a node's start may
    // wait for that write), and its FLUSH returns.
    files.pageWrites = 0;
    pool = await open(directory, { files, metadataRootAfter: new Promise<void>(() => {}) });
    await neverBefore(pool, 'a write');
    const flushed = await Promise.race([writeFlushed(pool, model, 350, 50, 150).then(() => true), sleep(20_000).then(() => false)]);
    assert.ok(flushed, 'a write and a FLUSH with the root still waiting for its release returned');
    await pool.freeSpacePunched();
    assert.ok(files.pageWrites > 0, 'the root written once a write came');
    await killed(pool, files);

    // Never released, nothing written: a close does not wait for the release.
    files.pageWrites = 0;
    pool = await open(directory, { files, metadataRootAfter: new Promise<void>(() => {}) });
    await neverBefore(pool, 'the close');
    const closed = await Promise.race([pool.close().then(() => true), sleep(20_000).then(() => false)]);
    assert.ok(closed, 'the close returned with the root still waiting for its release');

    pool = await open(directory, { files });
    try {
      for (const [index, fill] of model) assert.equal(await readBlock(pool, 'v', index), fill, `block ${index} after the last open`);
      await pool.freeSpacePunched();
    } finally {
      await pool.close();
    }
    const report = await fsckPool(directory);
    assert.ok(report.clean, report.errors.join('; '));
  });
});

test('a power cut at each step of an open, the root after its replay written beside the writes that follow: nothing acknowledged lost, fsck clean', { timeout: 120_000 }, async () => {
  await inScratch('paged-pool', async (base) => {
    const before = new Map<number, number>();
    await crashedWith(base, new TestFiles(), before, 200);

    /** One life over a copy of the crashed pool, cut at change `crashAt`: the blocks acknowledged, and the change count when the root was durable. */
    const life = async (directory: string, crashAt: number): Promise<{ acknowledged: Map<number, number>; changes: number; rootAtChange: number | null }> => {
      const cutFiles = new PowerLossFiles(directory, { crashAtChange: crashAt });
      const acknowledged = new Map(before);
      let rootAtChange: number | null = null;
      let live: Pool | null = null;
      const run = async (): Promise<void> => {
        live = await Pool.open({ directory, files: cutFiles, metadata: 'paged', metadataCacheBytes: 64 * 1024, log: (line) => {
          if (line.includes('root covering the replay written')) rootAtChange = cutFiles.inner.changeCount;
        } });
        // Writes right after the open, beside the root's: each round acknowledged by its FLUSH.
        for (let round = 0; round < 3 && !cutFiles.inner.frozen; round++) {
          const next = new Map(acknowledged);
          await writeFlushed(live, next, 1000 + round * 20, 20, 50 * (round + 1));
          for (const [index, fill] of next) acknowledged.set(index, fill);
        }
        await live.close();
        live = null;
      };
      await Promise.race([run().catch((error: unknown) => {
        if (!cutFiles.inner.frozen) throw error;
      }), cutFiles.inner.untilFrozen()]);
      const changes = cutFiles.inner.changeCount;
      cutFiles.inner.freeze();
      await (live as Pool | null)?.abandon();
      await cutFiles.cut(makeRandom(crashAt));
      return { acknowledged, changes, rootAtChange };
    };

    const check = async (directory: string, acknowledged: Map<number, number>, where: string): Promise<void> => {
      const report = await fsckPool(directory);
      assert.ok(report.clean, `${where}: ${report.errors.join('; ')}`);
      const reopened = await Pool.open({ directory, metadataCacheBytes: 64 * 1024 });
      try {
        for (const [index, fill] of acknowledged) assert.equal(await readBlock(reopened, 'v', index), fill, `${where}: block ${index}`);
      } finally {
        await reopened.close();
      }
    };

    // A life with no cut: how many changes it makes, and at which the root after the replay was durable.
    const whole = `${base}-whole`;
    fs.cpSync(base, whole, { recursive: true });
    const full = await life(whole, Number.MAX_SAFE_INTEGER);
    fs.rmSync(whole, { recursive: true, force: true });
    assert.ok(full.rootAtChange !== null, 'the root after the replay was written');
    // Cuts from the open's first change to a few past the root's, in at most 12 steps.
    const last = full.rootAtChange + 8;
    const stride = Math.max(1, Math.ceil(last / 12));
    let cutsBeforeRoot = 0;
    for (let crashAt = 1; crashAt <= last; crashAt += stride) {
      const directory = `${base}-${crashAt}`;
      fs.cpSync(base, directory, { recursive: true });
      try {
        const { acknowledged, changes } = await life(directory, crashAt);
        if (changes < full.rootAtChange) cutsBeforeRoot += 1;
        await check(directory, acknowledged, `cut at change ${crashAt}`);
      } finally {
        fs.rmSync(directory, { recursive: true, force: true });
      }
    }
    console.log(`# ${cutsBeforeRoot} cuts before the root after the replay was durable (at change ${full.rootAtChange} of ${full.changes}), stride ${stride}`);
    assert.ok(cutsBeforeRoot > 5, `${cutsBeforeRoot} cuts before the root was durable`);
  });
});

/** Which metadata pages the durable root leaves free, and whether each page below the mark is free or named once. */
async function metadataPages(directory: string): Promise<{ nextPage: number; free: Set<number>; mapPages: Set<number> }> {
  const { catalog } = await replayPaged(realFiles, directory, { cacheBytes: MiB });
  try {
    const walk = await walkMaps(catalog);
    const pages = catalog.space.pages;
    const mapPages = new Set<number>();
    for (let page = firstDataPage; page < pages.nextPage; page++) if (walk.pageRefs.get(page) !== 0) mapPages.add(page);
    const { nextPage, free: freeList } = pages.state();
    const free = new Set(freeList);
    const named = new Map<number, string>();
    for (const [what, list] of [['free', freeList], ['a map page', [...mapPages]], ['a page of the space maps', catalog.space.ownedPages()], ['a page of the table', catalog.tablePages]] as const) {
      for (const page of list) {
        if (named.has(page)) assert.fail(`page ${page} is ${what} and ${named.get(page)}`);
        named.set(page, what);
      }
    }
    for (let page = firstDataPage; page < nextPage; page++) if (!named.has(page)) assert.fail(`page ${page} is neither free nor named (lost)`);
    assert.equal(pages.waitingCount, 0);
    return { nextPage, free, mapPages };
  } finally {
    await catalog.close();
  }
}

test('a volume of many map pages removed: its pages free after a reopen, reused by the next writes (none lost, none twice), fsck clean', { timeout: 120_000 }, async () => {
  await inScratch('paged-pool', async (directory) => {
    const write = async (pool: Pool, name: string, seed: number): Promise<void> => {
      await pool.createVolume(name, 64 * MiB);
      const volume = pool.openVolume(name);
      // Every other 4 KiB block of 32 MiB, in 1 MiB writes of 128 runs: a map entry a run, some 60 leaves.
      const buffer = Buffer.alloc(4096, seed);
      for (let offset = 0; offset < 32 * MiB; offset += 8192) await volume.write(offset, buffer);
      await volume.close();
    };
    let pool = await open(directory);
    await write(pool, 'big', 1);
    await write(pool, 'keep', 2);
    await pool.close();
    const before = await metadataPages(directory);

    pool = await open(directory);
    await pool.removeVolume('big');
    await pool.close();
    const afterRemove = await metadataPages(directory);
    const freed = [...before.mapPages].filter((page) => !afterRemove.mapPages.has(page));
    assert.ok(freed.length >= 25, `the removed volume's map held ${freed.length} pages`);
    for (const page of freed) assert.ok(afterRemove.free.has(page), `the removed volume's map page ${page} free after a reopen`);
    assert.ok(afterRemove.nextPage <= before.nextPage + 8, `the mark ${before.nextPage} to ${afterRemove.nextPage}`);

    pool = await open(directory);
    await write(pool, 'again', 3);
    await pool.close();
    const afterWrite = await metadataPages(directory);
    assert.ok(afterWrite.nextPage <= afterRemove.nextPage + 8, `the free pages reused: the mark ${afterRemove.nextPage} to ${afterWrite.nextPage}`);
    assert.ok(freed.filter((page) => afterWrite.mapPages.has(page)).length >= freed.length / 2, 'the removed volume\'s pages hold the new one\'s map');
    const report = await fsckPool(directory);
    assert.ok(report.clean, report.errors.join('; '));
    pool = await open(directory);
    assert.equal(await readBlock(pool, 'again', 0), 3);
    assert.equal(await readBlock(pool, 'keep', 2), 2);
    await pool.close();
  });
});

// Writes into leaves that snapshots and clones share, over counts kept in pages and a small cache: the in-place
// path copies such a leaf alone when the nodes above it are dirty (paged-map.ts #mapInPlace), the pass copies the
// path otherwise. Against a memory pool given the same writes, snapshots, clones and removals, with checkpoints,
// clean reopens and crashes of the paged one between them: every volume and snapshot reads the same, fsck finds
// nothing wrong, and once everything is removed nothing is left (no count off by one). 8 MiB volumes (over 253
// chunks a leaf, several leaves under interior nodes, so the path above a shared leaf can be dirty).
test('writes into leaves snapshots and clones share, with checkpoints, reopens and crashes: the same content as a memory pool, fsck clean, nothing left after removal', { timeout: 120_000 }, async () => {
  const random = makeRandom(testSeed('shared leaves written'));
  const sizeBytes = 8 * MiB;
  const blocks = sizeBytes / 4096;
  await inScratch('paged-pool', async (memoryDirectory) => {
    await inScratch('paged-pool', async (directory) => {
      let files = new TestFiles();
      const openPaged = (): Promise<Pool> => {
        files = new TestFiles();
        return open(directory, { files });
      };
      const memory = await Pool.open({ directory: memoryDirectory });
      let paged = await openPaged();
      const volumes = ['v'];
      const snapshots: Array<{ volume: string; name: string }> = [];
      let names = 0;
      const same = async (when: string): Promise<void> => {
        for (const volume of volumes) assert.deepEqual(await paged.contentDigest(volume, null), await memory.contentDigest(volume, null), `${when}: volume ${volume}`);
        for (const { volume, name } of snapshots) assert.deepEqual(await paged.contentDigest(volume, name), await memory.contentDigest(volume, name), `${when}: ${volume}@${name}`);
      };
      try {
        for (const pool of [memory, paged]) {
          await pool.createVolume('v', sizeBytes);
          const device = pool.openVolume('v');
          for (let offset = 0; offset < sizeBytes; offset += 256 * 1024) await device.write(offset, Buffer.alloc(256 * 1024, 1 + ((offset / 65536) % 200)));
          await device.flush();
          await device.close();
        }
        for (let step = 0; step < 300; step++) {
          const roll = randomInt(random, 100);
          if (roll < 70) {
            // Writes near each other (a few per leaf) and some anywhere.
            const volume = volumes[randomInt(random, volumes.length)]!;
            const writes = Array.from({ length: 1 + randomInt(random, 20) }, () => ({
              block: randomInt(random, 4) === 0 ? randomInt(random, blocks) : randomInt(random, 64) * 32 + randomInt(random, 3),
              fill: 1 + randomInt(random, 250),
            }));
            for (const pool of [memory, paged]) {
              const device = pool.openVolume(volume);
              for (const { block, fill } of writes) await device.write(block * 4096, Buffer.alloc(4096, fill));
              await device.flush();
              await device.close();
            }
          } else if (roll < 82) {
            const volume = volumes[randomInt(random, volumes.length)]!;
            const name = `s${names++}`;
            const uuid = names.toString(16).padStart(32, '0');
            for (const pool of [memory, paged]) await pool.createSnapshot(volume, name, uuid);
            snapshots.push({ volume, name });
          } else if (roll < 86 && snapshots.length > 0 && volumes.length < 5) {
            const { volume, name } = snapshots[randomInt(random, snapshots.length)]!;
            const clone = `c${names++}`;
            for (const pool of [memory, paged]) await pool.cloneSnapshot(volume, name, clone);
            volumes.push(clone);
          } else if (roll < 90 && snapshots.length > 2) {
            const [{ volume, name }] = snapshots.splice(randomInt(random, snapshots.length), 1) as [{ volume: string; name: string }];
            for (const pool of [memory, paged]) await pool.removeSnapshot(volume, name);
          } else if (roll < 94) {
            await paged.checkpoint();
          } else if (roll < 97) {
            if (randomInt(random, 2) === 0) await paged.close();
            else await killed(paged, files);
            paged = await openPaged();
          } else {
            await same(`step ${step}`);
          }
        }
        await same('at the end');
        await paged.close();
        const report = await fsckPool(directory);
        assert.ok(report.clean, report.errors.join('; '));
        paged = await openPaged();
        await same('reopened');
        for (const { volume, name } of snapshots) for (const pool of [memory, paged]) await pool.removeSnapshot(volume, name);
        snapshots.length = 0;
        for (const volume of volumes) for (const pool of [memory, paged]) await pool.removeVolume(volume);
        volumes.length = 0;
        await paged.close();
        const emptied = await fsckPool(directory);
        assert.ok(emptied.clean, emptied.errors.join('; '));
        assert.equal(emptied.mappedBytes, 0, 'nothing mapped once every volume and snapshot is removed');
        paged = await openPaged();
      } finally {
        await memory.close();
        await paged.close().catch(() => {});
      }
    });
  });
});
