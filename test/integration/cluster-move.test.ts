// `chunkd volume move VOL --to NODE` on a real etcd with two real nodes (TLS peer ports), asked from a node that does
// not own the volume: the move is recorded in etcd, the owner hands the volume over, the record names the new
// owner at epoch + 1, and `volume list` shows it from either node with its live replica. Then a kill -9 at two
// steps (core/crash-points.ts): the owner after the final increment (restarted, it rolls the handoff back and the
// move goes on from etcd), and the target right after it took the volume (restarted, it records the move itself
// and the frozen old owner learns the outcome). Then volume move --cancel (the handoff stopped, the volume stays),
// and a move racing a failover (the owner killed mid-move and left down: its replica, the target, takes it over,
// the move is dropped). At every point at most one node takes writes, and nothing acknowledged is lost.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { FLAG_FUA, NbdReplyError, TestNbdClient } from '../helpers/nbd-client.ts';
import type { RunningNode } from '../helpers/node-process.ts';
import { clusterFixture, dumpMembers, roles, waitFor } from '../helpers/cluster.ts';
import { cliProcess, ok, stopAndCheck } from '../helpers/stream-pipe.ts';

// A TTL well above a node's restart, so that no failover races the restarts below.
const cluster = clusterFixture('cluster-move', { nodes: ['alpha', 'beta'], ttlMs: 5_000 });
const MiB = 1024 * 1024;

function fill(byte: number, length = MiB): Buffer {
  return Buffer.alloc(length, byte);
}

/** Whether `node` acknowledges a write to vol now (a fresh NBD connection, one FUA write at 8 MiB). */
async function writable(node: RunningNode): Promise<boolean> {
  const client = await TestNbdClient.connect(node.nbdSocket, 'vol');
  try {
    await client.write(8 * MiB, fill(0x7e, 4096), FLAG_FUA);
    return true;
  } catch (error) {
    if (!(error instanceof NbdReplyError)) throw error;
    return false;
  } finally {
    await client.disconnect().catch(() => {});
  }
}

async function write(node: RunningNode, offset: number, byte: number): Promise<void> {
  const client = await TestNbdClient.connect(node.nbdSocket, 'vol');
  await client.write(offset, fill(byte), FLAG_FUA);
  await client.disconnect();
}

async function readBack(node: RunningNode, expected: Array<[number, number]>): Promise<void> {
  const client = await TestNbdClient.connect(node.nbdSocket, 'vol');
  for (const [offset, byte] of expected) assert.deepEqual(await client.read(offset, MiB), fill(byte), `${offset / MiB} MiB on ${node.pool}`);
  await client.disconnect();
}

/** The signal that ended `node` (its crash hook's SIGKILL), waited for at most 20 s. */
function died(node: RunningNode): Promise<string | null> {
  if (node.process.exitCode !== null || node.process.signalCode !== null) return Promise.resolve(node.process.signalCode);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${node.pool}: not killed by its crash hook within 20 s:\n${node.stderr()}`)), 20_000);
    node.process.once('exit', (_code, signal) => {
      clearTimeout(timer);
      resolve(signal);
    });
  });
}

async function record(): Promise<{ owner: string; epoch: number; replicas: string[] }> {
  return JSON.parse((await cluster.client.get('/chunkd/v1/volumes/vol').string())!);
}

interface Listed {
  name: string;
  owner: string;
  ownerAlive: boolean;
  epoch: number;
  replicas: Array<{ node: string; live: boolean; point: string | null }>;
  move: { to: string } | null;
}

test('volume move from any node through etcd; volume list from any node; kill -9 of the owner or the target mid-move resumes', { skip: cluster.skip }, async () => {
  const alpha = await cluster.start('alpha', ['--default-volume', 'vol:16MiB']);
  let beta = await cluster.start('beta');
  try {
    await write(alpha.node, 0, 0xa1);
    const listed = JSON.parse(await ok(beta.node, 'volume', 'list', '--json')) as Listed[];
    assert.deepEqual(listed.map((volume) => [volume.name, volume.owner, volume.ownerAlive, volume.epoch, volume.replicas, volume.move]), [['vol', 'alpha', true, 1, [], null]]);

    // Asked on beta, which does not own vol: alpha hands it over, etcd names beta at epoch 2.
    const askedAt = performance.now();
    const moved = JSON.parse(await ok(beta.node, 'volume', 'move', 'vol', '--to', 'beta', '--json'));
    const answeredAt = performance.now();
    assert.deepEqual(moved, { volume: 'vol', from: 'alpha', to: 'beta', epoch: 2, moved: true });
    assert.deepEqual([(await record()).owner, (await record()).epoch, (await record()).replicas], ['beta', 2, ['alpha']]);
    assert.equal(await cluster.client.get('/chunkd/v1/operations/move/vol').string(), null);
    assert.deepEqual(roles(alpha.node).vol, { role: 'replica', owner: 'beta', epoch: 2 });
    await waitFor('beta takes writes', () => writable(beta.node), cluster.ttlMs + 30_000);
    const pause = /writes were refused for ([\d.]+) s/.exec(alpha.node.stderr())?.[1];
    process.stderr.write(`# move (16 MiB, TTL ${cluster.ttlMs} ms): asked to answered ${Math.round(answeredAt - askedAt)} ms, to the first write on beta ${Math.round(performance.now() - askedAt)} ms; the handoff's write pause on alpha ${pause} s\n`);
    assert.equal(await writable(alpha.node), false);
    await readBack(beta.node, [[0, 0xa1]]);
    await write(beta.node, MiB, 0xb2);
    // From either node: beta owns it, alpha is its live replica at a replicated point.
    const text = await waitFor('alpha listed as a live replica', async () => {
      const output = await ok(alpha.node, 'volume', 'list');
      return /^vol\t16 MiB\tbeta\t2\talpha@repl-\d+ \(\d+\.\d s old\)$/m.test(output) ? output : null;
    }, 3 * cluster.ttlMs + 30_000);
    assert.match(text, /^VOLUME\tSIZE\tOWNER\tEPOCH\tREPLICAS$/m);
    assert.equal(await ok(alpha.node, 'volume', 'move', 'vol', '--to', 'beta'), 'vol is already owned by beta (epoch 2)\n');
    const unknown = await alpha.node.cli('volume', 'move', 'vol', '--to', 'zeta');
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /node zeta is not a live member of the cluster/);

    // The owner (beta) killed after the final increment, its writes frozen: restarted, it asks alpha, rolls the
    // handoff back, and performs the move recorded in etcd again; the command asked on alpha waits through it.
    // (Restarts here are kill -9: its lease lives on and the restart takes it over; a stop would revoke it, and
    // alpha, beta's replica, would take the volume over at once.)
    const moveWithBetaCrashing = async (crashAt: string, to: string, frozen: RunningNode, why: string): Promise<unknown> => {
      await beta.node.kill();
      beta = await cluster.start('beta', [], { crashAt });
      const move = cliProcess(alpha.node, ['volume', 'move', 'vol', '--to', to, '--json']);
      assert.equal(await died(beta.node), 'SIGKILL');
      assert.equal(await writable(frozen), false, why);
      beta = await cluster.start('beta');
      const result = await move.exit;
      assert.equal(result.code, 0, result.stderr);
      return JSON.parse(result.stdout);
    };
    const second = await moveWithBetaCrashing('handoff:after-final', 'alpha', alpha.node, 'the target takes no write before the handoff');
    assert.deepEqual(second, { volume: 'vol', from: 'beta', to: 'alpha', epoch: 3, moved: true });
    assert.match(beta.node.stderr(), /handoff of vol to alpha rolled back/);
    await waitFor('alpha takes writes', () => writable(alpha.node), cluster.ttlMs + 30_000);
    assert.equal(await writable(beta.node), false);
    await readBack(alpha.node, [[0, 0xa1], [MiB, 0xb2]]);
    await write(alpha.node, 2 * MiB, 0xc3);

    // The target (beta) killed right after it took the volume (owner at epoch 4 on its disk, no answer sent): the
    // owner stays frozen; beta restarted records the move in etcd itself, and alpha learns it is beta's replica.
    const third = await moveWithBetaCrashing('handoff:after-take', 'beta', alpha.node, 'the owner is frozen while the outcome is unknown');
    assert.deepEqual(third, { volume: 'vol', from: 'alpha', to: 'beta', epoch: 4, moved: true });
    await waitFor('beta takes writes', () => writable(beta.node), cluster.ttlMs + 30_000);
    await waitFor('alpha a replica of beta', () => roles(alpha.node).vol?.role === 'replica', cluster.ttlMs + 30_000);
    assert.equal(await writable(alpha.node), false);
    await readBack(beta.node, [[0, 0xa1], [MiB, 0xb2], [2 * MiB, 0xc3]]);

    // volume move --cancel: a move of vol (beta's) to alpha while alpha is stopped (SIGSTOP, well within its TTL),
    // so that the handoff waits on it; cancelled meanwhile, the owner stops it at its next step and deletes the
    // move: vol stays on beta at epoch 4, writable, and the move's command says it was cancelled.
    const cancelStarted = performance.now();
    alpha.node.process.kill('SIGSTOP');
    try {
      const move = cliProcess(beta.node, ['volume', 'move', 'vol', '--to', 'alpha', '--json']);
      await waitFor('the move recorded', async () => (await cluster.client.get('/chunkd/v1/operations/move/vol').string()) !== null, 10_000);
      const cancel = cliProcess(beta.node, ['volume', 'move', 'vol', '--cancel', '--json']);
      await waitFor('the move marked cancelled', async () => /"cancelled":\{"by":"beta"/.test((await cluster.client.get('/chunkd/v1/operations/move/vol').string()) ?? '') || cancel.child.exitCode !== null, 10_000);
      await new Promise((resolve) => setTimeout(resolve, 1_000));
      alpha.node.process.kill('SIGCONT');
      const cancelled = await cancel.exit;
      assert.equal(cancelled.code, 0, cancelled.stderr);
      assert.deepEqual(JSON.parse(cancelled.stdout), { volume: 'vol', cancelled: true, owner: 'beta', epoch: 4 });
      const refused = await move.exit;
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /the move of volume vol to alpha was cancelled \(chunkd volume move --cancel, on beta\); vol stays on beta/);
    } finally {
      alpha.node.process.kill('SIGCONT');
    }
    assert.equal(await cluster.client.get('/chunkd/v1/operations/move/vol').string(), null);
    assert.deepEqual([(await record()).owner, (await record()).epoch], ['beta', 4]);
    assert.match(beta.node.stderr(), /move of volume vol to alpha cancelled \(asked on beta\)/);
    process.stderr.write(`# cancel (${Math.round(performance.now() - cancelStarted)} ms): ${/its handoff stops at its next step|stopped, as cancelled/.test(beta.node.stderr()) ? 'the running handoff stopped at its next step' : 'deleted before the handoff ran'}${/handoff of vol to .* cancelled after the freeze/.test(beta.node.stderr()) ? ', rolled back after the freeze' : ''}\n`);
    await waitFor('beta takes writes after the cancel', () => writable(beta.node), cluster.ttlMs + 30_000);
    assert.equal(roles(alpha.node).vol?.role, 'replica');
    const nothing = await beta.node.cli('volume', 'move', 'vol', '--cancel');
    assert.equal(nothing.code, 1);
    assert.match(nothing.stderr, /volume vol has no move in progress/);

    // A move racing a failover: the owner (beta) killed after its final increment (writes frozen, the target not
    // asked yet) and left down. alpha, its replica with that increment, takes vol over once beta's lease has
    // expired; the move is dropped from etcd (the command asked on alpha sees alpha own vol), every acknowledged
    // write is there, and beta, restarted, learns alpha owns it (from alpha's last point) and is its replica: one owner.
    const raceStarted = performance.now();
    await write(beta.node, 3 * MiB, 0xd4);
    await beta.node.kill();
    beta = await cluster.start('beta', [], { crashAt: 'handoff:after-final' });
    const raced = cliProcess(alpha.node, ['volume', 'move', 'vol', '--to', 'alpha', '--json']);
    assert.equal(await died(beta.node), 'SIGKILL');
    const racedResult = await raced.exit;
    assert.equal(racedResult.code, 0, racedResult.stderr);
    assert.deepEqual(JSON.parse(racedResult.stdout), { volume: 'vol', from: 'beta', to: 'alpha', epoch: 5, moved: true });
    assert.match(alpha.node.stderr(), /node beta, owner of volume vol at epoch 4, has no live lease; this node takes it over at epoch 5/);
    await waitFor('the move dropped from etcd', async () => (await cluster.client.get('/chunkd/v1/operations/move/vol').string()) === null, 3 * cluster.ttlMs + 30_000);
    await waitFor('alpha takes writes', () => writable(alpha.node), cluster.ttlMs + 30_000);
    await readBack(alpha.node, [[0, 0xa1], [MiB, 0xb2], [2 * MiB, 0xc3], [3 * MiB, 0xd4]]);
    beta = await cluster.start('beta');
    await waitFor('beta a replica of alpha', () => roles(beta.node).vol?.role === 'replica', 3 * cluster.ttlMs + 30_000);
    assert.deepEqual(roles(beta.node).vol, { role: 'replica', owner: 'alpha', epoch: 5 });
    assert.equal(await writable(beta.node), false);
    assert.equal(await writable(alpha.node), true);
    assert.deepEqual([(await record()).owner, (await record()).epoch], ['alpha', 5]);
    process.stderr.write(`# move racing a failover (TTL ${cluster.ttlMs} ms): settled, the old owner back as a replica, in ${Math.round(performance.now() - raceStarted)} ms\n`);

    await stopAndCheck(beta.node);
    await stopAndCheck(alpha.node);
  } catch (error) {
    dumpMembers([alpha, beta]);
    throw error;
  } finally {
    await alpha.node.kill().catch(() => {});
    await beta.node.kill().catch(() => {});
  }
});
