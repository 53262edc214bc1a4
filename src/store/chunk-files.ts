// Physical chunk storage: chunk i lives at byte (i mod chunksPerFile) * chunkSize of chunk file
// floor(i / chunksPerFile), a sparse file under <pool>/chunks (chunk-file-layout.ts). Files are opened on demand and kept in an LRU
// cache of descriptors; a descriptor evicted while I/O uses it is closed when the last user lets go, so no
// read or write ever lands on a reused descriptor. Files written since the last sync are remembered (at the
// completion of each write, so a sync never misses a write that finished before it started), and so are files
// created since the directory was last synced: a sync makes their names durable too, or a power loss could take
// a file whose data the journal already names. All I/O goes through the pool's file layer (file-layer.ts).
import fs from 'node:fs';
import { LRUCache } from 'lru-cache';
import { assert } from '../core/assert.ts';
import { chunkSizeBytes, openChunkFilesMax } from '../core/limits.ts';
import { settleAll } from '../core/settle.ts';
import { chunkFileBytes, chunkFileIndexOf, chunkFilePath } from './chunk-file-layout.ts';
import type { ChunkWriter } from './chunk-writer.ts';
import { readFully, type FileLayer } from './file-layer.ts';

/** Kept here too for the modules that import it from chunk-files.ts (fsck.ts). */
const resolved = Promise.resolve();

interface OpenFile {
  fd: number;
  users: number;
  evicted: boolean;
  /** Writes of this file with the file layer (at most writesInFlightPerFile); the others wait in `queue` (#writeInTurn). */
  writesInFlight: number;
  queue: QueuedWrite[];
}

/** A write of a chunk file waiting for the one before it. */
interface QueuedWrite {
  part: Buffer;
  position: number;
  resolve: () => void;
  reject: (error: unknown) => void;
}

/** The most bytes, and parts, of queued writes that go to the file layer as one pwritev. */
const mergedWriteBytesMax = 8 * 1024 * 1024;
const mergedWritePartsMax = 64;
/**
 * Writes of one chunk file with the file layer at once: the one the kernel runs and the next, which waits in the
 * kernel for it and starts the moment it ends, with no round of the event loop between (one at a time wrote no
 * faster and left that gap: the next write waited for the main thread to hear of the last).
 */
const writesInFlightPerFile = 2;

export class ChunkFiles {
  readonly directory: string;
  readonly layer: FileLayer;
  readonly #files: LRUCache<number, OpenFile>;
  readonly #opening = new Map<number, Promise<OpenFile>>();
  #dirty = new Set<number>();
  /** Files whose directory entry is durable: those found at open (the pool syncs the directory then), and synced since. */
  readonly #named: Set<number>;
  #zeroRangeWorks = true;

  /** The caller syncs the directory once after this (Pool.open does), so that the files found here are durably named. */
  constructor(directory: string, layer: FileLayer) {
    this.directory = directory;
    this.layer = layer;
    fs.mkdirSync(directory, { recursive: true });
    this.#named = new Set(this.existingFiles());
    this.#files = new LRUCache<number, OpenFile>({
      max: openChunkFilesMax,
      dispose: (file) => {
        file.evicted = true;
        if (file.users === 0) layer.close(file.fd);
      },
    });
  }

  /** Path of the chunk file that holds file index `fileIndex`. */
  filePath(fileIndex: number): string {
    return chunkFilePath(this.directory, fileIndex);
  }

  /**
   * Reads the bytes right here if they are all in the page cache (preadv2 RWF_NOWAIT: it never waits on the disk,
   * see native.ts) and the file is open already (else it starts opening it); returns whether it did.
   */
  readCached(physicalChunk: number, offsetBytes: number, target: Uint8Array): boolean {
    const position = physicalChunk * chunkSizeBytes + offsetBytes;
    const fileIndex = Math.floor(position / chunkFileBytes);
    const file = this.#files.get(fileIndex);
    if (file === undefined) {
      // Open it for the reads that follow: when worker threads did every write so far, this thread never has.
      if (!this.#opening.has(fileIndex)) this.#open(fileIndex).catch(() => {});
      return false;
    }
    if (position + target.length > (fileIndex + 1) * chunkFileBytes) return false;
    const bytesRead = this.layer.readCached(file.fd, target, position - fileIndex * chunkFileBytes);
    if (bytesRead === target.length) return true;
    if (bytesRead !== 0) return false;
    target.fill(0); // past the end of a sparse file
    return true;
  }

  /** Reads target.length bytes starting `offsetBytes` into physical chunk `physicalChunk`; unwritten bytes read as zeros. */
  read(physicalChunk: number, offsetBytes: number, target: Buffer): Promise<void> {
    if (this.readCached(physicalChunk, offsetBytes, target)) return resolved;
    return this.#eachFile(physicalChunk * chunkSizeBytes + offsetBytes, target.length, (file, position, start, end) =>
      readFully(this.layer, file.fd, target.subarray(start, end), position),
    );
  }

  /**
   * Writes `data` starting `offsetBytes` into physical chunk `physicalChunk`; through `writer` when it takes the
   * write (chunk-writer.ts) and none of the file's writes is with the file layer, else through the file layer, a
   * few writes of a file at a time (#writeInTurn). The writer may pwrite on this thread, and a buffered write waits
   * for the file's inode lock, which a write on a pool thread holds while it copies its bytes: at queue depth 32 a
   * turn's first write met the 124 KiB write of the turn before's others there, and when that one was held up (ext4,
   * or its thread preempted on a busy machine) the event loop waited with it, 5-77 ms (BENCHMARKS.md, issue 19).
   * The writer pwrites on this thread only while requests come one at a time (chunk-writer.ts).
   */
  write(physicalChunk: number, offsetBytes: number, data: Buffer, writer?: ChunkWriter | null): Promise<void> {
    return this.#eachFile(physicalChunk * chunkSizeBytes + offsetBytes, data.length, (file, position, start, end, fileIndex) => {
      const part = start === 0 && end === data.length ? data : data.subarray(start, end);
      const direct = file.writesInFlight === 0 ? writer?.write(file.fd, part, position) : null;
      return (direct ?? this.#writeInTurn(file, part, position)).then(() => {
        this.#dirty.add(fileIndex);
      });
    });
  }

  /**
   * Hands a write to the file layer (libuv's pool) while fewer than writesInFlightPerFile of the file's writes are
   * there, else queues it; the writes queued meanwhile that continue one another in the file go as one pwritev. A
   * buffered write holds the file's inode lock while it copies into the page cache, so the kernel runs one file's
   * writes one at a time anyway: handed to the pool all together (eight 1 MiB writes at QD8, all into the fresh
   * runs of one chunk file), each took a pool thread that waited for the lock there, spinning on it (a pwrite
   * took 1.9 ms of wall time against 0.1 ms queued here), and the store spent 0.36-0.49 CPU s/GB against
   * 0.35-0.39 queued (BENCHMARKS.md, issue 19). Redirect-on-write gives consecutive writes consecutive runs, so
   * a queue of them is one stretch of the file: one hand-off and one call for several. Each write still settles
   * only when its bytes are written; a pwritev that fails fails every write in it, and the next ones still run.
   */
  #writeInTurn(file: OpenFile, part: Buffer, position: number): Promise<void> {
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    file.queue.push({ part, position, resolve, reject });
    if (file.writesInFlight < writesInFlightPerFile) this.#writeQueued(file);
    return promise;
  }

  /** Hands the head of `file`'s queue to the file layer, with the writes after it that continue it; the rest follow as writes end. */
  #writeQueued(file: OpenFile): void {
    const queue = file.queue;
    const first = queue[0];
    if (first === undefined) return;
    file.writesInFlight += 1;
    let count = 1;
    let end = first.position + first.part.length;
    while (count < queue.length && count < mergedWritePartsMax) {
      const next = queue[count]!;
      if (next.position !== end || end + next.part.length - first.position > mergedWriteBytesMax) break;
      end += next.part.length;
      count += 1;
    }
    const batch = queue.splice(0, count);
    const written = count === 1 ? this.layer.write(file.fd, first.part, first.position) : this.layer.writev(file.fd, batch.map((write) => write.part), first.position);
    written.then(
      () => {
        file.writesInFlight -= 1;
        for (const write of batch) write.resolve();
        this.#writeQueued(file);
      },
      (error: unknown) => {
        file.writesInFlight -= 1;
        for (const write of batch) write.reject(error);
        this.#writeQueued(file);
      },
    );
  }

  /** Gives the space of `chunkCount` chunks back to the file system; they read as zeros afterwards. */
  punch(physicalChunk: number, chunkCount: number): Promise<void> {
    return this.#eachFile(physicalChunk * chunkSizeBytes, chunkCount * chunkSizeBytes, async (file, position, start, end, fileIndex) => {
      await this.layer.allocate(file.fd, 'punch', position, end - start);
      this.#dirty.add(fileIndex);
    });
  }

  /** Makes `lengthBytes` from `offsetBytes` into `physicalChunk` read as zeros and stay allocated (WRITE_ZEROES with NO_HOLE). */
  zero(physicalChunk: number, offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.#eachFile(physicalChunk * chunkSizeBytes + offsetBytes, lengthBytes, async (file, position, start, end, fileIndex) => {
      if (this.#zeroRangeWorks) {
        try {
          await this.layer.allocate(file.fd, 'zero', position, end - start);
          this.#dirty.add(fileIndex);
          return;
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw error;
          this.#zeroRangeWorks = false;
        }
      }
      const zeros = Buffer.alloc(Math.min(end - start, 1024 * 1024));
      for (let done = 0; done < end - start; done += zeros.length) {
        const length = Math.min(zeros.length, end - start - done);
        await this.layer.write(file.fd, zeros.subarray(0, length), position + done);
      }
      this.#dirty.add(fileIndex);
    });
  }

  /** Notes a write that another thread made to chunk file `fileIndex` (after it completed), for the next sync. */
  markDirty(fileIndex: number): void {
    this.#dirty.add(fileIndex);
  }

  /**
   * fdatasyncs every chunk file written since the last sync, then the directory if any of them is new; on
   * failure the files stay marked dirty.
   */
  async sync(): Promise<void> {
    const dirty = [...this.#dirty];
    this.#dirty = new Set();
    try {
      await Promise.all(dirty.map((fileIndex) => this.#withFile(fileIndex, (file) => this.layer.fdatasync(file.fd))));
      const unnamed = dirty.filter((fileIndex) => !this.#named.has(fileIndex));
      if (unnamed.length > 0) {
        await this.layer.syncDirectory(this.directory);
        for (const fileIndex of unnamed) this.#named.add(fileIndex);
      }
    } catch (error) {
      for (const fileIndex of dirty) this.#dirty.add(fileIndex);
      throw error;
    }
  }

  /** Chunk files that exist, by index (for checks). */
  existingFiles(): number[] {
    return fs
      .readdirSync(this.directory)
      .map(chunkFileIndexOf)
      .filter((fileIndex) => fileIndex !== null)
      .sort((a, b) => a - b);
  }

  /** Closes every descriptor; in-flight I/O must have finished. */
  close(): void {
    this.#files.clear();
  }

  /** `action` on each file's part of [positionBytes, positionBytes + lengthBytes); one file, open already, without a promise of its own. */
  #eachFile(
    positionBytes: number,
    lengthBytes: number,
    action: (file: OpenFile, filePosition: number, start: number, end: number, fileIndex: number) => Promise<void>,
  ): Promise<void> {
    assert(lengthBytes >= 0);
    const firstFile = Math.floor(positionBytes / chunkFileBytes);
    const lastFile = Math.floor((positionBytes + lengthBytes - 1) / chunkFileBytes);
    if (firstFile === lastFile || lengthBytes === 0) {
      return this.#withFile(firstFile, (file) => action(file, positionBytes - firstFile * chunkFileBytes, 0, lengthBytes, firstFile));
    }
    const parts: Promise<void>[] = [];
    for (let fileIndex = firstFile; fileIndex <= lastFile; fileIndex++) {
      const start = Math.max(positionBytes, fileIndex * chunkFileBytes) - positionBytes;
      const end = Math.min(positionBytes + lengthBytes, (fileIndex + 1) * chunkFileBytes) - positionBytes;
      parts.push(this.#withFile(fileIndex, (file) => action(file, positionBytes + start - fileIndex * chunkFileBytes, start, end, fileIndex)));
    }
    // Every part settles before this returns, so no I/O still uses the caller's buffer when it fails.
    return settleAll(parts);
  }

  /**
   * `action` on the file, opened if need be, counted as a user of it until the action settles. Promises chained,
   * not an async function's: a write through an open file (the usual case) costs no promise and turn of its own here.
   */
  #withFile<T>(fileIndex: number, action: (file: OpenFile) => Promise<T>): Promise<T> {
    const file = this.#files.get(fileIndex);
    if (file === undefined) return this.#open(fileIndex).then((opened) => this.#using(opened, action));
    return this.#using(file, action);
  }

  #using<T>(file: OpenFile, action: (file: OpenFile) => Promise<T>): Promise<T> {
    file.users += 1;
    let pending: Promise<T>;
    try {
      pending = action(file);
    } catch (error) {
      this.#letGo(file);
      return Promise.reject(error);
    }
    return pending.then(
      (value) => {
        this.#letGo(file);
        return value;
      },
      (error: unknown) => {
        this.#letGo(file);
        throw error;
      },
    );
  }

  /** One user of `file` is done with it: an evicted file's descriptor is closed when the last one is. */
  #letGo(file: OpenFile): void {
    file.users -= 1;
    if (file.evicted && file.users === 0) this.layer.close(file.fd);
  }

  #open(fileIndex: number): Promise<OpenFile> {
    let opening = this.#opening.get(fileIndex);
    if (opening === undefined) {
      opening = this.layer.open(this.filePath(fileIndex), 'create').then(
        (fd) => {
          this.#opening.delete(fileIndex);
          const file: OpenFile = { fd, users: 0, evicted: false, writesInFlight: 0, queue: [] };
          this.#files.set(fileIndex, file);
          return file;
        },
        (error: unknown) => {
          this.#opening.delete(fileIndex);
          throw error;
        },
      );
      this.#opening.set(fileIndex, opening);
    }
    return opening;
  }
}
