// The poll for a client's next request (nbd/idle-poll.ts): the back-off policy alone, the socket probe on a real
// unix socket, and the NBD server with polling on: a client in another process (qemu-io) is caught by the polls,
// one in this process (which cannot send while the poll holds the event loop) costs only the back-off's few misses.
import { test } from 'vitest';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { IdlePollPolicy, claimTurnPoll, emptyIdlePollCounters, idlePollBackoffMax, pollReadable, threadPolls, turnPollsMax } from '../../src/nbd/idle-poll.ts';
import { descriptorOf } from '../../src/nbd/steered-socket.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import * as nbd from '../../src/nbd/protocol.ts';
import { MemoryProvider } from './helpers/memory-device.ts';
import { RawClient, encodeClientFlags, encodeInfoRequestData, encodeOptionMessage, encodeRequestMessage, readData } from './helpers/nbd-raw-client.ts';
import { BufferPool } from '../../src/nbd/buffer-pool.ts';
import { Receiver, type RequestSink } from '../../src/nbd/receiver.ts';
import { ForwardingDevice, doneNow, type DeviceProvider } from '../../src/core/block-device.ts';

const run = promisify(execFile);
const MiB = 1 << 20;
const qemuIo = ['/usr/bin/qemu-io', '/usr/local/bin/qemu-io'].find((candidate) => existsSync(candidate)) ?? null;

test('the policy polls every wait while polls hit, and backs off 1, 2, 4, ... waits after misses, up to its bound', () => {
  const policy = new IdlePollPolicy();
  for (let wait = 0; wait < 5; wait++) {
    assert.equal(policy.shouldPoll(), true);
    policy.hit();
  }
  // Every poll misses from here: the waits polled, counted from 0.
  const polled: number[] = [];
  for (let wait = 0; wait < 300; wait++) {
    if (!policy.shouldPoll()) continue;
    polled.push(wait);
    policy.missed();
  }
  assert.deepEqual(polled, [0, 2, 5, 10, 19, 36, 69, 134, 199, 264]);
  assert.equal(polled.at(-1)! - polled.at(-2)!, idlePollBackoffMax + 1, 'the skips stop growing at the bound');
  // A hit ends the back-off: after the next miss only one wait is skipped.
  while (!policy.shouldPoll());
  policy.hit();
  assert.equal(policy.shouldPoll(), true);
  policy.missed();
  assert.deepEqual([policy.shouldPoll(), policy.shouldPoll()], [false, true]);
});

test('polls in one turn of the event loop: one connection\'s, at most turnPollsMax; the next turn is anyone\'s', async () => {
  const first = {};
  const second = {};
  await new Promise((done) => setImmediate(done)); // a turn no test polled in
  let claims = 0;
  while (claimTurnPoll(first) && claims <= turnPollsMax) claims += 1;
  assert.equal(claims, turnPollsMax);
  assert.equal(claimTurnPoll(second), false, 'another connection waits for the next turn');
  await new Promise((done) => setImmediate(done));
  assert.equal(claimTurnPoll(second), true);
  assert.equal(claimTurnPoll(first), false);
});

async function socketPair(t: { onTestFinished(fn: () => Promise<void> | void): void }): Promise<{ client: net.Socket; accepted: net.Socket }> {
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'chunkd-poll-'));
  const socketPath = path.join(directory, 'poll.sock');
  const { promise: acceptedPromise, resolve } = Promise.withResolvers<net.Socket>();
  // pauseOnConnect: the accepted socket reads nothing, so what the client sends stays in the kernel for the probe.
  const server = net.createServer({ pauseOnConnect: true }, resolve);
  await new Promise<void>((done) => server.listen(socketPath, done));
  const client = net.connect(socketPath);
  await new Promise<void>((done) => client.once('connect', () => done()));
  const accepted = await acceptedPromise;
  t.onTestFinished(async () => {
    client.destroy();
    accepted.destroy();
    await new Promise<void>((done) => server.close(() => done()));
    await fs.rm(directory, { recursive: true, force: true });
  });
  return { client, accepted };
}

test('pollReadable: false after the poll time when nothing came, true at once for bytes or the peer\'s end', async (t) => {
  const { client, accepted } = await socketPair(t);
  const fd = descriptorOf(accepted);
  assert.ok(fd !== null, 'the accepted socket has a descriptor');
  const counters = emptyIdlePollCounters();
  const started = performance.now();
  assert.equal(pollReadable(fd, 2000, counters), false);
  assert.ok(performance.now() - started >= 2, 'a miss polls the whole time');
  assert.deepEqual([counters.hits, counters.misses], [0, 1]);
  assert.ok(counters.microseconds >= 2000);

  client.write(Buffer.from('x'));
  await new Promise((done) => setTimeout(done, 50)); // the byte reaches the kernel's queue of the accepted end
  assert.equal(pollReadable(fd, 1_000_000, counters), true);
  assert.equal(pollReadable(fd, 1_000_000, counters), true, 'a peek leaves the byte to be read');
  assert.deepEqual([counters.hits, counters.misses], [2, 1]);
  assert.ok(counters.microseconds < 500_000, 'hits end at once, not after the (1 s) poll time');

  const ended = await socketPair(t);
  ended.client.end();
  await new Promise((done) => setTimeout(done, 50));
  assert.equal(pollReadable(descriptorOf(ended.accepted)!, 1_000_000, counters), true, 'the end of the stream is something to read');
});

/** `cached`: the device's reads finish before they return (cachedReads, below). */
async function serve(t: { onTestFinished(fn: () => Promise<void> | void): void }, pollUs: number, cached = false): Promise<{ server: NbdServer; socketPath: string; provider: MemoryProvider }> {
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'chunkd-poll-nbd-'));
  const socketPath = path.join(directory, 'nbd.sock');
  const provider = new MemoryProvider();
  provider.add('mem', 4 * MiB);
  const server = new NbdServer({ provider: cached ? cachedReads(provider) : provider, pollUs });
  await server.listenUnix(socketPath);
  t.onTestFinished(async () => {
    await server.close();
    await fs.rm(directory, { recursive: true, force: true });
  });
  return { server, socketPath, provider };
}

test('a client in this process, which cannot send while a poll holds the loop: a few misses, every reply right', async (t) => {
  const { server, socketPath } = await serve(t, 500);
  const client = await RawClient.connect(socketPath);
  t.onTestFinished(() => client.close());
  await client.handshake();
  const data = Buffer.alloc(4096, 0x5a);
  let handle = 0n;
  for (let index = 0; index < 200; index++) {
    const offsetBytes = (index % 64) * 4096;
    if (index < 64) await client.call({ type: nbd.NBD_CMD_WRITE, handle: (handle += 1n), offsetBytes }, data);
    else assert.deepEqual(readData(await client.call({ type: nbd.NBD_CMD_READ, handle: (handle += 1n), offsetBytes, lengthBytes: 4096 }), offsetBytes, 4096), data);
  }
  const { idlePoll } = server.stats();
  assert.equal(idlePoll.hits, 0, 'nothing can arrive while this process polls');
  // 201 idle waits (the GO's reply is wait 0): polls at waits 0, 2, 5, 10, 19, 36, 69, 134, 199 (skipping 1, 2,
  // 4, ... 64 after each miss): 9 misses where a poll at every wait would be 201.
  assert.ok(idlePoll.misses >= 5 && idlePoll.misses <= 10, `misses bounded by the back-off: ${idlePoll.misses}`);
});

test('qemu-io in another process at queue depth 1: its requests are caught by the polls, and read back right', { skip: qemuIo === null }, async (t) => {
  const { server, socketPath, provider } = await serve(t, 1000);
  const commands = ['-c', 'write -P 0x3c 0 256k'];
  for (let index = 0; index < 64; index++) commands.push('-c', `read -P 0x3c ${index * 4096} 4k`);
  const { stdout } = await run(qemuIo!, ['-f', 'raw', `nbd+unix:///mem?socket=${socketPath}`, ...commands]);
  assert.doesNotMatch(stdout, /Pattern verification failed|error|failed/i, stdout);
  assert.ok(provider.exports.get('mem')!.disk.data.subarray(0, 256 * 1024).every((byte) => byte === 0x3c));
  // Usually nearly every request is a hit (59-65 of 65 here at a load of 5); on a loaded machine qemu-io may not
  // be scheduled within the millisecond, so the test asks for one.
  const { idlePoll } = server.stats();
  assert.ok(idlePoll.hits >= 1, `qemu-io's next requests arrive within the polls: ${JSON.stringify(idlePoll)}`);
});

test('polling off (0): no polls', async (t) => {
  const { server, socketPath } = await serve(t, 0);
  const client = await RawClient.connect(socketPath);
  t.onTestFinished(() => client.close());
  await client.handshake();
  for (let index = 0; index < 20; index++) await client.call({ type: nbd.NBD_CMD_READ, handle: BigInt(index + 1), offsetBytes: 0, lengthBytes: 4096 });
  assert.deepEqual(server.stats().idlePoll, { hits: 0, misses: 0, microseconds: 0 });
});

test('no poll while another connection on the thread has a request in flight; the count of requests in flight comes back to 0 when a client leaves mid-request', async (t) => {
  const { server, socketPath, provider } = await serve(t, 500);
  provider.latencyMs = (op, offsetBytes) => (op === 'read' && offsetBytes === MiB ? 1000 : 0);
  const held = await RawClient.connect(socketPath);
  const busy = await RawClient.connect(socketPath);
  t.onTestFinished(() => {
    held.close();
    busy.close();
  });
  await held.handshake();
  await busy.handshake();
  const before = server.stats().idlePoll;
  held.send({ type: nbd.NBD_CMD_READ, handle: 1n, offsetBytes: MiB, lengthBytes: 4096 });
  while (threadPolls.requestsInFlight === 0) await new Promise((done) => setTimeout(done, 1));
  for (let index = 0; index < 20; index++) await busy.call({ type: nbd.NBD_CMD_READ, handle: BigInt(index + 1), offsetBytes: 0, lengthBytes: 4096 });
  assert.deepEqual(server.stats().idlePoll, before, 'the held READ in flight on the thread: no poll');
  held.close(); // leaves with its READ in flight: the count comes back when the device answers
  const deadline = Date.now() + 30_000;
  while (threadPolls.requestsInFlight !== 0 && Date.now() < deadline) await new Promise((done) => setTimeout(done, 10));
  assert.equal(threadPolls.requestsInFlight, 0);
});

for (const cached of [false, true]) {
  const device = cached ? 'a device whose reads finish at once (one take runs all eight, one after another)' : 'a device whose reads finish later';
  test(`no poll for a client that keeps several requests in flight (queue depth 2 and more), over ${device}`, async (t) => {
    const { server, socketPath } = await serve(t, 500, cached);
    const client = await RawClient.connect(socketPath);
    t.onTestFinished(() => client.close());
    await client.handshake();
    const before = server.stats().idlePoll;
    let handle = 0n;
    for (let round = 0; round < 30; round++) {
      // Eight requests sent together, in one write, then all their replies read: the next eight wait for the last.
      const batch: Buffer[] = [];
      for (let index = 0; index < 8; index++) batch.push(encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: (handle += 1n), offsetBytes: index * 4096, lengthBytes: 4096 }));
      client.write(Buffer.concat(batch));
      for (let index = 0; index < 8; index++) await client.readWholeReply();
    }
    assert.deepEqual(server.stats().idlePoll, before, 'several requests in flight at once: no poll');
  });
}

const noSink: RequestSink = {
  mayTakeRequest: () => true,
  onRequest: () => {},
  onPayload: () => {},
};

test('readNow: bytes read between requests land past the buffer the event loop reads into next, and both arrive whole, in order', () => {
  const receiver = new Receiver(new BufferPool(MiB), false, () => {});
  receiver.startTransmission();
  const first = encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: 1n, offsetBytes: 0, lengthBytes: 4096 });
  const second = encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: 2n, offsetBytes: 4096, lengthBytes: 4096 });
  const loopBuffer = receiver.nextReadBuffer(); // what the event loop's next read of the socket lands in
  let given: Buffer | null = null;
  assert.equal(receiver.readNow((target) => {
    given = target;
    return first.copy(target);
  }), true);
  const start = (view: Buffer): number => view.byteOffset;
  assert.ok(given !== null && (start(given) >= start(loopBuffer) + loopBuffer.length || start(given) + first.length <= start(loopBuffer)), 'the read now does not land in the event loop\'s buffer');
  // The event loop's read lands before the first request is taken.
  receiver.onRead(second.copy(loopBuffer), loopBuffer);
  const handles: bigint[] = [];
  receiver.takeRequests({ ...noSink, onRequest: (request) => handles.push(request.handle) });
  assert.deepEqual(handles, [1n, 2n]);
});

test('readNow: nothing is read while bytes wait, a payload is expected, or a view of the arena is lent', () => {
  let calls = 0;
  const receive = (target: Buffer): number => {
    calls += 1;
    return encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: 9n, lengthBytes: 4096 }).copy(target);
  };
  // Half a request waits.
  const receiver = new Receiver(new BufferPool(MiB), false, () => {});
  receiver.startTransmission();
  const loopBuffer = receiver.nextReadBuffer();
  receiver.onRead(encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: 1n, lengthBytes: 4096 }).copy(loopBuffer, 0, 0, 10), loopBuffer);
  assert.equal(receiver.readNow(receive), false);

  // A WRITE whose payload has not come: the next bytes are the payload.
  const writing = new Receiver(new BufferPool(MiB), false, () => {});
  writing.startTransmission();
  const header = encodeRequestMessage({ type: nbd.NBD_CMD_WRITE, handle: 2n, lengthBytes: 4096 });
  const buffer = writing.nextReadBuffer();
  writing.onRead(header.copy(buffer), buffer);
  writing.takeRequests({ ...noSink, onRequest: (request) => writing.expectPayload(request) });
  assert.equal(writing.readNow(receive), false);
  assert.equal(calls, 0);

  // Read now: a small WRITE, whose payload goes to the device as a view of the arena; then nothing more is read
  // now, and the payload stays as it was.
  const payloads: Buffer[] = [];
  const lending = new Receiver(new BufferPool(MiB), false, () => {});
  lending.startTransmission();
  lending.nextReadBuffer();
  assert.equal(lending.readNow((target) => encodeRequestMessage({ type: nbd.NBD_CMD_WRITE, handle: 3n, lengthBytes: 4096 }, Buffer.alloc(4096, 9)).copy(target)), true);
  lending.takeRequests({ ...noSink, onRequest: (request) => lending.expectPayload(request), onPayload: (_request, payload) => payloads.push(payload) });
  assert.equal(payloads.length, 1);
  assert.equal(lending.readNow((target) => target.fill(0xee).length), false);
  assert.ok(payloads[0]!.every((byte) => byte === 9), 'the payload lent to the device is as it was');
});

/**
 * Reads done before they return (doneNow), as a volume's are from the page cache: each reply is written in the
 * callback that read its request, and the idle wait that follows reads the next.
 */
function cachedReads(provider: MemoryProvider, openDelayMs = 0): DeviceProvider {
  return {
    list: () => provider.list(),
    open: async (name) => {
      const device = await provider.open(name);
      if (openDelayMs > 0) await new Promise((resolve) => setTimeout(resolve, openDelayMs));
      const disk = provider.exports.get(name)!.disk;
      return new (class extends ForwardingDevice {
        override read(offsetBytes: number, target: Buffer): Promise<void> {
          disk.data.copy(target, 0, offsetBytes, offsetBytes + target.length);
          return doneNow;
        }
      })(device);
    },
  };
}

test('reads answered at once are still answered before a DISC sent with them, and before the end of a stream that came during a slow open', async (t) => {
  // The bytes a client gets back until the server closes, over a device whose reads finish later and one whose
  // reads finish at once (their replies held until the take ends: a DISC or the client's end in the same take
  // must not close the connection first, nor drop the requests queued behind).
  const bytesBack = async (cached: boolean, exchange: (client: RawClient) => Promise<void>): Promise<number> => {
    const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'chunkd-poll-nbd-'));
    const socketPath = path.join(directory, 'nbd.sock');
    const provider = new MemoryProvider();
    provider.add('mem', 4 * MiB);
    const server = new NbdServer({ provider: cached ? cachedReads(provider, 100) : provider, pollUs: 0 });
    await server.listenUnix(socketPath);
    const client = await RawClient.connect(socketPath);
    try {
      await exchange(client);
      assert.equal(await client.waitClosed(10_000), true, 'the server closed the connection');
      return client.buffered;
    } finally {
      client.close();
      await server.close();
      await fs.rm(directory, { recursive: true, force: true });
    }
  };
  const readThenDisc = async (client: RawClient): Promise<void> => {
    await client.handshake({ structured: false });
    client.write(Buffer.concat([encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: 1n, offsetBytes: 0, lengthBytes: 4096 }), encodeRequestMessage({ type: nbd.NBD_CMD_DISC, handle: 2n })]));
  };
  assert.equal(await bytesBack(false, readThenDisc), 16 + 4096);
  assert.equal(await bytesBack(true, readThenDisc), 16 + 4096, 'the READ before the DISC answered');
  const goTwoReadsEnd = async (client: RawClient): Promise<void> => {
    await client.readGreeting();
    client.write(encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES));
    client.socket.end(
      Buffer.concat([
        encodeOptionMessage(nbd.NBD_OPT_GO, encodeInfoRequestData('mem', [])),
        encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: 1n, offsetBytes: 0, lengthBytes: 4096 }),
        encodeRequestMessage({ type: nbd.NBD_CMD_READ, handle: 2n, offsetBytes: 4096, lengthBytes: 4096 }),
      ]),
    );
  };
  const later = await bytesBack(false, goTwoReadsEnd);
  assert.ok(later > 2 * (16 + 4096), `the GO's replies and both READs' (${later} bytes)`);
  assert.equal(await bytesBack(true, goTwoReadsEnd), later, 'both READs answered before the close');
});

test('qemu-io at queue depth 1 over a device that answers cached reads at once: writes and reads of distinct patterns, requests read by the idle waits', { skip: qemuIo === null }, async (t) => {
  const { server, socketPath, provider } = await serve(t, 1000, true);
  // Blocks of distinct patterns, read (no WRITE payload has been lent yet, so the idle waits read requests), then
  // written with new ones and read again.
  const disk = provider.exports.get('mem')!.disk;
  for (let index = 0; index < 32; index++) disk.data.fill(index + 101, index * 4096, (index + 1) * 4096);
  const commands: string[] = [];
  for (let round = 0; round < 2; round++) {
    for (let index = 0; index < 32; index++) commands.push('-c', `read -P ${index + 101} ${index * 4096} 4k`);
  }
  for (let index = 0; index < 32; index++) commands.push('-c', `write -P ${index + 1} ${index * 4096} 4k`);
  for (let index = 0; index < 32; index++) commands.push('-c', `read -P ${index + 1} ${index * 4096} 4k`);
  const readsBefore = threadPolls.readsNow;
  const { stdout } = await run(qemuIo!, ['-f', 'raw', `nbd+unix:///mem?socket=${socketPath}`, ...commands]);
  assert.doesNotMatch(stdout, /Pattern verification failed|error|failed/i, stdout);
  for (let index = 0; index < 32; index++) {
    assert.ok(disk.data.subarray(index * 4096, (index + 1) * 4096).every((byte) => byte === index + 1), `block ${index}`);
  }
  // As above, a loaded machine may schedule qemu-io late; one request read by an idle wait is asked for.
  const { idlePoll } = server.stats();
  assert.ok(threadPolls.readsNow - readsBefore >= 1, `requests read by the idle waits: ${threadPolls.readsNow - readsBefore}, polls ${JSON.stringify(idlePoll)}`);
});
