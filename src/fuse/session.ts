// One FUSE mount served by this process: opens /dev/fuse, mounts it with mount(2) (we run as root, so no
// fusermount and no libfuse), reads requests, hands them to a FuseHandler and writes the replies.
//
// Reading /dev/fuse blocks until the kernel has a request, so each read runs on libuv's thread pool; several
// reads stay posted so that requests are picked up while others are served, and each request runs as its own
// promise (many in flight, answered in any order, as the kernel allows). Replies are written synchronously:
// a write to /dev/fuse copies into the waiting request and never blocks. (Tried and measured worse: a
// non-blocking descriptor drained on the event loop with poll(2) on a koffi worker between batches gave half
// the 4 KiB random IOPS of posted reads, since each batch waits for a poll round trip.)
//
// The one rule for code in this process: never touch the mount synchronously from the event loop (no
// fs.statSync on it): the kernel would wait for a reply that only this event loop can write.
//
// Errors (core/fail-stop.ts): a frame that does not parse is answered EINVAL (checkRequest); a handler's
// ChunkdError or system error is that request's errno; anything else is a bug and stops the node.
import fs from 'node:fs';
import path from 'node:path';
import { assert } from '../core/assert.ts';
import { ChunkdError, isSystemError } from '../core/errors.ts';
import { expectedError, failStop } from '../core/fail-stop.ts';
import { errnoName, koffi, libcFunction } from '../core/libc.ts';
import {
  checkRequest,
  decodeInHeader,
  decodeInit,
  encodeInit,
  encodeOutHeader,
  expectsReply,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  inHeaderBytes,
  InitFlag,
  Opcode,
  outHeaderBytes,
  readU64,
  type InHeader,
} from './protocol.ts';
import type { Log } from '../core/log.ts';

/** Largest READ or WRITE the kernel sends us: 256 pages (FUSE_MAX_PAGES), as large as Linux allows. */
export const fuseRequestBytesMax = 1024 * 1024;
/** Reads of /dev/fuse kept posted on the thread pool (libuv's pool has 16 threads: bin/chunkd.js). */
const postedReadsMax = 8;
/** Requests the kernel may have in flight to us in the background (async direct I/O from a loop device). */
const maxBackground = 128;
/** Read buffers kept for reuse once their request is answered. */
const freeBuffersMax = 16;
const readBufferBytes = fuseRequestBytesMax + 4096;

/**
 * What a handler answers: an errno, a reply body, or a whole frame (outHeaderBytes of room, then the body: the
 * reply goes out in one write without a copy) with a callback once it is written.
 */
export type FuseReply = number | Buffer | { frame: Buffer; written(): void };

export interface FuseHandler {
  /** Answers one request; `body` is valid until the returned promise settles. */
  handle(header: InHeader, body: Buffer): Promise<FuseReply>;
}

export interface FuseSessionStats {
  requestsTotal: number;
  requestErrorsTotal: number;
  inFlight: number;
  /** Sizes of READ and WRITE requests that arrived, counted by power-of-two bucket ("4KiB", "1MiB"). */
  readSizes: Record<string, number>;
  writeSizes: Record<string, number>;
  readBytesMax: number;
  writeBytesMax: number;
  /** What the kernel granted at INIT. */
  kernel: { minor: number; maxPages: number; maxWriteBytes: number } | null;
}

const mountFn = libcFunction('int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)');
const umount2Fn = libcFunction('int umount2(const char *target, int flags)');
const MS_NOSUID = 2;
const MS_NODEV = 4;
const MNT_DETACH = 2;

/** umount2(2); returns the errno name on failure ('EBUSY', 'EINVAL' when not a mount point), null on success. */
export function unmountDirectory(directory: string, lazy: boolean): string | null {
  const result = umount2Fn()(directory, lazy ? MNT_DETACH : 0) as number;
  if (result === 0) return null;
  return errnoName(koffi().errno());
}

export interface MountEntry {
  mountPoint: string;
  fsType: string;
  source: string;
  /** major:minor of the mounted file system (for FUSE, the connection's number under /sys/fs/fuse/connections). */
  device: string;
}

function unescapeMountPath(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

/** The mounts this process sees, from /proc/self/mountinfo. */
export function readMounts(): MountEntry[] {
  const mounts: MountEntry[] = [];
  for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    if (line === '') continue;
    const fields = line.split(' ');
    const dash = fields.indexOf('-');
    if (dash < 0 || fields.length < dash + 3) continue;
    mounts.push({ mountPoint: unescapeMountPath(fields[4]!), device: fields[2]!, fsType: fields[dash + 1]!, source: unescapeMountPath(fields[dash + 2]!) });
  }
  return mounts;
}

/** The topmost mount at `directory`, or null. */
export function mountAt(directory: string): MountEntry | null {
  const matches = readMounts().filter((entry) => entry.mountPoint === directory);
  return matches.at(-1) ?? null;
}

/**
 * Makes `directory` free for a new FUSE mount: a FUSE mount left there by a crashed process (its accesses fail
 * with ENOTCONN) is lazily unmounted; a live one, or any other mount, is refused.
 */
export async function clearStaleMount(directory: string, log: Log): Promise<void> {
  for (;;) {
    const entry = mountAt(directory);
    if (entry === null) return;
    if (!entry.fsType.startsWith('fuse')) throw ChunkdError.busy(`${directory} is already a mount point (${entry.fsType} from ${entry.source})`);
    // Asynchronous on purpose: a live FUSE server answers; a dead one fails with ENOTCONN at once.
    const alive = await fs.promises.stat(directory).then(
      () => true,
      (error: NodeJS.ErrnoException) => error.code !== 'ENOTCONN' && error.code !== 'ECONNABORTED',
    );
    if (alive) throw ChunkdError.busy(`${directory} is a FUSE mount another live process serves`);
    const failure = unmountDirectory(directory, true);
    if (failure !== null) throw ChunkdError.busy(`cannot unmount the stale FUSE mount at ${directory}: ${failure}`);
    log(`replaced a stale FUSE mount at ${directory} (left by a process that died)`, 'warn');
  }
}

function sizeBucket(sizeBytes: number): string {
  let bucket = 512;
  while (bucket < sizeBytes) bucket *= 2;
  return bucket >= 1024 * 1024 ? `${bucket / (1024 * 1024)}MiB` : bucket >= 1024 ? `${bucket / 1024}KiB` : `${bucket}B`;
}

export class FuseSession {
  readonly directory: string;
  readonly #handler: FuseHandler;
  readonly #log: Log;
  #fd = -1;
  #connection = '';
  #stopping = false;
  readonly #readers: Array<Promise<void>> = [];
  readonly #freeBuffers: Buffer[] = [];
  readonly #inFlight = new Set<Promise<void>>();
  readonly #stats: FuseSessionStats = { requestsTotal: 0, requestErrorsTotal: 0, inFlight: 0, readSizes: {}, writeSizes: {}, readBytesMax: 0, writeBytesMax: 0, kernel: null };

  private constructor(directory: string, handler: FuseHandler, log: Log) {
    this.directory = directory;
    this.#handler = handler;
    this.#log = log;
  }

  /** Mounts a FUSE file system at `directory` (created if missing; a stale mount there is replaced) and serves it. */
  static async mount(directory: string, handler: FuseHandler, log: Log): Promise<FuseSession> {
    // The directory itself may be a dead mount (ENOTCONN on every access): resolve its parent only.
    const absolute = path.resolve(directory);
    fs.mkdirSync(path.dirname(absolute), { recursive: true });
    const resolved = path.join(fs.realpathSync(path.dirname(absolute)), path.basename(absolute));
    await clearStaleMount(resolved, log);
    fs.mkdirSync(resolved, { recursive: true });
    const session = new FuseSession(resolved, handler, log);
    session.#fd = fs.openSync('/dev/fuse', 'r+');
    const options = `fd=${session.#fd},rootmode=40000,user_id=0,group_id=0,allow_other,max_read=${fuseRequestBytesMax}`;
    if ((mountFn()('chunkd', resolved, 'fuse.chunkd', MS_NOSUID | MS_NODEV, options) as number) !== 0) {
      const errno = koffi().errno();
      fs.closeSync(session.#fd);
      throw ChunkdError.io(`mounting FUSE at ${resolved} failed: ${errnoName(errno)}`);
    }
    session.#connection = mountAt(resolved)?.device ?? '';
    for (let i = 0; i < postedReadsMax; i++) session.#readers.push(session.#readLoop());
    return session;
  }

  stats(): FuseSessionStats {
    return { ...this.#stats, inFlight: this.#inFlight.size, readSizes: { ...this.#stats.readSizes }, writeSizes: { ...this.#stats.writeSizes } };
  }

  /**
   * Unmounts and stops serving. When something still holds the mount (a loop device over one of its files), it is
   * detached lazily and the connection aborted: that holder's I/O fails from now on.
   */
  async close(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    let failure = unmountDirectory(this.directory, false);
    if (failure === 'EBUSY') {
      this.#log(`FUSE mount ${this.directory} still in use at stop: detaching it lazily and aborting its connection`);
      failure = unmountDirectory(this.directory, true);
    }
    if (failure !== null && failure !== 'EINVAL') this.#log(`unmounting ${this.directory} failed: ${failure}`, 'warn');
    // Posted reads return ENODEV only once the connection ends; a lazily detached mount still in use keeps it up.
    this.#abortConnection();
    await Promise.allSettled([...this.#inFlight]);
    await Promise.all(this.#readers);
    fs.closeSync(this.#fd);
    this.#fd = -1;
  }

  #abortConnection(): void {
    const [major, minor] = this.#connection.split(':');
    if (major !== '0' || minor === undefined) return;
    try {
      fs.writeFileSync(`/sys/fs/fuse/connections/${minor}/abort`, '1');
    } catch (error) {
      // Gone already: the unmount ended the connection.
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') this.#log(`aborting FUSE connection ${minor}: ${(error as Error).message}`, 'warn');
    }
  }

  #takeBuffer(): Buffer {
    return this.#freeBuffers.pop() ?? Buffer.allocUnsafe(readBufferBytes);
  }

  #giveBuffer(buffer: Buffer): void {
    if (this.#freeBuffers.length < freeBuffersMax) this.#freeBuffers.push(buffer);
  }

  async #readLoop(): Promise<void> {
    for (;;) {
      const buffer = this.#takeBuffer();
      let bytesRead: number;
      try {
        bytesRead = await new Promise<number>((resolve, reject) => fs.read(this.#fd, buffer, 0, buffer.length, null, (error, n) => (error ? reject(error) : resolve(n))));
      } catch (error) {
        this.#giveBuffer(buffer);
        const code = (error as NodeJS.ErrnoException).code;
        // ENOENT: the request was interrupted before we read it; EINTR, EAGAIN: try again.
        if (code === 'ENOENT' || code === 'EINTR' || code === 'EAGAIN') continue;
        // ENODEV: unmounted, or the connection was aborted. Anything else ends this reader too.
        if (code !== 'ENODEV' && !this.#stopping) this.#log(`reading /dev/fuse for ${this.directory}: ${(error as Error).message}`, 'error');
        return;
      }
      const request = buffer.subarray(0, bytesRead);
      // #serve answers every failure it expects; what escapes it is a bug.
      const work = this.#serve(request)
        .catch((error: unknown) => failStop(error, `serving a FUSE request on ${this.directory}`))
        .finally(() => {
          this.#inFlight.delete(work);
          this.#giveBuffer(buffer);
        });
      this.#inFlight.add(work);
    }
  }

  async #serve(request: Buffer): Promise<void> {
    this.#stats.requestsTotal += 1;
    const invalid = checkRequest(request, fuseRequestBytesMax);
    if (invalid !== 0) return this.#refuse(request, invalid);
    const header = decodeInHeader(request);
    const body = request.subarray(inHeaderBytes);
    if (header.opcode === Opcode.INIT) return this.#init(header, body);
    if (header.opcode === Opcode.READ || header.opcode === Opcode.WRITE) this.#countSize(header.opcode, body.readUInt32LE(16));
    let reply: FuseReply;
    try {
      reply = await this.#handler.handle(header, body);
    } catch (error) {
      reply = expectedError(error, `FUSE request ${header.opcode} on ${this.directory}`).errno;
    }
    if (!expectsReply(header.opcode)) return;
    if (typeof reply === 'number') {
      if (reply !== 0) this.#stats.requestErrorsTotal += 1;
      return this.#write(header.unique, reply, null);
    }
    if (Buffer.isBuffer(reply)) return this.#write(header.unique, 0, reply);
    try {
      this.#writeFrame(header.unique, reply.frame);
    } finally {
      reply.written();
    }
  }

  /** Answers a frame that does not parse, when its header says whom to answer and that an answer is awaited. */
  #refuse(request: Buffer, errno: number): void {
    this.#stats.requestErrorsTotal += 1;
    const opcode = request.length >= 8 ? request.readUInt32LE(4) : -1;
    this.#log(`FUSE request of ${request.length} bytes (opcode ${opcode}) does not parse: answered errno ${errno}`);
    if (request.length >= 16 && expectsReply(opcode)) this.#write(readU64(request, 8), errno, null);
  }

  #countSize(opcode: number, sizeBytes: number): void {
    const bucket = sizeBucket(sizeBytes);
    if (opcode === Opcode.READ) {
      this.#stats.readSizes[bucket] = (this.#stats.readSizes[bucket] ?? 0) + 1;
      this.#stats.readBytesMax = Math.max(this.#stats.readBytesMax, sizeBytes);
    } else {
      this.#stats.writeSizes[bucket] = (this.#stats.writeSizes[bucket] ?? 0) + 1;
      this.#stats.writeBytesMax = Math.max(this.#stats.writeBytesMax, sizeBytes);
    }
  }

  #init(header: InHeader, body: Buffer): void {
    const init = decodeInit(body);
    if (init.major !== FUSE_KERNEL_VERSION || init.minor < FUSE_KERNEL_MINOR_VERSION) {
      this.#log(`FUSE kernel protocol ${init.major}.${init.minor} is older than the 7.${FUSE_KERNEL_MINOR_VERSION} chunkd needs`);
      return this.#write(header.unique, 71, null); // EPROTO
    }
    const wanted = InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.ASYNC_DIO | InitFlag.PARALLEL_DIROPS | InitFlag.MAX_PAGES;
    const maxPages = fuseRequestBytesMax / 4096;
    this.#stats.kernel = { minor: FUSE_KERNEL_MINOR_VERSION, maxPages, maxWriteBytes: fuseRequestBytesMax };
    const reply = encodeInit({
      minor: FUSE_KERNEL_MINOR_VERSION,
      maxReadaheadBytes: Math.min(init.maxReadaheadBytes, fuseRequestBytesMax),
      flags: init.flags & wanted,
      maxBackground,
      congestionThreshold: (maxBackground * 3) / 4,
      maxWriteBytes: fuseRequestBytesMax,
      maxPages,
    });
    this.#write(header.unique, 0, reply);
  }

  #write(unique: number, errno: number, body: Buffer | null): void {
    const frame = Buffer.allocUnsafe(outHeaderBytes + (body?.length ?? 0));
    body?.copy(frame, outHeaderBytes);
    encodeOutHeader(frame, unique, errno, body?.length ?? 0);
    this.#send(frame);
  }

  #writeFrame(unique: number, frame: Buffer): void {
    encodeOutHeader(frame, unique, 0, frame.length - outHeaderBytes);
    this.#send(frame);
  }

  #send(frame: Buffer): void {
    if (this.#fd < 0) return;
    let written: number;
    try {
      written = fs.writeSync(this.#fd, frame);
    } catch (error) {
      if (!isSystemError(error)) throw error;
      // ENOENT: the kernel gave up on this request (interrupted); ENODEV: the mount is gone.
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENODEV') this.#log(`replying on /dev/fuse for ${this.directory}: ${(error as Error).message}`, 'warn');
      return;
    }
    assert(written === frame.length, 'a write to /dev/fuse is all or nothing');
  }
}
