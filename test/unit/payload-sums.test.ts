// The checksums of a large WRITE payload summed as it arrives (store/payload-sums.ts): in pieces of any size they
// are the chunks' own, they go with the one payload Buffer they were summed for, once, and a volume uses them only
// where the payload's chunks are the run's chunks (reads verify every chunk against what was recorded).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { chunkSizeBytes } from '../../src/core/limits.ts';
import { chunkSums } from '../../src/store/chunk-io.ts';
import { ArrivingSums, arrivingSumsBytesMin, dropPayloadSums, takePayloadSums } from '../../src/store/payload-sums.ts';
import { Pool } from '../../src/store/pool.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const MiB = 1024 * 1024;

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 7 + seed * 13 + (i >> 12) * seed) & 0xff;
  return bytes;
}

/** `payload`'s bytes copied into a fresh buffer in pieces of the given sizes, summed as they land, as the receiver does. */
function arrive(payload: Buffer, pieceSizes: readonly number[]): Buffer {
  const target = Buffer.alloc(payload.length);
  const sums = ArrivingSums.for(target)!;
  assert.ok(sums !== null);
  for (let filled = 0, piece = 0; filled < payload.length; piece += 1) {
    const size = Math.min(pieceSizes[piece % pieceSizes.length]!, payload.length - filled);
    payload.copy(target, filled, filled, filled + size);
    filled += size;
    sums.arrived(filled);
  }
  sums.finish();
  return target;
}

test('sums of a payload arriving in pieces of any size are its chunks\' own, taken once; small or partial payloads have none', () => {
  for (const pieceSizes of [[MiB], [1], [4095, 4097], [13, 65536, 208 * 1024, 3]]) {
    const payload = pattern(MiB, pieceSizes.length);
    const arrived = arrive(payload, pieceSizes);
    assert.deepEqual(takePayloadSums(arrived), chunkSums(payload));
    assert.equal(takePayloadSums(arrived), undefined, 'taken once');
  }
  // Only the very Buffer summed has them: not a copy, nor another view of the same memory.
  const arrived = arrive(pattern(MiB, 9), [65536]);
  assert.equal(takePayloadSums(Buffer.from(arrived)), undefined);
  assert.equal(takePayloadSums(arrived.subarray(0, MiB)), undefined);
  dropPayloadSums(arrived);
  assert.equal(takePayloadSums(arrived), undefined, 'dropped');
  assert.equal(ArrivingSums.for(Buffer.alloc(arrivingSumsBytesMin - chunkSizeBytes)), null);
  assert.equal(ArrivingSums.for(Buffer.alloc(MiB - 512)), null);
  assert.equal(ArrivingSums.for(Buffer.alloc(2 * MiB)), null, 'a chunk I/O worker sums it');
  // A payload whose bytes have not all arrived attaches nothing until finish.
  const partial = Buffer.alloc(MiB);
  ArrivingSums.for(partial)!.arrived(MiB / 2);
  assert.equal(takePayloadSums(partial), undefined);
});

test('a volume records the arrived sums of a chunk-aligned write, and sums its own chunks for a write that is not', async () => {
  // Reads check every chunk against its recorded checksum: sums for the wrong bytes or the wrong chunks fail them.
  const volumeBytes = 4 * MiB;
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-payload-sums-'));
  try {
    const expected = Buffer.alloc(volumeBytes);
    let pool = await Pool.open({ directory, ...testPoolOptions() });
    await pool.createVolume('v', volumeBytes);
    let volume = pool.openVolume('v');
    const writes = [
      { offsetBytes: 0, data: pattern(MiB, 1) },
      { offsetBytes: MiB + 512, data: pattern(MiB, 2) }, // its blocks straddle the chunks: the arrived sums do not apply
      { offsetBytes: 3 * MiB - 4 * chunkSizeBytes, data: pattern(512 * 1024, 3) },
      { offsetBytes: 3 * MiB + chunkSizeBytes, data: pattern(512 * 1024, 4) },
    ];
    for (const write of writes) {
      const arrived = arrive(write.data, [70000]);
      await volume.write(write.offsetBytes, arrived);
      assert.equal(takePayloadSums(arrived), undefined, 'the volume took them');
      write.data.copy(expected, write.offsetBytes);
    }
    const actual = Buffer.alloc(volumeBytes);
    await volume.read(0, actual);
    assert.ok(actual.equals(expected));
    await volume.close();
    await pool.close();
    pool = await Pool.open({ directory, ...testPoolOptions() });
    volume = pool.openVolume('v');
    actual.fill(0);
    await volume.read(0, actual);
    assert.ok(actual.equals(expected), 'after a reopen too');
    await volume.close();
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
