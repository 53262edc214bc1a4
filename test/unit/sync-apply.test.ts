// Volume.writeMany, several small writes as one run and one pwrite (the replication receiver's batch; Volume.write's
// turn batch writes its groups the same way): every write reads back at its own place after a flush and a reopen, holes
// stay holes, and it is ordered against single writes to the same chunks as the order they were asked in.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { chunkSizeBytes } from '../../src/core/limits.ts';
import { Pool } from '../../src/store/pool.ts';

const block = (fill: number, chunks = 1): Buffer => Buffer.alloc(chunks * chunkSizeBytes, fill);

async function readAt(pool: Pool, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const volume = pool.openVolume('v');
  const target = Buffer.alloc(lengthBytes);
  await volume.read(offsetBytes, target);
  await volume.close();
  return target;
}

test('writeMany: each write lands at its own offset with its own checksums, durable after a flush and a reopen', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-apply-'));
  try {
    let pool = await Pool.open({ directory });
    await pool.createVolume('v', 64 * chunkSizeBytes);
    const volume = pool.openVolumeForSync('v');
    // Out of order, of several lengths, with gaps between them (chunks 1, 4-5, 9 and 20-22 are never written).
    const writes = [
      { offsetBytes: 10 * chunkSizeBytes, data: block(0xa1) },
      { offsetBytes: 2 * chunkSizeBytes, data: block(0xa2, 2) },
      { offsetBytes: 6 * chunkSizeBytes, data: block(0xa3, 3) },
      { offsetBytes: 23 * chunkSizeBytes, data: block(0xa4) },
      { offsetBytes: 0, data: block(0xa5) },
    ];
    await volume.writeMany(writes);
    await volume.flush();
    await volume.close();
    await pool.close();
    pool = await Pool.open({ directory });
    const expected = Buffer.alloc(24 * chunkSizeBytes);
    for (const { offsetBytes, data } of writes) data.copy(expected, offsetBytes);
    // A read verifies every chunk against the checksum its map record carries: a record that pointed at another
    // write's chunks or carried another's sums would fail here.
    assert.ok((await readAt(pool, 0, expected.length)).equals(expected), 'every write reads back at its own offset, and the gaps as zeros');
    for (const { offsetBytes, data } of writes) assert.ok((await readAt(pool, offsetBytes, data.length)).equals(data));
    assert.ok((await readAt(pool, 20 * chunkSizeBytes, 3 * chunkSizeBytes)).equals(Buffer.alloc(3 * chunkSizeBytes)));
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('writeMany: ordered against single writes to the same chunks as they were asked, either way round', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-apply-'));
  try {
    const pool = await Pool.open({ directory });
    await pool.createVolume('v', 64 * chunkSizeBytes);
    const volume = pool.openVolumeForSync('v');
    // A single write asked first, a batch over the same chunk next, then a single write over another of the
    // batch's chunks: each later one must win, as the owner sent them.
    const first = volume.write(3 * chunkSizeBytes, block(0x01));
    const batch = volume.writeMany([{ offsetBytes: 3 * chunkSizeBytes, data: block(0x02) }, { offsetBytes: 8 * chunkSizeBytes, data: block(0x03) }]);
    const last = volume.write(8 * chunkSizeBytes, block(0x04));
    await Promise.all([first, batch, last]);
    assert.ok((await readAt(pool, 3 * chunkSizeBytes, chunkSizeBytes)).equals(block(0x02)), 'the batch, asked after the single write, wins');
    assert.ok((await readAt(pool, 8 * chunkSizeBytes, chunkSizeBytes)).equals(block(0x04)), 'the single write, asked after the batch, wins');
    await volume.close();
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
