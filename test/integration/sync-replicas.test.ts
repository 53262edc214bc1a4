// Synchronous replicas (replication/sync-replicas.ts) with two real nodes on loopback peer ports (mutual TLS from
// `chunkd tls init`) and real NBD clients: a write is on the replica when the client has its answer (both exports
// hashed by nbdcopy, no replication step between), and durable there after a flush; a replica that is stopped
// (SIGSTOP) or killed (kill -9) is out of sync after the timeout, writes go on, and only the regions written
// meanwhile are resent (counted) when it is back; the dirty map and the activity log survive kill -9 of the
// owner, and only what they list is resent; an owner with a stale epoch is refused by the replica and refuses
// writes itself; a write from an owner's older connection (its session) is refused; snapshots, resizes and
// rollbacks reach the replica (a snapshot at the same point of the write stream), and those it missed (taken or
// removed while it was away) reach it at its resync, with the owner's ids and content; a resync compares chunk
// checksums and sends what differs (1% changed: 1% sent), at a rate cap, and ends under steady writes; a client
// write to a region a resync has copied goes to the resyncing replica; a block damaged on the owner is read from
// the replica and rewritten (repair on read); volume set --sync on|off (a failed off leaves no repl- point); a
// rollback, a shrink and a delete go through while a resync runs; fio verifies its writes on both copies after the
// replica was killed and restarted under them; a damaged block a resync reads is repaired from another in-sync
// replica (a third node, gamma).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { haveTool, makeTempDir, mustRun, runTool, stablePort, type RunningNode } from '../helpers/node-process.ts';
import { replicaLinks, startPeerNode, waitFor, type PeerNode } from '../helpers/peer-nodes.ts';
import { callApi } from '../../src/cli/api-client.ts';
import { PeerClient } from '../../src/peer/client.ts';
import { loadCredentials } from '../../src/peer/credentials.ts';
import { PeerVerb } from '../../src/peer/protocol.ts';
import { jsonPayload } from '../../src/replication/peer-messages.ts';
import { encodeSyncWrite, parseSyncOpenReply, SyncOp } from '../../src/replication/sync-messages.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';
import { exportHash, ok, stopAndCheck } from '../helpers/stream-pipe.ts';
import { flipByteUnder, namedBlock } from '../helpers/damage.ts';

const MiB = 1024 * 1024;
const regionBytes = 64 * 1024;
// Sync timeouts. A write the replica does not answer in time puts its link out of sync, which the tests below only
// want where they stop the replica (SIGSTOP) and wait the timeout out: there 3 s, a wait each such test pays; links
// that must stay in sync get 10 s, so that a loaded machine (CI) does not turn a slow answer into a resync.
const waitedTimeoutMs = 3_000;
const linkTimeoutMs = 10_000;
const skip = !haveTool('nbdcopy') || !haveTool('qemu-io') || !haveTool('openssl');
let scratch: string;
let tlsDir: string;

function startPeer(name: string, port: number, extra: string[] = []): Promise<PeerNode> {
  return startPeerNode(scratch, tlsDir, name, port, extra);
}

/** The owner's synchronous link of `volume`. */
async function link(owner: PeerNode, volume = 'vol'): Promise<Record<string, any>> {
  const links = await replicaLinks(owner, volume);
  const found = links.find((r) => r.mode === 'sync');
  assert.ok(found !== undefined, `no synchronous link of ${volume}: ${JSON.stringify(links)}`);
  return found;
}

function inSync(owner: PeerNode): Promise<Record<string, any>> {
  return waitFor('the replica in sync', async () => {
    const current = await link(owner);
    return current.state === 'in-sync' ? current : null;
  }, async () => `${JSON.stringify(await link(owner))}\n${owner.node.stderr()}`, 60_000);
}

function qemuIo(node: RunningNode, ...commands: string[]): Promise<string> {
  return mustRun('qemu-io', ['-f', 'raw', node.qemuUri('vol'), ...commands.flatMap((command) => ['-c', command])]);
}

let alpha: PeerNode;
let beta: PeerNode;
const ports: Record<string, number> = {};

beforeAll(async () => {
  if (skip) return;
  scratch = makeTempDir('sync-replicas');
  tlsDir = path.join(scratch, 'tls');
  await mustRun(process.execPath, [path.resolve(import.meta.dirname, '../../bin/chunkd.js'), 'tls', 'init', tlsDir, '--node', 'alpha', '--node', 'beta', '--node', 'gamma']);
  for (const name of ['alpha', 'beta', 'gamma']) ports[name] = await stablePort();
  alpha = await startPeer('alpha', ports.alpha!, ['--default-volume', 'vol:32MiB']);
  beta = await startPeer('beta', ports.beta!);
});

afterAll(async () => {
  if (skip) return;
  beta.node.process.kill('SIGCONT');
  for (const peer of [alpha, beta]) await stopAndCheck(peer.node);
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('an acknowledged write is on the synchronous replica, and durable there after a flush', { skip }, async () => {
  await qemuIo(alpha.node, 'write -P 0x11 0 4M', 'write -P 0x12 20M 1M');
  const added = JSON.parse(await ok(alpha.node, 'replica', 'add', 'vol', '--peer', beta.address, '--sync', '--sync-timeout', `${waitedTimeoutMs / 1000}s`, '--json'));
  assert.equal(added.mode, 'sync');
  const first = await inSync(alpha);
  assert.equal(first.peerName, 'beta');
  // The first resync sends the data, not the holes: 5 MiB of 32.
  assert.equal(first.resyncBytesTotal, 5 * MiB);
  assert.equal(first.dirtyBytes, 0);

  // Writes, a trim and write zeroes, each answered to the client only once beta has it: right after the client's
  // last answer, both exports read the same, with no replication step between.
  await qemuIo(alpha.node, 'write -P 0x21 1M 1M', 'write -P 0x22 8M 3M', 'write -P 0x23 12345 4567', 'write -z 2M 512k', 'discard 20M 256k', 'write -P 0x24 -f 30M 64k');
  const owner = await exportHash(alpha.node, 'vol');
  assert.equal(await exportHash(beta.node, 'vol'), owner);
  const now = await link(alpha);
  assert.equal(now.state, 'in-sync');
  assert.equal(now.resyncBytesTotal, 5 * MiB, 'no resync was needed');

  // The replica's export is read-only.
  const write = await runTool('qemu-io', ['-f', 'raw', beta.node.qemuUri('vol'), '-c', 'write -P 1 0 4k']);
  assert.notEqual(write.code, 0, 'a write to a synchronous replica is refused');

  // qemu-io flushed before it exited: kill -9 of beta (alpha stopped first, so nothing resyncs) keeps it all.
  assert.equal(await alpha.node.stop(), 0);
  await beta.node.kill();
  beta = await startPeer('beta', ports.beta!);
  assert.equal(await exportHash(beta.node, 'vol'), owner);
  alpha = await startPeer('alpha', ports.alpha!);
  const back = await inSync(alpha);
  assert.equal(back.dirtyBytes, 0);
});

test('a block damaged on the owner: the client reads the right bytes from the in-sync replica, the block is rewritten, the repair counted', { skip }, async () => {
  const at = 16 * MiB;
  const blocks = [namedBlock('sync repair', 0), namedBlock('sync repair', 1)];
  const client = await TestNbdClient.connect(alpha.node.nbdSocket, 'vol');
  let before = 0;
  try {
    await client.write(at, Buffer.concat(blocks));
    await client.flush();
    await inSync(alpha);
    before = (await link(alpha)).readRepairsTotal;
    flipByteUnder(alpha.node.pool, blocks[0]!);
    // Across both blocks and not aligned to them: the damaged one comes from beta, the other from alpha.
    const read = await client.read(at + 512, 6 * 1024);
    assert.ok(read.equals(Buffer.concat(blocks).subarray(512, 512 + 6 * 1024)), 'the client reads the bytes it wrote');
    assert.equal((await link(alpha)).readRepairsTotal, before + 1);
    assert.match(alpha.node.stderr(), /the block at byte 16777216 failed its checksum here; repaired from the synchronous replica on .* \(beta\)/);
    const metrics = await runTool('curl', ['-s', '--unix-socket', alpha.node.apiSocket, 'http://chunkd/metrics']);
    assert.match(metrics.stdout, new RegExp(`chunkd_sync_replica_read_repairs_total\\{volume="vol",peer="${beta.address}"\\} ${before + 1}`));
    assert.match(metrics.stdout, /chunkd_checksum_errors_total [1-9]/);
    // Rewritten here: read again, nothing to repair.
    assert.ok((await client.read(at, 8 * 1024)).equals(Buffer.concat(blocks)));
    assert.equal((await link(alpha)).readRepairsTotal, before + 1);
  } finally {
    await client.disconnect();
  }
  // chunkd scrub on the owner repairs a damaged block from the replica too (the other block, damaged now), and
  // verifies the replica by its recorded checksums; the pool is clean after it.
  flipByteUnder(alpha.node.pool, blocks[1]!);
  const scrub = await alpha.node.cli('scrub', 'vol');
  assert.equal(scrub.code, 0, scrub.stderr);
  assert.match(scrub.stdout, new RegExp(`^repaired from a synchronous replica: vol offset ${at + 4096} length 4096$`, 'm'));
  assert.match(scrub.stdout, /^synchronous replica beta \(127\.0\.0\.1:\d+\): 32 MiB compared by checksum, the same$/m);
  assert.match(scrub.stdout, /no damage found/);
  assert.equal((await link(alpha)).readRepairsTotal, before + 2);
  assert.match((await alpha.node.cli('scrub', 'vol')).stdout, /no damage found/);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, 'vol'));
});

test('a stopped, then killed, replica: writes go on after the timeout, and only the regions written meanwhile are resent', { skip }, async (t) => {
  // Two flushes with nothing written empty the activity log: what is resent below is exactly what was written.
  await qemuIo(alpha.node, 'flush', 'flush');
  const before = await link(alpha);

  beta.node.process.kill('SIGSTOP');
  t.onTestFinished(() => {
    beta.node.process.kill('SIGCONT');
  });
  const started = Date.now();
  await qemuIo(alpha.node, 'write -P 0x31 4M 1M', 'write -P 0x32 16M 512k');
  const waited = Date.now() - started;
  const away = await link(alpha);
  assert.equal(away.state, 'out-of-sync');
  assert.equal(away.outOfSyncTotal, 1);
  // A lower bound only: the write's deadline is set after `started` (timers may fire a millisecond early).
  assert.ok(waited >= waitedTimeoutMs - 100, `the first write waited for the ${waitedTimeoutMs} ms timeout (${waited} ms)`);
  assert.match(alpha.node.stderr(), new RegExp(`synchronous replica on 127\\.0\\.0\\.1:\\d+ is out of sync, writes go on without it: the synchronous replica on 127\\.0\\.0\\.1:\\d+ did not answer within ${waitedTimeoutMs} ms`));
  assert.equal(away.dirtyBytes, 1.5 * MiB);
  const metrics = await ok(alpha.node, 'status', '--json');
  assert.equal(JSON.parse(metrics).replication.syncReplicas[0].state, 'out-of-sync');
  const scrape = (await runTool('curl', ['-s', '--unix-socket', alpha.node.apiSocket, 'http://chunkd/metrics'])).stdout;
  assert.match(scrape, /^chunkd_sync_replica_in_sync\{volume="vol",peer="127\.0\.0\.1:\d+"\} 0$/m);
  assert.match(scrape, /^chunkd_sync_replica_dirty_bytes\{volume="vol",peer="127\.0\.0\.1:\d+"\} 1572864$/m);
  assert.match(scrape, /^chunkd_sync_replica_out_of_sync_total\{volume="vol",peer="127\.0\.0\.1:\d+"\} 1$/m);
  const text = await ok(alpha.node, 'replica', 'status', 'vol');
  assert.match(text, /vol -> beta at 127\.0\.0\.1:\d+: synchronous, out-of-sync, 1\.50 MiB dirty/);

  beta.node.process.kill('SIGCONT');
  const resynced = await inSync(alpha);
  // Only the dirty regions are compared, and sent where their checksums differ: the write that timed out may have
  // reached beta after all (it waited in its socket, before the resync's syncOpen shut that connection out), the
  // one after it never did.
  const sent = resynced.resyncBytesTotal - before.resyncBytesTotal;
  assert.equal(sent + resynced.resyncEqualBytesTotal - before.resyncEqualBytesTotal, 1.5 * MiB, 'only the dirty regions are resent');
  assert.ok(sent >= 0.5 * MiB, `the write beta never had was sent (${sent} bytes)`);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, 'vol'));

  // kill -9: the connection drops, so the next write goes on at once; beta comes back on the same port.
  await qemuIo(alpha.node, 'flush', 'flush');
  await beta.node.kill();
  await qemuIo(alpha.node, 'write -P 0x41 24M 256k', 'write -P 0x42 100000 1000');
  const gone = await link(alpha);
  assert.equal(gone.state, 'out-of-sync');
  assert.equal(gone.dirtyBytes, 256 * 1024 + regionBytes);
  beta = await startPeer('beta', ports.beta!);
  const again = await inSync(alpha);
  // The dirty regions compared: of the 64 KiB region that 1000 bytes changed, only their 4 KiB chunk is sent.
  assert.equal(again.resyncBytesTotal - resynced.resyncBytesTotal, 256 * 1024 + 4096);
  assert.equal(again.resyncEqualBytesTotal - resynced.resyncEqualBytesTotal, regionBytes - 4096);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, 'vol'));
});

test('kill -9 of the owner, with the replica away and in sync: the dirty map and the activity log survive, and only they are resent', { skip }, async (t) => {
  await qemuIo(alpha.node, 'flush', 'flush');
  beta.node.process.kill('SIGSTOP');
  t.onTestFinished(() => {
    beta.node.process.kill('SIGCONT');
  });
  await qemuIo(alpha.node, 'write -P 0x51 6M 2M');
  assert.equal((await link(alpha)).dirtyBytes, 2 * MiB);
  await alpha.node.kill();
  alpha = await startPeer('alpha', ports.alpha!);
  // The dirty map as it was, and the activity log's extent of that write (4M-8M, whose data is 4M-5M and 6M-8M).
  const loaded = await link(alpha);
  assert.notEqual(loaded.state, 'in-sync');
  assert.equal(loaded.dirtyBytes, 4 * MiB);
  beta.node.process.kill('SIGCONT');
  const back = await inSync(alpha);
  // Those 4 MiB compared, and sent where they differ (the write may have reached beta before alpha died).
  assert.equal(back.resyncBytesTotal + back.resyncEqualBytesTotal, 4 * MiB);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, 'vol'));

  // In sync this time: the 4 MiB extents written since the flush before last are in the activity log, which the
  // owner makes durable before it writes them, and compares after a crash (a write may be on one side only): here
  // the extent 8M-12M, all the same on beta, which had the write: nothing is sent.
  await qemuIo(alpha.node, 'write -P 0x52 10M 1M');
  await alpha.node.kill();
  alpha = await startPeer('alpha', ports.alpha!);
  // (beta is up: the resync of those 4 MiB may end before a status is read, so the dirty map is not read here; the
  // resync's totals below say what it compared.)
  const after = await inSync(alpha);
  assert.deepEqual([after.resyncBytesTotal, after.resyncEqualBytesTotal], [0, 4 * MiB]);
  assert.equal(await exportHash(beta.node, 'vol'), await exportHash(alpha.node, 'vol'));
});

test('an owner with a stale epoch is refused by the replica, and refuses writes', { skip }, async () => {
  // Another node has owned vol at epoch 2 as far as beta knows (what a promotion or a handoff leaves there).
  await stopAndCheck(beta.node);
  const rolesFile = path.join(beta.node.pool, 'replication', 'roles.json');
  const roles = JSON.parse(fs.readFileSync(rolesFile, 'utf8'));
  assert.deepEqual(roles.volumes.vol, { role: 'replica', owner: 'alpha', epoch: 1, sync: true });
  roles.volumes.vol.epoch = 2;
  fs.writeFileSync(rolesFile, JSON.stringify(roles));
  beta = await startPeer('beta', ports.beta!);
  await waitFor('alpha fenced', async () => (/writes refused: a synchronous replica refused this node as its owner/.test(alpha.node.stderr()) ? true : null), async () => alpha.node.stderr());
  assert.match(beta.node.stderr(), /refused a synchronous write to vol from alpha at epoch 1: the replica follows alpha at epoch 2/);
  const write = await runTool('qemu-io', ['-f', 'raw', alpha.node.qemuUri('vol'), '-c', 'write -P 0x61 0 4k']);
  assert.notEqual(write.code, 0, 'a stale owner refuses writes');
  assert.match(write.stdout + write.stderr, /Operation not permitted/);
  // Removing the link is the way out for this owner (the replica is another owner's now).
  await ok(alpha.node, 'replica', 'remove', 'vol', '--peer', beta.address);
  await qemuIo(alpha.node, 'write -P 0x61 0 4k');
});

test('a replica takes writes only from the session of the newest syncOpen: an older connection\'s are refused', { skip }, async () => {
  // As alpha (its client pair), at the epoch beta now follows: two connections, the first one left behind.
  const connect = (): Promise<PeerClient> => PeerClient.connect({ host: '127.0.0.1', port: ports.beta!, credentials: loadCredentials(path.join(tlsDir, 'alpha'), 'client') });
  const [older, newer] = [await connect(), await connect()];
  try {
    const open = jsonPayload({ volume: 'vol', epoch: 2, sizeBytes: 32 * MiB });
    const first = parseSyncOpenReply(await older.request(PeerVerb.syncOpen, open));
    const second = parseSyncOpenReply(await newer.request(PeerVerb.syncOpen, open));
    assert.notEqual(first, second);
    const write = (session: number): Buffer[] => encodeSyncWrite({ op: SyncOp.write, fua: false, noHole: false, volume: 'vol', epoch: 2, session, offsetBytes: 0, lengthBytes: 4096, data: Buffer.alloc(4096, 0x71) });
    await assert.rejects(older.request(PeerVerb.syncWrite, write(first)), /a synchronous write to vol from an older connection of alpha \(session \d+\) is refused/);
    await newer.request(PeerVerb.syncWrite, write(second));
    await assert.rejects(newer.request(PeerVerb.syncWrite, encodeSyncWrite({ op: SyncOp.trim, fua: false, noHole: false, volume: 'vol', epoch: 1, session: second, offsetBytes: 0, lengthBytes: 4096, data: null })), /^ChunkdError: fenced: alpha writes vol at ownership epoch 1/);
    // A repair read (syncRead) is held to the same rules, and to the volume's end.
    const read = (session: number, offsetBytes: number, epoch = 2): Buffer => jsonPayload({ volume: 'vol', epoch, session, offsetBytes, lengthBytes: 4096 });
    assert.ok((await newer.request(PeerVerb.syncRead, read(second, 0))).equals(Buffer.alloc(4096, 0x71)));
    await assert.rejects(older.request(PeerVerb.syncRead, read(first, 0)), /from an older connection of alpha/);
    await assert.rejects(newer.request(PeerVerb.syncRead, read(second, 0, 1)), /^ChunkdError: fenced: alpha writes vol at ownership epoch 1/);
    await assert.rejects(newer.request(PeerVerb.syncRead, read(second, 32 * MiB - 2048)), /a synchronous read of vol at 33552384 \(4096 bytes\) ends past its 33554432 bytes/);
    await assert.rejects(newer.request(PeerVerb.syncRead, jsonPayload({ volume: 'vol', epoch: 2, session: second, offsetBytes: 0, lengthBytes: 1 << 20 })), /syncRead needs lengthBytes, 1 to 65536/);
  } finally {
    older.close();
    newer.close();
  }
  await mustRun('qemu-io', ['-f', 'raw', '-r', beta.node.qemuUri('vol'), '-c', 'read -P 0x71 0 4k']);
});

test('snapshots, a resize and a rollback reach the synchronous replica, at the same point of the write stream', { skip }, async () => {
  // Through the API (a CLI process per call would take most of this test's time).
  const api = (node: RunningNode, method: string, route: string, body?: unknown): Promise<any> => callApi(node.apiSocket, method, `/v1/volumes/sv${route}`, body);
  const io = (node: RunningNode, ...commands: string[]): Promise<string> => mustRun('qemu-io', ['-f', 'raw', node.qemuUri('sv'), ...commands.flatMap((command) => ['-c', command])]);
  const snapshots = async (node: RunningNode): Promise<Array<[string, string]>> => (await api(node, 'GET', '/snapshots')).snapshots.map((s: { name: string; uuid: string }) => [s.name, s.uuid]);
  const sizeOf = async (node: RunningNode): Promise<number> => (await api(node, 'GET', '')).sizeBytes;
  const same = async (name = 'sv'): Promise<void> => assert.equal(await exportHash(beta.node, name), await exportHash(alpha.node, name), `${name} differs on the replica`);
  const svLink = (): Promise<Record<string, any>> => link(alpha, 'sv');
  const svInSync = (): Promise<Record<string, any>> => waitFor('sv in sync', async () => {
    const current = await svLink();
    return current.state === 'in-sync' ? current : null;
  }, async () => `${JSON.stringify(await svLink())}\n${alpha.node.stderr()}`, 60_000);
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'sv', sizeBytes: 8 * MiB });
  await io(alpha.node, 'write -P 0x11 0 1M');
  await api(alpha.node, 'POST', '/replicas', { peer: beta.address, sync: true, timeoutMs: linkTimeoutMs });
  await svInSync();

  // A snapshot taken while a client writes: the same writes in it on both nodes, with the owner's id.
  const writing = io(alpha.node, ...Array.from({ length: 200 }, (_, i) => `write -P ${(i % 250) + 1} ${((i * 17) % 2048) * 4096} 4k`));
  await new Promise((resolve) => setTimeout(resolve, 200));
  const { uuid } = await api(alpha.node, 'POST', '/snapshots', { name: 's1' });
  await writing;
  assert.deepEqual(await snapshots(beta.node), [['s1', uuid]]);
  await same('sv@s1');
  await same();

  // A grow reaches the replica; written past the old end, both read the same.
  await api(alpha.node, 'PATCH', '', { sizeBytes: 12 * MiB });
  assert.equal(await sizeOf(beta.node), 12 * MiB);
  await io(alpha.node, 'write -P 0x22 10M 1M');
  await same();

  // Rolled back on both (and to the snapshot's 8 MiB).
  await api(alpha.node, 'POST', '/snapshots/s1/rollback');
  assert.equal(await sizeOf(beta.node), 8 * MiB);
  await same();
  assert.equal(await exportHash(alpha.node, 'sv'), await exportHash(alpha.node, 'sv@s1'));
  assert.equal((await svLink()).state, 'in-sync');

  // Snapshots taken while the replica is away (one smaller than the volume, which grew since), and one removed
  // meanwhile: its resync gives it the same snapshots as the owner's, with their ids and content (s2: the 256 KiB
  // written before it; s3: the 1 MiB past s2's end; the volume: the 64 KiB written after s3, and nothing more).
  await beta.node.kill();
  await io(alpha.node, 'write -P 0x33 2M 256k');
  await api(alpha.node, 'POST', '/snapshots', { name: 's2' });
  await api(alpha.node, 'PATCH', '', { sizeBytes: 12 * MiB });
  await io(alpha.node, 'write -P 0x34 9M 1M');
  await api(alpha.node, 'POST', '/snapshots', { name: 's3' });
  await api(alpha.node, 'DELETE', '/snapshots/s1');
  await io(alpha.node, 'write -P 0x35 0 64k');
  const away = await svLink();
  beta = await startPeer('beta', ports.beta!);
  const back = await svInSync();
  assert.deepEqual(await snapshots(beta.node), await snapshots(alpha.node));
  assert.deepEqual((await snapshots(beta.node)).map(([name]) => name), ['s2', 's3']);
  assert.equal(await sizeOf(beta.node), 12 * MiB);
  await same('sv@s2');
  await same('sv@s3');
  await same();
  assert.equal(back.resyncBytesTotal - away.resyncBytesTotal, 256 * 1024 + 1 * MiB + 64 * 1024);
  assert.match(alpha.node.stderr(), /volume sv: snapshot s3 given to the synchronous replica on \S+, which was not in sync when it was taken \(1 MiB sent\)/);

  // A rollback to one of them is now a rollback on both, in sync.
  await io(alpha.node, 'write -P 0x44 0 1M');
  await api(alpha.node, 'POST', '/snapshots/s2/rollback');
  assert.equal(await sizeOf(beta.node), 8 * MiB);
  const after = await svLink();
  assert.deepEqual([after.state, after.outOfSyncTotal], ['in-sync', back.outOfSyncTotal]);
  await same();

  // A shrink reaches it too, and a snapshot removed goes from the replica as well.
  await api(alpha.node, 'PATCH', '', { sizeBytes: 4 * MiB, force: true });
  assert.equal(await sizeOf(beta.node), 4 * MiB);
  await same();
  await api(alpha.node, 'DELETE', '/snapshots/s3');
  assert.deepEqual(await snapshots(beta.node), await snapshots(alpha.node));
  assert.deepEqual((await snapshots(alpha.node)).map(([name]) => name), ['s2']);
});

test('a link added back to a replica that holds the data sends only the chunks that changed; --max-rate caps a resync; a resync under steady writes ends', { skip }, async (t) => {
  const api = (method: string, route: string, body?: unknown): Promise<any> => callApi(alpha.node.apiSocket, method, `/v1/volumes/lost${route}`, body);
  const current = (): Promise<Record<string, any>> => link(alpha, 'lost');
  const lostInSync = (): Promise<Record<string, any>> => waitFor('lost in sync', async () => {
    const now = await current();
    return now.state === 'in-sync' ? now : null;
  }, async () => `${JSON.stringify(await current())}\n${alpha.node.stderr()}`, 60_000);
  const add = (maxRateBytesPerSecond: number | null = null): Promise<any> => api('POST', '/replicas', { peer: beta.address, sync: true, timeoutMs: linkTimeoutMs, maxRateBytesPerSecond });
  const remove = (): Promise<any> => api('DELETE', '/replicas', { peer: beta.address });
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'lost', sizeBytes: 16 * MiB });
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('lost'), '-c', 'write -P 0x55 0 8M']);

  // The first copy at 8 MiB/s at most: its 8 MiB take about a second (unthrottled, a tenth of that here).
  assert.equal((await add(8 * MiB)).maxRateBytesPerSecond, 8 * MiB);
  const first = await lostInSync();
  assert.equal(first.resyncBytesTotal, 8 * MiB);
  const said = await waitFor('the resync logged', async () => /volume lost: synchronous replica on \S+ \(beta\) is in sync: resync sent [\d.]+ MiB in ([\d.]+) s/.exec(alpha.node.stderr()), async () => alpha.node.stderr());
  const seconds = Number(said[1]);
  // A lower bound a correct limiter cannot miss on any machine: every byte sent is paid before the resync ends
  // (RateLimiter.settle), so 8 MiB take at least 1 s less the limiter's 50 ms burst; no upper bound (a loaded
  // machine is slower, not faster).
  assert.ok(seconds >= 0.85, `8 MiB at 8 MiB/s took ${seconds} s`);

  // Removed (beta keeps its copy), 1% of the volume written (40 chunks of 4 KiB here and there), added back: every
  // region is dirty to the new link, as after a failover, and only the 160 KiB that changed travel.
  await remove();
  const client = await TestNbdClient.connect(alpha.node.nbdSocket, 'lost');
  for (let i = 0; i < 40; i++) await client.write(((i * 97) % 4096) * 4096, Buffer.alloc(4096, i + 1));
  await client.flush();
  await add();
  const again = await lostInSync();
  assert.equal(again.resyncBytesTotal, 40 * 4096);
  assert.equal(again.resyncEqualBytesTotal, 16 * MiB - 40 * 4096);
  assert.equal(await exportHash(beta.node, 'lost'), await exportHash(alpha.node, 'lost'));
  process.stderr.write(`# sync-replicas: 1% of 16 MiB changed: resync sent ${again.resyncBytesTotal} bytes of data, compared ${again.resyncEqualBytesTotal} bytes equal\n`);

  // Added back while a client writes without a pause to the first 2 MiB, about as fast as the resync may copy
  // (capped at 1 MiB/s, 256 chunks a second): the resync ends within 4 passes (what a pass leaves, at most 32
  // regions here, is copied under the write lock; the rule before, passes until one left nothing, took more here
  // and could run on for as long as the writes did), and the copies are the same once the writes stop.
  await remove();
  let writing = true;
  let written = 0;
  t.onTestFinished(() => {
    writing = false;
  });
  const writer = (async () => {
    while (writing) {
      await client.write(((written * 613) % 512) * 4096, Buffer.alloc(4096, (written % 200) + 20));
      written += 1;
    }
  })();
  await new Promise((resolve) => setTimeout(resolve, 100));
  const atAdd = written;
  await add(1 * MiB);
  await lostInSync();
  const during = written - atAdd;
  writing = false;
  await writer;
  await client.disconnect();
  assert.ok(during > 0, 'writes went on through the resync');
  await waitFor('the resync logged', async () => (alpha.node.stderr().match(/volume lost: synchronous replica on \S+ \(beta\) is in sync: resync sent [\d.]+ \w+ in [\d.]+ s \([1-4] pass(es)?; /g)?.length === 3 ? true : null), async () => alpha.node.stderr());
  process.stderr.write(`# sync-replicas: ${during} writes during the resync under steady writes\n`);
  assert.equal(await exportHash(beta.node, 'lost'), await exportHash(alpha.node, 'lost'));
});

test('a client write to a region the resync has copied goes to the resyncing replica, and is not copied again', { skip }, async () => {
  const api = (method: string, route: string, body?: unknown): Promise<any> => callApi(alpha.node.apiSocket, method, `/v1/volumes/fw${route}`, body);
  const fwLink = async (): Promise<Record<string, any>> => (await replicaLinks(alpha, 'fw'))[0]!;
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'fw', sizeBytes: 4 * MiB });
  await mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('fw'), '-c', 'write -P 0x71 0 4M']);
  // At 2 MiB/s the first resync takes about 2 s, copying the regions in order: the first is soon copied.
  await api('POST', '/replicas', { peer: beta.address, sync: true, timeoutMs: linkTimeoutMs, maxRateBytesPerSecond: 2 * MiB });
  await waitFor('the first regions copied', async () => ((await fwLink()).resync?.copiedBytes >= 512 * 1024 ? true : null), async () => JSON.stringify(await fwLink()), 30_000);
  const client = await TestNbdClient.connect(alpha.node.nbdSocket, 'fw');
  await client.write(4096, Buffer.alloc(4096, 0x72));
  await client.flush();
  await client.disconnect();
  const done = await waitFor('fw in sync', async () => {
    const now = await fwLink();
    return now.state === 'in-sync' ? now : null;
  }, async () => JSON.stringify(await fwLink()), 60_000);
  // Sent to beta as it was written: the resync sent the volume's 4 MiB once, and not that chunk again.
  assert.equal(done.resyncBytesTotal, 4 * MiB);
  assert.equal(done.outOfSyncTotal, 0);
  assert.equal(await exportHash(beta.node, 'fw'), await exportHash(alpha.node, 'fw'));
  await api('DELETE', '/replicas', { peer: beta.address });
});

test('volume set --sync on|off: an asynchronous replica becomes synchronous (only what differs is sent), and asynchronous again from a point both hold', { skip }, async (t) => {
  const api = (method: string, route: string, body?: unknown): Promise<any> => callApi(alpha.node.apiSocket, method, `/v1/volumes/sw${route}`, body);
  const io = (...commands: string[]): Promise<string> => mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('sw'), ...commands.flatMap((command) => ['-c', command])]);
  const swLink = async (): Promise<Record<string, any>> => (await replicaLinks(alpha, 'sw'))[0]!;
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'sw', sizeBytes: 4 * MiB });
  // Errors through the API (the CLI's are its words), the changes through the CLI.
  await assert.rejects(api('PATCH', '', { sync: true }), /volume sw has no replicas to make synchronous: add one \(chunkd replica add sw --peer HOST:PORT --sync\)/);
  await assert.rejects(api('PATCH', '', { sync: 'on' }), /sync must be true or false/);
  await assert.rejects(api('PATCH', '', { sync: false, sizeBytes: MiB }), /a change of sync takes no sizeBytes or force/);
  await io('write -P 0x61 0 1M');
  await api('POST', '/replicas', { peer: beta.address, everyMs: 600_000 });
  await api('POST', '/replicate', {});
  await io('write -P 0x62 1M 256k');

  // On: the asynchronous link is a synchronous one; its resync compares the whole volume and sends the 256 KiB that
  // beta's copy lacks.
  const on = await ok(alpha.node, 'volume', 'set', 'sw', '--sync', 'on', '--sync-timeout', `${waitedTimeoutMs / 1000}s`);
  assert.match(on, /^volume sw: its replicas are synchronous \(in sync\): beta \(127\.0\.0\.1:\d+\)$/m);
  const synced = await swLink();
  assert.deepEqual([synced.mode, synced.state, synced.timeoutMs, synced.resyncBytesTotal], ['sync', 'in-sync', waitedTimeoutMs, 256 * 1024]);
  await io('write -P 0x63 2M 64k');
  assert.equal(await exportHash(beta.node, 'sw'), await exportHash(alpha.node, 'sw'));
  await assert.rejects(callApi(beta.node.apiSocket, 'PATCH', '/v1/volumes/sw', { sync: false }), /volume sw is a read-only replica of node alpha \(epoch 1\); a change of its replicas is refused/, 'a replica\'s node does not change its owner\'s links');

  // Off needs every replica in sync (the point must be on each).
  beta.node.process.kill('SIGSTOP');
  t.onTestFinished(() => {
    beta.node.process.kill('SIGCONT');
  });
  await io('write -P 0x64 3M 64k');
  await assert.rejects(api('PATCH', '', { sync: false }), /the synchronous replica on \S+ is (out-of-sync|resyncing): a replica becomes asynchronous from a point it holds, so it must be in sync first/);
  beta.node.process.kill('SIGCONT');
  await waitFor('sw in sync', async () => ((await swLink()).state === 'in-sync' ? true : null), async () => alpha.node.stderr());

  // A replica that does not take the point (stopped while in sync, no write to notice it): off fails, and leaves no
  // repl- snapshot behind, here or there (where it may land late: its resync removes it).
  const points = async (node: RunningNode): Promise<string[]> => ((await callApi(node.apiSocket, 'GET', '/v1/volumes/sw/snapshots')) as { snapshots: Array<{ name: string }> }).snapshots.map((s) => s.name).filter((name) => name.startsWith('repl-'));
  const pointsBefore = { alpha: await points(alpha.node), beta: await points(beta.node) };
  beta.node.process.kill('SIGSTOP');
  await assert.rejects(api('PATCH', '', { sync: false }), /the synchronous replica on \S+ did not take the replication point repl-\d+, and is out of sync: the replicas stay synchronous/);
  assert.deepEqual(await points(alpha.node), pointsBefore.alpha);
  beta.node.process.kill('SIGCONT');
  await waitFor('sw in sync', async () => ((await swLink()).state === 'in-sync' ? true : null), async () => alpha.node.stderr());
  assert.deepEqual(await points(beta.node), pointsBefore.beta);

  // Off: a replication point on both, the link asynchronous, and its next cycle an increment from that point.
  const off = await ok(alpha.node, 'volume', 'set', 'sw', '--sync', 'off', '--json');
  assert.equal(JSON.parse(off).sync, false);
  const link = await swLink();
  assert.equal(link.mode, undefined);
  assert.match(link.lastReplicated.snapshot, /^repl-\d+$/);
  const point = (await api('GET', '/snapshots')).snapshots.find((s: { name: string }) => s.name === link.lastReplicated.snapshot);
  const held = (await callApi(beta.node.apiSocket, 'GET', '/v1/volumes/sw/snapshots')) as { snapshots: Array<{ uuid: string }> };
  assert.ok(held.snapshots.some((s) => s.uuid === point.uuid), 'beta holds the point');
  assert.match(beta.node.stderr(), /volume sw: an asynchronous replica of alpha \(epoch 1\) from now on, as its owner asked/);
  await io('write -P 0x65 0 64k');
  const cycle = (await api('POST', '/replicate', {})).cycles[0];
  assert.deepEqual([cycle.outcome, cycle.dataBytes], ['incremental', 64 * 1024]);
  assert.equal(await exportHash(beta.node, 'sw'), await exportHash(alpha.node, 'sw'));
  await api('DELETE', '/replicas', { peer: beta.address });
});

test('a rollback, a shrink and a delete while a resync runs: each goes through, the resync goes on from its dirty map, and the copies end the same', { skip }, async () => {
  const api = (node: RunningNode, method: string, route: string, body?: unknown): Promise<any> => callApi(node.apiSocket, method, `/v1/volumes/rr${route}`, body);
  const io = (...commands: string[]): Promise<string> => mustRun('qemu-io', ['-f', 'raw', alpha.node.qemuUri('rr'), ...commands.flatMap((command) => ['-c', command])]);
  const rrLink = async (): Promise<Record<string, any>> => (await replicaLinks(alpha, 'rr'))[0]!;
  const rrInSync = (): Promise<Record<string, any>> => waitFor('rr in sync', async () => {
    const now = await rrLink();
    return now.state === 'in-sync' ? now : null;
  }, async () => `${JSON.stringify(await rrLink())}\n${alpha.node.stderr()}`, 60_000);
  // A resync at 1 MiB/s copying 2 MiB of data: the step under way when the change comes has the volume open.
  const resyncing = (): Promise<Record<string, any>> => waitFor('rr resyncing its live volume', async () => {
    const now = await rrLink();
    return now.state === 'resyncing' && now.resync.copiedBytes >= 256 * 1024 ? now : null;
  }, async () => `${JSON.stringify(await rrLink())}\n${alpha.node.stderr()}`, 60_000);
  const add = (): Promise<any> => api(alpha.node, 'POST', '/replicas', { peer: beta.address, sync: true, timeoutMs: linkTimeoutMs, maxRateBytesPerSecond: MiB });
  const same = async (name = 'rr'): Promise<void> => assert.equal(await exportHash(beta.node, name), await exportHash(alpha.node, name), `${name} differs on the replica`);
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'rr', sizeBytes: 4 * MiB });
  await io('write -P 0x11 0 256k');
  await api(alpha.node, 'POST', '/snapshots', { name: 's1' });
  await io('write -P 0x12 0 2M');

  // A rollback: the regions it changes are dirty to the resync again, which goes on (no new start) and ends with
  // the rolled-back volume on both.
  await add();
  await resyncing();
  await api(alpha.node, 'POST', '/snapshots/s1/rollback');
  assert.equal(await exportHash(alpha.node, 'rr'), await exportHash(alpha.node, 'rr@s1'));
  const rolled = await rrInSync();
  assert.equal(rolled.outOfSyncTotal, 0);
  assert.doesNotMatch(alpha.node.stderr(), /volume rr: synchronous replica on \S+: .*trying again/);
  await same();
  await same('rr@s1');

  // A shrink: the resync starts again at the new size (syncOpen gives it), comparing what is still dirty.
  await api(alpha.node, 'DELETE', '/replicas', { peer: beta.address });
  await io('write -P 0x13 0 2M');
  await add();
  await resyncing();
  await api(alpha.node, 'PATCH', '', { sizeBytes: 3 * MiB, force: true });
  const shrunk = await rrInSync();
  assert.match(alpha.node.stderr(), /volume rr: the resync of the synchronous replica on \S+ starts again, from its dirty map: the volume was resized from 4 MiB to 3 MiB/);
  assert.equal((await api(beta.node, 'GET', '')).sizeBytes, 3 * MiB);
  // Each chunk that differed sent once: what the first start copied was the same at the second (by checksum).
  assert.ok(shrunk.resyncBytesTotal > 0 && shrunk.resyncBytesTotal <= 2 * MiB, `${shrunk.resyncBytesTotal} bytes sent for the 2 MiB written`);
  await same();

  // A delete (its snapshot removed first, under the resync too): the link goes with the volume, the replica stays.
  await api(alpha.node, 'DELETE', '/replicas', { peer: beta.address });
  await io('write -P 0x14 0 2M');
  await add();
  await resyncing();
  await api(alpha.node, 'DELETE', '/snapshots/s1');
  await api(alpha.node, 'DELETE', '');
  await assert.rejects(api(alpha.node, 'GET', ''), /no volume named rr/);
  assert.deepEqual(((await callApi(alpha.node.apiSocket, 'GET', '/v1/replicas')) as { replicas: Array<{ volume: string }> }).replicas.filter((r) => r.volume === 'rr'), []);
  await api(beta.node, 'DELETE', '');
});

test('fio with crc32c verify and flushes while the replica is killed and restarted: writes go on degraded, the dirty regions resync, and both copies verify', { skip: skip || !haveTool('fio') }, async () => {
  const fvLink = async (): Promise<Record<string, any>> => (await replicaLinks(alpha, 'fv'))[0]!;
  const fvState = (state: string): Promise<Record<string, any>> => waitFor(`fv ${state}`, async () => {
    const now = await fvLink();
    return now.state === state ? now : null;
  }, async () => `${JSON.stringify(await fvLink())}\n${alpha.node.stderr()}`, 60_000);
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'fv', sizeBytes: 16 * MiB });
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes/fv/replicas', { peer: beta.address, sync: true, timeoutMs: linkTimeoutMs });
  const before = await fvState('in-sync');
  // 8 MiB of 64 KiB blocks with crc32c headers at 2 MiB/s (about 4 s), a flush every 8 writes; then fio reads each
  // block back and checks it.
  const job = ['--name=sync-kill', '--ioengine=nbd', '--rw=randwrite', '--bs=64k', '--iodepth=8', '--size=8M', '--fsync=8', '--verify=crc32c', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json'];
  const fio = async (node: RunningNode, ...extra: string[]): Promise<Record<string, any>> => {
    const output = await mustRun('fio', [...job, `--uri=${node.uri('fv')}`, ...extra], { timeoutMs: 60_000 });
    return JSON.parse(output.slice(output.indexOf('{'))).jobs[0];
  };
  const writing = fio(alpha.node, '--rate=2m', '--do_verify=1');
  // Killed once fio's writes reach beta (not after a fixed sleep: fio may take longer than that to start on a loaded
  // machine, and a kill before its first write could leave the resync nothing to compare).
  await waitFor('fio writing through to beta', async () => ((await fvLink()).requestsTotal > before.requestsTotal + 4 ? true : null), async () => JSON.stringify(await fvLink()), 60_000);
  await beta.node.kill();
  await fvState('out-of-sync');
  beta = await startPeer('beta', ports.beta!);
  const wrote = await writing;
  assert.equal(wrote.error, 0, 'fio wrote and verified on the owner');
  assert.ok(wrote.write.io_bytes >= 8 * MiB && wrote.read.io_bytes >= 8 * MiB, `fio wrote ${wrote.write.io_bytes} and read back ${wrote.read.io_bytes} bytes`);
  const back = await fvState('in-sync');
  assert.equal(back.outOfSyncTotal, before.outOfSyncTotal + 1);
  // The dirty regions only were compared (at most the 8 MiB fio writes, all of it when beta is slow to start), not
  // the volume's 16 MiB.
  const compared = back.resyncBytesTotal - before.resyncBytesTotal + back.resyncEqualBytesTotal - before.resyncEqualBytesTotal;
  assert.ok(compared > 0 && compared <= 8 * MiB, `the resync compared ${compared} bytes`);
  process.stderr.write(`# sync-replicas: fio with the replica killed: the resync sent ${back.resyncBytesTotal - before.resyncBytesTotal} bytes, compared ${compared}\n`);
  assert.equal(await exportHash(beta.node, 'fv'), await exportHash(alpha.node, 'fv'));
  const verified = await fio(beta.node, '--verify_only');
  assert.equal(verified.error, 0, 'every block verifies on the replica');
  assert.ok(verified.read.io_bytes >= 8 * MiB);
});

test('a block damaged on the owner that a resync reads: repaired from another in-sync replica, and the resyncing one gets the right bytes', { skip }, async (t) => {
  const gamma = await startPeer('gamma', ports.gamma!);
  t.onTestFinished(() => stopAndCheck(gamma.node));
  const api = (method: string, route: string, body?: unknown): Promise<any> => callApi(alpha.node.apiSocket, method, `/v1/volumes/dr${route}`, body);
  const drLinks = async (): Promise<Array<Record<string, any>>> => replicaLinks(alpha, 'dr');
  const allInSync = (count: number): Promise<Array<Record<string, any>>> => waitFor('dr in sync', async () => {
    const now = await drLinks();
    return now.length === count && now.every((current) => current.state === 'in-sync') ? now : null;
  }, async () => `${JSON.stringify(await drLinks())}\n${alpha.node.stderr()}`, 60_000);
  await callApi(alpha.node.apiSocket, 'POST', '/v1/volumes', { name: 'dr', sizeBytes: 4 * MiB });
  const blocks = [namedBlock('resync repair', 0), namedBlock('resync repair', 1)];
  const client = await TestNbdClient.connect(alpha.node.nbdSocket, 'dr');
  await client.write(MiB, Buffer.concat(blocks));
  await client.flush();
  await client.disconnect();
  await api('POST', '/replicas', { peer: beta.address, sync: true, timeoutMs: linkTimeoutMs });
  await allInSync(1);
  // Damaged on alpha: gamma's first resync reads that block to send it, and beta, in sync, has it.
  flipByteUnder(alpha.node.pool, blocks[1]!);
  await api('POST', '/replicas', { peer: gamma.address, sync: true, timeoutMs: linkTimeoutMs });
  const links = await allInSync(2);
  const fromBeta = links.find((current) => current.peerName === 'beta')!;
  assert.equal(fromBeta.readRepairsTotal, 1);
  assert.match(alpha.node.stderr(), /volume dr: the block at byte 1052672 failed its checksum here; repaired from the synchronous replica on \S+ \(beta\)/);
  const owner = await exportHash(alpha.node, 'dr');
  assert.equal(await exportHash(beta.node, 'dr'), owner);
  assert.equal(await exportHash(gamma.node, 'dr'), owner);
  assert.match((await alpha.node.cli('scrub', 'dr')).stdout, /no damage found/);
  for (const peer of [beta, gamma]) await api('DELETE', '/replicas', { peer: peer.address });
});
