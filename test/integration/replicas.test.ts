// Replicas over the peer port, with real nodes (separate pools, loopback peer ports, mutual TLS from
// `chunkd tls init`) and real clients: a replica equals its source snapshot (nbdcopy of both exports, hashed) and
// is read-only to every client; an incremental after 1% changed sends about that much (the cycle's own count);
// replication snapshots are pruned on both sides; a stream cut by kill -9 of the receiver, then of the sender,
// resumes where the replica's durable state says and does not send again what arrived; three nodes (two replicas
// of one volume); a peer that owns a volume of that name, or a replica fed by another owner, refuses clearly.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { haveTool, makeTempDir, mustRun, runTool, stablePort, type RunningNode } from '../helpers/node-process.ts';
import { replicaLinks, startPeerNode, waitFor, type PeerNode } from '../helpers/peer-nodes.ts';
import { exportHash, ok, stopAndCheck } from '../helpers/stream-pipe.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const MiB = 1024 * 1024;
const skip = !haveTool('nbdcopy') || !haveTool('qemu-io') || !haveTool('openssl');
let scratch: string;
let tlsDir: string;

function startPeer(name: string, port: number, extra: string[] = []): Promise<PeerNode> {
  return startPeerNode(scratch, tlsDir, name, port, extra);
}

interface Cycle {
  outcome: string;
  snapshot: string;
  resumedFromBytes: number;
  streamBytes: number;
  dataBytes: number;
}

async function sync(owner: PeerNode, volume: string, peer?: PeerNode): Promise<Cycle[]> {
  const { cycles } = JSON.parse(await ok(owner.node, 'replica', 'sync', volume, '--json', ...(peer === undefined ? [] : ['--peer', peer.address])));
  return cycles;
}

function status(owner: PeerNode, volume: string): Promise<Array<Record<string, any>>> {
  return replicaLinks(owner, volume);
}

function snapshotNames(node: RunningNode, volume: string): Promise<string[]> {
  return ok(node, 'snapshot', 'list', volume, '--json').then((text) => JSON.parse(text).map((s: { name: string }) => s.name));
}

let alpha: PeerNode;
let beta: PeerNode;
let gamma: PeerNode;
const ports: Record<string, number> = {};

beforeAll(async () => {
  if (skip) return;
  scratch = makeTempDir('replicas');
  tlsDir = path.join(scratch, 'tls');
  await mustRun(process.execPath, [path.resolve(import.meta.dirname, '../../bin/chunkd.js'), 'tls', 'init', tlsDir, '--node', 'alpha', '--node', 'beta', '--node', 'gamma']);
  for (const name of ['alpha', 'beta', 'gamma']) ports[name] = await stablePort();
  alpha = await startPeer('alpha', ports.alpha!, ['--default-volume', 'vol:128MiB']);
  beta = await startPeer('beta', ports.beta!);
  gamma = await startPeer('gamma', ports.gamma!);
});

afterAll(async () => {
  if (skip) return;
  for (const peer of [alpha, beta, gamma]) await stopAndCheck(peer.node);
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('a replica equals its source snapshot, is read-only to every client, and an incremental of 1% sends about 1%', { skip }, async () => {
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('vol'), '-c', 'write -P 0x11 0 24M', '-c', 'write -P 0 32M 4M', '-c', 'write -P 0x22 100M 1M']);
  // --every 1h: only the first cycle (at add) and the syncs the test asks for run.
  await ok(alpha.node, 'replica', 'add', 'vol', '--peer', beta.address, '--every', '1h');
  await sync(alpha, 'vol');
  const [link] = await status(alpha, 'vol');
  assert.equal(link!.peerName, 'beta');
  assert.equal(link!.lastError, null);
  assert.equal(link!.bytesPending, 0);
  const point = link!.lastReplicated.snapshot as string;
  assert.match(point, /^repl-\d+$/);
  // The replica's export is its newest replicated point; it equals the source's snapshot.
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, `vol@${point}`));
  assert.equal(await exportHash(beta.node, `vol@${point}`), await exportHash(alpha.node, `vol@${point}`));

  // Read-only for NBD clients (qemu opens it read-write and is refused; a read-only open reads), and for control.
  const write = await mustRun('qemu-io', ['-f', 'raw', '-r', beta.node.qemuUri('vol'), '-c', 'read -P 0x11 0 1M']).catch((error: Error) => error.message);
  assert.match(write, /read 1048576\/1048576 bytes/);
  const refused = await beta.node.cli('snapshot', 'create', 'vol', 'mine');
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /volume vol is a read-only replica of node alpha \(epoch 1\); a snapshot is refused/);
  const readWrite = await runTool('qemu-io', ['-f', 'raw', beta.node.qemuUri('vol'), '-c', 'write -P 1 0 4k']);
  assert.notEqual(readWrite.code, 0, 'a read-write open of a replica is refused');
  const block = path.join(scratch, 'block');
  fs.writeFileSync(block, Buffer.alloc(MiB, 0x42));
  const nbdWrite = await runTool('nbdcopy', [block, beta.node.uri('vol')]);
  assert.notEqual(nbdWrite.code, 0, 'an NBD write to a replica is refused');
  assert.match(nbdWrite.stderr, /read-only|not writable|Operation not permitted|EPERM/i);

  // 1% of the volume in scattered 4 KiB writes.
  const seed = testSeed('replica incremental');
  const random = makeRandom(seed);
  const chunks = new Set<number>();
  while (chunks.size < Math.round((0.01 * 128 * MiB) / 4096)) chunks.add(randomInt(random, (128 * MiB) / 4096));
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('vol'), ...[...chunks].flatMap((chunk) => ['-c', `write -P ${1 + randomInt(random, 255)} ${chunk * 4096} 4k`])]);
  const changed = JSON.parse(await ok(alpha.node, 'snapshot', 'diff', 'vol', point, '--json')).changedBytes as number;
  assert.equal(changed, chunks.size * 4096);
  assert.equal((await status(alpha, 'vol'))[0]!.bytesPending, changed);
  const peerConnections = async (): Promise<number> => JSON.parse(await ok(beta.node, 'status', '--json')).peer.connectionsTotal;
  const connectionsBefore = await peerConnections();
  const [cycle] = await sync(alpha, 'vol');
  assert.equal(cycle!.outcome, 'incremental');
  assert.equal(cycle!.dataBytes, changed);
  const overhead = cycle!.streamBytes / changed - 1;
  console.log(`# replica incremental (seed ${seed}): ${changed} bytes changed (1% of 128 MiB), ${cycle!.streamBytes} bytes sent: ${(100 * overhead).toFixed(2)}% over`);
  assert.ok(cycle!.streamBytes >= changed && overhead < 0.02, `sent ${cycle!.streamBytes} for ${changed} changed`);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, `vol@${cycle!.snapshot}`));
  // The previous point is pruned on both sides; the new one is kept on both (the next cycle's base).
  assert.deepEqual(await snapshotNames(alpha.node, 'vol'), [cycle!.snapshot]);
  assert.deepEqual(await snapshotNames(beta.node, 'vol'), [cycle!.snapshot]);
  // Nothing changed: the next cycle sends nothing.
  const [idle] = await sync(alpha, 'vol');
  assert.equal(idle!.outcome, 'current');
  const metrics = await ok(alpha.node, 'status', '--json');
  assert.equal(JSON.parse(metrics).replication.replicas[0].peerName, 'beta');
  // The link kept its connection for those two cycles (no new one on beta's peer port)...
  assert.equal(await peerConnections(), connectionsBefore, 'the link opened a connection per cycle');
  // ...and opens a new one once its peer went away: beta restarted while the link was idle, and the next cycle runs.
  await beta.node.kill();
  beta = await startPeer('beta', ports.beta!);
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('vol'), '-c', 'write -P 0x33 8M 64k']);
  const [after] = await sync(alpha, 'vol');
  assert.equal(after!.outcome, 'incremental');
  assert.equal(after!.dataBytes, 64 * 1024);
  assert.equal((await status(alpha, 'vol'))[0]!.lastError, null);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, `vol@${after!.snapshot}`));
});

test('kill -9 of the receiver, then of the sender, mid-stream: the replica resumes and what arrived is not sent again', { skip }, async () => {
  // 96 MiB of new data, sent at 12 MiB/s: eight seconds of stream to cut into, twice.
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('vol'), '-c', 'write -P 0x5a 0 96M']);
  await ok(alpha.node, 'replica', 'remove', 'vol', '--peer', beta.address);
  await ok(alpha.node, 'replica', 'add', 'vol', '--peer', beta.address, '--every', '1h', '--max-rate', '12MiB/s');
  // The receiver makes its state durable every 32 MiB of stream: cut after that. Its state file says when (what the
  // sender has sent says less: a receiver slowed by a loaded machine can be megabytes behind it, in the sockets).
  const durableOffset = (): number => {
    try {
      return JSON.parse(fs.readFileSync(path.join(beta.node.pool, 'receive', 'vol.json'), 'utf8')).offsetBytes;
    } catch {
      return 0;
    }
  };
  await waitFor('32 MiB received and durable', async () => (durableOffset() >= 32 * MiB ? true : null), async () => JSON.stringify(await status(alpha, 'vol')), 60_000);
  await beta.node.kill();
  beta = await startPeer('beta', ports.beta!);
  // The replica is still the old point, complete, while the new one is half there.
  const interrupted = JSON.parse(await ok(beta.node, 'receive', '--resume-token', 'vol', '--json'));
  assert.ok(interrupted.offsetBytes >= 32 * MiB, `the receiver kept ${interrupted.offsetBytes} bytes`);

  // The sender next: the resumed stream (its sentBytes count from where it resumed) is cut again, once the receiver
  // has made another commit point durable.
  await waitFor('a resumed stream', async () => {
    const link = (await status(alpha, 'vol'))[0]!;
    return link.stream !== null && link.stream.resumedFromBytes === interrupted.offsetBytes ? link : null;
  }, async () => `${JSON.stringify(await status(alpha, 'vol'))}\n${alpha.node.stderr()}`);
  await waitFor('another commit point durable', async () => (durableOffset() > interrupted.offsetBytes ? true : null), async () => `${JSON.stringify(await status(alpha, 'vol'))}\n${alpha.node.stderr()}`, 60_000);
  await alpha.node.kill();
  const held = JSON.parse(await ok(beta.node, 'receive', '--resume-token', 'vol', '--json'));
  assert.ok(held.offsetBytes > interrupted.offsetBytes, `the second part moved the receive on (${interrupted.offsetBytes} -> ${held.offsetBytes})`);
  alpha = await startPeer('alpha', ports.alpha!);
  // At start the link runs at once and resumes at the offset beta holds.
  const [cycle] = await sync(alpha, 'vol');
  const log = alpha.node.stderr();
  assert.match(log, new RegExp(`resuming repl-\\d+ at byte ${held.offsetBytes}`));
  assert.ok(cycle!.outcome === 'resumed' || cycle!.outcome === 'current', cycle!.outcome);
  const [link] = await status(alpha, 'vol');
  assert.equal(link!.lastError, null);
  // This alpha sent only what beta did not hold: the rest of the 96 MiB after its offset, and a little framing.
  assert.ok(link!.streamBytesSentTotal <= 96 * MiB - held.offsetBytes + 64 * 1024, `sent ${link!.streamBytesSentTotal} after a resume at ${held.offsetBytes}`);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, `vol@${link!.lastReplicated.snapshot}`));
  assert.equal(JSON.parse(await ok(beta.node, 'status', '--json')).replication.replicaVolumes[0].owner, 'alpha');
});

test('three nodes: two replicas of one volume, each pruned only of what neither needs', { skip }, async () => {
  await ok(alpha.node, 'replica', 'add', 'vol', '--peer', gamma.address, '--every', '1h');
  await sync(alpha, 'vol', gamma);
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('vol'), '-c', 'write -P 0x77 64M 1M']);
  // Only beta moves on: gamma's base must survive on alpha.
  const [toBeta] = await sync(alpha, 'vol', beta);
  assert.equal(toBeta!.outcome, 'incremental');
  const links = await status(alpha, 'vol');
  const gammaPoint = links.find((l) => l.peer === gamma.address)!.lastReplicated.snapshot;
  assert.deepEqual((await snapshotNames(alpha.node, 'vol')).sort(), [gammaPoint, toBeta!.snapshot].sort());
  const [toGamma] = await sync(alpha, 'vol', gamma);
  assert.equal(toGamma!.outcome, 'incremental');
  assert.equal(toGamma!.dataBytes, MiB);
  const source = await exportHash(alpha.node, `vol@${toGamma!.snapshot}`);
  assert.equal(await exportHash(gamma.node, 'vol'), source);
  const [again] = await sync(alpha, 'vol', beta);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, `vol@${again!.snapshot}`));
});

test('a peer with its own volume of that name, and a replica another node owns, refuse with a clear error', { skip }, async () => {
  await ok(beta.node, 'volume', 'create', 'mine', '--size', '16MiB');
  await ok(alpha.node, 'volume', 'create', 'mine', '--size', '16MiB');
  await ok(alpha.node, 'replica', 'add', 'mine', '--peer', beta.address, '--every', '1h');
  const refused = await alpha.node.cli('replica', 'sync', 'mine');
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /node beta has a volume mine of its own; it cannot be a replica of this node's/);
  assert.match((await status(alpha, 'mine'))[0]!.lastError.message, /of its own/);
  await ok(alpha.node, 'replica', 'remove', 'mine', '--peer', beta.address);
  // gamma holds alpha's vol; gamma itself cannot replicate its own "vol" onto beta's replica of alpha.
  await ok(gamma.node, 'volume', 'create', 'other', '--size', '16MiB');
  const chained = await gamma.node.cli('replica', 'add', 'vol', '--peer', beta.address);
  assert.equal(chained.code, 1);
  assert.match(chained.stderr, /volume vol is a replica of alpha; replicate it from its owner/);
});

test('failover: the owner killed, its replica promoted; the old owner comes back fenced, is demoted, keeps its lost writes aside, and catches up', { skip }, async () => {
  await ok(alpha.node, 'volume', 'create', 'fo', '--size', '32MiB');
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('fo'), '-c', 'write -P 0x31 0 4M']);
  await ok(alpha.node, 'replica', 'add', 'fo', '--peer', beta.address, '--every', '1h');
  const [first] = await sync(alpha, 'fo');
  // A write the replica never gets: flushed on alpha, then alpha dies.
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('fo'), '-c', 'write -P 0x99 8M 1M', '-c', 'flush']);
  await alpha.node.kill();

  const promoted = JSON.parse(await ok(beta.node, 'replica', 'promote', 'fo', '--json'));
  assert.deepEqual([promoted.epoch, promoted.snapshot, promoted.previousOwner], [2, first!.snapshot, 'alpha']);
  await mustRun('qemu-io', ['-f', 'raw', beta.node.qemuUri('fo'), '-c', 'write -P 0x42 12M 1M', '-c', 'flush']);
  assert.equal((await beta.node.cli('replica', 'promote', 'fo')).code, 1, 'a volume that is not a replica is not promoted');

  // alpha restarts: before it serves, its peer tells it of epoch 2, and the volume is fenced.
  alpha = await startPeer('alpha', ports.alpha!);
  assert.match(alpha.node.stderr(), /volume fo FENCED: node beta owns it at epoch 2, this node's epoch is 1/);
  const write = await runTool('qemu-io', ['-f', 'raw', alpha.node.qemuUri('fo'), '-c', 'write -P 0x55 0 64k']);
  assert.notEqual(write.code, 0, 'a write to a fenced volume is refused');
  assert.match(write.stdout + write.stderr, /Operation not permitted|Permission denied/);
  const snapshot = await alpha.node.cli('snapshot', 'create', 'fo', 'x');
  assert.match(snapshot.stderr, /volume fo is fenced: node beta \(127\.0\.0\.1:\d+\) owns it now at epoch 2, this node's epoch 1 is over/);
  const fencedStatus = JSON.parse(await ok(alpha.node, 'status', '--json')).replication.fenced;
  assert.deepEqual(fencedStatus.map((f: { volume: string; owner: string }) => [f.volume, f.owner]), [['fo', 'beta']]);
  // Its replica link to beta is refused too: beta owns fo now.
  assert.match((await alpha.node.cli('replica', 'sync', 'fo')).stderr, /fenced/);

  const demoted = JSON.parse(await ok(alpha.node, 'replica', 'demote', 'fo', '--json'));
  assert.equal(demoted.owner, 'beta');
  assert.equal(demoted.base, first!.snapshot);
  assert.match(demoted.keptAs, /^fenced-\d+$/);
  // The write that never replicated is kept aside, readable.
  await mustRun('qemu-io', ['-f', 'raw', '-r', alpha.node.qemuUri(`fo@${demoted.keptAs}`), '-c', 'read -P 0x99 8M 1M']);
  assert.deepEqual(JSON.parse(await ok(alpha.node, 'replica', 'list', '--json')).replicas.filter((r: { volume: string }) => r.volume === 'fo'), []);

  // beta, the owner now, replicates back: an incremental from the common point.
  await ok(beta.node, 'replica', 'add', 'fo', '--peer', alpha.address, '--every', '1h');
  const [back] = await sync(beta, 'fo');
  assert.ok(back!.outcome === 'incremental' || back!.outcome === 'current', back!.outcome);
  const [link] = await status(beta, 'fo');
  assert.equal(link!.lastError, null);
  assert.equal(await exportHash(alpha.node, 'fo'), await exportHash(beta.node, `fo@${link!.lastReplicated.snapshot}`));
  await mustRun('qemu-io', ['-f', 'raw', '-r', alpha.node.qemuUri('fo'), '-c', 'read -P 0x42 12M 1M', '-c', 'read -P 0x31 0 4M', '-c', 'read -P 0 8M 1M']);

  // A replica is removed whole (its replication snapshots with it) once its owner stops feeding it; the fenced
  // snapshot kept for the operator goes too.
  await ok(beta.node, 'replica', 'remove', 'fo', '--peer', alpha.address);
  await ok(alpha.node, 'volume', 'rm', 'fo');
  assert.deepEqual(JSON.parse(await ok(alpha.node, 'status', '--json')).replication.replicaVolumes.filter((r: { volume: string }) => r.volume === 'fo'), []);
  assert.equal((await alpha.node.cli('volume', 'info', 'fo')).code, 1);
});

test('a receiver paused (SIGSTOP) past --peer-timeout fails the cycle with a clear error; resumed, the replica completes', { skip }, async () => {
  assert.equal(await alpha.node.stop(), 0);
  alpha = await startPeer('alpha', ports.alpha!, ['--peer-timeout', '2s']);
  await ok(alpha.node, 'volume', 'create', 'paused', '--size', '64MiB');
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('paused'), '-c', 'write -P 0x6b 0 32M']);
  // 32 MiB at 8 MiB/s: four seconds of stream to pause beta in.
  await ok(alpha.node, 'replica', 'add', 'paused', '--peer', beta.address, '--every', '1h', '--max-rate', '8MiB/s');
  await waitFor('8 MiB sent', async () => ((await status(alpha, 'paused'))[0]!.stream?.sentBytes ?? 0) > 8 * MiB || null);
  beta.node.process.kill('SIGSTOP');
  try {
    const failed = await waitFor('the cycle to fail', async () => (await status(alpha, 'paused'))[0]!.lastError, undefined, 20_000);
    assert.match(failed.message, /(took no stream bytes|did not answer) (for|within) 2s/);
  } finally {
    beta.node.process.kill('SIGCONT');
  }
  const [cycle] = await sync(alpha, 'paused');
  assert.ok(cycle!.outcome === 'resumed' || cycle!.outcome === 'current', cycle!.outcome);
  const [link] = await status(alpha, 'paused');
  assert.equal(link!.lastError, null);
  assert.equal(await exportHash(beta.node, 'paused'), await exportHash(alpha.node, `paused@${link!.lastReplicated.snapshot}`));
});
