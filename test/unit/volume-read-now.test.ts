// A volume's read of bytes in the page cache is done before read() returns (volume.ts: the lock granted at once,
// the lookup in memory, chunk-io.ts's cached read; no promise per layer), and is verified all the same: a byte
// flipped under a cached chunk fails that read, as a rejected promise (never a throw out of read()), and the chunks
// beside it still read.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, test } from 'vitest';
import { DamagedDataError } from '../../src/core/errors.ts';
import { Pool } from '../../src/store/pool.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';
import { flipByteUnder, namedBlock } from '../helpers/damage.ts';

const chunk = 4096;
const directories: string[] = [];

afterEach(() => {
  for (const directory of directories.splice(0)) fs.rmSync(directory, { recursive: true, force: true });
});

test('a cached 4 KiB read is done when read() returns, and a flipped byte under it still fails it', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'volume-read-now-'));
  directories.push(directory);
  const pool = await Pool.open({ directory, ...testPoolOptions() });
  await pool.createVolume('v', 64 * chunk);
  const volume = pool.openVolume('v');
  for (let index = 0; index < 4; index++) await volume.write(index * chunk, namedBlock('read-now', index));
  await volume.flush();
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
