// The main thread's side of an NBD protocol thread (nbd-threads.ts, remote-device.ts): runs each call on the
// real device, which the node's provider opens, and answers in batches. Calls arrive in the order a connection
// sent them and reach the devices in that order, so the volume's range lock orders them as it orders calls
// from a connection served on this thread. Devices a thread left open (it was stopped abruptly) are closed when
// its port closes. A call's failure is answered as fail-stop.ts says: a ChunkdError or a system error goes
// back to the thread as its error code; a bug stops the node.
import type { MessagePort } from 'node:worker_threads';
import type { BlockDevice, DeviceProvider } from '../core/block-device.ts';
import { ChunkdError } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
import { sharedView, type SharedBytes } from '../core/shared-bytes.ts';
import { TurnBatch } from '../core/turn-batch.ts';
import type { DeviceCall, DeviceResult, OpenedDevice, SlabRegistration } from '../nbd/remote-device.ts';

export class DeviceHost {
  readonly #provider: DeviceProvider;
  readonly #devices = new Map<number, BlockDevice>();
  readonly #slabs = new Map<number, SharedArrayBuffer>();
  #nextHandle = 1;
  readonly #outgoing: TurnBatch<DeviceResult>;

  constructor(provider: DeviceProvider, port: MessagePort) {
    this.#provider = provider;
    this.#outgoing = new TurnBatch((results) => port.postMessage(results));
    port.on('message', (message: DeviceCall[] | SlabRegistration) => {
      if (!Array.isArray(message)) {
        this.#slabs.set(message.slab, message.memory);
        return;
      }
      for (const call of message) this.#run(call);
    });
    port.on('close', () => void this.closeAll());
  }

  /** Closes every device still open through this port. */
  async closeAll(): Promise<void> {
    const devices = [...this.#devices.values()];
    this.#devices.clear();
    await Promise.allSettled(devices.map((device) => device.close()));
  }

  #run(call: DeviceCall): void {
    let operation: Promise<unknown>;
    try {
      operation = this.#start(call);
    } catch (error) {
      operation = Promise.reject(error);
    }
    operation.then(
      (value) => this.#outgoing.add({ id: call.id, ok: true, value }),
      (error: unknown) => {
        const failure = expectedError(error, `${call.op} for an NBD thread`);
        this.#outgoing.add({ id: call.id, ok: false, code: failure.code, message: failure.message });
      },
    );
  }

  #start(call: DeviceCall): Promise<unknown> {
    switch (call.op) {
      case 'open':
        return this.#provider.open(call.name).then((device): OpenedDevice => {
          const handle = this.#nextHandle++;
          this.#devices.set(handle, device);
          return { handle, name: device.name, sizeBytes: device.sizeBytes, readOnly: device.readOnly };
        });
      case 'list':
        return Promise.resolve(this.#provider.list());
      case 'read':
        return this.#device(call.handle).read(call.offsetBytes, this.#bytes(call.bytes));
      case 'write':
        return this.#device(call.handle).write(call.offsetBytes, this.#bytes(call.bytes), { fua: call.fua });
      case 'trim':
        return this.#device(call.handle).trim(call.offsetBytes, call.lengthBytes, { fua: call.fua });
      case 'zero':
        return this.#device(call.handle).writeZeroes(call.offsetBytes, call.lengthBytes, { fua: call.fua, noHole: call.noHole });
      case 'flush':
        return this.#device(call.handle).flush();
      case 'status':
        return this.#device(call.handle).blockStatus(call.offsetBytes, call.lengthBytes);
      case 'close': {
        const device = this.#device(call.handle);
        this.#devices.delete(call.handle);
        return device.close();
      }
    }
  }

  #device(handle: number): BlockDevice {
    const device = this.#devices.get(handle);
    if (device === undefined) throw new ChunkdError('EINVAL', `no open device ${handle} on this protocol thread`);
    return device;
  }

  #bytes(bytes: SharedBytes): Buffer {
    const view = sharedView(bytes, this.#slabs);
    if (view === null) throw new ChunkdError('EINVAL', 'a call names a slab that was never registered');
    return view;
  }
}
