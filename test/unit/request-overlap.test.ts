// Whether requests come one at a time (core/request-overlap.ts), and the chunk writer's use of it: no pwrite on the
// event loop's thread while requests overlap (a stream at queue depth 32), as before while they come one at a time.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { aloneStreakToClear, RequestOverlap, requestOverlap } from '../../src/core/request-overlap.ts';
import { ChunkWriter } from '../../src/store/chunk-writer.ts';

test('one at a time until a request starts while another is in flight; again only after a streak of lone requests', () => {
  const overlap = new RequestOverlap();
  assert.equal(overlap.overlapping, false, 'nothing counted reads as one at a time');
  overlap.started();
  overlap.ended();
  assert.equal(overlap.overlapping, false);
  overlap.started();
  overlap.started(); // the second while the first is in flight
  assert.equal(overlap.overlapping, true);
  overlap.ended();
  overlap.ended();
  for (let i = 1; i < aloneStreakToClear; i++) {
    overlap.started();
    overlap.ended();
    assert.equal(overlap.overlapping, true, `after ${i} lone requests`);
  }
  overlap.started();
  assert.equal(overlap.overlapping, false, `after ${aloneStreakToClear} lone requests`);
  overlap.started(); // overlapping again at once
  assert.equal(overlap.overlapping, true);
  overlap.ended();
  overlap.ended();
});

test('the chunk writer writes on its thread while requests overlap, inline once they come one at a time again', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-overlap-'));
  const fd = fs.openSync(path.join(directory, 'file'), 'w+');
  const slab = new SharedArrayBuffer(64 * 1024);
  const writer = new ChunkWriter(slab, { waitMs: 5000 });
  const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
  const write = async (index: number): Promise<void> => {
    const data = Buffer.from(slab, index * 4096, 4096).fill(index + 1);
    await writer.write(fd, data, index * 4096);
    await nextTurn();
    const back = Buffer.alloc(4096);
    fs.readSync(fd, back, 0, 4096, index * 4096);
    assert.ok(back.equals(data), `write ${index} landed`);
  };
  const counts = (): [number, number] => [writer.counts().inline, writer.counts().thread];
  try {
    await nextTurn();
    await write(0);
    assert.deepEqual(counts(), [1, 0]);
    requestOverlap.started();
    requestOverlap.started();
    await write(1);
    assert.deepEqual(counts(), [1, 1], 'requests in flight together: on the thread');
    requestOverlap.ended();
    requestOverlap.ended();
    for (let i = 0; i < aloneStreakToClear; i++) {
      requestOverlap.started();
      requestOverlap.ended();
    }
    await write(2);
    assert.deepEqual(counts(), [2, 1], 'one at a time again: inline');
  } finally {
    writer.close();
    fs.closeSync(fd);
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
