// Crash test: a client writes (and trims) with many requests in flight and flushes now and then; the node is
// killed with SIGKILL at a random moment; after a restart every write acknowledged before the last completed
// flush was sent must read back, and `chunkd fsck` must be clean (before and after the restart).
//
// Model: per 4 KiB block, the content made durable by a completed flush, plus every later write or trim whose
// fate the crash decided (sent but not covered by a completed flush). After the crash a block must hold the
// durable content or one of those later ones; what it holds becomes the new durable content.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';
import { makeTempDir, nodeBinary, chunkdBin, runTool, startNode } from '../helpers/node-process.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';

const blockBytes = 4096;
const volumeBlocks = 4096; // 16 MiB: small, so blocks are overwritten often
const rounds = Number(process.env.CRASH_ROUNDS ?? 6);

/** A block's possible contents, as hashes ('zero' for zeros). */
interface BlockState {
  durable: string;
  undecided: string[];
}

const zeroHash = 'zero';
const hash = (data: Buffer): string => (data.every((byte) => byte === 0) ? zeroHash : crypto.createHash('sha1').update(data).digest('hex'));

test(`crash: SIGKILL at random moments in ${rounds} rounds loses no flushed write`, { timeout: 300_000 }, async () => {
  const seed = testSeed('crash');
  const random = makeRandom(seed);
  const scratch = makeTempDir('crash');
  const pool = path.join(scratch, 'pool');
  const blocks: BlockState[] = Array.from({ length: volumeBlocks }, () => ({ durable: zeroHash, undecided: [] }));
  let created = false;

  for (let round = 0; round < rounds; round++) {
    const node = await startNode(pool);
    if (!created) {
      assert.equal((await node.cli('volume', 'create', 'crash', '--size', `${volumeBlocks * blockBytes}`)).code, 0);
      created = true;
    }
    const client = await TestNbdClient.connect(node.nbdSocket, 'crash');

    // Verify what survived the previous crash, then settle the model.
    for (let block = 0; block < volumeBlocks; block += 256) {
      const data = await client.read(block * blockBytes, 256 * blockBytes);
      for (let i = 0; i < 256; i++) {
        const state = blocks[block + i]!;
        const seen = hash(data.subarray(i * blockBytes, (i + 1) * blockBytes));
        assert.ok(
          seen === state.durable || state.undecided.includes(seen),
          `round ${round}: block ${block + i} holds neither its flushed content nor a later write (seed ${seed})`,
        );
        state.durable = seen;
        state.undecided = [];
      }
    }

    // Load: writes of 1-16 blocks (in place and into holes), some trims, a flush every ~20 requests.
    let stop = false;
    let sent = 0;
    let flushes = 0;
    // Writes acknowledged since the last flush was sent: a completed flush makes them durable.
    let ackedSinceFlushSent: Array<{ first: number; hashes: string[] }> = [];
    const inFlight = new Set<Promise<void>>();
    const issue = (): void => {
      const first = randomInt(random, volumeBlocks - 16);
      const count = 1 + randomInt(random, 16);
      const trim = random() < 0.1;
      const data = trim ? Buffer.alloc(count * blockBytes) : crypto.randomBytes(count * blockBytes);
      const hashes = Array.from({ length: count }, (_, i) => hash(data.subarray(i * blockBytes, (i + 1) * blockBytes)));
      for (let i = 0; i < count; i++) blocks[first + i]!.undecided.push(hashes[i]!);
      const request = trim ? client.trim(first * blockBytes, count * blockBytes) : client.write(first * blockBytes, data);
      const tracked = request.then(
        () => {
          ackedSinceFlushSent.push({ first, hashes });
        },
        () => {},
      );
      inFlight.add(tracked);
      void tracked.then(() => inFlight.delete(tracked));
      sent += 1;
      if (sent % 20 === 0) {
        const covered = ackedSinceFlushSent;
        ackedSinceFlushSent = [];
        const flush = client.flush().then(
          () => {
            flushes += 1;
            // Each covered write is now the block's durable content; later sends stay undecided.
            for (const write of covered) {
              write.hashes.forEach((h, i) => {
                const state = blocks[write.first + i]!;
                const index = state.undecided.indexOf(h);
                if (index >= 0) {
                  state.durable = h;
                  state.undecided.splice(0, index + 1);
                }
              });
            }
          },
          () => {},
        );
        inFlight.add(flush);
        void flush.then(() => inFlight.delete(flush));
      }
    };
    const pump = (async () => {
      while (!stop) {
        while (inFlight.size < 24 && !stop) issue();
        await Promise.race(inFlight);
      }
    })();
    // Requests still in flight at the kill are the point; only new ones stop (and a closed client must not spin).
    // The kill comes a random time after the first flush has completed (on a loaded machine none may complete in
    // the first second, and a round without one proves nothing).
    for (const started = performance.now(); flushes === 0 && performance.now() - started < 20_000; ) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await new Promise((resolve) => setTimeout(resolve, 150 + randomInt(random, 700)));
    stop = true;
    await node.kill();
    await pump.catch(() => {});
    await Promise.allSettled([...inFlight]);
    client.close();
    assert.ok(flushes > 0, `round ${round}: no flush completed before the kill; the test proved nothing (seed ${seed})`);

    const fsck = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
    assert.equal(fsck.code, 0, `fsck after the crash of round ${round}:\n${fsck.stdout}${fsck.stderr}`);
  }

  // A last restart: the state verifies, the node stops cleanly, fsck is clean.
  const node = await startNode(pool);
  const client = await TestNbdClient.connect(node.nbdSocket, 'crash');
  for (let block = 0; block < volumeBlocks; block++) {
    const seen = hash(await client.read(block * blockBytes, blockBytes));
    const state = blocks[block]!;
    assert.ok(seen === state.durable || state.undecided.includes(seen), `final: block ${block} (seed ${seed})`);
  }
  await client.disconnect();
  assert.equal(await node.stop(), 0);
  const fsck = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
  assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
  assert.match(fsck.stdout, /clean/);
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('multi-conn: a FLUSH on one connection makes writes acknowledged on the others durable', { timeout: 60_000 }, async () => {
  const scratch = makeTempDir('multiconn');
  const pool = path.join(scratch, 'pool');
  const node = await startNode(pool, ['--default-volume', 'mc:64MiB']);
  const writers = await Promise.all([0, 1, 2].map(() => TestNbdClient.connect(node.nbdSocket, 'mc')));
  const flusher = await TestNbdClient.connect(node.tcpPort, 'mc');
  assert.ok((flusher.transmissionFlags & (1 << 8)) !== 0, 'the export advertises CAN_MULTI_CONN');
  const written = await Promise.all(
    writers.map(async (client, i) => {
      const data = crypto.randomBytes(256 * 1024);
      await client.write(i * 8 * 1024 * 1024, data);
      return data;
    }),
  );
  await flusher.flush();
  await node.kill();
  for (const client of [...writers, flusher]) client.close();
  const again = await startNode(pool);
  const reader = await TestNbdClient.connect(again.nbdSocket, 'mc');
  for (const [i, data] of written.entries()) assert.ok((await reader.read(i * 8 * 1024 * 1024, data.length)).equals(data), `connection ${i}'s write`);
  await reader.disconnect();
  assert.equal(await again.stop(), 0);
  fs.rmSync(scratch, { recursive: true, force: true });
});
