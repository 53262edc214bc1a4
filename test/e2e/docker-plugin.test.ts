// The Docker volume plugin as a container engine drives it, without one: curl on the plugin socket (Create,
// Mount), a bind mount of the returned path into a directory standing for the container's root inside a new
// mount namespace (unshare -m), data written there, the namespace left, then Unmount and Remove in order; and a
// volume that holds data but no file system, which Mount refuses rather than formats.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { makeTempDir, mustRun, startNode, type RunningNode } from '../helpers/node-process.ts';
import { cleanupMounts, loopDevicesUnder, mountsUnder } from '../helpers/mounts.ts';
import { plugin } from '../helpers/docker-plugin.ts';

test('docker plugin: Create, Mount, bind mount in a container namespace, Unmount, Remove', { timeout: 180_000 }, async () => {
  const scratch = makeTempDir('docker');
  const socket = path.join(scratch, 'plugins', 'chunkd.sock');
  const fuseDir = path.join(scratch, 'fuse');
  let node: RunningNode | null = await startNode(path.join(scratch, 'pool'), ['--fuse', fuseDir, '--plugin-socket', socket]);
  try {
    assert.equal(fs.statSync(socket).mode & 0o777, 0o600);
    assert.deepEqual((await plugin(socket, '/Plugin.Activate', {})).reply, { Implements: ['VolumeDriver'] });
    assert.deepEqual((await plugin(socket, '/VolumeDriver.Capabilities', {})).reply, { Capabilities: { Scope: 'local' } });
    assert.deepEqual(await plugin(socket, '/VolumeDriver.Create', { Name: 'web', Opts: { size: '256MiB' } }), { status: 200, reply: { Err: '' } });
    const info = JSON.parse((await node.cli('volume', 'info', 'web', '--json')).stdout);
    assert.equal(info.sizeBytes, 256 * 1024 * 1024);
    const bad = await plugin(socket, '/VolumeDriver.Create', { Name: '../etc', Opts: {} });
    assert.equal(bad.status, 500);
    assert.match(String(bad.reply.Err), /invalid volume name/);

    const mounted = await plugin(socket, '/VolumeDriver.Mount', { Name: 'web', ID: 'container-1' });
    assert.equal(mounted.reply.Err, '');
    const mountpoint = String(mounted.reply.Mountpoint);
    assert.equal(mountpoint, path.join(node.pool, 'mounts', 'web'));
    assert.equal(mountsUnder(mountpoint).length, 1);
    assert.deepEqual((await plugin(socket, '/VolumeDriver.Path', { Name: 'web' })).reply, { Mountpoint: mountpoint, Err: '' });
    assert.deepEqual((await plugin(socket, '/VolumeDriver.List', {})).reply, { Volumes: [{ Name: 'web', Mountpoint: mountpoint }], Err: '' });
    // A second container on the same volume: one attachment, two holders.
    assert.equal((await plugin(socket, '/VolumeDriver.Mount', { Name: 'web', ID: 'container-2' })).reply.Mountpoint, mountpoint);

    // The "container": its own mount namespace, the volume bind-mounted into its root, data written there.
    const root = path.join(scratch, 'rootfs');
    fs.mkdirSync(path.join(root, 'data'), { recursive: true });
    const payload = crypto.randomBytes(3 * 1024 * 1024);
    const payloadFile = path.join(scratch, 'payload');
    fs.writeFileSync(payloadFile, payload);
    const script = [
      'set -e',
      `mount --bind ${mountpoint} ${root}/data`,
      `cp ${payloadFile} ${root}/data/payload`,
      `echo "written in the container" > ${root}/data/hello.txt`,
      `sync -f ${root}/data`,
      `grep -q " ${root}/data " /proc/self/mounts`,
    ].join('\n');
    await mustRun('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script]);
    assert.deepEqual(mountsUnder(root), [], 'the bind mount lived in the container namespace only');

    const removeBusy = await plugin(socket, '/VolumeDriver.Remove', { Name: 'web' });
    assert.equal(removeBusy.status, 500);
    assert.match(String(removeBusy.reply.Err), /is mounted at .* for 2 container\(s\)/);

    assert.deepEqual((await plugin(socket, '/VolumeDriver.Unmount', { Name: 'web', ID: 'container-1' })).reply, { Err: '' });
    assert.equal(mountsUnder(mountpoint).length, 1, 'still mounted for container-2');
    assert.deepEqual((await plugin(socket, '/VolumeDriver.Unmount', { Name: 'web', ID: 'container-2' })).reply, { Err: '' });
    assert.deepEqual(mountsUnder(mountpoint), [], 'the last Unmount detached it');
    assert.deepEqual(loopDevicesUnder(scratch), []);
    assert.deepEqual((await plugin(socket, '/VolumeDriver.Path', { Name: 'web' })).reply, { Mountpoint: '', Err: '' });
    assert.match(String((await plugin(socket, '/VolumeDriver.Unmount', { Name: 'web', ID: 'container-2' })).reply.Err), /not mounted/);

    // The data is on the volume: a new attach through the CLI reads it back.
    const check = path.join(scratch, 'check');
    assert.equal((await node.cli('attach', 'web', '--mountpoint', check)).code, 0);
    assert.ok(fs.readFileSync(path.join(check, 'payload')).equals(payload));
    assert.equal(fs.readFileSync(path.join(check, 'hello.txt'), 'utf8'), 'written in the container\n');
    // Attached by the CLI: Remove is refused for it too.
    assert.match(String((await plugin(socket, '/VolumeDriver.Remove', { Name: 'web' })).reply.Err), /is mounted at/);
    assert.equal((await node.cli('detach', 'web')).code, 0);

    // A volume that holds data but no file system (written through NBD here): Mount refuses it, never formats it.
    assert.deepEqual(await plugin(socket, '/VolumeDriver.Create', { Name: 'raw', Opts: { size: '64MiB' } }), { status: 200, reply: { Err: '' } });
    await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('raw'), '-c', 'write -P 0xa5 0 1M']);
    const rawMount = await plugin(socket, '/VolumeDriver.Mount', { Name: 'raw', ID: 'container-3' });
    assert.equal(rawMount.status, 500);
    assert.match(String(rawMount.reply.Err), /^volume raw holds 1 MiB \(1048576 bytes\) of data but no file system blkid recognises .* --format/);
    assert.deepEqual(mountsUnder(path.join(node.pool, 'mounts')), []);
    assert.deepEqual(loopDevicesUnder(scratch), []);
    assert.deepEqual((await plugin(socket, '/VolumeDriver.Path', { Name: 'raw' })).reply, { Mountpoint: '', Err: '' });
    assert.equal(node.stderr().match(/has no file system: making ext4/g)?.length, 1, 'only web was formatted');
    const reread = await mustRun('qemu-io', ['-r', '-f', 'raw', node.qemuUri('raw'), '-c', 'read -P 0xa5 0 1M', '-c', 'read -P 0 1M 63M']);
    assert.doesNotMatch(reread, /Pattern verification failed/);
    assert.deepEqual(await plugin(socket, '/VolumeDriver.Remove', { Name: 'raw' }), { status: 200, reply: { Err: '' } });

    assert.deepEqual(await plugin(socket, '/VolumeDriver.Remove', { Name: 'web' }), { status: 200, reply: { Err: '' } });
    assert.match(String((await plugin(socket, '/VolumeDriver.Get', { Name: 'web' })).reply.Err), /no volume named web/);
    assert.equal(JSON.parse((await node.cli('volume', 'list', '--json')).stdout).length, 0);
    assert.equal(await node.stop(), 0);
    node = null;
    assert.equal(fs.existsSync(socket), false, 'the plugin socket goes away with the node');
  } finally {
    if (node !== null) await node.stop();
    await cleanupMounts(scratch);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
