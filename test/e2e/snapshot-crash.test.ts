// Crash in the middle of snapshot create, snapshot rm and rollback: the node is killed with SIGKILL at a random
// moment around the call; after a restart the state is either wholly before or wholly after the operation,
// every snapshot that exists reads back as it was taken, and `chunkd fsck` is clean.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { callApi } from '../../src/cli/api-client.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';
import { chunkdBin, makeTempDir, nodeBinary, runTool, startNode } from '../helpers/node-process.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';

const volumeBytes = 4 * 1024 * 1024;
const rounds = Number(process.env.CRASH_ROUNDS ?? 10);

test(`crash during snapshot create, rm and rollback (${rounds} rounds): before or after, never between`, { timeout: 300_000 }, async () => {
  const seed = testSeed('snapshot crash');
  const random = makeRandom(seed);
  const scratch = makeTempDir('snapcrash');
  const pool = path.join(scratch, 'pool');
  let volume: Buffer = Buffer.alloc(volumeBytes);
  const snapshots = new Map<string, Buffer>();
  let counter = 0;

  for (let round = 0; round < rounds; round++) {
    const node = await startNode(pool);
    if (round === 0) await callApi(node.apiSocket, 'POST', '/v1/volumes', { name: 'v', sizeBytes: volumeBytes });

    // Check the state the last crash left, against the model.
    const client = await TestNbdClient.connect(node.nbdSocket, 'v');
    assert.ok((await client.read(0, volumeBytes)).equals(volume), `round ${round}: the volume (seed ${seed})`);
    const listed = ((await callApi(node.apiSocket, 'GET', '/v1/volumes/v/snapshots')) as { snapshots: Array<{ name: string }> }).snapshots.map((s) => s.name);
    assert.deepEqual(listed.sort(), [...snapshots.keys()].sort(), `round ${round}: the snapshots (seed ${seed})`);
    for (const [name, data] of snapshots) {
      const reader = await TestNbdClient.connect(node.nbdSocket, `v@${name}`);
      assert.ok((await reader.read(0, volumeBytes)).equals(data), `round ${round}: snapshot ${name} (seed ${seed})`);
      await reader.disconnect();
    }

    // Change the volume durably, so that every operation has something to do.
    for (let i = 0; i < 8; i++) {
      const offset = randomInt(random, volumeBytes / 4096 - 16) * 4096;
      const data = crypto.randomBytes(4096 * (1 + randomInt(random, 16)));
      await client.write(offset, data);
      data.copy(volume, offset);
    }
    await client.flush();
    await client.disconnect();

    // One operation, with a kill at a random moment around it.
    const names = [...snapshots.keys()];
    const kind = names.length === 0 ? 0 : randomInt(random, 3);
    const target = names[randomInt(random, Math.max(1, names.length))];
    const before = { volume: Buffer.from(volume), snapshots: new Map(snapshots) };
    let after: { volume: Buffer; snapshots: Map<string, Buffer> };
    let call: Promise<unknown>;
    if (kind === 0) {
      const name = `s${counter++}`;
      after = { volume: before.volume, snapshots: new Map([...snapshots, [name, Buffer.from(volume)]]) };
      call = callApi(node.apiSocket, 'POST', '/v1/volumes/v/snapshots', { name });
    } else if (kind === 1) {
      const remaining = new Map(snapshots);
      remaining.delete(target!);
      after = { volume: before.volume, snapshots: remaining };
      call = callApi(node.apiSocket, 'DELETE', `/v1/volumes/v/snapshots/${target}`);
    } else {
      after = { volume: Buffer.from(snapshots.get(target!)!), snapshots: new Map(snapshots) };
      call = callApi(node.apiSocket, 'POST', `/v1/volumes/v/snapshots/${target}/rollback`);
    }
    const completed = call.then(() => true, () => false);
    await new Promise((resolve) => setTimeout(resolve, randomInt(random, 12)));
    await node.kill();
    const acknowledged = await completed;

    const fsck = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
    assert.equal(fsck.code, 0, `fsck after the crash of round ${round}:\n${fsck.stdout}${fsck.stderr}`);

    // Which side did it land on? The snapshot list tells for create and rm; the volume's data for rollback.
    const probe = await startNode(pool);
    const probeList = ((await callApi(probe.apiSocket, 'GET', '/v1/volumes/v/snapshots')) as { snapshots: Array<{ name: string }> }).snapshots.map((s) => s.name).sort();
    const reader = await TestNbdClient.connect(probe.nbdSocket, 'v');
    const data = await reader.read(0, volumeBytes);
    await reader.disconnect();
    await probe.stop();
    const landedAfter = kind === 2 ? data.equals(after.volume) && !data.equals(before.volume) : probeList.join() === [...after.snapshots.keys()].sort().join();
    const state = landedAfter ? after : before;
    assert.ok(!acknowledged || landedAfter || (kind === 2 && before.volume.equals(after.volume)), `round ${round}: an acknowledged operation was lost (seed ${seed})`);
    volume = state.volume;
    snapshots.clear();
    for (const [name, content] of state.snapshots) snapshots.set(name, content);
  }
  fs.rmSync(scratch, { recursive: true, force: true });
});
