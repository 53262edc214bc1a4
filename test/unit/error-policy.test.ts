// The one error policy (src/core/fail-stop.ts) at each front end: a ChunkdError or a system error is an error
// reply and the node serves on; bad client input gets an error and never reaches a bug's path; a bug (here a
// TypeError) reaches the fail-stop hook, on the main thread and on an NBD protocol thread alike, and never
// becomes an unhandled rejection. The hook is replaced so that the test runner survives what would stop a node.
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test, type TestContext } from 'vitest';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { DockerPluginServer, type PluginBackend } from '../../src/api/docker-plugin.ts';
import { ApiServer, type ControlPlane } from '../../src/api/server.ts';
import type { BlockDevice, DeviceProvider } from '../../src/core/block-device.ts';
import { ChunkdError } from '../../src/core/errors.ts';
import { setFailStopHook } from '../../src/core/fail-stop.ts';
import * as nbd from '../../src/nbd/protocol.ts';
import type { DeviceCall, DeviceResult } from '../../src/nbd/remote-device.ts';
import { DeviceHost } from '../../src/node/device-host.ts';
import { NbdThreads } from '../../src/node/nbd-threads.ts';
import { MemoryProvider } from './helpers/memory-device.ts';
import { RawClient, encodeClientFlags, encodeInfoRequestData, encodeOptionMessage } from './helpers/nbd-raw-client.ts';

/** Records fail-stops instead of stopping, and fails the test on any unhandled rejection, until it ends. */
function observeFailures(t: TestContext): { bugs: Array<{ error: unknown; where: string }>; rejections: unknown[] } {
  const bugs: Array<{ error: unknown; where: string }> = [];
  const rejections: unknown[] = [];
  const onRejection = (reason: unknown): void => {
    rejections.push(reason);
  };
  setFailStopHook((error, where) => bugs.push({ error, where }));
  process.on('unhandledRejection', onRejection);
  t.onTestFinished(() => {
    setFailStopHook(null);
    process.off('unhandledRejection', onRejection);
  });
  return { bugs, rejections };
}

async function eventually(condition: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** A device whose write fails with `writeError` (a rejection) and whose other verbs succeed. */
function faultyDevice(name: string, writeError: () => unknown): BlockDevice {
  return {
    name, sizeBytes: 1 << 20, readOnly: false,
    read: async () => {},
    write: async () => {
      throw writeError();
    },
    trim: async () => {}, writeZeroes: async () => {}, flush: async () => {},
    blockStatus: async () => [{ lengthBytes: 4096, hole: true, zero: true }],
    close: async () => {},
  };
}

/** Sends a batch of calls to a DeviceHost through its port and waits for the results of all of them. */
async function callHost(port: MessagePort, calls: DeviceCall[]): Promise<Map<number, DeviceResult>> {
  const results = new Map<number, DeviceResult>();
  const done = new Promise<void>((resolve) => {
    const onMessage = (batch: DeviceResult[]): void => {
      for (const result of batch) results.set(result.id, result);
      if (calls.every((call) => results.has(call.id))) {
        port.off('message', onMessage);
        resolve();
      }
    };
    port.on('message', onMessage);
  });
  port.postMessage(calls);
  await done;
  return results;
}

test('DeviceHost: a system error is answered EIO, a bug reaches the fail-stop hook, nothing is an unhandled rejection', async (t) => {
  const { bugs, rejections } = observeFailures(t);
  const provider: DeviceProvider = {
    open: async (name) => faultyDevice(name, name === 'eio'
      ? () => Object.assign(new Error('write failed'), { code: 'EIO' })
      : () => new TypeError('a bug in a device')),
    list: () => [],
  };
  const channel = new MessageChannel();
  const host = new DeviceHost(provider, channel.port1);
  t.onTestFinished(async () => {
    channel.port2.close();
    await host.closeAll();
  });
  const opened = await callHost(channel.port2, [{ id: 1, op: 'open', name: 'eio' }, { id: 2, op: 'open', name: 'bug' }]);
  const handle = (id: number): number => {
    const result = opened.get(id)!;
    assert.ok(result.ok);
    return (result.value as { handle: number }).handle;
  };
  const bytes = { memory: new SharedArrayBuffer(4096), byteOffset: 0, lengthBytes: 4096 };
  const eio = await callHost(channel.port2, [{ id: 3, op: 'write', handle: handle(1), offsetBytes: 0, bytes, fua: false }]);
  assert.deepEqual({ ...eio.get(3), message: undefined }, { id: 3, ok: false, code: 'EIO', message: undefined });
  assert.equal(bugs.length, 0, 'a system error is not a bug');

  const bug = await callHost(channel.port2, [{ id: 4, op: 'write', handle: handle(2), offsetBytes: 0, bytes, fua: false }]);
  assert.equal(bugs.length, 1, 'the bug reached the fail-stop hook');
  assert.ok(bugs[0]!.error instanceof TypeError);
  assert.match(bugs[0]!.where, /write for an NBD thread/);
  // Only because the hook returned (a node would be gone): the call is answered, so the thread is not left waiting.
  assert.equal(bug.get(4)!.ok, false);
  // A call the thread got wrong (no such handle) is a ChunkdError: answered, not a bug.
  const unknown = await callHost(channel.port2, [{ id: 5, op: 'flush', handle: 99 }]);
  assert.deepEqual({ ...unknown.get(5), message: undefined }, { id: 5, ok: false, code: 'EINVAL', message: undefined });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(rejections, []);
  assert.equal(bugs.length, 1);
});

test('NBD threads: a bug on a protocol thread stops the node, not just the thread', { timeout: 30_000 }, async (t) => {
  const { bugs, rejections } = observeFailures(t);
  const memory = new MemoryProvider();
  memory.add('good', 1 << 20);
  // A device whose size is not a whole number: the thread's handshake cannot encode it (RangeError: a bug).
  const provider: DeviceProvider = {
    open: async (name) => (name === 'broken' ? { ...faultyDevice(name, () => null), sizeBytes: 1.5 } : memory.open(name)),
    list: () => memory.list(),
  };
  const logs: string[] = [];
  const threads = await NbdThreads.start({ count: 1, host: '127.0.0.1', port: 0, provider, log: (line) => logs.push(line) });
  t.onTestFinished(() => threads.stop());
  const port = Number(threads.addresses()[0]!.split(':').at(-1));
  const client = await RawClient.connect({ host: '127.0.0.1', port });
  await client.readGreeting();
  client.write(Buffer.concat([encodeClientFlags(3), encodeOptionMessage(nbd.NBD_OPT_GO, encodeInfoRequestData('broken'))]));
  assert.ok(await client.waitClosed(10_000), 'the thread is gone, and its connection with it');
  await eventually(() => bugs.length > 0, 'the main thread fail-stops');
  assert.match(bugs[0]!.where, /NBD thread 0/);
  assert.match(String(bugs[0]!.error), /ended \(exit code 70\)/);
  assert.equal(threads.threadCount, 0, 'the thread is not started again');
  assert.deepEqual(rejections, []);
});

/** One request over a unix socket: the status and the body parsed as JSON. */
function request(socketPath: string, method: string, urlPath: string, body?: string): Promise<{ status: number; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method, path: urlPath }, (response) => {
      const chunks: Buffer[] = [];
      response.on('data', (chunk: Buffer) => chunks.push(chunk));
      response.on('end', () => resolve({ status: response.statusCode!, json: JSON.parse(Buffer.concat(chunks).toString()) }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** A raw HTTP/1.1 request line that Node's client would refuse to send; the status of the answer. */
async function rawRequest(socketPath: string, requestLine: string): Promise<number> {
  const socket = net.connect({ path: socketPath });
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.end(`${requestLine}\r\nHost: chunkd\r\nConnection: close\r\n\r\n`);
  await new Promise((resolve) => socket.once('close', resolve));
  return Number(/^HTTP\/1\.1 (\d+)/.exec(Buffer.concat(chunks).toString('latin1'))?.[1]);
}

async function tempSocket(t: TestContext, name: string): Promise<string> {
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'chunkd-errors-'));
  t.onTestFinished(() => fs.rm(directory, { recursive: true, force: true }));
  return path.join(directory, name);
}

test('API: bad URLs and bodies are 400 JSON errors; system errors are EIO; a bug reaches the fail-stop hook', async (t) => {
  const { bugs, rejections } = observeFailures(t);
  const control = {
    listVolumes: () => {
      throw new TypeError('a bug in the control plane');
    },
    volumeInfo: (name: string) => {
      if (name === 'broken') throw Object.assign(new Error('stat failed'), { code: 'EIO' });
      throw ChunkdError.notFound(`no volume named ${name}`);
    },
  } as unknown as ControlPlane;
  const api = new ApiServer(control);
  const socketPath = await tempSocket(t, 'api.sock');
  await api.listen(socketPath);
  t.onTestFinished(() => api.close());

  // Malformed percent-encoding in a name: the client's mistake, not an internal error.
  assert.deepEqual(await request(socketPath, 'GET', '/v1/volumes/%E0%A4%A'), { status: 400, json: { error: { code: 'EINVAL', message: 'bad percent-encoding in "%E0%A4%A"' } } });
  assert.equal(await rawRequest(socketPath, 'GET http://[ HTTP/1.1'), 400, 'a request target that is no URL');
  assert.equal((await request(socketPath, 'POST', '/v1/volumes', '[1, 2')).status, 400);
  assert.equal((await request(socketPath, 'GET', '/v1/nothing')).status, 400);
  assert.equal((await request(socketPath, 'GET', '/elsewhere')).status, 404);
  assert.equal((await request(socketPath, 'GET', '/v1/volumes/missing')).status, 404);
  const eio = await request(socketPath, 'GET', '/v1/volumes/broken');
  assert.equal(eio.status, 500);
  assert.equal((eio.json.error as { code: string }).code, 'EIO');
  assert.equal(bugs.length, 0, 'no client input reached a bug');

  const bug = await request(socketPath, 'GET', '/v1/volumes');
  assert.equal(bugs.length, 1);
  assert.ok(bugs[0]!.error instanceof TypeError);
  assert.equal(bug.status, 500, 'answered only because the test hook returned');
  assert.deepEqual(rejections, []);
});

test('Docker plugin: a body that is not JSON is 400, an unknown route 404, a refused request 500, all with Err', async (t) => {
  const { bugs, rejections } = observeFailures(t);
  const backend = {
    listVolumes: () => [],
    clusterVolumes: () => null,
    volumeInfo: (name: string) => {
      throw ChunkdError.notFound(`no volume named ${name}`);
    },
  } as unknown as PluginBackend;
  const socketPath = await tempSocket(t, 'plugin.sock');
  const logs: string[] = [];
  const plugin = new DockerPluginServer(backend, path.dirname(socketPath), (line) => logs.push(line));
  await plugin.listen(socketPath);
  t.onTestFinished(() => plugin.close());

  const notJson = await request(socketPath, 'POST', '/VolumeDriver.Get', '{"Name": ');
  assert.equal(notJson.status, 400);
  assert.match(String(notJson.json.Err), /not a JSON object/);
  const unknown = await request(socketPath, 'POST', '/VolumeDriver.Snapshot', '{}');
  assert.deepEqual(unknown, { status: 404, json: { Err: 'unknown plugin route /VolumeDriver.Snapshot' } });
  assert.equal(await rawRequest(socketPath, 'POST http://[ HTTP/1.1'), 400);
  const missing = await request(socketPath, 'POST', '/VolumeDriver.Get', '{"Name": "nope"}');
  assert.deepEqual(missing, { status: 500, json: { Err: 'no volume named nope' } });
  assert.equal(logs.length, 3, 'each refused request is logged');
  assert.deepEqual(bugs, []);
  assert.deepEqual(rejections, []);
});
