// A small NBD client for tests, written apart from the server's codec so that a bug there is not mirrored
// here: fixed newstyle, NBD_OPT_GO, simple replies only, many requests in flight. In src/testing because the
// benchmarks drive chunkd with it too (bench/snapshots.ts); test/helpers/nbd-client.ts re-exports it.
import net from 'node:net';

export const commands = { read: 0, write: 1, disc: 2, flush: 3, trim: 4, cache: 5, writeZeroes: 6, blockStatus: 7 } as const;
export const FLAG_FUA = 1;
export const FLAG_NO_HOLE = 2;

export class NbdReplyError extends Error {
  readonly errno: number;
  constructor(errno: number) {
    super(`NBD error ${errno}`);
    this.errno = errno;
  }
}

interface Pending {
  resolve: (data: Buffer) => void;
  reject: (error: Error) => void;
  readLength: number;
}

export class TestNbdClient {
  readonly socket: net.Socket;
  sizeBytes = 0;
  transmissionFlags = 0;
  #buffer: Buffer = Buffer.alloc(0);
  #pending = new Map<bigint, Pending>();
  #nextHandle = 1n;
  #closedError: Error | null = null;
  #waiter: (() => void) | null = null;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.#buffer = this.#buffer.length === 0 ? chunk : Buffer.concat([this.#buffer, chunk]);
      if (this.#waiter) this.#waiter();
      else this.#drainReplies();
    });
    const fail = (error: Error): void => {
      this.#closedError ??= error;
      for (const pending of this.#pending.values()) pending.reject(this.#closedError);
      this.#pending.clear();
      if (this.#waiter) this.#waiter();
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('connection closed')));
  }

  /** Connects (a unix socket path, or a TCP port on 127.0.0.1) and completes the handshake for `exportName`. */
  static async connect(target: string | number, exportName: string): Promise<TestNbdClient> {
    const socket = typeof target === 'number' ? net.connect(target, '127.0.0.1') : net.connect(target);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new TestNbdClient(socket);
    const greeting = await client.#take(18);
    if (greeting.toString('latin1', 0, 8) !== 'NBDMAGIC' || greeting.toString('latin1', 8, 16) !== 'IHAVEOPT') throw new Error('bad greeting');
    socket.write(Buffer.from([0, 0, 0, 3])); // FIXED_NEWSTYLE | NO_ZEROES
    const name = Buffer.from(exportName);
    const option = Buffer.alloc(16 + 4 + name.length + 2);
    option.write('IHAVEOPT', 0, 'latin1');
    option.writeUInt32BE(7, 8); // NBD_OPT_GO
    option.writeUInt32BE(4 + name.length + 2, 12);
    option.writeUInt32BE(name.length, 16);
    name.copy(option, 20);
    option.writeUInt16BE(0, 20 + name.length);
    socket.write(option);
    for (;;) {
      const header = await client.#take(20);
      const type = header.readUInt32BE(12);
      const body = await client.#take(header.readUInt32BE(16));
      if (type === 1) break; // ACK
      if (type >= 2 ** 31) throw new Error(`export ${exportName} refused: reply type ${type - 2 ** 31} ${body.subarray(0).toString()}`);
      if (type === 3 && body.readUInt16BE(0) === 0) {
        client.sizeBytes = Number(body.readBigUInt64BE(2));
        client.transmissionFlags = body.readUInt16BE(10);
      }
    }
    client.#drainReplies();
    return client;
  }

  read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    return this.request(commands.read, 0, offsetBytes, lengthBytes);
  }

  write(offsetBytes: number, data: Buffer, flags = 0): Promise<Buffer> {
    return this.request(commands.write, flags, offsetBytes, data.length, data);
  }

  flush(): Promise<Buffer> {
    return this.request(commands.flush, 0, 0, 0);
  }

  trim(offsetBytes: number, lengthBytes: number, flags = 0): Promise<Buffer> {
    return this.request(commands.trim, flags, offsetBytes, lengthBytes);
  }

  /** Sends one request; resolves with the read data (empty for other commands) or rejects with NbdReplyError. */
  request(command: number, flags: number, offsetBytes: number | bigint, lengthBytes: number, payload?: Buffer): Promise<Buffer> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    const handle = this.#nextHandle++;
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(command, 6);
    header.writeBigUInt64BE(handle, 8);
    header.writeBigUInt64BE(BigInt(offsetBytes), 16);
    header.writeUInt32BE(lengthBytes >>> 0, 24);
    const promise = new Promise<Buffer>((resolve, reject) => {
      this.#pending.set(handle, { resolve, reject, readLength: command === commands.read ? lengthBytes : 0 });
    });
    this.socket.write(payload ? Buffer.concat([header, payload]) : header);
    return promise;
  }

  /** Sends NBD_CMD_DISC and closes. */
  async disconnect(): Promise<void> {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt16BE(commands.disc, 6);
    this.socket.end(header);
    await new Promise((resolve) => this.socket.once('close', resolve));
  }

  close(): void {
    this.socket.destroy();
  }

  async #take(length: number): Promise<Buffer> {
    while (this.#buffer.length < length) {
      if (this.#closedError) throw this.#closedError;
      await new Promise<void>((resolve) => {
        this.#waiter = resolve;
      });
      this.#waiter = null;
    }
    const taken = this.#buffer.subarray(0, length);
    this.#buffer = this.#buffer.subarray(length);
    return taken;
  }

  #drainReplies(): void {
    for (;;) {
      if (this.#buffer.length < 16) return;
      const magic = this.#buffer.readUInt32BE(0);
      if (magic !== 0x67446698) {
        this.socket.destroy(new Error(`unexpected reply magic 0x${magic.toString(16)}`));
        return;
      }
      const errno = this.#buffer.readUInt32BE(4);
      const handle = this.#buffer.readBigUInt64BE(8);
      const pending = this.#pending.get(handle);
      if (pending === undefined) {
        this.socket.destroy(new Error(`reply for unknown handle ${handle}`));
        return;
      }
      const dataLength = errno === 0 ? pending.readLength : 0;
      if (this.#buffer.length < 16 + dataLength) return;
      const data = Buffer.from(this.#buffer.subarray(16, 16 + dataLength));
      this.#buffer = this.#buffer.subarray(16 + dataLength);
      this.#pending.delete(handle);
      if (errno !== 0) pending.reject(new NbdReplyError(errno));
      else pending.resolve(data);
    }
  }
}
