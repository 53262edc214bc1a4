// How bytes in shared memory are named in a message to another thread: an NBD protocol thread's call to the main
// thread (remote-device.ts, device-host.ts) and the main thread's task to a chunk I/O worker (worker-io.ts,
// chunk-task.ts). A slab the receiver was handed once is named by number, so that no SharedArrayBuffer is cloned
// per message; any other shared buffer travels itself (cloning a SharedArrayBuffer shares it, copies nothing).
import { assert } from './assert.ts';

/** Where a message's bytes are: in slab number `slab` of the receiver, or in `memory`, a shared buffer of their own (`slab` false or absent). */
export type SharedBytes =
  | { slab: number; byteOffset: number; lengthBytes: number }
  | { slab?: false; memory: SharedArrayBuffer; byteOffset: number; lengthBytes: number };

/** Names `buffer`'s bytes as slab `slabNumber` when they are in `slab`; they must be in shared memory. */
export function sharedBytesOf(buffer: Uint8Array, slab: SharedArrayBuffer | null, slabNumber: number): SharedBytes {
  if (slab !== null && buffer.buffer === slab) return { slab: slabNumber, byteOffset: buffer.byteOffset, lengthBytes: buffer.length };
  assert(buffer.buffer instanceof SharedArrayBuffer, 'only shared buffers cross to another thread');
  return { slab: false, memory: buffer.buffer, byteOffset: buffer.byteOffset, lengthBytes: buffer.length };
}

/** A view of the bytes `bytes` names, given the slabs this thread holds; null when it names a slab never handed over. */
export function sharedView(bytes: SharedBytes, slabs: ReadonlyMap<number, SharedArrayBuffer>): Buffer | null {
  const memory = 'memory' in bytes ? bytes.memory : slabs.get(bytes.slab);
  if (memory === undefined) return null;
  return Buffer.from(memory, bytes.byteOffset, bytes.lengthBytes);
}
