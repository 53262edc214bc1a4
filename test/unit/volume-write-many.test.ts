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
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const volumeBytes = 1024 * 1024;

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 7 + seed * 13 + (i >> 12)) & 0xff;
  return bytes;
}

test('writeMany puts each extent in place with its own checksums, takes the bytes at once, and refuses extents that share a chunk', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-extents-'));
  try {
    let pool = await Pool.open({ directory, ...testPoolOptions() });
    await pool.createVolume('v', volumeBytes);
    let volume = pool.openVolume('v');
    const expected = Buffer.alloc(volumeBytes);
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
    const read = async (): Promise<void> => {
      const actual = Buffer.alloc(volumeBytes);
      await volume.read(0, actual);
      assert.ok(actual.equals(expected), `the volume differs from what was written at byte ${actual.findIndex((byte, i) => byte !== expected[i])}`);
    };
    await read();
    await assert.rejects(volume.writeMany([{ offsetBytes: 4096, data: pattern(8192, 6) }, { offsetBytes: 8192, data: pattern(4096, 7) }]), /share no chunk/);
    await read();
    const unordered = [{ offsetBytes: 8192, data: pattern(4096, 6) }, { offsetBytes: 4096, data: pattern(4096, 7) }];
    await volume.writeMany(unordered);
    for (const extent of unordered) extent.data.copy(expected, extent.offsetBytes);
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
