// A chunk file's writes through the file layer go two at a time at most (chunk-files.ts, #writeInTurn): the writes
// queued behind them that continue each other in the file go as one pwritev, every write's bytes land where it said, a
// write in another file does not wait, and a pwritev that fails fails its own writes only: the next ones still run.
// The chunk writer is given no write of a file while one of that file's writes is with the layer.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, test } from 'vitest';
import { chunkSizeBytes, chunksPerFile } from '../../src/core/limits.ts';
import { ChunkFiles } from '../../src/store/chunk-files.ts';
import { ChunkWriter } from '../../src/store/chunk-writer.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';

const MiB = 1024 * 1024;
const chunksPerMiB = MiB / chunkSizeBytes;

/** The real files, counting the writes in flight at once (per descriptor) and each call, with a failure to arm. */
class CountingFiles {
  readonly calls: Array<{ fd: number; op: 'write' | 'writev'; position: number; bytes: number }> = [];
  readonly inFlight = new Map<number, number>();
  mostInFlight = 0;
  /** A write or writev that covers this position fails with EIO (once). */
  failAt: number | null = null;
  readonly layer: FileLayer = {
    ...realFiles,
    write: (fd, data, positionBytes) => this.#track(fd, 'write', positionBytes, data.length, () => realFiles.write(fd, data, positionBytes)),
    writev: (fd, parts, positionBytes) =>
      this.#track(fd, 'writev', positionBytes, parts.reduce((sum, part) => sum + part.length, 0), () => realFiles.writev(fd, parts, positionBytes)),
  };

  async #track(fd: number, op: 'write' | 'writev', position: number, bytes: number, run: () => Promise<void>): Promise<void> {
    this.calls.push({ fd, op, position, bytes });
    const now = (this.inFlight.get(fd) ?? 0) + 1;
    this.inFlight.set(fd, now);
    this.mostInFlight = Math.max(this.mostInFlight, now);
    try {
      // A turn of the event loop in between, as libuv's pool gives, so that writes asked meanwhile queue up.
      await new Promise((resolve) => setImmediate(resolve));
      if (this.failAt !== null && position <= this.failAt && this.failAt < position + bytes) {
        this.failAt = null;
        throw Object.assign(new Error('EIO: injected'), { code: 'EIO' });
      }
      await run();
    } finally {
      this.inFlight.set(fd, this.inFlight.get(fd)! - 1);
    }
  }
}

let directory: string;
let layer: CountingFiles;
let files: ChunkFiles;

beforeEach(() => {
  directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-queue-'));
  layer = new CountingFiles();
  files = new ChunkFiles(path.join(directory, 'chunks'), layer.layer);
});

afterEach(() => {
  files.close();
  fs.rmSync(directory, { recursive: true, force: true });
});

async function readBack(physicalChunk: number, lengthBytes: number): Promise<Buffer> {
  const target = Buffer.alloc(lengthBytes);
  await files.read(physicalChunk, 0, target);
  return target;
}

test('eight consecutive 1 MiB writes of one file reach the layer two at a time at most, the queued ones as one writev, each landing in place', async () => {
  const payloads = Array.from({ length: 8 }, () => randomBytes(MiB));
  await Promise.all(payloads.map((payload, i) => files.write(i * chunksPerMiB, 0, payload)));
  assert.equal(layer.mostInFlight, 2, 'two writes of a file with the layer at a time at most');
  assert.deepEqual(
    layer.calls.map(({ op, position, bytes }) => [op, position, bytes]),
    [
      ['write', 0, MiB],
      ['write', MiB, MiB],
      ['writev', 2 * MiB, 6 * MiB],
    ],
  );
  for (const [i, payload] of payloads.entries()) assert.ok((await readBack(i * chunksPerMiB, MiB)).equals(payload), `write ${i} in place`);
});

test('queued writes that do not continue each other go one by one, in the order asked; another file does not wait', async () => {
  const a = randomBytes(2 * chunkSizeBytes);
  const b = randomBytes(chunkSizeBytes);
  const c = randomBytes(chunkSizeBytes);
  const other = randomBytes(chunkSizeBytes);
  // Both files open first (an open goes through libuv's pool: which of two ends first is the machine's business).
  await Promise.all([files.write(0, 0, randomBytes(chunkSizeBytes)), files.write(chunksPerFile, 0, randomBytes(chunkSizeBytes))]);
  layer.calls.length = 0;
  layer.mostInFlight = 0;
  await Promise.all([files.write(10, 0, a), files.write(40, 0, b), files.write(20, 0, c), files.write(chunksPerFile + 5, 0, other)]);
  assert.equal(layer.mostInFlight, 2);
  const firstFd = layer.calls[0]!.fd;
  const firstFile = layer.calls.filter((call) => call.fd === firstFd);
  assert.deepEqual(
    firstFile.map(({ op, position }) => [op, position]),
    [
      ['write', 10 * chunkSizeBytes],
      ['write', 40 * chunkSizeBytes],
      ['write', 20 * chunkSizeBytes],
    ],
  );
  // The second file's write went to the layer at once, beside the first file's first two, not after the third.
  assert.equal(layer.calls.findIndex((call) => call.fd !== firstFd && call.position === 5 * chunkSizeBytes), 2, JSON.stringify(layer.calls));
  assert.ok((await readBack(10, a.length)).equals(a));
  assert.ok((await readBack(40, b.length)).equals(b));
  assert.ok((await readBack(20, c.length)).equals(c));
  assert.ok((await readBack(chunksPerFile + 5, other.length)).equals(other));
});

test('a writev that fails fails each of its writes with its error, and the writes queued after it still run', async () => {
  const payloads = Array.from({ length: 4 }, () => randomBytes(MiB));
  layer.failAt = 2 * MiB; // inside the writev of writes 2 and 3 (writes 0 and 1 go first, each alone)
  const [first, second, third, fourth] = payloads.map((payload, i) => files.write(i * chunksPerMiB, 0, payload).then(() => 'ok', (error: NodeJS.ErrnoException) => error.code));
  // Asked once the writev is with the layer: it waits in the queue, and runs after the failure.
  await new Promise((resolve) => setImmediate(resolve));
  await new Promise((resolve) => setImmediate(resolve));
  const later = randomBytes(chunkSizeBytes);
  const afterFailure = files.write(8 * chunksPerMiB, 0, later).then(() => 'ok');
  assert.deepEqual(await Promise.all([first, second, third, fourth, afterFailure]), ['ok', 'ok', 'EIO', 'EIO', 'ok']);
  assert.deepEqual(layer.calls.map(({ op }) => op), ['write', 'write', 'writev', 'write']);
  assert.ok((await readBack(0, MiB)).equals(payloads[0]!));
  assert.ok((await readBack(chunksPerMiB, MiB)).equals(payloads[1]!));
  assert.ok((await readBack(8 * chunksPerMiB, later.length)).equals(later));
});

test("the real layer's writev writes every part in order from its position", async () => {
  const fd = realFiles.openSync(path.join(directory, 'plain'), 'create');
  try {
    const parts = [randomBytes(5), randomBytes(4096), randomBytes(3 * MiB), randomBytes(1)];
    await realFiles.writev(fd, parts, 100);
    const back = Buffer.alloc(Buffer.concat(parts).length);
    fs.readSync(fd, back, 0, back.length, 100);
    assert.ok(back.equals(Buffer.concat(parts)));
  } finally {
    realFiles.close(fd);
  }
});

// The chunk writer may pwrite on the event loop's thread, and a buffered write waits for the file's inode lock while
// a pool thread's write of the same file holds it: so a write of a file that has one with the layer goes after it,
// through the layer, and the writer still takes a write of another file, or of this one once it is idle.
test('the chunk writer takes no write of a file while one of its writes is with the layer', async () => {
  const slab = new SharedArrayBuffer(4 * chunkSizeBytes);
  const writer = new ChunkWriter(slab, { waitMs: 5000 });
  const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
  const writeCounts = (counted: ChunkWriter): { inline: number; thread: number } => ({ inline: counted.counts().inline, thread: counted.counts().thread });
  const inSlab = (index: number): Buffer => {
    const bytes = Buffer.from(slab, index * chunkSizeBytes, chunkSizeBytes);
    randomBytes(chunkSizeBytes).copy(bytes);
    return bytes;
  };
  try {
    const large = randomBytes(MiB); // not in the slab: the layer writes it
    const small = inSlab(0);
    const busy = files.write(0, 0, large, writer);
    const behind = files.write(chunksPerMiB, 0, small, writer);
    await Promise.all([busy, behind]);
    assert.deepEqual(writeCounts(writer), { inline: 0, thread: 0 }, 'not the writer: the file had a write with the layer');
    assert.deepEqual(layer.calls.map(({ position, bytes }) => [position, bytes]), [[0, MiB], [MiB, chunkSizeBytes]]);
    await nextTurn();
    const other = inSlab(1);
    const busyAgain = files.write(0, 0, large, writer);
    const otherFile = files.write(chunksPerFile, 0, other, writer); // another file: the writer takes it
    await Promise.all([busyAgain, otherFile]);
    assert.deepEqual(writeCounts(writer), { inline: 1, thread: 0 });
    await nextTurn();
    const idle = inSlab(2);
    await files.write(chunksPerMiB + 1, 0, idle, writer); // the file idle again: the writer takes it
    assert.deepEqual(writeCounts(writer), { inline: 2, thread: 0 });
    assert.ok((await readBack(0, MiB)).equals(large));
    assert.ok((await readBack(chunksPerMiB, chunkSizeBytes)).equals(small));
    assert.ok((await readBack(chunksPerFile, chunkSizeBytes)).equals(other));
    assert.ok((await readBack(chunksPerMiB + 1, chunkSizeBytes)).equals(idle));
  } finally {
    writer.close();
  }
});
