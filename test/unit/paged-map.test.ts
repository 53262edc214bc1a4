// The paged chunk map (src/store/paged-map.ts): a copy-on-write B+tree over the page cache. A model test applies
// random mapRun / unmapRange / clone / drop / commit sequences to today's ChunkMap and to paged maps with tiny
// nodes and a four-page cache (so pages are evicted and read back from the file all the time), and checks the
// same runs, the same diffs, the same set of referenced chunks, the tree's invariants and every page's count, and
// that dropping every map gives every page back. Targeted tests: splits and merges at leaf and interior
// boundaries, a clone's write copying only its path, a diff reading only the pages that differ, and damaged
// pages. SEED=<n> replays a model run (fast-check shrinks a failing sequence first).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import fc from 'fast-check';
import { ChunkdError } from '../../src/core/errors.ts';
import { ChunkMap, type ChunkRefs } from '../../src/store/chunk-map.ts';
import { realFiles } from '../../src/store/file-layer.ts';
import { diffMaps } from '../../src/store/map-diff.ts';
import { PageAllocator } from '../../src/store/page-allocator.ts';
import { SpaceMaps } from '../../src/store/space-map.ts';
import { PageCache, type CachedPage } from '../../src/store/page-cache.ts';
import { firstDataPage, PageFile, pageBytes, pageHeaderBytes, type Root } from '../../src/store/page-file.ts';
import {
  childIndex,
  decodedBytes,
  decodeNode,
  encodeNode,
  leafCapacityMax,
  LeafPage,
  levelOf,
  mapLeafKind,
  minFill,
  PagedMaps,
  splitSizes,
  type InteriorNode,
  type LeafNode,
  type MapNode,
  type PagedMap,
  type PagedMapState,
  type PageRefs,
  type PagedRun,
} from '../../src/store/paged-map.ts';
import { modelRunOptions, testSeed } from '../helpers/random.ts';

const isCorrupt = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ECORRUPT';
/** The crc32 a test gives a physical chunk (any function of the chunk will do: a map only carries it). */
const sumOf = (physical: number): number => Math.imul(physical + 1, 0x9e3779b1) >>> 0;
const sumsOf = (physical: number, count: number): number[] => Array.from({ length: count }, (_, i) => sumOf(physical + i));

class Counts implements PageRefs, ChunkRefs {
  readonly counts = new Map<number, number>();
  get(key: number): number {
    return this.counts.get(key) ?? 0;
  }
  increment(key: number): void {
    this.counts.set(key, this.get(key) + 1);
  }
  decrement(key: number): number {
    const count = this.get(key);
    assert.ok(count > 0, `${key} released more often than referenced`);
    if (count === 1) this.counts.delete(key);
    else this.counts.set(key, count - 1);
    return count - 1;
  }
  incrementRun(start: number, count: number): void {
    for (let key = start; key < start + count; key++) this.increment(key);
  }
  decrementRun(start: number, count: number): void {
    for (let key = start; key < start + count; key++) this.decrement(key);
  }
}

/** A cache that remembers the pages each commit wrote (to check copy-on-write against the durable root). */
class TrackingCache extends PageCache {
  #put = new Set<number>();
  /** The pages the last commit wrote. */
  written = new Set<number>();
  override put(pageNumber: number, page: CachedPage): void {
    this.#put.add(pageNumber);
    super.put(pageNumber, page);
  }
  override commit(rootBody: Buffer): Promise<Root> {
    this.written = this.#put;
    this.#put = new Set();
    return super.commit(rootBody);
  }
}

interface Setup {
  base: string;
  file: PageFile;
  cache: TrackingCache;
  allocator: PageAllocator;
  pageRefs: Counts;
  chunkRefs: Counts;
  maps: PagedMaps;
}

async function withMaps(options: { cachePages: number; leafCapacity?: number; interiorCapacity?: number }, run: (setup: Setup) => Promise<void>): Promise<void> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-pagedmap-'));
  const base = path.join(directory, 'meta');
  const file = await PageFile.open(realFiles, base);
  try {
    const cache = new TrackingCache(file, options.cachePages * pageBytes);
    const allocator = new PageAllocator();
    const pageRefs = new Counts();
    const maps = new PagedMaps({ cache, allocator, pageRefs, ...(options.leafCapacity ? { leafCapacity: options.leafCapacity } : {}), ...(options.interiorCapacity ? { interiorCapacity: options.interiorCapacity } : {}) });
    await run({ base, file, cache, allocator, pageRefs, chunkRefs: new Counts(), maps });
  } finally {
    file.close();
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

/** A page file in a fresh directory, step 3's space maps over a cache of `cachePages` pages; removed after `run`. */
async function withSpaceMaps(cachePages: number, run: (cache: PageCache, space: SpaceMaps) => Promise<void>): Promise<void> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-pagedmap-space-'));
  const file = await PageFile.open(realFiles, path.join(directory, 'meta'));
  try {
    const cache = new PageCache(file, cachePages * pageBytes);
    await run(cache, await SpaceMaps.open(cache, null));
  } finally {
    file.close();
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

/** A number below `limit`, from a generator seeded by `testSeed(name)` (a linear congruential one: repeatable per seed). */
function seededRandom(name: string): (limit: number) => number {
  let state = testSeed(name) >>> 0;
  return (limit) => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state % limit;
  };
}

const withoutSums = (runs: PagedRun[]): Array<{ virtualChunk: number; chunkCount: number; physicalChunk: number }> =>
  runs.map(({ virtualChunk, chunkCount, physicalChunk }) => ({ virtualChunk, chunkCount, physicalChunk }));

/** Runs with their sums checked against the chunks they name. */
async function runsOf(map: PagedMap, virtualChunk: number, chunkCount: number): Promise<ReturnType<typeof withoutSums>> {
  const runs = await map.runs(virtualChunk, chunkCount);
  for (const run of runs) assert.deepEqual(run.sums, run.physicalChunk < 0 ? [] : sumsOf(run.physicalChunk, run.chunkCount), `sums of ${JSON.stringify(run)}`);
  return withoutSums(runs);
}

interface TreeFacts {
  /** References each page should have: maps holding it as root plus distinct interior pages naming it. */
  pageCounts: Map<number, number>;
  /** Per chunk: entries naming it over the distinct leaves reachable. */
  chunkCounts: Map<number, number>;
  /** Root level per map. */
  levels: number[];
  pages: number;
}

/** Walks every tree from its root (each distinct page once), checking invariants 1 and 2 of paged-map.ts. */
async function treeFacts(setup: Setup, roots: readonly PagedMap[], capacities: { leaf: number; interior: number }): Promise<TreeFacts> {
  const pageCounts = new Map<number, number>();
  const chunkCounts = new Map<number, number>();
  const seen = new Map<number, MapNode>();
  const bump = (counts: Map<number, number>, key: number): void => {
    counts.set(key, (counts.get(key) ?? 0) + 1);
  };
  /** Returns the least key of the subtree. */
  const visit = async (page: number, isRoot: boolean, level: number | undefined, lo: number, hi: number): Promise<number> => {
    let node = seen.get(page);
    const first = node === undefined;
    node ??= await setup.maps.node(page);
    seen.set(page, node);
    if (level !== undefined) assert.equal(levelOf(node), level, `page ${page} level`);
    const keys = node.kind === 'leaf' ? node.entries().keys : node.keys;
    if (!isRoot) assert.ok(keys.length >= minFill(node.kind === 'leaf' ? capacities.leaf : capacities.interior), `page ${page} below its fill: ${keys.length}`);
    assert.ok(keys.length <= (node.kind === 'leaf' ? capacities.leaf : capacities.interior), `page ${page} over its capacity`);
    assert.ok(keys[0]! >= lo && keys[keys.length - 1]! < hi, `page ${page} keys outside [${lo}, ${hi})`);
    for (let i = 1; i < keys.length; i++) assert.ok(keys[i - 1]! < keys[i]!, `page ${page}: keys in order`);
    if (node.kind === 'leaf') {
      if (first) for (const physical of node.physicalChunks()) bump(chunkCounts, physical);
      return keys[0]!;
    }
    for (let i = 0; i < node.children.length; i++) {
      const child = node.children[i]!;
      if (first) bump(pageCounts, child);
      const least = await visit(child, false, node.level - 1, node.keys[i]!, i + 1 < node.keys.length ? node.keys[i + 1]! : hi);
      assert.equal(least, node.keys[i], `page ${page}: key ${i} is the least key below it`);
    }
    return node.keys[0]!;
  };
  const levels: number[] = [];
  for (const map of roots) {
    if (map.rootPage === 0) {
      assert.equal(map.mappedCount, 0);
      levels.push(-1);
      continue;
    }
    bump(pageCounts, map.rootPage);
    await visit(map.rootPage, true, undefined, 0, 2 ** 48);
    levels.push(levelOf(seen.get(map.rootPage)!));
  }
  return { pageCounts, chunkCounts, levels, pages: seen.size };
}

async function checkCounts(setup: Setup, roots: readonly PagedMap[], capacities: { leaf: number; interior: number }, label: string): Promise<TreeFacts> {
  const facts = await treeFacts(setup, roots, capacities);
  assert.deepEqual(new Map([...setup.pageRefs.counts].sort((a, b) => a[0] - b[0])), new Map([...facts.pageCounts].sort((a, b) => a[0] - b[0])), `${label}: page counts are the parents of each page`);
  assert.deepEqual(new Map([...setup.chunkRefs.counts].sort((a, b) => a[0] - b[0])), new Map([...facts.chunkCounts].sort((a, b) => a[0] - b[0])), `${label}: chunk counts are the leaves naming each chunk`);
  return facts;
}

test('node images: decoded as encoded; a wrong kind, count or order is refused as damage naming the page', () => {
  const entries = { keys: [1, 5, 2 ** 47], physical: [9, 2 ** 48 - 1, 0], sums: [0, 0xffffffff, 7] };
  const leaf = LeafPage.of(entries.keys, entries.physical, entries.sums);
  const leafOf = (node: MapNode): ReturnType<LeafPage['entries']> => (node as LeafPage).entries();
  assert.deepEqual(leafOf(decodeNode(encodeNode(leaf), 9)), entries);
  // The image is the leaf's own layout: the same bytes as the page format written field by field.
  const expected = Buffer.alloc(4 + 3 * 16);
  expected.writeUInt16LE(3, 0);
  for (let i = 0; i < 3; i++) {
    expected.writeUIntLE(entries.keys[i]!, 4 + 16 * i, 6);
    expected.writeUIntLE(entries.physical[i]!, 10 + 16 * i, 6);
    expected.writeUInt32LE(entries.sums[i]!, 16 + 16 * i);
  }
  assert.deepEqual(encodeNode(leaf).body, expected);
  assert.ok(leaf.frozen, 'a leaf whose image was taken is frozen');
  assert.throws(() => leaf.set(0, 1, 1));
  // A copy changes apart from the image: an insert, an overwrite, a run replacing entries, a removal.
  const copy = leaf.copy();
  copy.insert(1, 3, 2 ** 40 + 7, 11);
  copy.set(0, 2 ** 48 - 2, 0x80000000);
  copy.replaceRun(2, 3, 3, 5, 100, [1, 2, -1], 0);
  assert.deepEqual(copy.entries(), { keys: [1, 3, 5, 6, 7, 2 ** 47], physical: [2 ** 48 - 2, 2 ** 40 + 7, 100, 101, 102, 0], sums: [0x80000000, 11, 1, 2, 0xffffffff, 7] });
  copy.remove(1, 4);
  assert.deepEqual(copy.entries(), { keys: [1, 7, 2 ** 47], physical: [2 ** 48 - 2, 102, 0], sums: [0x80000000, 0xffffffff, 7] });
  assert.deepEqual(leafOf(decodeNode(encodeNode(leaf), 9)), entries, 'the image unchanged by its copy');
  assert.deepEqual(copy.concat(leaf.slice(1, 3)).entries(), { keys: [1, 7, 2 ** 47, 5, 2 ** 47], physical: [2 ** 48 - 2, 102, 0, 2 ** 48 - 1, 0], sums: [0x80000000, 0xffffffff, 7, 0xffffffff, 7] });
  const interior: MapNode = { kind: 'interior', level: 3, keys: [0, 10, 20], children: [2, 3, 2 ** 40] };
  // Decoded with no interior node below it held yet (`below`, `leaves`: filled by lookups).
  assert.deepEqual(decodeNode(encodeNode(interior), 9), { ...interior, below: undefined, leaves: undefined, leafUses: undefined });
  const fullEntries = { keys: [...Array(leafCapacityMax).keys()], physical: Array<number>(leafCapacityMax).fill(1), sums: Array<number>(leafCapacityMax).fill(2) };
  const full = LeafPage.empty();
  // Filled by inserts at the front: no room grown past a page's.
  for (let i = leafCapacityMax - 1; i >= 0; i--) full.insert(0, i, 1, 2);
  assert.deepEqual(leafOf(decodeNode(encodeNode(full), 9)), fullEntries);
  assert.equal(encodeNode(full).body.buffer, full.words.buffer, "a full leaf's image is its words, not a copy");
  // A body the words cannot view in place (not 4-byte aligned) is copied into words: the same entries, checked the same.
  const image = encodeNode(leaf).body;
  const unaligned = Buffer.alloc(image.length + 1).subarray(1);
  image.copy(unaligned);
  const fromUnaligned = decodeNode({ kind: mapLeafKind, body: unaligned }, 9) as LeafPage;
  assert.deepEqual(fromUnaligned.entries(), entries);
  assert.ok(fromUnaligned.heldBytes > image.length, 'its own words counted with the page');
  unaligned.writeUIntLE(0, 4 + 16, 6);
  assert.throws(() => decodeNode({ kind: mapLeafKind, body: unaligned }, 12), /metadata page 12: not a chunk map node \(keys out of order\)/);
  assert.throws(() => decodeNode({ kind: 7, body: encodeNode(leaf).body }, 12), (error) => isCorrupt(error) && /metadata page 12: not a chunk map node \(page kind 7\)/.test((error as Error).message));
  const swapped = encodeNode(LeafPage.of([1, 5, 3], entries.physical, entries.sums));
  swapped.body.writeUIntLE(0, 4 + 16, 6);
  assert.throws(() => decodeNode(swapped, 12), /keys out of order/);
  const short = encodeNode(leaf);
  assert.throws(() => decodeNode({ kind: mapLeafKind, body: short.body.subarray(0, short.body.length - 1) }, 12), /3 leaf entries in/);
  assert.deepEqual(splitSizes(0, 4), []);
  assert.deepEqual(splitSizes(9, 4), [3, 3, 3]);
  assert.deepEqual(splitSizes(10, 4), [4, 3, 3]);
  assert.deepEqual(splitSizes(4, 4), [4]);
});

test('splits and merges at leaf and interior boundaries keep every invariant and give back every page', async () => {
  await withMaps({ cachePages: 4, leafCapacity: 4, interiorCapacity: 4 }, async (setup) => {
    const capacities = { leaf: 4, interior: 4 };
    const map = setup.maps.empty();
    const model = new ChunkMap();
    const modelRefs = new Counts();
    const levelsUp: number[] = [];
    // One chunk at a time, alternately at the two ends of a widening range, so both edges split.
    const order = Array.from({ length: 80 }, (_, i) => (i % 2 === 0 ? 100 + i / 2 : 99 - (i - 1) / 2));
    for (const [step, v] of order.entries()) {
      await map.mapRun(v, 1000 + v, [sumOf(1000 + v)], setup.chunkRefs);
      model.mapRun(v, 1000 + v, 1, modelRefs);
      const facts = await checkCounts(setup, [map], capacities, `insert ${step}`);
      levelsUp.push(facts.levels[0]!);
      if (step % 10 === 9) await setup.maps.commit(() => Buffer.from('root'));
    }
    assert.deepEqual(await runsOf(map, 0, 300), model.runs(0, 300));
    assert.equal(levelsUp[3], 0, 'four entries: one leaf');
    assert.equal(levelsUp[4], 1, 'the fifth splits the leaf under a new root');
    assert.ok(levelsUp.includes(2) && levelsUp.includes(3), `interior nodes split too (levels ${[...new Set(levelsUp)].join(', ')})`);
    assert.deepEqual(levelsUp, [...levelsUp].sort((a, b) => a - b), 'the tree only grows while entries are added');

    // Unmap from the middle out, then the rest in pieces: leaves and interior nodes merge and the root comes down.
    const levelsDown: number[] = [];
    for (let step = 0; step < 40; step++) {
      const v = 80 + ((step * 7) % 40);
      assert.equal(await map.unmapRange(v, 1, setup.chunkRefs), model.unmapRange(v, 1, modelRefs));
      levelsDown.push((await checkCounts(setup, [map], capacities, `unmap ${step}`)).levels[0]!);
    }
    assert.deepEqual(await runsOf(map, 0, 300), model.runs(0, 300));
    for (let v = 60; v < 140; v += 3) {
      assert.equal(await map.unmapRange(v, 3, setup.chunkRefs), model.unmapRange(v, 3, modelRefs));
      levelsDown.push((await checkCounts(setup, [map], capacities, `unmap ${v}+3`)).levels[0]!);
    }
    assert.deepEqual(levelsDown, [...levelsDown].sort((a, b) => b - a), 'the tree only shrinks while entries go');
    assert.ok(levelsDown.includes(1) && levelsDown.includes(0) && levelsDown.at(-1) === -1, `down to one leaf, then empty (levels ${[...new Set(levelsDown)].join(', ')})`);
    assert.equal(map.mappedCount, 0);
    await setup.maps.commit(() => Buffer.from('root'));
    const state = setup.allocator.state();
    assert.equal(state.free.length, state.nextPage - firstDataPage, 'every page is free again');
    assert.equal(setup.pageRefs.counts.size, 0);
    assert.equal(setup.chunkRefs.counts.size, 0);
  });
});

test("a clone shares the root; a write below it copies only its path, and a diff reads only the pages that differ", async () => {
  await withMaps({ cachePages: 4096 }, async (setup) => {
    const capacities = { leaf: leafCapacityMax, interior: 338 };
    const original = setup.maps.empty();
    // 100,000 chunks in runs of 50 at a stride: three levels of 253-entry leaves and 338-child interiors.
    for (let v = 0; v < 200_000; v += 100) await original.mapRun(v, v * 3, sumsOf(v * 3, 50), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('one'));
    const before = await checkCounts(setup, [original], capacities, 'one map');
    assert.equal(before.levels[0], 2);
    const pagesBefore = setup.allocator.state().nextPage;

    const snapshot = original.clone();
    assert.equal(setup.allocator.state().nextPage, pagesBefore, 'a clone writes no page');
    assert.equal(setup.pageRefs.get(original.rootPage), 2);
    assert.equal(setup.maps.dirtyPages, 0);
    await checkCounts(setup, [original, snapshot], capacities, 'cloned');
    assert.deepEqual(await snapshot.diff(original, 2 ** 48), []);

    await original.mapRun(150_000, 7_000_000, [sumOf(7_000_000)], setup.chunkRefs);
    assert.equal(setup.maps.dirtyPages, 3, 'the root, an interior page and a leaf: the path, copied');
    assert.equal(setup.allocator.state().nextPage, pagesBefore + 3);
    const after = await checkCounts(setup, [original, snapshot], capacities, 'after one write');
    assert.equal(after.pages, before.pages + 3);
    const shared = [...setup.pageRefs.counts.values()].filter((count) => count === 2).length;
    assert.ok(shared > 300, `the pages beside the path are shared (${shared} counted twice)`);
    assert.ok([...setup.chunkRefs.counts.values()].filter((count) => count === 2).length >= minFill(leafCapacityMax) - 1, 'the chunks of the copied leaf count twice');

    await setup.maps.commit(() => Buffer.from('two'));
    const cold = new PageCache(setup.file, 4096 * pageBytes);
    const coldMaps = new PagedMaps({ cache: cold, allocator: setup.allocator, pageRefs: setup.pageRefs });
    const diff = await coldMaps.open(snapshot.state()).diff(coldMaps.open(original.state()), 2 ** 48);
    assert.deepEqual(diff, [{ virtualChunk: 150_000, chunkCount: 1 }]);
    assert.ok(cold.stats().misses <= 8, `a diff reads the two paths (${cold.stats().misses} pages read of ${after.pages})`);
    assert.deepEqual(await coldMaps.open(original.state()).runs(150_000, 1), [{ virtualChunk: 150_000, chunkCount: 1, physicalChunk: 7_000_000, sums: [sumOf(7_000_000)] }]);
    assert.deepEqual(diffMaps(new ChunkMap(), new ChunkMap(), 10), []);
  });
});

test('a cold diff of two deep trees that differ in most leaves reads the children of each differing node at once, not a page at a time', async () => {
  await withMaps({ cachePages: 8192, leafCapacity: 4, interiorCapacity: 4 }, async (setup) => {
    const original = setup.maps.empty();
    await original.mapRun(0, 0, sumsOf(0, 2000), setup.chunkRefs);
    const other = original.clone();
    for (let v = 0; v < 2000; v += 4) await other.mapRun(v, 10_000 + v, [sumOf(10_000 + v)], setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('one'));
    const facts = await treeFacts(setup, [original, other], { leaf: 4, interior: 4 });
    const cold = new PageCache(setup.file, 8192 * pageBytes);
    const coldMaps = new PagedMaps({ cache: cold, allocator: setup.allocator, pageRefs: setup.pageRefs, leafCapacity: 4, interiorCapacity: 4 });
    const diff = await coldMaps.open(original.state()).diff(coldMaps.open(other.state()), 2 ** 48);
    assert.deepEqual(diff, Array.from({ length: 500 }, (_, i) => ({ virtualChunk: i * 4, chunkCount: 1 })));
    // Every page but the shared ones is read, the children of a node of each side at once (4 to 8 pages here;
    // hundreds at full capacity). Before, the pages below a level the other tree had not expanded yet were read
    // one at a time: 1,307 restarts of the pass for 1,336 pages.
    const read = cold.stats().misses;
    assert.ok(coldMaps.passRestarts * 4 <= read, `${coldMaps.passRestarts} restarts of the pass for ${read} pages read (of ${facts.pages})`);
  });
});

test('a map edit over a cold cache reads the path to the leaves it changes, not their neighbours (an overwrite, and an insert that splits a leaf)', async () => {
  await withMaps({ cachePages: 8192, leafCapacity: 4, interiorCapacity: 4 }, async (setup) => {
    const map = setup.maps.empty();
    // Every other key: an insert between two lands in a full leaf now and then.
    for (let v = 0; v < 4000; v += 2) await map.mapRun(v, v, [sumOf(v)], setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('one'));
    const root = await setup.maps.node(map.rootPage);
    assert.equal(root.kind, 'interior');
    const height = (root as { level: number }).level + 1;
    const cold = new PageCache(setup.file, 8192 * pageBytes);
    const coldMaps = new PagedMaps({ cache: cold, allocator: setup.allocator, pageRefs: setup.pageRefs, leafCapacity: 4, interiorCapacity: 4 });
    const opened = coldMaps.open(map.state());
    for (const [label, virtualChunk] of [['an overwrite', 2000], ['an insert', 3001], ['an insert', 1001], ['an insert', 1003]] as const) {
      const readBefore = cold.stats().misses;
      await opened.mapRun(virtualChunk, 90_000 + virtualChunk, [sumOf(90_000 + virtualChunk)], setup.chunkRefs);
      // The path only (a page a level, fewer where an earlier edit read it); with a neighbour on each side of each
      // page changed, about three a level.
      const read = cold.stats().misses - readBefore;
      assert.ok(read <= height, `${label} at ${virtualChunk} read ${read} pages, the tree ${height} high`);
      assert.deepEqual(withoutSums(await opened.runs(virtualChunk, 1)), [{ virtualChunk, chunkCount: 1, physicalChunk: 90_000 + virtualChunk }]);
    }
    assert.deepEqual(withoutSums(await opened.runs(999, 6)), [
      { virtualChunk: 999, chunkCount: 1, physicalChunk: -1 },
      { virtualChunk: 1000, chunkCount: 1, physicalChunk: 1000 },
      { virtualChunk: 1001, chunkCount: 1, physicalChunk: 91_001 },
      { virtualChunk: 1002, chunkCount: 1, physicalChunk: 1002 },
      { virtualChunk: 1003, chunkCount: 1, physicalChunk: 91_003 },
      { virtualChunk: 1004, chunkCount: 1, physicalChunk: 1004 },
    ]);
  });
});

test("a commit encodes its dirty nodes in slices, letting the event loop turn; mutations called meanwhile wait for it, lookups answer beside it", async () => {
  await withMaps({ cachePages: 4096 }, async (setup) => {
    const maps = new PagedMaps({ cache: setup.cache, allocator: setup.allocator, pageRefs: setup.pageRefs, commitSliceMs: 0 });
    const map = maps.empty();
    for (let v = 0; v < 100_000; v += 100) await map.mapRun(v, v, sumsOf(v, 50), setup.chunkRefs);
    const dirty = maps.dirtyPages;
    assert.ok(dirty > 200, `${dirty} dirty pages`);
    const model = new ChunkMap();
    const modelRefs = new Counts();
    for (let v = 0; v < 100_000; v += 100) model.mapRun(v, v, 50, modelRefs);
    const atCommit = model.runs(0, 100_000);
    // Counts the turns of the event loop before the commit's pages are taken (every node is in memory: nothing read yields).
    let turns = 0;
    let ticking = true;
    const lookups: Array<Promise<void>> = [];
    const tick = (): void => {
      if (!ticking) return;
      turns += 1;
      // A lookup beside the encoding sees the map as the mutations before the commit left it.
      const v = (turns * 4_999) % 100_000;
      const cached = map.runsCached(v, 300);
      assert.ok(cached !== undefined, 'every node in memory');
      assert.deepEqual(withoutSums(cached), model.runs(v, 300));
      lookups.push(map.runs(v, 300).then((runs) => assert.deepEqual(withoutSums(runs), model.runs(v, 300))));
      setImmediate(tick);
    };
    setImmediate(tick);
    const commit = maps.commitBeside(() => Buffer.from(JSON.stringify(map.state())));
    // Called during the encoding: applied after the commit's pages are taken, so not in its root.
    const later = map.mapRun(250, 900_000, sumsOf(900_000, 10), setup.chunkRefs);
    await commit.sealed;
    ticking = false;
    assert.ok(turns >= 2, `the event loop turned ${turns} times while a commit encoded ${dirty} dirty nodes`);
    await later;
    model.mapRun(250, 900_000, 10, modelRefs);
    await commit.durable;
    await Promise.all(lookups);
    assert.deepEqual(await runsOf(map, 0, 100_000), model.runs(0, 100_000));
    const fromFile = new PagedMaps({ cache: new PageCache(setup.file, 4096 * pageBytes), allocator: new PageAllocator(), pageRefs: new Counts() });
    const committed = fromFile.open(JSON.parse(setup.file.root!.body.toString()) as PagedMapState);
    assert.deepEqual(await runsOf(committed, 0, 100_000), atCommit, 'the root holds the mutations called before the commit, and only those');
  });
});

/** Counts the turns of the event loop (a setImmediate each) from now until `stop`. */
function turnCounter(): { readonly turns: number; stop(): void } {
  let turns = 0;
  let ticking = true;
  const tick = (): void => {
    if (!ticking) return;
    turns += 1;
    setImmediate(tick);
  };
  setImmediate(tick);
  return {
    get turns() {
      return turns;
    },
    stop() {
      ticking = false;
    },
  };
}

test('mutations queued one behind another give the event loop a turn once they have run back to back for mutationRunMs, and apply in call order', async () => {
  await withMaps({ cachePages: 4096 }, async (setup) => {
    const maps = new PagedMaps({ cache: setup.cache, allocator: setup.allocator, pageRefs: setup.pageRefs, mutationRunMs: 0 });
    const map = maps.empty();
    const model = new ChunkMap();
    const modelRefs = new Counts();
    const loop = turnCounter();
    // Every node in memory: nothing read yields, so without the turns all 300 would run in one.
    const calls: Array<Promise<void>> = [];
    for (let i = 0; i < 300; i++) {
      const v = (i * 7_919) % 60_000;
      calls.push(map.mapRun(v, 1_000_000 + i * 4, sumsOf(1_000_000 + i * 4, 4), setup.chunkRefs));
      model.mapRun(v, 1_000_000 + i * 4, 4, modelRefs);
    }
    await Promise.all(calls);
    loop.stop();
    assert.ok(loop.turns >= 100, `the event loop turned ${loop.turns} times while 300 queued mutations ran`);
    assert.deepEqual(await runsOf(map, 0, 70_000), model.runs(0, 70_000));
  });
});

test('a drop of a large map frees its pages a slice at a time, letting the event loop turn, and gives every page back', async () => {
  await withMaps({ cachePages: 4096 }, async (setup) => {
    const map = setup.maps.empty();
    for (let v = 0; v < 200_000; v += 100) await map.mapRun(v, v, sumsOf(v, 50), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('one'));
    const pages = (await treeFacts(setup, [map], { leaf: leafCapacityMax, interior: 338 })).pages;
    assert.ok(pages > 600, `${pages} pages`);
    // Counts the turns of the event loop while the drop runs (each page is in memory: no read yields for it).
    const loop = turnCounter();
    await map.drop(setup.chunkRefs);
    loop.stop();
    assert.ok(loop.turns >= 2, `the event loop turned ${loop.turns} times during the drop of ${pages} pages, every page in the cache`);
    assert.equal(map.rootPage, 0);
    await setup.maps.commit(() => Buffer.from('two'));
    const state = setup.allocator.state();
    assert.equal(state.free.length, state.nextPage - firstDataPage);
    assert.equal(setup.chunkRefs.counts.size, 0);
  });
});

test("one chunk looked up in memory (a 4 KiB read's lookup) finds what a pass finds: mapped, holes, past the end, empty, missing pages", async () => {
  await withMaps({ cachePages: 4096, leafCapacity: 8, interiorCapacity: 4 }, async (setup) => {
    const map = setup.maps.empty();
    assert.deepEqual(map.runsCached(5, 1), [{ virtualChunk: 5, chunkCount: 1, physicalChunk: -1, sums: [] }], 'an empty map');
    // Keys 3 apart from 10, so that every leaf and interior node has holes before, between and after its keys.
    for (let v = 10; v < 3000; v += 3) await map.mapRun(v, v + 100_000, [sumOf(v + 100_000)], setup.chunkRefs);
    const check = async (label: string): Promise<void> => {
      for (let v = 0; v < 3010; v++) {
        const cached = map.runsCached(v, 1);
        assert.ok(cached !== undefined, `${label}: ${v} in memory`);
        assert.deepEqual(cached, await map.runs(v, 1), `${label}: chunk ${v}`);
      }
    };
    await check('dirty');
    await setup.maps.commit(() => Buffer.from('root'));
    await check('committed');
  });
  await withMaps({ cachePages: 4, leafCapacity: 8, interiorCapacity: 4 }, async (setup) => {
    const map = setup.maps.empty();
    for (let v = 0; v < 3000; v += 3) await map.mapRun(v, v, [sumOf(v)], setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    await map.runs(2999, 1); // the four pages hold the last path
    assert.equal(map.runsCached(0, 1), undefined, 'a path not in memory: no answer, no read');
    assert.deepEqual(withoutSums((await map.runs(0, 1))), [{ virtualChunk: 0, chunkCount: 1, physicalChunk: 0 }]);
  });
});

test("a 4 KiB read's lookup, which keeps the root's node and the interior nodes it passed, finds what every kind of change left", async () => {
  // Deep trees (4 entries a node) all in memory: after each change every chunk of every map is looked up in memory
  // (runsCached of one chunk: the root's node held by the map, interior nodes by their parents) against the model.
  // Changes: writes (in place, or passes that copy a path and may place a new node on the page they leave, the
  // root's among them), unmaps down to an empty map, clones written on both sides, drops and commits.
  const capacities = { leaf: 4, interior: 4 };
  await withMaps({ cachePages: 1 << 16, leafCapacity: capacities.leaf, interiorCapacity: capacities.interior }, async (setup) => {
    const modelRefs = new Counts();
    const pairs = [{ model: new ChunkMap(), paged: setup.maps.empty() }];
    const random = seededRandom('paged map lookups held');
    const chunks = 400;
    let nextPhysical = 0;
    let levelMax = 0;
    const check = (label: string): void => {
      for (const [i, pair] of pairs.entries()) {
        for (let v = 0; v < chunks; v++) {
          const found = pair.paged.runsCached(v, 1);
          assert.ok(found !== undefined, `${label}: map ${i}, chunk ${v} in memory`);
          const physical = pair.model.get(v);
          assert.deepEqual(found, [{ virtualChunk: v, chunkCount: 1, physicalChunk: physical, sums: physical < 0 ? [] : [sumOf(physical)] }], `${label}: map ${i}, chunk ${v}`);
        }
      }
    };
    for (let step = 0; step < 400; step++) {
      const pair = pairs[random(pairs.length)]!;
      const op = random(20);
      let label: string;
      if (op < 12) {
        const v = random(chunks);
        const n = Math.min(1 + (random(4) === 0 ? random(40) : random(3)), chunks - v);
        pair.model.mapRun(v, nextPhysical, n, modelRefs);
        await pair.paged.mapRun(v, nextPhysical, sumsOf(nextPhysical, n), setup.chunkRefs);
        nextPhysical += n;
        label = `step ${step}: ${n} mapped at ${v}`;
      } else if (op < 16) {
        // Now and then a wide unmap, down to an empty map (its root page 0) and up again.
        const v = random(4) === 0 ? 0 : random(chunks);
        const n = v === 0 ? chunks : 1 + random(60);
        pair.model.unmapRange(v, n, modelRefs);
        await pair.paged.unmapRange(v, n, setup.chunkRefs);
        label = `step ${step}: ${n} unmapped at ${v}`;
      } else if (op < 18) {
        await setup.maps.commit(() => Buffer.from(`step ${step}`));
        label = `step ${step}: commit`;
      } else if (op === 18 && pairs.length < 4) {
        pairs.push({ model: pair.model.clone(), paged: pair.paged.clone() });
        label = `step ${step}: clone`;
      } else {
        if (pairs.length < 2) continue;
        const [dropped] = pairs.splice(random(pairs.length), 1);
        dropped!.model.drop(modelRefs);
        await dropped!.paged.drop(setup.chunkRefs);
        label = `step ${step}: drop`;
      }
      check(label);
      const facts = await checkCounts(setup, pairs.map((p) => p.paged), capacities, label);
      levelMax = Math.max(levelMax, ...facts.levels);
    }
    assert.ok(levelMax >= 3, `trees of ${levelMax + 1} levels: interior nodes held by interior nodes`);
  });
});

test('a warm map answers without a promise; a cold one reads its path through the cache', async () => {
  await withMaps({ cachePages: 4 }, async (setup) => {
    const map = setup.maps.empty();
    for (let v = 0; v < 4000; v += 2) await map.mapRun(v, v, [sumOf(v)], setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    for (let v = 0; v < 4000; v += 300) await map.runs(v, 1); // cycles the four-page cache
    const wanted = 3998;
    assert.equal(map.runsCached(wanted - 3998, 1), undefined, 'the first leaf was evicted');
    assert.deepEqual(withoutSums(await map.runs(0, 3)), [
      { virtualChunk: 0, chunkCount: 1, physicalChunk: 0 },
      { virtualChunk: 1, chunkCount: 1, physicalChunk: -1 },
      { virtualChunk: 2, chunkCount: 1, physicalChunk: 2 },
    ]);
    assert.deepEqual(withoutSums(map.runsCached(0, 3)!), withoutSums(await map.runs(0, 3)));
  });
});

test("a leaf read from a cached page counts with it against the cache's bound: its object only, its words being the page's image", async () => {
  await withMaps({ cachePages: 64 }, async (setup) => {
    const map = setup.maps.empty();
    await map.mapRuns(Array.from({ length: 30_000 }, (_, i) => ({ virtualChunk: 2 * i, physicalChunk: 2 * i, sums: [sumOf(2 * i)] })), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    const root = await setup.maps.node(map.rootPage);
    assert.equal(root.kind, 'interior');
    const leaves = root.kind === 'interior' ? root.children : [];
    assert.ok(leaves.length > 64, `${leaves.length} leaves, more than the cache's 64 pages of images`);
    for (const page of leaves) await setup.maps.node(page);
    const cached = leaves.filter((page) => setup.cache.peek(page) !== undefined);
    for (const page of cached) {
      const leaf = (await setup.maps.node(page)) as LeafNode;
      assert.equal(setup.cache.peek(page)!.heldBytes, decodedBytes(leaf), `page ${page}: its leaf is counted`);
      assert.equal(leaf.words.buffer, setup.cache.peek(page)!.body.buffer, `page ${page}: the leaf's words are its image`);
    }
    assert.ok(setup.cache.stats().cleanBytes <= 64 * pageBytes);
    // Decoded into arrays (6 KiB beside the 4 KiB image) the cache held 40 of them at most; as their images, 56 or more.
    assert.ok(cached.length >= 56, `${cached.length} leaves of ${leaves.length} cached in 64 pages' bytes: each counts its image and its object`);
  });
});

/** The leaves a 4 KiB read's lookups hold on `map`'s root (a node at level 1), by child index. */
/** The child of `map`'s root (at level 1) whose range holds `key`. */
function childIndexOf(map: PagedMap, key: number): number {
  const keys = (map.rootNode as { keys: number[] }).keys;
  let index = 0;
  while (index + 1 < keys.length && keys[index + 1]! <= key) index++;
  return index;
}

function heldLeaves(map: PagedMap): Array<{ index: number; page: number; view: LeafPage }> {
  const root = map.rootNode;
  assert.ok(root !== undefined && root.kind === 'interior' && root.level === 1, 'a root above the leaves, held by the map');
  return (root.leaves ?? []).flatMap((view, index) => (view === undefined ? [] : [{ index, page: root.children[index]!, view }]));
}

test("leaves held by their parents for a 4 KiB read's lookup stay within the cache's bound: each is a clean cached page, let go when it leaves", async () => {
  const cachePages = 32;
  await withMaps({ cachePages }, async (setup) => {
    const map = setup.maps.empty();
    await map.mapRuns(Array.from({ length: 30_000 }, (_, i) => ({ virtualChunk: 2 * i, physicalChunk: 2 * i, sums: [sumOf(2 * i)] })), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    const random = seededRandom('held leaves within the bound');
    let lookedUp = 0;
    for (let round = 0; round < 6; round++) {
      for (let n = 0; n < 500; n++) {
        const v = random(60_000);
        const found = map.runsCached(v, 1) ?? (lookedUp--, await map.runs(v, 1));
        lookedUp++;
        assert.deepEqual(found, [{ virtualChunk: v, chunkCount: 1, physicalChunk: v % 2 === 0 ? v : -1, sums: v % 2 === 0 ? [sumOf(v)] : [] }], `chunk ${v}`);
      }
      // The leaf read last, looked up again: held.
      const last = 2 * random(30_000);
      await map.runs(last, 1);
      assert.ok(map.runsCached(last, 1) !== undefined);
      const held = heldLeaves(map);
      assert.ok(held.some(({ page }) => page === (map.rootNode as { children: number[] }).children[Math.max(0, childIndexOf(map, last))]), 'the leaf looked up last is held');
      const leafCount = (map.rootNode as { children: number[] }).children.length;
      assert.ok(leafCount > 2 * cachePages, `${leafCount} leaves, more than the cache holds`);
      for (const { page, view } of held) {
        const cached = setup.cache.peek(page);
        assert.ok(cached !== undefined && cached.heldAs === view, `page ${page}: a leaf held is a page the cache holds, as cached`);
        assert.ok(cached.heldBytes !== undefined && cached.heldBytes >= 128, `page ${page}: its view counted with it`);
      }
      assert.ok(held.length <= cachePages, `round ${round}: ${held.length} leaves held, within the ${cachePages} pages of the bound`);
      assert.ok(setup.cache.stats().cleanBytes <= cachePages * pageBytes);
    }
    assert.ok(lookedUp > 100, `${lookedUp} lookups answered in memory`);
  });
});

test('a leaf held by its parent records its use in the cache once per eviction: a hot leaf stays cached while cold ones cycle through', async () => {
  await withMaps({ cachePages: 16 }, async (setup) => {
    const map = setup.maps.empty();
    await map.mapRuns(Array.from({ length: 30_000 }, (_, i) => ({ virtualChunk: 2 * i, physicalChunk: 2 * i, sums: [sumOf(2 * i)] })), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    await map.runs(0, 1);
    assert.ok(map.runsCached(0, 1) !== undefined && heldLeaves(map).some(({ index }) => index === 0), 'the hot leaf held');
    let coldReads = 0;
    for (let v = 4000; v < 60_000; v += 500) {
      if (map.runsCached(v, 1) === undefined) {
        coldReads++;
        await map.runs(v, 1);
      }
      assert.deepEqual(map.runsCached(0, 1), [{ virtualChunk: 0, chunkCount: 1, physicalChunk: 0, sums: [sumOf(0)] }], `the hot leaf still cached after ${coldReads} cold leaves read`);
    }
    assert.ok(coldReads > 40, `${coldReads} cold leaves read through a cache of 16 pages`);
  });
});

test('a leaf looked up through its held page image finds keys and physical chunks past 32 bits, holes beside them, and the sums', async () => {
  await withMaps({ cachePages: 64, leafCapacity: 4, interiorCapacity: 4 }, async (setup) => {
    const map = setup.maps.empty();
    const keys = [0, 1, 2 ** 16, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1, 2 ** 40 + 7, 2 ** 47, 2 ** 48 - 3, 2 ** 48 - 2];
    const physicalOf = (i: number): number => [2 ** 48 - 1, 0, 2 ** 32, 2 ** 32 - 1, 65_535, 65_536, 2 ** 47 + 3, 1, 2 ** 40, 7][i]!;
    const sumAt = (i: number): number => [0xffffffff, 0, 1, 0x80000000, 42, 0x7fffffff, 3, 4, 5, 6][i]!;
    await map.mapRuns(keys.map((virtualChunk, i) => ({ virtualChunk, physicalChunk: physicalOf(i), sums: [sumAt(i)] })), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    const expect = (v: number): PagedRun[] => {
      const i = keys.indexOf(v);
      return [{ virtualChunk: v, chunkCount: 1, physicalChunk: i < 0 ? -1 : physicalOf(i), sums: i < 0 ? [] : [sumAt(i)] }];
    };
    const probes = keys.flatMap((k) => [k - 1, k, k + 1]).filter((v) => v >= 0 && v < 2 ** 48);
    for (const pass of ['read from the cache', 'through the held views']) {
      for (const v of probes) {
        let found = map.runsCached(v, 1);
        if (found === undefined) {
          assert.equal(pass, 'read from the cache', `chunk ${v} in memory ${pass}`);
          found = (await map.runs(v, 1)).map((run) => ({ ...run, sums: [...run.sums] }));
        }
        assert.deepEqual(found, expect(v), `chunk ${v}, ${pass}`);
      }
    }
    let held = 0;
    const count = (node: MapNode | undefined): void => {
      if (node === undefined || node.kind !== 'interior') return;
      held += (node.leaves ?? []).filter((view) => view !== undefined).length;
      for (const below of node.below ?? []) count(below);
    };
    count(map.rootNode);
    assert.ok(held >= 3, `${held} leaves held`);
  });
});

test('a held leaf whose keys are spread unevenly (runs, clusters, gaps of every size) finds every key and every hole beside one', async () => {
  // The search of a held leaf first probes where the key would be were the keys spread evenly between its parent's
  // keys, then steps out from there: here they are not, so its steps and their ends are what finds them.
  await withMaps({ cachePages: 1024 }, async (setup) => {
    const random = seededRandom('held leaves spread unevenly');
    const keys = new Set<number>();
    for (let v = 0; v < 300; v++) keys.add(v); // a run
    for (let n = 0; n < 400; n++) keys.add(1000 + random(50)); // a cluster
    for (let g = 1; g < 2 ** 40; g *= 3) keys.add(5000 + g); // gaps growing to 2^40
    for (let n = 0; n < 2000; n++) keys.add(2 ** 41 + random(1 << 30)); // spread evenly
    for (let n = 0; n < 300; n++) keys.add(2 ** 46 + n * n * n); // gaps growing by the square
    const sorted = [...keys].sort((a, b) => a - b);
    const map = setup.maps.empty();
    await map.mapRuns(sorted.map((virtualChunk, i) => ({ virtualChunk, physicalChunk: i, sums: [sumOf(i)] })), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    const index = new Map(sorted.map((v, i) => [v, i]));
    const probes = [...new Set(sorted.flatMap((v) => [v - 1, v, v + 1]).filter((v) => v >= 0))];
    for (const pass of ['first', 'held']) {
      for (const v of probes) {
        const found = map.runsCached(v, 1) ?? (await map.runs(v, 1));
        const i = index.get(v);
        assert.deepEqual(withoutSums(found), [{ virtualChunk: v, chunkCount: 1, physicalChunk: i ?? -1 }], `${pass}: chunk ${v}`);
        if (i !== undefined) assert.equal(found[0]!.sums[0], sumOf(i), `${pass}: chunk ${v}'s sum`);
      }
    }
    assert.ok(heldLeaves(map).length > 5, 'the lookups went through held leaves');
  });
});

test('mutations not awaited apply in call order while lookups run beside them through a two-page cache', async () => {
  await withMaps({ cachePages: 2, leafCapacity: 4, interiorCapacity: 4 }, async (setup) => {
    const map = setup.maps.empty();
    for (let v = 0; v < 400; v += 3) await map.mapRun(v, v, sumsOf(v, 2), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    const model = new ChunkMap();
    const modelRefs = new Counts();
    for (let v = 0; v < 400; v += 3) model.mapRun(v, v, 2, modelRefs);
    const pending: Array<Promise<unknown>> = [];
    const lookups: Array<Promise<unknown>> = [];
    let modelAtCommit: ReturnType<ChunkMap['runs']> = [];
    for (let i = 0; i < 60; i++) {
      const v = (i * 37) % 390;
      // Overlapping writes and unmaps: only the order they were called in gives the model's result.
      if (i % 3 === 2) {
        model.unmapRange(v, 15, modelRefs);
        pending.push(map.unmapRange(v, 15, setup.chunkRefs));
      } else {
        model.mapRun(v, 10_000 + i * 20, 10, modelRefs);
        pending.push(map.mapRun(v, 10_000 + i * 20, sumsOf(10_000 + i * 20, 10), setup.chunkRefs));
      }
      lookups.push(map.runs((i * 53) % 400, 20));
      if (i === 30) {
        // A commit in the middle: after the mutations called before it, before those called after.
        modelAtCommit = model.runs(0, 400);
        pending.push(setup.maps.commit(() => Buffer.from(JSON.stringify(map.state()))));
      }
    }
    await Promise.all([...pending, ...lookups]);
    assert.deepEqual(await runsOf(map, 0, 400), model.runs(0, 400));
    const fromFile = new PagedMaps({ cache: new PageCache(setup.file, 64 * pageBytes), allocator: new PageAllocator(), pageRefs: new Counts() });
    const committed = fromFile.open(JSON.parse(setup.file.root!.body.toString()) as PagedMapState);
    assert.deepEqual(await runsOf(committed, 0, 400), modelAtCommit, 'the commit holds the mutations called before it, and only those');
    await checkCounts(setup, [map], { leaf: 4, interior: 4 }, 'after the concurrent mutations');
  });
});

test("over step 3's space maps: page counts and chunk counts in pages, the page allocator's free list, across commits", async () => {
  await withSpaceMaps(256, async (cache, space) => {
    const maps = new PagedMaps({ cache, allocator: space.pages, pageRefs: space.pageRefs, leafCapacity: 4, interiorCapacity: 4 });
    const model = new ChunkMap();
    const modelRefs = new Counts();
    const a = maps.empty();
    const write = async (map: PagedMap, twin: ChunkMap, v: number, n: number): Promise<void> => {
      const physical = await space.chunks.allocate(n);
      await map.mapRun(v, physical, sumsOf(physical, n), space.chunks);
      twin.mapRun(v, physical, n, modelRefs);
    };
    for (let v = 0; v < 300; v += 7) await write(a, model, v, 3);
    const b = a.clone();
    const twin = model.clone();
    for (let v = 1; v < 300; v += 31) await write(b, twin, v, 5);
    assert.equal(await a.unmapRange(40, 100, space.chunks), model.unmapRange(40, 100, modelRefs));
    // A root as step 4 will write it: the maps' pages, then the space maps' (their flush seals the page allocator;
    // the commit's `committed` on that allocator is SpaceMaps.committed).
    await maps.commit(() => space.flush());
    // Their pages of counts are now clean, and read only once loaded: step 4's pins will load the counts of the
    // pages a pass visits; here, all of them.
    const pagePin = await space.pageRefs.load(Array.from({ length: space.pages.state().nextPage }, (_, page) => page));
    const chunkPin = await space.chunks.counts.load(Array.from({ length: space.chunks.highWater }, (_, chunk) => chunk));
    for (let v = 3; v < 300; v += 13) await write(a, model, v, 2);
    assert.deepEqual(await runsOf(a, 0, 300), model.runs(0, 300));
    assert.deepEqual(await runsOf(b, 0, 300), twin.runs(0, 300));
    assert.deepEqual(await a.diff(b, 300), diffMaps(model, twin, 300));
    const held = (chunk: number): boolean => space.chunks.get(chunk) > 0;
    for (let chunk = 0; chunk < space.chunks.highWater; chunk++) assert.equal(held(chunk), modelRefs.get(chunk) > 0, `chunk ${chunk} held`);
    await a.drop(space.chunks);
    await b.drop(space.chunks);
    for (let page = 0; page < space.pages.state().nextPage; page++) assert.equal(space.pageRefs.get(page), 0, `page ${page} count`);
    for (let chunk = 0; chunk < space.chunks.highWater; chunk++) assert.equal(space.chunks.get(chunk), 0, `chunk ${chunk} count`);
    pagePin.release();
    chunkPin.release();
    await maps.commit(() => space.flush());
    assert.equal(space.pages.waitingCount, 0);
  });
});

test("a snapshot's chunks held alone are counted with their pages of counts loaded a slice at a time, not once per leaf", async () => {
  await withSpaceMaps(4096, async (cache, space) => {
    let chunkLoads = 0;
    const chunkCountPages = {
      loaded: (index: number): boolean => space.chunks.counts.loaded(index),
      load: (indexes: Iterable<number>): Promise<{ release(): void }> => {
        chunkLoads += 1;
        return space.chunks.counts.load(indexes);
      },
    };
    const maps = new PagedMaps({ cache, allocator: space.pages, pageRefs: space.pageRefs, leafCapacity: 8, interiorCapacity: 8, pageCountPages: space.pageRefs, chunkCountPages });
    // 12,000 chunks, one at a time at keys in a shuffled order: each leaf's chunks lie over all six pages of counts
    // (2,048 counts a page), as a volume written at random has them.
    const keys = Array.from({ length: 12_000 }, (_, i) => (i * 7_919) % 12_000);
    const volume = maps.empty();
    for (const key of keys) {
      const physical = await space.chunks.allocate(1);
      await volume.mapRun(key, physical, sumsOf(physical, 1), space.chunks);
    }
    const snapshot = await maps.cloneLoaded(volume);
    // Overwritten in the volume: 500 keys, one in 24, so that most leaves are copied and keep chunks of both kinds.
    for (let key = 0; key < 12_000; key += 24) {
      const physical = await space.chunks.allocate(1);
      await volume.mapRun(key, physical, sumsOf(physical, 1), space.chunks);
    }
    // Committed: the pages of counts are clean, and read only once loaded.
    await maps.commit(() => space.flush());
    chunkLoads = 0;
    assert.equal(await snapshot.uniqueChunks(space.chunks), 500);
    // The 500 leaves of the snapshot's that the volume's writes copied are its own: they took a load each (500)
    // before; now a load per slice of 256 pages (and per 4,096 chunks of it).
    assert.ok(chunkLoads <= 16, `${chunkLoads} loads of chunk counts`);
    assert.equal(await volume.uniqueChunks(space.chunks), 500);
  });
});

test('a map page damaged in one copy is read from the other; damaged in both, a lookup fails with ECORRUPT naming it', async () => {
  await withMaps({ cachePages: 4 }, async (setup) => {
    const map = setup.maps.empty();
    await map.mapRun(10, 500, sumsOf(500, 20), setup.chunkRefs);
    await setup.maps.commit(() => Buffer.from('root'));
    const leafPage = map.rootPage;
    const flip = (copy: number): void => {
      const fd = fs.openSync(`${setup.base}.${copy}`, 'r+');
      const at = leafPage * pageBytes + pageHeaderBytes + 4 + 16 * 3 + 7; // the physical chunk of the fourth entry
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, at);
      fs.writeSync(fd, Buffer.from([byte[0]! ^ 0x04]), 0, 1, at);
      fs.closeSync(fd);
    };
    const reopened = async (): Promise<{ file: PageFile; map: PagedMap }> => {
      const file = await PageFile.open(realFiles, setup.base);
      const maps = new PagedMaps({ cache: new PageCache(file, 4 * pageBytes), allocator: setup.allocator, pageRefs: setup.pageRefs });
      return { file, map: maps.open(map.state()) };
    };
    flip(0);
    const one = await reopened();
    assert.deepEqual(withoutSums(await one.map.runs(0, 40)), [
      { virtualChunk: 0, chunkCount: 10, physicalChunk: -1 },
      { virtualChunk: 10, chunkCount: 20, physicalChunk: 500 },
      { virtualChunk: 30, chunkCount: 10, physicalChunk: -1 },
    ]);
    assert.equal(one.file.repairs, 1, 'read from the other copy and rewritten');
    one.file.close();
    flip(0);
    flip(1);
    const both = await reopened();
    await assert.rejects(both.map.runs(0, 40), (error) => isCorrupt(error) && new RegExp(`metadata page ${leafPage} .*damaged in both copies`).test((error as Error).message));
    await assert.rejects(both.map.unmapRange(0, 40, setup.chunkRefs), isCorrupt);
    await assert.rejects(both.map.mapRun(2 ** 48 - 1, 0, [1, 2], setup.chunkRefs), (error) => error instanceof ChunkdError && error.code === 'EINVAL');
    both.file.close();
  });
});

// The model test.

const volumeChunks = 700;
type Op =
  | { kind: 'map'; map: number; v: number; n: number; reuse: number | null }
  | { kind: 'maps'; map: number; runs: Array<{ v: number; n: number; reuse: number | null }> }
  | { kind: 'unmap'; map: number; v: number; n: number }
  | { kind: 'clone'; map: number }
  | { kind: 'drop'; map: number }
  | { kind: 'commit' }
  | { kind: 'look'; map: number; other: number; v: number; n: number };

const index = fc.nat({ max: 7 });
const opArbitrary: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('map' as const), map: index, v: fc.nat({ max: volumeChunks - 1 }), n: fc.oneof(fc.integer({ min: 1, max: 12 }), fc.integer({ min: 1, max: 200 })), reuse: fc.option(fc.nat({ max: 5000 }), { freq: 4 }) }) },
  // Several runs in one pass (mapRuns, as a replay applies a journal's writes): overlapping ones, and chunks one
  // run of the batch maps and a later one overwrites or maps again elsewhere.
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant('maps' as const),
      map: index,
      runs: fc.array(fc.record({ v: fc.nat({ max: volumeChunks - 1 }), n: fc.oneof(fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 60 })), reuse: fc.option(fc.nat({ max: 5000 }), { freq: 3 }) }), { minLength: 1, maxLength: 30 }),
    }),
  },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('unmap' as const), map: index, v: fc.nat({ max: volumeChunks - 1 }), n: fc.integer({ min: 1, max: 300 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('clone' as const), map: index }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('drop' as const), map: index }) },
  { weight: 2, arbitrary: fc.constant({ kind: 'commit' as const }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('look' as const), map: index, other: index, v: fc.nat({ max: volumeChunks - 1 }), n: fc.integer({ min: 1, max: 100 }) }) },
);

test('paged maps match ChunkMap over random maps, unmaps, clones, drops and commits through a four-page cache (shrunk on failure)', { timeout: 120_000 }, async () => {
  const seed = testSeed('paged map model');
  const capacities = { leaf: 4, interior: 4 };
  const seen = { pagesRead: 0, levelMax: 0, sharedPages: 0 };
  await fc.assert(
    fc.asyncProperty(fc.array(opArbitrary, { minLength: 1, maxLength: 40, size: 'max' }), async (ops) => {
      await withMaps({ cachePages: 4, leafCapacity: capacities.leaf, interiorCapacity: capacities.interior }, async (setup) => {
        const modelRefs = new Counts();
        const live: Array<{ model: ChunkMap; paged: PagedMap }> = [{ model: new ChunkMap(), paged: setup.maps.empty() }];
        let nextPhysical = 0;
        /** What the last commit made durable: the pages its maps reach, which no later change may rewrite. */
        let durablePages = new Set<number>();
        const pick = (i: number): { model: ChunkMap; paged: PagedMap } => {
          if (live.length === 0) live.push({ model: new ChunkMap(), paged: setup.maps.empty() });
          return live[i % live.length]!;
        };
        for (const [step, op] of ops.entries()) {
          const label = `step ${step} (${JSON.stringify(op)})`;
          switch (op.kind) {
            case 'map': {
              const n = Math.min(op.n, volumeChunks - op.v);
              const physical = op.reuse ?? nextPhysical;
              nextPhysical = Math.max(nextPhysical, physical + n);
              const pair = pick(op.map);
              pair.model.mapRun(op.v, physical, n, modelRefs);
              await pair.paged.mapRun(op.v, physical, sumsOf(physical, n), setup.chunkRefs);
              break;
            }
            case 'maps': {
              const pair = pick(op.map);
              const runs = op.runs.map(({ v, n: wanted, reuse }) => {
                const n = Math.min(wanted, volumeChunks - v);
                const physical = reuse ?? nextPhysical;
                nextPhysical = Math.max(nextPhysical, physical + n);
                pair.model.mapRun(v, physical, n, modelRefs);
                return { virtualChunk: v, physicalChunk: physical, sums: sumsOf(physical, n) };
              });
              await pair.paged.mapRuns(runs, setup.chunkRefs);
              break;
            }
            case 'unmap': {
              const pair = pick(op.map);
              assert.equal(await pair.paged.unmapRange(op.v, op.n, setup.chunkRefs), pair.model.unmapRange(op.v, op.n, modelRefs), `${label}: chunks unmapped`);
              break;
            }
            case 'clone': {
              const pair = pick(op.map);
              live.push({ model: pair.model.clone(), paged: pair.paged.clone() });
              break;
            }
            case 'drop': {
              if (live.length === 0) break;
              const [pair] = live.splice(op.map % live.length, 1);
              pair!.model.drop(modelRefs);
              await pair!.paged.drop(setup.chunkRefs);
              break;
            }
            case 'commit': {
              await setup.maps.commit(() => Buffer.from(`step ${step}`));
              const rewritten = [...setup.cache.written].filter((page) => durablePages.has(page));
              assert.deepEqual(rewritten, [], `${label}: no page the previous root reaches is written over`);
              durablePages = new Set((await treeFacts(setup, live.map((pair) => pair.paged), capacities)).pageCounts.keys());
              // What a restart would read: the file alone, through a cache of its own.
              const fromFile = new PagedMaps({ cache: new PageCache(setup.file, 1024 * pageBytes), allocator: new PageAllocator(), pageRefs: new Counts() });
              for (const [i, pair] of live.entries()) assert.deepEqual(await runsOf(fromFile.open(pair.paged.state()), 0, volumeChunks), pair.model.runs(0, volumeChunks), `${label}: map ${i} as committed`);
              break;
            }
            case 'look': {
              const pair = pick(op.map);
              const other = pick(op.other);
              assert.deepEqual(await runsOf(pair.paged, op.v, op.n), pair.model.runs(op.v, op.n), `${label}: runs`);
              assert.deepEqual(await pair.paged.diff(other.paged, volumeChunks), diffMaps(pair.model, other.model, volumeChunks), `${label}: diff`);
              break;
            }
          }
          for (const [i, pair] of live.entries()) {
            assert.deepEqual(await runsOf(pair.paged, 0, volumeChunks), pair.model.runs(0, volumeChunks), `${label}: map ${i}`);
            assert.equal(pair.paged.mappedCount, pair.model.mappedCount, `${label}: map ${i} chunks mapped`);
          }
          // Counts differ per chunk (a leaf holds 4 entries, a ChunkMap page 512), but not which chunks are held.
          assert.deepEqual([...setup.chunkRefs.counts.keys()].sort((a, b) => a - b), [...modelRefs.counts.keys()].sort((a, b) => a - b), `${label}: chunks referenced`);
          const facts = await checkCounts(setup, live.map((pair) => pair.paged), capacities, label);
          seen.levelMax = Math.max(seen.levelMax, ...facts.levels);
          seen.sharedPages += [...facts.pageCounts.values()].filter((count) => count > 1).length;
        }
        seen.pagesRead += setup.cache.stats().misses;
        if (live.length >= 2) assert.deepEqual(await live[0]!.paged.diff(live[1]!.paged, volumeChunks), diffMaps(live[0]!.model, live[1]!.model, volumeChunks), 'final diff');
        for (const pair of live.splice(0)) {
          pair.model.drop(modelRefs);
          await pair.paged.drop(setup.chunkRefs);
        }
        await setup.maps.commit(() => Buffer.from('end'));
        assert.equal(setup.pageRefs.counts.size, 0, 'no page referenced');
        assert.equal(setup.chunkRefs.counts.size, 0, 'no chunk referenced');
        const state = setup.allocator.state();
        assert.equal(state.free.length, state.nextPage - firstDataPage, 'every page back to the allocator');
      });
    }),
    modelRunOptions(seed, 'PAGED_MAP_RUNS', 60, 60_000),
  );
  // The runs did what the test is for: deep trees, pages shared between maps, pages read back from the file.
  assert.ok(seen.levelMax >= 3 && seen.sharedPages > 100 && seen.pagesRead > 1000, JSON.stringify(seen));
  console.log(`# ${JSON.stringify(seen)}`);
});

test('mapRuns of keys too large to sort packed with their indexes maps the same as mapRun of each in turn', async () => {
  await withMaps({ cachePages: 64, leafCapacity: 4, interiorCapacity: 4 }, async (setup) => {
    const batched = setup.maps.empty();
    const oneByOne = setup.maps.empty();
    const base = 2 ** 48 - 200;
    // 40 runs, some overlapping, out of order: (2^48 - 200) * 40 is past 2^53, so the sort compares keys one by one.
    const runs = Array.from({ length: 40 }, (_, i) => ({ virtualChunk: base + ((i * 7) % 23) * 3, physicalChunk: 1_000 + i * 4, sums: sumsOf(1_000 + i * 4, 1 + (i % 4)) }));
    // A tree below them first (4-entry nodes), so that the pass must pick its children by the runs' ranges.
    for (const map of [batched, oneByOne]) for (let v = 0; v < 100; v += 2) await map.mapRun(base + v, 500 + v, sumsOf(500 + v, 1), setup.chunkRefs);
    await batched.mapRuns(runs, setup.chunkRefs);
    for (const run of runs) await oneByOne.mapRun(run.virtualChunk, run.physicalChunk, run.sums, setup.chunkRefs);
    assert.deepEqual(await runsOf(batched, base, 100), await runsOf(oneByOne, base, 100));
    assert.equal(batched.mappedCount, oneByOne.mappedCount);
  });
});

test('one-chunk and short writes into leaves changed since the commit apply in place, and keep the tree, its keys and its counts', async () => {
  const capacities = { leaf: 8, interior: 4 };
  await withMaps({ cachePages: 1024, leafCapacity: capacities.leaf, interiorCapacity: capacities.interior }, async (setup) => {
    const modelRefs = new Counts();
    const pairs = [{ model: new ChunkMap(), paged: setup.maps.empty() }];
    const random = seededRandom('paged map in place');
    let nextPhysical = 0;
    for (let step = 0; step < 600; step++) {
      const pair = pairs[random(pairs.length)]!;
      // Writes from the middle outwards, so that new least keys and runs across two leaves come up.
      const v = 150 + (random(2) === 0 ? 1 : -1) * random(150);
      const n = 1 + random(3);
      pair.model.mapRun(v, nextPhysical, n, modelRefs);
      await pair.paged.mapRun(v, nextPhysical, sumsOf(nextPhysical, n), setup.chunkRefs);
      nextPhysical += n;
      if (step % 97 === 96) await setup.maps.commit(() => Buffer.from(`step ${step}`));
      if (step === 300) pairs.push({ model: pairs[0]!.model.clone(), paged: pairs[0]!.paged.clone() });
      const label = `step ${step} (${n} at ${v})`;
      for (const [i, p] of pairs.entries()) assert.deepEqual(await runsOf(p.paged, 0, 310), p.model.runs(0, 310), `${label}: map ${i}`);
      await checkCounts(setup, pairs.map((p) => p.paged), capacities, label);
    }
  });
});

test('a write applied at once (mapRunNow) keeps the tree, keys and counts a queued one would, and waits while a mutation is queued before it', async () => {
  const capacities = { leaf: 8, interior: 4 };
  await withMaps({ cachePages: 1024, leafCapacity: capacities.leaf, interiorCapacity: capacities.interior }, async (setup) => {
    const modelRefs = new Counts();
    const model = new ChunkMap();
    const paged = setup.maps.empty();
    const random = seededRandom('paged map at once');
    let nextPhysical = 0;
    let atOnce = 0;
    for (let step = 0; step < 400; step++) {
      const v = random(300);
      const n = 1 + random(3);
      model.mapRun(v, nextPhysical, n, modelRefs);
      if (paged.mapRunNow(v, nextPhysical, sumsOf(nextPhysical, n), setup.chunkRefs)) atOnce += 1;
      else await paged.mapRun(v, nextPhysical, sumsOf(nextPhysical, n), setup.chunkRefs);
      nextPhysical += n;
      if (step % 97 === 96) await setup.maps.commit(() => Buffer.from(`step ${step}`));
      const label = `step ${step} (${n} at ${v})`;
      assert.deepEqual(await runsOf(paged, 0, 310), model.runs(0, 310), label);
      await checkCounts(setup, [paged], capacities, label);
    }
    assert.ok(atOnce > 100, `${atOnce} of 400 writes applied at once`);

    // A leaf changed since the commit (so the write could go in place), and a write to it queued and not yet
    // applied: a later write may not pass it, or the queued one would land last.
    await paged.mapRun(5, nextPhysical, sumsOf(nextPhysical, 1), setup.chunkRefs);
    assert.ok(paged.mapRunNow(5, nextPhysical + 1, sumsOf(nextPhysical + 1, 1), setup.chunkRefs), 'a write into a changed leaf with nothing queued applies at once');
    const queued = paged.mapRun(5, nextPhysical + 2, sumsOf(nextPhysical + 2, 1), setup.chunkRefs);
    assert.equal(paged.mapRunNow(5, nextPhysical + 3, sumsOf(nextPhysical + 3, 1), setup.chunkRefs), false, 'a write behind a queued one waits');
    await Promise.all([queued, paged.mapRun(5, nextPhysical + 3, sumsOf(nextPhysical + 3, 1), setup.chunkRefs)]);
    assert.equal((await runsOf(paged, 5, 1))[0]!.physicalChunk, nextPhysical + 3);
  });
});

/**
 * A map written beside its model (`ChunkMap`): `write` maps `count` chunks at `v` in both (at once if it can, unless
 * `queued`: returns whether it did), then checks the map's chunks 0 to 210 against the model and every count over
 * `roots` (the map alone unless set).
 */
function besideModel(setup: Setup, capacities: { leaf: number; interior: number }) {
  const modelRefs = new Counts();
  const model = new ChunkMap();
  const paged = setup.maps.empty();
  let nextPhysical = 1_000;
  const state = { roots: [paged] };
  const write = async (v: number, count: number, label: string, queued = false): Promise<boolean> => {
    model.mapRun(v, nextPhysical, count, modelRefs);
    const atOnce = !queued && paged.mapRunNow(v, nextPhysical, sumsOf(nextPhysical, count), setup.chunkRefs);
    if (!atOnce) await paged.mapRun(v, nextPhysical, sumsOf(nextPhysical, count), setup.chunkRefs);
    nextPhysical += count;
    assert.deepEqual(await runsOf(paged, 0, 210), model.runs(0, 210), label);
    await checkCounts(setup, state.roots, capacities, label);
    return atOnce;
  };
  return { modelRefs, model, paged, state, write };
}

test('an overwrite across several leaves changed since the commit applies at once in place; a hole, a clean leaf or a shared one leaves it to the pass', async () => {
  const capacities = { leaf: 8, interior: 4 };
  await withMaps({ cachePages: 1024, leafCapacity: capacities.leaf, interiorCapacity: capacities.interior }, async (setup) => {
    const { modelRefs, model, paged, state, write } = besideModel(setup, capacities);
    await write(0, 200, 'the first lap');
    const placed = (): { nextPage: number; dirty: number } => ({ nextPage: setup.allocator.state().nextPage, dirty: setup.maps.dirtyPages });
    const before = placed();
    // 40 chunks over 5 leaves or more of 8, every node changed since the (no) commit and held once.
    assert.ok(await write(13, 40, 'an overwrite over leaves changed since the commit'), 'applied at once');
    assert.deepEqual(placed(), before, 'no page placed, no node copied');
    assert.ok(await write(0, 200, 'an overwrite of the whole map'), 'applied at once');

    model.unmapRange(20, 1, modelRefs);
    await paged.unmapRange(20, 1, setup.chunkRefs);
    assert.equal(await write(13, 40, 'an overwrite over a hole'), false, 'a hole: the pass adds its entry');
    assert.ok(await write(13, 40, 'the same, the hole filled'), 'applied at once');

    await setup.maps.commit(() => Buffer.from('a commit'));
    assert.equal(await write(60, 40, 'an overwrite of leaves clean since the commit'), false, 'clean leaves: the pass copies them');
    assert.ok(await write(60, 40, 'the same again'), 'applied at once once copied');

    const snapshot = paged.clone();
    const snapshotRuns = await runsOf(snapshot, 0, 210);
    state.roots = [paged, snapshot];
    assert.equal(await write(60, 40, 'an overwrite of leaves a clone shares'), false, 'shared leaves: the pass copies them');
    assert.deepEqual(await runsOf(snapshot, 0, 210), snapshotRuns, 'the clone keeps what it had');
    await snapshot.drop(setup.chunkRefs);
    await checkCounts(setup, [paged], capacities, 'after the clone is dropped');
  });
});

test('a write into a leaf a clone shares, below nodes changed since the commit and held once, copies that leaf alone; the clone keeps what it had', async () => {
  const capacities = { leaf: 8, interior: 8 };
  await withMaps({ cachePages: 1024, leafCapacity: capacities.leaf, interiorCapacity: capacities.interior }, async (setup) => {
    const { model, paged, state, write: writeRun } = besideModel(setup, capacities);
    // Every second key of 0..200 (leaves of 4 to 8, three levels), then a clone (a snapshot) sharing every page.
    for (let v = 0; v < 200; v += 2) await writeRun(v, 1, `fill ${v}`);
    await setup.maps.commit(() => Buffer.from('first'));
    const snapshot = paged.clone();
    const snapshotRuns = await runsOf(snapshot, 0, 210);
    state.roots = [paged, snapshot];
    const write = async (v: number, label: string): Promise<boolean> => {
      const atOnce = await writeRun(v, 1, label);
      assert.deepEqual(await runsOf(snapshot, 0, 210), snapshotRuns, `${label}: the clone keeps what it had`);
      return atOnce;
    };
    // The first write copies the shared path (the pass); the next ones below the same parent copy their leaf alone.
    assert.equal(await write(1, 'a write below shared nodes'), false, 'shared interior nodes: the pass');
    const parentOf = async (v: number): Promise<InteriorNode> => {
      let node = await setup.maps.node(paged.rootPage);
      for (;;) {
        assert.equal(node.kind, 'interior');
        const interior = node as InteriorNode;
        const child = await setup.maps.node(interior.children[childIndex(interior.keys, v)]!);
        if (child.kind === 'leaf') return interior;
        node = child;
      }
    };
    const parent = await parentOf(1);
    const root = await setup.maps.node(paged.rootPage);
    const sharedLeaves = parent.children.filter((page) => setup.pageRefs.get(page) === 2);
    assert.ok(sharedLeaves.length >= 3, `${sharedLeaves.length} shared leaves below the parent`);
    for (const [n, page] of sharedLeaves.entries()) {
      const leaf = ((await setup.maps.node(page)) as LeafNode).entries();
      const dirtyBefore = setup.maps.dirtyPages;
      // An overwrite of a key it holds, then an insert next to it: the first copies the leaf, the second changes the copy.
      assert.ok(await write(leaf.keys[0]!, `an overwrite in shared leaf ${n}`), 'applied at once');
      assert.equal(setup.maps.dirtyPages, dirtyBefore + 1, 'one page placed: the leaf copied');
      assert.equal(setup.pageRefs.get(page), 1, 'the shared page held by the clone alone');
      assert.deepEqual(((await setup.maps.node(page)) as LeafNode).entries(), leaf, 'the shared leaf unchanged');
      assert.ok(await write(leaf.keys[0]! + 1, `an insert in shared leaf ${n}'s copy`), 'applied at once');
      assert.equal(setup.maps.dirtyPages, dirtyBefore + 1, 'the copy changed in place');
    }
    assert.equal(await parentOf(1), parent, 'the parent changed in place, not copied');
    assert.equal(await setup.maps.node(paged.rootPage), root, 'the root not copied');
    await setup.maps.commit(() => Buffer.from('second'));
    await snapshot.drop(setup.chunkRefs);
    state.roots = [paged];
    await checkCounts(setup, [paged], capacities, 'after the clone is dropped');
    assert.deepEqual(await runsOf(paged, 0, 210), model.runs(0, 210), 'after the clone is dropped');
  });
});

test('a write into a leaf committed since its last change, below nodes changed since, copies that leaf alone: no interior node copied, the committed page never written over', async () => {
  const capacities = { leaf: 8, interior: 8 };
  await withMaps({ cachePages: 1024, leafCapacity: capacities.leaf, interiorCapacity: capacities.interior }, async (setup) => {
    const { model, paged, write: writeRun } = besideModel(setup, capacities);
    const write = (v: number, label: string, queued = false): Promise<boolean> => writeRun(v, 1, label, queued);
    /** The pages the map reaches now, and the leaf holding `v`, with its parent. */
    const walk = async (v: number): Promise<{ pages: Set<number>; leaf: number; parent: number }> => {
      const pages = new Set<number>();
      let leaf = 0;
      let parent = 0;
      const visit = async (page: number, above: number): Promise<void> => {
        pages.add(page);
        const node = await setup.maps.node(page);
        if (node.kind === 'leaf') {
          if (node.entries().keys.includes(v)) [leaf, parent] = [page, above];
          return;
        }
        for (const child of node.children) await visit(child, page);
      };
      await visit(paged.rootPage, 0);
      return { pages, leaf, parent };
    };
    // Every second key of 0..200: leaves of 4 to 8, interior nodes of 4 to 8 below the root, three levels.
    for (let v = 0; v < 200; v += 2) await write(v, `fill ${v}`);
    await setup.maps.commit(() => Buffer.from('first'));
    const durable = await walk(0);
    // The first write after the commit copies its path (the pass): the root, the interior nodes, the leaf of 0.
    assert.equal(await write(1, 'a write below clean nodes'), false, 'clean nodes: the pass');
    const afterPass = await walk(0);
    const parentNode = await setup.maps.node(afterPass.parent);
    const rootNode = await setup.maps.node(paged.rootPage);
    // Keys in two other leaves below the same parent, committed since: each copied, its parent changed in place.
    const parent = (await setup.maps.node(afterPass.parent)) as InteriorNode;
    const others = parent.children.filter((page) => page !== afterPass.leaf);
    assert.ok(others.length >= 3 && others.every((page) => durable.pages.has(page)), 'other leaves the durable root reaches');
    const keyIn = async (page: number): Promise<number> => ((await setup.maps.node(page)) as LeafNode).keyAt(0) + 1;
    const dirtyBefore = setup.maps.dirtyPages;
    assert.ok(await write(await keyIn(others[0]!), 'a write into a committed leaf below a changed parent'), 'applied at once');
    assert.equal(setup.maps.dirtyPages, dirtyBefore + 1, 'one page placed: the leaf copied');
    assert.equal(await setup.maps.node(afterPass.parent), parentNode, 'the parent changed in place, not copied');
    assert.equal(await setup.maps.node(paged.rootPage), rootNode, 'the root not copied');
    assert.ok(!(await walk(0)).pages.has(others[0]!), 'the map no longer reaches the committed leaf');
    // Queued, with the leaf not in memory: read first, then taken the same way.
    const evictedKey = await keyIn(others[1]!);
    setup.cache.discard(others[1]!);
    assert.equal(setup.cache.peek(others[1]!), undefined);
    assert.equal(await write(evictedKey, 'a queued write into a committed leaf not in memory', true), false);
    assert.equal(setup.maps.dirtyPages, dirtyBefore + 2, 'one more page placed');
    assert.equal(await setup.maps.node(afterPass.parent), parentNode, 'read, then its parent changed in place');
    // The next commit writes none of the pages the first root reaches; reopened from it, the map is the model's.
    await setup.maps.commit(() => Buffer.from('second'));
    const rewritten = [...setup.cache.written].filter((page) => durable.pages.has(page));
    assert.deepEqual(rewritten, [], 'no page the first root reaches is written over');
    const cold = new PagedMaps({ cache: new PageCache(setup.file, 4 * pageBytes), allocator: new PageAllocator(), pageRefs: new Counts(), leafCapacity: capacities.leaf, interiorCapacity: capacities.interior });
    const reopened = cold.open({ rootPage: paged.rootPage, mappedCount: paged.mappedCount });
    assert.deepEqual(await runsOf(reopened, 0, 210), model.runs(0, 210), 'read back from the file');
  });
});
