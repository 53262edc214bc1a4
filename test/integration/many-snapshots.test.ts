// A thousand snapshots on one volume: create, list, read any of them, remove them in random order, and the
// pool's space comes back.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { callApi } from '../../src/cli/api-client.ts';
import { makeTempDir, startNode } from '../helpers/node-process.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const count = 1000;
const blockBytes = 4096;

test(`${count} snapshots on one volume: create, list, read any, remove in any order`, { timeout: 300_000 }, async () => {
  const seed = testSeed('many snapshots');
  const random = makeRandom(seed);
  const scratch = makeTempDir('many');
  const node = await startNode(path.join(scratch, 'pool'), ['--default-volume', `v:${count * blockBytes}`]);
  try {
    const client = await TestNbdClient.connect(node.nbdSocket, 'v');
    // Before snapshot i, block i gets the value i: snapshot i sees blocks 0..i written and the rest zero.
    const stamp = (i: number): Buffer => {
      const block = Buffer.alloc(blockBytes);
      block.writeUInt32LE(i + 1, 0);
      return block;
    };
    for (let i = 0; i < count; i++) {
      await client.write(i * blockBytes, stamp(i));
      await callApi(node.apiSocket, 'POST', '/v1/volumes/v/snapshots', { name: `s${i}` });
    }
    await client.disconnect();
    const { snapshots } = (await callApi(node.apiSocket, 'GET', '/v1/volumes/v/snapshots')) as { snapshots: Array<{ name: string }> };
    assert.equal(snapshots.length, count);
    assert.deepEqual(snapshots.map((s) => s.name), Array.from({ length: count }, (_, i) => `s${i}`), 'listed in creation order');

    for (let k = 0; k < 12; k++) {
      const i = randomInt(random, count);
      const reader = await TestNbdClient.connect(node.nbdSocket, `v@s${i}`);
      const image = await reader.read(0, count * blockBytes);
      await reader.disconnect();
      for (const j of [0, i, Math.min(count - 1, i + 1), randomInt(random, count)]) {
        const expected = j <= i ? stamp(j) : Buffer.alloc(blockBytes);
        assert.ok(image.subarray(j * blockBytes, (j + 1) * blockBytes).equals(expected), `snapshot s${i}, block ${j} (seed ${seed})`);
      }
    }

    const order = Array.from({ length: count }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = randomInt(random, i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    for (const i of order) await callApi(node.apiSocket, 'DELETE', `/v1/volumes/v/snapshots/s${i}`);
    const info = (await callApi(node.apiSocket, 'GET', '/v1/volumes/v')) as { snapshots: string[]; allocatedBytes: number };
    assert.deepEqual(info.snapshots, []);
    const status = (await callApi(node.apiSocket, 'GET', '/v1/status')) as { pool: { allocatedBytes: number } };
    assert.equal(status.pool.allocatedBytes, info.allocatedBytes, 'with the snapshots gone, the pool holds just the volume');
  } finally {
    assert.equal(await node.stop(), 0);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
