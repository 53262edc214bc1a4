// Attachment records and the Docker plugin's answers, without mounting anything: the checks an attach must
// pass, the file format, the reference counting by caller ID, and the Err field of the plugin protocol.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ChunkdError } from '../../src/core/errors.ts';
import { AttachmentTable, normalisePath, parseBlkid, validateAttachRequest, type AttachmentRecord } from '../../src/node/attachment-table.ts';
import { handlePluginRequest, dockerDefaultSizeBytes, type PluginBackend } from '../../src/api/docker-plugin.ts';

function record(volume: string, mountpoint: string, owner: AttachmentRecord['owner'] = 'cli'): AttachmentRecord {
  return { volume, mountpoint, fsType: 'ext4', via: 'fuse', owner, dockerIds: [], attachedAt: '2026-01-01T00:00:00.000Z' };
}

function code(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof ChunkdError, `not a ChunkdError: ${String(error)}`);
    return error.code;
  }
  return 'none';
}

test('attach requests: names, absolute mountpoints, file system and path kinds', () => {
  assert.deepEqual(validateAttachRequest('vol', { mountpoint: '/mnt//a/./b/' }), { volume: 'vol', mountpoint: '/mnt/a/b', fsType: null, via: 'fuse' });
  assert.deepEqual(validateAttachRequest('vol', { mountpoint: '/m', fs: 'xfs', via: 'nbdfuse' }), { volume: 'vol', mountpoint: '/m', fsType: 'xfs', via: 'nbdfuse' });
  assert.equal(code(() => validateAttachRequest('../x', { mountpoint: '/m' })), 'EBADNAME');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: 'relative' })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/a/../b' })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/m', fs: 'btrfs' })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/m', via: 'nbd' })), 'EINVAL');
  assert.equal(normalisePath('/'), '/');
});

test('a volume attaches once; mountpoints may not coincide or nest', () => {
  const table = new AttachmentTable([record('a', '/mnt/a')]);
  const request = (volume: string, mountpoint: string) => ({ volume, mountpoint, fsType: null, via: 'fuse' as const });
  assert.equal(code(() => table.checkAttach(request('a', '/mnt/other'))), 'EBUSY');
  assert.equal(code(() => table.checkAttach(request('b', '/mnt/a'))), 'EBUSY');
  assert.equal(code(() => table.checkAttach(request('b', '/mnt/a/inner'))), 'EBUSY');
  assert.equal(code(() => table.checkAttach(request('b', '/mnt'))), 'EBUSY');
  assert.equal(code(() => table.checkAttach(request('b', '/mnt/ab'))), 'none');
  table.add(record('b', '/mnt/ab'));
  assert.deepEqual(table.list().map((r) => r.volume), ['a', 'b']);
  table.remove('a');
  assert.equal(table.get('a'), undefined);
});

test('attachments.json round-trips; anything else is refused as corrupt, never dropped', () => {
  const table = new AttachmentTable([record('a', '/mnt/a'), { ...record('d', '/pool/mounts/d', 'docker'), dockerIds: ['c1', 'c2'] }]);
  const decoded = AttachmentTable.decode(table.encode());
  assert.deepEqual(decoded.list(), table.list());
  assert.equal(code(() => AttachmentTable.decode('{')), 'ECORRUPT');
  assert.equal(code(() => AttachmentTable.decode('{"format":"other","formatVersion":1,"attachments":[]}')), 'ECORRUPT');
  const bad = JSON.parse(table.encode());
  bad.attachments[0].volume = '../../etc';
  assert.equal(code(() => AttachmentTable.decode(JSON.stringify(bad))), 'ECORRUPT');
});

test('docker callers are counted by ID; the last one out detaches only what the plugin attached', () => {
  const table = new AttachmentTable([record('d', '/m/d', 'docker'), record('c', '/m/c', 'cli')]);
  table.addDockerId('d', 'one');
  table.addDockerId('d', 'two');
  table.addDockerId('d', 'two');
  assert.deepEqual(table.get('d')!.dockerIds, ['one', 'two']);
  assert.equal(table.removeDockerId('d', 'one'), false);
  assert.equal(table.removeDockerId('d', 'two'), true);
  table.addDockerId('c', 'one');
  assert.equal(table.removeDockerId('c', 'one'), false, 'a volume the CLI attached stays attached');
  assert.equal(code(() => table.addDockerId('missing', 'x')), 'ENOENT');
});

test('blkid output: file system type, partition table', () => {
  assert.deepEqual(parseBlkid('DEVNAME=/dev/loop0\nUUID=abc\nBLOCK_SIZE=4096\nTYPE=ext4\n'), { type: 'ext4', partitionTable: null });
  assert.deepEqual(parseBlkid('DEVNAME=/dev/loop0\nPTUUID=1\nPTTYPE=gpt\n'), { type: null, partitionTable: 'gpt' });
  assert.deepEqual(parseBlkid(''), { type: null, partitionTable: null });
});

function fakeBackend(): PluginBackend & { volumes: Map<string, number>; table: AttachmentTable } {
  const volumes = new Map<string, number>();
  const table = new AttachmentTable();
  return {
    volumes,
    table,
    listVolumes: () => [...volumes].map(([name, sizeBytes]) => ({ name, sizeBytes, allocatedBytes: 0 })),
    volumeInfo: (name) => {
      const sizeBytes = volumes.get(name);
      if (sizeBytes === undefined) throw ChunkdError.notFound(`no volume named ${name}`);
      return { name, sizeBytes, allocatedBytes: 0 };
    },
    createVolume: async (name, sizeBytes) => {
      volumes.set(name, sizeBytes);
    },
    removeVolume: async (name) => {
      volumes.delete(name);
    },
    attachments: {
      get: (volume) => table.get(volume),
      dockerMount: async (volume, id, mountpoint) => {
        if (!volumes.has(volume)) throw ChunkdError.notFound(`no volume named ${volume}`);
        if (table.get(volume) === undefined) table.add(record(volume, mountpoint, 'docker'));
        table.addDockerId(volume, id);
        return table.get(volume)!;
      },
      dockerUnmount: async (volume, id) => {
        if (table.removeDockerId(volume, id)) table.remove(volume);
      },
    },
  };
}

test('plugin protocol: create with size, mount counted by ID, remove refused while mounted, errors as Err', async () => {
  const backend = fakeBackend();
  const call = (route: string, body: Record<string, unknown> = {}) => handlePluginRequest(backend, '/pool/mounts', route, body);
  assert.deepEqual(await call('/Plugin.Activate'), { Implements: ['VolumeDriver'] });
  assert.deepEqual(await call('/VolumeDriver.Capabilities'), { Capabilities: { Scope: 'local' } });
  await call('/VolumeDriver.Create', { Name: 'web', Opts: { size: '64MiB' } });
  await call('/VolumeDriver.Create', { Name: 'plain' });
  assert.equal(backend.volumes.get('web'), 64 * 1024 * 1024);
  assert.equal(backend.volumes.get('plain'), dockerDefaultSizeBytes);
  await call('/VolumeDriver.Create', { Name: 'web', Opts: { size: '64MiB' } });
  await assert.rejects(call('/VolumeDriver.Create', { Name: 'web', Opts: { size: '1GiB' } }), { code: 'EEXIST' });
  await assert.rejects(call('/VolumeDriver.Create', { Name: 'x', Opts: { color: 'blue' } }), { code: 'EINVAL' });
  await assert.rejects(call('/VolumeDriver.Create', { Name: '../etc' }), { code: 'EBADNAME' });
  assert.deepEqual(await call('/VolumeDriver.Path', { Name: 'web' }), { Mountpoint: '' });
  assert.deepEqual(await call('/VolumeDriver.Mount', { Name: 'web', ID: 'c1' }), { Mountpoint: '/pool/mounts/web' });
  assert.deepEqual(await call('/VolumeDriver.Mount', { Name: 'web', ID: 'c2' }), { Mountpoint: '/pool/mounts/web' });
  await assert.rejects(call('/VolumeDriver.Remove', { Name: 'web' }), { code: 'EBUSY' });
  await call('/VolumeDriver.Unmount', { Name: 'web', ID: 'c1' });
  assert.deepEqual(await call('/VolumeDriver.Path', { Name: 'web' }), { Mountpoint: '/pool/mounts/web' });
  await call('/VolumeDriver.Unmount', { Name: 'web', ID: 'c2' });
  assert.deepEqual(await call('/VolumeDriver.Path', { Name: 'web' }), { Mountpoint: '' });
  const got = (await call('/VolumeDriver.Get', { Name: 'web' })) as { Volume: { Name: string; Status: { sizeBytes: number } } };
  assert.equal(got.Volume.Name, 'web');
  assert.equal(got.Volume.Status.sizeBytes, 64 * 1024 * 1024);
  assert.deepEqual(await call('/VolumeDriver.List'), { Volumes: [{ Name: 'web', Mountpoint: '' }, { Name: 'plain', Mountpoint: '' }] });
  await call('/VolumeDriver.Remove', { Name: 'web' });
  assert.equal(backend.volumes.has('web'), false);
  await assert.rejects(call('/VolumeDriver.Get', { Name: 'web' }), { code: 'ENOENT' });
  await assert.rejects(call('/VolumeDriver.Mount', { Name: 'plain' }), { code: 'EINVAL' });
  await assert.rejects(call('/VolumeDriver.Nope', {}), { code: 'ENOENT' });
});
