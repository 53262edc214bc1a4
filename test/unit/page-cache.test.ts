// The paged metadata's cache (src/store/page-cache.ts): clean pages bounded in bytes, dirty pages never evicted
// and written by commit, one file read for a page asked for by many at once, a put winning over a read in flight.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { realFiles } from '../../src/store/file-layer.ts';
import { PageCache } from '../../src/store/page-cache.ts';
import { firstDataPage, PageFile, pageBytes } from '../../src/store/page-file.ts';

const body = (pageNumber: number, version = 0): Buffer => Buffer.from(`page ${pageNumber} version ${version} `.repeat(1 + (pageNumber % 50)));

async function withFile(run: (base: string) => Promise<void>): Promise<void> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-pagecache-'));
  try {
    await run(path.join(directory, 'meta'));
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

test('dirty pages are kept whatever the bound until commit writes them; then clean pages stay within the bound', async () => {
  await withFile(async (base) => {
    const file = await PageFile.open(realFiles, base);
    const cache = new PageCache(file, 2 * pageBytes);
    const pages = Array.from({ length: 20 }, (_, i) => firstDataPage + i);
    for (const n of pages) cache.put(n, { kind: 1, body: body(n) });
    assert.equal(cache.stats().dirtyBytes, 20 * pageBytes);
    for (const n of pages) assert.deepEqual((await cache.get(n)).body, body(n));
    assert.equal(cache.stats().misses, 0, 'dirty pages come from memory');
    const root = await cache.commit(Buffer.from('one'));
    assert.equal(root.generation, 1);
    assert.equal(cache.stats().dirtyBytes, 0);
    assert.ok(cache.stats().cleanBytes <= 2 * pageBytes);
    file.close();

    const again = await PageFile.open(realFiles, base);
    const cold = new PageCache(again, 8 * pageBytes);
    for (let round = 0; round < 2; round++) {
      for (const n of [...pages].reverse()) assert.deepEqual((await cold.get(n)).body, body(n));
      assert.ok(cold.stats().cleanBytes <= 8 * pageBytes, `round ${round}: within the bound`);
    }
    assert.equal(cold.stats().misses, 40, 'twenty pages through an eight-page cache, twice in the same order: every one a miss');
    await cold.get(pages[0]!);
    assert.equal(cold.stats().hits, 1, 'the last pages read are the ones held');
    again.close();
  });
});

test('a commit writes consecutive dirty pages as runs, one write per copy for up to 32 pages, and single pages alone', async () => {
  await withFile(async (base) => {
    const lengths: number[] = [];
    // The data pages' writes (not the root slots').
    const counting = { ...realFiles, write: (fd: number, data: Uint8Array, position: number) => (position >= firstDataPage * pageBytes && lengths.push(data.length), realFiles.write(fd, data, position)) };
    const file = await PageFile.open(counting, base);
    const cache = new PageCache(file, 256 * pageBytes);
    // 40 consecutive pages (a run of 32 and one of 8), a gap, 1 page alone, a gap, 2 pages.
    const pages = [...Array.from({ length: 40 }, (_, i) => firstDataPage + i), firstDataPage + 50, firstDataPage + 60, firstDataPage + 61];
    for (const n of pages.toReversed()) cache.put(n, { kind: 1, body: body(n) });
    lengths.length = 0;
    await cache.commit(Buffer.from('one'));
    const pageWrites = lengths.map((length) => length / pageBytes).sort((a, b) => a - b);
    assert.deepEqual(pageWrites, [1, 1, 2, 2, 8, 8, 32, 32]);
    file.close();
    const again = await PageFile.open(realFiles, base);
    const cold = new PageCache(again, 8 * pageBytes);
    for (const n of pages) assert.deepEqual((await cold.get(n)).body, body(n));
    again.close();
  });
});

test('a page asked for by many at once is read once; a put while it is read wins', async () => {
  await withFile(async (base) => {
    const file = await PageFile.open(realFiles, base);
    const first = new PageCache(file, 16 * pageBytes);
    first.put(firstDataPage, { kind: 1, body: body(2) });
    first.put(firstDataPage + 1, { kind: 1, body: body(3) });
    await first.commit(Buffer.from('root'));

    const cache = new PageCache(file, 16 * pageBytes);
    const got = await Promise.all(Array.from({ length: 10 }, () => cache.get(firstDataPage)));
    assert.ok(got.every((page) => page.body.equals(body(2))));
    assert.equal(cache.stats().misses, 1);

    const reading = cache.get(firstDataPage + 1);
    cache.put(firstDataPage + 1, { kind: 1, body: body(3, 1) });
    assert.deepEqual((await reading).body, body(3, 1), 'the read in flight answers the newer page');
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual((await cache.get(firstDataPage + 1)).body, body(3, 1), 'and the page read does not replace it later');
    await cache.commit(Buffer.from('root two'));
    const fresh = new PageCache(file, 16 * pageBytes);
    assert.deepEqual((await fresh.get(firstDataPage + 1)).body, body(3, 1));
    file.close();
  });
});

test('a read in flight across a put and its commit does not replace the committed page, nor answer the older one', async () => {
  await withFile(async (base) => {
    const file = await PageFile.open(realFiles, base);
    const first = new PageCache(file, 16 * pageBytes);
    first.put(firstDataPage, { kind: 1, body: body(2) });
    await first.commit(Buffer.from('root'));

    // The read gets the old bytes at once and is answered only when let go: the put and a whole commit come between.
    let letGo!: () => void;
    const held = new Promise<void>((resolve) => (letGo = resolve));
    const read = file.read.bind(file);
    file.read = (pageNumber: number) => read(pageNumber).then(async (page) => (await held, page));
    const cache = new PageCache(file, 16 * pageBytes);
    const reading = cache.get(firstDataPage);
    await new Promise((resolve) => setImmediate(resolve));
    cache.put(firstDataPage, { kind: 1, body: body(2, 1) });
    await cache.commit(Buffer.from('root two'));
    letGo();
    assert.deepEqual((await reading).body, body(2, 1), 'the read in flight answers the committed page');
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(cache.peek(firstDataPage)?.body, body(2, 1), 'the page read before the put does not replace it');
    // The same across a discard: a page freed while it was read is not cached from that read.
    const again = cache.get(firstDataPage + 7).catch(() => undefined);
    cache.discard(firstDataPage + 7);
    await again;
    assert.equal(cache.peek(firstDataPage + 7), undefined);
    file.close();
  });
});

test('peek answers from memory only; a discarded page is not written by the next commit', async () => {
  await withFile(async (base) => {
    const file = await PageFile.open(realFiles, base);
    const cache = new PageCache(file, 4 * pageBytes);
    cache.put(firstDataPage, { kind: 1, body: body(2) });
    cache.put(firstDataPage + 1, { kind: 1, body: body(3) });
    assert.deepEqual(cache.peek(firstDataPage)?.body, body(2));
    cache.discard(firstDataPage + 1);
    assert.equal(cache.peek(firstDataPage + 1), undefined);
    assert.equal(cache.stats().dirtyBytes, pageBytes);
    await cache.commit(Buffer.from('root'));
    const cold = new PageCache(file, 4 * pageBytes);
    assert.equal(cold.peek(firstDataPage), undefined, 'not read by a peek');
    assert.equal(cold.stats().misses, 0);
    assert.deepEqual((await cold.get(firstDataPage)).body, body(2));
    assert.deepEqual(cold.peek(firstDataPage)?.body, body(2));
    await assert.rejects(cold.get(firstDataPage + 1), /damaged in both copies.*unwritten/);
    file.close();
  });
});

test("bytes its owner keeps beside a page (its decoded form) count against the bound with the page: fewer pages stay", async () => {
  await withFile(async (base) => {
    const file = await PageFile.open(realFiles, base);
    const pages = Array.from({ length: 8 }, (_, i) => firstDataPage + i);
    const writer = new PageCache(file, 8 * pageBytes);
    for (const n of pages) writer.put(n, { kind: 1, body: body(n) });
    await writer.commit(Buffer.from('root'));

    const cache = new PageCache(file, 8 * pageBytes);
    for (const n of pages) await cache.get(n);
    assert.equal(cache.stats().cleanBytes, 8 * pageBytes, 'eight images fill the bound');
    for (const n of pages) cache.hold(n, await cache.get(n), pageBytes);
    const held = pages.filter((n) => cache.peek(n) !== undefined);
    assert.deepEqual(held, pages.slice(4), 'each page counts twice its image now: the four used last stay');
    assert.equal(cache.stats().cleanBytes, 8 * pageBytes);

    // A dirty page's held bytes count once its commit makes it clean.
    const dirty = { kind: 1, body: body(99) };
    cache.put(firstDataPage + 20, dirty);
    cache.hold(firstDataPage + 20, dirty, 3 * pageBytes);
    await cache.commit(Buffer.from('root two'));
    assert.equal(cache.stats().cleanBytes, 8 * pageBytes);
    assert.deepEqual(pages.filter((n) => cache.peek(n) !== undefined), pages.slice(6), 'the committed page takes four pages of the bound');
    file.close();
  });
});

test('a cache smaller than a page is refused', async () => {
  await withFile(async (base) => {
    const file = await PageFile.open(realFiles, base);
    assert.throws(() => new PageCache(file, 100), /at least one page/);
    file.close();
  });
});

test('a commit moves its written pages to the clean ones in slices: the loop turns between them, and a put or discard meanwhile wins', async () => {
  await withFile(async (base) => {
    const file = await PageFile.open(realFiles, base);
    const cache = new PageCache(file, 1024 * pageBytes, 0);
    const pages = Array.from({ length: 300 }, (_, i) => firstDataPage + i);
    for (const n of pages) cache.put(n, { kind: 1, body: body(n) });
    const fileCommit = file.commit.bind(file);
    let rootDurable = false;
    file.commit = async (rootBody) => {
      const root = await fileCommit(rootBody);
      rootDurable = true;
      return root;
    };
    let done = false;
    let turns = 0;
    const [putAgain, discarded] = [pages[299]!, pages[298]!];
    const ticking = (async () => {
      while (!done) {
        await new Promise((resolve) => setImmediate(resolve));
        if (!rootDurable || done) continue;
        // Between two slices of the move: some pages are clean already, the rest still dirty; all found.
        if (turns++ === 0) {
          for (const n of pages) assert.deepEqual(cache.peek(n)?.body, body(n), `page ${n} during the move`);
          cache.put(putAgain, { kind: 1, body: body(putAgain, 1) });
          cache.discard(discarded);
        }
      }
    })();
    await cache.commit(Buffer.from('one'));
    done = true;
    await ticking;
    assert.ok(turns >= 2, `the loop turned ${turns} times while 300 written pages became clean`);
    assert.equal(cache.stats().dirtyBytes, pageBytes, 'the page put during the move stays dirty');
    assert.deepEqual((await cache.get(putAgain)).body, body(putAgain, 1));
    assert.equal(cache.peek(discarded), undefined, 'the page discarded during the move does not come back');
    for (const n of pages.slice(0, 298)) assert.deepEqual(cache.peek(n)?.body, body(n), `page ${n} clean`);
    assert.equal(cache.stats().cleanBytes, 298 * pageBytes);
    await cache.commit(Buffer.from('two'));
    file.close();
    const again = await PageFile.open(realFiles, base);
    assert.deepEqual((await again.read(putAgain)).body, body(putAgain, 1));
    assert.deepEqual((await again.read(pages[0]!)).body, body(pages[0]!));
    again.close();
  });
});
