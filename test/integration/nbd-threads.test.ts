// NBD protocol threads (serve --nbd-threads): several threads listen on one TCP port and serve their own
// connections, the main thread keeps the metadata. Real clients over TCP: qemu-io patterns, nbdinfo, fio with
// four connections verifying crc32c; a FLUSH on one connection covers writes acknowledged on others, across a
// kill -9; malformed input on one connection leaves the others served; status counts the threads' requests.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { helperNiceBelow, processThreads } from '../../src/core/thread-priority.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';
import { chunkdBin, makeTempDir, mustRun, nodeBinary, startNode, type RunningNode } from '../helpers/node-process.ts';

const MiB = 1024 * 1024;
let scratch: string;
let node: RunningNode;
const tcpUri = (exportName: string): string => `nbd://127.0.0.1:${node.tcpPort}/${exportName}`;

beforeAll(async () => {
  scratch = makeTempDir('nbd-threads');
  node = await startNode(path.join(scratch, 'pool'), ['--default-volume', 'vol:256MiB', '--nbd-threads', '2']);
});

afterAll(async () => {
  if (node.process.exitCode === null) assert.equal(await node.stop(), 0);
  const fsck = await node.cli('fsck', '--pool', node.pool);
  assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('two threads listen on the node port; qemu-io and nbdinfo work through them', async () => {
  assert.equal((node.stderr().match(/nbd thread \d: nbd: listening on 127\.0\.0\.1:(\d+)/g) ?? []).length, 2, node.stderr());
  const output = await mustRun('qemu-io', ['-f', 'raw', tcpUri('vol'), '-c', 'write -P 0x5c 1M 3M', '-c', 'read -P 0x5c 1M 3M', '-c', 'write -P 0x11 4097 100', '-c', 'read -P 0x11 4097 100', '-c', 'read -P 0 4197 1000']);
  assert.doesNotMatch(output, /fail/i);
  const info = JSON.parse(await mustRun('nbdinfo', ['--json', tcpUri('vol')]));
  assert.equal(info.exports[0]['export-size'], 256 * MiB);
  assert.match(await mustRun('nbdinfo', ['--list', `nbd://127.0.0.1:${node.tcpPort}`]), /export="vol"/);
});

test('fio, four connections at once, random reads and writes verified with crc32c', async () => {
  const output = await mustRun('fio', ['--ioengine=nbd', `--uri=${tcpUri('vol')}`, '--name=mc', '--rw=randrw', '--bs=4k', '--iodepth=8', '--numjobs=4',
    '--size=32M', '--offset_increment=32M', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--group_reporting', '--verify_state_save=0'], { timeoutMs: 300_000 });
  assert.match(output, /err= 0/);
  assert.doesNotMatch(output, /verify: bad/);
  const status = JSON.parse((await node.cli('status', '--json')).stdout);
  assert.equal(status.nbd.threads, 2);
  assert.ok(status.nbd.requestsTotal > 4 * 8192, `requests counted across threads: ${status.nbd.requestsTotal}`);
});

test('the helper threads run below the event loop (libuv\'s pool, chunk I/O, the chunk writer); the NBD threads and V8\'s at its priority', async () => {
  // After the fio test: every thread has started and served by now.
  const threads = processThreads(node.process.pid!);
  const described = threads.map((thread) => `${thread.name}:${thread.nice}`).join(' ');
  const nicesOf = (name: string): number[] => threads.filter((thread) => thread.name === name).map((thread) => thread.nice);
  assert.equal(threads.find((thread) => thread.id === node.process.pid)?.nice, 0, described);
  // A node started at nice 0: its helpers at helperNiceBelow (10).
  assert.deepEqual(nicesOf('libuv-worker'), Array(16).fill(helperNiceBelow), described);
  // piscina's chunk I/O workers keep Node's name for a worker thread; chunkd's own threads are named.
  assert.ok(nicesOf('WorkerThread').length >= 1 && nicesOf('WorkerThread').every((nice) => nice === helperNiceBelow), described);
  assert.deepEqual(nicesOf('chunkd-writer'), [helperNiceBelow], described);
  assert.deepEqual(nicesOf('chunkd-nbd'), [0, 0], described);
  assert.ok(nicesOf('V8Worker').length >= 1 && nicesOf('V8Worker').every((nice) => nice === 0), described);
});

test('a node started at nice 5 keeps its helper threads 10 below its event loop (at 15), and the rest at 5', async () => {
  const started = await startNode(path.join(scratch, 'pool-niced'), ['--default-volume', 'vol:64MiB', '--nbd-threads', '1'], { launcher: { command: 'nice', prefix: ['-n', '5', nodeBinary, chunkdBin] } });
  try {
    // A write through the main thread (the unix socket), so that the chunk writer has started.
    const client = await TestNbdClient.connect(started.nbdSocket, 'vol');
    await client.write(0, crypto.randomBytes(4096));
    await client.disconnect();
    // A worker thread has its name before its module has loaded and set its value: wait until none is left at 5.
    const helpers = new Set(['libuv-worker', 'WorkerThread', 'chunkd-writer']);
    let threads = processThreads(started.process.pid!);
    for (const deadline = Date.now() + 10_000; Date.now() < deadline && threads.some((thread) => helpers.has(thread.name) && thread.nice === 5); ) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      threads = processThreads(started.process.pid!);
    }
    const described = threads.map((thread) => `${thread.name}:${thread.nice}`).join(' ');
    const nicesOf = (name: string): number[] => threads.filter((thread) => thread.name === name).map((thread) => thread.nice);
    assert.equal(threads.find((thread) => thread.id === started.process.pid)?.nice, 5, described);
    assert.deepEqual(nicesOf('libuv-worker'), Array(16).fill(15), described);
    assert.ok(nicesOf('WorkerThread').length >= 1 && nicesOf('WorkerThread').every((nice) => nice === 15), described);
    assert.deepEqual(nicesOf('chunkd-writer'), [15], described);
    assert.deepEqual(nicesOf('chunkd-nbd'), [5], described);
    assert.ok(nicesOf('V8Worker').every((nice) => nice === 5), described);
  } finally {
    await started.stop();
  }
});

test('garbage on one connection closes it only; the others go on', async () => {
  const client = await TestNbdClient.connect(node.tcpPort, 'vol');
  const garbage = net.connect(node.tcpPort, '127.0.0.1');
  await new Promise<void>((resolve) => garbage.once('connect', () => resolve()));
  garbage.resume(); // read the greeting, so that the close is seen
  garbage.end(Buffer.alloc(4096, 0xee));
  await new Promise<void>((resolve) => garbage.once('close', () => resolve()));
  const data = crypto.randomBytes(64 * 1024);
  await client.write(200 * MiB, data);
  assert.ok((await client.read(200 * MiB, data.length)).equals(data));
  await client.disconnect();
});

test('a FLUSH on one connection makes writes acknowledged on the others durable, across kill -9', async () => {
  const writers = await Promise.all([0, 1, 2, 3].map(() => TestNbdClient.connect(node.tcpPort, 'vol')));
  const flusher = await TestNbdClient.connect(node.tcpPort, 'vol');
  const written = await Promise.all(writers.map(async (client, i) => {
    const data = crypto.randomBytes(256 * 1024);
    await client.write(100 * MiB + i * 8 * MiB, data);
    return data;
  }));
  await flusher.flush();
  await node.kill();
  for (const client of [...writers, flusher]) client.close();
  node = await startNode(node.pool, ['--nbd-threads', '2']);
  const reader = await TestNbdClient.connect(node.tcpPort, 'vol');
  for (const [i, data] of written.entries()) assert.ok((await reader.read(100 * MiB + i * 8 * MiB, data.length)).equals(data), `connection ${i}'s write`);
  await reader.disconnect();
});
