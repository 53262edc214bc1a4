// A sender's scattered chunks read together (replication/send.ts): chunk-io.ts's readCachedGathered reads chunks in
// order of their place on disk, one call per stretch of them back to back in one chunk file (at most its scratch's
// length), each chunk copied to its own target; SnapshotDevice.readManyNowOrLater gives for each range what
// readNowOrLater gives (the bytes, the lookup, or the failure of that range alone), every chunk verified.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, test } from 'vitest';
import { chunkSizeBytes, chunksPerFile } from '../../src/core/limits.ts';
import { DamagedDataError } from '../../src/core/errors.ts';
import { ChunkFiles } from '../../src/store/chunk-files.ts';
import { readCachedGathered } from '../../src/store/chunk-io.ts';
import { realFiles } from '../../src/store/file-layer.ts';
import type { ChunkLookup } from '../../src/store/catalog-backend.ts';
import { Pool } from '../../src/store/pool.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';
import { flipByteUnder, namedBlock } from '../helpers/damage.ts';

const directories: string[] = [];

afterEach(() => {
  for (const directory of directories.splice(0)) fs.rmSync(directory, { recursive: true, force: true });
});

function scratchDirectory(): string {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-gathered-'));
  directories.push(directory);
  return directory;
}

test('readCachedGathered: one read call per stretch of chunks back to back in one chunk file, at most the scratch long, each chunk to its own target', async () => {
  const files = new ChunkFiles(path.join(scratchDirectory(), 'chunks'), realFiles);
  try {
    const written = [...Array.from({ length: 64 }, (_, i) => i), chunksPerFile - 2, chunksPerFile - 1, chunksPerFile, chunksPerFile + 1];
    for (const physical of written) await files.write(physical, 0, namedBlock('gathered', physical % 1000));
    // In the order a sender asks (by volume), scattered on disk: stretches 3-6, 10, 20, 40-41, and two chunks back
    // to back across the end of the first chunk file (two calls); chunk file 5 was never written nor opened (not read here: readCached starts opening it).
    const physical = [5, 3, chunksPerFile, 4, 10, chunksPerFile - 1, 40, 41, 6, 20, 5 * chunksPerFile];
    const count = (scratchChunks: number): { calls: number; done: Uint8Array; targets: Buffer[] } => {
      let calls = 0;
      const counting = { readCached: (chunk: number, offset: number, target: Uint8Array) => ((calls += 1), files.readCached(chunk, offset, target)) };
      const targets = physical.map(() => Buffer.alloc(chunkSizeBytes));
      const done = readCachedGathered(counting, Float64Array.from(physical), targets, Buffer.alloc(scratchChunks * chunkSizeBytes));
      return { calls, done, targets };
    };
    const wide = count(64);
    assert.equal(wide.calls, 7, 'stretches 3-6, 10, 20, 40-41, the two either side of the file boundary, and the unwritten file');
    assert.deepEqual([...wide.done], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], 'each chunk read but the one in a file that does not exist');
    for (let i = 0; i < physical.length - 1; i++) assert.ok(wide.targets[i]!.equals(namedBlock('gathered', physical[i]! % 1000)), `chunk ${physical[i]} holds its bytes`);
    const narrow = count(2);
    assert.equal(narrow.calls, 8, 'the stretch 3-6 in two calls of two chunks');
    for (let i = 0; i < physical.length - 1; i++) assert.ok(narrow.targets[i]!.equals(namedBlock('gathered', physical[i]! % 1000)));
  } finally {
    files.close();
  }
});

test('readManyNowOrLater gives each range what readNowOrLater gives, and a damaged chunk fails its range alone', async () => {
  const directory = scratchDirectory();
  const pool = await Pool.open({ directory, ...testPoolOptions() });
  await pool.createVolume('v', 64 * chunkSizeBytes);
  const volume = pool.openVolume('v');
  // Chunks 0-31 written in turn, then every third rewritten: the rewrites lie back to back on disk, apart in the volume.
  for (let index = 0; index < 32; index++) await volume.write(index * chunkSizeBytes, namedBlock('many', index));
  for (let index = 0; index < 32; index += 3) await volume.write(index * chunkSizeBytes, namedBlock('many', 100 + index));
  await volume.flush();
  await pool.createSnapshot('v', 's');
  const device = pool.openSnapshot('v', 's');
  // Scattered 4 KiB ranges, a range of two chunks, one unaligned, and one over a hole (chunks 40-41).
  const ranges = [[0, 1], [3, 1], [9, 1], [10, 2], [6, 1], [40, 2], [30, 1]].map(([chunk, chunks]) => ({ offset: chunk! * chunkSizeBytes, length: chunks! * chunkSizeBytes }));
  ranges.push({ offset: 12 * chunkSizeBytes + 512, length: 1024 });
  const expect = async (offset: number, length: number): Promise<{ bytes: Buffer; found: ChunkLookup }> => {
    const bytes = Buffer.alloc(length);
    const found = await device.readNowOrLater(offset, bytes);
    return { bytes, found };
  };
  const wanted = await Promise.all(ranges.map(({ offset, length }) => expect(offset, length)));
  const targets = ranges.map(({ length }) => Buffer.alloc(length, 0xee));
  const outcomes = device.readManyNowOrLater(
    ranges.map((range) => range.offset),
    targets,
  );
  for (let i = 0; i < ranges.length; i++) {
    const outcome = await outcomes[i]!;
    assert.ok(!(outcome instanceof Error), `range ${i} read`);
    assert.ok(targets[i]!.equals(wanted[i]!.bytes), `range ${i} holds what readNowOrLater reads`);
    assert.deepEqual(outcome.runs, wanted[i]!.found.runs);
  }

  flipByteUnder(directory, namedBlock('many', 109));
  const again = ranges.map(({ length }) => Buffer.alloc(length));
  const damaged = device.readManyNowOrLater(
    ranges.map((range) => range.offset),
    again,
  );
  for (let i = 0; i < ranges.length; i++) {
    const outcome = await Promise.resolve(damaged[i]!).catch((error: unknown) => error as Error);
    if (i === 2) {
      assert.ok(outcome instanceof DamagedDataError, 'the range over the flipped byte fails');
      assert.match(outcome.message, new RegExp(`v@s at byte ${9 * chunkSizeBytes} `));
    } else {
      assert.ok(!(outcome instanceof Error), `range ${i} still reads`);
      assert.ok(again[i]!.equals(wanted[i]!.bytes));
    }
  }
  await device.close();
  await volume.close();
  await pool.close();
});
