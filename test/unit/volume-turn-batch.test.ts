// Volume.write's turn batch (NBD at queue depth 32 sends many small writes in one turn): the turn's first small plain
// write goes alone, the rest are written together when the turn ends. Each lands where it says with its own chunks'
// checksums (reads verify them, after a reopen too), writes that share a chunk land in the order they were asked,
// a read or FUA write asked in the same turn is ordered against them, and each is acknowledged only once it is written.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { Pool } from '../../src/store/pool.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const volumeBytes = 1024 * 1024;
const block = 4096;

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 7 + seed * 13 + (i >> 12)) & 0xff;
  return bytes;
}

test('a turn of small writes lands with its checksums, in order against the writes, reads and FUA writes that share its chunks', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-turn-batch-'));
  try {
    let pool = await Pool.open({ directory, ...testPoolOptions() });
    await pool.createVolume('v', volumeBytes);
    let volume = pool.openVolume('v');
    const expected = Buffer.alloc(volumeBytes);
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
    const read = async (): Promise<void> => {
      const actual = Buffer.alloc(volumeBytes);
      await volume.read(0, actual);
      assert.ok(actual.equals(expected), `the volume differs from what was written at byte ${actual.findIndex((byte, i) => byte !== expected[i])}`);
    };
    await read();
    await volume.flush();
    await volume.close();
    await pool.close();
    // Reopened: every chunk read is checked against the checksum recorded for it.
    pool = await Pool.open({ directory, ...testPoolOptions() });
    volume = pool.openVolume('v');
    await read();
    await volume.close();
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
