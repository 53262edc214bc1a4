// The chunk files' extra space under a stream of overwrites is bounded when the disk is slower than the writes: the
// chunks an overwrite frees are reusable only after the commit that records the free, a commit's fdatasync takes
// as long as the disk needs for what the page cache holds dirty, and a write that found no reusable chunk went above
// the high-water mark. Writes now wait for the commit under way once the chunks freed and not yet reusable are
// twice what starts a commit (commit-engine.ts, `#spaceGate`). Here the chunk files' fdatasync is held (the
// slowest disk), the bound made small (freedChunksCommitMax: 1 MiB), and the files' span watched. Only frees in runs
// count: an overwrite of data written at random frees single chunks, which no large write's run fits, so waiting
// for them would only slow the writes.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, test } from 'vitest';
import { freedChunksHoldFactor } from '../../src/core/limits.ts';
import { DeferredFrees, freedRunChunksMin } from '../../src/store/allocator.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { Pool } from '../../src/store/pool.ts';

const MiB = 1024 * 1024;
const directories: string[] = [];
afterAll(() => {
  for (const directory of directories) fs.rmSync(directory, { recursive: true, force: true });
});

/** A pool whose chunk files' fdatasync waits while `hold()` is on; `release()` lets them go. */
async function poolWithSlowDisk(): Promise<{ pool: Pool; hold(): void; release(): void }> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-freed-'));
  directories.push(directory);
  const chunkFds = new Set<number>();
  let held: PromiseWithResolvers<void> | null = null;
  const files: FileLayer = {
    ...realFiles,
    open: async (file, mode) => {
      const fd = await realFiles.open(file, mode);
      if (file.endsWith('.chunk')) chunkFds.add(fd);
      return fd;
    },
    fdatasync: async (fd) => {
      if (chunkFds.has(fd) && held !== null) await held.promise;
      return realFiles.fdatasync(fd);
    },
  };
  const pool = await Pool.open({ directory, files, freedChunksCommitMax: MiB / 4096, backgroundCommitIntervalMs: 3_600_000 });
  return {
    pool,
    hold: () => {
      held = Promise.withResolvers<void>();
    },
    release: () => {
      held?.resolve();
      held = null;
    },
  };
}

/** Waits until `count()` stops changing for 200 ms. */
async function settledCount(count: () => number): Promise<number> {
  let seen = -1;
  while (seen !== count()) {
    seen = count();
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return seen;
}

test('freed chunks in runs are counted apart from single ones, as extents merge and commits take them', () => {
  const frees = new DeferredFrees();
  for (let i = 0; i < 10; i++) frees.add(1000 + 2 * i, 1, false); // singles, not touching
  assert.deepEqual([frees.count, frees.runCount], [10, 0]);
  for (let i = 0; i < freedRunChunksMin; i++) frees.add(5000 + i, 1, false); // one chunk at a time, merging into a run
  assert.deepEqual([frees.count, frees.runCount], [10 + freedRunChunksMin, freedRunChunksMin]);
  frees.add(5000 + freedRunChunksMin, 3, false); // a run growing
  frees.add(9000, freedRunChunksMin, true); // a run at once
  assert.deepEqual([frees.count, frees.runCount], [13 + 2 * freedRunChunksMin, 2 * freedRunChunksMin + 3]);
  const mark = frees.mark();
  frees.add(9000 + freedRunChunksMin, 4, true); // touches a sealed extent: a new one, a single-ish one
  frees.take(mark);
  assert.deepEqual([frees.count, frees.runCount], [4, 0]);
});

test('overwrites wait for the commit under way instead of growing the chunk files while a slow fdatasync holds the freed chunks', { timeout: 60_000 }, async () => {
  const { pool, hold, release } = await poolWithSlowDisk();
  try {
    const volumeBytes = 16 * MiB;
    await pool.createVolume('v', volumeBytes);
    const volume = pool.openVolume('v');
    for (let offset = 0; offset < volumeBytes; offset += MiB) await volume.write(offset, Buffer.alloc(MiB, 1));
    await volume.flush();
    const filled = (await pool.status()).chunkFilesBytes;

    // Four laps of overwrites at queue depth 4, lap n writing the byte n + 2.
    hold();
    const writes = 4 * (volumeBytes / MiB);
    let done = 0;
    let failed: unknown = null;
    const writer = async (first: number): Promise<void> => {
      for (let i = first; i < writes; i += 4) {
        await volume.write((i * MiB) % volumeBytes, Buffer.alloc(MiB, 2 + Math.floor(i / (volumeBytes / MiB))));
        done += 1;
      }
    };
    const writers = Promise.all([0, 1, 2, 3].map(writer)).catch((error: unknown) => {
      failed = error;
    });
    // The writes go on until the freed chunks reach the bound, then wait for the commit (held in its fdatasync).
    const deadline = Date.now() + 20_000;
    while ((await pool.status()).writesHeldForFreedSpaceTotal === 0 && done < writes && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    await settledCount(() => done);
    assert.equal(failed, null);
    // What is live, the freed chunks up to the bound, and the four writes in flight: the fresh chunks they took, and
    // the chunks they free after passing the bound. Not the laps (without the bound: 16 MiB more a lap).
    const boundBytes = filled + freedChunksHoldFactor * MiB + 2 * 4 * MiB;
    assert.ok(done < writes, `all ${writes} overwrites went on while the commit's fdatasync was held: nothing held them`);
    const spanWhileHeld = (await pool.status()).chunkFilesBytes;
    assert.ok(spanWhileHeld <= boundBytes, `chunk files at ${spanWhileHeld / MiB} MiB while the sync was held (${filled / MiB} MiB filled, ${done} of ${writes} overwrites done)`);
    assert.ok((await pool.status()).writesHeldForFreedSpaceTotal > 0);

    // The disk catches up: every write completes, the files grow no further than the bound allows, the data is the last lap's.
    release();
    await writers;
    assert.equal(failed, null);
    assert.equal(done, writes);
    await volume.flush();
    const spanAfter = (await pool.status()).chunkFilesBytes;
    assert.ok(spanAfter <= boundBytes, `chunk files at ${spanAfter / MiB} MiB after ${writes} MiB of overwrites into ${volumeBytes / MiB} MiB`);
    const back = Buffer.alloc(volumeBytes);
    await volume.read(0, back);
    assert.ok(back.every((byte) => byte === 5), 'the last lap (byte 5) is what reads back');
  } finally {
    release();
    await pool.close();
  }
});

test('overwrites of data written at random are not held: the single chunks they free fit no large write', { timeout: 60_000 }, async () => {
  const { pool, hold, release } = await poolWithSlowDisk();
  try {
    const volumeBytes = 8 * MiB;
    await pool.createVolume('v', volumeBytes);
    const volume = pool.openVolume('v');
    // Every 4 KiB block written once, in a shuffled order: consecutive in the files, scattered in the volume.
    const blocks = Array.from({ length: volumeBytes / 4096 }, (_, i) => i);
    for (let i = blocks.length - 1; i > 0; i--) {
      const j = (i * 7919) % (i + 1);
      [blocks[i], blocks[j]] = [blocks[j]!, blocks[i]!];
    }
    for (const block of blocks) await volume.write(block * 4096, Buffer.alloc(4096, 1));
    await volume.flush();
    hold();
    // One lap of 1 MiB overwrites at queue depth 4: each frees 256 chunks, nearly all single ones.
    const writes = volumeBytes / MiB;
    let done = 0;
    const writers = Promise.all([0, 1, 2, 3].map(async (first) => {
      for (let i = first; i < writes; i += 4) {
        await volume.write(i * MiB, Buffer.alloc(MiB, 2));
        done += 1;
      }
    }));
    // All of them complete while the fdatasync is still held (a held write would wait for it forever).
    await Promise.race([writers, new Promise((resolve) => setTimeout(resolve, 20_000))]);
    assert.equal(done, writes, `${done} of ${writes} overwrites done while the commit's fdatasync was held: single freed chunks held writes`);
    assert.equal((await pool.status()).writesHeldForFreedSpaceTotal, 0);
    release();
    await writers;
  } finally {
    release();
    await pool.close();
  }
});
