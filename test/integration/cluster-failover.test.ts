// Automatic failover on a real etcd with three real nodes (TLS peer ports): the owner of a volume with two
// replicas is killed (-9); once its lease has expired, the replica with the newest replicated point takes the
// volume over at epoch 2 by transaction (exactly one winner), is writable through NBD with everything replicated
// there (fio's crc32c-verified blocks written on the old owner pass fio's verify on the new one); the old owner, restarted, refuses writes to it, then rejoins as a replica of the new owner (its lost write
// kept as a snapshot), the other replica follows the new owner, and the new owner replicates to both: the other
// replica, which shares no snapshot with it, is resent whole without an operator and holds the new owner's data. Split brain: the owner paused (SIGSTOP) past its TTL while
// a client writes to it, the replica promoted meanwhile; resumed, the old owner acknowledges not one more write.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { clusterFixture, clusterStatus, roles, waitFor } from '../helpers/cluster.ts';
import { FLAG_FUA, NbdReplyError, TestNbdClient } from '../helpers/nbd-client.ts';
import { haveTool, mustRun, type RunningNode } from '../helpers/node-process.ts';
import { exportHash, ok, stopAndCheck } from '../helpers/stream-pipe.ts';

const cluster = clusterFixture('cluster-failover', { nodes: ['alpha', 'beta', 'gamma', 'delta', 'epsilon'] });
const skip = cluster.skip || !haveTool('fio') || !haveTool('nbdcopy');
const ttlMs = cluster.ttlMs;
const MiB = 1024 * 1024;

/** fio (nbd engine) on 4 MiB of vol at 16 MiB: 64 KiB random writes with crc32c headers, verified or not, or only verified. */
async function fioVerify(node: RunningNode, mode: 'write' | 'verify' | 'write and verify'): Promise<void> {
  const output = await mustRun('fio', [
    '--name=failover', '--ioengine=nbd', `--uri=${node.uri('vol')}`, '--rw=randwrite', '--bs=64k', '--iodepth=8', '--offset=16M', '--size=4M',
    '--verify=crc32c', '--verify_fatal=1', `--do_verify=${mode === 'write' ? 0 : 1}`, ...(mode === 'verify' ? ['--verify_only'] : []), '--verify_state_save=0', '--output-format=json',
  ], { timeoutMs: 60_000 });
  const job = JSON.parse(output.slice(output.indexOf('{'))).jobs[0];
  assert.equal(job.error, 0, `fio ${mode} on ${node.pool}`);
  if (mode !== 'write') assert.ok(job.read.io_bytes >= 4 * MiB, `fio read everything back to verify it (${mode})`);
}

function fill(byte: number, length = MiB): Buffer {
  return Buffer.alloc(length, byte);
}

test('the owner killed: the replica with the newest point takes the volume over at epoch 2 within the TTL plus a bounded delay, with its data; the old owner restarted refuses writes', { skip }, async () => {
  let alpha = await cluster.start('alpha', ['--default-volume', 'vol:64MiB']);
  const beta = await cluster.start('beta');
  const gamma = await cluster.start('gamma');
  try {
    const writer = await TestNbdClient.connect(alpha.node.nbdSocket, 'vol');
    await writer.write(0, fill(0xa1), FLAG_FUA);
    // fio writes 4 MiB of blocks with crc32c verify headers on alpha (replicated below); the new owner verifies them.
    await fioVerify(alpha.node, 'write');
    await ok(alpha.node, 'replica', 'add', 'vol', '--peer', beta.address, '--every', '1h');
    await ok(alpha.node, 'replica', 'add', 'vol', '--peer', gamma.address, '--every', '1h');
    // A second write reaches beta only: beta's point is the newest, so beta is the one to take over.
    await writer.write(MiB, fill(0xb2), FLAG_FUA);
    await ok(alpha.node, 'replica', 'sync', 'vol', '--peer', beta.address);
    // A third is acknowledged but never replicated: lost with the owner, as asynchronous replication says.
    await writer.write(2 * MiB, fill(0xc3), FLAG_FUA);
    await writer.disconnect();
    await waitFor('both replicas published', async () => {
      const status = await clusterStatus(beta.node);
      return status.volumes.find((volume) => volume.name === 'vol')?.replicas.join(',') === 'beta,gamma' ? status : null;
    }, 30_000);

    const killedAt = performance.now();
    await alpha.node.kill();
    // The first write acknowledged by the new owner: the failover time as a client sees it.
    const firstWrite = await waitFor('a write acknowledged by beta', async () => {
      const client = await TestNbdClient.connect(beta.node.nbdSocket, 'vol').catch(() => null);
      if (client === null) return null;
      try {
        await client.write(3 * MiB, fill(0xd4), FLAG_FUA);
        return performance.now();
      } catch (error) {
        if (!(error instanceof NbdReplyError)) throw error;
        return null;
      } finally {
        await client.disconnect().catch(() => {});
      }
    }, 2 * ttlMs + 30_000);
    const failoverMs = Math.round(firstWrite - killedAt);
    process.stderr.write(`# failover: owner killed to first write acknowledged by the new owner: ${failoverMs} ms (lease TTL ${ttlMs} ms)\n`);
    // The lease must expire first (TTL), beta must see alpha unregistered for a whole TTL (failover.ts's
    // AbsenceClock), then a renewal beat of beta (TTL/3) takes it over, then its client reconnects: about 2.3 TTLs.
    // Bounded, but with room for a loaded machine (CI), whose timers, etcd and processes all run late: a failover
    // that waits a few TTLs more than it should still fails this.
    assert.ok(failoverMs < 2 * ttlMs + 12_000, `failover took ${failoverMs} ms`);

    const status = await clusterStatus(gamma.node);
    assert.deepEqual(status.volumes.map((volume) => [volume.name, volume.owner, volume.epoch]), [['vol', 'beta', 2]]);
    // alpha is gone from the cluster: no live lease, and no volume names it any more.
    assert.deepEqual(status.nodes.map((node) => [node.name, node.alive]), [['beta', true], ['gamma', true]]);
    assert.match(beta.node.stderr(), /node alpha, owner of volume vol at epoch 1, has no live lease; this node takes it over at epoch 2/);
    assert.doesNotMatch(gamma.node.stderr(), /takes it over/);
    assert.equal(roles(beta.node).vol?.epoch, 2);
    // beta keeps the point it was promoted at (the one alpha surely shares) until alpha rejoins from it.
    assert.equal(roles(beta.node).vol?.keep?.until, 'alpha');
    // What was replicated to beta is there (fio's blocks pass their crc32c check; fio then writes and verifies
    // again, through beta), the write never replicated is not, and beta's own write is.
    await fioVerify(beta.node, 'verify');
    await fioVerify(beta.node, 'write and verify');
    const reader = await TestNbdClient.connect(beta.node.nbdSocket, 'vol');
    assert.deepEqual(await reader.read(0, MiB), fill(0xa1));
    assert.deepEqual(await reader.read(MiB, MiB), fill(0xb2));
    assert.deepEqual(await reader.read(2 * MiB, MiB), fill(0));
    assert.deepEqual(await reader.read(3 * MiB, MiB), fill(0xd4));
    await reader.disconnect();

    // The old owner comes back: etcd (and its peers) say beta owns vol at epoch 2, so it refuses writes to it.
    alpha = await cluster.start('alpha');
    const old = await TestNbdClient.connect(alpha.node.nbdSocket, 'vol');
    const refused = await old.write(0, fill(0xee), FLAG_FUA).then(() => null, (error: unknown) => error);
    assert.ok(refused instanceof NbdReplyError && refused.errno === 1, `the old owner acknowledged a write: ${String(refused)}`);
    await old.disconnect();

    // It rejoins as a replica of beta on its own (its write that never replicated kept aside as a snapshot), gamma
    // follows beta too, and beta replicates to both.
    await waitFor('alpha to rejoin as a replica of beta', async () => (roles(alpha.node).vol?.role === 'replica' ? true : null), 60_000);
    assert.deepEqual(roles(alpha.node).vol, { role: 'replica', owner: 'beta', epoch: 2 });
    await waitFor('gamma to follow beta', async () => (roles(gamma.node).vol?.owner === 'beta' ? true : null), 60_000);
    assert.deepEqual([roles(gamma.node).vol?.role, roles(gamma.node).vol?.epoch], ['replica', 2]);
    const kept = JSON.parse(await ok(alpha.node, 'snapshot', 'list', 'vol', '--json')).map((snapshot: { name: string }) => snapshot.name).filter((name: string) => name.startsWith('fenced-'));
    assert.equal(kept.length, 1, 'alpha keeps its unreplicated write as a fenced- snapshot');
    await waitFor('beta to replicate to alpha and gamma', async () => {
      const links = JSON.parse(await ok(beta.node, 'replica', 'status', 'vol', '--json')).replicas.map((link: { peerName: string | null; peer: string }) => link.peer).sort();
      return links.join(',') === [alpha.address, gamma.address].sort().join(',') ? true : null;
    }, 60_000);
    await ok(beta.node, 'replica', 'sync', 'vol', '--peer', alpha.address);
    assert.equal(roles(beta.node).vol?.keep, undefined, 'the promotion point is released once alpha took a point from beta');
    // gamma never got beta's point (the second), and its own (the first) was pruned on beta when the second landed
    // there: they share no snapshot. beta resends it whole on its own (no operator), saying so, and gamma's point
    // is then a copy of beta's data: the same content as beta's snapshot of that name.
    const gammaPoint = await waitFor('gamma to catch up with beta', async () => {
      const link = JSON.parse(await ok(beta.node, 'replica', 'status', 'vol', '--json')).replicas.find((candidate: { peer: string }) => candidate.peer === gamma.address);
      return link?.lastReplicated?.snapshot as string | undefined ?? null;
    }, 60_000);
    assert.match(beta.node.stderr(), /replication of vol to gamma: its replica shares no snapshot with this node's vol \(it holds repl-\d+\); resending it whole/);
    assert.match(gamma.node.stderr(), /replica vol resent whole by beta \(epoch 2\): it shared no snapshot with beta's vol; its points here \(repl-\d+\) are given up/);
    // Until then gamma's old point was published as stale (no successor of beta's); now it is beta's.
    const published = JSON.parse((await cluster.client.get('/chunkd/v1/replicas/vol/gamma').string()) ?? '{}');
    assert.ok(published.stale === undefined && published.owner === 'beta', `gamma's replica record: ${JSON.stringify(published)}`);
    assert.deepEqual(roles(gamma.node).vol, { role: 'replica', owner: 'beta', epoch: 2 });
    assert.ok(Number(gammaPoint.slice('repl-'.length)) > Date.now() - (performance.now() - killedAt), `gamma's point ${gammaPoint} was taken by beta after the failover`);
    assert.equal(await exportHash(gamma.node, 'vol'), await exportHash(beta.node, `vol@${gammaPoint}`), 'gamma holds beta\'s data at that point');
    for (const member of [alpha]) {
      const replica = await TestNbdClient.connect(member.node.nbdSocket, 'vol');
      assert.deepEqual(await replica.read(3 * MiB, MiB), fill(0xd4), `${member.name} has beta's write`);
      assert.deepEqual(await replica.read(2 * MiB, MiB), fill(0), `${member.name} has not alpha's lost write`);
      await replica.disconnect();
    }
    const after = await clusterStatus(alpha.node);
    assert.deepEqual(after.volumes.map((volume) => [volume.name, volume.owner, volume.epoch, volume.replicas]), [['vol', 'beta', 2, ['alpha', 'gamma']]]);

    // A second failover: gamma gets beta's newest point, and beta is killed; gamma takes vol over at epoch 3.
    // alpha's point is another of beta's, so it shares no snapshot with gamma, and it holds its fenced- snapshot:
    // gamma resends it whole in place, and the fenced- snapshot (alpha's writes kept aside) stays.
    const last = await TestNbdClient.connect(beta.node.nbdSocket, 'vol');
    await last.write(4 * MiB, fill(0xe5), FLAG_FUA);
    await last.disconnect();
    // A write since every point, so that this cycle takes a new one: gamma's is then the newest.
    assert.equal(JSON.parse(await ok(beta.node, 'replica', 'sync', 'vol', '--peer', gamma.address, '--json')).cycles[0].outcome, 'incremental');
    await beta.node.kill();
    await waitFor('gamma to own vol at epoch 3', async () => (roles(gamma.node).vol?.role === 'owner' && roles(gamma.node).vol?.epoch === 3 ? true : null), 3 * ttlMs + 10_000);
    const alphaPoint = await waitFor('alpha to catch up with gamma', async () => {
      const link = JSON.parse(await ok(gamma.node, 'replica', 'status', 'vol', '--json')).replicas.find((candidate: { peer: string }) => candidate.peer === alpha.address);
      return link?.lastReplicated?.snapshot as string | undefined ?? null;
    }, 30_000);
    assert.match(alpha.node.stderr(), /replica vol resent whole by gamma \(epoch 3\): .*, its other snapshots stay \(fenced-\d+\)/);
    assert.deepEqual(JSON.parse(await ok(alpha.node, 'snapshot', 'list', 'vol', '--json')).map((snapshot: { name: string }) => snapshot.name).filter((name: string) => name.startsWith('fenced-')), kept);
    assert.equal(await exportHash(alpha.node, 'vol'), await exportHash(gamma.node, `vol@${alphaPoint}`), 'alpha holds gamma\'s data at that point');
    const fromAlpha = await TestNbdClient.connect(alpha.node.nbdSocket, 'vol');
    assert.deepEqual(await fromAlpha.read(4 * MiB, MiB), fill(0xe5), 'alpha has the write only gamma had');
    await fromAlpha.disconnect();
  } catch (error) {
    for (const member of [alpha, beta, gamma]) process.stderr.write(`--- ${member.name}:\n${member.node.stderr()}\n`);
    throw error;
  } finally {
    for (const member of [alpha, beta, gamma]) await stopAndCheck(member.node).catch(() => member.node.kill());
  }
});

test('split brain: the owner paused past its TTL while a client writes, its replica promoted; resumed, it acknowledges no write', { skip }, async () => {
  const delta = await cluster.start('delta', ['--default-volume', 'sb:64MiB']);
  const epsilon = await cluster.start('epsilon');
  const child = delta.node.process;
  try {
    const client = await TestNbdClient.connect(delta.node.nbdSocket, 'sb');
    await client.write(0, fill(0x5a), FLAG_FUA);
    await ok(delta.node, 'replica', 'add', 'sb', '--peer', epsilon.address, '--every', '1h');
    await waitFor('epsilon published its replica', async () => {
      const status = await clusterStatus(epsilon.node);
      return status.volumes.find((volume) => volume.name === 'sb')?.replicas.join(',') === 'epsilon' ? status : null;
    }, 30_000);
    // The client writes 4 KiB blocks one after another to the owner and checks every reply.
    const replies: Array<{ index: number; at: number; acknowledged: boolean }> = [];
    let writing = true;
    const writer = (async () => {
      for (let index = 256; writing; index += 1) {
        const acknowledged = await client.write(index * 4096, fill(index % 256, 4096), FLAG_FUA).then(() => true, (error: unknown) => {
          if (!(error instanceof NbdReplyError)) throw error;
          return false;
        });
        replies.push({ index, at: performance.now(), acknowledged });
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    })();
    await waitFor('writes to the owner', async () => (replies.filter((reply) => reply.acknowledged).length >= 10 ? true : null), 30_000);
    const stoppedAt = performance.now();
    child.kill('SIGSTOP');
    const promoted = await waitFor('epsilon to own sb at epoch 2', async () => {
      const status = await clusterStatus(epsilon.node);
      const volume = status.volumes.find((candidate) => candidate.name === 'sb');
      return volume?.owner === 'epsilon' && volume.epoch === 2 ? performance.now() : null;
    }, 2 * ttlMs + 30_000);
    const continuedAt = performance.now();
    child.kill('SIGCONT');
    // Through the old owner's resumption, re-registration and re-check: every reply is a refusal. At least a TTL
    // and a second of them, and at least 10 (more time where a loaded machine answers slowly).
    await new Promise((resolve) => setTimeout(resolve, ttlMs + 1_000));
    await waitFor('10 replies from the resumed owner', async () => (replies.filter((reply) => reply.at > continuedAt).length >= 10 ? true : null), 60_000);
    writing = false;
    await writer;
    await client.disconnect();
    const after = replies.filter((reply) => reply.at > continuedAt);
    process.stderr.write(`# split brain: owner stopped, epsilon promoted ${Math.round(promoted - stoppedAt)} ms later; after SIGCONT ${after.length} writes to the old owner, ${after.filter((reply) => reply.acknowledged).length} acknowledged\n`);
    assert.ok(after.length >= 10, `the client kept writing to the old owner (${after.length} replies)`);
    assert.deepEqual(after.filter((reply) => reply.acknowledged), [], 'the old owner acknowledged writes after the new owner\'s epoch began');
    // A stopped node sends nothing; a reply it sent just before the stop may reach this (loaded) process late, so 2 s.
    assert.deepEqual(replies.filter((reply) => reply.acknowledged && reply.at > stoppedAt + 2_000), [], 'acknowledged while stopped?');
    assert.match(delta.node.stderr(), /volume sb: writes refused: etcd records node epsilon as its owner at epoch 2/);
    // The new owner takes writes, with what was replicated.
    const fresh = await TestNbdClient.connect(epsilon.node.nbdSocket, 'sb');
    assert.deepEqual(await fresh.read(0, MiB), fill(0x5a));
    await fresh.write(MiB, fill(0x77), FLAG_FUA);
    await fresh.disconnect();
  } finally {
    child.kill('SIGCONT');
    for (const member of [delta, epsilon]) await stopAndCheck(member.node).catch(() => member.node.kill());
  }
});
