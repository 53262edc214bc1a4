// The few system calls Node's fs lacks, through koffi (a maintained FFI with prebuilt binaries, so nothing is
// compiled at install): fallocate (punching holes gives space back to the file system; zero-range zeroes without
// writing), flock (one node per pool) and lseek with SEEK_DATA (fsck finds data left in free space).
// Calls that touch the disk run on koffi's worker threads (`.async`), never on the event loop.
import koffi from 'koffi';

const libc = koffi.load('libc.so.6');
const fallocateFn = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
const flockFn = libc.func('int flock(int fd, int operation)');
const lseekFn = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');

const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
const LOCK_EX = 2;
const LOCK_NB = 4;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;

const errnoNames = new Map<number, string>(Object.entries(koffi.os.errno as Record<string, number>).map(([name, value]) => [value, name]));

function systemError(call: string, errno: number): NodeJS.ErrnoException {
  const code = errnoNames.get(errno) ?? `E${errno}`;
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
      fallocateFn.async(fd, mode, offsetBytes, lengthBytes, (error: unknown, result: number) => {
        const errno = koffi.errno();
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
  if (flockFn(fd, LOCK_EX | LOCK_NB) === 0) return true;
  const errno = koffi.errno();
  if (errno === (koffi.os.errno as Record<string, number>).EWOULDBLOCK) return false;
  throw systemError('flock', errno);
}

/** Data ranges of the open file in [startBytes, endBytes), found with SEEK_DATA/SEEK_HOLE without reading data. */
export function dataRanges(fd: number, startBytes: number, endBytes: number): Array<{ offsetBytes: number; lengthBytes: number }> {
  const ranges: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  let offset = startBytes;
  while (offset < endBytes) {
    const dataStart = Number(lseekFn(fd, offset, SEEK_DATA));
    if (dataStart < 0 || dataStart >= endBytes) break;
    const holeStart = Math.min(Number(lseekFn(fd, dataStart, SEEK_HOLE)), endBytes);
    if (holeStart <= dataStart) break;
    ranges.push({ offsetBytes: dataStart, lengthBytes: holeStart - dataStart });
    offset = holeStart;
  }
  return ranges;
}
