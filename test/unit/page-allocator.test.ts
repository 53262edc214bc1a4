// Page numbers for copy-on-write (src/store/page-allocator.ts): a released page is not handed out again before the
// commit that stops naming it; then it is, before any new page; a double release and a bad saved state are refused;
// the free pages are written as a bitmap in pages, a flush writing the leaves that changed, past 2^24 free pages.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { PageAllocator, pagesPerLeaf, type FreePagesRoot } from '../../src/store/page-allocator.ts';
import { firstDataPage } from '../../src/store/page-file.ts';

test('a released page waits for the commit, then is reused before any new page', () => {
  const pages = new PageAllocator();
  const [a, b, c] = [pages.allocate(), pages.allocate(), pages.allocate()];
  assert.deepEqual([a, b, c], [firstDataPage, firstDataPage + 1, firstDataPage + 2]);
  pages.release(b);
  assert.equal(pages.allocate(), firstDataPage + 3, 'not before the commit');
  assert.deepEqual(pages.state(), { nextPage: firstDataPage + 4, free: [] }, 'a released page still counts as in use in what the root records');
  pages.committed();
  assert.deepEqual(pages.state().free, [b]);
  assert.equal(pages.allocate(), b, 'after it');
  assert.equal(pages.allocate(), firstDataPage + 4);
});

test('a double release, a release of a page never handed out, and a bad saved state are refused', () => {
  const pages = new PageAllocator({ nextPage: 10, free: [4, 7] });
  assert.throws(() => pages.release(4), /released twice/, 'a free page');
  pages.release(5);
  assert.throws(() => pages.release(5), /released twice/);
  assert.throws(() => pages.release(10), /never handed out/);
  assert.throws(() => pages.release(1), /never handed out/, 'a root slot');
  const corrupt = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ECORRUPT';
  assert.throws(() => new PageAllocator({ nextPage: 10, free: [10] }), corrupt);
  assert.throws(() => new PageAllocator({ nextPage: 10, free: [3, 3] }), corrupt);
  assert.throws(() => new PageAllocator({ nextPage: 1, free: [] }), corrupt);
  const restored = new PageAllocator(pages.state());
  assert.deepEqual(restored.state(), { nextPage: 10, free: [4, 7] }, 'the uncommitted release is not in the saved state');
});

/** Pages put by a flush, kept as a page file would (a later put of a page replaces it), readable as a PageSource. */
class MemoryPages {
  readonly pages = new Map<number, { kind: number; body: Buffer }>();
  /** Pages put by the last flush. */
  written: number[] = [];
  put(pageNumber: number, kind: number, body: Buffer): void {
    this.pages.set(pageNumber, { kind, body: Buffer.from(body) });
    this.written.push(pageNumber);
  }
  async get(pageNumber: number): Promise<{ kind: number; body: Buffer }> {
    const page = this.pages.get(pageNumber);
    if (page === undefined) throw new Error(`page ${pageNumber} never written`);
    return page;
  }
  flush(allocator: PageAllocator): FreePagesRoot {
    this.written = [];
    return allocator.flush(this);
  }
}

/** The pages the root of `root` records as free (a fresh open of it). */
async function freeIn(store: MemoryPages, root: FreePagesRoot): Promise<number[]> {
  return (await PageAllocator.open(store, root)).state().free;
}

test('sealed for a commit: the root records the released pages as free; those released after wait for the next commit', async () => {
  const store = new MemoryPages();
  const pages = new PageAllocator({ nextPage: 10, free: [] });
  pages.release(4);
  const root = store.flush(pages);
  assert.deepEqual((await freeIn(store, root)).filter((page) => page < 10), [4], 'the new root no longer names page 4 (pages above 10: made free by the flush, see below)');
  const own = pages.ownedPages();
  assert.ok(own.length === 1 && own.every((page) => page >= 10), `the bitmap's one leaf (no table under a leaf's pages), from above the mark (none free): ${own.join(', ')}`);
  const madeFree = pages.state().free;
  assert.ok(madeFree.every((page) => page >= 10 && !own.includes(page)), `the pages the flush made free above the mark: ${madeFree.join(', ')}`);
  for (const page of madeFree) assert.equal(pages.allocate(), page);
  assert.equal(pages.allocate(), root.nextPage, 'not handed out before that root is durable');
  pages.release(5); // while the commit is under way: the root being written still names it
  assert.throws(() => pages.release(4), /released twice/);
  pages.committed();
  assert.deepEqual(pages.state().free, [4]);
  assert.equal(pages.waitingCount, 1);
  pages.committed();
  assert.deepEqual(pages.state().free, [4, 5], 'page 5 with the next commit');
});

test('a second flush before the first commit keeps the first\'s releases sealed, and its root records both', async () => {
  const store = new MemoryPages();
  const pages = new PageAllocator({ nextPage: 2000, free: [50, 3, 1500] });
  for (const page of [100, 9, 10, 1000, 11]) pages.release(page);
  const first = store.flush(pages);
  const firstOwn = pages.ownedPages();
  // The bitmap's own pages come from the free pages (the lowest first): not free in what the root records.
  const notOwn = (list: number[]): number[] => list.filter((page) => !pages.ownedPages().includes(page));
  assert.deepEqual((await freeIn(store, first)).filter((page) => page < 2000), notOwn([3, 9, 10, 11, 50, 100, 1000, 1500]), 'numbers, not strings: 9 before 10 before 100');
  pages.release(7);
  pages.release(2);
  const second = store.flush(pages);
  assert.deepEqual((await freeIn(store, second)).filter((page) => page < 2000), notOwn([2, 3, 7, 9, 10, 11, 50, 100, 1000, 1500]), 'a second seal before the first commit keeps the first');
  pages.committed();
  // The first flush's own pages too: the second root, durable now, no longer names them.
  assert.ok(firstOwn.some((page) => page < 2000 && pages.isFree(page)));
  assert.deepEqual(pages.state().free.filter((page) => page < 2000), notOwn([2, 3, 7, 9, 10, 11, 50, 100, 1000, 1500]));
  assert.equal(pages.waitingCount, 0);
});

test('a flush writes the leaves of free pages that changed, and the table above them: not the others', async () => {
  const store = new MemoryPages();
  // Three leaves' worth of pages, every other one free.
  const nextPage = 3 * pagesPerLeaf;
  const free = Array.from({ length: nextPage / 2 - 1 }, (_, i) => 2 + 2 * i);
  const pages = new PageAllocator({ nextPage, free });
  const first = store.flush(pages);
  pages.committed();
  assert.equal(store.written.length, 4, 'the first flush: three leaves and the table');
  assert.deepEqual(await freeIn(store, first), pages.state().free);
  // A page taken from the middle leaf and one released in the last: those two leaves, and the table's one page.
  const lowest = pages.state().free[0];
  const taken = pages.allocate();
  pages.release(pagesPerLeaf * 2 + 1);
  const second = store.flush(pages);
  assert.equal(store.written.length, 3, `the second flush wrote ${store.written.length} pages`);
  pages.committed();
  assert.equal(taken, lowest, 'the lowest free page first');
  assert.deepEqual(await freeIn(store, second), pages.state().free);
  // Nothing changed: nothing written.
  store.flush(pages);
  assert.equal(store.written.length, 0);
});

test('a leaf or table damaged, or disagreeing with the mark, is refused at open', async () => {
  const store = new MemoryPages();
  // Two leaves: a table names them (one alone the root names).
  const pages = new PageAllocator({ nextPage: pagesPerLeaf + 100, free: [10, 20, 30, pagesPerLeaf + 50] });
  const root = store.flush(pages);
  assert.equal(root.directory.depth, 1);
  const corrupt = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ECORRUPT';
  await assert.rejects(PageAllocator.open(store, { ...root, nextPage: pagesPerLeaf + 40 }), /outside/, 'a free page above the mark');
  await assert.rejects(PageAllocator.open(store, { ...root, nextPage: 2 * pagesPerLeaf + 5 }), corrupt, 'a table shorter than the mark needs');
  await assert.rejects(PageAllocator.open(store, { ...root, directory: { length: 2, depth: 0, top: root.directory.top } }), corrupt, 'no table for two leaves');
  await assert.rejects(PageAllocator.open(store, { nextPage: 100, directory: { length: 1, depth: 1, top: root.directory.top } }), /for one leaf/, 'a table for one leaf');
  const leafPage = pages.ownedPages().find((page) => store.pages.get(page)!.kind === 0x33)!;
  const leaf = store.pages.get(leafPage)!;
  const body = Buffer.from(leaf.body);
  body[5]! ^= 0x10;
  store.pages.set(leafPage, { kind: leaf.kind, body });
  await assert.rejects(PageAllocator.open(store, root), /its table says/, 'a leaf whose count its table does not record');
  store.pages.set(leafPage, { kind: 0x32, body: leaf.body });
  await assert.rejects(PageAllocator.open(store, root), corrupt, 'a page of another kind');
});

test('past 2^24 free pages (a Set\'s limit in V8): a volume\'s worth released, flushed, reopened and handed out again, none twice', async () => {
  const total = 2 ** 24 + 1000;
  const store = new MemoryPages();
  const pages = new PageAllocator();
  for (let i = 0; i < total; i++) pages.allocate();
  store.flush(pages);
  pages.committed();
  const mark = pages.nextPage;
  for (let page = firstDataPage; page < firstDataPage + total; page++) pages.release(page);
  assert.equal(pages.waitingCount, total);
  const root = store.flush(pages);
  const leaves = Math.ceil(mark / pagesPerLeaf);
  assert.ok(store.written.length <= leaves + 4, `the flush wrote ${store.written.length} pages for ${leaves} leaves`);
  pages.committed();
  // And a few above the mark, made free by the flushes for the bitmap's own pages (see page-allocator.ts).
  const extra = pages.freeCount - total;
  assert.ok(extra >= 0 && extra <= 2 * leaves, `${extra} pages free above the mark`);
  const reopened = await PageAllocator.open(store, root);
  assert.equal(reopened.freeCount, total + extra, 'every page free after the reopen');
  const seen = new Uint8Array(reopened.nextPage + 1);
  for (let i = 0; i < total; i++) {
    const page = reopened.allocate();
    if (!(page >= firstDataPage && page < firstDataPage + total && seen[page] === 0)) assert.fail(`page ${page} handed out twice, or before a lower free page`);
    seen[page] = 1;
  }
  assert.equal(reopened.freeCount, extra);
  for (let i = 0; i < extra; i++) assert.ok(reopened.allocate() >= firstDataPage + total);
  assert.ok(reopened.allocate() >= reopened.nextPage - 1, 'then pages above the mark');
  // Two checkpoints after, then a change: only its leaf and the table's pages (two levels) are written.
  for (let i = 0; i < 2; i++) {
    store.flush(reopened);
    reopened.committed();
  }
  reopened.release(firstDataPage + 12_345);
  store.flush(reopened);
  assert.ok(store.written.length <= 3, `a later flush wrote ${store.written.length} pages`);
}, 60_000);

test('upcoming names the pages the next allocations hand out, free ones first, then new ones', () => {
  const allocator = new PageAllocator({ nextPage: 10, free: [7, 3, 5] });
  const expected = allocator.upcoming(5);
  assert.deepEqual(allocator.upcoming(2), expected.slice(0, 2), 'a shorter look is a prefix');
  assert.deepEqual(Array.from({ length: 5 }, () => allocator.allocate()), expected);
  assert.deepEqual([...expected].sort((a, b) => a - b), [3, 5, 7, 10, 11]);
  allocator.release(5);
  assert.deepEqual(allocator.upcoming(2), [12, 13], 'a page released is not upcoming before the commit');
});

test('one leaf named by the root, then a table once a second leaf is needed: each reopened equal, every page free, the bitmap\'s or handed out once', async () => {
  const store = new MemoryPages();
  let pages = new PageAllocator();
  const held = new Set<number>();
  const check = (label: string): void => {
    const own = new Set(pages.ownedPages());
    for (let page = firstDataPage; page < pages.nextPage; page++) {
      const roles = [pages.isFree(page), own.has(page), held.has(page)].filter(Boolean).length;
      if (roles !== 1) assert.fail(`${label}: page ${page} free ${pages.isFree(page)}, the bitmap's ${own.has(page)}, handed out ${held.has(page)}`);
    }
  };
  let round = 0;
  for (const target of [1000, pagesPerLeaf - 10, pagesPerLeaf + 2000, 2 * pagesPerLeaf + 10]) {
    while (pages.nextPage < target) held.add(pages.allocate());
    // Every third page handed out comes back.
    for (const page of [...held].filter((_, i) => i % 3 === round % 3)) {
      pages.release(page);
      held.delete(page);
    }
    round += 1;
    const root = store.flush(pages);
    pages.committed();
    assert.equal(root.directory.depth === 0, Math.ceil(root.nextPage / pagesPerLeaf) === 1, `at ${root.nextPage} pages: depth ${root.directory.depth}`);
    check(`at ${root.nextPage} pages`);
    const reopened = await PageAllocator.open(store, root);
    assert.deepEqual(reopened.state(), pages.state(), `at ${root.nextPage} pages: reopened`);
    assert.deepEqual(reopened.ownedPages().sort((a, b) => a - b), pages.ownedPages().sort((a, b) => a - b));
    pages = reopened;
    check(`at ${root.nextPage} pages, reopened`);
  }
});
