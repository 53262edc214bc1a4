// The worker-thread chunk I/O engine with real piscina workers and real files: bytes written from ordinary and
// from shared memory read back verified, a damaged chunk is named, a span across two chunk files works, and a
// worker that dies fails only what it was running (EIO), is replaced, and the engine goes on serving.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { chunkSizeBytes, chunksPerFile, inlineCachedReadBytesMax, inlineWriteBytesMax, openChunkFilesMax } from '../../src/core/limits.ts';
import { emptyHistogram } from '../../src/core/latency-histogram.ts';
import { SharedBufferPool } from '../../src/core/shared-buffers.ts';
import { chunkSums } from '../../src/store/chunk-io.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { ChunkFiles } from '../../src/store/chunk-files.ts';
import { ChunkTaskRunner, type ChunkTask } from '../../src/store/chunk-task.ts';
import koffi from 'koffi';
import { WorkerChunkIo } from '../../src/store/worker-io.ts';
import { pbkdf2, randomBytes } from 'node:crypto';

let directory: string;
let files: ChunkFiles;
let io: WorkerChunkIo;
const buffers = new SharedBufferPool();
const logged: string[] = [];
/** Counts every task handed to a worker. */
const workerWaits = emptyHistogram();

beforeAll(() => {
  directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-workers-'));
  files = new ChunkFiles(path.join(directory, 'chunks'), realFiles);
  io = new WorkerChunkIo(files, { workerCount: 2, buffers, log: (line) => logged.push(line), testHooks: true, waitTimes: workerWaits });
});

afterAll(async () => {
  await io.close();
  files.close();
  fs.rmSync(directory, { recursive: true, force: true });
});

// Reads up to 64 KiB stay on the calling thread (limits.inlineReadBytesMax); larger ones go to a worker when they
// miss the page cache, and above 1 MiB always (limits.inlineCachedReadBytesMax). Writes up to 1 MiB stay on the
// calling thread (limits.inlineWriteBytesMax).
const large = 32 * chunkSizeBytes;
/** A read or write a worker runs even when the page cache holds it. */
const huge = Math.max(inlineCachedReadBytesMax, inlineWriteBytesMax) + chunkSizeBytes;

test('writes return checksums; reads verify them, from plain and from shared memory', async () => {
  const data = randomBytes(huge);
  const tasksBefore = workerWaits.count;
  const sums = await io.writeSummed(10, data);
  assert.equal(workerWaits.count, tasksBefore + 1, 'past 1 MiB: a worker writes it');
  assert.deepEqual(sums, chunkSums(data));
  const plain = Buffer.alloc(data.length);
  assert.equal(await io.readChunks(plain, Float64Array.of(10, plain.length / chunkSizeBytes, 0), sums, true), null);
  assert.deepEqual(plain, data);
  const shared = buffers.acquire(data.length);
  assert.ok(shared.buffer instanceof SharedArrayBuffer);
  assert.equal(await io.readChunks(shared, Float64Array.of(10, shared.length / chunkSizeBytes, 0), sums, true), null);
  assert.deepEqual(Buffer.from(shared), data);
  buffers.release(shared);
  await files.sync();
});

test('a write up to 1 MiB is checksummed and written from this thread, from plain or shared memory', async () => {
  const tasksBefore = workerWaits.count;
  const plain = randomBytes(inlineWriteBytesMax);
  assert.deepEqual(await io.writeSummed(8000, plain), chunkSums(plain));
  const shared = buffers.acquire(large);
  randomBytes(large).copy(shared);
  assert.deepEqual(await io.writeSummed(8000 + inlineWriteBytesMax / chunkSizeBytes, shared), chunkSums(shared));
  assert.equal(workerWaits.count, tasksBefore, 'no task went to a worker');
  const target = Buffer.alloc(inlineWriteBytesMax + large);
  const sums = new Uint32Array([...chunkSums(plain), ...chunkSums(shared)]);
  assert.equal(await io.readChunks(target, Float64Array.of(8000, target.length / chunkSizeBytes, 0), sums, true), null);
  assert.deepEqual(target, Buffer.concat([plain, shared]));
  buffers.release(shared);
});

test('a chunk file only the workers wrote is opened here for small cached reads, which then stay on this thread', async () => {
  const data = randomBytes(huge);
  const physical = 3 * chunksPerFile + 7; // a chunk file of its own, which only a worker has opened
  await io.writeSummed(physical, data);
  const small = Buffer.alloc(chunkSizeBytes);
  assert.equal(files.readCached(physical, 0, small), false, 'not open on this thread yet: it starts opening');
  const deadline = Date.now() + 30_000;
  while (!files.readCached(physical + 1, 0, small)) {
    assert.ok(Date.now() < deadline, 'the file opens');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  assert.deepEqual(small, data.subarray(chunkSizeBytes, 2 * chunkSizeBytes));
});

test('a read up to 1 MiB that the page cache holds is served on this thread, verified; a larger one goes to a worker', async () => {
  const data = randomBytes(huge);
  const sums = await io.writeSummed(6000, data);
  // Only a worker wrote chunk file 0 if this test runs alone: this thread opens it at its first cached read.
  for (const deadline = Date.now() + 30_000; !files.readCached(6000, 0, Buffer.alloc(chunkSizeBytes));) {
    assert.ok(Date.now() < deadline, 'the file opens');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  const tasksBefore = workerWaits.count;
  const target = buffers.acquire(inlineCachedReadBytesMax);
  const plan = Float64Array.of(6000, inlineCachedReadBytesMax / chunkSizeBytes, 0);
  assert.equal(await io.readChunks(target, plan, sums.subarray(0, plan[1]), true), null);
  assert.deepEqual(target, data.subarray(0, inlineCachedReadBytesMax));
  const damaged = sums.slice(0, plan[1]);
  damaged[5] = (damaged[5]! + 1) >>> 0;
  assert.deepEqual(await io.readChunks(target, plan, damaged, true), { chunkIndex: 5, expected: damaged[5], actual: sums[5] });
  buffers.release(target);
  assert.equal(workerWaits.count, tasksBefore, 'no task went to a worker');
  const whole = Buffer.alloc(huge);
  assert.equal(await io.readChunks(whole, Float64Array.of(6000, huge / chunkSizeBytes, 0), sums, true), null);
  assert.deepEqual(whole, data);
  assert.equal(workerWaits.count, tasksBefore + 1, 'past 1 MiB: one task');
});

test('a worker reads page-cache hits at once and waits for the disk without blocking: uncached reads come back as promises', async () => {
  const data = randomBytes(large);
  const chunkDirectory = await chunkFilesHolding('runner', data);
  const disk = diskWhen();
  const runner = new ChunkTaskRunner(chunkDirectory, disk.layer, null, false);
  const sums = chunkSums(data);
  const readTask = (memory: SharedArrayBuffer): ChunkTask => ({
    op: 'read', bytes: { slab: false, memory, byteOffset: 0, lengthBytes: large }, plan: Float64Array.of(0, large / chunkSizeBytes, 0), expected: sums, verify: true,
  });
  const cachedTarget = new SharedArrayBuffer(large);
  const cached = runner.run(readTask(cachedTarget));
  assert.ok(!(cached instanceof Promise), 'bytes just written are in the page cache: read at once');
  assert.equal(cached.ok && cached.mismatch, null);
  assert.deepEqual(Buffer.from(cachedTarget), data);

  dropFromPageCache(path.join(chunkDirectory, '00000000.chunk'));
  disk.cold = true;
  const coldTarget = new SharedArrayBuffer(large);
  const cold = runner.run(readTask(coldTarget));
  assert.ok(cold instanceof Promise, 'bytes not in the page cache: the read goes to libuv and the task answers later');
  const result = await cold;
  assert.equal(result.ok && result.mismatch, null);
  assert.deepEqual(Buffer.from(coldTarget), data);
  runner.close();
});

test('a worker never closes a descriptor under a read still waiting in libuv\'s pool, even past its open-file limit', async () => {
  const wanted = randomBytes(chunkSizeBytes);
  const chunkDirectory = await chunkFilesHolding('descriptors', wanted);
  dropFromPageCache(path.join(chunkDirectory, '00000000.chunk'));
  // Keep libuv's pool busy, so that the read below waits in its queue while the worker opens other files.
  const busy = Array.from({ length: 16 }, () => new Promise((resolve) => pbkdf2('x', 'y', 200_000, 32, 'sha256', resolve)));
  const disk = diskWhen();
  disk.cold = true;
  const runner = new ChunkTaskRunner(chunkDirectory, disk.layer, null, false);
  const target = new SharedArrayBuffer(chunkSizeBytes);
  const read = runner.run({ op: 'read', bytes: { slab: false, memory: target, byteOffset: 0, lengthBytes: chunkSizeBytes }, plan: Float64Array.of(0, 1, 0), expected: chunkSums(wanted), verify: true });
  assert.ok(read instanceof Promise);
  // Writes to openChunkFilesMax other files: the runner closes what it holds to stay under the limit.
  const other = new SharedArrayBuffer(chunkSizeBytes);
  new Uint8Array(other).fill(0xee);
  for (let file = 1; file <= openChunkFilesMax; file++) {
    const result = runner.run({ op: 'write', physicalChunk: file * chunksPerFile, bytes: { slab: false, memory: other, byteOffset: 0, lengthBytes: chunkSizeBytes } });
    assert.ok(!(result instanceof Promise) && result.ok);
  }
  const result = await read;
  assert.ok(result.ok, `the read succeeds: ${result.ok ? '' : result.message}`);
  assert.equal(result.mismatch, null);
  assert.deepEqual(Buffer.from(target), wanted);
  await Promise.all(busy);
  runner.close();
});

test('a damaged chunk is named, with both checksums; verify false skips the check', async () => {
  const data = randomBytes(large);
  const sums = await io.writeSummed(100, data);
  const fd = fs.openSync(files.filePath(0), 'r+');
  fs.writeSync(fd, Buffer.from([data[2 * chunkSizeBytes + 7]! ^ 0x80]), 0, 1, 102 * chunkSizeBytes + 7);
  fs.closeSync(fd);
  const target = Buffer.alloc(data.length);
  const mismatch = await io.readChunks(target, Float64Array.of(100, target.length / chunkSizeBytes, 0), sums, true);
  assert.equal(mismatch?.chunkIndex, 2);
  assert.equal(mismatch?.expected, sums[2]);
  assert.notEqual(mismatch?.actual, sums[2]);
  assert.equal(await io.readChunks(target, Float64Array.of(100, target.length / chunkSizeBytes, 0), sums, false), null);
});

test('one request of several runs with a hole between: one task, only the runs copied back', async () => {
  const a = randomBytes(large);
  const b = randomBytes(large);
  const sumsA = await io.writeSummed(2000, a);
  const sumsB = await io.writeSummed(3000, b);
  // Chunks 0..31 from run A, 32..231 a hole the caller zeroed, 232..263 from run B: over 1 MiB, so a worker reads it.
  const holeChunks = 200;
  const target = Buffer.alloc((2 * 32 + holeChunks) * chunkSizeBytes);
  assert.ok(target.length > inlineCachedReadBytesMax);
  const plan = Float64Array.of(2000, 32, 0, 3000, 32, 32 + holeChunks);
  const expected = new Uint32Array([...sumsA, ...sumsB]);
  const tasksBefore = workerWaits.count;
  assert.equal(await io.readChunks(target, plan, expected, true), null);
  assert.equal(workerWaits.count, tasksBefore + 1, 'one task');
  assert.deepEqual(target.subarray(0, large), a);
  assert.ok(target.subarray(large, large + holeChunks * chunkSizeBytes).every((byte) => byte === 0), 'the hole is left as it was');
  assert.deepEqual(target.subarray((32 + holeChunks) * chunkSizeBytes), b);
  expected[40] = (expected[40]! + 1) >>> 0;
  assert.deepEqual(await io.readChunks(target, plan, expected, true), { chunkIndex: 40, expected: expected[40], actual: sumsB[8] });
});

test('a run across two chunk files', async () => {
  const data = randomBytes(huge);
  const sums = await io.writeSummed(chunksPerFile - 16, data);
  const target = Buffer.alloc(data.length);
  assert.equal(await io.readChunks(target, Float64Array.of(chunksPerFile - 16, target.length / chunkSizeBytes, 0), sums, true), null);
  assert.deepEqual(target, data);
  assert.ok(fs.existsSync(files.filePath(1)));
});

test('a worker that dies fails what it ran with EIO, is replaced, and the engine keeps serving', async () => {
  const data = randomBytes(huge);
  const sums = await io.writeSummed(500, data);
  // Its rejection is expected: checked (and so handled) from the start, since the worker may die before the reads end.
  const death = assert.rejects(io.killOneWorkerForTest(100), (error) => error instanceof ChunkdError && error.code === 'EIO');
  // Requests in flight meanwhile (large enough that a worker reads them): each either completes correctly or
  // fails with EIO, nothing else.
  const outcomes = await Promise.allSettled(
    Array.from({ length: 40 }, async () => {
      const target = Buffer.alloc(huge);
      assert.equal(await io.readChunks(target, Float64Array.of(500, target.length / chunkSizeBytes, 0), sums, true), null);
      assert.deepEqual(target, data);
    }),
  );
  await death;
  for (const outcome of outcomes) {
    if (outcome.status === 'rejected') assert.ok(outcome.reason instanceof ChunkdError && outcome.reason.code === 'EIO', String(outcome.reason));
  }
  assert.ok(outcomes.some((outcome) => outcome.status === 'fulfilled'));
  for (let i = 0; i < 20; i++) {
    const target = Buffer.alloc(huge);
    assert.equal(await io.readChunks(target, Float64Array.of(500, target.length / chunkSizeBytes, 0), sums, true), null, 'served after the death');
  }
  // The replacement starts in the background; wait for it (a bounded poll, not a timing assertion: 30 s, room for a
  // worker thread's start on a loaded machine).
  for (const deadline = Date.now() + 30_000; Date.now() < deadline && io.status().workers.length < 2;) await new Promise((resolve) => setTimeout(resolve, 20));
  const status = io.status();
  assert.equal(status.workerRestarts, 1);
  assert.equal(status.workers.length, 2, `replaced: ${JSON.stringify(status)}`);
  assert.ok(logged.some((line) => /worker \d+ died/.test(line)), logged.join("\n"));
});

/** Drops a file's clean pages from the page cache (posix_fadvise DONTNEED; the file must have been synced). */
function dropFromPageCache(file: string): void {
  const fadvise = koffi.load('libc.so.6').func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)');
  const fd = fs.openSync(file, 'r');
  try {
    assert.equal(fadvise(fd, 0, 0, 4 /* POSIX_FADV_DONTNEED */), 0);
  } finally {
    fs.closeSync(fd);
  }
}

/** A chunk directory of its own whose chunk 0 on holds `data`, synced to disk. */
/**
 * The real files, whose page cache can be made to answer as a cold one. A read with RWF_NOWAIT of pages just
 * dropped starts the kernel's readahead, and on a fast disk the pages can be in by the time the read looks again:
 * it then reads them, and the kernel's answer is not one a test can count on (it failed CI once). With `cold` set,
 * every cached read answers -1, what RWF_NOWAIT's EAGAIN gives, and the bytes come from the disk through libuv.
 */
function diskWhen(): { layer: FileLayer; cold: boolean } {
  const disk = {
    cold: false,
    layer: { ...realFiles, readCached: (fd: number, target: Uint8Array, position: number) => (disk.cold ? -1 : realFiles.readCached(fd, target, position)) },
  };
  return disk;
}

async function chunkFilesHolding(name: string, data: Buffer): Promise<string> {
  const chunkDirectory = path.join(directory, name);
  const chunkFiles = new ChunkFiles(chunkDirectory, realFiles);
  await chunkFiles.write(0, 0, data);
  await chunkFiles.sync();
  chunkFiles.close();
  return chunkDirectory;
}

test('with threadsAfter, no thread starts until it settles: I/O is done on this thread until then, by the workers after', async () => {
  // A node starts its threads after its ready line (node.ts): their boots do not take CPU from its start.
  const own = new ChunkFiles(path.join(directory, 'deferred'), realFiles);
  const waits = emptyHistogram();
  let go = (): void => {};
  const threadsAfter = new Promise<void>((resolve) => {
    go = resolve;
  });
  const deferred = new WorkerChunkIo(own, { workerCount: 2, buffers, log: (line) => logged.push(line), waitTimes: waits, threadsAfter });
  let late = (): void => {};
  const lateStart = new Promise<void>((resolve) => {
    late = resolve;
  });
  const never = new WorkerChunkIo(own, { workerCount: 2, buffers, log: (line) => logged.push(line), threadsAfter: lateStart });
  try {
    const data = randomBytes(huge);
    assert.deepEqual(await deferred.writeSummed(0, data), chunkSums(data));
    const back = Buffer.alloc(data.length);
    assert.equal(await deferred.readChunks(back, Float64Array.of(0, back.length / chunkSizeBytes, 0), chunkSums(data), true), null);
    assert.deepEqual(back, data);
    assert.equal(waits.count, 0, 'no task went to a worker before the threads started');
    assert.deepEqual(deferred.status().workers, []);
    go();
    await threadsAfter;
    for (let i = 0; i < 500 && deferred.status().workers.length < 2; i++) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(deferred.status().workers.length, 2, 'both workers started');
    assert.deepEqual(await deferred.writeSummed(huge / chunkSizeBytes, data), chunkSums(data));
    assert.equal(waits.count, 1, 'past 1 MiB, a worker wrote it');
    // A close before the threads start (a node whose start failed) has no thread to wait for, and none starts later.
    await never.close();
    late();
    await lateStart;
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(never.status(), { engine: 'workers', workers: [], queued: 0, workerRestarts: 0 });
  } finally {
    await deferred.close();
    await never.close();
    own.close();
  }
});
