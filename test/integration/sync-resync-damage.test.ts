// A resync that reads a block damaged on the owner (a byte flipped on disk under it, so that it fails its checksum)
// with no in-sync replica to repair it from (replication/sync-replicas.ts, DAMAGE AT RESYNC): the resync copies
// every other block, names the lost range (log, `replica status`, the API), counts it, and waits instead of trying
// again every second; the replica holds every other block, its dirty map only the lost block's region; a client
// write over the block resumes it, and the replica is in sync. And the case where the replica's own copy of the
// damaged block matches the owner's recorded checksum: the resync finds it equal (not read, not sent), the replica
// turns in sync, and a read on the owner then repairs the block from it. And a damaged block of a snapshot the
// resync gives: named with the snapshot, the resync stopped until the snapshot is removed.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { freePort, haveTool, makeTempDir, mustRun } from '../helpers/node-process.ts';
import { replicaLinks, startPeerNode, waitFor, type PeerNode } from '../helpers/peer-nodes.ts';
import { callApi } from '../../src/cli/api-client.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';
import { exportHash, ok, stopAndCheck } from '../helpers/stream-pipe.ts';
import { flipByteUnder, namedBlock } from '../helpers/damage.ts';

const MiB = 1024 * 1024;
const skip = !haveTool('nbdcopy') || !haveTool('openssl');
let scratch: string;
let alpha: PeerNode;
let beta: PeerNode;

beforeAll(async () => {
  if (skip) return;
  scratch = makeTempDir('sync-resync-damage');
  const tlsDir = path.join(scratch, 'tls');
  await mustRun(process.execPath, [path.resolve(import.meta.dirname, '../../bin/chunkd.js'), 'tls', 'init', tlsDir, '--node', 'alpha', '--node', 'beta']);
  alpha = await startPeerNode(scratch, tlsDir, 'alpha', await freePort());
  beta = await startPeerNode(scratch, tlsDir, 'beta', await freePort());
});

afterAll(async () => {
  if (skip) return;
  for (const peer of [alpha, beta]) await stopAndCheck(peer.node);
  fs.rmSync(scratch, { recursive: true, force: true });
});

async function syncLink(volume: string): Promise<Record<string, any>> {
  const found = (await replicaLinks(alpha, volume)).find((r) => r.mode === 'sync');
  assert.ok(found !== undefined, `no synchronous link of ${volume}`);
  return found;
}

function inSync(volume: string): Promise<Record<string, any>> {
  return waitFor(`${volume} in sync`, async () => {
    const now = await syncLink(volume);
    return now.state === 'in-sync' ? now : null;
  }, async () => `${JSON.stringify(await syncLink(volume))}\n${alpha.node.stderr()}`, 20_000);
}

/** The volume's data on `node` through NBD, in 1 MiB reads, with the range [skipFrom, skipTo) left out. */
async function readAllBut(node: PeerNode, volume: string, sizeBytes: number, skipFrom: number, skipTo: number): Promise<Buffer> {
  const client = await TestNbdClient.connect(node.node.nbdSocket, volume);
  try {
    const parts: Buffer[] = [];
    for (let at = 0; at < sizeBytes; at += MiB) {
      const end = Math.min(sizeBytes, at + MiB);
      if (end <= skipFrom || at >= skipTo) parts.push(await client.read(at, end - at));
      else {
        if (skipFrom > at) parts.push(await client.read(at, skipFrom - at));
        if (end > skipTo) parts.push(await client.read(skipTo, end - skipTo));
      }
    }
    return Buffer.concat(parts);
  } finally {
    await client.disconnect();
  }
}

test('a damaged block a resync reads with no in-sync copy: named, counted, every other block copied, no retry loop; a write over it resumes the resync', { skip }, async () => {
  const sizeBytes = 4 * MiB;
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'dmg', sizeBytes });
  const blocks = [namedBlock('resync lost', 0), namedBlock('resync lost', 1), namedBlock('resync lost', 2)];
  const at = MiB;
  const lostAt = at + 4096;
  const client = await TestNbdClient.connect(alpha.node.nbdSocket, 'dmg');
  try {
    await client.write(at, Buffer.concat(blocks));
    await client.write(2 * MiB, Buffer.alloc(MiB, 0x5a));
    await client.write(64 * 1024 - 512, Buffer.alloc(4096, 0x17));
    await client.flush();
  } finally {
    await client.disconnect();
  }
  // Damaged here before beta, a new replica, has any of it: its first resync must read the block to send it.
  flipByteUnder(alpha.node.pool, blocks[1]!);
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes/dmg/replicas', { peer: beta.address, sync: true, timeoutMs: 2_000 });
  const stopped = await waitFor('the resync stopped at the damaged block', async () => {
    const now = await syncLink('dmg');
    return now.lastError !== null ? now : null;
  }, async () => `${JSON.stringify(await syncLink('dmg'))}\n${alpha.node.stderr()}`, 20_000);

  // No loop: over the next 2 s the link sends nothing (before, it connected and resynced again every second).
  await new Promise((resolve) => setTimeout(resolve, 2_000));
  const later = await syncLink('dmg');
  assert.equal(later.requestsTotal, stopped.requestsTotal, `requests to beta went on: ${JSON.stringify(later)}\n${alpha.node.stderr()}`);
  const said = alpha.node.stderr().match(/volume dmg: .*bytes 1052672-1056767 .*no in-sync replica/g) ?? [];
  assert.equal(said.length, 1, alpha.node.stderr());
  assert.match(said[0]!, /4 KiB/);

  // Named and counted in the API, and in `replica status`.
  assert.equal(later.state, 'out-of-sync');
  assert.deepEqual(later.damagedBlocks, [{ snapshot: null, offsetBytes: lostAt, lengthBytes: 4096 }]);
  assert.equal(later.damagedBlocksTotal, 1);
  assert.match(later.lastError.message, /bytes 1052672-1056767 .*fail their checksum/);
  const status = await ok(alpha.node, 'replica', 'status', 'dmg');
  assert.match(status, /damaged here, no in-sync copy to repair from: bytes 1052672-1056767/);
  const metrics = await (await fetchMetrics(alpha));
  assert.match(metrics, new RegExp(`chunkd_sync_replica_damaged_blocks\\{volume="dmg",peer="${beta.address}"\\} 1`));

  // Every other block is on beta, and beta's dirty map holds the lost block's region only.
  assert.equal(later.dirtyBytes, 64 * 1024);
  const ours = await readAllBut(alpha, 'dmg', sizeBytes, lostAt, lostAt + 4096);
  assert.ok((await readAllBut(beta, 'dmg', sizeBytes, lostAt, lostAt + 4096)).equals(ours), 'beta holds every block but the lost one');
  assert.ok(ours.subarray(at, at + 4096).equals(blocks[0]!));

  // The client writes the block again: the resync resumes, the replica is in sync, both copies the same.
  const writer = await TestNbdClient.connect(alpha.node.nbdSocket, 'dmg');
  try {
    await writer.write(lostAt, blocks[1]!);
    await writer.flush();
  } finally {
    await writer.disconnect();
  }
  const back = await inSync('dmg');
  assert.deepEqual(back.damagedBlocks, []);
  assert.equal(back.lastError, null);
  assert.equal(back.damagedBlocksTotal, 1);
  assert.equal(await exportHash(beta.node, 'dmg'), await exportHash(alpha.node, 'dmg'));
  assert.match((await alpha.node.cli('scrub', 'dmg')).stdout, /no damage found/);
  await callApi(alpha.node.apiSocket, 'DELETE', '/v1/volumes/dmg/replicas', { peer: beta.address });
});

test('a damaged block whose good copy the out-of-sync replica holds: found equal by checksum, the replica in sync, and the block repaired from it on read', { skip }, async () => {
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'held', sizeBytes: 4 * MiB });
  const blocks = [namedBlock('resync held', 0), namedBlock('resync held', 1)];
  const at = 2 * MiB;
  const client = await TestNbdClient.connect(alpha.node.nbdSocket, 'held');
  try {
    await client.write(at, Buffer.concat(blocks));
    await client.flush();
    const api = (method: string, body: unknown): Promise<any> => callApi(alpha.node.apiSocket, method, '/v1/volumes/held/replicas', body);
    await api('POST', { peer: beta.address, sync: true, timeoutMs: 2_000 });
    await inSync('held');
    // Removed (beta keeps its copy), the block damaged here, added back: every region is dirty to the new link.
    await api('DELETE', { peer: beta.address });
    flipByteUnder(alpha.node.pool, blocks[0]!);
    await api('POST', { peer: beta.address, sync: true, timeoutMs: 2_000 });
    const back = await inSync('held');
    assert.equal(back.resyncBytesTotal, 0, 'nothing sent: beta holds what the owner recorded');
    assert.equal(back.resyncEqualBytesTotal, 4 * MiB);
    assert.deepEqual(back.damagedBlocks, []);
    assert.ok((await client.read(at, 8192)).equals(Buffer.concat(blocks)), 'the client reads the bytes it wrote');
    assert.equal((await syncLink('held')).readRepairsTotal, 1);
    assert.match(alpha.node.stderr(), /volume held: the block at byte 2097152 failed its checksum here; repaired from the synchronous replica on \S+ \(beta\)/);
  } finally {
    await client.disconnect();
  }
  assert.match((await alpha.node.cli('scrub', 'held')).stdout, /no damage found/);
  assert.equal(await exportHash(beta.node, 'held'), await exportHash(alpha.node, 'held'));
  await callApi(alpha.node.apiSocket, 'DELETE', '/v1/volumes/held/replicas', { peer: beta.address });
});

async function fetchMetrics(node: PeerNode): Promise<string> {
  return (await mustRun('curl', ['-s', '--unix-socket', node.node.apiSocket, 'http://chunkd/metrics']));
}

test('a damaged block of a snapshot the resync gives: named with the snapshot, the resync stopped; removing the snapshot resumes it', { skip }, async () => {
  const api = (method: string, route: string, body?: unknown): Promise<any> => callApi(alpha.node.apiSocket, method, `/v1/volumes/snapdmg${route}`, body);
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'snapdmg', sizeBytes: 4 * MiB });
  const old = namedBlock('resync snapshot', 0);
  const client = await TestNbdClient.connect(alpha.node.nbdSocket, 'snapdmg');
  try {
    await client.write(MiB, old);
    await client.flush();
    await api('POST', '/snapshots', { name: 'before' });
    // Overwritten in the volume: the snapshot alone holds the old block, which is then damaged on disk.
    await client.write(MiB, namedBlock('resync snapshot', 1));
    await client.flush();
  } finally {
    await client.disconnect();
  }
  flipByteUnder(alpha.node.pool, old);
  await api('POST', '/replicas', { peer: beta.address, sync: true, timeoutMs: 2_000 });
  const stopped = await waitFor('the resync stopped at the snapshot\'s damaged block', async () => {
    const now = await syncLink('snapdmg');
    return now.damagedBlocks?.length > 0 ? now : null;
  }, async () => `${JSON.stringify(await syncLink('snapdmg'))}\n${alpha.node.stderr()}`, 20_000);
  assert.deepEqual(stopped.damagedBlocks, [{ snapshot: 'before', offsetBytes: MiB, lengthBytes: 4096 }]);
  assert.equal(stopped.state, 'out-of-sync');
  assert.match(alpha.node.stderr(), /volume snapdmg: .*bytes 1048576-1052671 \(4 KiB\) of snapshot before fail their checksum here, and no in-sync replica/);
  assert.match(stopped.lastError.message, /the replica is not given snapshot before, and is out of sync until it is removed here/);
  await new Promise((resolve) => setTimeout(resolve, 1_500));
  assert.equal((await syncLink('snapdmg')).requestsTotal, stopped.requestsTotal, 'no retry loop');

  // The snapshot removed: the resync goes on without it, and the replica is in sync with the volume.
  await api('DELETE', '/snapshots/before');
  const back = await inSync('snapdmg');
  assert.deepEqual(back.damagedBlocks, []);
  assert.equal(await exportHash(beta.node, 'snapdmg'), await exportHash(alpha.node, 'snapdmg'));
  await api('DELETE', '/replicas', { peer: beta.address });
});
