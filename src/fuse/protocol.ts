// The FUSE kernel protocol (include/uapi/linux/fuse.h), as much of it as a file system of a few fixed files needs:
// decoding requests read from /dev/fuse and encoding replies. Pure: no I/O, unit-tested directly.
//
// Why speak the kernel protocol instead of going through libfuse (fuse-native): fuse-native 2.2.6 has no
// fallocate operation (so no punch-hole, which is how a loop device's discard becomes a TRIM), libfuse2 caps a
// request at 128 KiB (it never negotiates FUSE_MAX_PAGES), and every request parks a libfuse thread while a
// JavaScript callback runs. Here a request is a buffer read from /dev/fuse and a reply is one write; requests
// of 1 MiB arrive whole (FUSE_MAX_PAGES, max_pages 256) and many are in flight at once.
//
// Layout of a request: fuse_in_header (40 bytes) then the operation's argument struct; of a reply:
// fuse_out_header (16 bytes: length, negative errno, unique) then the operation's reply struct.
import { assert } from '../core/assert.ts';

export const FUSE_KERNEL_VERSION = 7;
/** The minor version we speak: 7.31 has FUSE_MAX_PAGES (7.28) and the 64-byte init reply. */
export const FUSE_KERNEL_MINOR_VERSION = 31;

export const inHeaderBytes = 40;
export const outHeaderBytes = 16;
export const rootNodeId = 1;

export const Opcode = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  RENAME2: 45,
} as const;

/** fuse_init_out.flags we ask for (the kernel grants the intersection with what it offered). */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  ASYNC_DIO: 1 << 15,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
} as const;

export const OpenFlag = {
  /** Bypass the page cache of the FUSE file: no double caching under a loop device, and NBD writes stay visible. */
  DIRECT_IO: 1 << 0,
  /** Direct writes to one file run in parallel instead of under the inode lock (kernel 6.2+; older ones ignore it). */
  PARALLEL_DIRECT_WRITES: 1 << 6,
} as const;

export const FATTR_SIZE = 1 << 3;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const DT_DIR = 4;
export const DT_REG = 8;

export interface InHeader {
  lengthBytes: number;
  opcode: number;
  /** The kernel's request id: a counter far below 2^53, so a number holds it exactly. */
  unique: number;
  nodeId: number;
  uid: number;
  gid: number;
  pid: number;
}

/** A 64-bit little-endian count as a number (exact below 2^53; offsets and sizes of volumes are far below). */
export function readU64(buffer: Buffer, at: number): number {
  return buffer.readUInt32LE(at) + buffer.readUInt32LE(at + 4) * 0x1_0000_0000;
}

export function writeU64(buffer: Buffer, at: number, value: number): void {
  buffer.writeUInt32LE(value >>> 0, at);
  buffer.writeUInt32LE(Math.floor(value / 0x1_0000_0000), at + 4);
}

/**
 * The size of fuse.h's argument struct for each request whose arguments are decoded here: a shorter body is
 * refused by checkRequest before any decoder reads past its end.
 */
const argumentBytesMin: Partial<Record<number, number>> = {
  [Opcode.INIT]: 16, // fuse_init_in up to flags; newer kernels send more
  [Opcode.SETATTR]: 88, // fuse_setattr_in
  [Opcode.OPEN]: 8, // fuse_open_in
  [Opcode.OPENDIR]: 8,
  [Opcode.READ]: 40, // fuse_read_in
  [Opcode.READDIR]: 40,
  [Opcode.WRITE]: 40, // fuse_write_in, then the data
  [Opcode.RELEASE]: 24, // fuse_release_in
  [Opcode.RELEASEDIR]: 24,
  [Opcode.FSYNC]: 16, // fuse_fsync_in
  [Opcode.FALLOCATE]: 32, // fuse_fallocate_in
};

const EINVAL = 22;

/**
 * Validates one request as one read of /dev/fuse returned it, once, before anything decodes it: 0 if it may go
 * on, else the errno to answer. The kernel sends well-formed frames, but a frame that does not parse gets an
 * errno and never reaches an assertion (core/fail-stop.ts). READ and WRITE may move at most `ioBytesMax` bytes.
 */
export function checkRequest(frame: Buffer, ioBytesMax: number): number {
  if (frame.length < inHeaderBytes || frame.readUInt32LE(0) !== frame.length) return EINVAL;
  const opcode = frame.readUInt32LE(4);
  const bodyBytes = frame.length - inHeaderBytes;
  if (bodyBytes < (argumentBytesMin[opcode] ?? 0)) return EINVAL;
  if (opcode === Opcode.READ || opcode === Opcode.WRITE) {
    const sizeBytes = frame.readUInt32LE(inHeaderBytes + 16);
    if (sizeBytes > ioBytesMax) return EINVAL;
    if (opcode === Opcode.WRITE && bodyBytes !== writeInBytes + sizeBytes) return EINVAL;
  }
  return 0;
}

/** Decodes the header of one request that checkRequest passed. */
export function decodeInHeader(buffer: Buffer): InHeader {
  assert(buffer.length >= inHeaderBytes, 'FUSE request shorter than its header');
  const header = {
    lengthBytes: buffer.readUInt32LE(0),
    opcode: buffer.readUInt32LE(4),
    unique: readU64(buffer, 8),
    nodeId: readU64(buffer, 16),
    uid: buffer.readUInt32LE(24),
    gid: buffer.readUInt32LE(28),
    pid: buffer.readUInt32LE(32),
  };
  assert(header.lengthBytes === buffer.length, `FUSE request length ${header.lengthBytes} but ${buffer.length} bytes read`);
  return header;
}

export interface InitIn {
  major: number;
  minor: number;
  maxReadaheadBytes: number;
  flags: number;
}

export function decodeInit(body: Buffer): InitIn {
  return { major: body.readUInt32LE(0), minor: body.readUInt32LE(4), maxReadaheadBytes: body.readUInt32LE(8), flags: body.readUInt32LE(12) };
}

export interface InitOut {
  minor: number;
  maxReadaheadBytes: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWriteBytes: number;
  maxPages: number;
}

/** fuse_init_out: 64 bytes since 7.23. */
export function encodeInit(out: InitOut): Buffer {
  const body = Buffer.alloc(64);
  body.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
  body.writeUInt32LE(out.minor, 4);
  body.writeUInt32LE(out.maxReadaheadBytes, 8);
  body.writeUInt32LE(out.flags >>> 0, 12);
  body.writeUInt16LE(out.maxBackground, 16);
  body.writeUInt16LE(out.congestionThreshold, 18);
  body.writeUInt32LE(out.maxWriteBytes, 20);
  body.writeUInt32LE(1, 24); // time_gran: nanoseconds
  body.writeUInt16LE(out.maxPages, 28);
  return body;
}

export interface Attr {
  ino: number;
  sizeBytes: number;
  /** 512-byte blocks allocated. */
  blocks: number;
  timeMs: number;
  mode: number;
  nlink: number;
}

const attrBytes = 88;

function writeAttr(target: Buffer, at: number, attr: Attr): void {
  const seconds = BigInt(Math.floor(attr.timeMs / 1000));
  const nanos = (attr.timeMs % 1000) * 1_000_000;
  target.writeBigUInt64LE(BigInt(attr.ino), at);
  target.writeBigUInt64LE(BigInt(attr.sizeBytes), at + 8);
  target.writeBigUInt64LE(BigInt(attr.blocks), at + 16);
  for (let i = 0; i < 3; i++) {
    target.writeBigUInt64LE(seconds, at + 24 + i * 8);
    target.writeUInt32LE(nanos, at + 48 + i * 4);
  }
  target.writeUInt32LE(attr.mode, at + 60);
  target.writeUInt32LE(attr.nlink, at + 64);
  // uid, gid, rdev stay 0 (root); blksize 4096: the unit a volume maps.
  target.writeUInt32LE(4096, at + 80);
}

function writeValidity(target: Buffer, at: number, validMs: number): void {
  target.writeBigUInt64LE(BigInt(Math.floor(validMs / 1000)), at);
}

/** fuse_attr_out: attr_valid (seconds), attr_valid_nsec, dummy, then fuse_attr. */
export function encodeAttrOut(attr: Attr, validMs: number): Buffer {
  const body = Buffer.alloc(16 + attrBytes);
  writeValidity(body, 0, validMs);
  body.writeUInt32LE((validMs % 1000) * 1_000_000, 8);
  writeAttr(body, 16, attr);
  return body;
}

/** fuse_entry_out: nodeid, generation, entry_valid, attr_valid, their nanoseconds, then fuse_attr. */
export function encodeEntryOut(attr: Attr, validMs: number): Buffer {
  const body = Buffer.alloc(40 + attrBytes);
  body.writeBigUInt64LE(BigInt(attr.ino), 0);
  writeValidity(body, 16, validMs);
  writeValidity(body, 24, validMs);
  body.writeUInt32LE((validMs % 1000) * 1_000_000, 32);
  body.writeUInt32LE((validMs % 1000) * 1_000_000, 36);
  writeAttr(body, 40, attr);
  return body;
}

/** fuse_open_out: fh, open_flags, padding. */
export function encodeOpenOut(fh: number, openFlags: number): Buffer {
  const body = Buffer.alloc(16);
  body.writeBigUInt64LE(BigInt(fh), 0);
  body.writeUInt32LE(openFlags, 8);
  return body;
}

export function encodeWriteOut(sizeBytes: number): Buffer {
  const body = Buffer.alloc(8);
  body.writeUInt32LE(sizeBytes, 0);
  return body;
}

/** Bytes in front of a reply body for its fuse_out_header, when a handler builds the whole frame. */
export const replyHeadroomBytes = 16;

export interface StatfsOut {
  blocks: number;
  blocksFree: number;
  files: number;
  blockBytes: number;
}

/** fuse_statfs_out (fuse_kstatfs): blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]. */
export function encodeStatfsOut(out: StatfsOut): Buffer {
  const body = Buffer.alloc(80);
  body.writeBigUInt64LE(BigInt(out.blocks), 0);
  body.writeBigUInt64LE(BigInt(out.blocksFree), 8);
  body.writeBigUInt64LE(BigInt(out.blocksFree), 16);
  body.writeBigUInt64LE(BigInt(out.files), 24);
  body.writeUInt32LE(out.blockBytes, 40);
  body.writeUInt32LE(255, 44);
  body.writeUInt32LE(out.blockBytes, 48);
  return body;
}

export interface DirEntry {
  ino: number;
  name: string;
  type: number;
}

/**
 * fuse_dirent records (ino, offset of the next entry, name length, type, name padded to 8 bytes) for the
 * entries from index `offset` on, as many as fit in `sizeBytes`.
 */
export function encodeDirents(entries: DirEntry[], offset: number, sizeBytes: number): Buffer {
  const parts: Buffer[] = [];
  let used = 0;
  for (let i = offset; i < entries.length; i++) {
    const entry = entries[i]!;
    const name = Buffer.from(entry.name, 'utf8');
    const recordBytes = 24 + Math.ceil(name.length / 8) * 8;
    if (used + recordBytes > sizeBytes) break;
    const record = Buffer.alloc(recordBytes);
    record.writeBigUInt64LE(BigInt(entry.ino), 0);
    record.writeBigUInt64LE(BigInt(i + 1), 8);
    record.writeUInt32LE(name.length, 16);
    record.writeUInt32LE(entry.type, 20);
    name.copy(record, 24);
    parts.push(record);
    used += recordBytes;
  }
  return Buffer.concat(parts, used);
}

/** fuse_read_in (READ, READDIR) and the first fields of fuse_write_in: fh, offset, size. */
export function decodeIo(body: Buffer): { fh: number; offsetBytes: number; sizeBytes: number } {
  return { fh: readU64(body, 0), offsetBytes: readU64(body, 8), sizeBytes: body.readUInt32LE(16) };
}

/** fuse_write_in is 40 bytes, the data follows it. */
export const writeInBytes = 40;

export function decodeOpen(body: Buffer): { flags: number } {
  return { flags: body.readUInt32LE(0) };
}

/** fh of RELEASE, RELEASEDIR, FLUSH, FSYNC: the first field of each. */
export function decodeFh(body: Buffer): number {
  return readU64(body, 0);
}

export function decodeSetattr(body: Buffer): { valid: number; sizeBytes: number } {
  return { valid: body.readUInt32LE(0), sizeBytes: readU64(body, 16) };
}

export function decodeFallocate(body: Buffer): { fh: number; offsetBytes: number; lengthBytes: number; mode: number } {
  return { fh: readU64(body, 0), offsetBytes: readU64(body, 8), lengthBytes: readU64(body, 16), mode: body.readUInt32LE(24) };
}

/** A NUL-terminated name (LOOKUP). */
export function decodeName(body: Buffer): string {
  const end = body.indexOf(0);
  return body.toString('utf8', 0, end < 0 ? body.length : end);
}

/** fuse_out_header, written in front of `bodyBytes` of reply; `errno` positive (0 for success). */
export function encodeOutHeader(target: Buffer, unique: number, errno: number, bodyBytes: number): void {
  assert(errno >= 0, 'errno is positive here; the header carries it negated');
  target.writeUInt32LE(outHeaderBytes + bodyBytes, 0);
  target.writeInt32LE(-errno, 4);
  writeU64(target, 8, unique);
}

/** Operations the kernel sends without waiting for a reply. */
export function expectsReply(opcode: number): boolean {
  return opcode !== Opcode.FORGET && opcode !== Opcode.BATCH_FORGET && opcode !== Opcode.INTERRUPT;
}
