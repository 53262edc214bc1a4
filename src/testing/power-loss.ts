// A power-loss simulator over a pool directory (for tests; after SQLite's crash tests and ALICE's model of what a
// file system keeps). It is a file layer (test-files.ts underneath: same crash points, same fault rules) that
// remembers what is durable:
//  - a file's content as it was when an fdatasync of it began and then succeeded (captured before the call:
//    writes that race with the sync may or may not be in it, so they count as not covered);
//  - a directory's entries as they were when a directory fsync began and then succeeded.
// At the crash, every file and directory under the pool becomes a mix of its durable state and its state now:
// each directory entry changed since the last directory fsync (created, removed, renamed over) keeps the new or
// the old inode at random; each 512-byte sector that differs from the durable content keeps the new bytes or the
// durable ones at random (so an unsynced write vanishes, lands, or tears at sectors). Nothing is written until the
// crash; what the chunk I/O workers write needs no hook, as their writes become durable only through the main
// thread's fdatasync. Files are identified by inode and birth time, so a renamed file keeps its history and a
// reused inode number does not inherit another file's.
import fs from 'node:fs';
import path from 'node:path';
import type { AllocateMode, FileLayer, FileLayerSpec, OpenMode } from '../store/file-layer.ts';
import { TestFiles, type FaultRule } from './test-files.ts';

const sectorBytes = 512;

interface Entry {
  id: string;
  directory: boolean;
}

/** What a crash did, for the test's log. */
export interface PowerCut {
  /** Probability with which each differing sector or directory change survived. */
  keepProbability: number;
  sectorsKept: number;
  sectorsDropped: number;
  entriesKept: number;
  entriesDropped: number;
}

export class PowerLossFiles implements FileLayer {
  readonly root: string;
  readonly inner: TestFiles;
  /** Durable content by file identity. */
  readonly #durable = new Map<string, Buffer>();
  /** Durable entries by directory path. */
  readonly #entries = new Map<string, Map<string, Entry>>();

  /** Everything under `root` now counts as durable (the disk as it was when the machine came up). */
  constructor(root: string, options: { rules?: readonly FaultRule[]; crashAtChange?: number } = {}) {
    this.root = path.resolve(root);
    this.inner = new TestFiles(options.rules ?? [], { crashAtChange: options.crashAtChange });
    if (fs.existsSync(this.root)) this.#captureTree(this.root);
  }

  get workerSpec(): FileLayerSpec {
    return this.inner.workerSpec;
  }

  open(file: string, mode: OpenMode): Promise<number> {
    return this.inner.open(file, mode);
  }

  openSync(file: string, mode: OpenMode): number {
    return this.inner.openSync(file, mode);
  }

  close(fd: number): void {
    this.inner.close(fd);
  }

  read(fd: number, target: Uint8Array, positionBytes: number): Promise<number> {
    return this.inner.read(fd, target, positionBytes);
  }

  readCached(fd: number, target: Uint8Array, positionBytes: number): number {
    return this.inner.readCached(fd, target, positionBytes);
  }

  write(fd: number, data: Uint8Array, positionBytes: number): Promise<void> {
    return this.inner.write(fd, data, positionBytes);
  }

  writev(fd: number, parts: readonly Uint8Array[], positionBytes: number): Promise<void> {
    return this.inner.writev(fd, parts, positionBytes);
  }

  writeSync(fd: number, data: Uint8Array, positionBytes: number): void {
    return this.inner.writeSync(fd, data, positionBytes);
  }

  async fdatasync(fd: number): Promise<void> {
    const before = this.inner.frozen ? null : { id: identity(fs.fstatSync(fd, { bigint: true })), content: readAll(fd) };
    await this.inner.fdatasync(fd);
    if (before !== null) this.#durable.set(before.id, before.content);
  }

  allocate(fd: number, mode: AllocateMode, offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.inner.allocate(fd, mode, offsetBytes, lengthBytes);
  }

  rename(fromPath: string, toPath: string): Promise<void> {
    return this.inner.rename(fromPath, toPath);
  }

  unlink(file: string): Promise<void> {
    return this.inner.unlink(file);
  }

  async syncDirectory(directory: string): Promise<void> {
    const resolved = path.resolve(directory);
    const before = this.inner.frozen ? null : listEntries(resolved);
    await this.inner.syncDirectory(directory);
    if (before !== null) this.#entries.set(resolved, before);
  }

  /**
   * The power goes out: nothing more reaches the disk, then every file and directory under the root is set to
   * what a disk could hold after it (see the note at the top). The caller has stopped the pool's threads
   * (Pool.abandon); descriptors still open on the pool are closed here, which also drops its lock.
   */
  async cut(random: () => number): Promise<PowerCut> {
    this.inner.freeze();
    await this.inner.quiesce();
    closeDescriptorsUnder(this.root);
    const choices = [0, 1, 0.5, random()];
    const keepProbability = choices[Math.floor(random() * choices.length)]!;
    const cut: PowerCut = { keepProbability, sectorsKept: 0, sectorsDropped: 0, entriesKept: 0, entriesDropped: 0 };
    // Read every file as it is now before changing any (a renamed inode's content is found by identity).
    const current = new Map<string, Buffer>();
    const collect = (directory: string): void => {
      for (const [name, entry] of listEntries(directory)) {
        const file = path.join(directory, name);
        if (entry.directory) collect(file);
        else current.set(entry.id, fs.readFileSync(file));
      }
    };
    if (fs.existsSync(this.root)) collect(this.root);
    this.#restore(this.root, random, keepProbability, current, cut);
    return cut;
  }

  #restore(directory: string, random: () => number, keep: number, current: Map<string, Buffer>, cut: PowerCut): void {
    const now = fs.existsSync(directory) ? listEntries(directory) : new Map<string, Entry>();
    const durable = this.#entries.get(directory) ?? new Map<string, Entry>();
    const chosen = new Map<string, Entry>();
    for (const name of new Set([...now.keys(), ...durable.keys()])) {
      const newer = now.get(name);
      const older = durable.get(name);
      if (newer?.id === older?.id) {
        if (newer !== undefined) chosen.set(name, newer);
        continue;
      }
      const keepNew = random() < keep;
      if (keepNew) cut.entriesKept += 1;
      else cut.entriesDropped += 1;
      const entry = keepNew ? newer : older;
      if (entry !== undefined) chosen.set(name, entry);
    }
    fs.mkdirSync(directory, { recursive: true });
    const contents = new Map<string, Buffer>();
    for (const [name, entry] of chosen) {
      if (entry.directory) continue;
      contents.set(name, this.#mix(this.#durable.get(entry.id) ?? null, current.get(entry.id) ?? null, random, keep, cut));
    }
    for (const [name, entry] of now) {
      if (!entry.directory) fs.rmSync(path.join(directory, name), { force: true });
      else if (!chosen.get(name)?.directory) fs.rmSync(path.join(directory, name), { recursive: true, force: true });
    }
    for (const [name, content] of contents) writeSparse(path.join(directory, name), content);
    for (const [name, entry] of chosen) if (entry.directory) this.#restore(path.join(directory, name), random, keep, current, cut);
  }

  /** A file's content after the crash: durable sectors, and each differing sector of the current content at random. */
  #mix(durable: Buffer | null, now: Buffer | null, random: () => number, keep: number, cut: PowerCut): Buffer {
    const old = durable ?? Buffer.alloc(0);
    if (now === null) return old; // removed since: only its durable content is known
    const lengthBytes = now.length >= old.length || random() < keep ? now.length : old.length;
    const out = Buffer.alloc(lengthBytes);
    old.copy(out, 0, 0, Math.min(old.length, lengthBytes));
    for (let offset = 0; offset < lengthBytes; offset += sectorBytes) {
      const end = Math.min(offset + sectorBytes, lengthBytes);
      const newer = sectorOf(now, offset, end);
      if (newer.equals(sectorOf(old, offset, end))) continue;
      if (random() < keep) {
        newer.copy(out, offset);
        cut.sectorsKept += 1;
      } else {
        cut.sectorsDropped += 1;
      }
    }
    return out;
  }

  #captureTree(directory: string): void {
    const entries = listEntries(directory);
    this.#entries.set(directory, entries);
    for (const [name, entry] of entries) {
      const file = path.join(directory, name);
      if (entry.directory) this.#captureTree(file);
      else this.#durable.set(entry.id, fs.readFileSync(file));
    }
  }
}

function identity(stats: fs.BigIntStats): string {
  return `${stats.ino}:${stats.birthtimeNs}`;
}

function listEntries(directory: string): Map<string, Entry> {
  const entries = new Map<string, Entry>();
  for (const name of fs.readdirSync(directory)) {
    let stats: fs.BigIntStats;
    try {
      stats = fs.lstatSync(path.join(directory, name), { bigint: true });
    } catch {
      continue; // removed meanwhile
    }
    if (stats.isSocket()) continue;
    entries.set(name, { id: identity(stats), directory: stats.isDirectory() });
  }
  return entries;
}

function readAll(fd: number): Buffer {
  const size = Number(fs.fstatSync(fd).size);
  const out = Buffer.alloc(size);
  let done = 0;
  while (done < size) {
    const bytesRead = fs.readSync(fd, out, done, size - done, done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return out;
}

function sectorOf(bytes: Buffer, start: number, end: number): Buffer {
  const sector = Buffer.alloc(end - start);
  if (start < bytes.length) bytes.copy(sector, 0, start, Math.min(end, bytes.length));
  return sector;
}

const zeroBlock = Buffer.alloc(4096);

/** Writes `content` as a new file, leaving 4 KiB blocks of zeros as holes (chunk files are sparse). */
function writeSparse(file: string, content: Buffer): void {
  const fd = fs.openSync(file, 'w', 0o600);
  try {
    for (let offset = 0; offset < content.length; offset += 4096) {
      const block = content.subarray(offset, offset + 4096);
      if (!block.equals(zeroBlock.subarray(0, block.length))) fs.writeSync(fd, block, 0, block.length, offset);
    }
    fs.ftruncateSync(fd, content.length);
  } finally {
    fs.closeSync(fd);
  }
}

/** Closes every descriptor of this process that points under `root` (the pool's, its workers' and its lock's). */
export function closeDescriptorsUnder(root: string): void {
  for (const name of fs.readdirSync('/proc/self/fd')) {
    const fd = Number(name);
    let target: string;
    try {
      target = fs.readlinkSync(`/proc/self/fd/${name}`);
    } catch {
      continue;
    }
    // A removed file reads "<path> (deleted)", still under the root.
    if (target === root || target.startsWith(`${root}/`)) {
      try {
        fs.closeSync(fd);
      } catch {
        // already closed
      }
    }
  }
}
