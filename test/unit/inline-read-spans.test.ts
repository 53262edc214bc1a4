// Cached reads on the calling thread read a range rewritten at random in spans (chunk-io.ts's spanEnd): runs of
// the data first written there with one read call over the few rewritten chunks between them, which are then
// read again from their own runs. What is read back is exactly what each run names, a hole stays as the caller
// left it, and every chunk is verified.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { chunkSizeBytes, chunksPerFile } from '../../src/core/limits.ts';
import { blockChecksum } from '../../src/store/checksum.ts';
import { ChunkFiles } from '../../src/store/chunk-files.ts';
import { InlineChunkIo, spanEnd } from '../../src/store/chunk-io.ts';
import { realFiles } from '../../src/store/file-layer.ts';

let directory: string;
let files: ChunkFiles;
/** What physical chunks 0-63 (first written) and 100-119 (rewrites) hold. */
const first = randomBytes(64 * chunkSizeBytes);
const rewrites = randomBytes(20 * chunkSizeBytes);

beforeAll(async () => {
  directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-spans-'));
  files = new ChunkFiles(path.join(directory, 'chunks'), realFiles);
  await files.write(0, 0, first);
  await files.write(100, 0, rewrites);
});

afterAll(() => {
  files.close();
  fs.rmSync(directory, { recursive: true, force: true });
});

/** (physical chunk, chunk count, target chunk) triples, as ChunkStore.read plans them. */
const entries: Array<[number, number, number]> = [
  [0, 1, 0], [100, 1, 1], [2, 2, 2], [101, 2, 4], [6, 1, 6], [103, 1, 7], [8, 4, 8], // one span, 0-11
  [104, 5, 12], [17, 3, 17], // a gap of 5 chunks: no span from 8 to 17
  // target chunk 20 is a hole (no entry): the span must not read over it
  [21, 3, 21], [109, 1, 24], [25, 7, 25],
];
const plan = new Float64Array(entries.flat());

function physicalBytes(chunk: number): Buffer {
  return chunk >= 100 ? rewrites.subarray((chunk - 100) * chunkSizeBytes, (chunk - 99) * chunkSizeBytes) : first.subarray(chunk * chunkSizeBytes, (chunk + 1) * chunkSizeBytes);
}

test('spanEnd: runs as far from their target place as the first, gaps of at most 4 chunks, never over a hole or into another chunk file', () => {
  assert.equal(spanEnd(plan, 0), 6 * 3);
  assert.equal(spanEnd(plan, 7 * 3), 7 * 3, 'the run after it is 5 chunks on');
  assert.equal(spanEnd(plan, 8 * 3), 8 * 3, 'a hole follows');
  assert.equal(spanEnd(plan, 9 * 3), 11 * 3);
  const acrossFiles = new Float64Array([chunksPerFile - 2, 1, 0, 500, 1, 1, chunksPerFile, 1, 2]);
  assert.equal(spanEnd(acrossFiles, 0), 0, 'the next run of its kind is in the next chunk file');
});

test('a cached read in spans gives each run\'s bytes, leaves a hole as it was, and verifies every chunk', () => {
  const io = new InlineChunkIo(files);
  const target = Buffer.alloc(32 * chunkSizeBytes); // the hole at chunk 20 stays zeros, as ChunkStore.read fills it
  const model = Buffer.alloc(32 * chunkSizeBytes);
  const sums: number[] = [];
  for (const [physical, count, targetChunk] of entries) {
    for (let i = 0; i < count; i++) {
      const bytes = physicalBytes(physical + i);
      bytes.copy(model, (targetChunk + i) * chunkSizeBytes);
      sums.push(blockChecksum(bytes));
    }
  }
  const expected = Uint32Array.from(sums);
  // The file was just written: every byte of it, the stale ones in the gaps too, is in the page cache.
  assert.equal(io.readCachedChunks(target, plan, expected, true), null);
  assert.ok(target.equals(model), 'each chunk holds what its run names; the hole stays zeros');
  // A checksum that does not match is still named (the chunk a span read over, then read again from its run).
  const wrong = Uint32Array.from(expected);
  wrong[1] = wrong[1]! ^ 1;
  assert.equal(io.readCachedChunks(Buffer.alloc(32 * chunkSizeBytes), plan, wrong, true)?.chunkIndex, 1);
});
