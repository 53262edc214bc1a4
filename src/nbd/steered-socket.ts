// Socket reads that land where the caller says: Node's `onread` option (a buffer, or a function that picks the
// buffer for each next read) instead of 'data' events. The NBD connection uses it to receive a large WRITE
// payload straight into the buffer the store writes from (shared memory for the worker threads), so the kernel's
// copy out of the socket is the only one. Through 'data' events each 64 KiB read is a new buffer (the garbage
// collector's work) and the payload is copied once more to gather it: measured on 1 MiB writes, the two took a
// third of the main thread, and reading in place moved 1 MiB messages over a unix socket 3-4x faster.
//
// Node offers `onread` only to sockets it makes from a descriptor (`new net.Socket({ fd, onread })`), not to
// those a server accepts. So the server accepts with pauseOnConnect (nothing read yet), and the accepted socket's
// descriptor is duplicated (close-on-exec, as Node's own: a child such as nbdfuse must not inherit client sockets)
// into a new socket that has onread; the original is then destroyed, which closes only its own descriptor. The
// descriptor number is read from the socket's handle, a private field: when it is not there, or anything in the
// move fails (another platform, another Node, no descriptors left), the caller keeps the accepted socket and its
// 'data' events.
import fs from 'node:fs';
import net from 'node:net';
import { libcFunction } from '../core/libc.ts';

const fcntlFn = libcFunction('int fcntl(int fd, int cmd, ...)');
const F_DUPFD_CLOEXEC = 1030;

/** Where a steered socket's bytes go. */
export interface SteeredReader {
  /** The buffer the next read lands in (from its start); called before the first read and after each one. */
  nextReadBuffer(): Buffer;
  /** `count` bytes arrived at the start of `buffer`, the one nextReadBuffer returned last. */
  onRead(count: number, buffer: Buffer): void;
}

/**
 * Moves a socket accepted with pauseOnConnect onto a new socket whose reads go where `reader` says; returns
 * null (and leaves the accepted socket alone) when its descriptor cannot be had.
 */
export function steerReads(accepted: net.Socket, reader: SteeredReader, options: { allowHalfOpen: boolean }): net.Socket | null {
  const fd = (accepted as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return null;
  let copy = -1;
  let socket: net.Socket;
  try {
    copy = fcntlFn()(fd, F_DUPFD_CLOEXEC, 'int', 0) as number;
    if (copy < 0) return null;
    socket = new net.Socket({
      fd: copy,
      readable: true,
      writable: true,
      allowHalfOpen: options.allowHalfOpen,
      onread: {
        buffer: () => reader.nextReadBuffer(),
        callback: (count: number, buffer: Uint8Array) => {
          reader.onRead(count, buffer as Buffer);
          return true; // the reader pauses the socket itself when it must
        },
      },
    });
  } catch {
    if (copy >= 0) fs.closeSync(copy);
    return null;
  }
  accepted.on('error', () => {});
  accepted.destroy();
  return socket;
}
