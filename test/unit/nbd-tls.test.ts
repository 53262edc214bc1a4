// NBD over TLS, the parts that need no real client: what each TLS mode allows in the handshake (pure), the
// credentials' checks and the client-certificate check, the serve flags, and a server on a unix socket whose
// connections stall or fail in the TLS handshake and are cut within the handshake timeout.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import tls from 'node:tls';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseTls } from '../../src/cli/serve.ts';
import { ChunkdError } from '../../src/core/errors.ts';
import { SharedBufferPool } from '../../src/core/shared-buffers.ts';
import { Handshake } from '../../src/nbd/handshake.ts';
import type { HandshakeStep } from '../../src/nbd/handshake.ts';
import { InputQueue } from '../../src/nbd/input-queue.ts';
import * as nbd from '../../src/nbd/protocol.ts';
import { tlsReplyJoinBytes, tlsReplySliceBytes } from '../../src/core/limits.ts';
import { ReplyQueue } from '../../src/nbd/reply-queue.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { steerTlsReads } from '../../src/nbd/steered-socket.ts';
import { loadTlsServerConfig, peerRefusal, tlsSettings } from '../../src/nbd/tls.ts';
import { issue, makeCa, makeTlsDir } from '../helpers/tls-certs.ts';
import { MemoryProvider } from './helpers/memory-device.ts';
import { RawClient, encodeClientFlags, encodeInfoRequestData, encodeOptionMessage, readData, replyError, writeInPieces } from './helpers/nbd-raw-client.ts';

const MiB = 1 << 20;

function provider(): MemoryProvider {
  const memory = new MemoryProvider();
  memory.add('mem', 4 * MiB);
  return memory;
}

/** Feeds one option to a handshake past its client flags and returns the step. */
async function step(handshake: Handshake, input: InputQueue, option: number, data: Buffer = Buffer.alloc(0)): Promise<HandshakeStep> {
  input.push(encodeOptionMessage(option, data));
  return await handshake.next(input);
}

/** The option reply types in a step's output. */
function replyTypes(result: HandshakeStep): number[] {
  assert.ok('output' in result, `a step with output, not ${result.kind}`);
  return result.output.map((buffer) => buffer.readUInt32BE(12));
}

async function started(mode: 'off' | 'on' | 'require'): Promise<{ handshake: Handshake; input: InputQueue }> {
  const handshake = new Handshake(provider(), mode);
  const input = new InputQueue();
  input.push(encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE));
  assert.equal((await handshake.next(input)).kind, 'continue');
  return { handshake, input };
}

test('TLS off: NBD_OPT_STARTTLS is unsupported, as before', async () => {
  const { handshake, input } = await started('off');
  assert.deepEqual(replyTypes(await step(handshake, input, nbd.NBD_OPT_STARTTLS)), [nbd.NBD_REP_ERR_UNSUP]);
  assert.equal((await step(handshake, input, nbd.NBD_OPT_GO, encodeInfoRequestData('mem'))).kind, 'transmission');
});

test('TLS require: before STARTTLS every option but ABORT is NBD_REP_ERR_TLS_REQD and EXPORT_NAME closes; inside TLS all is served', async () => {
  const { handshake, input } = await started('require');
  for (const [option, data] of [
    [nbd.NBD_OPT_LIST, Buffer.alloc(0)], [nbd.NBD_OPT_INFO, encodeInfoRequestData('mem')], [nbd.NBD_OPT_GO, encodeInfoRequestData('mem')],
    [nbd.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)], [nbd.NBD_OPT_LIST_META_CONTEXT, Buffer.alloc(0)], [0x4242, Buffer.alloc(0)],
  ] as const) {
    assert.deepEqual(replyTypes(await step(handshake, input, option, data)), [nbd.NBD_REP_ERR_TLS_REQD], `option ${option}`);
  }
  assert.deepEqual(replyTypes(await step(handshake, input, nbd.NBD_OPT_STARTTLS, Buffer.from('x'))), [nbd.NBD_REP_ERR_INVALID], 'STARTTLS takes no data');
  const upgrade = await step(handshake, input, nbd.NBD_OPT_STARTTLS);
  assert.equal(upgrade.kind, 'starttls');
  assert.deepEqual(replyTypes(upgrade), [nbd.NBD_REP_ACK]);
  assert.equal(handshake.tlsActive, false, 'TLS is up only once the connection says so');
  handshake.tlsStarted();
  assert.deepEqual(replyTypes(await step(handshake, input, nbd.NBD_OPT_STARTTLS)), [nbd.NBD_REP_ERR_INVALID], 'a second STARTTLS');
  const go = await step(handshake, input, nbd.NBD_OPT_GO, encodeInfoRequestData('mem'));
  assert.equal(go.kind, 'transmission');
  assert.equal(go.kind === 'transmission' && go.session.exportName, 'mem');
  if (go.kind === 'transmission') await go.session.device.close();

  const early = await started('require');
  assert.equal((await step(early.handshake, early.input, nbd.NBD_OPT_EXPORT_NAME, Buffer.from('mem'))).kind, 'close');
  const aborting = await started('require');
  assert.equal((await step(aborting.handshake, aborting.input, nbd.NBD_OPT_ABORT)).kind, 'abort');
});

test('TLS on: options are served without TLS; after STARTTLS what was negotiated before is forgotten', async () => {
  const { handshake, input } = await started('on');
  assert.deepEqual(replyTypes(await step(handshake, input, nbd.NBD_OPT_STRUCTURED_REPLY)), [nbd.NBD_REP_ACK]);
  assert.equal((await step(handshake, input, nbd.NBD_OPT_STARTTLS)).kind, 'starttls');
  handshake.tlsStarted();
  const go = await step(handshake, input, nbd.NBD_OPT_GO, encodeInfoRequestData('mem'));
  assert.ok(go.kind === 'transmission');
  assert.equal(go.session.structuredReplies, false, 'structured replies asked before STARTTLS do not carry over (spec)');
  await go.session.device.close();
});

/** A directory of credentials, another CA's client certificate, made once for the tests below. */
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-nbd-tls-'));
process.on('exit', () => fs.rmSync(scratch, { recursive: true, force: true }));
const creds = path.join(scratch, 'creds');
makeTlsDir(creds);
const other = path.join(scratch, 'other');
issue(makeCa(path.join(scratch, 'ca2'), 'another CA'), other, 'client');

test('credentials: a missing, unreadable or malformed file is refused with its name', () => {
  const config = loadTlsServerConfig(creds, 'require', true);
  assert.equal(config.mode, 'require');
  assert.ok(config.ca !== null && config.cert.includes('BEGIN CERTIFICATE'));
  const broken = path.join(scratch, 'broken');
  fs.mkdirSync(broken);
  const refused = (pattern: RegExp, verifyPeer = false): void => {
    assert.throws(() => loadTlsServerConfig(broken, 'on', verifyPeer), (error: unknown) => error instanceof ChunkdError && error.code === 'EINVAL' && pattern.test(error.message));
  };
  refused(/server-cert\.pem is missing/);
  fs.writeFileSync(path.join(broken, 'server-cert.pem'), 'not a certificate');
  refused(/server-key\.pem is missing/);
  fs.writeFileSync(path.join(broken, 'server-key.pem'), fs.readFileSync(path.join(creds, 'server-key.pem')));
  refused(/server-cert\.pem is not an X\.509 certificate/);
  fs.copyFileSync(path.join(creds, 'server-cert.pem'), path.join(broken, 'server-cert.pem'));
  assert.equal(loadTlsServerConfig(broken, 'on', false).ca, null, 'without verify-peer the CA is not needed');
  refused(/ca-cert\.pem is missing/, true);
  fs.writeFileSync(path.join(broken, 'server-key.pem'), fs.readFileSync(path.join(other, 'client-key.pem')));
  refused(/server-key\.pem does not go with .*server-cert\.pem/);
  fs.writeFileSync(path.join(broken, 'server-key.pem'), 'garbage');
  refused(/server-key\.pem is not a private key/);
  fs.chmodSync(path.join(broken, 'server-key.pem'), 0);
  if (process.getuid?.() !== 0) refused(/server-key\.pem is unreadable \(EACCES\)/);
});

test('a client certificate must be issued and signed by the CA, and valid now', () => {
  const { authorities } = tlsSettings(loadTlsServerConfig(creds, 'on', true));
  const good = new crypto.X509Certificate(fs.readFileSync(path.join(creds, 'client-cert.pem')));
  const foreign = new crypto.X509Certificate(fs.readFileSync(path.join(other, 'client-cert.pem')));
  assert.equal(peerRefusal(good, authorities), null);
  assert.match(peerRefusal(foreign, authorities) ?? '', /is not signed by a CA in ca-cert\.pem/);
  assert.match(peerRefusal(undefined, authorities) ?? '', /no client certificate/);
  assert.match(peerRefusal(good, authorities, new Date(Date.now() + 30 * 24 * 3600 * 1000)) ?? '', /is not valid now/);
});

test('serve flags: --tls needs --tls-dir, and --tls-dir and --tls-verify-peer need TLS on', () => {
  assert.equal(parseTls('off', undefined, false), null);
  assert.deepEqual(parseTls('require', 'dir', true), { mode: 'require', directory: 'dir', verifyPeer: true });
  assert.throws(() => parseTls('on', undefined, false), /--tls on needs --tls-dir DIR/);
  assert.throws(() => parseTls('off', 'dir', false), /--tls-dir is given but --tls is off/);
  assert.throws(() => parseTls('off', undefined, true), /--tls-verify-peer needs --tls on/);
  assert.throws(() => parseTls('maybe', 'dir', false), /invalid --tls "maybe"/);
});

test('a TLS handshake that stalls, or stops halfway, is cut at the handshake timeout; shutdown cuts one at once', async (t) => {
  const socketPath = path.join(scratch, 'nbd.sock');
  const logs: string[] = [];
  // 2 s: the connections below that must outlive the handshake (a TLS handshake, then server.close) are set up well
  // inside it on a loaded machine too (400 ms was not always: CPUs shared by a busy CI).
  const handshakeTimeoutMs = 2_000;
  const server = new NbdServer({ provider: provider(), log: (line) => logs.push(line), handshakeTimeoutMs, tls: tlsSettings(loadTlsServerConfig(creds, 'require', false)) });
  await server.listenUnix(socketPath);
  t.onTestFinished(() => server.close());
  const upgrading = async (): Promise<RawClient> => {
    const client = await RawClient.connect(socketPath);
    await client.readGreeting();
    client.write(encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE));
    assert.deepEqual((await client.option(nbd.NBD_OPT_STARTTLS)).map((reply) => reply.type), [nbd.NBD_REP_ACK]);
    return client;
  };
  // Taken before the connections: the server's deadlines start after it, so no cut comes sooner than the timeout
  // (less a millisecond a timer may fire early); how much later is the machine's load, with room to spare.
  const began = Date.now();
  const silent = await upgrading();
  const half = await upgrading();
  half.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]));
  assert.ok(await silent.waitClosed(handshakeTimeoutMs + 15_000), 'a silent client is cut');
  assert.ok(await half.waitClosed(handshakeTimeoutMs + 15_000), 'half a ClientHello is cut');
  const elapsedMs = Date.now() - began;
  assert.ok(elapsedMs >= handshakeTimeoutMs - 5, `cut after the ${handshakeTimeoutMs} ms timeout (${elapsedMs} ms)`);
  const cut = (): number => logs.filter((line) => new RegExp(`handshake not finished within ${handshakeTimeoutMs} ms`).test(line)).length;
  assert.equal(cut(), 2, logs.join('\n'));

  // A TLS handshake that completes serves; one in the middle of it is cut at once by close().
  const working = await upgrading();
  const secure = tls.connect({ socket: working.socket, ca: fs.readFileSync(path.join(creds, 'ca-cert.pem')), servername: 'localhost' });
  await new Promise((resolve, reject) => secure.once('secureConnect', resolve).once('error', reject));
  const stalled = await upgrading();
  assert.equal(server.stats().connectionsOpen, 2);
  await server.close();
  assert.ok(await stalled.waitClosed(5_000), 'close() cuts a connection in the TLS handshake');
  assert.equal(cut(), 2, `close() cut it, not its handshake deadline: ${logs.join('\n')}`);
  secure.destroy();
});

test('the server picks AES-128-GCM over a client\'s AES-256-GCM, and gives ChaCha20 to a client that asks for it first', async (t) => {
  const socketPath = path.join(scratch, 'cipher.sock');
  const server = new NbdServer({ provider: provider(), log: () => {}, tls: tlsSettings(loadTlsServerConfig(creds, 'require', false)) });
  await server.listenUnix(socketPath);
  t.onTestFinished(() => server.close());
  const negotiated = async (ciphers: string): Promise<string | undefined> => {
    const client = await RawClient.connect(socketPath);
    await client.handshake({ tls: { ca: fs.readFileSync(path.join(creds, 'ca-cert.pem')), servername: 'localhost', ciphers } });
    const name = (client.socket as tls.TLSSocket).getCipher().standardName;
    client.socket.destroy();
    return name;
  };
  // Node's and GnuTLS's own order: AES-256-GCM first. Without the server's preference it would be chosen.
  assert.equal(await negotiated('TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256'), 'TLS_AES_128_GCM_SHA256');
  assert.equal(await negotiated('TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256'), 'TLS_CHACHA20_POLY1305_SHA256');
  assert.equal(await negotiated('TLS_AES_256_GCM_SHA384'), 'TLS_AES_256_GCM_SHA384', 'a client with one suite gets it');
});

test('TLS replies are queued whole and handed out in slices, in order: large pieces alone, small replies together', () => {
  const queue = new ReplyQueue();
  assert.equal(queue.take(5, 2), null);
  const a = Buffer.from('aaaaaaa'); // 7 bytes, pooled: at most 5 + 2, so one slice
  const b = Buffer.from('bb'); // 2 bytes
  const c = Buffer.from('cccccccccccc'); // 12 bytes, pooled
  const d = Buffer.from('d');
  const e = Buffer.from('ee');
  const f = Buffer.from('f');
  const g = Buffer.from('gggggggg'); // 8 bytes, timed
  queue.push(a, true, 1);
  queue.push(b, false, 2);
  queue.push(c, true);
  for (const small of [d, e, f]) queue.push(small, false);
  queue.push(g, false, 3);
  assert.equal(queue.queuedBytes, 33);
  const slices = [];
  for (let slice = queue.take(5, 2); slice !== null; slice = queue.take(5, 2)) slices.push(slice);
  assert.deepEqual(slices.map((slice) => slice.pieces.map((piece) => piece.toString())), [
    ['aaaaaaa'], // the rest of a reply within the slice and a join goes whole
    ['bb'], // small, but the next reply is not: that one goes alone
    ['ccccc'], ['ccccccc'],
    ['d', 'ee', 'f'], // small replies share a slice, whole
    ['ggggg'], ['ggg'],
  ]);
  assert.deepEqual(slices.map((slice) => slice.finished), [[a], [], [], [c], [], [], []], 'a pooled buffer is finished with the slice holding its last byte');
  assert.deepEqual(slices.map((slice) => slice.answeredAt), [[1], [2], [], [], [], [], [3]], 'a timed reply ends its reply stage with the slice holding its last byte');
  assert.equal(queue.queuedBytes, 0);
  queue.push(a, true);
  queue.push(b, false);
  assert.deepEqual(queue.take(3, 0)!.finished, []);
  assert.deepEqual(queue.clear(), [a], 'what is cleared gives back its pooled buffers, a partly written one too');
  assert.equal(queue.take(3, 0), null);
});

test('TLS reply slices at the node\'s sizes: 1 MiB reads\' replies are never joined, 4 KiB reads\' are', () => {
  const queue = new ReplyQueue();
  const header = 32;
  for (let index = 0; index < 3; index++) queue.push(Buffer.alloc(MiB + header), true);
  const large = [];
  for (let slice = queue.take(tlsReplySliceBytes, tlsReplyJoinBytes); slice !== null; slice = queue.take(tlsReplySliceBytes, tlsReplyJoinBytes)) large.push(slice);
  assert.ok(large.every((slice) => slice.pieces.length === 1), 'every slice of a large reply is one piece: nothing to copy');
  const slice = tlsReplySliceBytes;
  assert.deepEqual(large.map((one) => one.pieces[0]!.length), Array(3).fill([slice, slice, slice, slice + header]).flat());
  for (let index = 0; index < 100; index++) queue.push(Buffer.alloc(4096 + header), true);
  const small = [];
  for (let one = queue.take(tlsReplySliceBytes, tlsReplyJoinBytes); one !== null; one = queue.take(tlsReplySliceBytes, tlsReplyJoinBytes)) small.push(one);
  const perSlice = Math.floor(tlsReplySliceBytes / (4096 + header));
  assert.deepEqual(small.map((one) => one.pieces.length), [perSlice, 100 - perSlice]);
});

test('decrypted TLS reads land in the buffers the reader picks (onread for a TLS socket), on this Node', async (t) => {
  const socketPath = path.join(scratch, 'steer.sock');
  const accepted = Promise.withResolvers<net.Socket>();
  const listener = net.createServer((socket) => accepted.resolve(socket));
  await new Promise<void>((resolve) => listener.listen(socketPath, resolve));
  t.onTestFinished(() => { listener.close(); });
  const client = tls.connect({ path: socketPath, ca: fs.readFileSync(path.join(creds, 'ca-cert.pem')), servername: 'localhost' });
  client.on('error', () => {});
  t.onTestFinished(() => { client.destroy(); });
  const secure = new tls.TLSSocket(await accepted.promise, { isServer: true, secureContext: tlsSettings(loadTlsServerConfig(creds, 'on', false)).secureContext });
  const landing = Buffer.alloc(1000);
  let windowStart = 0;
  const received: Buffer[] = [];
  assert.ok(steerTlsReads(secure, {
    // Windows of 7 bytes: records larger than a window are cut across several.
    nextReadBuffer: () => landing.subarray(windowStart, windowStart + 7),
    onRead: (count, buffer) => {
      assert.equal(buffer.buffer, landing.buffer, 'the bytes landed in the reader\'s buffer');
      received.push(Buffer.from(buffer.subarray(0, count)));
      windowStart += count;
    },
  }), 'this Node has the fields onread sets: the TLS fast path is in use');
  secure.on('data', () => assert.fail('no data event once steered'));
  client.write('hello over TLS, ');
  client.write('in two records');
  while (Buffer.concat(received).length < 30) await sleep(5);
  assert.equal(Buffer.concat(received).toString(), 'hello over TLS, in two records');
  assert.ok(received.every((piece) => piece.length <= 7));
  secure.destroy();
});

test('over TLS, WRITE payloads in pieces of any size land whole and large READs come back whole, in Node and shared buffers', async (t) => {
  const writes = [
    { offsetBytes: 0, data: pattern(MiB + 17, 1) },
    { offsetBytes: 2 * MiB, data: pattern(100, 2) },
    { offsetBytes: 2 * MiB + 4096, data: pattern(65536 + 1, 3) },
    { offsetBytes: 3 * MiB + 8192, data: pattern(300000, 5) },
  ];
  const pieceSizes = [1, 27, 4096, 16384, 16385, 65536, 70000, 300000, 13];
  for (const sharedBuffers of [null, new SharedBufferPool()]) {
    const socketPath = path.join(scratch, 'data.sock');
    const server = new NbdServer({ provider: provider(), log: () => {}, sharedBuffers, tls: tlsSettings(loadTlsServerConfig(creds, 'require', false)) });
    await server.listenUnix(socketPath);
    t.onTestFinished(() => server.close());
    const client = await RawClient.connect(socketPath);
    await client.handshake({ tls: { ca: fs.readFileSync(path.join(creds, 'ca-cert.pem')), servername: 'localhost' } });
    await writeInPieces(client, writes, pieceSizes);
    for (const _ of writes) assert.equal(replyError([await client.readReply()]), 0);
    // Reads sent together, their replies (over a MiB in all) queued and written in slices; then DISC at once:
    // every reply still arrives before the connection closes.
    for (const [index, write] of writes.entries()) client.send({ type: nbd.NBD_CMD_READ, handle: BigInt(100 + index), offsetBytes: write.offsetBytes, lengthBytes: write.data.length });
    client.send({ type: nbd.NBD_CMD_DISC, handle: 999n });
    const replies = [];
    for (const _ of writes) replies.push(await client.readReply());
    for (const [index, write] of writes.entries()) {
      const reply = replies.filter((one) => one.handle === BigInt(100 + index));
      assert.ok(readData(reply, write.offsetBytes, write.data.length).equals(write.data), `write ${index} (${write.data.length} bytes) reads back over TLS`);
    }
    assert.ok(await client.waitClosed(10_000), 'DISC closes once the replies are out');
    await server.close();
  }
});

function pattern(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.allocUnsafe(lengthBytes);
  for (let index = 0; index < lengthBytes; index += 1) data[index] = (index * 31 + seed) & 0xff;
  return data;
}
