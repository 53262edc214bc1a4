// The cluster on a real etcd (src/testing/etcd-process.ts) with real nodes: registration under a lease, cluster
// status from any node, volumes recorded by transaction with their owner and epoch; clear refusals (a bad URL,
// etcd unreachable, a node name a live node holds, a name that differs from the certificate's). The fencing by
// time with etcd paused, and with the owner itself paused, is in cluster-fencing.test.ts.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { clusterFixture, clusterStatus, roles, volumeRecord, type ClusterStatusJson as Status } from '../helpers/cluster.ts';
import { chunkdBin, freePort, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';
import { ok, stopAndCheck } from '../helpers/stream-pipe.ts';

const cluster = clusterFixture('cluster', { nodes: ['alpha', 'beta'] });
const skip = cluster.skip;

async function startMember(name: string, extra: string[] = [], env?: Record<string, string>): Promise<{ node: RunningNode; peer: string }> {
  const member = await cluster.start(name, extra, { env });
  return { node: member.node, peer: member.address };
}

test('nodes register under their lease, cluster status answers the same from any node, volumes are recorded with owner and epoch', { skip }, async () => {
  // alpha says it has 1 byte free (a test hook: every pool here shares one file system), so placement prefers beta.
  const alpha = await startMember('alpha', ['--default-volume', 'vol:64MiB'], { CHUNKD_TEST_FREE_BYTES: '1' });
  const beta = await startMember('beta');
  try {
    await ok(beta.node, 'volume', 'create', 'data', '--size', '1GiB');
    const fromAlpha = await clusterStatus(alpha.node);
    const fromBeta = await clusterStatus(beta.node);
    // The same cluster from either node (free space and the time of each record's update aside).
    const shape = (status: Status) => ({ nodes: status.nodes.map((node) => ({ ...node, freeBytes: 0, updatedAt: '' })), volumes: status.volumes });
    assert.deepEqual(shape(fromAlpha), shape(fromBeta));
    assert.equal(fromAlpha.self, 'alpha');
    assert.equal(fromBeta.lease.live, true);
    assert.deepEqual(fromAlpha.nodes.map((node) => [node.name, node.alive, node.peer, node.health, node.volumes]), [
      ['alpha', true, alpha.peer, 'ok', ['vol']],
      ['beta', true, beta.peer, 'ok', ['data']],
    ]);
    for (const node of fromAlpha.nodes) {
      assert.ok(node.capacityBytes > 0 && node.freeBytes > 0 && node.freeBytes <= node.capacityBytes);
      assert.equal(node.version, JSON.parse(fs.readFileSync(path.join(import.meta.dirname, '../../package.json'), 'utf8')).version);
    }
    assert.deepEqual(fromAlpha.volumes.map((volume) => [volume.name, volume.sizeBytes, volume.owner, volume.epoch]), [
      ['data', 1024 ** 3, 'beta', 1],
      ['vol', 64 * 1024 ** 2, 'alpha', 1],
    ]);
    // The text form names every node and volume.
    const text = await ok(alpha.node, 'cluster', 'status');
    assert.match(text, /2 of 2 nodes alive, 2 volumes/);
    assert.match(text, /^beta\tok\t127\.0\.0\.1:\d+\t.*\tdata$/m);
    assert.match(text, /^vol\t64 MiB\talpha\t1\t-$/m);

    // A volume name the cluster has is refused on another node, and not left behind there.
    const taken = await beta.node.cli('volume', 'create', 'vol', '--size', '1GiB');
    assert.equal(taken.code, 1);
    assert.match(taken.stderr, /volume vol already exists in the cluster \(owner alpha, epoch 1\)/);
    assert.equal((await beta.node.cli('volume', 'info', 'vol')).code, 1);

    // --replicas: placed on the other nodes (here the one other), the link made and its first cycle done; more
    // replicas than the cluster has other nodes is refused before anything is made.
    const placed = JSON.parse(await ok(alpha.node, 'volume', 'create', 'rep', '--size', '64MiB', '--replicas', '1', '--node', 'alpha', '--json'));
    assert.deepEqual([placed.owner, placed.replicas], ['alpha', ['beta']]);
    const [link] = JSON.parse(await ok(alpha.node, 'replica', 'status', 'rep', '--json')).replicas;
    assert.equal(link.peerName, 'beta');
    assert.match(link.lastReplicated.snapshot, /^repl-\d+$/);
    assert.deepEqual((await clusterStatus(beta.node)).volumes.find((volume) => volume.name === 'rep')?.replicas, ['beta']);
    const tooMany = await alpha.node.cli('volume', 'create', 'rep2', '--size', '64MiB', '--replicas', '2', '--node', 'alpha');
    assert.equal(tooMany.code, 1);
    assert.match(tooMany.stderr, /--replicas 2 needs 2 live, healthy node\(s\) with a peer port besides alpha; the cluster has 1 \(beta\)/);
    assert.equal((await alpha.node.cli('volume', 'info', 'rep2')).code, 1);
    assert.equal(await cluster.client.get('/chunkd/v1/volumes/rep2').string(), null);

    // Without --node, the owner is the live node with the most free space (beta: alpha reports 1 byte), asked on
    // alpha: the create is forwarded to beta, which records it under itself and places its replica on the next
    // node (alpha). --node names another owner; a node that is not live is refused, and nothing is made.
    assert.equal(await ok(alpha.node, 'volume', 'create', 'far', '--size', '16MiB', '--replicas', '1'), 'created volume far of 16 MiB on node beta, replicas on alpha\n');
    assert.deepEqual([(await volumeRecord(cluster, 'far')).owner, (await volumeRecord(cluster, 'far')).replicas], ['beta', ['alpha']]);
    assert.equal(JSON.parse(await ok(beta.node, 'volume', 'info', 'far', '--json')).sizeBytes, 16 * 1024 ** 2);
    assert.match(alpha.node.stderr(), /volume far: created on node beta \(the most free space, [\d.]+ [KMGT]iB\), asked here/);
    // Removed on its owner (its replication point first), so that beta's stop below leaves no volume of its own.
    for (const snapshot of JSON.parse(await ok(beta.node, 'snapshot', 'list', 'far', '--json'))) await ok(beta.node, 'snapshot', 'rm', 'far', snapshot.name);
    await ok(beta.node, 'volume', 'rm', 'far');
    const named = JSON.parse(await ok(beta.node, 'volume', 'create', 'near', '--size', '1MiB', '--node', 'alpha', '--json'));
    assert.equal(named.owner, 'alpha');
    assert.equal((await volumeRecord(cluster, 'near')).owner, 'alpha');
    const absent = await beta.node.cli('volume', 'create', 'nowhere', '--size', '1MiB', '--node', 'zeta');
    assert.equal(absent.code, 1);
    assert.match(absent.stderr, /node zeta is not a live member of the cluster/);
    assert.equal(await cluster.client.get('/chunkd/v1/volumes/nowhere').string(), null);
    await ok(alpha.node, 'volume', 'rm', 'near');

    // A change of owner by hand is not recorded in etcd yet: refused on a clustered node.
    const handoff = await alpha.node.cli('volume', 'handoff', 'rep', '--to', beta.peer);
    assert.equal(handoff.code, 1);
    assert.match(handoff.stderr, /chunkd volume handoff rep is refused on a node in a cluster/);
    const promote = await beta.node.cli('replica', 'promote', 'rep');
    assert.equal(promote.code, 1);
    assert.match(promote.stderr, /chunkd replica promote rep is refused on a node in a cluster/);

    // The record's epoch is the one roles.ts keeps (1: no entry), and the record is what etcd holds.
    const record = JSON.parse((await cluster.client.get('/chunkd/v1/volumes/vol').string())!);
    assert.equal(record.epoch, roles(alpha.node).vol?.epoch ?? 1);

    // A removed volume leaves the cluster's records too.
    await ok(beta.node, 'volume', 'rm', 'data');
    assert.equal(await cluster.client.get('/chunkd/v1/volumes/data').string(), null);

    // A node that stops revokes its lease: it is down at once, its volumes stay recorded under it.
    await stopAndCheck(beta.node);
    const after = await clusterStatus(alpha.node);
    assert.deepEqual(after.nodes.map((node) => [node.name, node.alive]), [['alpha', true]]);
    await stopAndCheck(alpha.node);
    const left = await cluster.client.getAll().prefix('/chunkd/v1/nodes/').keys();
    assert.deepEqual(left, []);
  } finally {
    await alpha.node.kill().catch(() => {});
    await beta.node.kill().catch(() => {});
  }
});

test('a node restarted on the same pool takes over its own registration; the same name from another pool is refused while it lives', { skip }, async () => {
  // A TTL longer than a restart takes on a loaded machine (3 s was not: the old lease expired first, and the new
  // process registered afresh), so that the new process finds its predecessor's registration still there.
  const ttl = ['--lease-ttl', '15s'];
  const alpha = await startMember('alpha', ttl);
  try {
    // kill -9: the lease lives on in etcd for its TTL, but the pool is the same, so the new process takes it over.
    await alpha.node.kill();
    const again = await startMember('alpha', ttl);
    alpha.node = again.node;
    const status = await clusterStatus(again.node);
    assert.deepEqual(status.nodes.map((node) => [node.name, node.alive]), [['alpha', true]]);
    assert.match(again.node.stderr(), /registration from a previous run of this pool was taken over/);

    const other = await runTool(process.execPath, [chunkdBin, 'serve', '--pool', path.join(cluster.scratch, 'other'), '--listen', 'none', '--api', path.join(cluster.scratch, 'other.sock'), '--etcd', cluster.etcd.endpoints, '--node-name', 'alpha']);
    assert.equal(other.code, 1, other.stderr);
    assert.match(other.stderr, /node name alpha is already registered in etcd by a live node \(pool [0-9a-f-]+, peer 127\.0\.0\.1:\d+/);
    await stopAndCheck(again.node);
  } finally {
    await alpha.node.kill().catch(() => {});
  }
});

test('clear refusals: a bad --etcd URL, etcd unreachable, --node-name missing or not the certificate\'s', { skip }, async () => {
  const serve = (...args: string[]) => runTool(process.execPath, [chunkdBin, 'serve', '--pool', path.join(cluster.scratch, 'refused'), '--listen', 'none', '--api', path.join(cluster.scratch, 'refused.sock'), ...args], { timeoutMs: 30_000 });
  const badUrl = await serve('--etcd', 'etcd.example:2379', '--node-name', 'x');
  assert.equal(badUrl.code, 2);
  assert.match(badUrl.stderr, /invalid --etcd URL "etcd\.example:2379": use http:\/\/HOST:PORT/);
  const noName = await serve('--etcd', cluster.etcd.endpoints);
  assert.equal(noName.code, 2);
  assert.match(noName.stderr, /--etcd needs --node-name NAME/);
  const shortTtl = await serve('--etcd', cluster.etcd.endpoints, '--node-name', 'x', '--lease-ttl', '1s');
  assert.equal(shortTtl.code, 2);
  assert.match(shortTtl.stderr, /invalid --lease-ttl "1s"/);
  const closed = await freePort();
  const started = Date.now();
  const unreachable = await serve('--etcd', `http://127.0.0.1:${closed}`, '--node-name', 'x');
  assert.equal(unreachable.code, 1);
  assert.match(unreachable.stderr, new RegExp(`etcd at http://127\\.0\\.0\\.1:${closed} is unreachable`));
  // Within seconds, not a retry without end (the node's start on a loaded machine takes some of them).
  assert.ok(Date.now() - started < 25_000, 'an unreachable etcd is reported within seconds');
  const mismatch = await serve('--peer-listen', `127.0.0.1:${await freePort()}`, '--tls-dir', path.join(cluster.tlsDir, 'beta'), '--etcd', cluster.etcd.endpoints, '--node-name', 'gamma');
  assert.equal(mismatch.code, 1, mismatch.stderr);
  assert.match(mismatch.stderr, /--node-name gamma differs from the name in this node's certificate \(beta/);
  // Without --etcd, cluster status says how to join one.
  const alone = await startNode(path.join(cluster.scratch, 'alone'));
  try {
    const result = await alone.cli('cluster', 'status');
    assert.equal(result.code, 1);
    assert.match(result.stderr, /this node is not in a cluster: start it with chunkd serve --etcd URL --node-name NAME/);
    const replicas = await alone.cli('volume', 'create', 'x', '--size', '1MiB', '--replicas', '1');
    assert.equal(replicas.code, 1);
    assert.match(replicas.stderr, /--replicas needs a cluster/);
    const move = await alone.cli('volume', 'move', 'x', '--to', 'beta');
    assert.equal(move.code, 1);
    assert.match(move.stderr, /chunkd volume move needs a cluster .*; without one, move a volume with chunkd volume handoff x --to HOST:PORT/);
    // volume list alone: this node's volumes, as before (no cluster's).
    assert.equal(await ok(alone, 'volume', 'list'), 'no volumes\n');
    const badCount = await alone.cli('volume', 'create', 'x', '--size', '1MiB', '--replicas', 'two');
    assert.equal(badCount.code, 2);
    assert.match(badCount.stderr, /invalid --replicas "two"/);
  } finally {
    await stopAndCheck(alone);
  }
});
