// The data path's interface, apart from control (DESIGN.md; STYLE.md example 14). The NBD server and the FUSE
// front end speak only this; a volume, a snapshot, or a layer over one (statistics, fault injection) implements it.
// Callers validate ranges once at the edge (inside sizeBytes, lengths within limits.ts); implementations assert.

export interface Extent {
  lengthBytes: number;
  /** Nothing is allocated here: reads give zeros. */
  hole: boolean;
  /** Reads are known to give zeros (true for every hole). */
  zero: boolean;
}

export interface WriteOptions {
  /** Force unit access: the write is on stable storage when the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** Keep the range allocated (NBD_CMD_FLAG_NO_HOLE); otherwise the space goes back to the pool. */
  noHole?: boolean;
}

/**
 * What a verb gives when it finished before it returned (a settled promise, shared): a layer above that finds this
 * very promise (by identity) may finish at once too and give it on, with no promise of its own (volume.ts's cached
 * read, io-stats.ts, SyncDevice). Any other promise is waited on as usual.
 */
export const doneNow: Promise<void> = Promise.resolve();

export interface BlockDevice {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** Reads `target.length` bytes at `offsetBytes` into `target`. */
  read(offsetBytes: number, target: Buffer): Promise<void>;
  /** Writes `data` at `offsetBytes`; the caller may reuse `data` once the promise settles. */
  write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void>;
  /** Gives the range back to the pool; reads of it give zeros afterwards. */
  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void>;
  writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void>;
  /** Every write acknowledged before this call is on stable storage (data and metadata) when it resolves. */
  flush(): Promise<void>;
  /** Allocation map from `offsetBytes`, covering at least one byte and at most `lengthBytes`. */
  blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  /** Drops the caller's reference; the device stays usable for its other users. */
  close(): Promise<void>;
}

/** What a front end asks the node for: the devices it may serve, by export name. */
export interface DeviceProvider {
  /** Opens an export by name (a volume, or VOL@SNAP once snapshots exist); throws ChunkdError ENOENT/EBADNAME. */
  open(exportName: string): Promise<BlockDevice>;
  /** Names and descriptions of the exports, for NBD_OPT_LIST. */
  list(): Array<{ name: string; description: string }>;
}

/**
 * A layer over a device that passes every verb to it (nbdkit's filters forward to `next` the same way): a layer
 * extends it and overrides only the verbs it changes.
 */
export class ForwardingDevice implements BlockDevice {
  protected readonly inner: BlockDevice;

  constructor(inner: BlockDevice) {
    this.inner = inner;
  }

  get name(): string {
    return this.inner.name;
  }

  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  read(offsetBytes: number, target: Buffer): Promise<void> {
    return this.inner.read(offsetBytes, target);
  }

  write(offsetBytes: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.inner.write(offsetBytes, data, options);
  }

  trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    return this.inner.trim(offsetBytes, lengthBytes, options);
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    return this.inner.writeZeroes(offsetBytes, lengthBytes, options);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return this.inner.blockStatus(offsetBytes, lengthBytes);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
