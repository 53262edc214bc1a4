// The peer link's sending side and its TLS settings, in one process: FrameQueue's writes (pieces joined up to
// 256 KiB, a larger piece written alone and the next write after its callback, since Node's TLS socket copies a write of
// several buffers into one), a PeerClient and a PeerServer over mutual TLS on loopback carrying large and small
// requests interleaved, byte for byte, and the cipher suite the peer port picks for each kind of client.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { test } from 'vitest';
import { initTls } from '../../src/peer/certificates.ts';
import { FrameQueue, PeerClient } from '../../src/peer/client.ts';
import { loadCredentials } from '../../src/peer/credentials.ts';
import { PeerVerb } from '../../src/peer/protocol.ts';
import { PeerServer } from '../../src/peer/server.ts';
import { makeTempDir } from '../../src/testing/node-process.ts';

const poolId = '0b0e8d1c-6a53-4c5e-9d0f-1f1e2d3c4b5a';

/** A socket as FrameQueue sees it, which records each write and completes it only when told. */
function recordingSocket(): { socket: tls.TLSSocket; writes: Buffer[]; complete: () => void } {
  const writes: Buffer[] = [];
  const callbacks: Array<() => void> = [];
  const socket = {
    write(buffer: Buffer, callback: () => void): boolean {
      writes.push(buffer);
      callbacks.push(callback);
      return true;
    },
  } as unknown as tls.TLSSocket;
  return { socket, writes, complete: () => callbacks.shift()!() };
}

test('FrameQueue joins small pieces, writes a large one alone, and starts the next write only after the last one\'s callback', async () => {
  const { socket, writes, complete } = recordingSocket();
  const queue = new FrameQueue(() => socket);
  const large = [Buffer.alloc(1 << 20, 1), Buffer.alloc((256 << 10) + 1, 2)];
  const small = Array.from({ length: 6 }, (_, index) => Buffer.alloc(index === 3 ? 200 << 10 : 16 + index, 10 + index));
  // Two requests as PeerClient queues them: frame header, payload header, data.
  for (const piece of [small[0]!, small[1]!, large[0]!, small[2]!, small[3]!, large[1]!]) queue.push(piece);
  assert.equal(writes.length, 0, 'nothing is written before the turn ends');
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(writes.length, 1, 'one write at a time');
  assert.deepEqual(writes[0], Buffer.concat([small[0]!, small[1]!]));
  complete();
  assert.equal(writes.length, 2);
  assert.equal(writes[1], large[0], 'a large piece is written as it is: the same buffer, not a copy');
  // What is pushed while a write is in progress waits for it, and joins what is queued.
  queue.push(small[4]!);
  complete();
  assert.deepEqual(writes[2], Buffer.concat([small[2]!, small[3]!]));
  complete();
  assert.equal(writes[3], large[1]);
  complete();
  assert.deepEqual(writes[4], small[4], 'a lone small piece is written as it is');
  complete();
  assert.equal(writes.length, 5, 'nothing more to write');
  // Idle again: the next push is written at the end of its turn.
  queue.push(small[5]!);
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(writes.length, 6);
});

test('FrameQueue drops what is queued once the connection is failing, and take() hands back what is unwritten', async () => {
  const { socket, writes, complete } = recordingSocket();
  let open = true;
  const queue = new FrameQueue(() => (open ? socket : null));
  queue.push(Buffer.alloc(1 << 20));
  queue.push(Buffer.alloc(8));
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(writes.length, 1);
  assert.deepEqual(queue.take(), [Buffer.alloc(8)], 'the piece not yet written');
  queue.push(Buffer.alloc(1 << 20));
  open = false;
  complete();
  assert.equal(writes.length, 1, 'nothing is written to a failing connection');
  open = true;
  queue.push(Buffer.alloc(4));
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(writes.slice(1), [Buffer.alloc(4)], 'the dropped piece stays dropped; a new one goes out');
});

async function tlsPair(t: { onTestFinished: (callback: () => void | Promise<void>) => void }): Promise<{ dir: string; server: PeerServer; port: number; received: Buffer[] }> {
  const dir = makeTempDir('peer-link');
  t.onTestFinished(() => fs.rmSync(dir, { recursive: true, force: true }));
  await initTls({ directory: dir, nodes: ['alpha', 'beta'], clients: [], sans: [], days: 1, mode: 'new' });
  const received: Buffer[] = [];
  const server = new PeerServer({
    credentials: loadCredentials(path.join(dir, 'beta'), 'server'), allow: null, poolId, software: 'test', log: () => {},
    verbs: new Map([[PeerVerb.syncWrite, async (payload: Buffer) => {
      received.push(Buffer.from(payload));
      return { length: payload.length };
    }]]),
  });
  await server.listen('127.0.0.1', 0);
  t.onTestFinished(() => server.close());
  return { dir, server, port: Number(server.addresses()[0]!.split(':').pop()), received };
}

test('large and small requests interleaved arrive whole and in order over the peer link', async (t) => {
  const { dir, port, received } = await tlsPair(t);
  const client = await PeerClient.connect({ host: '127.0.0.1', port, credentials: loadCredentials(path.join(dir, 'alpha'), 'client') });
  t.onTestFinished(() => client.close());
  const sizes = [1 << 20, 4096, 100, 1 << 20, 16 << 10, (16 << 10) + 1, 3 << 20, 7, 256 << 10];
  const payloads = sizes.map((size, index) => {
    const data = Buffer.alloc(size);
    for (let offset = 0; offset < size; offset += 4) data.writeUInt32LE((index << 24) ^ offset, offset - (offset + 4 > size ? offset + 4 - size : 0));
    return [Buffer.from([index]), data];
  });
  // All in one turn, so that they queue behind one another.
  const replies = await Promise.all(payloads.map((pieces) => client.request(PeerVerb.syncWrite, pieces)));
  assert.deepEqual(replies.map((reply) => JSON.parse(reply.toString()).length), sizes.map((size) => size + 1));
  assert.deepEqual(received, payloads.map((pieces) => Buffer.concat(pieces)));
});

test('the peer port prefers AES-128-GCM over a client\'s AES-256-GCM, and gives ChaCha20 to a client that asks for it first', async (t) => {
  const { dir, port } = await tlsPair(t);
  const credentials = loadCredentials(path.join(dir, 'alpha'), 'client');
  const negotiated = async (ciphers?: string): Promise<string> => {
    const socket = tls.connect({ host: '127.0.0.1', port, ca: credentials.ca, cert: credentials.cert, key: credentials.key, rejectUnauthorized: false, minVersion: 'TLSv1.3', ...(ciphers === undefined ? {} : { ciphers }) });
    try {
      await new Promise((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject));
      return socket.getCipher().standardName;
    } finally {
      socket.destroy();
    }
  };
  assert.match(tls.DEFAULT_CIPHERS, /^TLS_AES_256_GCM_SHA384:/, 'Node\'s own client asks for AES-256-GCM first');
  assert.equal(await negotiated(), 'TLS_AES_128_GCM_SHA256', 'a client with Node\'s default order gets AES-128-GCM');
  assert.equal(await negotiated('TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256'), 'TLS_CHACHA20_POLY1305_SHA256');
  assert.equal(await negotiated('TLS_AES_256_GCM_SHA384'), 'TLS_AES_256_GCM_SHA384', 'a client with one suite gets it');
  const client = await PeerClient.connect({ host: '127.0.0.1', port, credentials });
  t.onTestFinished(() => client.close());
  assert.equal(client.hello.name, 'beta');
});
