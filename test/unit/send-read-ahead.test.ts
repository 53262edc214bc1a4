// The sender's read-ahead of small reads (replication/send.ts #readAhead): a batch at a time, gathered where the
// page cache answers (SnapshotDevice.readManyNowOrLater), but while reads wait on the disk no more in flight than a
// read ahead one at a time kept (sendReadsAheadMax), and reads of 8 KiB refilled in batches, not one at a time. And
// ranges trimmed since the base go as ZERO records, not as data of zeros.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { sendReadsAheadMax } from '../../src/core/limits.ts';
import { prepareSend } from '../../src/replication/send.ts';
import { StreamDecoder } from '../../src/replication/stream-format.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { Pool } from '../../src/store/pool.ts';
import { SnapshotDevice } from '../../src/store/volume.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const chunk = 4096;

/** Sends a snapshot of `extents` scattered extents of `extentChunks` chunks; the page cache answers none if `cold`. */
async function sendScattered(extentChunks: number, extents: number, cold: boolean): Promise<{ maxInFlight: number; batches: number[] }> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-send-read-ahead-'));
  let inFlight = 0;
  let maxInFlight = 0;
  let coldNow = false;
  const files: FileLayer = {
    ...realFiles,
    readCached: (fd, target, position) => (coldNow ? -1 : realFiles.readCached(fd, target, position)),
    read: async (fd, target, position) => {
      inFlight += 1;
      maxInFlight = Math.max(maxInFlight, inFlight);
      try {
        await new Promise((resolve) => setTimeout(resolve, 1));
        return await realFiles.read(fd, target, position);
      } finally {
        inFlight -= 1;
      }
    },
  };
  const batches: number[] = [];
  const readMany = SnapshotDevice.prototype.readManyNowOrLater;
  SnapshotDevice.prototype.readManyNowOrLater = function (offsets, targets) {
    batches.push(offsets.length);
    return readMany.call(this, offsets, targets);
  };
  try {
    const pool = await Pool.open({ directory, ...testPoolOptions(), files });
    await pool.createVolume('v', 2 * extents * extentChunks * chunk);
    const volume = pool.openVolume('v');
    for (let i = 0; i < extents; i++) await volume.write(2 * i * extentChunks * chunk, Buffer.alloc(extentChunks * chunk, (i % 250) + 1));
    await volume.close();
    await pool.createSnapshot('v', 's');
    coldNow = cold;
    const prepared = await prepareSend(pool, { volume: 'v', snapshot: 's', from: null, resumeOffsetBytes: 0 }, () => {});
    let records = 0;
    for await (const batch of prepared.batches) {
      records += batch.length;
      prepared.recycle(batch);
    }
    assert.equal(prepared.failure(), null);
    assert.equal(records, extents + 2, 'a header, a record an extent, an end');
    await pool.close();
  } finally {
    SnapshotDevice.prototype.readManyNowOrLater = readMany;
    fs.rmSync(directory, { recursive: true, force: true });
  }
  return { maxInFlight, batches };
}

test('a cold stream keeps no more small reads waiting on the disk than sendReadsAheadMax', async () => {
  const { maxInFlight, batches } = await sendScattered(1, 1024, true);
  assert.ok(maxInFlight > 1, `reads went to the disk (${maxInFlight})`);
  assert.ok(maxInFlight <= sendReadsAheadMax, `at most ${sendReadsAheadMax} in flight, not a whole batch: ${maxInFlight}`);
  assert.ok(batches.every((size) => size <= sendReadsAheadMax), `batches ${Math.max(...batches)}`);
}, 60_000);

test('a warm stream reads its small reads in batches, 8 KiB ones too', async () => {
  for (const extentChunks of [1, 2]) {
    const { batches } = await sendScattered(extentChunks, 4096, false);
    const sorted = [...batches].sort((a, b) => a - b);
    const median = sorted[Math.floor(sorted.length / 2)]!;
    assert.ok(median > sendReadsAheadMax, `${extentChunks * 4} KiB reads: median batch ${median} of ${batches.length} batches`);
  }
}, 60_000);

test('a range trimmed since the base goes as a ZERO record, not as data of zeros', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-send-holes-'));
  try {
    const pool = await Pool.open({ directory, ...testPoolOptions() });
    await pool.createVolume('v', 64 * chunk);
    let volume = pool.openVolume('v');
    await volume.write(0, Buffer.alloc(16 * chunk, 0x5a));
    await volume.close();
    await pool.createSnapshot('v', 'a');
    volume = pool.openVolume('v');
    await volume.trim(2 * chunk, 2 * chunk);
    await volume.write(8 * chunk, Buffer.alloc(chunk, 0x33));
    await volume.trim(9 * chunk, chunk);
    await volume.close();
    await pool.createSnapshot('v', 'b');
    const prepared = await prepareSend(pool, { volume: 'v', snapshot: 'b', from: 'a', resumeOffsetBytes: 0 }, () => {});
    const decoder = new StreamDecoder();
    const types: string[] = [];
    for await (const record of prepared.records) {
      for (const decoded of decoder.push(Buffer.concat(record))) {
        if (decoded.type === 'zero' || decoded.type === 'data') types.push(`${decoded.type} ${decoded.offsetBytes / chunk}`);
      }
    }
    assert.deepEqual(types, ['zero 2', 'data 8', 'zero 9']);
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
