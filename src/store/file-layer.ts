// The one door through which a pool reaches its files: chunk files, the journal and checkpoint copies, the marker
// and the lock, from the main thread and from the chunk I/O workers. A dozen verbs, so that a test can put a
// faulty twin in the real one's place (src/testing/test-files.ts fails a chosen call on a chosen file at a chosen
// count; src/testing/power-loss.ts simulates a power loss: every write no fdatasync covered may vanish or tear at
// 512-byte sectors, and every directory change no directory fsync covered may vanish). A worker thread cannot
// share the main thread's objects, so a layer also says how a worker rebuilds it (`workerSpec`).
//
// Short reads and writes are not errors: the layer loops over them (as random-access-file does), so that a write
// is one call and one promise however the kernel splits it (the hot path: one per client request).
import fs from 'node:fs';
import { punchHole, readIfCached, reserveSpace, zeroRange } from './native.ts';

/** read: read-only; write: read-write, the file must exist; create: read-write, made if missing; truncate: made empty. */
export type OpenMode = 'read' | 'write' | 'create' | 'truncate';

/** punch: deallocate (reads give zeros, space goes back); zero: zeros, kept allocated; reserve: allocate ahead. */
export type AllocateMode = 'punch' | 'zero' | 'reserve';

/** How a worker thread builds the layer it was given (structured-cloneable). */
export type FileLayerSpec = { kind: 'real' } | { kind: 'test'; control: SharedArrayBuffer; rules: unknown[] };

export interface FileLayer {
  open(path: string, mode: OpenMode): Promise<number>;
  openSync(path: string, mode: OpenMode): number;
  close(fd: number): void;
  /** Reads until `target` is full or the file ends: the bytes read (fewer only at the end of the file). */
  read(fd: number, target: Uint8Array, positionBytes: number): Promise<number>;
  /** One pread only if the page cache holds the bytes: the bytes read, 0 at the end, -1 when it would wait on the disk. */
  readCached(fd: number, target: Uint8Array, positionBytes: number): number;
  /** Writes all of `data`. */
  write(fd: number, data: Uint8Array, positionBytes: number): Promise<void>;
  /** Writes all of `parts`, one after another from `positionBytes`, in as few calls as the system takes (pwritev). */
  writev(fd: number, parts: readonly Uint8Array[], positionBytes: number): Promise<void>;
  /** Writes all of `data` on this thread (a worker's writes land in the page cache). */
  writeSync(fd: number, data: Uint8Array, positionBytes: number): void;
  fdatasync(fd: number): Promise<void>;
  allocate(fd: number, mode: AllocateMode, offsetBytes: number, lengthBytes: number): Promise<void>;
  rename(fromPath: string, toPath: string): Promise<void>;
  /** Removes a file; one that does not exist is not an error. */
  unlink(path: string): Promise<void>;
  /** Makes the directory's entries (files created, renamed, removed in it) durable. */
  syncDirectory(path: string): Promise<void>;
  readonly workerSpec: FileLayerSpec;
}

const openFlags: Record<OpenMode, number> = {
  read: fs.constants.O_RDONLY,
  write: fs.constants.O_RDWR,
  create: fs.constants.O_RDWR | fs.constants.O_CREAT,
  truncate: fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC,
};

function settle<T>(resolve: (value: T) => void, reject: (error: Error) => void): (error: Error | null, value: T) => void {
  return (error, value) => (error ? reject(error) : resolve(value));
}

/** preads until `target` is full or the file ends; callbacks rather than an async loop: one promise per call. */
function readLoop(fd: number, target: Uint8Array, positionBytes: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      fs.read(fd, target, done, target.length - done, positionBytes + done, (error, bytesRead) => {
        if (error) return reject(error);
        done += bytesRead;
        if (bytesRead === 0 || done === target.length) resolve(done);
        else step();
      });
    };
    step();
  });
}

/** pwrites all of `data`, looping over short writes. */
function writeLoop(fd: number, data: Uint8Array, positionBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      fs.write(fd, data, done, data.length - done, positionBytes + done, (error, written) => {
        if (error) return reject(error);
        done += written;
        if (done === data.length) resolve();
        else step();
      });
    };
    step();
  });
}

/** pwritevs all of `parts` from `positionBytes`, looping over short writes. */
function writevLoop(fd: number, parts: readonly Uint8Array[], positionBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let rest = parts;
    let position = positionBytes;
    const step = (): void => {
      fs.writev(fd, rest as Uint8Array[], position, (error, written) => {
        if (error) return reject(error);
        position += written;
        // Drop what was written: whole parts, then the written head of the next.
        let skip = written;
        let index = 0;
        while (index < rest.length && skip >= rest[index]!.length) skip -= rest[index++]!.length;
        if (index === rest.length) return resolve();
        rest = [rest[index]!.subarray(skip), ...rest.slice(index + 1)];
        step();
      });
    };
    step();
  });
}

/** The file system itself. */
export const realFiles: FileLayer = {
  open: (path, mode) => new Promise((resolve, reject) => fs.open(path, openFlags[mode], 0o600, settle(resolve, reject))),
  openSync: (path, mode) => fs.openSync(path, openFlags[mode], 0o600),
  close: (fd) => fs.closeSync(fd),
  read: readLoop,
  readCached: readIfCached,
  write: writeLoop,
  writev: writevLoop,
  writeSync: (fd, data, positionBytes) => {
    let done = 0;
    while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, positionBytes + done);
  },
  fdatasync: (fd) => new Promise((resolve, reject) => fs.fdatasync(fd, (error) => (error ? reject(error) : resolve()))),
  allocate: (fd, mode, offsetBytes, lengthBytes) => (mode === 'punch' ? punchHole : mode === 'zero' ? zeroRange : reserveSpace)(fd, offsetBytes, lengthBytes),
  rename: (fromPath, toPath) => fs.promises.rename(fromPath, toPath),
  unlink: (path) => fs.promises.rm(path, { force: true }),
  syncDirectory: async (path) => {
    const handle = await fs.promises.open(path, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  },
  workerSpec: { kind: 'real' },
};

/** The layer a worker thread was handed as a spec. */
export async function fileLayerFromSpec(spec: FileLayerSpec): Promise<FileLayer> {
  if (spec.kind === 'real') return realFiles;
  const { TestFiles } = await import('../testing/test-files.ts');
  return TestFiles.fromSpec(spec);
}

/** Reads until `target` is full; bytes past the end of the file read as zeros (a sparse file's tail). */
export async function readFully(files: FileLayer, fd: number, target: Uint8Array, positionBytes: number): Promise<void> {
  const bytesRead = await files.read(fd, target, positionBytes);
  if (bytesRead < target.length) target.fill(0, bytesRead);
}

/** A whole file's bytes, or null if it does not exist. */
export async function readWholeFile(files: FileLayer, path: string): Promise<Buffer | null> {
  let fd: number;
  try {
    fd = await files.open(path, 'read');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw error;
  }
  try {
    const chunks: Buffer[] = [];
    let position = 0;
    for (;;) {
      const chunk = Buffer.allocUnsafe(1024 * 1024);
      const bytesRead = await files.read(fd, chunk, position);
      chunks.push(chunk.subarray(0, bytesRead));
      position += bytesRead;
      if (bytesRead < chunk.length) break;
    }
    return Buffer.concat(chunks);
  } finally {
    files.close(fd);
  }
}

/**
 * Writes `bytes` as the file `path`, whole or not at all: into `path.tmp`, fdatasynced, then renamed into place.
 * The rename is durable only once the caller syncs the directory.
 */
export async function replaceFile(files: FileLayer, path: string, bytes: Uint8Array): Promise<void> {
  const temporary = `${path}.tmp`;
  const fd = await files.open(temporary, 'truncate');
  try {
    await files.write(fd, bytes, 0);
    await files.fdatasync(fd);
  } finally {
    files.close(fd);
  }
  await files.rename(temporary, path);
}
