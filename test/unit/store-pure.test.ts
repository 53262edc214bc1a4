// Unit tests of the store's pure parts: chunk maps, the allocator, journal records, checkpoints, range locks.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ChunkAllocator } from '../../src/store/allocator.ts';
import { ChunkMap } from '../../src/store/chunk-map.ts';
import { decodeCheckpoint, encodeCheckpoint } from '../../src/store/checkpoint.ts';
import { applyRecord, decodeJournal, emptyCatalog, encodeRecords, type MetaRecord } from '../../src/store/metadata.ts';
import { RangeLock } from '../../src/store/range-lock.ts';
import { ChunkdError } from '../../src/core/errors.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

test('chunk map: runs split holes and physically contiguous stretches', () => {
  const map = new ChunkMap();
  map.mapRun(10, 100, 4);
  map.mapRun(14, 200, 2);
  assert.deepEqual(map.runs(8, 10), [
    { virtualChunk: 8, chunkCount: 2, physicalChunk: -1 },
    { virtualChunk: 10, chunkCount: 4, physicalChunk: 100 },
    { virtualChunk: 14, chunkCount: 2, physicalChunk: 200 },
    { virtualChunk: 16, chunkCount: 2, physicalChunk: -1 },
  ]);
  assert.equal(map.mappedCount, 6);
  assert.deepEqual(map.unmapRange(12, 3), [
    { virtualChunk: 12, chunkCount: 2, physicalChunk: 102 },
    { virtualChunk: 14, chunkCount: 1, physicalChunk: 200 },
  ]);
  assert.equal(map.mappedCount, 3);
  assert.equal(map.get(12), -1);
  assert.equal(map.get(15), 201);
});

test('chunk map: a 64 TiB volume maps its far end and skips empty pages', () => {
  const map = new ChunkMap();
  const lastChunk = (64 * 2 ** 40) / 4096 - 1;
  map.mapRun(lastChunk, 7, 1);
  assert.equal(map.get(lastChunk), 7);
  const runs = map.runs(0, lastChunk + 1);
  assert.deepEqual(runs[runs.length - 1], { virtualChunk: lastChunk, chunkCount: 1, physicalChunk: 7 });
  assert.deepEqual([...map.mappedRuns()], [{ virtualChunk: lastChunk, chunkCount: 1, physicalChunk: 7 }]);
});

test('allocator: contiguous runs, deferred frees reused only after release, high-water mark shrinks', () => {
  const allocator = new ChunkAllocator();
  assert.equal(allocator.allocate(4), 0);
  assert.equal(allocator.allocate(2), 4);
  allocator.freeDeferred(0, 4);
  assert.equal(allocator.allocate(1), 6, 'a deferred free is not reused before its commit');
  allocator.releaseDeferred(allocator.deferredMark());
  assert.equal(allocator.allocate(3), 0);
  allocator.release(6, 1);
  allocator.release(0, 3);
  allocator.release(4, 2);
  assert.equal(allocator.highWater, 0);
  assert.equal(allocator.usedCount, 0);
});

test('allocator: seeded random allocation never hands out a used chunk', () => {
  const seed = testSeed('allocator');
  const random = makeRandom(seed);
  const allocator = new ChunkAllocator();
  const owned = new Set<number>();
  const held: Array<[number, number]> = [];
  for (let step = 0; step < 3000; step++) {
    if (held.length > 0 && random() < 0.45) {
      const [start, count] = held.splice(randomInt(random, held.length), 1)[0]!;
      for (let i = 0; i < count; i++) owned.delete(start + i);
      if (random() < 0.5) allocator.release(start, count);
      else allocator.freeDeferred(start, count);
    } else {
      const count = 1 + randomInt(random, 16);
      const start = allocator.allocate(count);
      for (let i = 0; i < count; i++) {
        assert.ok(!owned.has(start + i), `chunk ${start + i} handed out twice (seed ${seed})`);
        owned.add(start + i);
      }
      held.push([start, count]);
    }
    if (random() < 0.05) allocator.releaseDeferred(allocator.deferredMark());
  }
  assert.equal(allocator.usedCount, owned.size);
  const rebuilt = ChunkAllocator.fromUsed(held.map(([physicalChunk, chunkCount]) => ({ physicalChunk, chunkCount })));
  assert.equal(rebuilt.usedCount, owned.size);
});

test('allocator: fromUsed refuses a chunk used twice', () => {
  assert.throws(() => ChunkAllocator.fromUsed([{ physicalChunk: 0, chunkCount: 4 }, { physicalChunk: 3, chunkCount: 1 }]), /used twice/);
});

const sampleRecords: MetaRecord[] = [
  { type: 'create', volumeId: 1, name: 'vol-a', sizeBytes: 64 * 2 ** 40 },
  { type: 'map', volumeId: 1, virtualChunk: 2 ** 33, physicalChunk: 5, chunkCount: 3 },
  { type: 'unmap', volumeId: 1, virtualChunk: 2 ** 33 + 1, chunkCount: 1 },
  { type: 'resize', volumeId: 1, sizeBytes: 128 * 2 ** 40 },
  { type: 'create', volumeId: 2, name: 'b', sizeBytes: 4096 },
  { type: 'remove', volumeId: 2 },
];

test('journal: records round-trip, and replay stops at a torn or zeroed tail', () => {
  const bytes = encodeRecords(sampleRecords);
  assert.deepEqual(decodeJournal(bytes).records, sampleRecords);
  const withZeros = Buffer.concat([bytes, Buffer.alloc(4096)]);
  assert.deepEqual(decodeJournal(withZeros), { records: sampleRecords, validBytes: bytes.length, tornTail: false });
  const torn = Buffer.from(withZeros);
  torn[bytes.length - 3]! ^= 0xff;
  const decoded = decodeJournal(torn);
  assert.equal(decoded.records.length, sampleRecords.length - 1);
  assert.equal(decoded.tornTail, true);
});

test('journal: applying records builds the catalog and reports frees', () => {
  const catalog = emptyCatalog();
  const freed: number[] = [];
  for (const record of sampleRecords) applyRecord(catalog, record, (run) => freed.push(run.physicalChunk, run.chunkCount));
  assert.deepEqual(freed, [6, 1]);
  const volume = catalog.byName.get('vol-a')!;
  assert.equal(volume.sizeBytes, 128 * 2 ** 40);
  assert.equal(volume.map.mappedCount, 2);
  assert.equal(catalog.byName.has('b'), false);
  assert.equal(catalog.nextVolumeId, 3);
  assert.throws(() => applyRecord(catalog, { type: 'map', volumeId: 1, virtualChunk: 2 ** 33, physicalChunk: 9, chunkCount: 1 }, () => {}), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT');
});

test('checkpoint: round-trips the catalog and refuses damage', () => {
  const catalog = emptyCatalog();
  for (const record of sampleRecords) applyRecord(catalog, record, () => {});
  const bytes = encodeCheckpoint(catalog, 7);
  const decoded = decodeCheckpoint(bytes);
  assert.equal(decoded.generation, 7);
  assert.deepEqual([...decoded.catalog.byName.get('vol-a')!.map.mappedRuns()], [...catalog.byName.get('vol-a')!.map.mappedRuns()]);
  const damaged = Buffer.from(bytes);
  damaged[20]! ^= 1;
  assert.throws(() => decodeCheckpoint(damaged), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT');
});

test('range lock: overlapping writes wait in order, reads share', async () => {
  const lock = new RangeLock();
  const order: string[] = [];
  const first = lock.acquire(0, 4, true);
  assert.equal(typeof first, 'function');
  const read = lock.acquire(10, 12, false);
  assert.equal(typeof read, 'function', 'a disjoint range is granted at once');
  const second = lock.acquire(2, 3, true) as Promise<() => void>;
  const third = lock.acquire(3, 6, false) as Promise<() => void>;
  void second.then((release) => { order.push('second'); release(); });
  void third.then((release) => { order.push('third'); release(); });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(order, []);
  (first as () => void)();
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(order, ['second', 'third']);
  (read as () => void)();
  assert.equal(lock.size, 0);
});
