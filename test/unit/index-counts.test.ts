import assert from 'node:assert/strict';
import { test } from 'vitest';
import { IndexCounts } from '../../src/store/index-counts.ts';

test('counts by index: add returns the count before, get and has read them, end and size follow, entries in index order', () => {
  const counts = new IndexCounts();
  assert.equal(counts.end, 0);
  assert.equal(counts.get(5), 0);
  assert.equal(counts.add(70_000), 0);
  assert.equal(counts.add(3), 0);
  assert.equal(counts.add(70_000), 1);
  assert.equal(counts.add(2 ** 40), 0); // a page or chunk number past 32 bits
  assert.equal(counts.get(70_000), 2);
  assert.ok(counts.has(3) && !counts.has(4));
  assert.equal(counts.end, 2 ** 40 + 1);
  assert.equal(counts.size, 3);
  assert.deepEqual([...counts.entries()].filter(([index]) => index < 2 ** 20), [[3, 1], [70_000, 2]]);
});

test('more distinct indexes than a Map can hold (2^24: the walk of 64 GiB of chunks in use threw)', () => {
  const counts = new IndexCounts();
  const n = 2 ** 24 + 3;
  for (let i = 0; i < n; i++) counts.add(i);
  assert.equal(counts.size, n);
  assert.equal(counts.end, n);
  assert.equal(counts.get(n - 1), 1);
  assert.equal(counts.get(n), 0);
});
