// One error policy for every front end (NBD on the main thread and on protocol threads, FUSE, the management API,
// the Docker plugin) and every thread. What a request's work throws is one of three things:
//   1. A ChunkdError, or a system error (an errno code such as ENOSPC or EIO, made a ChunkdError by
//      fromSystemError): an error reply to that request (NBD error, FUSE errno, HTTP status and JSON error); the
//      node serves on.
//   2. A protocol violation (ChunkdError EPROTO from a decoder, a frame that does not parse): that connection is
//      closed, or where there is none to close (FUSE) that request gets an errno; the node serves on.
//   3. Anything else (an AssertionError, a TypeError, a RangeError): a bug, so the node's state is suspect. The
//      node stops at once (fail-stop, as TigerBeetle does): one line with the stack on stderr, exit code 70,
//      nothing more committed. The journal makes the restart recover every acknowledged write.
// Client input must therefore never reach case 3: each front end validates first (nbd/validate.ts, FUSE's
// checkRequest, the API's field checks) and the code behind it asserts. An unhandled rejection or an uncaught
// exception is case 3 too (installFailStop). On a worker thread failStop ends the thread with the same code,
// and the main thread stops the node when it sees that (node/nbd-threads.ts): a bug anywhere stops the node.
import fs from 'node:fs';
import { isMainThread, threadId } from 'node:worker_threads';
import { ChunkdError, fromSystemError, isSystemError } from './errors.ts';

/** The exit code of a fail-stop (EX_SOFTWARE: an internal software error). */
export const failStopExitCode = 70;

export type FailStopHook = (error: unknown, where: string) => void;

function stopProcess(error: unknown, where: string): void {
  const detail = error instanceof Error ? (error.stack ?? error.message) : String(error);
  const thread = isMainThread ? '' : ` on thread ${threadId}`;
  try {
    // Synchronous: nothing after this line runs, and the line must be out before the process is gone.
    fs.writeSync(2, `${new Date().toISOString()} chunkd: fail-stop: a bug (in ${where}${thread}); stopping now, committing nothing more (a restart recovers): ${detail}\n`);
  } finally {
    process.exit(failStopExitCode); // on a worker thread: ends the thread, and the main thread stops the node
  }
}

let hook: FailStopHook = stopProcess;

/** Stops the process (or this worker thread) at once for a bug; only a test's hook (setFailStopHook) returns. */
export function failStop(error: unknown, where: string): void {
  hook(error, where);
}

/** Replaces what failStop does (tests observe it instead of dying); null restores the default. */
export function setFailStopHook(replacement: FailStopHook | null): void {
  hook = replacement ?? stopProcess;
}

/**
 * The ChunkdError a request is answered with for what its work threw: a ChunkdError as it is, a system error as
 * fromSystemError makes it. Anything else is a bug and stops the node; only when a test's hook lets failStop
 * return does the request get EIO, so that the test can finish.
 */
export function expectedError(error: unknown, where: string): ChunkdError {
  if (error instanceof ChunkdError) return error;
  if (isSystemError(error)) return fromSystemError(error, where);
  failStop(error, where);
  return ChunkdError.io(`${where}: internal error`, error);
}

/** Makes every unhandled rejection and uncaught exception of this thread a fail-stop (`chunkd serve`, NBD threads). */
export function installFailStop(): void {
  process.on('uncaughtException', (error) => failStop(error, 'an uncaught exception'));
  process.on('unhandledRejection', (reason) => failStop(reason, 'an unhandled rejection'));
}
