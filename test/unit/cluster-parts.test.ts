// The cluster's pure parts: the lease clock's fencing by time (cluster/lease-clock.ts), the records' checks and the
// --etcd parser (cluster/records.ts), the failover's choice (cluster/failover.ts), placement (cluster/placement.ts),
// volume list's view and the move record (cluster/listing.ts, records.ts).
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { keepaliveIntervalMs, LeaseClock, leaseTiming } from '../../src/cluster/lease-clock.ts';
import { moveKey, parseEtcdEndpoints, parseMoveRecord, parseNodeRecord, parseReplicaRecord, parseVolumeRecord } from '../../src/cluster/records.ts';
import { describeVolumes } from '../../src/cluster/listing.ts';
import { chooseSuccessor, failoverWait, orphanedVolumes, pendingMoveTarget } from '../../src/cluster/failover.ts';
import { chooseOwner, chooseReplicaNodes, ownerTieBytes } from '../../src/cluster/placement.ts';
import { parseRemoteCreate } from '../../src/cluster/remote-create.ts';
import { ChunkdError } from '../../src/core/errors.ts';

test('lease clock: writes stop TTL - margin after the last confirmed renewal was sent, never later', () => {
  const timing = leaseTiming(10_000);
  assert.deepEqual(timing, { ttlMs: 10_000, marginMs: 2_000 });
  assert.equal(leaseTiming(2_000).marginMs, 500);
  assert.equal(keepaliveIntervalMs(timing), 3_333);
  const clock = new LeaseClock(timing);
  assert.equal(clock.live(0), false, 'no lease, no writes');
  assert.match(clock.refusal('vol', 0)!.message, /volume vol: writes refused: this node has no live lease in etcd/);
  clock.renewed(1_000);
  assert.equal(clock.refusal('vol', 1_000), null);
  assert.equal(clock.live(8_999), true);
  assert.equal(clock.live(9_000), false, 'at sentAt + TTL - margin');
  const refusal = clock.refusal('vol', 12_345)!;
  assert.ok(refusal instanceof ChunkdError && refusal.code === 'EPERM');
  assert.match(refusal.message, /has not renewed its etcd lease for 11\.3 s \(TTL 10 s, writes stop 2 s before it can expire\)/);
  // A confirmation that arrives late for an older send never moves the clock back.
  clock.renewed(5_000);
  clock.renewed(4_000);
  assert.equal(clock.ageMs(6_000), 1_000);
  clock.lost();
  assert.equal(clock.live(5_001), false);
});

test('records: checked when read, the key must match the name', () => {
  const volume = { name: 'vol', sizeBytes: 1024, owner: 'alpha', epoch: 2, replicas: ['beta'], createdAt: 'now' };
  assert.deepEqual(parseVolumeRecord('/chunkd/v1/volumes/vol', Buffer.from(JSON.stringify(volume))), volume);
  assert.throws(() => parseVolumeRecord('/chunkd/v1/volumes/other', Buffer.from(JSON.stringify(volume))), /does not hold a volume record/);
  assert.throws(() => parseVolumeRecord('/chunkd/v1/volumes/vol', Buffer.from(JSON.stringify({ ...volume, epoch: 0 }))), /does not hold a volume record/);
  assert.throws(() => parseVolumeRecord('/chunkd/v1/volumes/vol', Buffer.from('{')), /does not hold JSON/);
  const node = { name: 'alpha', poolId: 'p', peer: null, capacityBytes: 10, freeBytes: 5, version: '0.1.0', health: 'ok', updatedAt: 'now' };
  assert.deepEqual(parseNodeRecord('/chunkd/v1/nodes/alpha', Buffer.from(JSON.stringify(node))), node);
  assert.throws(() => parseNodeRecord('/chunkd/v1/nodes/alpha', Buffer.from(JSON.stringify({ ...node, capacityBytes: 'x' }))), /does not hold a node record/);
  const replica = { volume: 'vol', node: 'beta', owner: 'alpha', ownerEpoch: 1, point: 'repl-5', pointMs: 5 };
  assert.deepEqual(parseReplicaRecord('/chunkd/v1/replicas/vol/beta', Buffer.from(JSON.stringify(replica))), replica);
  assert.throws(() => parseReplicaRecord('/chunkd/v1/replicas/vol/gamma', Buffer.from(JSON.stringify(replica))), /does not hold a replica record/);
});

test('--etcd: http or https URLs with a port, comma-separated, one scheme; anything else is refused naming it', () => {
  assert.deepEqual(parseEtcdEndpoints('http://127.0.0.1:2379'), ['http://127.0.0.1:2379']);
  assert.deepEqual(parseEtcdEndpoints('http://a:1/,http://[::1]:2'), ['http://a:1', 'http://[::1]:2']);
  assert.throws(() => parseEtcdEndpoints(''), /--etcd needs at least one URL/);
  assert.throws(() => parseEtcdEndpoints('127.0.0.1:2379'), /invalid --etcd URL "127\.0\.0\.1:2379"/);
  assert.throws(() => parseEtcdEndpoints('http://a:1,http://b'), /invalid --etcd URL "http:\/\/b"/);
  assert.throws(() => parseEtcdEndpoints('http://a:1/v3'), /invalid --etcd URL/);
  assert.deepEqual(parseEtcdEndpoints('https://a:1,https://b:2'), ['https://a:1', 'https://b:2']);
  assert.throws(() => parseEtcdEndpoints('https://a:1,http://b:2'), /all http:\/\/ or all https:\/\/, not both/);
});

test('failover: a volume whose owner has no live lease goes to the live replica of that owner and epoch with the newest point', () => {
  const volume = (name: string, owner: string, epoch = 1) => ({ name, sizeBytes: 1, owner, epoch, replicas: [], createdAt: '' });
  const replica = (volumeName: string, node: string, pointMs: number, owner = 'alpha', ownerEpoch = 1) => ({ volume: volumeName, node, owner, ownerEpoch, point: `repl-${pointMs}`, pointMs });
  const replicas = [replica('a', 'beta', 100), replica('a', 'gamma', 200), replica('a', 'delta', 300), replica('a', 'eps', 400, 'alpha', 0), replica('b', 'beta', 5)];
  const orphans = orphanedVolumes([volume('a', 'alpha'), volume('b', 'beta'), volume('c', 'zeta')], new Set(['beta', 'gamma', 'eps']), replicas);
  // b's owner lives; a's candidates: live nodes following alpha at epoch 1 (delta is down, eps follows an older epoch).
  assert.deepEqual(orphans.map((orphan) => [orphan.volume.name, orphan.candidates.map((candidate) => candidate.node)]), [['a', ['beta', 'gamma']], ['c', []]]);
  assert.equal(chooseSuccessor(orphans[0]!.candidates)?.node, 'gamma');
  assert.equal(chooseSuccessor([]), null);
  // A replica that follows alpha since a failover but holds only an earlier owner's point (stale) is no successor.
  assert.deepEqual(orphanedVolumes([volume('a', 'alpha')], new Set(['gamma']), [{ ...replica('a', 'gamma', 900), stale: true as const }])[0]!.candidates, []);
  assert.deepEqual(parseReplicaRecord('/chunkd/v1/replicas/a/gamma', Buffer.from(JSON.stringify({ ...replica('a', 'gamma', 900), stale: true }))).stale, true);
  // A tie goes to the first name, whichever order the records came in.
  assert.equal(chooseSuccessor([replica('a', 'kappa', 7), replica('a', 'iota', 7)])?.node, 'iota');
  assert.equal(chooseSuccessor([replica('a', 'iota', 7), replica('a', 'kappa', 7)])?.node, 'iota');
});

test('failover during a move: a live target that is not a replica candidate (it took the volume, or has no point) goes first; a candidate target, a dead one, or a stale move do not hold it up', () => {
  const volume = { name: 'v', sizeBytes: 1, owner: 'alpha', epoch: 4, replicas: [], createdAt: '' };
  const replica = (node: string) => ({ volume: 'v', node, owner: 'alpha', ownerEpoch: 4, point: 'repl-5', pointMs: 5 });
  const move = (to: string, epoch = 4) => ({ volume: 'v', from: 'alpha', epoch, to, requestedBy: 'gamma', requestedAt: 'now' });
  const live = new Set(['beta', 'gamma']);
  // beta took the volume (it publishes no replica any more): gamma, the only candidate, must not take it over.
  assert.equal(pendingMoveTarget(volume, [move('beta')], live, [replica('gamma')]), 'beta');
  assert.match(describeVolumes([volume], [replica('gamma')], live, [move('beta')], 0)[0]!.waiting!, /while moving it to beta: beta records the move, or drops it, before a replica takes it over/);
  // beta is a candidate itself (still a replica), or down, or the move is from another epoch, or the owner lives: no wait.
  assert.equal(pendingMoveTarget(volume, [move('beta')], live, [replica('beta'), replica('gamma')]), null);
  assert.equal(pendingMoveTarget(volume, [move('beta')], new Set(['gamma']), [replica('gamma')]), null);
  assert.equal(pendingMoveTarget(volume, [move('beta', 3)], live, [replica('gamma')]), null);
  assert.equal(pendingMoveTarget(volume, [move('beta')], new Set(['alpha', 'beta', 'gamma']), [replica('gamma')]), null);
  assert.equal(pendingMoveTarget(volume, [], live, [replica('gamma')]), null);
});

test('failover of a synchronous volume: only a replica recorded in sync at the owner\'s epoch; with none live, the volume waits, said', () => {
  const volume = (inSync: { epoch: number; nodes: string[] } | undefined, epoch = 3) => ({ name: 'v', sizeBytes: 1, owner: 'alpha', epoch, replicas: ['beta', 'gamma'], createdAt: '', sync: true as const, ...(inSync === undefined ? {} : { inSync }) });
  const replica = (node: string) => ({ volume: 'v', node, owner: 'alpha', ownerEpoch: 3, point: 'sync', pointMs: 0, sync: true as const });
  const live = new Set(['beta', 'gamma']);
  const candidates = (record: ReturnType<typeof volume>) => orphanedVolumes([record], live, [replica('beta'), replica('gamma')])[0]!.candidates.map((candidate) => candidate.node);
  // beta sorts first, so a tie would give it the volume: out of sync, it is not a candidate at all.
  assert.deepEqual(candidates(volume({ epoch: 3, nodes: ['gamma'] })), ['gamma']);
  assert.deepEqual(candidates(volume({ epoch: 3, nodes: ['beta', 'gamma'] })), ['beta', 'gamma']);
  // A set recorded at another epoch (the previous owner's) says nothing of this one's; no set: none in sync.
  assert.deepEqual(candidates(volume({ epoch: 2, nodes: ['beta', 'gamma'] })), []);
  assert.deepEqual(candidates(volume(undefined)), []);
  // The in-sync one down: nothing is chosen, and the wait is said.
  const down = orphanedVolumes([volume({ epoch: 3, nodes: ['delta'] })], live, [replica('beta'), replica('gamma')])[0]!;
  assert.deepEqual(down.candidates, []);
  assert.match(failoverWait(down.volume, live, down.candidates)!, /no replica recorded in sync at epoch 3 is live \(in sync: delta\): it waits/);
  assert.equal(failoverWait(volume({ epoch: 3, nodes: ['beta'] }), live, [replica('beta')]), null);
  // The records: the flags checked when read.
  const record = volume({ epoch: 3, nodes: ['gamma'] });
  assert.deepEqual(parseVolumeRecord('/chunkd/v1/volumes/v', Buffer.from(JSON.stringify(record))), record);
  assert.throws(() => parseVolumeRecord('/chunkd/v1/volumes/v', Buffer.from(JSON.stringify({ ...record, inSync: { epoch: 3, nodes: 'gamma' } }))), /does not hold a volume record/);
  assert.throws(() => parseVolumeRecord('/chunkd/v1/volumes/v', Buffer.from(JSON.stringify({ ...record, sync: 'yes' }))), /does not hold a volume record/);
  assert.deepEqual(parseReplicaRecord('/chunkd/v1/replicas/v/beta', Buffer.from(JSON.stringify(replica('beta')))), replica('beta'));
});

test('placement: replicas on distinct live nodes other than the owner, with a peer port and health ok, most free space first', () => {
  const node = (name: string, freeBytes: number, peer: string | null = `${name}:1`, health = 'ok') => ({ name, poolId: name, peer, capacityBytes: 100, freeBytes, version: '', health, updatedAt: '' });
  const nodes = [node('alpha', 90), node('beta', 10), node('gamma', 50), node('delta', 50), node('eps', 99, null), node('zeta', 99, 'z:1', 'pool failed: EIO')];
  assert.deepEqual(chooseReplicaNodes(nodes, 'alpha', 2), [{ name: 'delta', peer: 'delta:1' }, { name: 'gamma', peer: 'gamma:1' }]);
  assert.deepEqual(chooseReplicaNodes(nodes, 'gamma', 1), [{ name: 'alpha', peer: 'alpha:1' }]);
  assert.deepEqual(chooseReplicaNodes(nodes, 'alpha', 0), []);
  assert.throws(() => chooseReplicaNodes(nodes, 'alpha', 4), /--replicas 4 needs 4 live, healthy node\(s\) with a peer port besides alpha; the cluster has 3 \(delta, gamma, beta\)/);
});

test('placement of the owner: the live, healthy node with the most free space; within the tie margin the node asked, else the first name; replicas on the next ones', () => {
  const GiB = 1024 ** 3;
  const node = (name: string, freeGiB: number, peer: string | null = `${name}:1`, health = 'ok') => ({ name, poolId: name, peer, capacityBytes: 1000 * GiB, freeBytes: freeGiB * GiB, version: '', health, updatedAt: '' });
  assert.equal(ownerTieBytes(10 * GiB), GiB);
  assert.equal(ownerTieBytes(500 * GiB), 10 * GiB);
  const nodes = [node('alpha', 100), node('beta', 300), node('gamma', 200), node('delta', 900, null), node('zeta', 990, 'z:1', 'pool failed: EIO')];
  // delta has no peer port (a create cannot be forwarded there), zeta is unhealthy: beta has the most.
  assert.equal(chooseOwner(nodes, 'alpha', true).name, 'beta');
  assert.equal(chooseOwner(nodes, 'gamma', true).name, 'beta');
  // The node asked qualifies without a peer port (nothing to forward), and is the only one when it cannot forward.
  assert.equal(chooseOwner(nodes, 'delta', true).name, 'delta');
  assert.equal(chooseOwner(nodes, 'alpha', false).name, 'alpha');
  // Then its replicas: the next ones by free space, never the owner.
  assert.deepEqual(chooseReplicaNodes(nodes, chooseOwner(nodes, 'alpha', true).name, 2).map((replica) => replica.name), ['gamma', 'alpha']);
  // Ties (within 2% or 1 GiB of the most): the node asked when it is among them, else the first name, in any order.
  const close = [node('kappa', 500), node('iota', 495), node('theta', 489), node('lambda', 100)];
  assert.equal(chooseOwner(close, 'lambda', true).name, 'iota');
  assert.equal(chooseOwner([...close].reverse(), 'lambda', true).name, 'iota');
  assert.equal(chooseOwner(close, 'kappa', true).name, 'kappa');
  assert.equal(chooseOwner(close, 'theta', true).name, 'iota', 'theta is 11 GiB short of the most, past the 10 GiB margin');
  assert.equal(chooseOwner([node('b', 5.5), node('a', 5)], 'c', true).name, 'a', 'small pools: 1 GiB margin');
  assert.throws(() => chooseOwner([node('zeta', 9, 'z:1', 'pool failed: EIO')], 'alpha', true), /no live, healthy node can own a new volume/);
  // The forwarded create's payload, checked at the edge.
  const request = { name: 'vol', sizeBytes: 4096, replicas: 1, sync: null };
  assert.deepEqual(parseRemoteCreate(Buffer.from(JSON.stringify(request))), request);
  assert.deepEqual(parseRemoteCreate(Buffer.from(JSON.stringify({ ...request, sync: { timeoutMs: 500 } }))).sync, { timeoutMs: 500 });
  for (const bad of [{ ...request, name: '../x' }, { ...request, sizeBytes: 0 }, { ...request, replicas: 9 }, { ...request, sync: { timeoutMs: 'x' } }]) {
    assert.throws(() => parseRemoteCreate(Buffer.from(JSON.stringify(bad))), /volumeCreate needs/);
  }
});

test('volume list: each volume with its owner\'s liveness, its replicas (named or following this owner and epoch, live or not, with their points), a move that starts from its record', () => {
  const volume = (name: string, owner: string, epoch: number, replicas: string[] = []) => ({ name, sizeBytes: 1, owner, epoch, replicas, createdAt: 't' });
  const replica = (volumeName: string, node: string, pointMs: number, owner = 'alpha', ownerEpoch = 2) => ({ volume: volumeName, node, owner, ownerEpoch, point: `repl-${pointMs}`, pointMs });
  const move = (volumeName: string, from: string, epoch: number, to: string) => ({ volume: volumeName, from, epoch, to, requestedBy: 'gamma', requestedAt: 'now' });
  const listed = describeVolumes(
    [volume('b', 'zeta', 1), volume('a', 'alpha', 2, ['delta', 'alpha'])],
    // beta follows alpha at 2; gamma an older epoch (not live, not listed: not named in the record); delta is named but publishes nothing.
    [replica('a', 'beta', 900), replica('a', 'gamma', 800, 'alpha', 1)],
    new Set(['alpha', 'beta', 'gamma']),
    [move('a', 'alpha', 2, 'beta'), move('b', 'zeta', 3, 'alpha')],
    1_000,
  );
  assert.deepEqual(listed, [
    { name: 'a', sizeBytes: 1, owner: 'alpha', ownerAlive: true, epoch: 2, createdAt: 't', replicas: [{ node: 'beta', live: true, point: 'repl-900', pointAgeMs: 100 }, { node: 'delta', live: false, point: null, pointAgeMs: null }], move: { to: 'beta', requestedBy: 'gamma', requestedAt: 'now' }, sync: false, inSync: null, waiting: null },
    // A move from another epoch is stale: not shown. Its owner is down and no replica can take it over: said.
    { name: 'b', sizeBytes: 1, owner: 'zeta', ownerAlive: false, epoch: 1, createdAt: 't', replicas: [], move: null, sync: false, inSync: null, waiting: 'its owner zeta has no live lease and no live replica follows it at epoch 1' },
  ]);
  const record = { volume: 'a', from: 'alpha', epoch: 2, to: 'beta', requestedBy: 'gamma', requestedAt: 'now' };
  assert.deepEqual(parseMoveRecord(moveKey('a'), Buffer.from(JSON.stringify(record))), record);
  assert.throws(() => parseMoveRecord(moveKey('b'), Buffer.from(JSON.stringify(record))), /does not hold a move record/);
  assert.throws(() => parseMoveRecord(moveKey('a'), Buffer.from(JSON.stringify({ ...record, to: 'alpha' }))), /does not hold a move record/);
});
