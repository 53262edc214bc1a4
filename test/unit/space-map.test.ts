// Space maps of the paged metadata (src/store/space-map.ts, page-table.ts): reference counts of chunks and pages
// in pages, the chunk allocator over the chunk counts and the page allocator's free pages in pages, against plain
// models (a Map of counts and today's ChunkAllocator) through a cache of two pages, so pages of counts are evicted
// and read again; counts past 65,535; the free list written with a root and read back equal, naming no page in
// use; a search for free space that reads only the pages it needs; power loss between the pages and the root; and
// a root of version 1 (the free pages as a list) converted at the next flush.
// fast-check shrinks a failing sequence; SEED=<n> replays one (FC_PATH=<path> the shrunk case), SPACE_MAP_RUNS
// sets how many sequences run (default 40).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import fc from 'fast-check';
import { ChunkdError } from '../../src/core/errors.ts';
import { ChunkAllocator } from '../../src/store/allocator.ts';
import type { ChunkRefs } from '../../src/store/chunk-map.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { PageCache } from '../../src/store/page-cache.ts';
import { decodePage, firstDataPage, PageFile, pageBytes } from '../../src/store/page-file.ts';
import { chainPagesFor, PagedTable, pageKinds, tableEntriesPerPage, writeChain, type PageSink } from '../../src/store/page-table.ts';
import { countsPerPage, decodeSpaceRoot, encodeSpaceRoot, SpaceMaps } from '../../src/store/space-map.ts';
import { closeDescriptorsUnder, PowerLossFiles } from '../../src/testing/power-loss.ts';
import { makeRandom, modelRunOptions, randomInt, testSeed } from '../helpers/random.ts';

/** The shape the paged map (paged-map.ts) asks of page reference counts. */
interface PageRefs {
  get(page: number): number;
  increment(page: number): void;
  decrement(page: number): number;
}

const scratch = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-space-'));
const cacheBytes = 2 * pageBytes;

interface Real {
  base: string;
  file: PageFile;
  cache: PageCache;
  maps: SpaceMaps;
}

async function openReal(files: FileLayer, base: string): Promise<Real> {
  const file = await PageFile.open(files, base);
  const cache = new PageCache(file, cacheBytes);
  const maps = await SpaceMaps.open(cache, file.root?.body ?? null);
  return { base, file, cache, maps };
}

/** Flushes and commits a root holding the space maps; the deferred frees it covers are then reusable. */
async function commit(real: Real): Promise<void> {
  const root = real.maps.flush();
  await real.cache.commit(root);
  real.maps.committed();
}

/** Chunks [0, total) allocated and each counted once, a page of counts at a time. */
async function allInUse(real: Real, total: number): Promise<void> {
  assert.equal(await real.maps.chunks.allocate(total), 0);
  for (let first = 0; first < total; first += countsPerPage) {
    const run = Array.from({ length: countsPerPage }, (_, i) => first + i);
    await withCounts(real.maps.chunks.counts, run, () => run.forEach((chunk) => real.maps.chunks.increment(chunk)));
  }
}

/** `chunks` counted down to free, committed, and their deferred frees made reusable. */
async function freeCommitted(real: Real, chunks: number[]): Promise<void> {
  await withCounts(real.maps.chunks.counts, chunks, () => chunks.forEach((chunk) => real.maps.chunks.decrement(chunk)));
  const mark = real.maps.chunks.deferredMark();
  await commit(real);
  real.maps.chunks.releaseTaken(real.maps.chunks.takeDeferred(mark));
}

/** Runs `change` with the pages of counts of `indexes` loaded (a map of chunks or of pages). */
async function withCounts<T>(counts: { load(indexes: Iterable<number>): Promise<{ release(): void }> }, indexes: Iterable<number>, change: () => T): Promise<T> {
  const pin = await counts.load(indexes);
  try {
    return change();
  } finally {
    pin.release();
  }
}

interface Model {
  chunks: Map<number, number>;
  pages: Map<number, number>;
  allocator: ChunkAllocator;
}

const bump = (counts: Map<number, number>, index: number, delta: number): number => {
  const after = (counts.get(index) ?? 0) + delta;
  if (after === 0) counts.delete(index);
  else counts.set(index, after);
  return after;
};

/** Every count of the model equals the real one (and every other real count is zero), with the allocator's figures. */
async function check(model: Model, real: Real, label: string): Promise<void> {
  const chunks = real.maps.chunks;
  const top = Math.max(chunks.counts.pageCount * countsPerPage, ...model.chunks.keys(), 0);
  const all = Array.from({ length: top }, (_, i) => i);
  // A page at a time: through a cache of two pages, most are read from the file.
  for (let first = 0; first < top; first += countsPerPage) {
    const indexes = all.slice(first, first + countsPerPage);
    await withCounts(chunks.counts, indexes, () => {
      for (const chunk of indexes) if (chunks.get(chunk) !== (model.chunks.get(chunk) ?? 0)) assert.fail(`${label}: chunk ${chunk} counts ${chunks.get(chunk)}, the model ${model.chunks.get(chunk) ?? 0}`);
    });
  }
  await withCounts(real.maps.pageRefs, model.pages.keys(), () => {
    for (const [page, count] of model.pages) assert.equal(real.maps.pageRefs.get(page), count, `${label}: page ${page}`);
  });
  assert.equal(chunks.usedCount, model.allocator.usedCount, `${label}: chunks in use`);
  assert.equal(chunks.deferredCount, model.allocator.deferredCount, `${label}: chunks waiting for a commit`);
  assert.equal(await chunks.settledHighWater(), model.allocator.highWater, `${label}: high-water mark`);
}

/** Every page below the page allocator's mark is either free or named once by the space maps (nothing leaked, nothing twice). */
function checkPages(maps: SpaceMaps, label: string): void {
  const { nextPage, free } = maps.pages.state();
  const seen = new Map<number, string>();
  for (const [what, pages] of [['free', free], ['in use', maps.ownedPages()]] as const) {
    for (const page of pages) {
      assert.ok(!seen.has(page), `${label}: page ${page} is ${what} and ${seen.get(page)}`);
      seen.set(page, what);
    }
  }
  for (let page = firstDataPage; page < nextPage; page++) assert.ok(seen.has(page), `${label}: page ${page} is neither free nor in use`);
  assert.equal(seen.size, nextPage - firstDataPage, `${label}: pages at or above the mark`);
}

type Command = fc.AsyncCommand<Model, Real>;
const command = (label: string, run: (model: Model, real: Real) => Promise<void>): Command => ({ check: () => true, run, toString: () => label });

/** A write: a run allocated, then counted (or released, as a failed write). */
const write = (chunkCount: number, fails: boolean): Command =>
  command(`write ${chunkCount}${fails ? ' (fails)' : ''}`, async (model, real) => {
    const expected = model.allocator.allocate(chunkCount);
    const start = await real.maps.chunks.allocate(chunkCount);
    assert.equal(start, expected, `write ${chunkCount}: the run the allocator of today picks`);
    const run = Array.from({ length: chunkCount }, (_, i) => start + i);
    if (fails) {
      model.allocator.release(start, chunkCount);
      real.maps.chunks.release(start, chunkCount);
      return;
    }
    const refs: ChunkRefs = real.maps.chunks;
    // An even run counted at once (paged-map.ts's passes), an odd one a chunk at a time: the same counts either way.
    await withCounts(real.maps.chunks.counts, run, () => (chunkCount % 2 === 0 ? real.maps.chunks.incrementRun(start, chunkCount) : run.forEach((chunk) => refs.increment(chunk))));
    for (const chunk of run) bump(model.chunks, chunk, 1);
  });

/** The `pick`th chunk in use (by the model), if any. */
const pickChunk = (model: Model, pick: number): number | undefined => {
  const used = [...model.chunks.keys()].sort((a, b) => a - b);
  return used.length === 0 ? undefined : used[pick % used.length];
};

/** More references to a chunk in use (a snapshot, a shared page); 70,000 crosses into the overflow list. */
const share = (pick: number, times: number): Command =>
  command(`share #${pick} x${times}`, async (model, real) => {
    const chunk = pickChunk(model, pick);
    if (chunk === undefined) return;
    await withCounts(real.maps.chunks.counts, [chunk], () => {
      // Through the run's way for an even pick, its overflow list included.
      for (let i = 0; i < times; i++) {
        if (pick % 2 === 0) real.maps.chunks.incrementRun(chunk, 1);
        else real.maps.chunks.increment(chunk);
      }
    });
    bump(model.chunks, chunk, times);
  });

/** References dropped (an overwrite, a snapshot removed): at zero the chunk's free waits for a commit. */
const drop = (pick: number, times: number): Command =>
  command(`drop #${pick} x${times}`, async (model, real) => {
    const chunk = pickChunk(model, pick);
    if (chunk === undefined) return;
    const count = Math.min(times, model.chunks.get(chunk)!);
    await withCounts(real.maps.chunks.counts, [chunk], () => {
      for (let i = 0; i < count; i++) {
        if (pick % 2 === 0) {
          real.maps.chunks.decrementRun(chunk, 1);
          assert.equal(real.maps.chunks.get(chunk), bump(model.chunks, chunk, -1));
        } else assert.equal(real.maps.chunks.decrement(chunk), bump(model.chunks, chunk, -1));
      }
    });
    if (!model.chunks.has(chunk)) model.allocator.freeDeferred(chunk, 1, true);
  });

/** Every reference to the chunks of a stretch dropped (a trim), often across a boundary between pages of counts. */
const trim = (start: number, length: number): Command =>
  command(`trim ${start}+${length}`, async (model, real) => {
    const chunks = Array.from({ length }, (_, i) => start + i).filter((chunk) => model.chunks.has(chunk));
    await withCounts(real.maps.chunks.counts, chunks, () => {
      if (start % 2 === 0) {
        for (const chunk of chunks) {
          while (model.chunks.has(chunk)) assert.equal(real.maps.chunks.decrement(chunk), bump(model.chunks, chunk, -1));
        }
        return;
      }
      // The run's way (an odd start): each down to one a chunk at a time, then the last references of each stretch of
      // consecutive chunks at once, which frees them in order, as a chunk at a time would.
      for (const chunk of chunks) while (model.chunks.get(chunk)! > 1) assert.equal(real.maps.chunks.decrement(chunk), bump(model.chunks, chunk, -1));
      for (let i = 0; i < chunks.length; ) {
        let count = 1;
        while (i + count < chunks.length && chunks[i + count] === chunks[i]! + count) count += 1;
        real.maps.chunks.decrementRun(chunks[i]!, count);
        for (let k = i; k < i + count; k++) {
          bump(model.chunks, chunks[k]!, -1);
          assert.equal(real.maps.chunks.get(chunks[k]!), 0);
        }
        i += count;
      }
    });
    for (const chunk of chunks) model.allocator.freeDeferred(chunk, 1, true);
  });

/** Page reference counts (PageRefs), including past the overflow mark. */
const pageRef = (page: number, delta: number): Command =>
  command(`page ${page} ${delta > 0 ? '+' : ''}${delta}`, async (model, real) => {
    const refs: PageRefs = real.maps.pageRefs;
    const steps = delta > 0 ? delta : Math.min(-delta, model.pages.get(page) ?? 0);
    await withCounts(real.maps.pageRefs, [page], () => {
      for (let i = 0; i < steps; i++) {
        if (delta > 0) refs.increment(page);
        else assert.equal(refs.decrement(page), bump(model.pages, page, -1));
      }
    });
    if (delta > 0) bump(model.pages, page, delta);
  });

/** A durable commit: then the frees it covers are reusable, in the same extents as today's allocator gives. */
const commitCommand = command('commit', async (model, real) => {
  const mark = model.allocator.deferredMark();
  assert.equal(real.maps.chunks.deferredMark(), mark);
  await commit(real);
  const taken = real.maps.chunks.takeDeferred(mark);
  assert.deepEqual(taken, model.allocator.takeDeferred(mark));
  model.allocator.releaseTaken(taken);
  real.maps.chunks.releaseTaken(taken);
});

/**
 * Commit, close and open again from the root: the same counts and free pages. Before the maps are opened for good,
 * every page the free list names is overwritten with garbage: a free list naming a page in use shows as damage.
 */
const reopen = command('reopen', async (model, real) => {
  await commitCommand.run(model, real);
  const pagesBefore = real.maps.pages.state();
  checkPages(real.maps, 'before a reopen');
  real.file.close();
  const peek = await openReal(realFiles, real.base);
  assert.deepEqual(peek.maps.pages.state(), pagesBefore, 'the free pages read back equal');
  for (const page of pagesBefore.free) await peek.file.write(page, 0x7e, Buffer.from('garbage in a free page'));
  const reopened = { ...peek, cache: new PageCache(peek.file, cacheBytes) };
  reopened.maps = await SpaceMaps.open(reopened.cache, peek.file.root!.body);
  Object.assign(real, reopened);
  checkPages(real.maps, 'after a reopen');
  model.allocator = ChunkAllocator.fromUsed([...model.chunks.keys()].sort((a, b) => a - b).map((chunk) => ({ physicalChunk: chunk, chunkCount: 1 })));
  await check(model, real, 'after a reopen');
  assert.deepEqual(await real.maps.chunks.freeExtents(), model.allocator.freeExtents(), 'the free space to punch at open');
});

const checkCommand = command('check', (model, real) => check(model, real, 'check'));

const writeArbitrary = fc
  .tuple(fc.oneof(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 60, max: 2500 })), fc.nat({ max: 9 }))
  .map(([count, fail]) => write(count, fail === 0));
const trimArbitrary = fc
  .tuple(fc.integer({ min: 0, max: 3 }), fc.integer({ min: -50, max: 50 }), fc.integer({ min: 1, max: 120 }))
  .map(([page, offset, length]) => trim(Math.max(0, page * countsPerPage + offset), length));
// Listed more than once: weighted, so that space is freed, committed and found again often.
const commands = fc.commands(
  [
    writeArbitrary,
    writeArbitrary,
    writeArbitrary,
    trimArbitrary,
    trimArbitrary,
    fc.tuple(fc.nat(), fc.constantFrom(1, 2, 70_000)).map(([pick, times]) => share(pick, times)),
    fc.tuple(fc.nat(), fc.constantFrom(1, 1, 2, 5, 70_000)).map(([pick, times]) => drop(pick, times)),
    fc.tuple(fc.integer({ min: 2, max: 3 * countsPerPage }), fc.constantFrom(1, 3, -1, -2, 66_000, -66_000)).map(([page, delta]) => pageRef(page, delta)),
    fc.constant(commitCommand),
    fc.constant(commitCommand),
    fc.constant(reopen),
    fc.constant(checkCommand),
  ],
  { maxCommands: 80, size: 'max' },
);

test('space maps match a Map of counts and the allocator of today through a two-page cache (shrunk on failure)', { timeout: 300_000 }, async () => {
  const seed = testSeed('space map model');
  await fc.assert(
    fc.asyncProperty(commands, async (sequence) => {
      const directory = scratch();
      const real = await openReal(realFiles, path.join(directory, 'meta'));
      try {
        const model: Model = { chunks: new Map(), pages: new Map(), allocator: new ChunkAllocator() };
        await fc.asyncModelRun(() => ({ model, real }), sequence);
        await reopen.run(model, real);
      } finally {
        real.file.close();
        fs.rmSync(directory, { recursive: true, force: true });
      }
    }),
    modelRunOptions(seed, 'SPACE_MAP_RUNS', 40, 120_000),
  );
});

test('a table is written whole once, then only the leaves changed and the pages above them', async () => {
  const puts: number[] = [];
  const released: number[] = [];
  let next = 2;
  const bodies = new Map<number, Buffer>();
  const sink: PageSink = {
    allocate: () => next++,
    release: (page) => released.push(page),
    put: (page, _kind, body) => {
      puts.push(page);
      bodies.set(page, body);
    },
  };
  const table = new PagedTable(7);
  const length = tableEntriesPerPage * 3 + 5;
  for (let i = 0; i < length; i++) table.set(i, i * 1000 + 1, i % 2000);
  const first = table.flush(sink);
  assert.deepEqual(first, { length, depth: 2, top: puts[puts.length - 1] });
  assert.equal(puts.length, 5, 'four leaves and the page above them');
  puts.length = 0;
  table.set(tableEntriesPerPage + 3, 42, 43);
  const second = table.flush(sink);
  assert.equal(puts.length, 2, 'one leaf and the top');
  assert.equal(released.length, 2, 'the pages they replace');
  const source = { get: async (page: number) => ({ kind: pageKinds.table, body: bodies.get(page)! }) };
  const read = await PagedTable.open(source, second, 7);
  assert.equal(read.length, length);
  for (let i = 0; i < length; i++) {
    const value = i === tableEntriesPerPage + 3 ? 42 : i * 1000 + 1;
    const small = i === tableEntriesPerPage + 3 ? 43 : i % 2000;
    if (read.value(i) !== value || read.small(i) !== small) assert.fail(`entry ${i}: ${read.value(i)}/${read.small(i)}`);
  }
  assert.equal(read.small(length + 10), 7, 'past the end: the fill');

  // Grown past what two levels name: a third level, and the entries still read back.
  const big = tableEntriesPerPage * tableEntriesPerPage + 1;
  read.set(big - 1, 99, 1);
  const third = read.flush(sink);
  assert.equal(third.depth, 3);
  const reread = await PagedTable.open(source, third, 7);
  assert.deepEqual([reread.value(big - 1), reread.small(big - 1), reread.value(5), reread.small(big - 2)], [99, 1, 5001, 7]);
});

test('a search for free space reads only the pages of counts that can hold the run', async () => {
  const directory = scratch();
  try {
    let real = await openReal(realFiles, path.join(directory, 'meta'));
    const pagesOfCounts = 40;
    const total = pagesOfCounts * countsPerPage;
    await allInUse(real, total);
    // One chunk dropped in page 30, two neighbours in page 35.
    const dropped = [30 * countsPerPage + 7, 35 * countsPerPage + 100, 35 * countsPerPage + 101];
    await freeCommitted(real, dropped);
    real.file.close();

    real = await openReal(realFiles, real.base);
    const before = real.cache.stats().misses;
    assert.equal(await real.maps.chunks.allocate(2), 35 * countsPerPage + 100, 'the pair, found past the single chunk');
    assert.equal(await real.maps.chunks.allocate(1), 30 * countsPerPage + 7, 'the single chunk, from the start once the cursor passed it');
    assert.equal(await real.maps.chunks.allocate(1), total, 'then above the mark');
    const read = real.cache.stats().misses - before;
    assert.ok(read <= 4, `${read} pages of counts read out of ${pagesOfCounts}`);

    // A run across the boundary of two pages of counts, neither of which holds it alone.
    const across = Array.from({ length: 30 }, (_, i) => 12 * countsPerPage - 10 + i);
    await freeCommitted(real, across);
    assert.equal(await real.maps.chunks.allocate(25), 12 * countsPerPage - 10, 'the run that starts in one page and ends in the next');
    real.file.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('a search for a run walks only the free tail of a page with fewer free chunks than the run', async () => {
  // After random overwrites every page of counts holds a few free chunks among thousands in use: a run of a
  // write's chunks fits in none, and only the chunks that could begin a run into the next page are worth reading.
  const directory = scratch();
  try {
    const real = await openReal(realFiles, path.join(directory, 'meta'));
    const pagesOfCounts = 8;
    const total = pagesOfCounts * countsPerPage;
    await allInUse(real, total);
    // Three chunks dropped in each page, fewer than any run asked for below: single chunks at its start, middle
    // and end, but for a run of four across pages 5 and 6 (the last two of one, the first two of the other).
    const slotsOf = (page: number): number[] => (page === 5 ? [1000, countsPerPage - 2, countsPerPage - 1] : page === 6 ? [0, 1, 1000] : [3, 1000, countsPerPage - 2]);
    const dropped = Array.from({ length: pagesOfCounts }, (_, page) => slotsOf(page).map((slot) => page * countsPerPage + slot)).flat();
    await freeCommitted(real, dropped);
    const before = real.maps.chunks.searchedChunks;
    assert.equal(await real.maps.chunks.allocate(4), 6 * countsPerPage - 2, 'the run of four across pages 5 and 6');
    const searched = real.maps.chunks.searchedChunks - before;
    assert.ok(searched <= 4 * pagesOfCounts, `${searched} counts walked, for ${pagesOfCounts} pages of ${countsPerPage}`);
    assert.equal(await real.maps.chunks.allocate(8), total, 'no run of 8: above the mark');
    assert.equal(real.maps.chunks.searchedChunks - before - searched, 0, 'no page and the next hold 8 free chunks together: no count walked');
    real.file.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('a page released is not handed out before the root that stops naming it is durable', async () => {
  const directory = scratch();
  try {
    const real = await openReal(realFiles, path.join(directory, 'meta'));
    const pages = real.maps.pages;
    const released: number[] = [];
    const allocated: number[] = [];
    const release = pages.release.bind(pages);
    const allocate = pages.allocate.bind(pages);
    pages.release = (page) => {
      released.push(page);
      release(page);
    };
    pages.allocate = () => {
      const page = allocate();
      allocated.push(page);
      return page;
    };
    const bumpPage = (page: number): Promise<void> => withCounts(real.maps.pageRefs, [page], () => real.maps.pageRefs.increment(page));
    await bumpPage(5);
    await commit(real);

    // The page of counts is copied on its first change after a commit: the old one is released, named by the root.
    released.length = 0;
    await bumpPage(5);
    const root = real.maps.flush();
    const sealed = [...released];
    assert.ok(sealed.length >= 2, 'the old page of counts and what names it');
    released.length = 0;
    allocated.length = 0;
    const inFlight = real.cache.commit(root);
    // Changed while that commit is under way: a new copy, from pages free before it, never from those it releases.
    await bumpPage(5);
    await bumpPage(3 * countsPerPage);
    await inFlight;
    assert.ok(allocated.length >= 2);
    for (const page of allocated) assert.ok(!sealed.includes(page), `page ${page} handed out before the root that stopped naming it was durable`);
    const releasedDuring = [...released];
    assert.ok(releasedDuring.length >= 1, 'the copy written by the commit in flight, replaced');
    real.maps.committed();
    const free = pages.state().free;
    for (const page of sealed) assert.ok(free.includes(page), `page ${page} free once the root is durable`);
    for (const page of releasedDuring) assert.ok(!free.includes(page), `page ${page}: named by the root just made durable, not free`);

    allocated.length = 0;
    for (let page = 0; page < 8; page++) await bumpPage(page * countsPerPage);
    assert.ok(allocated.some((page) => sealed.includes(page)), 'freed pages are reused');
    await commit(real);
    real.file.close();
    const again = await openReal(realFiles, real.base);
    await withCounts(again.maps.pageRefs, [5], () => assert.equal(again.maps.pageRefs.get(5), 3));
    again.file.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

interface Snapshot {
  chunks: Map<number, number>;
  pages: Map<number, number>;
}

test('power loss between the pages and the root leaves the last root or the one in flight, whole', async () => {
  const seed = testSeed('space map power loss');
  const random = makeRandom(seed);
  const runs = Number(process.env.SPACE_MAP_POWER_LOSS_RUNS ?? 40);
  const outcomes = { committed: 0, inFlight: 0 };
  const chunkRange = 3 * countsPerPage;
  /** Random changes to the counts, applied to the maps and the snapshot alike. */
  const change = async (real: Real, snapshot: Snapshot): Promise<void> => {
    // A chunk whose count fell to zero waits for the commit before it may be counted again (the store never
    // references a freed chunk before its free is committed and released): not picked again in this change.
    const zeroed = new Set<number>();
    for (let i = 0; i < 20; i++) {
      const chunk = randomInt(random, chunkRange);
      const page = 2 + randomInt(random, 500);
      const times = random() < 0.05 ? 66_000 : 1 + randomInt(random, 3);
      if (zeroed.has(chunk)) continue;
      await withCounts(real.maps.chunks.counts, [chunk], () => {
        const down = (snapshot.chunks.get(chunk) ?? 0) >= times && random() < 0.4;
        for (let t = 0; t < times; t++) {
          if (down) real.maps.chunks.decrement(chunk);
          else real.maps.chunks.increment(chunk);
        }
        bump(snapshot.chunks, chunk, down ? -times : times);
        if ((snapshot.chunks.get(chunk) ?? 0) === 0) zeroed.add(chunk);
      });
      await withCounts(real.maps.pageRefs, [page], () => {
        real.maps.pageRefs.increment(page);
        bump(snapshot.pages, page, 1);
      });
    }
    // Frees become reusable at once here (no chunk data to protect): the allocator's part is the model test's.
    const mark = real.maps.chunks.deferredMark();
    real.maps.chunks.releaseTaken(real.maps.chunks.takeDeferred(mark));
  };
  const copy = (snapshot: Snapshot): Snapshot => ({ chunks: new Map(snapshot.chunks), pages: new Map(snapshot.pages) });

  for (let run = 0; run < runs; run++) {
    const directory = scratch();
    const base = path.join(directory, 'meta');
    try {
      const snapshots: Snapshot[] = [{ chunks: new Map(), pages: new Map() }];
      const before = await openReal(realFiles, base);
      for (let generation = 1; generation <= 2; generation++) {
        const next = copy(snapshots[generation - 1]!);
        await change(before, next);
        snapshots[generation] = next;
        await commit(before);
      }
      before.file.close();

      const files = new PowerLossFiles(directory, { crashAtChange: 1 + randomInt(random, 60) });
      const crashed = files.inner.untilFrozen().then(() => 'crashed' as const);
      let acknowledged = 2;
      const work = (async () => {
        const real = await openReal(files, base);
        for (;;) {
          const generation = real.file.nextGeneration;
          const next = copy(snapshots[generation - 1]!);
          await change(real, next);
          snapshots[generation] = next;
          await commit(real);
          acknowledged = generation;
        }
      })();
      work.catch(() => {});
      await Promise.race([crashed, work]);
      await files.cut(random);
      closeDescriptorsUnder(directory);

      if (process.env.SPACE_MAP_DEBUG) console.log(`# run ${run}: acknowledged ${acknowledged}, changes ${files.inner.changeCount}`);
      const after = await openReal(realFiles, base);
      const generation = after.file.root!.generation;
      assert.ok(generation === acknowledged || generation === acknowledged + 1, `run ${run}: root ${generation} after ${acknowledged} acknowledged (SEED=${seed})`);
      if (generation === acknowledged) outcomes.committed += 1;
      else outcomes.inFlight += 1;
      const expected = snapshots[generation]!;
      const chunks = Array.from({ length: chunkRange }, (_, i) => i);
      await withCounts(after.maps.chunks.counts, chunks, () => {
        for (const chunk of chunks) assert.equal(after.maps.chunks.get(chunk), expected.chunks.get(chunk) ?? 0, `run ${run}: chunk ${chunk} (SEED=${seed})`);
      });
      await withCounts(after.maps.pageRefs, expected.pages.keys(), () => {
        for (const [page, count] of expected.pages) assert.equal(after.maps.pageRefs.get(page), count, `run ${run}: page ${page} (SEED=${seed})`);
      });
      assert.equal(after.maps.chunks.usedCount, expected.chunks.size, `run ${run}: chunks in use`);
      checkPages(after.maps, `run ${run}`);
      after.file.close();
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  }
  console.log(`# ${runs} crashes: the last acknowledged root ${outcomes.committed} times, the one in flight ${outcomes.inFlight} times`);
  assert.ok(outcomes.committed > 0, 'some crash kept the last acknowledged root');
});

test('a page of counts damaged in both copies is refused when loaded; a count not loaded is a bug, not a zero', async () => {
  const directory = scratch();
  try {
    const real = await openReal(realFiles, path.join(directory, 'meta'));
    await withCounts(real.maps.chunks.counts, [5, 3 * countsPerPage], () => {
      real.maps.chunks.increment(5);
      real.maps.chunks.increment(3 * countsPerPage);
    });
    await commit(real);
    assert.throws(() => real.maps.chunks.get(5), /page 0 .*not loaded/);
    assert.equal(real.maps.chunks.get(10 * countsPerPage), 0, 'a page never written needs no load');
    real.file.close();

    // The page of counts holding chunk 5: the first page of that kind in the file.
    const copies = [0, 1].map((copy) => fs.readFileSync(`${real.base}.${copy}`));
    let countsPage = -1;
    for (let page = firstDataPage; page * pageBytes < copies[0]!.length && countsPage < 0; page++) {
      const decoded = decodePage(copies[0]!.subarray(page * pageBytes, (page + 1) * pageBytes), page);
      if (typeof decoded !== 'string' && decoded.kind === pageKinds.counts && decoded.body.readUInt16LE(10) === 1) countsPage = page;
    }
    assert.ok(countsPage >= firstDataPage);
    for (const copy of [0, 1]) {
      const fd = fs.openSync(`${real.base}.${copy}`, 'r+');
      fs.writeSync(fd, Buffer.from([0xaa]), 0, 1, countsPage * pageBytes + 100);
      fs.closeSync(fd);
    }
    const again = await openReal(realFiles, real.base);
    await assert.rejects(again.maps.chunks.counts.load([5]), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT');
    await withCounts(again.maps.chunks.counts, [3 * countsPerPage], () => assert.equal(again.maps.chunks.get(3 * countsPerPage), 1, 'the other page whole'));
    again.file.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('a root of version 1 (the free pages as a list written whole) opens, and the next flush writes the bitmap in its place', async () => {
  const directory = scratch();
  try {
    const real = await openReal(realFiles, path.join(directory, 'meta'));
    const bumpPage = (page: number): Promise<void> => withCounts(real.maps.pageRefs, [page], () => real.maps.pageRefs.increment(page));
    for (let round = 0; round < 6; round++) {
      await bumpPage(round * countsPerPage + 7);
      await commit(real);
    }
    // The root as a chunkd before the bitmap wrote it: the same counts, the free pages (and the pages the bitmap
    // took, which that chunkd did not have) as a chain of pages taken from them.
    const v2 = decodeSpaceRoot(real.file.root!.body);
    assert.equal(v2.version, 2);
    const list = [...real.maps.pages.state().free, ...real.maps.pages.ownedPages()].sort((a, b) => a - b);
    const chainPages = list.splice(0, chainPagesFor(list.length));
    const sink: PageSink = { allocate: () => assert.fail('no allocation'), release: () => assert.fail('no release'), put: (page, kind, body) => real.cache.put(page, { kind, body }) };
    const first = writeChain(sink, chainPages, list);
    const v1 = Buffer.from(encodeSpaceRoot({ ...v2, freeDepth: 0, freeTop: 0 }));
    v1.writeUInt8(1, 0);
    v1.writeUIntLE(first, 1 + 11 * 6, 6);
    v1.writeUIntLE(list.length, 1 + 12 * 6, 6);
    await real.cache.commit(v1);
    real.file.close();

    const old = await openReal(realFiles, real.base);
    assert.equal(decodeSpaceRoot(old.file.root!.body).version, 1);
    assert.deepEqual(old.maps.pages.state().free, list, 'the list read once: its pages free to hand out');
    assert.equal(old.maps.pages.waitingCount, chainPages.length, 'the chain\'s own pages wait for the next root');
    for (const page of chainPages) assert.ok(!old.maps.pages.isFree(page));
    await withCounts(old.maps.pageRefs, [7], () => assert.equal(old.maps.pageRefs.get(7), 1));
    await commit(old);
    assert.equal(decodeSpaceRoot(old.file.root!.body).version, 2, 'the next root names the bitmap');
    checkPages(old.maps, 'after the conversion');
    for (const page of chainPages) assert.ok(old.maps.pages.isFree(page) || old.maps.pages.ownedPages().includes(page), `the chain's page ${page} free again`);
    old.file.close();
    const converted = await openReal(realFiles, real.base);
    checkPages(converted.maps, 'reopened after the conversion');
    assert.deepEqual(converted.maps.pages.state(), old.maps.pages.state());
    converted.file.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
