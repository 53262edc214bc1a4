// The FUSE file system's answers, driven with encoded requests against memory devices: names, sizes, reads
// and writes clamped at the end, punch-hole as trim, read-only snapshots, refused truncation.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { Opcode, type InHeader } from '../../src/fuse/protocol.ts';
import { VolumeFileSystem, type FuseCatalog } from '../../src/fuse/volume-fs.ts';
import type { FuseReply } from '../../src/fuse/session.ts';
import { MemoryProvider } from './helpers/memory-device.ts';

const MiB = 1024 * 1024;

function setup(): { fs: VolumeFileSystem; provider: MemoryProvider } {
  const provider = new MemoryProvider();
  provider.add('vol', 4 * MiB);
  provider.add('vol@snap', 2 * MiB, { readOnly: true });
  const catalog: FuseCatalog = {
    listVolumes: () => [{ name: 'vol', sizeBytes: 4 * MiB, allocatedBytes: 8192, snapshots: ['snap'] }],
    open: (name) => provider.open(name),
  };
  return { fs: new VolumeFileSystem(catalog), provider };
}

function header(opcode: number, nodeId: number): InHeader {
  return { lengthBytes: 0, opcode, unique: 1, nodeId, uid: 0, gid: 0, pid: 1 };
}

function errnoOf(reply: FuseReply): number {
  return typeof reply === 'number' ? reply : 0;
}

function body(reply: FuseReply): Buffer {
  assert.ok(typeof reply !== 'number', `expected a reply body, got errno ${String(reply)}`);
  return Buffer.isBuffer(reply) ? reply : reply.frame.subarray(16);
}

function u64s(...values: number[]): Buffer {
  const buffer = Buffer.alloc(values.length * 8);
  values.forEach((value, i) => buffer.writeBigUInt64LE(BigInt(value), i * 8));
  return buffer;
}

function ioIn(fh: number, offsetBytes: number, sizeBytes: number, data?: Buffer): Buffer {
  const buffer = Buffer.alloc(40);
  buffer.writeBigUInt64LE(BigInt(fh), 0);
  buffer.writeBigUInt64LE(BigInt(offsetBytes), 8);
  buffer.writeUInt32LE(sizeBytes, 16);
  return data === undefined ? buffer : Buffer.concat([buffer, data]);
}

async function lookup(fs: VolumeFileSystem, parent: number, name: string): Promise<{ ino: number; sizeBytes: number; blocks: number; mode: number }> {
  const entry = body(await fs.handle(header(Opcode.LOOKUP, parent), Buffer.from(`${name}\0`)));
  return { ino: Number(entry.readBigUInt64LE(0)), sizeBytes: Number(entry.readBigUInt64LE(48)), blocks: Number(entry.readBigUInt64LE(56)), mode: entry.readUInt32LE(100) };
}

async function open(fs: VolumeFileSystem, ino: number, flags: number): Promise<number> {
  const flagsIn = Buffer.alloc(8);
  flagsIn.writeUInt32LE(flags, 0);
  return Number(body(await fs.handle(header(Opcode.OPEN, ino), flagsIn)).readBigUInt64LE(0));
}

test('lookup: volume files with size and blocks, the snapshots directory, and missing names', async () => {
  const { fs } = setup();
  const volume = await lookup(fs, 1, 'vol');
  assert.equal(volume.sizeBytes, 4 * MiB);
  assert.equal(volume.blocks, 16);
  assert.equal(volume.mode, 0o100600);
  const snapshots = await lookup(fs, 1, '.snapshots');
  assert.equal(snapshots.ino, 2);
  const snapshot = await lookup(fs, 2, 'vol@snap');
  assert.equal(snapshot.sizeBytes, 2 * MiB);
  assert.equal(snapshot.mode, 0o100400);
  assert.equal(errnoOf(await fs.handle(header(Opcode.LOOKUP, 1), Buffer.from('nope\0'))), 2);
  assert.equal(errnoOf(await fs.handle(header(Opcode.LOOKUP, 2), Buffer.from('vol@other\0'))), 2);
});

test('read and write are clamped at the end; a write past it is ENOSPC; fsync flushes', async () => {
  const { fs, provider } = setup();
  const { ino } = await lookup(fs, 1, 'vol');
  const fh = await open(fs, ino, 2);
  const data = Buffer.alloc(8192, 0xab);
  const written = body(await fs.handle(header(Opcode.WRITE, ino), ioIn(fh, 4 * MiB - 4096, 8192, data)));
  assert.equal(written.readUInt32LE(0), 4096, 'a write across the end is short');
  assert.equal(errnoOf(await fs.handle(header(Opcode.WRITE, ino), ioIn(fh, 4 * MiB, 4096, data.subarray(0, 4096)))), 28);
  const read = body(await fs.handle(header(Opcode.READ, ino), ioIn(fh, 4 * MiB - 4096, 65536)));
  assert.equal(read.length, 4096);
  assert.ok(read.every((byte) => byte === 0xab));
  assert.equal(body(await fs.handle(header(Opcode.READ, ino), ioIn(fh, 4 * MiB, 4096))).length, 0);
  const flushesBefore = provider.flushes;
  assert.equal(errnoOf(await fs.handle(header(Opcode.FSYNC, ino), u64s(fh, 0))), 0);
  assert.equal(provider.flushes, flushesBefore + 1);
  assert.equal(fs.openFileCount(), 1);
  assert.equal(errnoOf(await fs.handle(header(Opcode.RELEASE, ino), u64s(fh, 0, 0))), 0);
  assert.equal(fs.openFileCount(), 0);
});

test('fallocate: punch-hole trims, zero-range zeroes, plain allocation is EOPNOTSUPP', async () => {
  const { fs, provider } = setup();
  const { ino } = await lookup(fs, 1, 'vol');
  const fh = await open(fs, ino, 2);
  await fs.handle(header(Opcode.WRITE, ino), ioIn(fh, 0, 65536, Buffer.alloc(65536, 7)));
  const fallocate = (offset: number, length: number, mode: number): Buffer => {
    const buffer = u64s(fh, offset, length, mode);
    return buffer;
  };
  assert.equal(errnoOf(await fs.handle(header(Opcode.FALLOCATE, ino), fallocate(1000, 20000, 3))), 0);
  const disk = provider.exports.get('vol')!.disk;
  assert.ok(disk.data.subarray(1000, 21000).every((byte) => byte === 0));
  assert.equal(disk.data[999], 7);
  assert.equal(disk.data[21000], 7);
  assert.ok(provider.writeLog.some((entry) => entry.op === 'trim'));
  assert.equal(errnoOf(await fs.handle(header(Opcode.FALLOCATE, ino), fallocate(30000, 100, 0x10 | 1))), 0);
  assert.ok(disk.data.subarray(30000, 30100).every((byte) => byte === 0));
  assert.equal(errnoOf(await fs.handle(header(Opcode.FALLOCATE, ino), fallocate(0, 4096, 0))), 95);
  // Punching past the end stops at the end; zeroing past it would grow the file.
  assert.equal(errnoOf(await fs.handle(header(Opcode.FALLOCATE, ino), fallocate(4 * MiB - 4096, 65536, 3))), 0);
  assert.equal(errnoOf(await fs.handle(header(Opcode.FALLOCATE, ino), fallocate(4 * MiB - 4096, 65536, 0x10))), 28);
});

test('snapshots are read-only; size changes are refused; names are managed through the API', async () => {
  const { fs } = setup();
  const { ino } = await lookup(fs, 2, 'vol@snap');
  const flags = Buffer.alloc(8);
  flags.writeUInt32LE(2, 0);
  assert.equal(errnoOf(await fs.handle(header(Opcode.OPEN, ino), flags)), 30);
  const fh = await open(fs, ino, 0);
  assert.equal(body(await fs.handle(header(Opcode.READ, ino), ioIn(fh, 0, 4096))).length, 4096);
  const volume = await lookup(fs, 1, 'vol');
  const setattr = Buffer.alloc(88);
  setattr.writeUInt32LE(8, 0);
  setattr.writeBigUInt64LE(BigInt(MiB), 16);
  assert.equal(errnoOf(await fs.handle(header(Opcode.SETATTR, volume.ino), setattr)), 1);
  setattr.writeBigUInt64LE(BigInt(4 * MiB), 16);
  assert.equal(errnoOf(await fs.handle(header(Opcode.SETATTR, volume.ino), setattr)), 0, 'setting the same size is fine (O_TRUNC of nothing)');
  assert.equal(errnoOf(await fs.handle(header(Opcode.UNLINK, 1), Buffer.from('vol\0'))), 1);
  assert.equal(errnoOf(await fs.handle(header(Opcode.CREATE, 1), Buffer.alloc(16))), 1);
  assert.equal(errnoOf(await fs.handle(header(Opcode.GETXATTR, volume.ino), Buffer.alloc(16))), 38);
});

test('readdir lists volumes and .snapshots, and snapshot files in .snapshots', async () => {
  const { fs } = setup();
  const list = async (ino: number): Promise<string[]> => {
    const fh = Number(body(await fs.handle(header(Opcode.OPENDIR, ino), Buffer.alloc(8))).readBigUInt64LE(0));
    const dirents = body(await fs.handle(header(Opcode.READDIR, ino), ioIn(fh, 0, 4096)));
    const names: string[] = [];
    for (let at = 0; at < dirents.length; ) {
      const length = dirents.readUInt32LE(at + 16);
      names.push(dirents.toString('utf8', at + 24, at + 24 + length));
      at += 24 + Math.ceil(length / 8) * 8;
    }
    await fs.handle(header(Opcode.RELEASEDIR, ino), u64s(fh, 0, 0));
    return names;
  };
  assert.deepEqual(await list(1), ['.', '..', 'vol', '.snapshots']);
  assert.deepEqual(await list(2), ['.', '..', 'vol@snap']);
});
