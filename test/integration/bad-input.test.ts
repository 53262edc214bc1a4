// Bad input against a real node: each case gets a clear error or closes only its own connection, and afterwards
// the node still serves other clients and the data written before is intact.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { chunkdBin, makeTempDir, nodeBinary, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';
import { commands, NbdReplyError, TestNbdClient } from '../helpers/nbd-client.ts';

let node: RunningNode;
let scratch: string;
let witness: TestNbdClient;
const witnessData = crypto.randomBytes(256 * 1024);
const MiB = 1024 * 1024;

beforeAll(async () => {
  scratch = makeTempDir('bad');
  node = await startNode(path.join(scratch, 'pool'), ['--default-volume', 'default:64MiB']);
  witness = await TestNbdClient.connect(node.nbdSocket, 'default');
  await witness.write(MiB, witnessData);
  await witness.flush();
});

afterAll(async () => {
  await witness.disconnect();
  assert.equal(await node.stop(), 0);
  fs.rmSync(scratch, { recursive: true, force: true });
});

/** The node still answers, and the witness data is intact. */
async function stillServing(): Promise<void> {
  assert.ok((await witness.read(MiB, witnessData.length)).equals(witnessData));
  const fresh = await TestNbdClient.connect(node.nbdSocket, 'default');
  assert.ok((await fresh.read(MiB, 4096)).equals(witnessData.subarray(0, 4096)));
  await fresh.disconnect();
}

/**
 * Sends raw bytes on a new connection and waits until the server closes it (or `waitMs` passes): 20 s, room for a
 * loaded machine, yet short of the 30 s handshake timeout (a close is the server refusing what it got, not that).
 */
async function sendRaw(bytes: Buffer, waitMs = 20_000): Promise<{ received: Buffer; closedByServer: boolean }> {
  const socket = net.connect(node.nbdSocket);
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.write(bytes);
  const closedByServer = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), waitMs);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(true);
    });
    socket.on('error', () => {});
  });
  socket.destroy();
  return { received: Buffer.concat(chunks), closedByServer };
}

function option(code: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.write('IHAVEOPT', 0, 'latin1');
  header.writeUInt32BE(code, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

test('garbage instead of a handshake closes that connection only', async () => {
  const { closedByServer, received } = await sendRaw(crypto.randomBytes(4096));
  assert.ok(closedByServer);
  assert.equal(received.toString('latin1', 0, 8), 'NBDMAGIC');
  await stillServing();
});

test('a truncated handshake (client flags, then half an option, then silence) leaves the node serving', async () => {
  const socket = net.connect(node.nbdSocket);
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), option(7, Buffer.alloc(64)).subarray(0, 30)]));
  await new Promise((resolve) => setTimeout(resolve, 200));
  socket.destroy();
  await stillServing();
});

test('an unknown option gets NBD_REP_ERR_UNSUP and the handshake goes on', async () => {
  const { received } = await sendRaw(Buffer.concat([Buffer.from([0, 0, 0, 3]), option(0x4242, Buffer.from('x')), option(2)]));
  // 18-byte greeting, then a 20-byte option reply for 0x4242 with type ERR_UNSUP (2^31 + 1).
  assert.equal(received.readUInt32BE(18 + 8), 0x4242);
  assert.equal(received.readUInt32BE(18 + 12), 2 ** 31 + 1);
  await stillServing();
});

test('an unknown command gets EINVAL and the connection keeps working', async () => {
  const client = await TestNbdClient.connect(node.nbdSocket, 'default');
  await assert.rejects(client.request(99, 0, 0, 0), (error: NbdReplyError) => error.errno === 22);
  assert.ok((await client.read(MiB, 4096)).equals(witnessData.subarray(0, 4096)));
  await client.disconnect();
});

test('reads past the end get EINVAL, writes past the end ENOSPC, offsets past 2^63 EINVAL', async () => {
  const client = await TestNbdClient.connect(node.nbdSocket, 'default');
  await assert.rejects(client.read(64 * MiB - 4096, 8192), (error: NbdReplyError) => error.errno === 22);
  await assert.rejects(client.write(64 * MiB - 4096, Buffer.alloc(8192)), (error: NbdReplyError) => error.errno === 28);
  await assert.rejects(client.request(commands.read, 0, 2n ** 64n - 4096n, 4096), (error: NbdReplyError) => error.errno === 22);
  await assert.rejects(client.trim(64 * MiB, 4096), (error: NbdReplyError) => error.errno === 22 || error.errno === 28);
  assert.equal((await client.read(64 * MiB - 4096, 4096)).length, 4096);
  await client.disconnect();
  await stillServing();
});

test('a request longer than the maximum gets an error reply, with bounded memory, and the connection goes on', async () => {
  const client = await TestNbdClient.connect(node.nbdSocket, 'default');
  await assert.rejects(client.read(0, 64 * MiB), (error: NbdReplyError) => error.errno === 22 || error.errno === 75);
  // A 48 MiB write: its payload is read and discarded, then the error comes back.
  const before = (await runTool('ps', ['-o', 'rss=', '-p', String(node.process.pid)])).stdout.trim();
  await assert.rejects(client.write(0, Buffer.alloc(48 * MiB, 7)), (error: NbdReplyError) => error.errno === 22 || error.errno === 75);
  const afterRss = (await runTool('ps', ['-o', 'rss=', '-p', String(node.process.pid)])).stdout.trim();
  assert.ok(Number(afterRss) - Number(before) < 40 * 1024, `node RSS grew from ${before} to ${afterRss} KiB`);
  assert.ok((await client.read(MiB, 4096)).equals(witnessData.subarray(0, 4096)));
  assert.ok((await client.read(0, 4096)).equals(Buffer.alloc(4096)), 'the refused write changed nothing');
  await client.disconnect();
  await stillServing();
});

test('a client that disconnects in the middle of a write payload leaves the node serving', async () => {
  const client = await TestNbdClient.connect(node.nbdSocket, 'default');
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(commands.write, 6);
  header.writeBigUInt64BE(1n, 8);
  header.writeBigUInt64BE(BigInt(4 * MiB), 16);
  header.writeUInt32BE(MiB, 24);
  client.socket.write(Buffer.concat([header, Buffer.alloc(300 * 1024, 9)]));
  await new Promise((resolve) => setTimeout(resolve, 100));
  client.close();
  await new Promise((resolve) => setTimeout(resolve, 100));
  await stillServing();
  // The server sees the close when it gets to it (a loaded machine may take longer than the 100 ms above).
  let open = -1;
  for (const deadline = performance.now() + 30_000; performance.now() < deadline; await new Promise((resolve) => setTimeout(resolve, 100))) {
    open = JSON.parse((await node.cli('status', '--json')).stdout).nbd.connectionsOpen;
    if (open === 1) break;
  }
  assert.equal(open, 1, 'only the witness connection is left');
});

test('100 clients connecting at once are all served', async () => {
  const clients = await Promise.all(Array.from({ length: 100 }, () => TestNbdClient.connect(node.nbdSocket, 'default')));
  const reads = await Promise.all(clients.map((client, i) => client.read(MiB + i * 1024, 1024)));
  reads.forEach((data, i) => assert.ok(data.equals(witnessData.subarray(i * 1024, (i + 1) * 1024))));
  await Promise.all(clients.map((client) => client.disconnect()));
  await stillServing();
});

test('an export that does not exist, or a bad name, is refused in the handshake', async () => {
  await assert.rejects(TestNbdClient.connect(node.nbdSocket, 'missing'), /refused/);
  await assert.rejects(TestNbdClient.connect(node.nbdSocket, '../../etc/passwd'), /refused/);
  await assert.rejects(TestNbdClient.connect(node.nbdSocket, 'default@snap'), /refused/);
  await stillServing();
});

test('invalid volume names are refused by the CLI and by the API with a clear error', async () => {
  for (const bad of ['../x', '.hidden', '-rf', 'a b', 'x'.repeat(65), 'a/b', 'snap@x']) {
    // "--" ends the options, so a name like "-rf" reaches the name check rather than the option parser.
    const result = await node.cli('volume', 'create', '--size', '1MiB', '--', bad);
    assert.notEqual(result.code, 0, bad);
    assert.match(result.stderr, /^chunkd: invalid volume name/, bad);
    assert.equal(result.stderr.trim().split('\n').length, 1, 'one line on stderr');
  }
  const api = await runTool('curl', ['-s', '--unix-socket', node.apiSocket, '-X', 'POST', '-d', '{"name":"../etc","sizeBytes":4096}', 'http://chunkd/v1/volumes']);
  assert.equal(JSON.parse(api.stdout).error.code, 'EBADNAME');
  const encoded = await runTool('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '--unix-socket', node.apiSocket, 'http://chunkd/v1/volumes/..%2Fx']);
  assert.equal(encoded.stdout, '400');
  const notJson = await runTool('curl', ['-s', '--unix-socket', node.apiSocket, '-X', 'POST', '-d', 'nope', 'http://chunkd/v1/volumes']);
  assert.equal(JSON.parse(notJson.stdout).error.code, 'EINVAL');
  const sizes = await node.cli('volume', 'create', 'oddsize', '--size', '1000');
  assert.match(sizes.stderr, /multiple of 4 KiB/);
  const list = JSON.parse((await node.cli('volume', 'list', '--json')).stdout) as Array<{ name: string }>;
  assert.deepEqual(list.map((v) => v.name), ['default']);
  await stillServing();
});

test('fsck and a second node refuse a pool that a node holds', async () => {
  const fsck = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', node.pool]);
  assert.equal(fsck.code, 2, 'exit 2: fsck could not run (1 would say the pool is damaged)');
  assert.match(fsck.stderr, /fsck could not run: pool .* is in use by another chunkd process \(pid \d+\)/);
  const second = await runTool(nodeBinary, [chunkdBin, 'serve', '--pool', node.pool, '--listen', 'none', '--api', path.join(scratch, 'other.sock')]);
  assert.equal(second.code, 1);
  assert.match(second.stderr, /in use by another chunkd process/);
  await stillServing();
});
