// The NBD server on a temporary unix socket with a memory device, driven by a raw client byte by byte: the
// happy paths, every error the edge must answer, and the ways a client can misbehave or vanish.
import { test } from 'vitest';
import type { TestContext } from 'vitest';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ChunkdError } from '../../src/core/errors.ts';
import { setFailStopHook } from '../../src/core/fail-stop.ts';
import { requestBytesMax, requestsInFlightPerConnectionMax } from '../../src/core/limits.ts';
import { SharedBufferPool } from '../../src/core/shared-buffers.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import type { NbdServerOptions } from '../../src/nbd/server.ts';
import * as nbd from '../../src/nbd/protocol.ts';
import { MemoryProvider } from './helpers/memory-device.ts';
import {
  RawClient, decodeInfo, encodeClientFlags, encodeInfoRequestData, encodeMetaContextData, encodeOptionMessage,
  encodeRequestMessage, readData, replyError,
  writeInPieces,
} from './helpers/nbd-raw-client.ts';
import type { Reply } from './helpers/nbd-raw-client.ts';

const MiB = 1 << 20;

interface Harness {
  server: NbdServer;
  provider: MemoryProvider;
  socketPath: string;
  directory: string;
  logs: string[];
  connect(): Promise<RawClient>;
  /** A client through the handshake (structured replies and base:allocation unless told otherwise). */
  ready(options?: Parameters<RawClient['handshake']>[0]): Promise<RawClient>;
}

async function start(t: TestContext, options: Partial<NbdServerOptions> = {}): Promise<Harness> {
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'chunkd-nbd-'));
  const socketPath = path.join(directory, 'nbd.sock');
  const provider = new MemoryProvider();
  provider.add('mem', 4 * MiB, { description: 'a memory disk' });
  provider.add('ro', MiB, { readOnly: true });
  const logs: string[] = [];
  const server = new NbdServer({ provider, log: (line) => logs.push(line), ...options });
  await server.listenUnix(socketPath);
  const clients: RawClient[] = [];
  t.onTestFinished(async () => {
    for (const client of clients) client.close();
    await server.close();
    await fs.rm(directory, { recursive: true, force: true });
  });
  const connect = async (): Promise<RawClient> => {
    const client = await RawClient.connect(socketPath);
    clients.push(client);
    return client;
  };
  return {
    server, provider, socketPath, directory, logs, connect,
    ready: async (handshake) => {
      const client = await connect();
      await client.handshake(handshake);
      return client;
    },
  };
}

/** Waits until `condition` holds (device closes happen a moment after the socket closes). */
async function eventually(condition: () => boolean, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await sleep(5);
  }
}

function pattern(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.allocUnsafe(lengthBytes);
  for (let index = 0; index < lengthBytes; index += 1) data[index] = (index * 31 + seed) & 0xff;
  return data;
}

function descriptorsOf(replies: Reply[]): Array<[number, number]> {
  assert.equal(replies.length, 1);
  const reply = replies[0]!;
  assert.ok(reply.kind === 'structured' && reply.type === nbd.NBD_REPLY_TYPE_BLOCK_STATUS && (reply.flags & nbd.NBD_REPLY_FLAG_DONE) !== 0);
  assert.equal(reply.payload.readUInt32BE(0), 1, 'the context ID that SET_META_CONTEXT gave');
  const pairs: Array<[number, number]> = [];
  for (let at = 4; at < reply.payload.length; at += 8) pairs.push([reply.payload.readUInt32BE(at), reply.payload.readUInt32BE(at + 4)]);
  return pairs;
}

const HOLE_ZERO = nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO;

test('structured replies: write, read, trim, zero, block status, flush, cache, disc', async (t) => {
  const h = await start(t);
  const client = await h.ready();
  let handle = 0n;
  const next = (): bigint => (handle += 1n);

  const data = pattern(8192, 1);
  assert.deepEqual(await client.call({ type: nbd.NBD_CMD_WRITE, flags: nbd.NBD_CMD_FLAG_FUA, handle: next(), offsetBytes: 4096 }, data),
    [{ kind: 'simple', error: 0, handle, data: Buffer.alloc(0) }]);
  assert.deepEqual(h.provider.writeLog.at(-1), { op: 'write', offsetBytes: 4096, lengthBytes: 8192, options: { fua: true } });

  const read = await client.call({ type: nbd.NBD_CMD_READ, handle: next(), offsetBytes: 4096, lengthBytes: 8192 });
  assert.equal(read.length, 1, 'one OFFSET_DATA chunk that is also the last');
  assert.ok(read[0]!.kind === 'structured' && read[0]!.type === nbd.NBD_REPLY_TYPE_OFFSET_DATA && read[0]!.flags === nbd.NBD_REPLY_FLAG_DONE);
  assert.deepEqual(readData(read, 4096, 8192), data);
  const unaligned = await client.call({ type: nbd.NBD_CMD_READ, flags: nbd.NBD_CMD_FLAG_DF, handle: next(), offsetBytes: 4095, lengthBytes: 3 });
  assert.deepEqual(readData(unaligned, 4095, 3), Buffer.from([0, data[0]!, data[1]!]));
  const empty = await client.call({ type: nbd.NBD_CMD_READ, handle: next(), offsetBytes: 0, lengthBytes: 0 });
  assert.ok(empty[0]!.kind === 'structured' && empty[0]!.type === nbd.NBD_REPLY_TYPE_NONE);

  assert.deepEqual(descriptorsOf(await client.call({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: next(), offsetBytes: 0, lengthBytes: 4 * MiB })),
    [[4096, HOLE_ZERO], [8192, 0], [4 * MiB - 12288, HOLE_ZERO]]);
  assert.deepEqual(descriptorsOf(await client.call({ type: nbd.NBD_CMD_BLOCK_STATUS, flags: nbd.NBD_CMD_FLAG_REQ_ONE, handle: next(), offsetBytes: 4096, lengthBytes: 100 })),
    [[100, 0]]);
  // A length past what a range request may cover is a hint: the reply covers what the device answered.
  assert.deepEqual(descriptorsOf(await client.call({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: next(), offsetBytes: 12288, lengthBytes: 4 * MiB - 12288 })),
    [[4 * MiB - 12288, HOLE_ZERO]]);

  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_TRIM, handle: next(), offsetBytes: 4096, lengthBytes: 4096 })), 0);
  assert.deepEqual(descriptorsOf(await client.call({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: next(), offsetBytes: 0, lengthBytes: 16384 })),
    [[8192, HOLE_ZERO], [4096, 0], [4096, HOLE_ZERO]]);
  assert.deepEqual(readData(await client.call({ type: nbd.NBD_CMD_READ, handle: next(), offsetBytes: 4096, lengthBytes: 4096 }), 4096, 4096), Buffer.alloc(4096));

  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE_ZEROES, flags: nbd.NBD_CMD_FLAG_NO_HOLE, handle: next(), offsetBytes: 8192, lengthBytes: 4096 })), 0);
  assert.deepEqual(h.provider.writeLog.at(-1), { op: 'zero', offsetBytes: 8192, lengthBytes: 4096, options: { fua: false, noHole: true } });
  assert.deepEqual(readData(await client.call({ type: nbd.NBD_CMD_READ, handle: next(), offsetBytes: 8192, lengthBytes: 4096 }), 8192, 4096), Buffer.alloc(4096));
  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE_ZEROES, flags: nbd.NBD_CMD_FLAG_FAST_ZERO | nbd.NBD_CMD_FLAG_FUA, handle: next(), offsetBytes: 0, lengthBytes: MiB })), 0);
  assert.deepEqual(h.provider.writeLog.at(-1), { op: 'zero', offsetBytes: 0, lengthBytes: MiB, options: { fua: true, noHole: false } });
  const writes = h.provider.writeLog.length;
  const notFast = await client.call({ type: nbd.NBD_CMD_WRITE_ZEROES, flags: nbd.NBD_CMD_FLAG_FAST_ZERO | nbd.NBD_CMD_FLAG_NO_HOLE, handle: next(), offsetBytes: 0, lengthBytes: MiB });
  assert.equal(replyError(notFast), nbd.NBD_ENOTSUP);
  assert.equal(h.provider.writeLog.length, writes, 'a refused fast zero does not touch the device');

  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_FLUSH, handle: next() })), 0);
  assert.equal(h.provider.flushes, 1);
  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_CACHE, handle: next(), offsetBytes: 0, lengthBytes: MiB })), 0);

  client.send({ type: nbd.NBD_CMD_DISC, handle: next() });
  assert.ok(await client.waitClosed(), 'DISC closes the connection');
  await eventually(() => h.provider.openDevices === 0, 'the device closed');
  assert.equal(h.provider.opens, 1);
});

test('simple replies after NBD_OPT_EXPORT_NAME, with and without NO_ZEROES', async (t) => {
  const h = await start(t);
  for (const noZeroes of [true, false]) {
    const client = await h.connect();
    assert.equal(await client.readGreeting(), nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES);
    client.write(encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? nbd.NBD_FLAG_C_NO_ZEROES : 0)));
    client.write(encodeOptionMessage(nbd.NBD_OPT_EXPORT_NAME, Buffer.from('mem')));
    const finish = await client.read(noZeroes ? 10 : 134);
    assert.equal(finish.readBigUInt64BE(0), BigInt(4 * MiB));
    const flags = finish.readUInt16BE(8);
    assert.ok(flags & nbd.NBD_FLAG_HAS_FLAGS && flags & nbd.NBD_FLAG_SEND_FLUSH && flags & nbd.NBD_FLAG_CAN_MULTI_CONN);
    assert.equal(flags & (nbd.NBD_FLAG_SEND_DF | nbd.NBD_FLAG_READ_ONLY), 0);
    const data = pattern(1000, 7);
    assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE, handle: 1n, offsetBytes: 3 }, data)), 0);
    const read = await client.call({ type: nbd.NBD_CMD_READ, handle: 2n, offsetBytes: 3, lengthBytes: 1000 });
    assert.equal(read[0]!.kind, 'simple');
    assert.deepEqual(readData(read, 3, 1000), data);
    // Errors are simple replies without data, even for a READ.
    assert.deepEqual(await client.call({ type: nbd.NBD_CMD_READ, handle: 3n, offsetBytes: 4 * MiB, lengthBytes: 1 }),
      [{ kind: 'simple', error: nbd.NBD_EINVAL, handle: 3n, data: Buffer.alloc(0) }]);
    // BLOCK_STATUS needs structured replies and a context.
    assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: 4n, offsetBytes: 0, lengthBytes: 4096 })), nbd.NBD_EINVAL);
    assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_READ, flags: nbd.NBD_CMD_FLAG_DF, handle: 5n, offsetBytes: 0, lengthBytes: 1 })), nbd.NBD_EINVAL);
    client.close();
  }
});

test('errors at the edge: ranges, sizes, flags, commands, device failures; the connection goes on', async (t) => {
  const h = await start(t);
  const client = await h.ready();
  const expectError = async (fields: Parameters<RawClient['call']>[0], error: number, payload?: Buffer): Promise<void> => {
    const replies = await client.call(fields, payload);
    assert.equal(replyError(replies), error, `${nbd.commandName(fields.type)} at ${fields.offsetBytes}`);
    const last = replies.at(-1)!;
    if (error !== 0) assert.ok(last.kind === 'structured' && last.type === nbd.NBD_REPLY_TYPE_ERROR && last.payload.length > 6, 'an ERROR chunk with a message');
  };
  const size = 4 * MiB;
  await expectError({ type: nbd.NBD_CMD_READ, handle: 1n, offsetBytes: size - 4096, lengthBytes: 8192 }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_READ, handle: 2n, offsetBytes: 2n ** 63n, lengthBytes: 1 }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_READ, handle: 3n, offsetBytes: 2n ** 64n - 1n, lengthBytes: 1 }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_WRITE, handle: 4n, offsetBytes: size - 512 }, nbd.NBD_ENOSPC, Buffer.alloc(1024, 1));
  await expectError({ type: nbd.NBD_CMD_WRITE_ZEROES, handle: 5n, offsetBytes: size, lengthBytes: 1 }, nbd.NBD_ENOSPC);
  await expectError({ type: nbd.NBD_CMD_TRIM, handle: 6n, offsetBytes: size, lengthBytes: 1 }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: 7n, offsetBytes: size - 1, lengthBytes: 2 }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: 8n, offsetBytes: 0, lengthBytes: 0 }, nbd.NBD_EINVAL);
  await expectError({ type: 42, handle: 9n }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_READ, flags: 0x100, handle: 10n, lengthBytes: 1 }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_WRITE, flags: nbd.NBD_CMD_FLAG_REQ_ONE, handle: 11n }, nbd.NBD_EINVAL, Buffer.alloc(100, 2));
  await expectError({ type: nbd.NBD_CMD_FLUSH, handle: 12n, lengthBytes: 1 }, nbd.NBD_EINVAL);
  await expectError({ type: nbd.NBD_CMD_READ, handle: 13n, lengthBytes: requestBytesMax + 1 }, nbd.NBD_EINVAL);
  h.provider.failNextRead = ChunkdError.io('checksum mismatch');
  await expectError({ type: nbd.NBD_CMD_READ, handle: 14n, lengthBytes: 4096 }, nbd.NBD_EIO);
  assert.ok(h.logs.some((line) => line.includes('checksum mismatch')), 'a device error is logged');
  h.provider.failNextRead = new ChunkdError('ENOTSUP', 'not without FAST_ZERO');
  await expectError({ type: nbd.NBD_CMD_READ, handle: 15n, lengthBytes: 4096 }, nbd.NBD_EINVAL);
  // A system error (not a ChunkdError) is the disk's failure: EIO, and the node serves on.
  h.provider.failNextRead = Object.assign(new Error('read failed'), { code: 'EIO' });
  await expectError({ type: nbd.NBD_CMD_READ, handle: 16n, lengthBytes: 4096 }, nbd.NBD_EIO);
  // Anything else is a bug: the node stops (fail-stop). The test's hook returns, so the request gets EIO.
  const bugs: unknown[] = [];
  setFailStopHook((error) => bugs.push(error));
  t.onTestFinished(() => setFailStopHook(null));
  h.provider.failNextRead = new TypeError('a bug in a device');
  await expectError({ type: nbd.NBD_CMD_READ, handle: 17n, lengthBytes: 4096 }, nbd.NBD_EIO);
  assert.deepEqual(bugs.map((error) => (error as Error).message), ['a bug in a device']);
  setFailStopHook(null);
  // Nothing of the refused payloads reached the device, and the connection still works.
  assert.equal(h.provider.writeLog.length, 0);
  await expectError({ type: nbd.NBD_CMD_WRITE, handle: 18n, offsetBytes: 0 }, 0, Buffer.alloc(512, 3));
  assert.deepEqual(readData(await client.call({ type: nbd.NBD_CMD_READ, handle: 19n, lengthBytes: 512 }), 0, 512), Buffer.alloc(512, 3));
  const stats = h.server.stats();
  assert.equal(stats.requestsTotal, 19);
  assert.equal(stats.requestErrorsTotal, 17);
});

test('read-only export: WRITE, TRIM and WRITE_ZEROES are EPERM and never reach the device', async (t) => {
  const h = await start(t);
  const client = await h.ready({ exportName: 'ro' });
  for (const [type, payload] of [[nbd.NBD_CMD_WRITE, Buffer.alloc(4096, 9)], [nbd.NBD_CMD_TRIM, undefined], [nbd.NBD_CMD_WRITE_ZEROES, undefined]] as const) {
    const replies = await client.call({ type, handle: BigInt(type), offsetBytes: 0, lengthBytes: 4096 }, payload);
    assert.equal(replyError(replies), nbd.NBD_EPERM);
  }
  assert.equal(h.provider.writeLog.length, 0);
  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_READ, handle: 10n, lengthBytes: 4096 })), 0);
});

test('an oversize WRITE is answered EINVAL, its payload read and dropped, and the connection goes on', async (t) => {
  const h = await start(t);
  h.provider.add('big', 64 * MiB);
  const client = await h.ready({ exportName: 'big' });
  const oversize = requestBytesMax + MiB;
  client.write(encodeRequestMessage({ type: nbd.NBD_CMD_WRITE, handle: 1n, offsetBytes: 0, lengthBytes: oversize }));
  // The error reply comes before the payload is even sent: the server does not wait for it.
  assert.equal(replyError(await client.readWholeReply()), nbd.NBD_EINVAL);
  const piece = Buffer.alloc(MiB, 0xee);
  for (let sent = 0; sent < oversize; sent += piece.length) client.write(piece);
  const data = pattern(4096, 3);
  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE, handle: 2n, offsetBytes: 8192 }, data)), 0);
  assert.deepEqual(readData(await client.call({ type: nbd.NBD_CMD_READ, handle: 3n, offsetBytes: 8192, lengthBytes: 4096 }), 8192, 4096), data);
  assert.deepEqual(h.provider.writeLog.map((entry) => entry.lengthBytes), [4096]);
  // The largest WRITE allowed goes through.
  const largest = pattern(requestBytesMax, 5);
  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE, handle: 4n, offsetBytes: MiB }, largest)), 0);
  assert.deepEqual(readData(await client.call({ type: nbd.NBD_CMD_READ, handle: 5n, offsetBytes: MiB, lengthBytes: requestBytesMax }), MiB, requestBytesMax), largest);
});

test('handshake options: LIST, INFO, meta contexts, unknown options, bad data, unknown exports', async (t) => {
  const h = await start(t);
  const client = await h.connect();
  await client.readGreeting();
  client.write(encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE));

  const list = await client.option(nbd.NBD_OPT_LIST);
  assert.deepEqual(list.map((reply) => reply.type), [nbd.NBD_REP_SERVER, nbd.NBD_REP_SERVER, nbd.NBD_REP_ACK]);
  assert.equal(list[0]!.data.readUInt32BE(0), 3);
  assert.equal(list[0]!.data.subarray(4).toString(), 'mema memory disk');
  assert.equal((await client.option(nbd.NBD_OPT_LIST, Buffer.from('x')))[0]!.type, nbd.NBD_REP_ERR_INVALID);

  const unknown = await client.option(0x1234, Buffer.from('whatever'));
  assert.equal(unknown.length, 1);
  assert.equal(unknown[0]!.type, nbd.NBD_REP_ERR_UNSUP);
  assert.equal(unknown[0]!.option, 0x1234);
  assert.equal((await client.option(nbd.NBD_OPT_STARTTLS))[0]!.type, nbd.NBD_REP_ERR_UNSUP);

  // Meta contexts need structured replies first.
  assert.equal((await client.option(nbd.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData('mem', ['base:allocation'])))[0]!.type, nbd.NBD_REP_ERR_INVALID);
  assert.equal((await client.option(nbd.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')))[0]!.type, nbd.NBD_REP_ERR_INVALID);
  assert.equal((await client.option(nbd.NBD_OPT_STRUCTURED_REPLY))[0]!.type, nbd.NBD_REP_ACK);
  const listed = async (queries: string[]): Promise<string[]> => {
    const replies = await client.option(nbd.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextData('mem', queries));
    assert.equal(replies.at(-1)!.type, nbd.NBD_REP_ACK);
    return replies.slice(0, -1).map((reply) => {
      assert.equal(reply.type, nbd.NBD_REP_META_CONTEXT);
      assert.equal(reply.data.readUInt32BE(0), 0, 'IDs in a LIST reply are zero');
      return reply.data.subarray(4).toString();
    });
  };
  assert.deepEqual(await listed([]), ['base:allocation']);
  assert.deepEqual(await listed(['base:']), ['base:allocation']);
  assert.deepEqual(await listed(['base:allocation', 'base:allocation']), ['base:allocation']);
  assert.deepEqual(await listed(['qemu:dirty-bitmap:a', 'base:nothing']), []);
  assert.equal((await client.option(nbd.NBD_OPT_LIST_META_CONTEXT, Buffer.from([0, 0, 0, 9])))[0]!.type, nbd.NBD_REP_ERR_INVALID);
  const setBase = await client.option(nbd.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData('mem', ['base:']));
  assert.deepEqual(setBase.map((reply) => reply.type), [nbd.NBD_REP_ACK], '"base:" selects nothing when setting');

  // INFO: everything asked for, then GO of an unknown export, then bad GO data, then a good GO.
  const info = await client.option(nbd.NBD_OPT_INFO, encodeInfoRequestData('mem', [nbd.NBD_INFO_NAME, nbd.NBD_INFO_DESCRIPTION, nbd.NBD_INFO_BLOCK_SIZE]));
  assert.equal(info.at(-1)!.type, nbd.NBD_REP_ACK);
  const infos = info.slice(0, -1).map((reply) => decodeInfo(reply.data));
  assert.deepEqual(infos.find((entry) => entry.type === nbd.NBD_INFO_EXPORT), { type: 0, sizeBytes: BigInt(4 * MiB), flags: infos[0]!.flags });
  assert.deepEqual(infos.find((entry) => entry.type === nbd.NBD_INFO_NAME), { type: 1, text: 'mem' });
  assert.deepEqual(infos.find((entry) => entry.type === nbd.NBD_INFO_DESCRIPTION), { type: 2, text: 'a memory disk' });
  assert.deepEqual(infos.find((entry) => entry.type === nbd.NBD_INFO_BLOCK_SIZE), { type: 3, min: 1, preferred: 4096, max: requestBytesMax });
  assert.ok(infos[0]!.flags! & nbd.NBD_FLAG_SEND_DF);
  assert.equal(h.provider.openDevices, 0, 'INFO closes what it opened');

  const missing = await client.option(nbd.NBD_OPT_GO, encodeInfoRequestData('missing'));
  assert.deepEqual(missing.map((reply) => reply.type), [nbd.NBD_REP_ERR_UNKNOWN]);
  assert.match(missing[0]!.data.toString(), /missing/);
  assert.equal((await client.option(nbd.NBD_OPT_GO, Buffer.from([0, 0, 0, 200, 0, 0])))[0]!.type, nbd.NBD_REP_ERR_INVALID);

  const selected = await client.option(nbd.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData('mem', ['x-other:thing', 'base:allocation']));
  assert.deepEqual(selected.map((reply) => reply.type), [nbd.NBD_REP_META_CONTEXT, nbd.NBD_REP_ACK]);
  assert.equal(selected[0]!.data.readUInt32BE(0), 1);
  const go = await client.option(nbd.NBD_OPT_GO, encodeInfoRequestData('mem'));
  assert.equal(go.at(-1)!.type, nbd.NBD_REP_ACK);
  client.structured = true;
  const status = await client.call({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: 1n, offsetBytes: 0, lengthBytes: 4096 });
  assert.deepEqual(descriptorsOf(status), [[4096, HOLE_ZERO]]);
});

test('a meta context set for another export does not carry over to GO', async (t) => {
  const h = await start(t);
  const client = await h.connect();
  await client.readGreeting();
  client.write(encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES));
  await client.option(nbd.NBD_OPT_STRUCTURED_REPLY);
  await client.option(nbd.NBD_OPT_SET_META_CONTEXT, encodeMetaContextData('ro', ['base:allocation']));
  assert.equal((await client.option(nbd.NBD_OPT_GO, encodeInfoRequestData('mem'))).at(-1)!.type, nbd.NBD_REP_ACK);
  client.structured = true;
  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_BLOCK_STATUS, handle: 1n, offsetBytes: 0, lengthBytes: 4096 })), nbd.NBD_EINVAL);
});

test('NBD_OPT_ABORT is acknowledged and the connection closes; EXPORT_NAME of an unknown export closes it', async (t) => {
  const h = await start(t);
  const abort = await h.connect();
  await abort.readGreeting();
  abort.write(encodeClientFlags(3));
  assert.deepEqual((await abort.option(nbd.NBD_OPT_ABORT)).map((reply) => reply.type), [nbd.NBD_REP_ACK]);
  assert.ok(await abort.waitClosed());
  const unknown = await h.connect();
  await unknown.readGreeting();
  unknown.write(encodeClientFlags(3));
  unknown.write(encodeOptionMessage(nbd.NBD_OPT_EXPORT_NAME, Buffer.from('nope')));
  assert.ok(await unknown.waitClosed());
  assert.equal(unknown.buffered, 0, 'nothing was sent');
  assert.ok(h.logs.some((line) => line.includes('"nope"')));
});

test('garbage in a handshake closes that connection only', async (t) => {
  const h = await start(t);
  const good = await h.ready();
  for (const garbage of [
    Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), // bad client flags
    Buffer.concat([encodeClientFlags(3), Buffer.from('IHAVEOPX'), Buffer.alloc(8)]), // bad option magic
    Buffer.concat([encodeClientFlags(3), encodeOptionMessage(nbd.NBD_OPT_GO).subarray(0, 12), Buffer.from([0xff, 0xff, 0xff, 0xff])]), // 4 GiB option
  ]) {
    const bad = await h.connect();
    await bad.readGreeting();
    bad.write(garbage);
    assert.ok(await bad.waitClosed(), `closed after ${garbage.toString('hex').slice(0, 40)}`);
  }
  const data = pattern(4096, 9);
  assert.equal(replyError(await good.call({ type: nbd.NBD_CMD_WRITE, handle: 1n }, data)), 0);
  assert.deepEqual(readData(await good.call({ type: nbd.NBD_CMD_READ, handle: 2n, lengthBytes: 4096 }), 0, 4096), data);
  const another = await h.ready();
  assert.deepEqual(readData(await another.call({ type: nbd.NBD_CMD_READ, handle: 1n, lengthBytes: 4096 }), 0, 4096), data);
});

test('a bad request magic closes that connection; its device is closed', async (t) => {
  const h = await start(t);
  const other = await h.ready();
  const client = await h.ready();
  client.write(Buffer.alloc(28, 0x41));
  assert.ok(await client.waitClosed());
  await eventually(() => h.provider.openDevices === 1, 'the bad connection closed its device');
  assert.equal(replyError(await other.call({ type: nbd.NBD_CMD_FLUSH, handle: 1n })), 0);
});

test('a truncated handshake and a silent client end without harm', async (t) => {
  // 1 s: the good client's handshake below must fit in it, on a loaded machine too (200 ms did not always).
  const h = await start(t, { handshakeTimeoutMs: 1_000 });
  const truncated = await h.connect();
  await truncated.readGreeting();
  truncated.write(Buffer.concat([encodeClientFlags(3), encodeOptionMessage(nbd.NBD_OPT_GO, encodeInfoRequestData('mem')).subarray(0, 20)]));
  await sleep(20);
  truncated.close();
  const silent = await h.connect();
  await silent.readGreeting();
  assert.ok(await silent.waitClosed(20_000), 'the handshake timeout closes a silent client');
  assert.ok(h.logs.some((line) => line.includes('handshake not finished')));
  const good = await h.ready();
  assert.equal(replyError(await good.call({ type: nbd.NBD_CMD_READ, handle: 1n, lengthBytes: 1 })), 0);
  await sleep(1_500);
  assert.equal(replyError(await good.call({ type: nbd.NBD_CMD_READ, handle: 2n, lengthBytes: 1 })), 0, 'no timeout once in transmission');
});

test('100 connections at once, each writing and reading its own block', async (t) => {
  const h = await start(t);
  const clients = await Promise.all(Array.from({ length: 100 }, () => h.ready()));
  assert.equal(h.server.stats().connectionsOpen, 100);
  await Promise.all(clients.map(async (client, index) => {
    const data = pattern(4096, index);
    assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE, handle: 1n, offsetBytes: index * 4096 }, data)), 0);
  }));
  await Promise.all(clients.map(async (client, index) => {
    const other = (index + 1) % 100;
    const replies = await client.call({ type: nbd.NBD_CMD_READ, handle: 2n, offsetBytes: other * 4096, lengthBytes: 4096 });
    assert.deepEqual(readData(replies, other * 4096, 4096), pattern(4096, other));
  }));
  for (const client of clients) client.close();
  await eventually(() => h.server.stats().connectionsOpen === 0, 'all connections gone');
  assert.equal(h.provider.openDevices, 0);
  assert.equal(h.server.stats().connectionsTotal, 100);
});

test('connections past the limit are closed at accept', async (t) => {
  const h = await start(t, { connectionsMax: 2 });
  const first = await h.ready();
  await h.ready();
  const third = await h.connect();
  assert.ok(await third.waitClosed());
  assert.equal(third.buffered, 0, 'not even a greeting');
  assert.equal(replyError(await first.call({ type: nbd.NBD_CMD_FLUSH, handle: 1n })), 0);
});

test('a client that vanishes mid-WRITE payload or with requests in flight leaves nothing behind', async (t) => {
  const h = await start(t);
  const midPayload = await h.ready();
  midPayload.write(encodeRequestMessage({ type: nbd.NBD_CMD_WRITE, handle: 1n, offsetBytes: 0, lengthBytes: 65536 }));
  midPayload.write(Buffer.alloc(30000, 1));
  await sleep(20);
  midPayload.close();

  h.provider.latencyMs = (op) => (op === 'read' ? 100 : 0);
  const inFlight = await h.ready();
  for (let index = 0; index < 10; index += 1) inFlight.send({ type: nbd.NBD_CMD_READ, handle: BigInt(index), offsetBytes: index * 4096, lengthBytes: 4096 });
  await sleep(20);
  inFlight.close();
  await eventually(() => h.provider.openDevices === 0, 'both devices closed once their operations finished');
  assert.equal(h.provider.closes, 2);
  assert.equal(h.provider.writeLog.length, 0, 'the partial WRITE never reached the device');

  h.provider.latencyMs = () => 0;
  const after = await h.ready();
  assert.equal(replyError(await after.call({ type: nbd.NBD_CMD_WRITE, handle: 1n }, Buffer.alloc(10))), 0);
});

test('WRITE payloads arriving in pieces of any size land whole, among other requests, in Node and shared buffers', async (t) => {
  // Payloads over 64 KiB are read from the socket straight into their own buffer (steered-socket.ts); smaller ones
  // come through the read arena. Pieces of odd sizes, with pauses between some, put boundaries everywhere.
  const writes = [
    { offsetBytes: 0, data: pattern(MiB + 17, 1) },
    { offsetBytes: 2 * MiB, data: pattern(100, 2) },
    { offsetBytes: 2 * MiB + 4096, data: pattern(65536 + 1, 3) },
    { offsetBytes: 3 * MiB, data: pattern(4096, 4) },
    { offsetBytes: 3 * MiB + 8192, data: pattern(300000, 5) },
  ];
  const pieceSizes = [1, 27, 28, 29, 4096, 65535, 65536, 70000, 300000, 13];
  for (const sharedBuffers of [null, new SharedBufferPool()]) {
    const h = await start(t, { sharedBuffers });
    const client = await h.ready();
    await writeInPieces(client, writes, pieceSizes);
    const handles: bigint[] = [];
    for (const _ of writes) {
      const reply = await client.readReply();
      assert.equal(replyError([reply]), 0);
      handles.push(reply.handle);
    }
    assert.deepEqual(handles.sort(), writes.map((_, index) => BigInt(index + 1)));
    for (const [index, write] of writes.entries()) {
      const replies = await client.call({ type: nbd.NBD_CMD_READ, handle: BigInt(100 + index), offsetBytes: write.offsetBytes, lengthBytes: write.data.length });
      assert.ok(readData(replies, write.offsetBytes, write.data.length).equals(write.data), `write ${index} (${write.data.length} bytes) reads back`);
    }
  }
});

test('a small WRITE\'s payload held by a slow device stays intact while later requests are read (the read arena is not refilled under it)', async (t) => {
  // Without shared buffers a small WRITE's payload goes to the device as a view of the socket's read arena; the
  // receiver fills the arena again from its start only when no such view was lent (receiver.ts). Here the first
  // WRITE waits 300 ms in the device while the next requests arrive and are answered: its bytes must be its own.
  for (const sharedBuffers of [null, new SharedBufferPool()]) {
    const h = await start(t, { sharedBuffers });
    h.provider.latencyMs = (op, offsetBytes) => (op === 'write' && offsetBytes === 0 ? 300 : 0);
    const client = await h.ready();
    // The first request's bytes may still land in the handshake's buffer; from the next on, the arena's.
    assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE, handle: 9n, offsetBytes: 2 * MiB }, pattern(4096, 10))), 0);
    const held = pattern(8192, 11);
    client.send({ type: nbd.NBD_CMD_WRITE, handle: 1n, offsetBytes: 0, lengthBytes: held.length }, held);
    await sleep(50);
    for (let index = 0; index < 4; index += 1) {
      const data = pattern(8192 + index * 4096, 20 + index);
      assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE, handle: BigInt(2 + index), offsetBytes: MiB + index * 65536, lengthBytes: data.length }, data)), 0);
    }
    const [first] = await client.readWholeReply();
    assert.equal(first!.handle, 1n);
    assert.equal(replyError([first!]), 0);
    const replies = await client.call({ type: nbd.NBD_CMD_READ, handle: 10n, offsetBytes: 0, lengthBytes: held.length });
    assert.ok(readData(replies, 0, held.length).equals(held), `the held WRITE's bytes are its own (shared buffers: ${sharedBuffers !== null})`);
  }
});

test('client sockets stay close-on-exec: a child the node starts (nbdfuse, umount) inherits none', async (t) => {
  const h = await start(t);
  const client = await h.ready();
  assert.equal(replyError(await client.call({ type: nbd.NBD_CMD_WRITE, handle: 1n, offsetBytes: 0 }, Buffer.alloc(512, 1))), 0);
  const inherited: string[] = [];
  for (const fd of await fs.readdir('/proc/self/fd')) {
    const target = await fs.readlink(`/proc/self/fd/${fd}`).catch(() => '');
    if (!target.startsWith('socket:')) continue;
    const flags = /flags:\s+(\d+)/.exec(await fs.readFile(`/proc/self/fdinfo/${fd}`, 'utf8').catch(() => ''))?.[1];
    if (flags !== undefined && (parseInt(flags, 8) & 0o2000000) === 0) inherited.push(`fd ${fd} (${target})`);
  }
  assert.deepEqual(inherited, [], 'every socket descriptor has O_CLOEXEC');
});

test('replies go out as requests finish, out of order, each whole', async (t) => {
  const h = await start(t);
  h.provider.latencyMs = (op, offsetBytes) => (op === 'read' && offsetBytes === 0 ? 250 : 0);
  const client = await h.ready();
  await client.call({ type: nbd.NBD_CMD_WRITE, handle: 100n, offsetBytes: 0 }, pattern(65536, 4));
  client.send({ type: nbd.NBD_CMD_READ, handle: 1n, offsetBytes: 0, lengthBytes: 4096 });
  const offsetOf = (handle: bigint): number => (handle === 1n ? 0 : Number(handle % 15n + 1n) * 4096);
  for (let index = 2; index <= 64; index += 1) client.send({ type: nbd.NBD_CMD_READ, handle: BigInt(index), offsetBytes: offsetOf(BigInt(index)), lengthBytes: 4096 });
  const order: bigint[] = [];
  for (let count = 0; count < 64; count += 1) {
    const [reply] = await client.readWholeReply();
    order.push(reply!.handle);
    const offsetBytes = offsetOf(reply!.handle);
    assert.deepEqual(readData([reply!], offsetBytes, 4096), pattern(65536, 4).subarray(offsetBytes, offsetBytes + 4096));
  }
  assert.equal(order.at(-1), 1n, 'the slow read is answered last');
  assert.deepEqual([...order].sort((a, b) => Number(a - b)), Array.from({ length: 64 }, (_, index) => BigInt(index + 1)));
});

test('large READs sent together, small requests among them, are all answered whole (each large reply goes out before the next request is taken)', async (t) => {
  const h = await start(t);
  const client = await h.ready();
  await client.call({ type: nbd.NBD_CMD_WRITE, handle: 100n, offsetBytes: 0 }, pattern(4 * MiB, 9));
  const batch: Buffer[] = [];
  const reads = new Map<bigint, number>();
  for (let index = 0; index < 12; index += 1) {
    const handle = BigInt(index + 1);
    const offsetBytes = (index % 4) * MiB;
    reads.set(handle, offsetBytes);
    batch.push(encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle, offsetBytes, lengthBytes: MiB }));
    if (index % 3 === 0) batch.push(encodeRequestMessage({ type: nbd.NBD_CMD_FLUSH, handle: BigInt(1000 + index) }));
  }
  client.write(Buffer.concat(batch)); // one write: the node finds several large READs in one turn
  const seen: bigint[] = [];
  for (let count = 0; count < 16; count += 1) {
    const replies = await client.readWholeReply();
    assert.equal(replyError(replies), 0);
    const handle = replies[0]!.handle;
    seen.push(handle);
    const offsetBytes = reads.get(handle);
    if (offsetBytes !== undefined) assert.ok(readData(replies, offsetBytes, MiB).equals(pattern(4 * MiB, 9).subarray(offsetBytes, offsetBytes + MiB)), `READ ${handle} whole`);
  }
  assert.equal(new Set(seen).size, 16, 'every request answered once');
});

test('flow control: far more requests than may be in flight are all answered', async (t) => {
  const h = await start(t);
  h.provider.latencyMs = () => 1;
  const client = await h.ready();
  const count = 1000;
  const batch: Buffer[] = [];
  for (let index = 0; index < count; index += 1) {
    batch.push(encodeRequestMessage({ type: nbd.NBD_CMD_WRITE, handle: BigInt(index), offsetBytes: (index % 256) * 4096 }, pattern(4096, index % 256)));
  }
  client.write(Buffer.concat(batch));
  const seen = new Set<bigint>();
  for (let index = 0; index < count; index += 1) {
    const replies = await client.readWholeReply();
    assert.equal(replyError(replies), 0);
    seen.add(replies[0]!.handle);
  }
  assert.equal(seen.size, count);
  assert.ok(h.provider.operationsInFlightMax <= requestsInFlightPerConnectionMax, `at most ${requestsInFlightPerConnectionMax} in flight (saw ${h.provider.operationsInFlightMax})`);
  assert.ok(h.provider.operationsInFlightMax >= 32, 'many requests do run at once');
  assert.deepEqual(readData(await client.call({ type: nbd.NBD_CMD_READ, handle: 5000n, offsetBytes: 4096 * 7, lengthBytes: 4096 }), 4096 * 7, 4096), pattern(4096, 7));
});

test('client EOF after requests: their replies still come', async (t) => {
  const h = await start(t);
  h.provider.latencyMs = () => 30;
  const client = await h.ready();
  client.send({ type: nbd.NBD_CMD_WRITE, handle: 1n }, Buffer.alloc(4096, 5));
  client.send({ type: nbd.NBD_CMD_READ, handle: 2n, lengthBytes: 4096 });
  client.socket.end();
  const first = await client.readWholeReply();
  const second = await client.readWholeReply();
  assert.deepEqual([first[0]!.handle, second[0]!.handle].sort(), [1n, 2n]);
  assert.ok(await client.waitClosed());
});

test('close() lets in-flight requests finish, answers them, then closes every connection', async (t) => {
  const h = await start(t);
  h.provider.latencyMs = (op) => (op === 'read' ? 100 : 0);
  const client = await h.ready();
  const handshaking = await h.connect();
  await handshaking.readGreeting();
  client.send({ type: nbd.NBD_CMD_READ, handle: 1n, lengthBytes: 4096 });
  // Closed once the server has taken the read (not after a fixed 20 ms: a loaded machine may not have read it by then).
  await eventually(() => h.server.stats().requestsTotal === 1, 'the read taken');
  const closing = h.server.close();
  assert.ok(await handshaking.waitClosed(), 'a connection still in its handshake is closed at once');
  const replies = await client.readWholeReply();
  assert.equal(replyError(replies), 0);
  await closing;
  assert.ok(await client.waitClosed());
  assert.equal(h.provider.openDevices, 0);
  assert.equal(h.server.stats().connectionsOpen, 0);
  await assert.rejects(RawClient.connect(h.socketPath));
});

test('listenUnix replaces a stale socket file and refuses a live one or a non-socket', async (t) => {
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'chunkd-nbd-'));
  t.onTestFinished(() => fs.rm(directory, { recursive: true, force: true }));
  const socketPath = path.join(directory, 'stale.sock');
  // A process that dies without unlinking its socket leaves a stale file behind.
  const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(socketPath)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  await new Promise((resolve) => child.once('exit', resolve));
  assert.ok((await fs.lstat(socketPath)).isSocket());
  const provider = new MemoryProvider();
  provider.add('mem', MiB);
  const server = new NbdServer({ provider });
  await server.listenUnix(socketPath);
  assert.deepEqual(server.addresses(), [socketPath]);
  const client = await RawClient.connect(socketPath);
  await client.handshake();
  client.close();

  const second = new NbdServer({ provider });
  await assert.rejects(second.listenUnix(socketPath), (error: unknown) => error instanceof ChunkdError && error.code === 'EBUSY');
  const plainFile = path.join(directory, 'file');
  await fs.writeFile(plainFile, 'x');
  await assert.rejects(second.listenUnix(plainFile), (error: unknown) => error instanceof ChunkdError && error.code === 'EBUSY');
  await second.close();
  await server.close();
  await assert.rejects(fs.lstat(socketPath), 'the socket file goes away with the server');
});

test('TCP listener with noDelay', async (t) => {
  const provider = new MemoryProvider();
  provider.add('mem', MiB);
  const server = new NbdServer({ provider });
  t.onTestFinished(() => server.close());
  await server.listenTcp('127.0.0.1', 0);
  const [address] = server.addresses();
  const port = Number(address!.split(':').at(-1));
  const socket = net.connect({ host: '127.0.0.1', port });
  const greeting = await new Promise<Buffer>((resolve) => socket.once('data', resolve));
  assert.equal(greeting.subarray(0, 16).toString(), 'NBDMAGICIHAVEOPT');
  socket.destroy();
});
