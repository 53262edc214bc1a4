// Page numbers for copy-on-write (src/store/page-allocator.ts): a released page is not handed out again before the
// commit that stops naming it; then it is, before any new page; a double release and a bad saved state are refused.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { PageAllocator } from '../../src/store/page-allocator.ts';
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

test('sealed for a commit: the root records the released pages as free; those released after wait for the next commit', () => {
  const pages = new PageAllocator({ nextPage: 10, free: [] });
  pages.release(4);
  assert.deepEqual(pages.sealForCommit(), { nextPage: 10, free: [4] }, 'the new root no longer names page 4');
  assert.equal(pages.allocate(), 10, 'not handed out before that root is durable');
  pages.release(5); // while the commit is under way: the root being written still names it
  assert.throws(() => pages.release(4), /released twice/);
  pages.committed();
  assert.deepEqual(pages.state(), { nextPage: 11, free: [4] });
  assert.equal(pages.waitingCount, 1);
  pages.committed();
  assert.deepEqual(pages.state().free, [4, 5], 'page 5 with the next commit');
});

test('the free list a root records is in ascending order of page numbers, free and sealed pages together', () => {
  const pages = new PageAllocator({ nextPage: 2000, free: [50, 3, 1500] });
  for (const page of [100, 9, 10, 1000, 11]) pages.release(page);
  assert.deepEqual(pages.sealForCommit().free, [3, 9, 10, 11, 50, 100, 1000, 1500], 'numbers, not strings: 9 before 10 before 100');
  pages.release(7);
  pages.release(2);
  assert.deepEqual(pages.sealForCommit().free, [2, 3, 7, 9, 10, 11, 50, 100, 1000, 1500], 'a second seal before the first commit keeps the first');
  pages.committed();
  assert.deepEqual(pages.state().free, [2, 3, 7, 9, 10, 11, 50, 100, 1000, 1500]);
});

test('upcoming names the pages the next allocations hand out, free ones first, then new ones', () => {
  const allocator = new PageAllocator({ nextPage: 10, free: [7, 3, 5] });
  const expected = allocator.upcoming(5);
  assert.deepEqual(allocator.upcoming(2), expected.slice(0, 2), 'a shorter look is a prefix');
  assert.deepEqual(Array.from({ length: 5 }, () => allocator.allocate()), expected);
  assert.deepEqual([...expected].sort((a, b) => a - b), [3, 5, 7, 10, 11]);
  allocator.release(5);
  assert.deepEqual(allocator.upcoming(2), [12, 13], 'a page released is not upcoming before the commit');
});
