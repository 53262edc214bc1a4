// The page file (src/store/page-file.ts, step 1 of the paged metadata): pages and the root round-trip, freed pages
// are reused only after the root that stops naming them is durable, the cache stays within its bound, a damaged
// page or root slot is read from the other copy and repaired (and damage in both copies is an error naming the
// page, never wrong bytes), and under the power-loss model a crash at any file-system call leaves the last
// committed generation or the one being committed, whole, with every page it names as written.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { PageFile, pageBodyBytes, pageBytes } from '../../src/store/page-file.ts';
import { PowerLossFiles } from '../../src/testing/power-loss.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-pagefile-'));
after(() => fs.rmSync(scratch, { recursive: true, force: true }));
let dirs = 0;

function layout(files: FileLayer = realFiles, cacheBytes = 64 * pageBytes, directory = path.join(scratch, `d${dirs++}`)) {
  fs.mkdirSync(directory, { recursive: true });
  return { files, directory, paths: [path.join(directory, 'meta.0'), path.join(directory, 'meta.1')] as const, cacheBytes };
}

/** A page body derived from a number, so a page's content names what wrote it. */
function content(seed: number): Buffer {
  const body = Buffer.alloc(pageBodyBytes);
  for (let i = 0; i < body.length; i += 4) body.writeUInt32LE((Math.imul(seed + 1, 2654435761) + i) >>> 0, i);
  return body;
}

/** The payload the tests keep in the root: which pages are live and what each holds. */
function payloadOf(live: Map<number, number>): Buffer {
  return Buffer.from(JSON.stringify([...live]));
}

function liveOf(file: PageFile): Map<number, number> {
  return file.payload.length === 0 ? new Map() : new Map(JSON.parse(file.payload.toString()) as Array<[number, number]>);
}

async function checkPages(file: PageFile, live: Map<number, number>, label: string): Promise<void> {
  for (const [pageNumber, seed] of live) {
    const page = await file.read(pageNumber);
    assert.equal(page.kind, 16, `${label}: page ${pageNumber} kind`);
    assert.ok(page.body.equals(content(seed)), `${label}: page ${pageNumber} holds what was written (${seed})`);
  }
}

test('pages and the root round-trip; a freed page is reused only after the next commit', async () => {
  const options = layout();
  const file = await PageFile.create(options);
  assert.equal(file.generation, 0);
  const live = new Map<number, number>();
  for (let i = 0; i < 10; i++) {
    const page = file.allocate(16);
    content(i).copy(page.body);
    live.set(page.pageNumber, i);
  }
  await file.commit(payloadOf(live));
  assert.equal(file.generation, 1);
  // Freed in generation 2: generation 1's root still names it, so it is not handed out again before commit 2.
  const [freedPage] = live.keys();
  file.free(freedPage!);
  live.delete(freedPage!);
  const next = file.allocate(16);
  assert.notEqual(next.pageNumber, freedPage);
  content(100).copy(next.body);
  live.set(next.pageNumber, 100);
  await file.commit(payloadOf(live));
  const reused = file.allocate(16);
  assert.equal(reused.pageNumber, freedPage, 'reusable once the root that stopped naming it is durable');
  file.free(reused.pageNumber); // never durable: reusable at once
  assert.equal(file.allocate(16).pageNumber, freedPage);
  file.close();
  // Reopened: the root, the pages it names, and the free set (the page freed at commit 2 is free again).
  const reopened = await PageFile.open(options);
  assert.equal(reopened.generation, 2);
  assert.deepEqual(liveOf(reopened), live);
  await checkPages(reopened, live, 'reopened');
  assert.equal(reopened.allocate(16).pageNumber, freedPage);
  assert.equal(reopened.stats().repairs, 0);
  reopened.close();
});

test('the cache holds at most its bound of clean pages, pinning only the pages of the generation being built', async () => {
  const options = layout(realFiles, 8 * pageBytes);
  const file = await PageFile.create(options);
  const live = new Map<number, number>();
  for (let i = 0; i < 200; i++) {
    const page = file.allocate(16);
    content(i).copy(page.body);
    live.set(page.pageNumber, i);
  }
  assert.equal(file.stats().dirtyPages, 200);
  await file.commit(payloadOf(live));
  assert.ok(file.stats().cachedPages <= 8 && file.stats().cacheBytes <= 8 * pageBytes, JSON.stringify(file.stats()));
  await checkPages(file, live, 'through a small cache');
  assert.ok(file.stats().cachedPages <= 8);
  file.close();
});

test('a damaged page or root slot is read from the other copy and repaired; damage in both copies is refused', async () => {
  const options = layout();
  const file = await PageFile.create(options);
  const live = new Map<number, number>();
  for (let i = 0; i < 4; i++) {
    const page = file.allocate(16);
    content(i).copy(page.body);
    live.set(page.pageNumber, i);
  }
  await file.commit(payloadOf(live));
  file.close();
  const [first, second] = live.keys();
  const flip = (copy: 0 | 1, offset: number): void => {
    const fd = fs.openSync(options.paths[copy], 'r+');
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, offset);
    byte.writeUInt8(byte[0]! ^ 0x10, 0);
    fs.writeSync(fd, byte, 0, 1, offset);
    fs.closeSync(fd);
  };
  // Page `first` damaged in copy 0 (its body), page `second` in copy 1 (its header), the root slot of generation 1 in copy 0.
  flip(0, first! * pageBytes + 1000);
  flip(1, second! * pageBytes + 9);
  flip(0, 1 * pageBytes + 20);
  const reopened = await PageFile.open(options);
  assert.equal(reopened.generation, 1, 'the root from the copy that holds it whole');
  assert.equal(reopened.stats().repairs, 1, 'the damaged root slot was rewritten');
  await checkPages(reopened, live, 'one copy damaged');
  assert.equal(reopened.stats().repairs, 2, 'page `first` rewritten in copy 0 (copy 1 was read second and is not checked yet)');
  reopened.close();
  const copies = [fs.readFileSync(options.paths[0]), fs.readFileSync(options.paths[1])];
  assert.ok(copies[0]!.subarray(first! * pageBytes, (first! + 1) * pageBytes).equals(copies[1]!.subarray(first! * pageBytes, (first! + 1) * pageBytes)));
  // Both copies of page `second` damaged now: its read is an error naming the page, never wrong bytes.
  flip(0, second! * pageBytes + 2000);
  const damaged = await PageFile.open(options);
  await assert.rejects(damaged.read(second!), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'EIO');
    assert.match(error.message, new RegExp(`metadata page ${second} is damaged in both copies .*meta\\.0: checksum mismatch; .*meta\\.1: `));
    return true;
  });
  damaged.close();
  // Every root slot damaged: the page file is refused, not taken for empty.
  for (const copy of [0, 1] as const) for (const slot of [0, 1]) flip(copy, slot * pageBytes + 40);
  await assert.rejects(PageFile.open(options), /no whole root in either copy of the page file/);
});

test('power loss at any file-system call: the committed generation or the one in flight, whole', { timeout: 120_000 }, async () => {
  const seed = testSeed('page file power loss');
  const random = makeRandom(seed);
  const budgetMs = Number(process.env.PAGE_FILE_POWER_LOSS_SECONDS ?? 6) * 1000;
  const started = Date.now();
  let lives = 0;
  let midCommit = 0;
  let nextSeed = 1;
  do {
    const options = layout();
    await PageFile.create({ ...options, files: realFiles }).then((file) => file.close());
    // What the last acknowledged commit holds, and what the commit in flight (if any) would.
    let durable = new Map<number, number>();
    let inFlight: Map<number, number> | null = null;
    for (let life = 0; life < 4; life++, lives++) {
      const files = new PowerLossFiles(options.directory, { crashAtChange: 1 + randomInt(random, 60) });
      const crashed = files.inner.untilFrozen();
      let file: PageFile | null = null;
      const run = async (): Promise<void> => {
        file = await PageFile.open({ ...options, files, cacheBytes: 4 * pageBytes + randomInt(random, 8) * pageBytes });
        const live = liveOf(file);
        await checkPages(file, live, `seed ${seed} life ${life}`);
        for (let generation = 0; generation < 20 && !files.inner.frozen; generation++) {
          const next = new Map(live);
          for (const pageNumber of [...next.keys()]) {
            if (random() < 0.3) {
              file.free(pageNumber);
              next.delete(pageNumber);
            }
          }
          for (let i = randomInt(random, 6); i > 0; i--) {
            const page = file.allocate(16);
            const pageSeed = nextSeed++;
            content(pageSeed).copy(page.body);
            next.set(page.pageNumber, pageSeed);
          }
          inFlight = next;
          await file.commit(payloadOf(next));
          durable = next;
          inFlight = null;
          live.clear();
          for (const [k, v] of next) live.set(k, v);
        }
      };
      await Promise.race([run().catch((error: unknown) => {
        if (!files.inner.frozen) throw error;
      }), crashed]);
      if (inFlight !== null) midCommit += 1;
      files.inner.freeze();
      await files.cut(random);
      // After the cut, with the real file system: the durable generation, or the one that was in flight.
      const reopened = await PageFile.open({ ...options, files: realFiles });
      const found = liveOf(reopened);
      const matchesDurable = JSON.stringify([...found]) === JSON.stringify([...durable]);
      const matchesInFlight = inFlight !== null && JSON.stringify([...found]) === JSON.stringify([...(inFlight as Map<number, number>)]);
      assert.ok(matchesDurable || matchesInFlight, `seed ${seed} life ${life}: the root names neither the last committed generation nor the one in flight`);
      await checkPages(reopened, found, `seed ${seed} life ${life} after the cut`);
      // The free set never includes a live page: allocating every free page and more hands out none of them.
      const handedOut = new Set<number>();
      for (let i = 0; i < reopened.stats().freePages + 3; i++) handedOut.add(reopened.allocate(16).pageNumber);
      for (const pageNumber of found.keys()) assert.ok(!handedOut.has(pageNumber), `seed ${seed} life ${life}: live page ${pageNumber} was free`);
      reopened.close();
      durable = found;
      inFlight = null;
      void file;
    }
  } while (Date.now() - started < budgetMs && process.env.SEED === undefined);
  console.log(`# page file power loss: ${lives} lives, ${midCommit} cuts during a commit`);
  assert.ok(midCommit > 0, 'some cuts landed inside a commit');
});
