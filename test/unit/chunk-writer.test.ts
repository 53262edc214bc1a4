// The chunk writer (src/store/chunk-writer.ts) with a real thread and a real file: a write done inline, one waited
// for briefly and one waited for asynchronously all land whole where they were asked to; an inline write slower
// than the bound sends the next ones to the thread; a failed pwrite rejects with its code; it takes one write per
// turn, only bytes in its slab, and none once its thread is gone, and says so with null.
// Under a test's file layer both ways write through that layer: an injected failure rejects that write with its
// code, a power cut (the layer frozen) lets nothing more through, and its writes count.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, test } from 'vitest';
import { ChunkWriter } from '../../src/store/chunk-writer.ts';
import { TestFiles } from '../../src/testing/test-files.ts';

let directory: string;
let fd: number;
const slab = new SharedArrayBuffer(1024 * 1024);
/** Waits long enough that a pwrite into the page cache is over within it. */
let patient: ChunkWriter;
/** Never waits: every write is waited for asynchronously. */
let hasty: ChunkWriter;

const writeCounts = (writer: ChunkWriter): { inline: number; thread: number } => ({ inline: writer.counts().inline, thread: writer.counts().thread });

beforeAll(() => {
  directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-writer-'));
  fd = fs.openSync(path.join(directory, 'file'), 'w+');
  patient = new ChunkWriter(slab, { waitMs: 5000, inlineStallMs: null });
  hasty = new ChunkWriter(slab, { waitMs: 0, inlineStallMs: null });
});

afterAll(() => {
  patient.close();
  hasty.close();
  fs.closeSync(fd);
  fs.rmSync(directory, { recursive: true, force: true });
});

const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** `length` random bytes at `offset` of the slab, as a view. */
function inSlab(offset: number, length: number): Buffer {
  const view = Buffer.from(slab, offset, length);
  randomBytes(length).copy(view);
  return view;
}

function readBack(position: number, length: number): Buffer {
  const bytes = Buffer.alloc(length);
  assert.equal(fs.readSync(fd, bytes, 0, length, position), length);
  return bytes;
}

test('a write waited for and one waited for asynchronously land whole at their positions', async () => {
  for (const [writer, position] of [[patient, 3 * 4096], [hasty, 9 * 4096]] as const) {
    for (let round = 0; round < 20; round++) {
      const data = inSlab(8192 + round * 4096, 4096);
      const written = writer.write(fd, data, position + round * 4096);
      assert.notEqual(written, null);
      await written;
      assert.deepEqual(readBack(position + round * 4096, 4096), data);
      await nextTurn();
    }
  }
});

test('inline writes land whole; one slower than the bound sends the next writes to the thread', async () => {
  const inline = new ChunkWriter(slab, { waitMs: 5000 });
  // Any pwrite takes longer than 0 ms: the first write is done inline, the ones after it go to the thread.
  const stalled = new ChunkWriter(slab, { waitMs: 5000, inlineStallMs: 0, inlinePauseMs: 600_000 });
  try {
    for (let round = 0; round < 10; round++) {
      for (const [writer, position] of [[inline, 40 * 4096], [stalled, 60 * 4096]] as const) {
        const data = inSlab(8192 + round * 4096, 4096);
        await writer.write(fd, data, position + round * 4096);
        assert.deepEqual(readBack(position + round * 4096, 4096), data);
      }
      await nextTurn();
    }
    assert.deepEqual(writeCounts(inline), { inline: 10, thread: 0 });
    assert.deepEqual(writeCounts(stalled), { inline: 1, thread: 9 });
  } finally {
    inline.close();
    stalled.close();
  }
});

test('the longest inline pwrite is counted: what the event loop waited on one', async () => {
  // A file layer whose pwrite takes 30 ms of the calling thread, as ext4 holds one up now and then.
  class SlowFiles extends TestFiles {
    override writeSync(fd: number, data: Uint8Array, positionBytes: number): void {
      const until = performance.now() + 30;
      while (performance.now() < until);
      super.writeSync(fd, data, positionBytes);
    }
  }
  const writer = new ChunkWriter(slab, { waitMs: 5000, inlineStallMs: 1000, files: new SlowFiles() });
  try {
    await nextTurn();
    assert.equal(writer.counts().longestInlineSeconds, 0);
    await writer.write(fd, inSlab(0, 4096), 90 * 4096);
    const { inline, longestInlineSeconds } = writer.counts();
    assert.equal(inline, 1);
    assert.ok(longestInlineSeconds >= 0.03 && longestInlineSeconds < 5, String(longestInlineSeconds));
  } finally {
    writer.close();
  }
});

test('a failed inline pwrite rejects with its code', async () => {
  const writer = new ChunkWriter(slab, { waitMs: 5000 });
  const readOnly = fs.openSync(path.join(directory, 'file'), 'r');
  try {
    await nextTurn();
    await assert.rejects(writer.write(readOnly, inSlab(0, 4096), 0)!, { code: 'EBADF' });
    assert.deepEqual(writeCounts(writer), { inline: 1, thread: 0 });
  } finally {
    fs.closeSync(readOnly);
    writer.close();
  }
});

test('a failed pwrite rejects with its code, and the writer goes on', async () => {
  const readOnly = fs.openSync(path.join(directory, 'file'), 'r');
  try {
    await assert.rejects(patient.write(readOnly, inSlab(0, 4096), 0)!, { code: 'EBADF' });
  } finally {
    fs.closeSync(readOnly);
  }
  await nextTurn();
  const data = inSlab(4096, 4096);
  await patient.write(fd, data, 0);
  assert.deepEqual(readBack(0, 4096), data);
});

test('one write per turn, and only bytes in its slab', async () => {
  await nextTurn();
  assert.equal(patient.write(fd, Buffer.alloc(4096), 0), null, 'not in the slab');
  // The patient writer's write is over before write() returns, so awaiting it takes no turn of the event loop.
  await patient.write(fd, inSlab(0, 4096), 0);
  assert.equal(patient.write(fd, inSlab(4096, 4096), 4096), null, 'one per turn');
  await nextTurn();
  const next = patient.write(fd, inSlab(4096, 4096), 4096);
  assert.notEqual(next, null);
  await next;
});

test('a writer whose thread is gone takes no more writes, and says so in the log (a close does not)', async () => {
  const lines: string[] = [];
  const closed = new ChunkWriter(slab, { waitMs: 5000, inlineStallMs: null, log: (line) => lines.push(line) });
  closed.close();
  await closed.stopThreadForTest();
  assert.equal(lines.length, 0, lines.join('\n'));
  const writer = new ChunkWriter(slab, { waitMs: 5000, inlineStallMs: null, log: (line) => lines.push(line) });
  await nextTurn();
  await writer.write(fd, inSlab(0, 4096), 0);
  await writer.stopThreadForTest();
  await nextTurn();
  assert.equal(writer.write(fd, inSlab(0, 4096), 0), null);
  assert.deepEqual(lines, ['chunk writer thread ended (exit code 1); small writes go to the chunk I/O workers from now on']);
});

for (const [way, inlineStallMs] of [['the thread', null], ['an inline write', undefined]] as const) test(`under a test file layer ${way} writes through it: injected EIO and ENOSPC reject that write with their code, a frozen layer (a power cut) lets nothing through, and its writes count as changes`, async () => {
  const file = path.join(directory, 'faulty');
  const faulty = fs.openSync(file, 'w+');
  // The second write to the file fails with EIO, the third with ENOSPC (a rule's count stops where an earlier one fires).
  const files = new TestFiles([
    { op: 'write', path: 'faulty', nth: 2, code: 'EIO' },
    { op: 'write', path: 'faulty', nth: 2, code: 'ENOSPC' },
  ]);
  const writer = new ChunkWriter(slab, { waitMs: 5000, files, inlineStallMs });
  try {
    await nextTurn();
    const first = inSlab(0, 4096);
    await writer.write(faulty, first, 0);
    for (const code of ['EIO', 'ENOSPC']) {
      await nextTurn();
      await assert.rejects(writer.write(faulty, inSlab(4096, 4096), 4096)!, { code });
    }
    assert.deepEqual([files.fired(0), files.fired(1), files.changeCount], [1, 1, 3]);
    files.freeze();
    await nextTurn();
    await assert.rejects(writer.write(faulty, inSlab(8192, 4096), 8192)!, { code: 'EIO' });
    const back = Buffer.alloc(3 * 4096);
    assert.equal(fs.readSync(faulty, back, 0, back.length, 0), 4096, 'only the first write landed');
    assert.deepEqual(back.subarray(0, 4096), first);
  } finally {
    writer.close();
    fs.closeSync(faulty);
  }
});
