// Volume.writeMany as a replication receiver uses it (a stream's scattered records written as one run): each extent
// lands where it says with the checksums of its own chunks (reads verify them, after a reopen too), what lies
// between the extents is left alone, the bytes are taken before the first await (the receiver reuses its buffers at
// once), extents out of order are sorted, and extents that share a chunk are refused.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { Pool } from '../../src/store/pool.ts';
import type { Volume } from '../../src/store/volume.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const volumeBytes = 1024 * 1024;

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 7 + seed * 13 + (i >> 12)) & 0xff;
  return bytes;
}

async function expectVolume(volume: Volume, expected: Buffer): Promise<void> {
  const actual = Buffer.alloc(volumeBytes);
  await volume.read(0, actual);
  assert.ok(actual.equals(expected), `the volume differs from what was written at byte ${actual.findIndex((byte, i) => byte !== expected[i])}`);
}

/** Reopened: every chunk read is checked against the checksum recorded for it. */
async function expectAfterReopen(directory: string, expected: Buffer): Promise<void> {
  const pool = await Pool.open({ directory, ...testPoolOptions() });
  const volume = pool.openVolume('v');
  await expectVolume(volume, expected);
  await volume.close();
  await pool.close();
}

/**
 * A fresh pool with one volume "v" for `body`, which writes it and fills in `expected` (all zeros at first) as it
 * goes; then the volume and pool are closed and the volume, reopened, must read as `expected`.
 */
async function withVolume(prefix: string, body: (volume: Volume, expected: Buffer) => Promise<void>): Promise<void> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  try {
    const pool = await Pool.open({ directory, ...testPoolOptions() });
    await pool.createVolume('v', volumeBytes);
    const volume = pool.openVolume('v');
    const expected = Buffer.alloc(volumeBytes);
    await body(volume, expected);
    await volume.close();
    await pool.close();
    await expectAfterReopen(directory, expected);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

test('writeMany puts each extent in place with its own checksums, takes the bytes at once, and refuses extents that share a chunk', async () => {
  await withVolume('chunkd-extents-', async (volume, expected) => {
    // Mapped chunks under and between the extents, and a hole (the last 256 KiB stay unwritten).
    const first = pattern(768 * 1024, 1);
    await volume.write(0, first);
    first.copy(expected, 0);
    const extents = [
      { offsetBytes: 0, data: pattern(4096, 2) },
      { offsetBytes: 3 * 4096, data: pattern(3 * 4096, 3) },
      { offsetBytes: 100 * 4096, data: pattern(4096, 4) },
      { offsetBytes: 200 * 4096, data: pattern(2 * 4096, 5) }, // in the hole
    ];
    const writing = volume.writeMany(extents);
    for (const extent of extents) extent.data.copy(expected, extent.offsetBytes);
    // The caller's buffers reused before the write is done: what lands is what was given.
    for (const extent of extents) extent.data.fill(0xee);
    await writing;
    const read = (): Promise<void> => expectVolume(volume, expected);
    await read();
    await assert.rejects(volume.writeMany([{ offsetBytes: 4096, data: pattern(8192, 6) }, { offsetBytes: 8192, data: pattern(4096, 7) }]), /share no chunk/);
    await read();
    const unordered = [{ offsetBytes: 8192, data: pattern(4096, 6) }, { offsetBytes: 4096, data: pattern(4096, 7) }];
    await volume.writeMany(unordered);
    for (const extent of unordered) extent.data.copy(expected, extent.offsetBytes);
    await read();
    await volume.flush();
  });
});

// A replication receiver gives writeMany the chunks' checksums its decoder took (stream-format.ts): those are
// what is recorded, not sums taken again. So the sums given must be the right ones for each extent: with them the
// volume reads back (each read verified, after a reopen too); a wrong one given is recorded as it is, and the read
// of that chunk is refused as damaged, which shows the bytes were not summed again.
test('writeMany records the checksums given with its extents, each at its own chunks', async () => {
  const { chunkSums } = await import('../../src/store/chunk-io.ts');
  await withVolume('chunkd-extents-sums-', async (volume, expected) => {
    const extents = [
      { offsetBytes: 2 * 4096, data: pattern(4096, 21) },
      { offsetBytes: 10 * 4096, data: pattern(5 * 4096, 22) },
      { offsetBytes: 40 * 4096, data: pattern(2 * 4096, 23) },
    ].map((extent) => ({ ...extent, sums: chunkSums(extent.data) }));
    await volume.writeMany(extents);
    for (const extent of extents) extent.data.copy(expected, extent.offsetBytes);
    await expectVolume(volume, expected);
    const wrong = { offsetBytes: 60 * 4096, data: pattern(2 * 4096, 24), sums: chunkSums(pattern(2 * 4096, 24)) };
    wrong.sums[1] = (wrong.sums[1]! ^ 1) >>> 0;
    await volume.writeMany([wrong]);
    await assert.rejects(volume.read(61 * 4096, Buffer.alloc(4096)), /checksum mismatch/);
    await volume.read(60 * 4096, Buffer.alloc(4096));
    // Written over with the right ones, so that the reopen's read of the whole volume checks the rest.
    await volume.writeMany([{ ...wrong, sums: chunkSums(wrong.data) }]);
    wrong.data.copy(expected, wrong.offsetBytes);
    await expectVolume(volume, expected);
    await volume.flush();
  });
});

// The receiver's large records go through Volume.write with the sums their decoder took: recorded as given (a wrong
// one makes the read of its chunk fail, which shows the bytes were not summed again); a write of part of a chunk
// sums its bytes itself.
test('write records the checksums given for whole chunks', async () => {
  const { chunkSums } = await import('../../src/store/chunk-io.ts');
  await withVolume('chunkd-write-sums-', async (volume, expected) => {
    const data = pattern(64 * 4096, 31);
    await volume.write(64 * 4096, data, { sums: chunkSums(data) });
    data.copy(expected, 64 * 4096);
    await expectVolume(volume, expected);
    const wrong = chunkSums(data);
    wrong[5] = (wrong[5]! ^ 1) >>> 0;
    await volume.write(128 * 4096, data, { sums: wrong });
    await assert.rejects(volume.read(133 * 4096, Buffer.alloc(4096)), /checksum mismatch/);
    await volume.read(132 * 4096, Buffer.alloc(4096));
    await volume.write(128 * 4096, data, { sums: chunkSums(data) });
    data.copy(expected, 128 * 4096);
    await expectVolume(volume, expected);
    // Two in one turn: the second is held for the turn's batch (#writeGroup), and its given sums go with it too.
    const second = pattern(64 * 4096, 32);
    const secondWrong = chunkSums(second);
    secondWrong[7] = (secondWrong[7]! ^ 1) >>> 0;
    await Promise.all([volume.write(0, data, { sums: chunkSums(data) }), volume.write(192 * 4096, second, { sums: secondWrong })]);
    data.copy(expected, 0);
    await assert.rejects(volume.read((192 + 7) * 4096, Buffer.alloc(4096)), /checksum mismatch/);
    await volume.write(192 * 4096, second, { sums: chunkSums(second) });
    second.copy(expected, 192 * 4096);
    await expectVolume(volume, expected);
    await volume.flush();
  });
});

const block = 4096;

// Volume.write's turn batch (NBD at queue depth 32 sends many small writes in one turn): the turn's first small plain
// write goes alone, the rest are written together (writeMany's run) when the turn ends. Each lands where it says with
// its own chunks' checksums, writes that share a chunk land in the order they were asked, a read or FUA write asked
// in the same turn is ordered against them, and each is acknowledged only once it is written.
test('a turn of small writes lands with its checksums, in order against the writes, reads and FUA writes that share its chunks', async () => {
  await withVolume('chunkd-turn-batch-', async (volume, expected) => {
    const base = pattern(volumeBytes / 2, 1);
    await volume.write(0, base);
    base.copy(expected, 0);
    // One turn: scattered 4 KiB writes, the same block written three times, a two-block write over one of them,
    // a FUA write and a read between them, a partial (unbatchable) write over a held one.
    const pending: Array<Promise<void>> = [];
    let seed = 10;
    const write = (offsetBytes: number, length: number, fua = false): void => {
      const data = pattern(length, seed++);
      pending.push(volume.write(offsetBytes, data, fua ? { fua: true } : undefined));
      data.copy(expected, offsetBytes);
    };
    write(5 * block, block); // the turn's first: alone, now
    write(7 * block, block);
    write(40 * block, block);
    write(7 * block, block);
    write(200 * block, block); // in the hole
    write(6 * block, 2 * block); // shares block 7 with two writes before it
    const seenAt7 = Buffer.alloc(block);
    const seenExpected = Buffer.from(expected.subarray(7 * block, 8 * block));
    pending.push(volume.read(7 * block, seenAt7));
    write(7 * block, block);
    write(41 * block, block, true);
    write(40 * block, block);
    write(40 * block + 100, 300); // partial: read-modify-write of a held write's chunk
    for (let i = 0; i < 20; i++) write((100 + 3 * i) * block, block);
    let acknowledged = 0;
    for (const promise of pending) void promise.then(() => { acknowledged += 1; });
    assert.equal(acknowledged, 0, 'no write acknowledged before it is written');
    await Promise.all(pending);
    assert.ok(seenAt7.equals(seenExpected), 'a read asked between writes of its chunk sees the writes asked before it, not after');
    const read = (): Promise<void> => expectVolume(volume, expected);
    await read();
    await volume.flush();
  });
});

// A turn's group is gathered into a buffer that is kept for a later group once its write is done: groups of turns
// that follow each other while the earlier ones are still being written each keep their own bytes, and a later,
// shorter group written from a kept buffer writes only its own.
test('turns of small writes in a row, their groups in flight together and buffers reused, each land as written', async () => {
  await withVolume('chunkd-turn-buffers-', async (volume, expected) => {
    let seed = 100;
    const turn = (firstBlock: number, count: number, stride: number): Array<Promise<void>> => {
      const pending: Array<Promise<void>> = [];
      for (let i = 0; i < count; i++) {
        const offsetBytes = (firstBlock + i * stride) * block;
        const data = pattern(block, seed++);
        pending.push(volume.write(offsetBytes, data));
        data.copy(expected, offsetBytes);
      }
      return pending;
    };
    const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
    for (let round = 0; round < 3; round++) {
      // Four turns, each a group of up to 12 held writes, not waited for in between: their groups are in flight together.
      const pending: Array<Promise<void>> = [];
      for (let t = 0; t < 4; t++) {
        pending.push(...turn(t + 4 * round, 13 - 3 * t, 16));
        await nextTurn();
      }
      await Promise.all(pending);
      await expectVolume(volume, expected);
    }
    await volume.flush();
  });
});
