// The paged metadata's page file (src/store/page-file.ts): pages checked byte for byte, the newest valid root
// chosen, a page or root damaged in one copy read from the other and repaired, damage in both refused; and under
// the power-loss model, a crash at any file-system call leaves the last committed root or the one in flight, with
// every page it names whole; opened read-only (fsck), nothing written, and both copies of a page checked.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { chooseRoot, decodePage, encodePage, firstDataPage, PageFile, pageBytes, pageHeaderBytes, runPagesMax } from '../../src/store/page-file.ts';
import { closeDescriptorsUnder, PowerLossFiles } from '../../src/testing/power-loss.ts';
import { TestFiles } from '../../src/testing/test-files.ts';
import { batchPages } from '../../src/store/page-writer.ts';
import { helperThreadNice, processThreads } from '../../src/core/thread-priority.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const scratch = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-pages-'));
const isCorrupt = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ECORRUPT';
/** Long bodies and short ones, by index: a reused image would show the last body's tail. */
const bodyOf = (index: number): Buffer => Buffer.alloc(index % 2 === 0 ? 4000 - index * 10 : 5 + index, index + 1);

/** Pages `first` to `first + count - 1` in both copies are, byte for byte, the images of generation 1 with these bodies. */
function assertImages(base: string, first: number, count: number, kind: number, bodyOf: (index: number) => Buffer): void {
  for (const copy of [0, 1]) {
    const bytes = fs.readFileSync(`${base}.${copy}`);
    for (let index = 0; index < count; index++) {
      const image = bytes.subarray((first + index) * pageBytes, (first + index + 1) * pageBytes);
      assert.deepEqual(image, encodePage({ pageNumber: first + index, kind, generation: 1, body: bodyOf(index) }), `copy ${copy}, page ${index}: byte for byte`);
    }
  }
}

test('a page image: decoded as written; any flipped byte, another number or all zeros is refused', () => {
  const body = Buffer.from('the body of page seven');
  const image = encodePage({ pageNumber: 7, kind: 3, generation: 42, body });
  assert.equal(image.length, pageBytes);
  assert.deepEqual(decodePage(image, 7), { pageNumber: 7, kind: 3, generation: 42, body });
  assert.equal(decodePage(image, 8), 'holds page 7');
  assert.equal(decodePage(Buffer.alloc(pageBytes), 7), 'unwritten');
  for (let offset = 0; offset < pageBytes; offset += offset < pageHeaderBytes + body.length ? 1 : 97) {
    const flipped = Buffer.from(image);
    flipped.writeUInt8(flipped.readUInt8(offset) ^ 0x10, offset);
    assert.equal(typeof decodePage(flipped, 7), 'string', `a flip at byte ${offset} is seen`);
  }
  assert.throws(() => encodePage({ pageNumber: 2, kind: 0, generation: 1, body: Buffer.alloc(pageBytes) }), /at most/);
});

test('the root: the valid slot of the highest generation, whichever copy holds it', () => {
  const root = (generation: number, text: string): Buffer => encodePage({ pageNumber: generation % 2, kind: 0xff, generation, body: Buffer.from(text) });
  const torn = Buffer.from(root(4, 'four'));
  torn.fill(0, 0, 512); // its first sector never reached the disk
  assert.deepEqual(chooseRoot([{ slot: 1, bytes: root(3, 'three') }, { slot: 0, bytes: torn }]), { generation: 3, body: Buffer.from('three') });
  assert.deepEqual(chooseRoot([{ slot: 1, bytes: root(3, 'three') }, { slot: 0, bytes: torn }, { slot: 0, bytes: root(4, 'four') }]), { generation: 4, body: Buffer.from('four') });
  assert.equal(chooseRoot([{ slot: 1, bytes: root(4, 'in the wrong slot') }]), null);
  assert.equal(chooseRoot([{ slot: 0, bytes: Buffer.alloc(pageBytes) }]), null);
});

test('pages and roots survive a reopen; damage in one copy is read from the other and repaired; in both, refused', async () => {
  const directory = scratch();
  const base = path.join(directory, 'meta');
  try {
    let file = await PageFile.open(realFiles, base);
    assert.equal(file.root, null);
    await assert.rejects(file.write(1, 0, Buffer.alloc(1)), /root slot/);
    await file.write(firstDataPage, 1, Buffer.from('page two'));
    await file.write(firstDataPage + 1, 1, Buffer.from('page three'));
    assert.deepEqual(await file.commit(Buffer.from('root one')), { generation: 1, body: Buffer.from('root one') });
    await file.write(firstDataPage + 2, 2, Buffer.from('page four'));
    await file.commit(Buffer.from('root two'));
    file.close();

    // Page 2 damaged in copy 0, the newest root slot damaged in copy 1.
    const damage = (copy: number, offset: number): void => {
      const fd = fs.openSync(`${base}.${copy}`, 'r+');
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, offset);
      byte.writeUInt8(byte.readUInt8(0) ^ 0xff, 0);
      fs.writeSync(fd, byte, 0, 1, offset);
      fs.closeSync(fd);
    };
    damage(0, firstDataPage * pageBytes + 100);
    damage(1, 0 * pageBytes + 40);
    file = await PageFile.open(realFiles, base);
    assert.deepEqual(file.root, { generation: 2, body: Buffer.from('root two') }, 'the newest root, from the copy that holds it whole');
    assert.equal(file.repairs, 1, 'the root slot rewritten in the damaged copy');
    assert.equal((await file.read(firstDataPage)).body.toString(), 'page two');
    assert.equal(file.repairs, 2);
    assert.deepEqual((await file.read(firstDataPage + 2)), { pageNumber: 4, kind: 2, generation: 2, body: Buffer.from('page four') });
    file.close();
    for (const copy of [0, 1]) {
      const bytes = fs.readFileSync(`${base}.${copy}`);
      assert.equal(typeof decodePage(bytes.subarray(firstDataPage * pageBytes, (firstDataPage + 1) * pageBytes), firstDataPage), 'object', `copy ${copy} whole again`);
      assert.equal(chooseRoot([{ slot: 0, bytes: bytes.subarray(0, pageBytes) }])?.generation, 2, `copy ${copy}'s root whole again`);
    }

    damage(0, (firstDataPage + 1) * pageBytes + 50);
    damage(1, (firstDataPage + 1) * pageBytes + 60);
    file = await PageFile.open(realFiles, base);
    await assert.rejects(file.read(firstDataPage + 1), (error) => isCorrupt(error) && /page 3 \(byte 12288\) is damaged in both copies/.test((error as Error).message));
    file.close();

    for (const copy of [0, 1]) damage(copy, 8 * copy + 10); // slot 0 (the newest root) in both copies ...
    for (const copy of [0, 1]) damage(copy, pageBytes + 10); // ... and slot 1: no root left
    await assert.rejects(PageFile.open(realFiles, base), (error) => isCorrupt(error) && /neither root slot/.test((error as Error).message));
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

/** What commit `generation` writes: `perCommit` new pages, each named by the root with its expected text. */
const pageText = (generation: number, index: number): string => `generation ${generation} page ${index} `.repeat(1 + ((generation * 7 + index) % 40));

test('read-only (fsck): a page or the root damaged in one copy is read and reported, nothing is written; checkCopies with repair rewrites the damaged copy', async () => {
  const directory = scratch();
  const base = path.join(directory, 'meta');
  try {
    const file = await PageFile.open(realFiles, base);
    for (let page = firstDataPage; page < firstDataPage + 3; page++) await file.write(page, 1, Buffer.from(`page ${page}`));
    await file.commit(Buffer.from('root one'));
    file.close();
    const flip = (copy: number, offset: number): void => {
      const bytes = fs.readFileSync(`${base}.${copy}`);
      bytes[offset]! ^= 0x21;
      fs.writeFileSync(`${base}.${copy}`, bytes);
    };
    flip(0, (firstDataPage + 1) * pageBytes + pageHeaderBytes + 2);
    flip(1, 1 * pageBytes + pageHeaderBytes + 2); // the root (generation 1, slot 1) in copy 1
    flip(0, (firstDataPage + 2) * pageBytes + 40);
    flip(1, (firstDataPage + 2) * pageBytes + 40);
    const before = [0, 1].map((copy) => fs.readFileSync(`${base}.${copy}`));
    const readOnly = await PageFile.open(realFiles, base, { readOnly: true });
    assert.deepEqual(readOnly.root, { generation: 1, body: Buffer.from('root one') });
    assert.deepEqual(readOnly.rootMissingFrom, [1]);
    assert.equal((await readOnly.read(firstDataPage + 1)).body.toString(), `page ${firstDataPage + 1}`);
    assert.deepEqual(await readOnly.checkCopies(firstDataPage, true), { state: 'whole' });
    const one = await readOnly.checkCopies(firstDataPage + 1, true);
    assert.ok(one.state === 'one-damaged' && one.bad === 0 && one.reason === 'checksum mismatch', JSON.stringify(one));
    assert.equal((await readOnly.checkCopies(firstDataPage + 2, true)).state, 'lost');
    await assert.rejects(readOnly.write(firstDataPage, 1, Buffer.alloc(1)), /read-only/);
    await assert.rejects(readOnly.commit(Buffer.from('root two')), /read-only/);
    readOnly.close();
    assert.deepEqual([0, 1].map((copy) => fs.readFileSync(`${base}.${copy}`)), before, 'a read-only open, read and check wrote nothing');
    const writable = await PageFile.open(realFiles, base);
    assert.equal((await writable.checkCopies(firstDataPage + 1, true)).state, 'one-damaged');
    await writable.sync();
    assert.deepEqual(await writable.checkCopies(firstDataPage + 1, false), { state: 'whole' }, 'rewritten from the other copy');
    assert.deepEqual(fs.readFileSync(`${base}.1`).subarray(pageBytes, 2 * pageBytes), fs.readFileSync(`${base}.0`).subarray(pageBytes, 2 * pageBytes), 'the root written into the copy that lacked it');
    writable.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

for (const through of ['writes of pages alone', 'the page writer thread'] as const) {
test(`power loss at any call during commits leaves the last committed root or the one in flight, every page it names whole (${through})`, async () => {
  const seed = testSeed(`page file power loss, ${through}`);
  const threaded = through === 'the page writer thread';
  const random = makeRandom(seed);
  // Through the thread a run costs a thread's start (about 0.2 s here): half as many.
  const runs = Number(process.env.PAGE_FILE_POWER_LOSS_RUNS ?? (threaded ? 20 : 40));
  const outcomes = { committed: 0, inFlight: 0 };
  for (let run = 0; run < runs; run++) {
    const directory = scratch();
    const base = path.join(directory, 'meta');
    try {
      // A file with a few commits made before the machine came up, so that a crash has an old root to keep.
      const before = await PageFile.open(realFiles, base);
      let nextPage = firstDataPage;
      // Through the thread: six pages, every other page number (runs of one), in one call.
      const commitPages = async (file: PageFile): Promise<void> => {
        const generation = file.nextGeneration;
        const named: number[] = [];
        if (threaded) {
          for (let index = 0; index < 6; index++) named.push(nextPage + 2 * index);
          nextPage += 12;
          await file.writePages(Float64Array.from(named), named.map((_, index) => ({ kind: 1, body: Buffer.from(pageText(generation, index)) })));
        } else {
          for (let index = 0; index < 3; index++) {
            await file.write(nextPage, 1, Buffer.from(pageText(generation, index)));
            named.push(nextPage++);
          }
        }
        await file.commit(Buffer.from(JSON.stringify(named)));
      };
      for (let i = 0; i < 2; i++) await commitPages(before);
      before.close();

      const files = new PowerLossFiles(directory, { crashAtChange: 1 + randomInt(random, 40) });
      const crashed = files.inner.untilFrozen().then(() => 'crashed' as const);
      let acknowledged = 2;
      const work = (async () => {
        const file = await PageFile.open(files, base, { writerMinPages: threaded ? 2 : null });
        if (threaded) {
          // The thread started (by pages no root will name) and up before the commits.
          await file.writePages(new Float64Array([1_000, 1_002]), [{ kind: 1, body: Buffer.from("x") }, { kind: 1, body: Buffer.from("y") }]);
          await writerUp(file);
        }
        for (;;) {
          await commitPages(file);
          acknowledged = file.root!.generation;
        }
      })();
      // A frozen synchronous call throws (the thread's writes): the crash is what the test waits for.
      await Promise.race([crashed, work.catch(() => crashed)]);
      await files.cut(random);
      closeDescriptorsUnder(directory);

      const after = await PageFile.open(realFiles, base);
      const root = after.root!;
      assert.ok(root.generation === acknowledged || root.generation === acknowledged + 1, `run ${run}: root ${root.generation} after ${acknowledged} acknowledged (SEED=${seed})`);
      if (root.generation === acknowledged) outcomes.committed += 1;
      else outcomes.inFlight += 1;
      const named = JSON.parse(root.body.toString()) as number[];
      for (const [index, pageNumber] of named.entries()) {
        const page = await after.read(pageNumber);
        assert.equal(page.body.toString(), pageText(root.generation, index), `run ${run}: page ${pageNumber} of root ${root.generation} (SEED=${seed})`);
        assert.equal(page.generation, root.generation);
      }
      after.close();
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  }
  console.log(`# ${runs} crashes: the last acknowledged root ${outcomes.committed} times, the one in flight ${outcomes.inFlight} times`);
  assert.ok(outcomes.committed > 0, 'some crash kept the last acknowledged root');
});
}

test('page images are reused only once both copies have settled: a write failed in one copy while the other is slow, then other writes, leaves the slow copy whole', async () => {
  const directory = scratch();
  try {
    const base = path.join(directory, 'meta');
    const paths = new Map<number, string>();
    const slow: Array<Promise<void>> = [];
    let failCopy0 = false;
    // Copy .0 fails at once (EIO); copy .1 writes the buffer it was given 30 ms later: a buffer reused before then
    // (by the writes that follow the failed one) would put another page's image there.
    const files: FileLayer = {
      ...realFiles,
      open: async (file, mode) => {
        const fd = await realFiles.open(file, mode);
        paths.set(fd, file);
        return fd;
      },
      write: (fd, data, position) => {
        if (!failCopy0) return realFiles.write(fd, data, position);
        if (paths.get(fd)!.endsWith('.0')) return Promise.reject(Object.assign(new Error('EIO: injected'), { code: 'EIO' }));
        const late = new Promise<void>((resolve) => setTimeout(resolve, 30)).then(() => realFiles.write(fd, data, position));
        slow.push(late);
        return late;
      },
    };
    const file = await PageFile.open(files, base);
    failCopy0 = true;
    await assert.rejects(file.write(firstDataPage, 1, Buffer.from('the page that failed in copy 0')), /EIO/);
    failCopy0 = false;
    await Promise.all(Array.from({ length: 80 }, (_, index) => file.write(firstDataPage + 1 + index, 1, Buffer.from(`page ${index}`))));
    await Promise.all(slow);
    file.close();
    const copy1 = fs.readFileSync(`${base}.1`);
    const page = decodePage(copy1.subarray(firstDataPage * pageBytes, (firstDataPage + 1) * pageBytes), firstDataPage);
    assert.ok(typeof page !== 'string', `copy 1 of the page: ${String(page)}`);
    assert.equal(page.body.toString(), 'the page that failed in copy 0');
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('many pages written and read at once through reused images: each page whole, its own body, zeros after it', async () => {
  const directory = scratch();
  try {
    const base = path.join(directory, 'meta');
    const file = await PageFile.open(realFiles, base);
    const count = 200;
    // Long bodies and short ones alternate, so that a reused image would show the last body's tail.
    await Promise.all(Array.from({ length: count }, (_, index) => file.write(firstDataPage + index, 1, bodyOf(index))));
    await file.commit(Buffer.from('root'));
    const pages = await Promise.all(Array.from({ length: count }, (_, index) => file.read(firstDataPage + index)));
    for (const [index, page] of pages.entries()) assert.deepEqual(page.body, bodyOf(index), `page ${index}`);
    file.close();
    assertImages(base, firstDataPage, count, 1, bodyOf);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

/** A layer that counts this thread's writes (the page writer thread writes through the real files, its own). */
function countingLayer(writes: Array<{ position: number; length: number }>): FileLayer {
  return {
    ...realFiles,
    write: (fd, data, position) => {
      writes.push({ position, length: data.length });
      return realFiles.write(fd, data, position);
    },
  };
}

test('a run of pages is written as one write per copy, each page byte for byte as a page written alone; bad runs are refused', async () => {
  const directory = scratch();
  try {
    const base = path.join(directory, 'meta');
    const writes: Array<{ position: number; length: number }> = [];
    const file = await PageFile.open(countingLayer(writes), base);
    // Two full runs at once (their buffers in use together), then a short one that reuses a longer run's buffer:
    // a page's tail must still be zeros, not the last body's.
    const first = firstDataPage + 3;
    const run = (from: number, count: number): Array<{ kind: number; body: Buffer }> => Array.from({ length: count }, (_, i) => ({ kind: 2, body: bodyOf(from + i) }));
    writes.length = 0;
    await Promise.all([file.writeRun(first, run(0, runPagesMax)), file.writeRun(first + runPagesMax, run(runPagesMax, runPagesMax))]);
    assert.deepEqual(writes.map((write) => write.length), [runPagesMax * pageBytes, runPagesMax * pageBytes, runPagesMax * pageBytes, runPagesMax * pageBytes], 'one write per copy per run');
    await file.writeRun(first + 2 * runPagesMax, run(2 * runPagesMax, 5));
    await assert.rejects(file.writeRun(first, run(0, runPagesMax + 1)), /at most/);
    await assert.rejects(file.writeRun(1, run(0, 2)), /root slot/);
    await assert.rejects(file.writeRun(first, [{ kind: 2, body: Buffer.alloc(1) }, { kind: 0xff, body: Buffer.alloc(1) }]), /root's/);
    await file.commit(Buffer.from('root'));
    const count = 2 * runPagesMax + 5;
    for (let index = 0; index < count; index++) assert.deepEqual((await file.read(first + index)).body, bodyOf(index), `page ${index}`);
    file.close();
    assertImages(base, first, count, 2, bodyOf);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

/** Waits until `file`'s page writer thread is up (started by a first `writePages` of enough pages). */
async function writerUp(file: PageFile): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (file.writerThread !== 'up') {
    assert.notEqual(file.writerThread, 'lost', 'the page writer thread was lost');
    assert.ok(Date.now() < deadline, `the page writer thread is ${file.writerThread} after 20 s`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test('writePages: pages scattered and in runs, over several batches, land byte for byte as pages written alone, on the thread from the threshold on and through libuv below it; bad input is refused', async () => {
  const directory = scratch();
  try {
    const base = path.join(directory, 'meta');
    const writes: Array<{ position: number; length: number }> = [];
    const file = await PageFile.open(countingLayer(writes), base, { writerMinPages: 8 });
    assert.equal(file.writerThread, 'none');
    // Below the threshold: libuv's pool (the counting layer sees a write per copy), no thread started.
    await file.writePages(new Float64Array([firstDataPage, firstDataPage + 1, firstDataPage + 5]), [0, 1, 5].map((index) => ({ kind: 2, body: bodyOf(index) })));
    assert.deepEqual(writes.map((write) => write.length), [2 * pageBytes, 2 * pageBytes, pageBytes, pageBytes], 'a run of two and a page alone, a write per copy each');
    assert.equal(file.writerThread, 'none');
    // At the threshold: the thread starts, this call still goes through libuv (it is not up yet).
    await file.writePages(Float64Array.from({ length: 8 }, (_, i) => firstDataPage + 2 + i * 100), Array.from({ length: 8 }, () => ({ kind: 2, body: bodyOf(7) })));
    assert.notEqual(file.writerThread, 'none');
    await writerUp(file);
    // The thread runs below the event loop's priority (its nice value, Linux: per thread).
    const threads = processThreads();
    assert.equal(threads.find((thread) => thread.name === 'chunkd-pages')?.nice, helperThreadNice(), JSON.stringify(threads));
    assert.ok(threads.find((thread) => thread.id === process.pid)!.nice < helperThreadNice(), 'the main thread above it');
    // Some 2.5 batches of pages: every third page alone, then runs of 40 that cross the batches' edges.
    const numbers: number[] = [];
    for (let page = 1_000; numbers.length < batchPages; page += 3) numbers.push(page);
    for (let page = 5_000; numbers.length < 2.5 * batchPages; page += numbers.length % 40 === 39 ? 7 : 1) numbers.push(page);
    const indexOf = (pageNumber: number): number => pageNumber % 397;
    writes.length = 0;
    await file.writePages(Float64Array.from(numbers), numbers.map((pageNumber) => ({ kind: 3, body: bodyOf(indexOf(pageNumber)) })));
    assert.equal(writes.length, 0, 'every page written on the thread');
    // Refused, and nothing written: out of order, twice, a root slot, the root's kind.
    await assert.rejects(file.writePages(new Float64Array([9_000, 8_999]), [{ kind: 2, body: bodyOf(1) }, { kind: 2, body: bodyOf(2) }]), /out of order/);
    await assert.rejects(file.writePages(new Float64Array([9_000, 9_000]), [{ kind: 2, body: bodyOf(1) }, { kind: 2, body: bodyOf(2) }]), /out of order/);
    await assert.rejects(file.writePages(Float64Array.from({ length: 8 }, (_, i) => 1 + i), Array.from({ length: 8 }, () => ({ kind: 2, body: bodyOf(1) }))), /root slot/);
    await assert.rejects(file.writePages(Float64Array.from({ length: 8 }, (_, i) => 9_000 + i), Array.from({ length: 8 }, (_, i) => ({ kind: i === 5 ? 0xff : 2, body: bodyOf(1) }))), /root's/);
    // The root's kind in a later batch than the first: refused before any batch is written.
    await assert.rejects(file.writePages(Float64Array.from({ length: 300 }, (_, i) => 9_000 + 2 * i), Array.from({ length: 300 }, (_, i) => ({ kind: i === 299 ? 0xff : 2, body: bodyOf(1) }))), /root's/);
    await file.commit(Buffer.from('root'));
    for (const pageNumber of numbers) assert.deepEqual((await file.read(pageNumber)).body, bodyOf(indexOf(pageNumber)), `page ${pageNumber}`);
    file.close();
    for (const copy of [0, 1]) {
      const bytes = fs.readFileSync(`${base}.${copy}`);
      for (const pageNumber of numbers) {
        const image = bytes.subarray(pageNumber * pageBytes, (pageNumber + 1) * pageBytes);
        assert.deepEqual(image, encodePage({ pageNumber, kind: 3, generation: 1, body: bodyOf(indexOf(pageNumber)) }), `copy ${copy}, page ${pageNumber}: byte for byte`);
      }
      // Refused calls wrote nothing.
      assert.ok(bytes.subarray(8_999 * pageBytes, 9_600 * pageBytes).every((byte) => byte === 0), `copy ${copy}: nothing of the refused calls`);
    }
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test("writePages on the thread: a failed write (an injected EIO in one copy) rejects with its code and the thread goes on; a thread that dies while it holds pages has them written again through libuv's pool, as every later write, and none is started again", async () => {
  const directory = scratch();
  try {
    const base = path.join(directory, 'meta');
    // The thread rebuilds this layer from its spec: the rule counts and fails its writes too.
    const files = new TestFiles([{ op: 'write', path: 'meta.1', nth: 3, code: 'EIO' }]);
    const file = await PageFile.open(files, base, { writerMinPages: 4 });
    const pages = (first: number, count: number, step: number): [Float64Array, Array<{ kind: number; body: Buffer }>] => [
      Float64Array.from({ length: count }, (_, i) => first + i * step),
      Array.from({ length: count }, (_, i) => ({ kind: 2, body: bodyOf(i % 397) })),
    ];
    await file.writePages(...pages(firstDataPage, 4, 1)); // starts the thread; copy 1's first write (the run)
    await writerUp(file);
    await file.writePages(...pages(100, 1, 1)); // below the threshold: libuv, copy 1's second write
    await assert.rejects(file.writePages(...pages(200, 6, 2)), (error: NodeJS.ErrnoException) => error.code === 'EIO', 'the third write of copy 1 fails');
    assert.equal(file.writerThread, 'up', 'the thread goes on after a failed write');
    await file.writePages(...pages(300, 6, 2));
    await file.commit(Buffer.from('root'));
    for (let i = 0; i < 6; i++) assert.deepEqual((await file.read(300 + i * 2)).body, bodyOf(i));

    // The thread is ended (as a crash of it would) just before 20 batches are handed to it: none is answered,
    // every page lands all the same (written again through libuv's pool), and later writes go there.
    const many = pages(1_000, 20 * batchPages, 3);
    const stopped = file.stopWriterThreadForTest();
    assert.equal(file.writerThread, 'up', 'the batches go to the thread');
    await file.writePages(...many);
    await stopped;
    await file.commit(Buffer.from('root 1'));
    for (let i = 0; i < many[0].length; i += 97) assert.deepEqual((await file.read(many[0][i]!)).body, bodyOf(i % 397), `page ${many[0][i]} after the thread ended`);
    assert.equal(file.writerThread, 'lost');
    await file.writePages(...pages(400, 6, 2));
    await file.commit(Buffer.from('root 2'));
    for (let i = 0; i < 6; i++) assert.deepEqual((await file.read(400 + i * 2)).body, bodyOf(i), 'written through libuv once the thread is lost');
    assert.equal(file.writerThread, 'lost', 'not started again');
    file.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test("a page read keeps only its own bytes alive: its body is a buffer of its own, not a slice of Node's shared pool", async () => {
  const directory = scratch();
  try {
    const file = await PageFile.open(realFiles, path.join(directory, 'meta'));
    // Bodies of a leaf's sizes and smaller: `Buffer.from` would cut each from a 64 KiB pool shared with whatever
    // else is allocated around it, and a cached page (or a map leaf, or counts, viewing its body) would keep the
    // whole pool alive where the cache counts one page.
    const bodyOf = (index: number): Buffer => Buffer.alloc(4 + 16 * (1 + ((index * 37) % 253)), index + 1);
    const count = 40;
    for (let index = 0; index < count; index++) await file.write(firstDataPage + index, 1, bodyOf(index));
    await file.commit(Buffer.from('root'));
    for (let index = 0; index < count; index++) {
      const { body } = await file.read(firstDataPage + index);
      assert.deepEqual(body, bodyOf(index), `page ${index}`);
      assert.equal(body.buffer.byteLength, body.length, `page ${index}: its body's buffer is the body (${body.buffer.byteLength} bytes kept for ${body.length})`);
    }
    file.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
