// The FUSE kernel protocol codec against hand-built bytes (layouts from include/uapi/linux/fuse.h).
import assert from 'node:assert/strict';
import { test } from 'vitest';
import {
  checkRequest,
  decodeFallocate,
  decodeFh,
  decodeInHeader,
  decodeInit,
  decodeIo,
  decodeName,
  decodeOpen,
  decodeSetattr,
  encodeAttrOut,
  encodeDirents,
  encodeEntryOut,
  encodeInit,
  encodeOpenOut,
  encodeOutHeader,
  encodeStatfsOut,
  expectsReply,
  Opcode,
  S_IFREG,
  writeInBytes,
} from '../../src/fuse/protocol.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

function request(opcode: number, nodeId: number, body: Buffer): Buffer {
  const header = Buffer.alloc(40);
  header.writeUInt32LE(40 + body.length, 0);
  header.writeUInt32LE(opcode, 4);
  header.writeBigUInt64LE(0x1234567890n, 8);
  header.writeBigUInt64LE(BigInt(nodeId), 16);
  header.writeUInt32LE(1000, 24);
  header.writeUInt32LE(1001, 28);
  header.writeUInt32LE(4242, 32);
  return Buffer.concat([header, body]);
}

test('in header: every field, and a length that disagrees with the read is a bug', () => {
  const bytes = request(Opcode.LOOKUP, 7, Buffer.from('vol\0'));
  assert.deepEqual(decodeInHeader(bytes), { lengthBytes: 44, opcode: Opcode.LOOKUP, unique: 0x1234567890, nodeId: 7, uid: 1000, gid: 1001, pid: 4242 });
  assert.equal(decodeName(bytes.subarray(40)), 'vol');
  assert.throws(() => decodeInHeader(bytes.subarray(0, 42)));
});

test('checkRequest: frames that do not parse are EINVAL, before any decoder reads them', () => {
  const MiB = 1024 * 1024;
  const io = (fh: number, offset: number, size: number): Buffer => {
    const body = Buffer.alloc(40);
    body.writeBigUInt64LE(BigInt(fh), 0);
    body.writeBigUInt64LE(BigInt(offset), 8);
    body.writeUInt32LE(size, 16);
    return body;
  };
  assert.equal(checkRequest(request(Opcode.LOOKUP, 1, Buffer.from('vol\0')), MiB), 0);
  assert.equal(checkRequest(request(Opcode.READ, 3, io(1, 0, 4096)), MiB), 0);
  assert.equal(checkRequest(request(Opcode.WRITE, 3, Buffer.concat([io(1, 0, 512), Buffer.alloc(512)])), MiB), 0);
  assert.equal(checkRequest(request(Opcode.GETATTR, 1, Buffer.alloc(0)), MiB), 0, 'arguments nothing decodes are not required');
  assert.equal(checkRequest(request(Opcode.LOOKUP, 1, Buffer.alloc(0)).subarray(0, 39), MiB), 22, 'shorter than a header');
  assert.equal(checkRequest(request(Opcode.LOOKUP, 1, Buffer.from('vol\0')).subarray(0, 42), MiB), 22, 'length disagrees with the read');
  assert.equal(checkRequest(request(Opcode.READ, 3, io(1, 0, 4096).subarray(0, 20)), MiB), 22, 'READ arguments cut short');
  assert.equal(checkRequest(request(Opcode.READ, 3, io(1, 0, MiB + 1)), MiB), 22, 'READ over the maximum');
  assert.equal(checkRequest(request(Opcode.WRITE, 3, Buffer.concat([io(1, 0, 512), Buffer.alloc(511)])), MiB), 22, 'WRITE data shorter than its size');
  assert.equal(checkRequest(request(Opcode.SETATTR, 3, Buffer.alloc(24)), MiB), 22);
  assert.equal(checkRequest(request(Opcode.FALLOCATE, 3, Buffer.alloc(28)), MiB), 22);
  assert.equal(checkRequest(request(Opcode.INIT, 0, Buffer.alloc(12)), MiB), 22);

  // Seeded: random frames and cut or stretched valid ones; whatever passes decodes without throwing.
  const seed = testSeed('fuse checkRequest fuzz');
  const random = makeRandom(seed);
  const opcodes = [Opcode.INIT, Opcode.LOOKUP, Opcode.SETATTR, Opcode.OPEN, Opcode.READ, Opcode.WRITE, Opcode.RELEASE, Opcode.FSYNC, Opcode.READDIR, Opcode.FALLOCATE, randomInt(random, 64)];
  for (let iteration = 0; iteration < 20_000; iteration += 1) {
    const opcode = opcodes[randomInt(random, opcodes.length)]!;
    const body = Buffer.alloc(randomInt(random, 120));
    for (let i = 0; i < body.length; i += 1) body[i] = random() < 0.7 ? 0 : randomInt(random, 256);
    if (opcode === Opcode.WRITE && body.length >= 20) body.writeUInt32LE(random() < 0.5 ? Math.max(0, body.length - writeInBytes) : randomInt(random, 2 ** 32), 16);
    let frame = request(opcode, randomInt(random, 8), body);
    if (random() < 0.2) frame = frame.subarray(0, randomInt(random, frame.length + 1));
    if (random() < 0.1 && frame.length >= 4) frame.writeUInt32LE(randomInt(random, 200), 0);
    if (checkRequest(frame, MiB) !== 0) continue;
    const header = decodeInHeader(frame);
    const args = frame.subarray(40);
    switch (header.opcode) {
      case Opcode.INIT: decodeInit(args); break;
      case Opcode.LOOKUP: decodeName(args); break;
      case Opcode.SETATTR: decodeSetattr(args); break;
      case Opcode.OPEN: decodeOpen(args); break;
      case Opcode.READ: case Opcode.READDIR: decodeIo(args); break;
      case Opcode.WRITE: assert.equal(args.length, writeInBytes + decodeIo(args).sizeBytes, `seed ${seed}`); break;
      case Opcode.RELEASE: case Opcode.FSYNC: decodeFh(args); break;
      case Opcode.FALLOCATE: decodeFallocate(args); break;
    }
  }
});

test('init: request fields and the 64-byte reply', () => {
  const body = Buffer.alloc(64);
  body.writeUInt32LE(7, 0);
  body.writeUInt32LE(45, 4);
  body.writeUInt32LE(131072, 8);
  body.writeUInt32LE(0x73fffffb, 12);
  assert.deepEqual(decodeInit(body), { major: 7, minor: 45, maxReadaheadBytes: 131072, flags: 0x73fffffb });
  const out = encodeInit({ minor: 31, maxReadaheadBytes: 131072, flags: 1 << 22, maxBackground: 128, congestionThreshold: 96, maxWriteBytes: 1 << 20, maxPages: 256 });
  assert.equal(out.length, 64);
  assert.equal(out.readUInt32LE(0), 7);
  assert.equal(out.readUInt32LE(4), 31);
  assert.equal(out.readUInt32LE(12), 1 << 22);
  assert.equal(out.readUInt16LE(16), 128);
  assert.equal(out.readUInt16LE(18), 96);
  assert.equal(out.readUInt32LE(20), 1 << 20);
  assert.equal(out.readUInt16LE(28), 256);
});

test('attr and entry replies: sizes and field offsets', () => {
  const attr = { ino: 5, sizeBytes: 2 ** 40, blocks: 2048, timeMs: 1_700_000_000_123, mode: S_IFREG | 0o600, nlink: 1 };
  const attrOut = encodeAttrOut(attr, 1500);
  assert.equal(attrOut.length, 104);
  assert.equal(attrOut.readBigUInt64LE(0), 1n);
  assert.equal(attrOut.readUInt32LE(8), 500_000_000);
  assert.equal(attrOut.readBigUInt64LE(16), 5n);
  assert.equal(attrOut.readBigUInt64LE(24), 2n ** 40n);
  assert.equal(attrOut.readBigUInt64LE(32), 2048n);
  assert.equal(attrOut.readBigUInt64LE(48), 1_700_000_000n); // mtime seconds
  assert.equal(attrOut.readUInt32LE(16 + 52), 123_000_000); // mtime nanoseconds
  assert.equal(attrOut.readUInt32LE(16 + 60), S_IFREG | 0o600);
  assert.equal(attrOut.readUInt32LE(16 + 80), 4096);
  const entry = encodeEntryOut(attr, 1000);
  assert.equal(entry.length, 128);
  assert.equal(entry.readBigUInt64LE(0), 5n);
  assert.equal(entry.readBigUInt64LE(40), 5n);
  assert.equal(entry.readBigUInt64LE(48), 2n ** 40n);
});

test('read, write, setattr and fallocate arguments', () => {
  const io = Buffer.alloc(40);
  io.writeBigUInt64LE(9n, 0);
  io.writeBigUInt64LE(2n ** 33n + 4096n, 8);
  io.writeUInt32LE(1 << 20, 16);
  assert.deepEqual(decodeIo(io), { fh: 9, offsetBytes: 2 ** 33 + 4096, sizeBytes: 1 << 20 });
  const setattr = Buffer.alloc(88);
  setattr.writeUInt32LE(8, 0);
  setattr.writeBigUInt64LE(12345n, 16);
  assert.deepEqual(decodeSetattr(setattr), { valid: 8, sizeBytes: 12345 });
  const fallocate = Buffer.alloc(32);
  fallocate.writeBigUInt64LE(3n, 0);
  fallocate.writeBigUInt64LE(8192n, 8);
  fallocate.writeBigUInt64LE(65536n, 16);
  fallocate.writeUInt32LE(3, 24);
  assert.deepEqual(decodeFallocate(fallocate), { fh: 3, offsetBytes: 8192, lengthBytes: 65536, mode: 3 });
});

test('dirents: 8-byte aligned records, next offsets, and only what fits', () => {
  const entries = [
    { ino: 1, name: '.', type: 4 },
    { ino: 1, name: '..', type: 4 },
    { ino: 3, name: 'volume-a', type: 8 },
    { ino: 4, name: 'b', type: 8 },
  ];
  const all = encodeDirents(entries, 0, 4096);
  assert.equal(all.length, 32 + 32 + 32 + 32);
  assert.equal(all.readBigUInt64LE(64), 3n);
  assert.equal(all.readBigUInt64LE(72), 3n); // offset of the next entry
  assert.equal(all.readUInt32LE(80), 8);
  assert.equal(all.toString('utf8', 88, 96), 'volume-a');
  assert.equal(encodeDirents(entries, 2, 4096).length, 64);
  assert.equal(encodeDirents(entries, 0, 70).length, 64);
  assert.equal(encodeDirents(entries, 4, 4096).length, 0);
});

test('out header carries the negated errno; open and statfs replies', () => {
  const header = Buffer.alloc(16);
  encodeOutHeader(header, 2 ** 40 + 77, 28, 0);
  assert.equal(header.readUInt32LE(0), 16);
  assert.equal(header.readInt32LE(4), -28);
  assert.equal(header.readBigUInt64LE(8), 2n ** 40n + 77n);
  assert.throws(() => encodeOutHeader(header, 1, -1, 0));
  const open = encodeOpenOut(12, 65);
  assert.equal(open.readBigUInt64LE(0), 12n);
  assert.equal(open.readUInt32LE(8), 65);
  assert.equal(encodeStatfsOut({ blocks: 100, blocksFree: 40, files: 2, blockBytes: 4096 }).length, 80);
  assert.equal(expectsReply(Opcode.FORGET), false);
  assert.equal(expectsReply(Opcode.BATCH_FORGET), false);
  assert.equal(expectsReply(Opcode.INTERRUPT), false);
  assert.equal(expectsReply(Opcode.READ), true);
});
