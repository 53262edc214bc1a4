// Containers follow their data (issue 16), through the Docker plugin protocol as the engine drives it (curl on
// each node's plugin socket) on two clustered nodes: a volume created and mounted on alpha, a file written in it,
// unmounted; Mount of it on beta moves it there (volume move through etcd), and beta's mount holds the file; while
// beta has it mounted, a Mount on alpha is refused (its owner does not move a mounted volume). List and Get answer
// with the cluster's volumes on either node.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { clusterFixture, roles } from '../helpers/cluster.ts';
import { plugin } from '../helpers/docker-plugin.ts';
import { cleanupMounts, mountsUnder } from '../helpers/mounts.ts';
import { stopAndCheck } from '../helpers/stream-pipe.ts';

const cluster = clusterFixture('cluster-docker', { nodes: ['alpha', 'beta'] });

test('docker plugin in a cluster: Mount on another node moves the volume there, with its data', { skip: cluster.skip, timeout: 120_000 }, async () => {
  const socket = (name: string) => path.join(cluster.scratch, `${name}-plugin.sock`);
  const alpha = await cluster.start('alpha', ['--plugin-socket', socket('alpha')]);
  const beta = await cluster.start('beta', ['--plugin-socket', socket('beta')]);
  try {
    assert.deepEqual(await plugin(socket('alpha'), '/VolumeDriver.Create', { Name: 'web', Opts: { size: '64MiB' } }), { status: 200, reply: { Err: '' } });
    // Docker calls Create on the node that runs the container too: the cluster has it, nothing is made on beta.
    assert.deepEqual(await plugin(socket('beta'), '/VolumeDriver.Create', { Name: 'web', Opts: { size: '64MiB' } }), { status: 200, reply: { Err: '' } });
    assert.equal((await beta.node.cli('volume', 'info', 'web')).code, 1);
    assert.deepEqual((await plugin(socket('beta'), '/VolumeDriver.List', {})).reply, { Volumes: [{ Name: 'web', Mountpoint: '' }], Err: '' });

    const onAlpha = String((await plugin(socket('alpha'), '/VolumeDriver.Mount', { Name: 'web', ID: 'c1' })).reply.Mountpoint);
    fs.writeFileSync(path.join(onAlpha, 'hello.txt'), 'written on alpha\n');
    assert.deepEqual((await plugin(socket('alpha'), '/VolumeDriver.Unmount', { Name: 'web', ID: 'c1' })).reply, { Err: '' });

    const mounted = await plugin(socket('beta'), '/VolumeDriver.Mount', { Name: 'web', ID: 'c2' });
    assert.equal(mounted.reply.Err, '');
    const onBeta = String(mounted.reply.Mountpoint);
    assert.equal(onBeta, path.join(beta.node.pool, 'mounts', 'web'));
    assert.equal(fs.readFileSync(path.join(onBeta, 'hello.txt'), 'utf8'), 'written on alpha\n');
    fs.writeFileSync(path.join(onBeta, 'more.txt'), 'and on beta\n');
    assert.match(beta.node.stderr(), /volume web moved here from alpha \(epoch 2\) for a Docker Mount/);
    assert.deepEqual(roles(alpha.node).web, { role: 'replica', owner: 'beta', epoch: 2 });
    const got = (await plugin(socket('alpha'), '/VolumeDriver.Get', { Name: 'web' })).reply;
    assert.deepEqual(got, { Volume: { Name: 'web', Mountpoint: '', Status: { sizeBytes: 64 * 1024 * 1024, owner: 'beta' } }, Err: '' });
    // While it is mounted on beta, its owner refuses to move it away: a Mount on alpha fails and beta keeps it.
    const refused = await plugin(socket('alpha'), '/VolumeDriver.Mount', { Name: 'web', ID: 'c3' });
    assert.equal(refused.status, 500);
    assert.match(String(refused.reply.Err), /node beta refused to move volume web to alpha: it is mounted at .*\/mounts\/web on node beta for 1 container\(s\); unmount it there first/);
    assert.equal(fs.readFileSync(path.join(onBeta, 'more.txt'), 'utf8'), 'and on beta\n');
    assert.equal(JSON.parse((await cluster.client.get('/chunkd/v1/volumes/web').string())!).owner, 'beta');
    assert.equal(await cluster.client.get('/chunkd/v1/operations/move/web').string(), null);
    assert.deepEqual((await plugin(socket('beta'), '/VolumeDriver.Unmount', { Name: 'web', ID: 'c2' })).reply, { Err: '' });
    assert.deepEqual(mountsUnder(path.join(beta.node.pool, 'mounts')), []);
    await stopAndCheck(beta.node);
    await stopAndCheck(alpha.node);
  } finally {
    await alpha.node.kill().catch(() => {});
    await beta.node.kill().catch(() => {});
    await cleanupMounts(cluster.scratch);
  }
});
