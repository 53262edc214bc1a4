// A Buffer-backed BlockDevice and DeviceProvider for front-end tests: the naive model of a volume. Allocation is
// tracked per 4 KiB block so that trim, zeroing and block status behave as the store's do; ranges are asserted,
// as a real device asserts what the edge validated.
import { setTimeout as sleep } from 'node:timers/promises';
import { assert } from '../../../src/core/assert.ts';
import { doneNow, type BlockDevice, type DeviceProvider, type Extent, type WriteOptions, type ZeroOptions } from '../../../src/core/block-device.ts';
import { ChunkdError } from '../../../src/core/errors.ts';
import { rangeRequestBytesMax, requestBytesMax } from '../../../src/core/limits.ts';

const blockBytes = 4096;

export class MemoryDisk {
  readonly data: Buffer;
  /** One byte per 4 KiB block: 1 when allocated. */
  readonly allocated: Uint8Array;

  constructor(sizeBytes: number) {
    assert(sizeBytes % blockBytes === 0, 'memory disks are whole blocks');
    this.data = Buffer.alloc(sizeBytes);
    this.allocated = new Uint8Array(sizeBytes / blockBytes);
  }
}

export interface MemoryExport {
  disk: MemoryDisk;
  readOnly: boolean;
  description: string;
}

export class MemoryProvider implements DeviceProvider {
  readonly exports = new Map<string, MemoryExport>();
  opens = 0;
  closes = 0;
  /** Milliseconds to wait before each device operation (lets tests keep requests in flight, or reorder them). */
  latencyMs: (op: string, offsetBytes: number) => number = () => 0;
  /** The next read fails with this error (fault injection). */
  failNextRead: unknown = null;
  /**
   * Reads with no latency and no fault done before they return (`doneNow`), as a volume's are from the page
   * cache, so the server takes its path for replies given at once (connection.ts).
   */
  readsAtOnce = false;
  /** Every write and zeroing is recorded here with its options, for assertions. */
  readonly writeLog: Array<{ op: string; offsetBytes: number; lengthBytes: number; options?: WriteOptions | ZeroOptions }> = [];
  flushes = 0;
  /** Device assertions that failed: each one is a request the edge should have refused. */
  readonly assertionFailures: string[] = [];
  /** Device operations running now, and the most seen at once (flow control shows here). */
  operationsInFlight = 0;
  operationsInFlightMax = 0;

  /** Adds an export backed by a new zeroed disk. */
  add(name: string, sizeBytes: number, options: { readOnly?: boolean; description?: string } = {}): MemoryDisk {
    const disk = new MemoryDisk(sizeBytes);
    this.exports.set(name, { disk, readOnly: options.readOnly ?? false, description: options.description ?? '' });
    return disk;
  }

  async open(exportName: string): Promise<BlockDevice> {
    const entry = this.exports.get(exportName);
    if (entry === undefined) throw ChunkdError.notFound(`no export named ${JSON.stringify(exportName)}`);
    this.opens += 1;
    return new MemoryDevice(this, exportName, entry);
  }

  list(): Array<{ name: string; description: string }> {
    return [...this.exports].map(([name, entry]) => ({ name, description: entry.description }));
  }

  /** Opens that were not closed yet. */
  get openDevices(): number {
    return this.opens - this.closes;
  }
}

export class MemoryDevice implements BlockDevice {
  readonly name: string;
  readonly readOnly: boolean;
  readonly #provider: MemoryProvider;
  readonly #disk: MemoryDisk;
  #closed = false;

  constructor(provider: MemoryProvider, name: string, entry: MemoryExport) {
    this.#provider = provider;
    this.name = name;
    this.readOnly = entry.readOnly;
    this.#disk = entry.disk;
  }

  get sizeBytes(): number {
    return this.#disk.data.length;
  }

  read(offsetBytes: number, target: Buffer): Promise<void> {
    const provider = this.#provider;
    if (provider.readsAtOnce && provider.failNextRead === null && provider.latencyMs('read', offsetBytes) === 0) {
      try {
        this.#assertRange(offsetBytes, target.length, requestBytesMax);
      } catch (error) {
        return Promise.reject(error);
      }
      this.#disk.data.copy(target, 0, offsetBytes, offsetBytes + target.length);
      return doneNow;
    }
    return this.#readLater(offsetBytes, target);
  }

  async #readLater(offsetBytes: number, target: Buffer): Promise<void> {
    this.#assertRange(offsetBytes, target.length, requestBytesMax);
    await this.#delay('read', offsetBytes);
    if (this.#provider.failNextRead !== null) {
      const error = this.#provider.failNextRead;
      this.#provider.failNextRead = null;
      throw error;
    }
    this.#disk.data.copy(target, 0, offsetBytes, offsetBytes + target.length);
  }

  async write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    this.#assertRange(offsetBytes, data.length, requestBytesMax);
    assert(!this.readOnly, 'no write reaches a read-only device');
    this.#provider.writeLog.push({ op: 'write', offsetBytes, lengthBytes: data.length, options });
    await this.#delay('write', offsetBytes);
    data.copy(this.#disk.data, offsetBytes);
    this.#allocate(offsetBytes, data.length);
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    this.#assertRange(offsetBytes, lengthBytes, rangeRequestBytesMax);
    assert(!this.readOnly, 'no trim reaches a read-only device');
    this.#provider.writeLog.push({ op: 'trim', offsetBytes, lengthBytes, options });
    await this.#delay('trim', offsetBytes);
    this.#punch(offsetBytes, lengthBytes);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    this.#assertRange(offsetBytes, lengthBytes, rangeRequestBytesMax);
    assert(!this.readOnly, 'no zeroing reaches a read-only device');
    this.#provider.writeLog.push({ op: 'zero', offsetBytes, lengthBytes, options });
    await this.#delay('zero', offsetBytes);
    if (options?.noHole) {
      this.#disk.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
      this.#allocate(offsetBytes, lengthBytes);
    } else {
      this.#punch(offsetBytes, lengthBytes);
    }
  }

  async flush(): Promise<void> {
    this.#provider.flushes += 1;
    await this.#delay('flush', 0);
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#assertRange(offsetBytes, lengthBytes, rangeRequestBytesMax);
    assert(lengthBytes > 0, 'block status of at least one byte');
    await this.#delay('status', offsetBytes);
    const extents: Extent[] = [];
    let at = offsetBytes;
    const end = offsetBytes + lengthBytes;
    while (at < end) {
      const block = Math.floor(at / blockBytes);
      const stepEnd = Math.min(end, (block + 1) * blockBytes);
      const hole = this.#disk.allocated[block] === 0;
      const last = extents.at(-1);
      if (last !== undefined && last.hole === hole) last.lengthBytes += stepEnd - at;
      else extents.push({ lengthBytes: stepEnd - at, hole, zero: hole });
      at = stepEnd;
    }
    return extents;
  }

  async close(): Promise<void> {
    assert(!this.#closed, 'a device is closed once');
    this.#closed = true;
    this.#provider.closes += 1;
  }

  #assertRange(offsetBytes: number, lengthBytes: number, maxBytes: number): void {
    try {
      assert(!this.#closed, 'no I/O on a closed device');
      assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, 'offset is a safe integer');
      assert(Number.isSafeInteger(lengthBytes) && lengthBytes >= 0 && lengthBytes <= maxBytes, 'length within limits');
      assert(offsetBytes + lengthBytes <= this.sizeBytes, 'range inside the device');
    } catch (error) {
      // The server ends the process on an AssertionError; a test runner may swallow that, so keep a record.
      this.#provider.assertionFailures.push(`${(error as Error).message} (offset ${offsetBytes}, length ${lengthBytes})`);
      throw error;
    }
  }

  #allocate(offsetBytes: number, lengthBytes: number): void {
    if (lengthBytes === 0) return;
    const first = Math.floor(offsetBytes / blockBytes);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / blockBytes);
    this.#disk.allocated.fill(1, first, last + 1);
  }

  /** Zeroes the range; whole blocks inside it go back to being holes. */
  #punch(offsetBytes: number, lengthBytes: number): void {
    this.#disk.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
    const firstWhole = Math.ceil(offsetBytes / blockBytes);
    const endWhole = Math.floor((offsetBytes + lengthBytes) / blockBytes);
    if (endWhole > firstWhole) this.#disk.allocated.fill(0, firstWhole, endWhole);
  }

  async #delay(op: string, offsetBytes: number): Promise<void> {
    const provider = this.#provider;
    provider.operationsInFlight += 1;
    provider.operationsInFlightMax = Math.max(provider.operationsInFlightMax, provider.operationsInFlight);
    try {
      const delayMs = provider.latencyMs(op, offsetBytes);
      if (delayMs > 0) await sleep(delayMs);
    } finally {
      provider.operationsInFlight -= 1;
    }
  }
}
