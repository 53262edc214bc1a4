// ChunkStore.write on a full file system: a write that has no room in one run goes in pieces into the free chunks
// the files hold, every chunk where its piece says with its own checksum, and all of it or nothing. The chunk
// files are a stand-in that refuses (ENOSPC) any write reaching past a fixed end, as a full file system does above
// the high-water mark, and at the free chunks a test calls punched (a hole needs a block the file system has not
// got, where a recycled chunk keeps its own); the allocator is the in-memory pool's (allocator.ts).
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { test } from 'vitest';
import { chunkSizeBytes } from '../../src/core/limits.ts';
import { ChunkdError } from '../../src/core/errors.ts';
import { ChunkAllocator } from '../../src/store/allocator.ts';
import { blockChecksum } from '../../src/store/checksum.ts';
import { chunkSums, type ChunkIo } from '../../src/store/chunk-io.ts';
import type { ChunkFiles } from '../../src/store/chunk-files.ts';
import { ChunkStore, type WrittenRun } from '../../src/store/chunk-store.ts';

const end = 100;

/** A pool of `end` chunks all in use but `holes`; its files take writes below `end` only, and record them. */
function fullPool(holes: number[], options: { reclaim?: () => Promise<void>; failAt?: number; punched?: number[] } = {}) {
  const allocator = ChunkAllocator.fromUsed(Array.from({ length: end }, (_, chunk) => chunk).filter((chunk) => !holes.includes(chunk)).map((physicalChunk) => ({ physicalChunk, chunkCount: 1 })));
  const written = new Map<number, Buffer>();
  const tried: number[] = [];
  const io = {
    writeSummed(physicalChunk: number, payload: Buffer, sums?: Uint32Array): Promise<Uint32Array> {
      const count = payload.length / chunkSizeBytes;
      tried.push(physicalChunk);
      const hole = options.punched?.some((chunk) => physicalChunk <= chunk && chunk < physicalChunk + count) ?? false;
      if (physicalChunk + count > end || hole) return Promise.reject(Object.assign(new Error('no space left on device'), { code: 'ENOSPC' }));
      if (options.failAt !== undefined && physicalChunk <= options.failAt && options.failAt < physicalChunk + count) return Promise.reject(Object.assign(new Error('i/o error'), { code: 'EIO' }));
      for (let i = 0; i < count; i++) written.set(physicalChunk + i, Buffer.from(payload.subarray(i * chunkSizeBytes, (i + 1) * chunkSizeBytes)));
      return Promise.resolve(sums ?? chunkSums(payload));
    },
  };
  const store = new ChunkStore({
    chunkFiles: {} as ChunkFiles,
    allocator,
    io: io as unknown as ChunkIo,
    verifyReads: true,
    log: () => {},
    reclaim: options.reclaim ?? (() => Promise.resolve()),
  });
  return { allocator, store, written, tried };
}

/** Each chunk of `payload` is where `run`'s pieces say, with its own checksum. */
function assertPlaced(run: WrittenRun, payload: Buffer, written: Map<number, Buffer>): void {
  let chunk = 0;
  for (const piece of run.pieces) {
    for (let i = 0; i < piece.chunkCount; i++, chunk++) {
      const bytes = payload.subarray(chunk * chunkSizeBytes, (chunk + 1) * chunkSizeBytes);
      assert.ok(written.get(piece.physicalChunk + i)?.equals(bytes), `chunk ${chunk} at ${piece.physicalChunk + i}`);
      assert.equal(run.sums[chunk], blockChecksum(bytes), `chunk ${chunk}'s checksum`);
    }
  }
  assert.equal(chunk, payload.length / chunkSizeBytes);
  assert.equal(run.sums.length, chunk);
}

test('a write with no room in one run goes in pieces into the free chunks, each chunk with its own checksum', async () => {
  const { allocator, store, written } = fullPool([3, 10, 11, 20, 41, 42, 43]);
  const payload = crypto.randomBytes(7 * chunkSizeBytes);
  const run = await store.write(payload);
  assertPlaced(run, payload, written);
  assert.deepEqual(new Set(run.pieces.flatMap((piece) => Array.from({ length: piece.chunkCount }, (_, i) => piece.physicalChunk + i))), new Set([3, 10, 11, 20, 41, 42, 43]));
  assert.equal(allocator.usedCount, end);
  // With the caller's checksums too, and a run that fits goes as one piece.
  const again = fullPool([5, 6, 7, 8, 30]);
  const given = crypto.randomBytes(5 * chunkSizeBytes);
  assertPlaced(await again.store.write(given, chunkSums(given)), given, again.written);
  // A run that fits below the end goes as one piece.
  const roomy = fullPool([50, 51, 52, 53]);
  assert.deepEqual((await roomy.store.write(crypto.randomBytes(4 * chunkSizeBytes))).pieces, [{ physicalChunk: 50, chunkCount: 4 }]);
});

test('a reclaim refused at once (a commit met the full file system a moment ago) still leaves the pieces to try', async () => {
  const { allocator, store, written } = fullPool([3, 10, 11, 20], { reclaim: () => Promise.reject(new ChunkdError('ENOSPC', 'journal commit: no space left on the pool\'s file system')) });
  allocator.freeDeferred(60, 1, false);
  const payload = crypto.randomBytes(4 * chunkSizeBytes);
  assertPlaced(await store.write(payload), payload, written);
});

test('all of it or nothing: too few free chunks, or a piece that fails, gives every piece back', async () => {
  const short = fullPool([3, 10, 11]);
  await assert.rejects(short.store.write(crypto.randomBytes(4 * chunkSizeBytes)), (error: NodeJS.ErrnoException) => error.code === 'ENOSPC');
  assert.equal(short.allocator.usedCount, end - 3, 'no chunk kept');
  assert.equal(await short.store.write(crypto.randomBytes(3 * chunkSizeBytes)).then((run) => run.pieces.length), 2, 'the three free chunks are all free again');

  const failing = fullPool([3, 10, 11, 20], { failAt: 20 });
  await assert.rejects(failing.store.write(crypto.randomBytes(4 * chunkSizeBytes)), (error: NodeJS.ErrnoException) => error.code === 'EIO');
  assert.equal(failing.allocator.usedCount, end - 4, 'no chunk kept');
});

test('a one-chunk write on a full file system steps past free chunks that are holes to one that still holds its block', async () => {
  // Free: 3, 10, 11, 20, 41; 3, 10, 11 punched (a trim, or the metadata's give-back), 20 and 41 recycled.
  const { allocator, store, written, tried } = fullPool([3, 10, 11, 20, 41], { punched: [3, 10, 11] });
  const payload = crypto.randomBytes(chunkSizeBytes);
  const run = await store.write(payload);
  assert.deepEqual(run.pieces, [{ physicalChunk: 20, chunkCount: 1 }]);
  assertPlaced(run, payload, written);
  assert.deepEqual(tried, [3, 10, 11, 20], 'the first try, then the search on from it (next-fit): each hole once');
  assert.equal(allocator.usedCount, end - 4, 'the holes tried are free again');
  // A write in pieces does the same for each single chunk: two chunks, no run of two below, the holes 3 and 10
  // skipped, into 20 and 41.
  const pieces = fullPool([3, 10, 20, 41], { punched: [3, 10] });
  const two = crypto.randomBytes(2 * chunkSizeBytes);
  const split = await pieces.store.write(two);
  assertPlaced(split, two, pieces.written);
  assert.deepEqual(split.pieces.map((piece) => piece.physicalChunk), [20, 41]);
  assert.equal(pieces.allocator.usedCount, end - 2);
});

test('when every free chunk is a hole, a one-chunk write stops at the high-water mark, and for a second the next try one chunk only', async () => {
  const { allocator, store, tried } = fullPool([3, 10, 11], { punched: [3, 10, 11] });
  await assert.rejects(store.write(crypto.randomBytes(chunkSizeBytes)), (error: NodeJS.ErrnoException) => error.code === 'ENOSPC');
  assert.deepEqual(tried, [3, 10, 11, 3, end], 'the first try, the holes on from it and from the start, then the first chunk above the mark, and no more');
  assert.equal(allocator.usedCount, end - 3, 'nothing kept');
  assert.equal(allocator.highWater, end, 'the chunk above the mark given back');
  tried.length = 0;
  await assert.rejects(store.write(crypto.randomBytes(chunkSizeBytes)), (error: NodeJS.ErrnoException) => error.code === 'ENOSPC');
  assert.equal(tried.length, 2, `the first try and one more, not the search again: ${tried.join(', ')}`);
  assert.equal(allocator.usedCount, end - 3);
});
