// Unit tests of the store's pure parts: chunk maps, the allocator, journal records, checkpoints, range locks.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'vitest';
import { ChunkAllocator } from '../../src/store/allocator.ts';
import { blockChecksum, combinedChecksum, zeroChunkSum } from '../../src/store/checksum.ts';
import { chunkSums, firstPlanMismatch } from '../../src/store/chunk-io.ts';
import { ChunkMap, type ChunkRefs } from '../../src/store/chunk-map.ts';
import { ChunkRefcounts } from '../../src/store/chunk-refcounts.ts';
import { ChunkSums } from '../../src/store/chunk-sums.ts';
import { contentDigest, ContentDigest } from '../../src/store/content-digest.ts';
import { diffMaps } from '../../src/store/map-diff.ts';
import { chooseCheckpoint, decodeCheckpoint, encodeCheckpoint } from '../../src/store/checkpoint.ts';
import { encodeCommit, recoverJournal } from '../../src/store/journal-format.ts';
import { applyRecord, decodeRecord, emptyCatalog, encodeRecords, type MetaRecord } from '../../src/store/metadata.ts';
import { RangeLock } from '../../src/store/range-lock.ts';
import { ChunkdError } from '../../src/core/errors.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

/** Reference counts that remember which chunks were freed. */
function trackingRefs(): { refs: ChunkRefcounts; freed: number[] } {
  const freed: number[] = [];
  return {
    refs: new ChunkRefcounts((start, chunkCount) => {
      for (let i = 0; i < chunkCount; i++) freed.push(start + i);
    }),
    freed,
  };
}

/** Counts a chunk at a time only (its runs are loops of single counts), in a plain Map: the model for ChunkRefcounts' runs. */
class ModelRefs implements ChunkRefs {
  readonly counts = new Map<number, number>();
  readonly freed: number[] = [];
  increment(chunk: number): void {
    this.counts.set(chunk, (this.counts.get(chunk) ?? 0) + 1);
  }
  decrement(chunk: number): void {
    const count = this.counts.get(chunk) ?? 0;
    assert.ok(count > 0, `model: chunk ${chunk} released more often than referenced`);
    this.counts.set(chunk, count - 1);
    if (count === 1) this.freed.push(chunk);
  }
  incrementRun(start: number, chunkCount: number): void {
    for (let chunk = start; chunk < start + chunkCount; chunk++) this.increment(chunk);
  }
  decrementRun(start: number, chunkCount: number): void {
    for (let chunk = start; chunk < start + chunkCount; chunk++) this.decrement(chunk);
  }
}

test("chunk map: a write's counts change a run at a time, as they would a chunk at a time (seeded, across pages and count blocks)", () => {
  const seed = testSeed('map-runs');
  const random = makeRandom(seed);
  const { refs, freed } = trackingRefs();
  const model = new ModelRefs();
  const maps = [new ChunkMap()];
  const models = [new ChunkMap()];
  const snapshots: Array<[ChunkMap, ChunkMap]> = [];
  // Physical chunks from just below the count blocks' boundary (65,536), so that runs cross it.
  let nextPhysical = 65_536 - 3_000;
  let runCalls = 0;
  const countedRuns = { incrementRun: refs.incrementRun.bind(refs), decrementRun: refs.decrementRun.bind(refs) };
  refs.incrementRun = (start, count) => {
    runCalls += 1;
    countedRuns.incrementRun(start, count);
  };
  for (let step = 0; step < 400; step++) {
    const which = randomInt(random, maps.length);
    const roll = random();
    if (roll < 0.7) {
      const count = random() < 0.5 ? 1 + randomInt(random, 8) : 1 + randomInt(random, 700);
      const virtual = randomInt(random, 3_000);
      maps[which]!.mapRun(virtual, nextPhysical, count, refs);
      models[which]!.mapRun(virtual, nextPhysical, count, model);
      nextPhysical += count + (random() < 0.3 ? randomInt(random, 40) : 0);
    } else if (roll < 0.85) {
      const virtual = randomInt(random, 3_000);
      const count = 1 + randomInt(random, 600);
      assert.equal(maps[which]!.unmapRange(virtual, count, refs), models[which]!.unmapRange(virtual, count, model));
    } else if (roll < 0.93 || snapshots.length === 0) {
      snapshots.push([maps[which]!.clone(), models[which]!.clone()]);
    } else {
      const [snapshot, snapshotModel] = snapshots.splice(randomInt(random, snapshots.length), 1)[0]!;
      snapshot.drop(refs);
      snapshotModel.drop(model);
    }
    if (random() < 0.02 && snapshots.length > 0) {
      // A clone written to as a volume of its own.
      const [snapshot, snapshotModel] = snapshots[randomInt(random, snapshots.length)]!;
      maps.push(snapshot.clone());
      models.push(snapshotModel.clone());
    }
  }
  assert.ok(runCalls > 0, "the map used the counts' run methods");
  for (let chunk = 65_536 - 3_000; chunk < nextPhysical; chunk++) assert.equal(refs.get(chunk), model.counts.get(chunk) ?? 0, `count of chunk ${chunk} (seed ${seed})`);
  assert.deepEqual([...freed].sort((a, b) => a - b), [...model.freed].sort((a, b) => a - b), `chunks freed (seed ${seed})`);
  for (let i = 0; i < maps.length; i++) assert.deepEqual(maps[i]!.runs(0, 3_700), models[i]!.runs(0, 3_700));
});

test('chunk counts: runs across a block boundary; onFree once per run falling to zero, in order; an extra release is refused', () => {
  const runs: Array<[number, number]> = [];
  const refs = new ChunkRefcounts((start, count) => runs.push([start, count]));
  refs.incrementRun(65_530, 10); // two blocks
  refs.increment(65_533);
  refs.decrementRun(65_530, 10);
  assert.deepEqual(runs, [[65_530, 3], [65_534, 6]], 'chunk 65,533 still held: two runs freed, one across the boundary');
  assert.equal(refs.get(65_533), 1);
  assert.throws(() => refs.decrementRun(65_532, 2), /chunk 65532 released more often than referenced/);
});

test("chunk map: a shared page's copy on write and its last holder's release change the counts a page at a time, as a chunk at a time would (across count blocks)", () => {
  const { refs, freed } = trackingRefs();
  const model = new ModelRefs();
  const calls = { incrementSlots: 0, decrementSlots: 0, increment: 0, decrement: 0 };
  for (const name of ['incrementSlots', 'decrementSlots', 'increment', 'decrement'] as const) {
    const real = (refs[name] as (x: never) => void).bind(refs);
    (refs as unknown as Record<string, (x: unknown) => void>)[name] = (x: unknown) => {
      calls[name] += 1;
      real(x as never);
    };
  }
  const map = new ChunkMap();
  const mapModel = new ChunkMap();
  // Two pages (512 chunks each) of scattered chunks on both sides of the count blocks' boundary (65,536), a hole each.
  const physical = (v: number): number => (v % 2 === 0 ? 65_000 : 65_536 + 400) + v * 3;
  for (let v = 0; v < 1024; v++) {
    if (v === 5 || v === 700) continue;
    map.mapRun(v, physical(v), 1, refs);
    mapModel.mapRun(v, physical(v), 1, model);
  }
  const snapshot = map.clone();
  const snapshotModel = mapModel.clone();
  // A write to each page: each is copied, its 511 chunks counted twice.
  map.mapRun(10, 200_000, 1, refs);
  mapModel.mapRun(10, 200_000, 1, model);
  map.mapRun(600, 200_001, 1, refs);
  mapModel.mapRun(600, 200_001, 1, model);
  assert.equal(calls.incrementSlots, 2, 'one count call per copied page');
  assert.equal(calls.increment, 0);
  assert.equal(refs.get(physical(11)), 2);
  assert.equal(refs.get(physical(10)), 1, "the overwritten chunk is the snapshot's alone");
  // The volume's pages dropped first: its own chunks (the two written) are freed, the rest stay for the snapshot.
  map.drop(refs);
  mapModel.drop(model);
  assert.equal(calls.decrementSlots, 2, 'one count call per page let go of');
  assert.deepEqual([...freed].sort((a, b) => a - b), [200_000, 200_001]);
  snapshot.drop(refs);
  snapshotModel.drop(model);
  assert.equal(calls.decrement, 0);
  assert.deepEqual([...freed].sort((a, b) => a - b), [...model.freed].sort((a, b) => a - b));
  for (let v = 0; v < 1024; v++) assert.equal(refs.get(physical(v)), 0);
});

test('chunk counts by page slots: onFree once per run of chunks (in slot order) falling to zero; an extra release is refused', () => {
  const runs: Array<[number, number]> = [];
  const refs = new ChunkRefcounts((start, count) => runs.push([start, count]));
  const slots = new Float64Array(8);
  // Chunks 65,534..65,537 (across the boundary) then 10 and 11, a hole between; slot = chunk + 1.
  slots.set([65_535, 65_536, 0, 65_537, 65_538, 11, 12, 0]);
  refs.incrementSlots(slots);
  refs.increment(65_536);
  assert.equal(refs.get(65_534), 1);
  assert.equal(refs.get(65_536), 2);
  refs.decrementSlots(slots);
  assert.deepEqual(runs, [[65_534, 2], [65_537, 1], [10, 2]], 'chunk 65,536 still held');
  assert.throws(() => refs.decrementSlots(slots), /chunk 65534 released more often than referenced/);
});

test("chunk counts hold more distinct chunks than a Map can (2^24: fsck's walk of 64 GiB of chunks in use threw) and chunk numbers past 32 bits", () => {
  const counts = new ChunkRefcounts(() => assert.fail('nothing is freed'));
  assert.equal(counts.end(), 0);
  const n = 2 ** 24 + 3;
  for (let chunk = 0; chunk < n; chunk++) counts.increment(chunk);
  counts.increment(70_000);
  assert.equal(counts.get(70_000), 2);
  assert.equal(counts.get(n - 1), 1);
  assert.equal(counts.get(n), 0);
  assert.equal(counts.end(), n);
  counts.increment(2 ** 40); // a page or chunk number past 32 bits
  assert.equal(counts.get(2 ** 40), 1);
  assert.equal(counts.get(2 ** 40 - 1), 0);
  assert.equal(counts.end(), 2 ** 40 + 1);
});

test('chunk map: runs split holes and physically contiguous stretches', () => {
  const { refs, freed } = trackingRefs();
  const map = new ChunkMap();
  map.mapRun(10, 100, 4, refs);
  map.mapRun(14, 200, 2, refs);
  assert.deepEqual(map.runs(8, 10), [
    { virtualChunk: 8, chunkCount: 2, physicalChunk: -1 },
    { virtualChunk: 10, chunkCount: 4, physicalChunk: 100 },
    { virtualChunk: 14, chunkCount: 2, physicalChunk: 200 },
    { virtualChunk: 16, chunkCount: 2, physicalChunk: -1 },
  ]);
  // One chunk (a 4 KiB read's lookup) takes a shorter way: mapped, a hole in a page, a hole with no page.
  assert.deepEqual(map.runs(11, 1), [{ virtualChunk: 11, chunkCount: 1, physicalChunk: 101 }]);
  assert.deepEqual(map.runs(9, 1), [{ virtualChunk: 9, chunkCount: 1, physicalChunk: -1 }]);
  assert.deepEqual(map.runs(1_000_000, 1), [{ virtualChunk: 1_000_000, chunkCount: 1, physicalChunk: -1 }]);
  assert.equal(map.mappedCount, 6);
  assert.equal(map.unmapRange(12, 3, refs), 3);
  assert.deepEqual(freed, [102, 103, 200]);
  assert.equal(map.mappedCount, 3);
  assert.equal(map.get(12), -1);
  assert.equal(map.get(15), 201);
  map.mapRun(15, 300, 1, refs);
  assert.deepEqual(freed, [102, 103, 200, 201], 'remapping a chunk releases the old one');
});

test('chunk map: a 64 TiB volume maps its far end and skips empty pages', () => {
  const { refs } = trackingRefs();
  const map = new ChunkMap();
  const lastChunk = (64 * 2 ** 40) / 4096 - 1;
  map.mapRun(lastChunk, 7, 1, refs);
  assert.equal(map.get(lastChunk), 7);
  const runs = map.runs(0, lastChunk + 1);
  assert.deepEqual(runs[runs.length - 1], { virtualChunk: lastChunk, chunkCount: 1, physicalChunk: 7 });
  assert.deepEqual([...map.mappedRuns()], [{ virtualChunk: lastChunk, chunkCount: 1, physicalChunk: 7 }]);
  assert.equal(map.unmapRange(0, lastChunk + 1, refs), 1);
});

test('chunk map: clones share pages; a write copies the page, not the data; drop frees what only it held', () => {
  const { refs, freed } = trackingRefs();
  const volume = new ChunkMap();
  volume.mapRun(0, 0, 600, refs); // two pages
  const snapshot = volume.clone();
  assert.equal(refs.get(5), 1, 'a clone adds no chunk references: pages are shared');
  volume.mapRun(5, 1000, 1, refs);
  assert.equal(refs.get(6), 2, 'writing into a shared page copies it: its chunks are referenced from both copies');
  assert.equal(refs.get(5), 1, 'the replaced chunk keeps the snapshot copy\'s reference');
  assert.equal(refs.get(550), 1, 'the other page is still shared, untouched');
  assert.equal(snapshot.get(5), 5);
  assert.equal(volume.get(5), 1000);
  assert.deepEqual(freed, []);
  assert.deepEqual(diffMaps(snapshot, volume, 600), [{ virtualChunk: 5, chunkCount: 1 }]);
  snapshot.drop(refs);
  assert.deepEqual(freed, [5], 'dropping the snapshot frees only the chunk it alone held');
  assert.equal(volume.get(550), 550);
  volume.drop(refs);
  assert.equal(freed.length, 601);
});
test('map diff: "anything changed?" stops at the first changed chunk; maps alike again after a copied page differ nowhere', () => {
  const { refs } = trackingRefs();
  const volume = new ChunkMap();
  volume.mapRun(0, 0, 600, refs); // two pages
  const snapshot = volume.clone();
  assert.deepEqual(diffMaps(snapshot, volume, 600, true), [], 'every page shared');
  volume.mapRun(520, 1001, 2, refs);
  volume.mapRun(7, 1003, 1, refs);
  volume.mapRun(5, 1000, 1, refs);
  assert.deepEqual(diffMaps(snapshot, volume, 600), [{ virtualChunk: 5, chunkCount: 1 }, { virtualChunk: 7, chunkCount: 1 }, { virtualChunk: 520, chunkCount: 2 }]);
  assert.deepEqual(diffMaps(snapshot, volume, 600, true), [{ virtualChunk: 5, chunkCount: 1 }]);
  assert.deepEqual(diffMaps(snapshot, volume, 521, true), [{ virtualChunk: 5, chunkCount: 1 }]);
  volume.mapRun(5, 5, 1, refs);
  volume.mapRun(7, 7, 1, refs);
  assert.deepEqual(diffMaps(snapshot, volume, 600, true), [{ virtualChunk: 520, chunkCount: 1 }], 'the first page is copied but as it was: the second page\'s change is found');
  assert.deepEqual(diffMaps(snapshot, volume, 520, true), [], 'nothing changed below the limit');
  volume.mapRun(520, 520, 2, refs);
  assert.deepEqual(diffMaps(snapshot, volume, 600, true), []);
});

test('content digest: the bytes its definition names, in both of its paths', async () => {
  const seed = testSeed('content digest');
  const random = makeRandom(seed);
  const { refs } = trackingRefs();
  const sizeBytes = 2 ** 34 * 4096; // virtual chunks past 2^32: the u64's high half is not 0
  const chunkLimit = sizeBytes / 4096;
  const map = new ChunkMap();
  const sums = new ChunkSums();
  const zeroSum = blockChecksum(new Uint8Array(4096));
  let physical = 0;
  // Scattered runs (12,000 chunks: three batches and a part), some chunks of zeros, some at the ends of the volume.
  const starts = [0, chunkLimit - 700, 2 ** 32 - 300, ...Array.from({ length: 40 }, () => randomInt(random, chunkLimit - 300))];
  for (const start of starts) {
    const count = 1 + randomInt(random, 299);
    map.mapRun(start, physical, count, refs);
    sums.setRun(physical, Array.from({ length: count }, () => (random() < 0.1 ? zeroSum : randomInt(random, 2 ** 32))));
    physical += count;
  }
  // What content-digest.ts's note defines, written the plain way.
  const hash = createHash('sha256').update('chunkd-content-digest-v1\n', 'latin1');
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(sizeBytes));
  hash.update(size);
  const runs = [...map.mappedRuns()];
  for (const run of runs) {
    for (let i = 0; i < run.chunkCount; i++) {
      const sum = sums.get(run.physicalChunk + i);
      if (sum === zeroSum) continue;
      const entry = Buffer.alloc(12);
      entry.writeBigUInt64LE(BigInt(run.virtualChunk + i));
      entry.writeUInt32LE(sum, 8);
      hash.update(entry);
    }
  }
  const expected = hash.digest();
  assert.ok((await contentDigest(map, sums, sizeBytes)).equals(expected), 'the walk of a chunk map');
  const fed = new ContentDigest(sizeBytes);
  for (const run of runs) fed.add(run.virtualChunk, run.chunkCount, (i) => sums.get(run.physicalChunk + i));
  assert.ok(fed.digest().equals(expected), 'runs fed one by one (the paged catalog\'s way)');
  // Chunks past the size are left out: a snapshot taken before a shrink still maps them.
  const shrunk = sizeBytes - 600 * 4096;
  const clipped = new ContentDigest(shrunk);
  for (const run of runs) clipped.add(run.virtualChunk, run.chunkCount, (i) => sums.get(run.physicalChunk + i));
  assert.ok(clipped.digest().equals(await contentDigest(map, sums, shrunk)));
  assert.ok(!(await contentDigest(map, sums, shrunk)).equals(expected));
});
test('allocator: contiguous runs, deferred frees reused only after release, high-water mark shrinks', () => {
  const allocator = new ChunkAllocator();
  assert.equal(allocator.allocate(4), 0);
  assert.equal(allocator.allocate(2), 4);
  allocator.freeDeferred(0, 4);
  assert.equal(allocator.allocate(1), 6, 'a deferred free is not reused before its commit');
  const mark = allocator.deferredMark();
  allocator.freeDeferred(4, 2);
  const taken = allocator.takeDeferred(mark);
  assert.deepEqual(taken, [{ start: 0, count: 4, punch: true }], 'a free after the mark is not merged into one the commit claimed');
  allocator.releaseTaken(taken);
  allocator.releaseTaken(allocator.takeDeferred(allocator.deferredMark()));
  assert.equal(allocator.allocate(3), 0);
  allocator.release(6, 1);
  allocator.release(0, 3);
  assert.equal(allocator.highWater, 0);
  assert.equal(allocator.usedCount, 0);
});

test('allocator: holdFree holds a span\'s free chunks below the mark (not deferred ones, not used ones) until releaseTaken', () => {
  const allocator = new ChunkAllocator();
  assert.equal(allocator.allocate(8200), 0);
  allocator.release(2, 3);
  allocator.release(8100, 50);
  allocator.freeDeferred(10, 1);
  assert.equal(allocator.pagesInUse, 2);
  const first = allocator.holdFree(0);
  assert.deepEqual(first, [{ start: 2, count: 3, punch: true }, { start: 8100, count: 50, punch: true }], 'the deferred free and the chunks in use are not held');
  assert.deepEqual(allocator.holdFree(1), [], 'the second span (8192 on) is all in use');
  assert.equal(allocator.usedCount, 8200 - 53 - 1, 'held chunks are not counted as used');
  assert.equal(allocator.allocate(3), 8200, 'no allocation returns a held chunk: the run goes above the mark');
  allocator.releaseTaken(first);
  assert.equal(allocator.allocate(3), 2, 'released, they are reused');
  assert.deepEqual(allocator.holdFree(0), [{ start: 8100, count: 50, punch: true }]);
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
      const count = random() < 0.1 ? 64 + randomInt(random, 200) : 1 + randomInt(random, 16);
      const start = allocator.allocate(count);
      for (let i = 0; i < count; i++) {
        assert.ok(!owned.has(start + i), `chunk ${start + i} handed out twice (seed ${seed})`);
        owned.add(start + i);
      }
      held.push([start, count]);
    }
    if (random() < 0.05) allocator.releaseTaken(allocator.takeDeferred(allocator.deferredMark()));
  }
  assert.equal(allocator.usedCount, owned.size);
  const rebuilt = ChunkAllocator.fromUsed(held.map(([physicalChunk, chunkCount]) => ({ physicalChunk, chunkCount })));
  assert.equal(rebuilt.usedCount, owned.size);
});

test('allocator: a large run is found among scattered single free chunks; a failed search is not repeated until a free', () => {
  // 200,000 chunks in use but for every 7th, and a free hole of 300 at 123,457 (not word-aligned).
  const used: Array<{ physicalChunk: number; chunkCount: number }> = [];
  const holeStart = 123_457;
  for (let chunk = 0; chunk < 200_000; chunk++) {
    const inHole = chunk >= holeStart && chunk < holeStart + 300;
    if (!inHole && chunk % 7 !== 3) used.push({ physicalChunk: chunk, chunkCount: 1 });
  }
  const allocator = ChunkAllocator.fromUsed(used);
  assert.equal(allocator.allocate(256), holeStart, 'the one run of 256 below the mark');
  assert.equal(allocator.allocate(40), holeStart + 256, 'a small run: the rest of the hole, next fit');
  assert.equal(allocator.allocate(256), 200_000, 'no run of 256 left below the mark: above it');
  assert.equal(allocator.allocate(300), 200_256, 'larger: not searched again');
  assert.equal(allocator.allocate(1), 3, 'small ones still fill the single free chunks (from the start, past the cursor)');
  allocator.release(holeStart, 256);
  assert.equal(allocator.allocate(256), holeStart, 'a free makes the search worth doing again');
  // Runs of 64 or more that start and end mid-word, and one cut short by the mark.
  const runs = new ChunkAllocator();
  runs.allocate(1000);
  runs.release(37, 70); // [37, 107)
  runs.release(500, 64); // [500, 564)
  assert.equal(runs.allocate(65), 37);
  assert.equal(runs.allocate(64), 500);
  runs.release(900, 100); // reaches the mark: lowers it to 900
  assert.equal(runs.highWater, 900);
  assert.equal(runs.allocate(100), 900);
});

test("allocator: a run's bits set and cleared a word at a time, within a word and across words; a double free is refused", () => {
  const allocator = new ChunkAllocator();
  assert.equal(allocator.allocate(3), 0);
  assert.equal(allocator.allocate(100), 3); // [3, 103): the rest of word 0, words 1 and 2, part of word 3
  assert.equal(allocator.allocate(40), 103);
  allocator.release(3, 100);
  assert.equal(allocator.allocate(29), 3, 'the top of word 0 alone');
  assert.equal(allocator.allocate(71), 32, 'words 1 and 2 and the start of word 3, up to the run after it');
  assert.throws(() => allocator.allocate(0));
  allocator.release(40, 10);
  assert.throws(() => allocator.release(45, 20), /double free/, 'part of the range free already');
  assert.throws(() => allocator.release(40, 1), /double free/);
  assert.equal(allocator.allocate(10), 40, 'the refused frees cleared no bit of theirs (each failed at its first word)');
  assert.equal(allocator.allocate(1), 143, 'nor any other');
});

test('allocator: fromUsed refuses a chunk used twice', () => {
  assert.throws(() => ChunkAllocator.fromUsed([{ physicalChunk: 0, chunkCount: 4 }, { physicalChunk: 3, chunkCount: 1 }]), /used twice/);
});

const sampleRecords: MetaRecord[] = [
  { type: 'create', volumeId: 1, name: 'vol-a', sizeBytes: 64 * 2 ** 40 },
  { type: 'map', volumeId: 1, virtualChunk: 2 ** 33, physicalChunk: 5, chunkCount: 3, sums: Uint32Array.of(0xdeadbeef, 0, 0xffffffff) },
  { type: 'unmap', volumeId: 1, virtualChunk: 2 ** 33 + 1, chunkCount: 1 },
  { type: 'resize', volumeId: 1, sizeBytes: 128 * 2 ** 40 },
  { type: 'snapshot', volumeId: 1, snapshotId: 1, name: 'snap', createdAtMs: 1_700_000_000_000 },
  { type: 'map', volumeId: 1, virtualChunk: 2 ** 33, physicalChunk: 9, chunkCount: 1, sums: Uint32Array.of(42) },
  { type: 'clone', volumeId: 2, name: 'copy', snapshotId: 1 },
  { type: 'snapshot-remove', snapshotId: 1 },
  { type: 'create', volumeId: 3, name: 'b', sizeBytes: 4096 },
  { type: 'remove', volumeId: 3 },
];

/** Two journal copies holding `commits` (each a list of records), followed by zeros as the reserved space is. */
function journalCopies(generation: number, commits: MetaRecord[][], reserveBytes = 4096): [Buffer, Buffer] {
  const bytes = Buffer.concat([...commits.map((records, i) => encodeCommit(generation, i + 1, encodeRecords(records))), Buffer.alloc(reserveBytes)]);
  return [bytes, Buffer.from(bytes)];
}

const commits = [sampleRecords.slice(0, 3), sampleRecords.slice(3, 4), sampleRecords.slice(4)];

test('journal: commits round-trip from two copies; zeros end the journal; another generation is not read', () => {
  const [a, b] = journalCopies(4, commits);
  const recovered = recoverJournal([a, b], 4);
  assert.deepEqual(recovered.records, sampleRecords);
  assert.equal(recovered.commitCount, 3);
  assert.deepEqual([recovered.repairs, recovered.tornTail, recovered.damage], [[], false, null]);
  assert.equal(recovered.endBytes % 8, 0);
  assert.equal(recoverJournal([a, b], 5).commitCount, 0, 'a journal of another generation holds nothing of this one');
  assert.equal(recoverJournal([null, null], 4).commitCount, 0);
});

test('journal: a torn last commit is dropped as a torn tail; the same damage before a later commit is refused', () => {
  const [a, b] = journalCopies(1, commits);
  const lastStart = recoverJournal([a, b], 1).endBytes - encodeCommit(1, 3, encodeRecords(commits[2]!)).length;
  // A crash tore the last commit in both copies: it was never acknowledged, and nothing follows it.
  const tornA = Buffer.from(a);
  const tornB = Buffer.from(b);
  tornA.fill(0, lastStart + 40);
  tornB.fill(0xab, lastStart + 30, lastStart + 34);
  const torn = recoverJournal([tornA, tornB], 1);
  assert.deepEqual([torn.commitCount, torn.tornTail, torn.damage], [2, true, null]);
  assert.deepEqual(torn.records, sampleRecords.slice(0, 4));
  // A crash between the copies' writes: the last commit is whole in one copy and partly zeros in the other. Kept,
  // and a torn tail, not damage; a flipped byte there instead is damage, read from the other copy.
  const halfWritten = Buffer.from(a);
  halfWritten.fill(0, lastStart + 16, lastStart + 40);
  const oneCopy = recoverJournal([halfWritten, b], 1);
  assert.deepEqual([oneCopy.records, oneCopy.repairs, oneCopy.tornTail], [sampleRecords, [], true]);
  // A crash that tore the last commit in both copies, at different sectors: every frame is whole in one of them,
  // so the commit is read frame by frame, and it is a torn tail, not damage (found by the power-loss soak).
  const big: MetaRecord[] = Array.from({ length: 40 }, (_, i) => ({ type: 'map', volumeId: 1, virtualChunk: i, physicalChunk: 100 + i, chunkCount: 1, sums: Uint32Array.of(i) }));
  const [bigA, bigB] = journalCopies(1, [sampleRecords.slice(0, 1), big]);
  const bigStart = encodeCommit(1, 1, encodeRecords(sampleRecords.slice(0, 1))).length;
  const firstSector = Math.ceil(bigStart / 512) * 512;
  bigA.fill(0, firstSector, firstSector + 512);
  bigB.fill(0, firstSector + 1024, firstSector + 1536);
  const bothTorn = recoverJournal([bigA, bigB], 1);
  assert.deepEqual([bothTorn.records.length, bothTorn.repairs, bothTorn.tornTail, bothTorn.damage], [41, [], true, null]);
  const flipped = Buffer.from(a);
  flipped[lastStart + 30]! ^= 0x40;
  const damagedLast = recoverJournal([b, flipped], 1);
  assert.deepEqual([damagedLast.records, damagedLast.repairs, damagedLast.tornTail], [sampleRecords, [{ copy: 1, offsetBytes: lastStart, sequence: 3 }], false]);
  // Damage to commit 2 in both copies, with commit 3 whole after it: damage, never a torn tail.
  const secondStart = encodeCommit(1, 1, encodeRecords(commits[0]!)).length;
  const damagedA = Buffer.from(a);
  const damagedB = Buffer.from(b);
  damagedA[secondStart + 30]! ^= 1;
  damagedB[secondStart + 30]! ^= 1;
  const damaged = recoverJournal([damagedA, damagedB], 1);
  assert.equal(damaged.commitCount, 1);
  assert.deepEqual(damaged.damage, { offsetBytes: secondStart, sequence: 2, later: { offsetBytes: lastStart, sequence: 3 } });
  assert.equal(damaged.tornTail, false);
  // The same byte of the last commit flipped in both copies: both were written whole, so it was acknowledged:
  // damage, not a torn tail.
  const lastA = Buffer.from(a);
  const lastB = Buffer.from(b);
  lastA[lastStart + 30]! ^= 1;
  lastB[lastStart + 30]! ^= 1;
  const lastDamaged = recoverJournal([lastA, lastB], 1);
  assert.deepEqual([lastDamaged.commitCount, lastDamaged.tornTail, lastDamaged.damage], [2, false, { offsetBytes: lastStart, sequence: 3, later: null }]);
});

test('journal: damage in one copy is read from the other; damage in different frames of both copies is read frame by frame', () => {
  const [a, b] = journalCopies(2, commits);
  const whole = recoverJournal([a, b], 2);
  for (const offset of [0, 5, 12, 30, 60, whole.endBytes - 3]) {
    const damaged = Buffer.from(a);
    damaged[offset]! ^= 0x10;
    const recovered = recoverJournal([damaged, b], 2);
    assert.deepEqual(recovered.records, sampleRecords, `flip at ${offset}`);
    assert.equal(recovered.damage, null);
    assert.equal(recovered.repairs.length, 1, `flip at ${offset}: one commit of copy 0 is repaired`);
    assert.equal(recovered.repairs[0]!.copy, 0);
    const swapped = recoverJournal([b, damaged], 2);
    assert.deepEqual([swapped.records.length, swapped.repairs[0]!.copy], [sampleRecords.length, 1]);
  }
  // The first commit holds three records (three frames): break the first frame in copy 0 and the third in copy 1.
  const firstFrameByte = 24 + 10;
  const thirdFrameByte = encodeCommit(2, 1, encodeRecords(commits[0]!)).length - 12;
  const brokenA = Buffer.from(a);
  const brokenB = Buffer.from(b);
  brokenA[firstFrameByte]! ^= 1;
  brokenB[thirdFrameByte]! ^= 1;
  const merged = recoverJournal([brokenA, brokenB], 2);
  assert.deepEqual(merged.records, sampleRecords);
  assert.deepEqual(merged.repairs.map((repair) => repair.copy).sort(), [0, 1]);
  // A missing copy: everything is read from the other and counted as repaired there.
  const missing = recoverJournal([null, b], 2);
  assert.deepEqual([missing.records.length, missing.repairs.length], [sampleRecords.length, 3]);
});

test("journal: a map record's checksums are encoded from a view into a larger array as from an array of their own", () => {
  const record = (sums: Uint32Array): MetaRecord => ({ type: 'map', volumeId: 1, virtualChunk: 7, physicalChunk: 9, chunkCount: sums.length, sums });
  // A few checksums are written one by one, many copied as bytes: both, from a view that does not start its array.
  for (const count of [3, 40]) {
    const all = Uint32Array.from({ length: count + 2 }, (_, i) => (i * 0x9e3779b1) >>> 0);
    all.set([0xdeadbeef, 0x01020304, 0xffffffff], count - 2);
    const fromView = encodeRecords([record(all.subarray(1, count + 1))]);
    assert.deepEqual(fromView, encodeRecords([record(Uint32Array.from(all.subarray(1, count + 1)))]));
    assert.deepEqual([...fromView.subarray(fromView.length - 12)], [0xef, 0xbe, 0xad, 0xde, 4, 3, 2, 1, 0xff, 0xff, 0xff, 0xff], 'little-endian');
    assert.deepEqual((decodeRecord(fromView.subarray(8)) as { sums: Uint32Array }).sums, all.subarray(1, count + 1), 'decodes to the same checksums');
  }
});

test('journal: applying records builds the catalog; shared chunks are freed only when nothing holds them', () => {
  const catalog = emptyCatalog();
  const { refs, freed } = trackingRefs();
  for (const record of sampleRecords) applyRecord(catalog, record, refs);
  assert.deepEqual(freed, [6], 'the unmapped chunk; chunk 5, remapped after the snapshot, lives on in the clone');
  const volume = catalog.byName.get('vol-a')!;
  assert.equal(volume.sizeBytes, 128 * 2 ** 40);
  assert.deepEqual([volume.map.get(2 ** 33), catalog.byName.get('copy')!.map.get(2 ** 33)], [9, 5]);
  assert.equal(catalog.byName.has('b'), false);
  assert.equal(catalog.snapshots.size, 0);
  assert.equal(catalog.nextVolumeId, 4);
  assert.deepEqual([catalog.sums.get(5), catalog.sums.get(7), catalog.sums.get(9)], [0xdeadbeef, 0xffffffff, 42], 'checksums belong to physical chunks');
  assert.throws(() => applyRecord(catalog, { type: 'map', volumeId: 1, virtualChunk: 0, physicalChunk: 20, chunkCount: 2, sums: Uint32Array.of(1) }, refs), /checksum for each chunk/);
  assert.throws(() => applyRecord(catalog, { type: 'map', volumeId: 77, virtualChunk: 0, physicalChunk: 9, chunkCount: 1, sums: Uint32Array.of(1) }, refs), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT');
  assert.throws(() => applyRecord(catalog, { type: 'rollback', volumeId: 1, snapshotId: 1 }, refs), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT');
});

test('checkpoint: round-trips the catalog with shared pages stored once, and refuses damage', () => {
  const catalog = emptyCatalog();
  const { refs } = trackingRefs();
  for (const record of sampleRecords.slice(0, 7)) applyRecord(catalog, record, refs);
  for (let i = 2; i < 40; i++) applyRecord(catalog, { type: 'snapshot', volumeId: 1, snapshotId: i, name: `s${i}`, createdAtMs: i }, refs);
  const bytes = encodeCheckpoint(catalog, 7);
  assert.ok(bytes.length < 8192, `40 maps sharing their pages take ${bytes.length} bytes`);
  const decoded = decodeCheckpoint(bytes);
  assert.equal(decoded.generation, 7);
  assert.equal(decoded.catalog.snapshots.size, 39);
  for (const name of ['vol-a', 'copy']) {
    assert.deepEqual([...decoded.catalog.byName.get(name)!.map.mappedRuns()], [...catalog.byName.get(name)!.map.mappedRuns()]);
  }
  assert.deepEqual([...decoded.catalog.byName.get('vol-a')!.snapshots.get('s9')!.map.mappedRuns()], [...catalog.byName.get('vol-a')!.map.mappedRuns()]);
  assert.deepEqual([5, 7, 9].map((chunk) => decoded.catalog.sums.get(chunk)), [0xdeadbeef, 0xffffffff, 42], 'checksums survive the checkpoint, shared chunks included');
  const damaged = Buffer.from(bytes);
  damaged[20]! ^= 1;
  assert.throws(() => decodeCheckpoint(damaged), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT');
  assert.throws(() => decodeCheckpoint(bytes.subarray(0, bytes.length - 1)), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT', 'a checkpoint cut short');

  // Two copies: the whole one is used and the other reported; the newer of two whole ones wins (a rotation cut short).
  const choice = chooseCheckpoint([damaged, bytes]);
  assert.deepEqual([choice.generation, choice.damagedCopies.map((d) => d.copy), choice.staleCopies], [7, [0], []]);
  const older = encodeCheckpoint(catalog, 6);
  const rotation = chooseCheckpoint([bytes, older]);
  assert.deepEqual([rotation.generation, rotation.damagedCopies, rotation.staleCopies], [7, [], [1]]);
  const missing = chooseCheckpoint([null, bytes]);
  assert.deepEqual(missing.damagedCopies, [{ copy: 0, offsetBytes: 0 }]);
  // Both damaged in different places: read frame by frame. Both damaged in the same frame: refused, naming where.
  const otherDamage = Buffer.from(bytes);
  otherDamage[bytes.length - 20]! ^= 1;
  const merged = chooseCheckpoint([damaged, otherDamage]);
  assert.equal(merged.catalog.snapshots.size, 39);
  assert.deepEqual(merged.damagedCopies.map((d) => d.copy), [0, 1]);
  assert.throws(() => chooseCheckpoint([damaged, Buffer.from(damaged)]), /no whole checkpoint: checkpoint\.0 is damaged at byte 0, checkpoint\.1 is damaged at byte 0/);
  assert.throws(() => chooseCheckpoint([null, damaged]), /checkpoint\.0 is missing, checkpoint\.1 is damaged/);
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

test('checksums: a run combined from its blocks\' checksums equals the checksum of its bytes; a flipped byte is found in its block', () => {
  const random = makeRandom(testSeed('checksums'));
  const chunk = 4096;
  const data = Buffer.alloc(40 * chunk);
  for (let i = 0; i < data.length; i++) data[i] = randomInt(random, 256);
  const sums = chunkSums(data);
  for (const [from, count] of [[0, 1], [0, 2], [3, 17], [0, 40], [39, 1]] as const) {
    assert.equal(combinedChecksum(sums, from, count), blockChecksum(data.subarray(from * chunk, (from + count) * chunk)), `run of ${count} from ${from}`);
  }
  // Two runs in one target: 24 chunks at target chunk 0, 16 at target chunk 24 (the plan's physical chunks do not matter here).
  const plan = new Float64Array([100, 24, 0, 500, 16, 24]);
  assert.equal(firstPlanMismatch(data, plan, sums), null);
  for (const chunkIndex of [0, 13, 23, 24, 31, 39]) {
    const damaged = Buffer.from(data);
    const byte = chunkIndex * chunk + randomInt(random, chunk);
    damaged[byte] = damaged[byte]! ^ (1 << randomInt(random, 8));
    const mismatch = firstPlanMismatch(damaged, plan, sums);
    assert.equal(mismatch?.chunkIndex, chunkIndex, `damage at byte ${byte}`);
    assert.equal(mismatch?.expected, sums[chunkIndex]);
    assert.equal(mismatch?.actual, blockChecksum(damaged.subarray(chunkIndex * chunk, (chunkIndex + 1) * chunk)));
  }
  // A range rewritten at random: runs of 1-3 chunks back to back in the target (checked as one stretch), then a
  // hole (target chunks 20-21, not in the plan), then more runs. `expected` holds the planned chunks' sums in order.
  const runs: Array<[number, number]> = [[0, 1], [1, 3], [4, 1], [5, 2], [7, 1], [8, 12], [22, 1], [23, 3], [26, 14]];
  const scattered = new Float64Array(runs.flatMap(([targetChunk, count], i) => [1000 + 37 * i, count, targetChunk]));
  const planned = runs.flatMap(([targetChunk, count]) => Array.from({ length: count }, (_, k) => targetChunk + k));
  const plannedSums = Uint32Array.from(planned, (targetChunk) => sums[targetChunk]!);
  assert.equal(firstPlanMismatch(data, scattered, plannedSums), null);
  const holeDamaged = Buffer.from(data);
  holeDamaged[20 * chunk + 5] = holeDamaged[20 * chunk + 5]! ^ 1;
  assert.equal(firstPlanMismatch(holeDamaged, scattered, plannedSums), null, 'a hole is not the plan\'s to check');
  for (const targetChunk of [0, 1, 3, 4, 6, 7, 19, 22, 25, 39]) {
    const damaged = Buffer.from(data);
    const byte = targetChunk * chunk + randomInt(random, chunk);
    damaged[byte] = damaged[byte]! ^ (1 << randomInt(random, 8));
    const mismatch = firstPlanMismatch(damaged, scattered, plannedSums);
    assert.equal(mismatch?.chunkIndex, planned.indexOf(targetChunk), `damage at byte ${byte} (target chunk ${targetChunk})`);
    assert.equal(mismatch?.expected, sums[targetChunk]);
  }
  // Two damaged chunks in one stretch: the first in plan order is named.
  const twice = Buffer.from(data);
  twice[9 * chunk] = twice[9 * chunk]! ^ 4;
  twice[2 * chunk + 7] = twice[2 * chunk + 7]! ^ 2;
  assert.equal(firstPlanMismatch(twice, scattered, plannedSums)?.chunkIndex, planned.indexOf(2));
});

test('content digest: sha256 of the label, the size and (virtual chunk u64 LE, CRC u32 LE) of each chunk not of zeros, as the stream format says', async () => {
  const { refs } = trackingRefs();
  const map = new ChunkMap();
  const far = 2 ** 32 + 3; // a virtual chunk whose u64 needs its high half (a volume over 16 TiB)
  map.mapRun(0, 10, 3, refs);
  map.mapRun(7, 40, 2, refs);
  map.mapRun(far, 50, 2, refs);
  const sums = new Map<number, number>([[10, 0xdeadbeef], [11, zeroChunkSum], [12, 7], [40, 0x80000000], [41, 1], [50, 0xffffffff], [51, 2]]);
  const sizeBytes = (far + 2) * 4096;
  // Built here with BigInt writes, independently of the digest's own encoding.
  const reference = createHash('sha256').update('chunkd-content-digest-v1\n', 'latin1');
  const u64 = (value: number): Buffer => {
    const out = Buffer.alloc(8);
    out.writeBigUInt64LE(BigInt(value));
    return out;
  };
  reference.update(u64(sizeBytes));
  for (const [virtualChunk, physicalChunk] of [[0, 10], [2, 12], [7, 40], [8, 41], [far, 50], [far + 1, 51]] as const) {
    const sum = Buffer.alloc(4);
    sum.writeUInt32LE(sums.get(physicalChunk)!);
    reference.update(Buffer.concat([u64(virtualChunk), sum]));
  }
  assert.deepEqual(await contentDigest(map, { get: (physicalChunk) => sums.get(physicalChunk)! }, sizeBytes), reference.digest());

  // Runs past a slice (the digest lets the event loop turn between slices): none lost or counted twice.
  const big = new ChunkMap();
  const runs = [[1_000, 5_000], [80_000, 100_000], [200_000, 300_000]] as const;
  for (const [virtualChunk, physicalChunk] of runs) big.mapRun(virtualChunk, physicalChunk, 70_000, refs);
  const sumOf = (physicalChunk: number): number => (physicalChunk * 2654435761) >>> 0;
  const bigReference = createHash('sha256').update('chunkd-content-digest-v1\n', 'latin1').update(u64(300_000 * 4096));
  for (const [virtualChunk, physicalChunk] of runs) {
    for (let i = 0; i < 70_000 && virtualChunk + i < 300_000; i++) {
      const sum = Buffer.alloc(4);
      sum.writeUInt32LE(sumOf(physicalChunk + i));
      bigReference.update(Buffer.concat([u64(virtualChunk + i), sum]));
    }
  }
  assert.deepEqual(await contentDigest(big, { get: sumOf }, 300_000 * 4096), bigReference.digest());
});

test('checksums of a large pooled buffer: each chunk\'s own, again after the buffer is refilled, and for parts, copies and shared memory', () => {
  // chunkSums keeps the chunks' views of a whole large buffer with its memory (reused payload buffers): the sums
  // must follow the bytes as they are now, and a view that is part of its memory, or other memory, is never given
  // another buffer's views.
  const random = makeRandom(testSeed('pooled-sums'));
  const chunk = 4096;
  const reference = (data: Uint8Array): number[] => Array.from({ length: data.length / chunk }, (_, i) => blockChecksum(data.subarray(i * chunk, (i + 1) * chunk)));
  const fill = (data: Uint8Array): void => {
    for (let i = 0; i < data.length; i += 64) data[i] = randomInt(random, 256);
  };
  for (const data of [Buffer.alloc(256 * chunk), Buffer.from(new SharedArrayBuffer(256 * chunk)), Buffer.allocUnsafeSlow(64 * chunk)]) {
    for (let round = 0; round < 3; round++) {
      fill(data);
      assert.deepEqual(Array.from(chunkSums(data)), reference(data), `whole buffer of ${data.length} bytes, round ${round}`);
      const part = data.subarray(32 * chunk, 64 * chunk);
      assert.deepEqual(Array.from(chunkSums(part)), reference(part), `a part of it, round ${round}`);
      const copy = Buffer.from(data);
      copy[0] = copy[0]! ^ 0xff;
      assert.deepEqual(Array.from(chunkSums(copy)), reference(copy), `a copy with its first byte changed, round ${round}`);
      assert.notEqual(chunkSums(copy)[0], chunkSums(data)[0]);
    }
  }
});
