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
//
// TLS: once TLS takes a socket over (tls.TLSSocket over the steered one), OpenSSL reads the encrypted bytes itself
// and hands on what it decrypts, one record (16 KiB at most) at a time. Through 'data' events each record is a new
// buffer: on 1 MiB writes over TLS that was 64 buffers per request, a 'data' event and a copy for each, and the
// garbage collector's work (a full collection every ~100 ms, a quarter of the node's CPU). Node gives `onread` to
// a TLSSocket only when it makes the connection itself (tls.connect without a socket), not to one made over a
// socket; steerTlsReads sets the same three fields that option sets (found by their symbols' descriptions, private
// to Node) and points the TLS handle at the reader's buffer, as Node does for onread. Each record is then copied
// once, into the arena or straight into a large WRITE's payload. When the fields are not there (another Node),
// the caller keeps 'data' events.
import fs from 'node:fs';
import net from 'node:net';
import type tls from 'node:tls';
import { libcFunction } from '../core/libc.ts';

const fcntlFn = libcFunction('int fcntl(int fd, int cmd, ...)');
const setsockoptFn = libcFunction('int setsockopt(int fd, int level, int name, void *value, uint32_t length)');
const F_DUPFD_CLOEXEC = 1030;
const SOL_SOCKET = 1;
const SO_SNDBUF = 7;

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
  const fd = descriptorOf(accepted);
  if (fd === null) return null;
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

/**
 * Makes a TLSSocket's decrypted bytes land where `reader` says, as the `onread` option would; returns false (and
 * changes nothing) when this Node's socket does not have the fields that option sets. Call it right after the
 * TLSSocket is made, before it reads.
 */
export function steerTlsReads(secure: tls.TLSSocket, reader: SteeredReader): boolean {
  const fields = secure as unknown as Record<symbol, unknown>;
  const symbols = Object.getOwnPropertySymbols(secure);
  const field = (description: string): symbol | undefined => symbols.find((symbol) => symbol.description === description);
  const buffer = field('kBuffer');
  const bufferGen = field('kBufferGen');
  const bufferCb = field('kBufferCb');
  const handle = (secure as unknown as { _handle?: { useUserBuffer?: (buffer: Uint8Array) => void } })._handle;
  if (buffer === undefined || bufferGen === undefined || bufferCb === undefined || typeof handle?.useUserBuffer !== 'function') return false;
  // Unset (null) is what a socket made without onread holds; anything else is not the layout this was written for.
  if (fields[buffer] !== null || fields[bufferGen] !== null || fields[bufferCb] !== null) return false;
  const first = reader.nextReadBuffer();
  fields[buffer] = first;
  fields[bufferGen] = () => reader.nextReadBuffer();
  fields[bufferCb] = (count: number, landed: Buffer) => {
    reader.onRead(count, landed);
    return true; // the reader pauses the socket itself when it must
  };
  handle.useUserBuffer(first);
  return true;
}

/**
 * Asks the kernel for a send buffer of `bytes` on a unix socket's descriptor (it may grant less); a socket whose
 * descriptor cannot be had, or a refusal, keeps the one it has: only speed depends on it. A TCP socket is left
 * alone: TCP grows its send buffer itself (autotuning, to net.ipv4.tcp_wmem's maximum), and setting SO_SNDBUF
 * would fix it at what was asked.
 */
export function widenSendBuffer(socket: net.Socket, bytes: number): void {
  if (socket.remotePort !== undefined) return;
  const fd = descriptorOf(socket);
  if (fd === null) return;
  const value = Buffer.alloc(4);
  value.writeInt32LE(bytes);
  try {
    setsockoptFn()(fd, SOL_SOCKET, SO_SNDBUF, value, value.length);
  } catch {
    // koffi or libc not to be had: as a refusal.
  }
}

/** The socket's descriptor, from its handle (a private field); null when it is not there. */
export function descriptorOf(socket: net.Socket): number | null {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}
