// The devices of an NBD protocol thread (nbd-threads.ts): BlockDevices whose every call is a message to the
// node's main thread, which owns the pool's metadata and runs the call on the real device (device-host.ts).
// Bytes never travel in the messages: a READ reply or WRITE payload sits in shared memory (the thread's slab,
// registered once, or a SharedArrayBuffer of its own), and the chunk I/O workers read or write it in place.
// Calls made in one turn of the event loop leave as one message (and results come back the same way), so the
// per-message cost is shared by every request of a busy turn.
import type { MessagePort } from 'node:worker_threads';
import type { BlockDevice, DeviceProvider, Extent, WriteOptions, ZeroOptions } from '../core/block-device.ts';
import { ChunkdError, errorCodes, type ErrorCode } from '../core/errors.ts';
import { sharedBytesOf, type SharedBytes } from '../core/shared-bytes.ts';
import { TurnBatch } from '../core/turn-batch.ts';

export type DeviceCall =
  | { id: number; op: 'open'; name: string }
  | { id: number; op: 'list' }
  | { id: number; op: 'read' | 'write'; handle: number; offsetBytes: number; bytes: SharedBytes; fua: boolean }
  | { id: number; op: 'trim' | 'zero'; handle: number; offsetBytes: number; lengthBytes: number; fua: boolean; noHole: boolean }
  | { id: number; op: 'flush' | 'close'; handle: number }
  | { id: number; op: 'status'; handle: number; offsetBytes: number; lengthBytes: number };

export type DeviceResult =
  | { id: number; ok: true; value?: unknown }
  | { id: number; ok: false; code: ErrorCode; message: string };

/** What opening a device answers: enough to serve the handshake without asking again. */
export interface OpenedDevice {
  handle: number;
  name: string;
  sizeBytes: number;
  readOnly: boolean;
}

/** First message on a port: the slab of the thread's shared buffers, so calls name it by number. */
export interface SlabRegistration {
  op: 'slab';
  slab: number;
  memory: SharedArrayBuffer;
}

export class RemoteProvider implements DeviceProvider {
  readonly #pending = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void }>();
  readonly #outgoing: TurnBatch<DeviceCall>;
  #nextId = 1;
  #exports: Array<{ name: string; description: string }> = [];
  readonly #slab: SharedArrayBuffer | null;

  /** `slab`: the thread's shared slab (registered as slab 0 on the port). */
  constructor(port: MessagePort, slab: SharedArrayBuffer | null) {
    this.#slab = slab;
    this.#outgoing = new TurnBatch((calls) => port.postMessage(calls));
    if (slab !== null) port.postMessage({ op: 'slab', slab: 0, memory: slab } satisfies SlabRegistration);
    port.on('message', (results: DeviceResult[]) => {
      for (const result of results) {
        const pending = this.#pending.get(result.id);
        if (pending === undefined) continue;
        this.#pending.delete(result.id);
        if (result.ok) pending.resolve(result.value);
        else pending.reject(new ChunkdError(result.code in errorCodes ? result.code : 'EIO', result.message));
      }
    });
  }

  async open(exportName: string): Promise<BlockDevice> {
    const opened = (await this.call({ op: 'open', name: exportName })) as OpenedDevice;
    return new RemoteDevice(this, opened);
  }

  list(): Array<{ name: string; description: string }> {
    // NBD_OPT_LIST is answered from the last list fetched; refreshed in the background at each call.
    void this.call({ op: 'list' }).then((exports) => (this.#exports = exports as Array<{ name: string; description: string }>), () => {});
    return this.#exports;
  }

  /** Fetches the export list once (before the first client can ask). */
  async refreshList(): Promise<void> {
    this.#exports = (await this.call({ op: 'list' })) as Array<{ name: string; description: string }>;
  }

  /** Where `buffer`'s bytes are, for the main thread (they must be in shared memory). */
  sharedBytes(buffer: Buffer): SharedBytes {
    return sharedBytesOf(buffer, this.#slab, 0);
  }

  call(call: DistributiveOmit<DeviceCall, 'id'>): Promise<unknown> {
    const id = this.#nextId++;
    const promise = new Promise<unknown>((resolve, reject) => this.#pending.set(id, { resolve, reject }));
    this.#outgoing.add({ ...call, id } as DeviceCall);
    return promise;
  }
}

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;

class RemoteDevice implements BlockDevice {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly #provider: RemoteProvider;
  readonly #handle: number;

  constructor(provider: RemoteProvider, opened: OpenedDevice) {
    this.#provider = provider;
    this.#handle = opened.handle;
    this.name = opened.name;
    this.sizeBytes = opened.sizeBytes;
    this.readOnly = opened.readOnly;
  }

  async read(offsetBytes: number, target: Buffer): Promise<void> {
    await this.#provider.call({ op: 'read', handle: this.#handle, offsetBytes, bytes: this.#provider.sharedBytes(target), fua: false });
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    await this.#provider.call({ op: 'write', handle: this.#handle, offsetBytes, bytes: this.#provider.sharedBytes(data), fua: options?.fua === true });
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await this.#provider.call({ op: 'trim', handle: this.#handle, offsetBytes, lengthBytes, fua: options?.fua === true, noHole: false });
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    await this.#provider.call({ op: 'zero', handle: this.#handle, offsetBytes, lengthBytes, fua: options?.fua === true, noHole: options?.noHole === true });
  }

  async flush(): Promise<void> {
    await this.#provider.call({ op: 'flush', handle: this.#handle });
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return (await this.#provider.call({ op: 'status', handle: this.#handle, offsetBytes, lengthBytes })) as Extent[];
  }

  async close(): Promise<void> {
    await this.#provider.call({ op: 'close', handle: this.#handle });
  }
}
