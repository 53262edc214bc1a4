// A raw NBD client for tests: the client side of the wire format (encoders of options and requests, decoders
// of replies) and a socket wrapper that reads exact byte counts. It checks little on purpose, so tests can send
// what a real client never would.
import { once } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import {
  NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT,
  NBD_META_CONTEXT_BASE_ALLOCATION, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_OPTS_MAGIC,
  NBD_REP_ACK, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REP_META_CONTEXT, NBD_REPLY_FLAG_DONE, NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC,
} from '../../../src/nbd/protocol.ts';

// ---- Client-side encoders ----

export function encodeClientFlags(flags: number): Buffer {
  const buffer = Buffer.alloc(4);
  buffer.writeUInt32BE(flags >>> 0, 0);
  return buffer;
}

export function encodeOptionMessage(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const buffer = Buffer.alloc(16 + data.length);
  buffer.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  buffer.writeUInt32BE(option >>> 0, 8);
  buffer.writeUInt32BE(data.length, 12);
  buffer.set(data, 16);
  return buffer;
}

export function encodeInfoRequestData(exportName: string, infoTypes: number[] = []): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const buffer = Buffer.alloc(4 + name.length + 2 + 2 * infoTypes.length);
  buffer.writeUInt32BE(name.length, 0);
  name.copy(buffer, 4);
  buffer.writeUInt16BE(infoTypes.length, 4 + name.length);
  infoTypes.forEach((type, index) => buffer.writeUInt16BE(type, 4 + name.length + 2 + 2 * index));
  return buffer;
}

export function encodeMetaContextData(exportName: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const name = Buffer.from(exportName, 'utf8');
  parts.push(u32(name.length), name, u32(queries.length));
  for (const query of queries) {
    const bytes = Buffer.from(query, 'utf8');
    parts.push(u32(bytes.length), bytes);
  }
  return Buffer.concat(parts);
}

export interface RequestFields {
  flags?: number;
  type: number;
  handle: bigint;
  offsetBytes?: bigint | number;
  lengthBytes?: number;
}

export function encodeRequestMessage(fields: RequestFields, payload?: Uint8Array): Buffer {
  const buffer = Buffer.alloc(28 + (payload?.length ?? 0));
  buffer.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  buffer.writeUInt16BE(fields.flags ?? 0, 4);
  buffer.writeUInt16BE(fields.type, 6);
  buffer.writeBigUInt64BE(fields.handle, 8);
  buffer.writeBigUInt64BE(BigInt(fields.offsetBytes ?? 0), 16);
  buffer.writeUInt32BE(fields.lengthBytes ?? payload?.length ?? 0, 24);
  if (payload) buffer.set(payload, 28);
  return buffer;
}

function u32(value: number): Buffer {
  const buffer = Buffer.alloc(4);
  buffer.writeUInt32BE(value >>> 0, 0);
  return buffer;
}

// ---- Reply decoders ----

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export function decodeOptionReply(buffer: Buffer): { reply: OptionReply; bytes: number } | null {
  if (buffer.length < 20) return null;
  if (buffer.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw new Error('bad option reply magic');
  const length = buffer.readUInt32BE(16);
  if (buffer.length < 20 + length) return null;
  return {
    reply: { option: buffer.readUInt32BE(8), type: buffer.readUInt32BE(12), data: buffer.subarray(20, 20 + length) },
    bytes: 20 + length,
  };
}

export type Reply =
  | { kind: 'simple'; error: number; handle: bigint; data: Buffer }
  | { kind: 'structured'; flags: number; type: number; handle: bigint; payload: Buffer };

/** Decodes an info reply's payload into its fields. */
export function decodeInfo(data: Buffer): { type: number; sizeBytes?: bigint; flags?: number; text?: string; min?: number; preferred?: number; max?: number } {
  const type = data.readUInt16BE(0);
  if (type === NBD_INFO_EXPORT) return { type, sizeBytes: data.readBigUInt64BE(2), flags: data.readUInt16BE(10) };
  if (type === NBD_INFO_BLOCK_SIZE) return { type, min: data.readUInt32BE(2), preferred: data.readUInt32BE(6), max: data.readUInt32BE(10) };
  return { type, text: data.subarray(2).toString('utf8') };
}

// ---- The socket ----

export class RawClient {
  /** The connection's socket: after handshake({ tls }), the TLS socket over the first one. */
  socket: net.Socket;
  readonly closed: Promise<void>;
  readonly #resolveClosed: () => void;
  #chunks: Buffer[] = [];
  #length = 0;
  #ended = false;
  #waiter: (() => void) | null = null;
  /** Handles of READs sent without structured replies, with their lengths: a simple reply carries data then. */
  readonly simpleReadLengths = new Map<bigint, number>();
  structured = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    const { promise, resolve } = Promise.withResolvers<void>();
    this.closed = promise;
    this.#resolveClosed = resolve;
    this.#attach(socket);
  }

  #attach(socket: net.Socket): void {
    socket.once('close', () => this.#resolveClosed());
    socket.on('data', (chunk: Buffer) => {
      this.#chunks.push(chunk);
      this.#length += chunk.length;
      this.#wake();
    });
    socket.on('end', () => {
      this.#ended = true;
      this.#wake();
    });
    socket.on('close', () => {
      this.#ended = true;
      this.#wake();
    });
    socket.on('error', () => {});
  }

  /** Connects to a unix socket path, or to a TCP host and port. */
  static connect(address: string | { host: string; port: number }): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(typeof address === 'string' ? { path: address } : address);
      socket.once('connect', () => resolve(new RawClient(socket)));
      socket.once('error', reject);
    });
  }

  /** Bytes received and not read yet. */
  get buffered(): number {
    return this.#length;
  }

  write(buffer: Uint8Array): void {
    this.socket.write(buffer);
  }

  /** Reads exactly `count` bytes; rejects if the server closes first. */
  async read(count: number): Promise<Buffer> {
    while (this.#length < count) {
      if (this.#ended) throw new Error(`connection closed with ${this.#length} of ${count} bytes`);
      await new Promise<void>((resolve) => {
        this.#waiter = resolve;
      });
    }
    const all = Buffer.concat(this.#chunks);
    this.#chunks = all.length > count ? [all.subarray(count)] : [];
    this.#length -= count;
    return all.subarray(0, count);
  }

  /** Resolves true if the server closes the connection (reading and dropping anything it sends meanwhile). */
  async waitClosed(timeoutMs = 10_000): Promise<boolean> {
    const timer = new Promise<boolean>((resolve) => setTimeout(() => resolve(false), timeoutMs).unref());
    return Promise.race([this.closed.then(() => true), timer]);
  }

  async readGreeting(): Promise<number> {
    const greeting = await this.read(18);
    if (greeting.toString('latin1', 0, 8) !== 'NBDMAGIC' || greeting.toString('latin1', 8, 16) !== 'IHAVEOPT') throw new Error('bad greeting');
    return greeting.readUInt16BE(16);
  }

  async readOptionReply(): Promise<OptionReply> {
    const header = await this.read(20);
    if (header.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw new Error('bad option reply magic');
    const data = await this.read(header.readUInt32BE(16));
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data };
  }

  /** Sends an option and reads replies up to the final one (an ACK or an error). */
  async option(option: number, data?: Uint8Array): Promise<OptionReply[]> {
    this.write(encodeOptionMessage(option, data));
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply();
      replies.push(reply);
      if (reply.type === NBD_REP_ACK || reply.type >= 2 ** 31) return replies;
    }
  }

  /**
   * Greeting, flags, optionally STARTTLS (`tls`: how to connect), structured replies and base:allocation, then
   * GO; returns size and flags.
   */
  async handshake(options: { exportName?: string; structured?: boolean; metaContext?: boolean; tls?: tls.ConnectionOptions } = {}): Promise<{ sizeBytes: number; flags: number }> {
    const exportName = options.exportName ?? 'mem';
    await this.readGreeting();
    this.write(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES));
    if (options.tls !== undefined) {
      const [ack] = await this.option(NBD_OPT_STARTTLS);
      if (ack?.type !== NBD_REP_ACK) throw new Error('STARTTLS refused');
      if (this.#length !== 0) throw new Error('bytes after the STARTTLS reply');
      const secure = tls.connect({ ...options.tls, socket: this.socket });
      await once(secure, 'secureConnect');
      this.socket = secure;
      this.#attach(secure);
    }
    if (options.structured ?? true) {
      const [ack] = await this.option(NBD_OPT_STRUCTURED_REPLY);
      if (ack?.type !== NBD_REP_ACK) throw new Error('structured replies refused');
      this.structured = true;
      if (options.metaContext ?? true) {
        const replies = await this.option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextData(exportName, [NBD_META_CONTEXT_BASE_ALLOCATION]));
        if (replies.length !== 2 || replies[0]!.type !== NBD_REP_META_CONTEXT) throw new Error('base:allocation not selected');
      }
    }
    const replies = await this.option(NBD_OPT_GO, encodeInfoRequestData(exportName, [NBD_INFO_BLOCK_SIZE]));
    const last = replies.at(-1)!;
    if (last.type !== NBD_REP_ACK) throw new Error(`GO failed: 0x${last.type.toString(16)} ${last.data.toString()}`);
    const exportInfo = replies.filter((reply) => reply.type === NBD_REP_INFO).map((reply) => decodeInfo(reply.data)).find((info) => info.type === NBD_INFO_EXPORT);
    if (exportInfo === undefined) throw new Error('no NBD_INFO_EXPORT');
    return { sizeBytes: Number(exportInfo.sizeBytes), flags: exportInfo.flags! };
  }

  /** Sends a request (and a WRITE's payload). */
  send(fields: RequestFields, payload?: Uint8Array): void {
    if (fields.type === NBD_CMD_READ && !this.structured) this.simpleReadLengths.set(fields.handle, fields.lengthBytes ?? 0);
    this.write(encodeRequestMessage(fields, payload));
  }

  /** Reads one reply message: a simple reply (with a READ's data) or one structured chunk. */
  async readReply(): Promise<Reply> {
    const magicBytes = await this.read(4);
    const magic = magicBytes.readUInt32BE(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const handle = rest.readBigUInt64BE(4);
      const readLength = this.simpleReadLengths.get(handle);
      this.simpleReadLengths.delete(handle);
      const data = readLength !== undefined && error === 0 ? await this.read(readLength) : Buffer.alloc(0);
      return { kind: 'simple', error, handle, data };
    }
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      const rest = await this.read(16);
      const payload = await this.read(rest.readUInt32BE(12));
      return { kind: 'structured', flags: rest.readUInt16BE(0), type: rest.readUInt16BE(2), handle: rest.readBigUInt64BE(4), payload };
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  }

  /** Reads messages until the reply to one request is complete (a simple reply, or a chunk flagged DONE). */
  async readWholeReply(): Promise<Reply[]> {
    const chunks: Reply[] = [];
    for (;;) {
      const reply = await this.readReply();
      chunks.push(reply);
      if (reply.kind === 'simple' || (reply.flags & NBD_REPLY_FLAG_DONE) !== 0) return chunks;
    }
  }

  /** Sends a request and reads its whole reply (only one request may be outstanding). */
  async call(fields: RequestFields, payload?: Uint8Array): Promise<Reply[]> {
    this.send(fields, payload);
    const replies = await this.readWholeReply();
    for (const reply of replies) {
      if (reply.handle !== fields.handle) throw new Error(`reply for handle ${reply.handle}, expected ${fields.handle}`);
    }
    return replies;
  }

  close(): void {
    this.socket.destroy();
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = null;
    waiter?.();
  }
}

/** The error a reply carries: the simple reply's error field, or the first error chunk's; 0 on success. */
export function replyError(replies: Reply[]): number {
  for (const reply of replies) {
    if (reply.kind === 'simple') return reply.error;
    if (reply.type >= 2 ** 15) return reply.payload.readUInt32BE(0);
  }
  return 0;
}

/** The data of a successful READ: a simple reply's data, or the OFFSET_DATA chunks put back together. */
export function readData(replies: Reply[], offsetBytes: number, lengthBytes: number): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (const reply of replies) {
    if (reply.kind === 'simple') return reply.data;
    if (reply.type === 1) {
      const at = Number(reply.payload.readBigUInt64BE(0)) - offsetBytes;
      reply.payload.copy(data, at, 8);
    }
  }
  return data;
}

/**
 * Sends WRITE requests for `writes` as one byte stream cut into pieces of the given sizes (in turn), pausing a
 * moment every third piece, so that a server meets headers and payloads split anywhere.
 */
export async function writeInPieces(client: RawClient, writes: ReadonlyArray<{ offsetBytes: number; data: Buffer }>, pieceSizes: readonly number[]): Promise<void> {
  const stream = Buffer.concat(writes.map((write, index) =>
    encodeRequestMessage({ type: NBD_CMD_WRITE, handle: BigInt(index + 1), offsetBytes: write.offsetBytes, lengthBytes: write.data.length }, write.data)));
  for (let sent = 0, piece = 0; sent < stream.length; piece += 1) {
    const size = Math.min(pieceSizes[piece % pieceSizes.length]!, stream.length - sent);
    client.write(stream.subarray(sent, sent + size));
    sent += size;
    if (piece % 3 === 0) await new Promise((resolve) => setTimeout(resolve, 1));
  }
}
