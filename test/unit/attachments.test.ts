// Attachment records and the Docker plugin's answers, without mounting anything: the checks an attach must
// pass, the file format, the reference counting by caller ID, and the Err field of the plugin protocol.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { AttachmentTable, normalisePath, parseBlkid, planFileSystem, validateAttachRequest, type AttachmentRecord, type FileSystemFacts } from '../../src/node/attachment-table.ts';
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
  assert.deepEqual(validateAttachRequest('vol', { mountpoint: '/mnt//a/./b/' }), { volume: 'vol', mountpoint: '/mnt/a/b', fsType: null, via: 'fuse', format: false });
  assert.deepEqual(validateAttachRequest('vol', { mountpoint: '/m', fs: 'xfs', via: 'nbdfuse', format: true }), { volume: 'vol', mountpoint: '/m', fsType: 'xfs', via: 'nbdfuse', format: true });
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/m', format: 'yes' })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/m', format: 1 })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('../x', { mountpoint: '/m' })), 'EBADNAME');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: 'relative' })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/a/../b' })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/m', fs: 'btrfs' })), 'EINVAL');
  assert.equal(code(() => validateAttachRequest('vol', { mountpoint: '/m', via: 'nbd' })), 'EINVAL');
  assert.equal(normalisePath('/'), '/');
});

test('a volume attaches once; mountpoints may not coincide or nest', () => {
  const table = new AttachmentTable([record('a', '/mnt/a')]);
  const request = (volume: string, mountpoint: string) => ({ volume, mountpoint });
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

test('blkid output: file system type and usage, partition table', () => {
  assert.deepEqual(parseBlkid('DEVNAME=/dev/loop0\nUUID=abc\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n'), { type: 'ext4', usage: 'filesystem', partitionTable: null });
  assert.deepEqual(parseBlkid('DEVNAME=/dev/loop0\nPTUUID=1\nPTTYPE=gpt\n'), { type: null, usage: null, partitionTable: 'gpt' });
  assert.deepEqual(parseBlkid(''), { type: null, usage: null, partitionTable: null });
});

/** What attach knows about a volume's device: by default blkid found nothing and the volume holds 1 MiB. */
function facts(overrides: Partial<FileSystemFacts> & { exitCode?: number; stdout?: string; stderr?: string } = {}): FileSystemFacts {
  const { exitCode = 2, stdout = '', stderr = '', ...rest } = overrides;
  return { volume: 'vol', device: '/dev/loop7', probe: { exitCode, stdout, stderr }, allocatedBytes: 1024 * 1024, wantedFs: null, format: false, reattach: false, ...rest };
}

function refusal(input: FileSystemFacts): { code: string; message: string } {
  try {
    planFileSystem(input);
  } catch (error) {
    assert.ok(error instanceof ChunkdError, `not a ChunkdError: ${String(error)}`);
    return { code: error.code, message: error.message };
  }
  assert.fail('planFileSystem should have refused');
}

const ext4 = 'DEVNAME=/dev/loop7\nUUID=u\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n';

test('a file system is made only where blkid found nothing and the volume was never written, or format asks', () => {
  // Never written: nothing to destroy, with or without --fs.
  assert.deepEqual(planFileSystem(facts({ allocatedBytes: 0 })), { action: 'format', fsType: 'ext4' });
  assert.deepEqual(planFileSystem(facts({ allocatedBytes: 0, wantedFs: 'xfs' })), { action: 'format', fsType: 'xfs' });
  // Written, nothing recognised (raw data, a damaged superblock): refused, with what to do about it.
  const refused = refusal(facts({ allocatedBytes: 1024 * 1024 }));
  assert.equal(refused.code, 'EINVAL');
  assert.match(refused.message, /^volume vol holds 1 MiB \(1048576 bytes\) of data but no file system blkid recognises \(raw data, or a damaged superblock\)/);
  assert.match(refused.message, /never formats a volume that was written: attach it with --format .* destroying its contents$/);
  assert.equal(refusal(facts({ allocatedBytes: 4096, wantedFs: 'ext4' })).code, 'EINVAL', '--fs alone is not --format');
  // --format on that volume: made.
  assert.deepEqual(planFileSystem(facts({ format: true })), { action: 'format', fsType: 'ext4' });
  assert.deepEqual(planFileSystem(facts({ format: true, wantedFs: 'xfs' })), { action: 'format', fsType: 'xfs' });
  // A re-attach at start never formats, not even a volume never written.
  assert.equal(refusal(facts({ allocatedBytes: 0, reattach: true })).code, 'EIO');
  assert.equal(refusal(facts({ format: true, reattach: true })).code, 'EIO');
});

test('what blkid recognises is mounted or refused, never formatted', () => {
  assert.deepEqual(planFileSystem(facts({ exitCode: 0, stdout: ext4 })), { action: 'mount', fsType: 'ext4' });
  assert.deepEqual(planFileSystem(facts({ exitCode: 0, stdout: ext4, wantedFs: 'ext4', format: true })), { action: 'mount', fsType: 'ext4' });
  assert.deepEqual(planFileSystem(facts({ exitCode: 0, stdout: ext4, reattach: true })), { action: 'mount', fsType: 'ext4' });
  assert.deepEqual(planFileSystem(facts({ exitCode: 0, stdout: 'TYPE=btrfs\nUSAGE=filesystem\n' })), { action: 'mount', fsType: 'btrfs' });
  const other = refusal(facts({ exitCode: 0, stdout: ext4, wantedFs: 'xfs', format: true }));
  assert.deepEqual(other, { code: 'EINVAL', message: 'volume vol holds ext4, not xfs; it is never reformatted' });
  const table = refusal(facts({ exitCode: 0, stdout: 'PTUUID=1\nPTTYPE=gpt\n', format: true }));
  assert.deepEqual(table, { code: 'EINVAL', message: 'volume vol holds a gpt partition table, not a file system; refusing to format or mount it' });
  const swap = refusal(facts({ exitCode: 0, stdout: 'UUID=u\nVERSION=1\nTYPE=swap\nUSAGE=other\n', format: true }));
  assert.deepEqual(swap, { code: 'EINVAL', message: 'volume vol holds swap (other), not a file system; refusing to format or mount it' });
  assert.match(refusal(facts({ exitCode: 0, stdout: 'TYPE=crypto_LUKS\nUSAGE=crypto\n', allocatedBytes: 0 })).message, /holds crypto_LUKS \(crypto\), not a file system/);
  assert.equal(refusal(facts({ exitCode: 0, stdout: 'DEVNAME=/dev/loop7\n', allocatedBytes: 0 })).code, 'EIO', 'found something it did not name');
});

test('a blkid that fails is an error, never "no file system", whatever the volume holds and format says', () => {
  for (const allocatedBytes of [0, 1024 * 1024]) {
    for (const format of [false, true]) {
      // Ambivalent (two signatures), usage errors, anything else.
      for (const exitCode of [1, 4, 8, 127, -1]) {
        const failed = refusal(facts({ exitCode, stderr: 'blkid: something went wrong', allocatedBytes, format }));
        assert.equal(failed.code, 'EIO');
        assert.match(failed.message, new RegExp(`blkid -p /dev/loop7 failed on volume vol \\(exit ${exitCode}\\): blkid: something went wrong`));
      }
      // blkid exits 2 also when it cannot open the device: it says so on stderr.
      const unopened = refusal(facts({ exitCode: 2, stderr: 'blkid: error: /dev/loop7: No such device or address\n', allocatedBytes, format }));
      assert.equal(unopened.code, 'EIO');
      assert.match(unopened.message, /could not probe volume vol's device \(exit 2\): blkid: error: \/dev\/loop7: No such device or address$/);
    }
  }
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
    clusterVolumes: () => null,
    bringHere: async () => {},
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

test('plugin protocol in a cluster: Mount brings a volume another node owns here first; List, Get and Create answer with the cluster\'s volumes', async () => {
  const backend = fakeBackend();
  const cluster = [{ name: 'db', sizeBytes: 1024, owner: 'beta' }];
  const brought: string[] = [];
  backend.clusterVolumes = async () => cluster;
  backend.bringHere = async (volume) => {
    // As volume move does: the volume is here, owned by this node, once it returns.
    brought.push(volume);
    backend.volumes.set(volume, 1024);
    cluster[0]!.owner = 'alpha';
  };
  const call = (route: string, body: Record<string, unknown> = {}) => handlePluginRequest(backend, '/pool/mounts', route, body);
  // Docker calls Create before Mount on whichever node: a name the cluster has is there already.
  await call('/VolumeDriver.Create', { Name: 'db' });
  assert.equal(backend.volumes.has('db'), false, 'not created here');
  assert.deepEqual(await call('/VolumeDriver.List'), { Volumes: [{ Name: 'db', Mountpoint: '' }] });
  assert.deepEqual(await call('/VolumeDriver.Get', { Name: 'db' }), { Volume: { Name: 'db', Mountpoint: '', Status: { sizeBytes: 1024, owner: 'beta' } } });
  await assert.rejects(call('/VolumeDriver.Get', { Name: 'nope' }), { code: 'ENOENT', message: /volume nope is not in the cluster/ });
  assert.deepEqual(await call('/VolumeDriver.Mount', { Name: 'db', ID: 'c1' }), { Mountpoint: '/pool/mounts/db' });
  assert.deepEqual(brought, ['db']);
  assert.deepEqual(await call('/VolumeDriver.Get', { Name: 'db' }), { Volume: { Name: 'db', Mountpoint: '/pool/mounts/db', Status: { sizeBytes: 1024, owner: 'alpha' } } });
  // A Mount that cannot bring the volume here mounts nothing.
  backend.bringHere = async (volume) => {
    throw new Error(`the move of volume ${volume} to alpha was given up`);
  };
  await assert.rejects(call('/VolumeDriver.Mount', { Name: 'other', ID: 'c2' }), /was given up/);
  assert.equal(backend.table.get('other'), undefined);
});
