// The file system the FUSE front end shows: one file per volume, `DIR/<volume>`, read-write and as large as the
// volume, and `DIR/.snapshots/<volume>@<snapshot>`, read-only. Each open file is a BlockDevice from the node
// (the same interface the NBD server speaks), so an open FUSE file counts as an open export: `volume rm` is
// refused while a loop device holds it.
//
// Map of operations: READ/WRITE → read/write (clamped at the end: a read past it is short, a write past it
// ENOSPC); FSYNC → flush (durable, as NBD FLUSH); FALLOCATE with PUNCH_HOLE → trim, with ZERO_RANGE →
// writeZeroes; a SETATTR that changes the size → EPERM (sizes change through `chunkd volume resize`).
// Names are created and removed only through the management API: mknod, unlink, rename and the like are EPERM.
import type { BlockDevice } from '../core/block-device.ts';
import { chunkSizeBytes, rangeRequestBytesMax } from '../core/limits.ts';
import { fuseRequestBytesMax, type FuseHandler, type FuseReply } from './session.ts';
import {
  decodeFallocate,
  decodeFh,
  decodeIo,
  decodeName,
  decodeOpen,
  decodeSetattr,
  DT_DIR,
  DT_REG,
  encodeAttrOut,
  encodeDirents,
  encodeEntryOut,
  encodeOpenOut,
  encodeStatfsOut,
  encodeWriteOut,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  FATTR_SIZE,
  Opcode,
  OpenFlag,
  rootNodeId,
  S_IFDIR,
  S_IFREG,
  replyHeadroomBytes,
  writeInBytes,
  type Attr,
  type DirEntry,
  type InHeader,
} from './protocol.ts';

/** What the front end needs from the node's control plane: the volumes, and devices by export name. */
export interface FuseCatalog {
  listVolumes(): Array<{ name: string; sizeBytes: number; allocatedBytes: number; snapshots: string[] }>;
  /** A volume, or VOL@SNAP (read-only); throws ChunkdError ENOENT when there is none. */
  open(exportName: string): Promise<BlockDevice>;
}

export const snapshotsDirName = '.snapshots';
const snapshotsNodeId = 2;
/** How long the kernel may cache names and attributes: short, since volumes change through the API. */
const validMs = 1000;
/** How long a snapshot's computed allocation is reused (it is derived from its map, not stored). */
const snapshotBlocksCacheMs = 5000;

/** Read replies come from two pools of frames: up to 4 KiB of data, and up to fuseRequestBytesMax. */
const smallFrameDataBytes = 4096;
const framesKept = 64;

const EPERM = 1;
const ENOENT = 2;
const EBADF = 9;
const ENOTDIR = 20;
const EISDIR = 21;
const ENOSPC = 28;
const EROFS = 30;
const ENOSYS = 38;
const EOPNOTSUPP = 95;
const O_ACCMODE = 3;
const O_RDONLY = 0;

interface FileHandle {
  device: BlockDevice;
}

export class VolumeFileSystem implements FuseHandler {
  readonly #catalog: FuseCatalog;
  readonly #startedMs = Date.now();
  /** Stable inode numbers per export name while this process runs. */
  readonly #inoByName = new Map<string, number>();
  readonly #nameByIno = new Map<number, string>();
  #nextIno = 3;
  readonly #files = new Map<number, FileHandle>();
  readonly #dirs = new Map<number, DirEntry[]>();
  #nextFh = 1;
  readonly #smallFrames: Buffer[] = [];
  readonly #largeFrames: Buffer[] = [];
  readonly #snapshotBytes = new Map<string, { sizeBytes: number; allocatedBytes: number; atMs: number }>();

  constructor(catalog: FuseCatalog) {
    this.#catalog = catalog;
  }

  /** Files open through the mount (each holds its export open). */
  openFileCount(): number {
    return this.#files.size;
  }

  /** Closes every device still open (the mount is gone). */
  async closeAll(): Promise<void> {
    const handles = [...this.#files.values()];
    this.#files.clear();
    await Promise.allSettled(handles.map((handle) => handle.device.close()));
  }

  async handle(header: InHeader, body: Buffer): Promise<FuseReply> {
    switch (header.opcode) {
      case Opcode.LOOKUP:
        return this.#lookup(header.nodeId, decodeName(body));
      case Opcode.GETATTR: {
        const attr = await this.#attr(header.nodeId);
        return attr === null ? ENOENT : encodeAttrOut(attr, validMs);
      }
      case Opcode.SETATTR:
        return this.#setattr(header.nodeId, body);
      case Opcode.OPEN:
        return this.#open(header.nodeId, decodeOpen(body).flags);
      case Opcode.READ:
        return this.#read(body);
      case Opcode.WRITE:
        return this.#write(body);
      case Opcode.FSYNC: {
        const handle = this.#files.get(decodeFh(body));
        if (handle === undefined) return EBADF;
        await handle.device.flush();
        return 0;
      }
      case Opcode.FLUSH:
        // close(2) of one descriptor: durability is fsync's job (a loop device fsyncs on REQ_PREFLUSH).
        return 0;
      case Opcode.RELEASE: {
        const fh = decodeFh(body);
        const handle = this.#files.get(fh);
        this.#files.delete(fh);
        await handle?.device.close();
        return 0;
      }
      case Opcode.FALLOCATE:
        return this.#fallocate(body);
      case Opcode.OPENDIR:
        return this.#opendir(header.nodeId);
      case Opcode.READDIR: {
        const io = decodeIo(body);
        const entries = this.#dirs.get(io.fh);
        return entries === undefined ? EBADF : encodeDirents(entries, io.offsetBytes, io.sizeBytes);
      }
      case Opcode.RELEASEDIR:
        this.#dirs.delete(decodeFh(body));
        return 0;
      case Opcode.FSYNCDIR:
        return 0;
      case Opcode.STATFS:
        return this.#statfs();
      case Opcode.FORGET:
      case Opcode.BATCH_FORGET:
      case Opcode.INTERRUPT:
        // Inode numbers are kept for the life of the process; an interrupted request simply completes.
        return 0;
      case Opcode.DESTROY:
        return 0;
      case Opcode.MKNOD:
      case Opcode.MKDIR:
      case Opcode.CREATE:
      case Opcode.UNLINK:
      case Opcode.RMDIR:
      case Opcode.RENAME:
      case Opcode.RENAME2:
      case Opcode.LINK:
      case Opcode.SYMLINK:
      case Opcode.SETXATTR:
      case Opcode.REMOVEXATTR:
        return EPERM;
      default:
        // ENOSYS tells the kernel not to ask again (xattrs, access, locks, lseek, ioctl, poll).
        return ENOSYS;
    }
  }

  #ino(exportName: string): number {
    let ino = this.#inoByName.get(exportName);
    if (ino === undefined) {
      ino = this.#nextIno++;
      this.#inoByName.set(exportName, ino);
      this.#nameByIno.set(ino, exportName);
    }
    return ino;
  }

  #dirAttr(ino: number): Attr {
    return { ino, sizeBytes: 4096, blocks: 0, timeMs: this.#startedMs, mode: S_IFDIR | 0o755, nlink: 2 };
  }

  /** The export behind a name in a directory, or null. */
  #find(parent: number, name: string): { exportName: string; sizeBytes: number; allocatedBytes: number | null; readOnly: boolean } | null {
    const volumes = this.#catalog.listVolumes();
    if (parent === rootNodeId) {
      const volume = volumes.find((v) => v.name === name);
      return volume === undefined ? null : { exportName: name, sizeBytes: volume.sizeBytes, allocatedBytes: volume.allocatedBytes, readOnly: false };
    }
    if (parent === snapshotsNodeId) {
      const at = name.indexOf('@');
      if (at < 0) return null;
      const volume = volumes.find((v) => v.name === name.slice(0, at));
      if (volume === undefined || !volume.snapshots.includes(name.slice(at + 1))) return null;
      // A snapshot has the size its volume had when it was taken; the device knows it (see #fileAttr).
      return { exportName: name, sizeBytes: -1, allocatedBytes: null, readOnly: true };
    }
    return null;
  }

  async #fileAttr(found: { exportName: string; sizeBytes: number; allocatedBytes: number | null; readOnly: boolean }): Promise<Attr> {
    let { sizeBytes, allocatedBytes } = found;
    if (allocatedBytes === null) {
      let measured = this.#snapshotBytes.get(found.exportName);
      if (measured === undefined || Date.now() - measured.atMs >= snapshotBlocksCacheMs) measured = await this.#measureSnapshot(found.exportName);
      sizeBytes = measured.sizeBytes;
      allocatedBytes = measured.allocatedBytes;
    }
    return {
      ino: this.#ino(found.exportName),
      sizeBytes,
      blocks: Math.ceil(allocatedBytes / 512),
      timeMs: this.#startedMs,
      mode: S_IFREG | (found.readOnly ? 0o400 : 0o600),
      nlink: 1,
    };
  }

  /** A snapshot's size and the bytes its map points at, from its allocation map (no data is read). */
  async #measureSnapshot(exportName: string): Promise<{ sizeBytes: number; allocatedBytes: number; atMs: number }> {
    const device = await this.#catalog.open(exportName);
    try {
      let allocatedBytes = 0;
      let at = 0;
      while (at < device.sizeBytes) {
        const extents = await device.blockStatus(at, Math.min(rangeRequestBytesMax, device.sizeBytes - at));
        for (const extent of extents) {
          if (!extent.hole) allocatedBytes += extent.lengthBytes;
          at += extent.lengthBytes;
        }
      }
      const measured = { sizeBytes: device.sizeBytes, allocatedBytes, atMs: Date.now() };
      this.#snapshotBytes.set(exportName, measured);
      return measured;
    } finally {
      await device.close();
    }
  }

  async #attr(ino: number): Promise<Attr | null> {
    if (ino === rootNodeId || ino === snapshotsNodeId) return this.#dirAttr(ino);
    const exportName = this.#nameByIno.get(ino);
    if (exportName === undefined) return null;
    const at = exportName.indexOf('@');
    const found = this.#find(at < 0 ? rootNodeId : snapshotsNodeId, exportName);
    return found === null ? null : this.#fileAttr(found);
  }

  async #lookup(parent: number, name: string): Promise<FuseReply> {
    if (parent === rootNodeId && name === snapshotsDirName) return encodeEntryOut(this.#dirAttr(snapshotsNodeId), validMs);
    if (parent !== rootNodeId && parent !== snapshotsNodeId) return this.#nameByIno.has(parent) ? ENOTDIR : ENOENT;
    const found = this.#find(parent, name);
    if (found === null) return ENOENT;
    return encodeEntryOut(await this.#fileAttr(found), validMs);
  }

  async #setattr(ino: number, body: Buffer): Promise<FuseReply> {
    const attr = await this.#attr(ino);
    if (attr === null) return ENOENT;
    const change = decodeSetattr(body);
    // Sizes change through `chunkd volume resize`; other attributes (times, modes) are fixed and ignored.
    if ((change.valid & FATTR_SIZE) !== 0 && change.sizeBytes !== attr.sizeBytes) return EPERM;
    return encodeAttrOut(attr, validMs);
  }

  async #open(ino: number, flags: number): Promise<FuseReply> {
    if (ino === rootNodeId || ino === snapshotsNodeId) return EISDIR;
    const exportName = this.#nameByIno.get(ino);
    if (exportName === undefined) return ENOENT;
    if (exportName.includes('@') && (flags & O_ACCMODE) !== O_RDONLY) return EROFS;
    const device = await this.#catalog.open(exportName);
    const fh = this.#nextFh++;
    this.#files.set(fh, { device });
    return encodeOpenOut(fh, OpenFlag.DIRECT_IO | OpenFlag.PARALLEL_DIRECT_WRITES);
  }

  async #read(body: Buffer): Promise<FuseReply> {
    const io = decodeIo(body);
    const handle = this.#files.get(io.fh);
    if (handle === undefined) return EBADF;
    const { device } = handle;
    if (io.offsetBytes >= device.sizeBytes) return Buffer.alloc(0);
    const lengthBytes = Math.min(io.sizeBytes, device.sizeBytes - io.offsetBytes);
    // The reply frame (header room, then data) comes from a pool: a fresh buffer per read costs more than the
    // copy into it, in allocation and in garbage collection.
    const pool = lengthBytes <= smallFrameDataBytes ? this.#smallFrames : this.#largeFrames;
    const frame = pool.pop() ?? Buffer.allocUnsafe(replyHeadroomBytes + (pool === this.#smallFrames ? smallFrameDataBytes : fuseRequestBytesMax));
    const release = (): void => {
      if (pool.length < framesKept) pool.push(frame);
    };
    try {
      await device.read(io.offsetBytes, frame.subarray(replyHeadroomBytes, replyHeadroomBytes + lengthBytes));
    } catch (error) {
      release();
      throw error;
    }
    return { frame: frame.subarray(0, replyHeadroomBytes + lengthBytes), written: release };
  }

  async #write(body: Buffer): Promise<FuseReply> {
    const io = decodeIo(body);
    const handle = this.#files.get(io.fh);
    if (handle === undefined) return EBADF;
    const { device } = handle;
    if (device.readOnly) return EROFS;
    // A file of a volume never grows: past its end is ENOSPC, and a write across the end is short.
    if (io.offsetBytes >= device.sizeBytes) return io.sizeBytes === 0 ? encodeWriteOut(0) : ENOSPC;
    const lengthBytes = Math.min(io.sizeBytes, device.sizeBytes - io.offsetBytes);
    await device.write(io.offsetBytes, body.subarray(writeInBytes, writeInBytes + lengthBytes));
    return encodeWriteOut(lengthBytes);
  }

  async #fallocate(body: Buffer): Promise<FuseReply> {
    const request = decodeFallocate(body);
    const handle = this.#files.get(request.fh);
    if (handle === undefined) return EBADF;
    const { device } = handle;
    if (device.readOnly) return EROFS;
    const punch = request.mode === (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
    const zero = request.mode === FALLOC_FL_ZERO_RANGE || request.mode === (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
    // Plain allocation cannot be promised by a thin pool, and the file never changes size: EOPNOTSUPP.
    if (!punch && !zero) return EOPNOTSUPP;
    const end = request.offsetBytes + request.lengthBytes;
    // Punching past the end is a no-op there (as on any file system); zeroing past it would grow the file.
    if (zero && end > device.sizeBytes) return ENOSPC;
    const stop = Math.min(end, device.sizeBytes);
    for (let at = request.offsetBytes; at < stop; ) {
      // Pieces end on chunk boundaries so that only the range's own ends are partial chunks.
      const step = Math.min(stop - at, rangeRequestBytesMax - (rangeRequestBytesMax % chunkSizeBytes));
      if (punch) await device.trim(at, step);
      else await device.writeZeroes(at, step, { noHole: true });
      at += step;
    }
    return 0;
  }

  #opendir(ino: number): FuseReply {
    if (ino !== rootNodeId && ino !== snapshotsNodeId) return this.#nameByIno.has(ino) ? ENOTDIR : ENOENT;
    const entries: DirEntry[] = [
      { ino, name: '.', type: DT_DIR },
      { ino: rootNodeId, name: '..', type: DT_DIR },
    ];
    for (const volume of this.#catalog.listVolumes()) {
      if (ino === rootNodeId) entries.push({ ino: this.#ino(volume.name), name: volume.name, type: DT_REG });
      else for (const snapshot of volume.snapshots) entries.push({ ino: this.#ino(`${volume.name}@${snapshot}`), name: `${volume.name}@${snapshot}`, type: DT_REG });
    }
    if (ino === rootNodeId) entries.push({ ino: snapshotsNodeId, name: snapshotsDirName, type: DT_DIR });
    const fh = this.#nextFh++;
    this.#dirs.set(fh, entries);
    return encodeOpenOut(fh, 0);
  }

  #statfs(): FuseReply {
    const volumes = this.#catalog.listVolumes();
    const declared = volumes.reduce((sum, v) => sum + v.sizeBytes, 0);
    const allocated = volumes.reduce((sum, v) => sum + v.allocatedBytes, 0);
    return encodeStatfsOut({ blockBytes: 4096, blocks: Math.ceil(declared / 4096), blocksFree: Math.max(0, Math.floor((declared - allocated) / 4096)), files: volumes.length });
  }
}

