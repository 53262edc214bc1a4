// The few system calls Node's fs lacks, through koffi (core/libc.ts, which loads it on first use): fallocate
// (punching holes gives space back to the file system; zero-range zeroes without writing), flock (one node per
// pool), lseek with SEEK_DATA (fsck finds data left in free space), and preadv2 with RWF_NOWAIT. Calls that may
// wait on the disk run on koffi's worker threads (`.async`), never on the event loop; preadv2 with RWF_NOWAIT is
// the exception by design: the kernel answers from the page cache or refuses with EAGAIN at once, so it never
// waits, and a cached 4 KiB read costs about a microsecond and a half instead of a round trip through libuv's
// thread pool (several times that, and most of a small read's CPU cost).
import { errnoName, errnoValue, koffi, libcFunction } from '../core/libc.ts';

const fallocateFn = libcFunction('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
const flockFn = libcFunction('int flock(int fd, int operation)');
const lseekFn = libcFunction('int64_t lseek(int fd, int64_t offset, int whence)');
const preadv2Fn = libcFunction('int64_t preadv2(int fd, void *iov, int iovcnt, int64_t offset, int flags)');
const memcpyFn = libcFunction('uintptr_t memcpy(uintptr_t dest, uintptr_t src, size_t n)');

const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
const LOCK_EX = 2;
const LOCK_NB = 4;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const RWF_NOWAIT = 0x08;
/**
 * One iovec, reused: calls on it are synchronous, so no two use it at once. Set through typed views (in the
 * machine's byte order, as the kernel reads it): a read of a range rewritten at random sets it once per short
 * run, and Buffer's BigInt writers cost more than the views.
 */
const iovec = Buffer.alloc(16);
const iovecBase = new BigUint64Array(iovec.buffer, iovec.byteOffset, 1);
const iovecLength = new Uint32Array(iovec.buffer, iovec.byteOffset + 8, 2);
let nowaitReadsWork = true;

function systemError(call: string, errno: number): NodeJS.ErrnoException {
  // ENOTSUP and EOPNOTSUPP are one value on Linux; callers test for the POSIX name fallocate documents.
  const code = errno === errnoValue('EOPNOTSUPP') ? 'EOPNOTSUPP' : errnoName(errno);
  const error: NodeJS.ErrnoException = new Error(`${call} failed: ${code}`);
  error.code = code;
  error.errno = -errno;
  error.syscall = call;
  return error;
}

// koffi throws once more than max_async_calls (256) are queued; a large trim or a load-time sweep issues many
// more, so calls past this many wait in our own queue.
const asyncCallsMax = 64;
let asyncCallsRunning = 0;
const waitingCalls: Array<() => void> = [];

function fallocateAsync(fd: number, mode: number, offsetBytes: number, lengthBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const start = (): void => {
      asyncCallsRunning += 1;
      fallocateFn().async(fd, mode, offsetBytes, lengthBytes, (error: unknown, result: number) => {
        const errno = koffi().errno();
        asyncCallsRunning -= 1;
        waitingCalls.shift()?.();
        if (error) reject(error);
        else if (result !== 0) reject(systemError('fallocate', errno));
        else resolve();
      });
    };
    if (asyncCallsRunning < asyncCallsMax) start();
    else waitingCalls.push(start);
  });
}

/** Deallocates the range (reads give zeros) and gives its space back to the file system; keeps the file size. */
export function punchHole(fd: number, offsetBytes: number, lengthBytes: number): Promise<void> {
  return fallocateAsync(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offsetBytes, lengthBytes);
}

/** Zeroes the range, allocated, without writing zeros (EOPNOTSUPP on file systems that cannot, such as tmpfs). */
export function zeroRange(fd: number, offsetBytes: number, lengthBytes: number): Promise<void> {
  return fallocateAsync(fd, FALLOC_FL_ZERO_RANGE, offsetBytes, lengthBytes);
}

/** Reserves space for the range (reads give zeros where nothing was written); may grow the file. */
export function reserveSpace(fd: number, offsetBytes: number, lengthBytes: number): Promise<void> {
  return fallocateAsync(fd, 0, offsetBytes, lengthBytes);
}

/** Takes an exclusive advisory lock on the open file, or returns false if another process holds it. */
export function tryLockExclusive(fd: number): boolean {
  if (flockFn()(fd, LOCK_EX | LOCK_NB) === 0) return true;
  const errno = koffi().errno();
  if (errno === errnoValue('EWOULDBLOCK')) return false;
  throw systemError('flock', errno);
}

/** Data ranges of the open file in [startBytes, endBytes), found with SEEK_DATA/SEEK_HOLE without reading data. */
export function dataRanges(fd: number, startBytes: number, endBytes: number): Array<{ offsetBytes: number; lengthBytes: number }> {
  const ranges: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  let offset = startBytes;
  while (offset < endBytes) {
    const dataStart = Number(lseekFn()(fd, offset, SEEK_DATA));
    if (dataStart < 0 || dataStart >= endBytes) break;
    const holeStart = Math.min(Number(lseekFn()(fd, dataStart, SEEK_HOLE)), endBytes);
    if (holeStart <= dataStart) break;
    ranges.push({ offsetBytes: dataStart, lengthBytes: holeStart - dataStart });
    offset = holeStart;
  }
  return ranges;
}

/**
 * Reads into `target` at `positionBytes` only if the page cache holds the data: returns the bytes read (0 at the
 * end of the file), or -1 when the read would wait on the disk (or the file system cannot say), so that the caller
 * goes the asynchronous way instead. Never blocks the calling thread.
 */
export function readIfCached(fd: number, target: Uint8Array, positionBytes: number): number {
  if (!nowaitReadsWork) return -1;
  iovecBase[0] = koffi().address(target);
  iovecLength[0] = target.length; // iov_len's high half stays 0: a read is far under 4 GiB
  const result = Number(preadv2Fn()(fd, iovec, 1, positionBytes, RWF_NOWAIT));
  if (result >= 0) return result;
  const errno = koffi().errno();
  if (errno === errnoValue('EOPNOTSUPP') || errno === errnoValue('EINVAL')) nowaitReadsWork = false;
  return -1;
}

/**
 * Copies all of `source` into the start of `target` with libc's memcpy. Buffer's copy of bytes in shared memory (a
 * reply buffer of the workers' pool) is V8's relaxed memmove, word by word: about a sixth of the node's CPU when
 * read defragmentation copied each 1 MiB reply it rewrites (BENCHMARKS.md, issue 19). Neither may be resized or
 * freed during the call, which is synchronous.
 */
export function copyBytes(target: Uint8Array, source: Uint8Array): void {
  if (source.length > target.length) throw new RangeError('copyBytes: the target is shorter than the source');
  if (source.length === 0) return;
  memcpyFn()(koffi().address(target), koffi().address(source), source.length);
}
