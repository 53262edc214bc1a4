// A volume's read of bytes in the page cache is done before read() returns (volume.ts: the lock granted at once,
// the lookup in memory, chunk-io.ts's cached read; no promise per layer), and is verified all the same: a byte
// flipped under a cached chunk fails that read, as a rejected promise (never a throw out of read()), and the chunks
// beside it still read. The layers the node puts over a volume (io-stats.ts's MeasuredDevice, SyncDevice) give such
// a read on at once too (block-device.ts's doneNow), counted, and a damaged one still fails through them.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, test } from 'vitest';
import { doneNow } from '../../src/core/block-device.ts';
import { DamagedDataError } from '../../src/core/errors.ts';
import { emptyIoStats, MeasuredDevice } from '../../src/node/io-stats.ts';
import { SyncDevice, SyncReplication } from '../../src/replication/sync-replicas.ts';
import { Pool } from '../../src/store/pool.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';
import { flipByteUnder, namedBlock } from '../helpers/damage.ts';

const chunk = 4096;
const directories: string[] = [];

afterEach(() => {
  for (const directory of directories.splice(0)) fs.rmSync(directory, { recursive: true, force: true });
});

/** A pool in a new directory with volume `v`, its first `blocks` chunks written with namedBlock(label, index) and flushed. */
async function writtenVolume(label: string, blocks: number) {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'volume-read-now-'));
  directories.push(directory);
  const pool = await Pool.open({ directory, ...testPoolOptions() });
  await pool.createVolume('v', 64 * chunk);
  const volume = pool.openVolume('v');
  for (let index = 0; index < blocks; index++) await volume.write(index * chunk, namedBlock(label, index));
  await volume.flush();
  return { directory, pool, volume };
}

test('a cached 4 KiB read is done when read() returns, and a flipped byte under it still fails it', async () => {
  const { directory, pool, volume } = await writtenVolume('read-now', 4);
  const target = Buffer.alloc(chunk);
  // The first read may open the chunk file on this thread (worker threads may have done every write).
  await volume.read(chunk, target);
  target.fill(0);
  const read = volume.read(chunk, target);
  assert.ok(target.equals(namedBlock('read-now', 1)), 'the bytes are in the buffer before read() returns');
  await read;

  flipByteUnder(directory, namedBlock('read-now', 2));
  let damaged: Promise<void> | undefined;
  assert.doesNotThrow(() => {
    damaged = volume.read(2 * chunk, Buffer.alloc(chunk));
  });
  await assert.rejects(damaged!, (error) => error instanceof DamagedDataError);
  await volume.read(3 * chunk, target);
  assert.ok(target.equals(namedBlock('read-now', 3)), 'the chunk beside it reads');
  await volume.close();
  await pool.close();
});

test('a cached read through the measured device and SyncDevice is done and counted when read() returns', async () => {
  const { directory, pool, volume } = await writtenVolume('measured-now', 3);
  const sync = await SyncReplication.load({ pool, poolDirectory: directory, credentials: 'no credentials in this test', log: () => {}, epochOf: () => 1, writeRefusal: () => null });
  const stats = emptyIoStats();
  const device = new MeasuredDevice(new SyncDevice(volume, sync), stats);
  const target = Buffer.alloc(chunk);
  await volume.read(chunk, target);
  target.fill(0);
  const read = device.read(chunk, target);
  assert.ok(target.equals(namedBlock('measured-now', 1)), 'the bytes are in the buffer before read() returns');
  assert.deepEqual([stats.read.count, stats.read.bytes, stats.read.errors, stats.read.inFlight], [1, chunk, 0, 0], 'counted before read() returns');
  assert.equal(read, doneNow, 'no promise of the layers above the volume');
  await read;

  // A damaged block with no replica to repair it from: the read fails through both layers, counted as an error.
  flipByteUnder(directory, namedBlock('measured-now', 2));
  await assert.rejects(device.read(2 * chunk, Buffer.alloc(chunk)), (error) => error instanceof DamagedDataError);
  assert.deepEqual([stats.read.count, stats.read.bytes, stats.read.errors, stats.read.inFlight], [2, chunk, 1, 0]);
  await sync.stop();
  await volume.close();
  await pool.close();
});
