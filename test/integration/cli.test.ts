// The command line and the node's life: volume create/list/info/resize/rm, status, metrics, restart with stale
// sockets, clean shutdown, and thin provisioning of a 64 TiB volume.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'vitest';
import { chunkdBin, makeTempDir, nodeBinary, runTool, startNode } from '../helpers/node-process.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const MiB = 1024 * 1024;
const TiB = 2 ** 40;

/** Bytes the pool's files take on disk (allocated blocks, as du counts them). */
function poolDiskBytes(pool: string): number {
  let total = 0;
  for (const entry of fs.readdirSync(pool, { recursive: true, withFileTypes: true })) {
    if (entry.isFile()) total += fs.statSync(path.join(entry.parentPath, entry.name)).blocks * 512;
  }
  return total;
}

test('volume lifecycle through the CLI', async () => {
  const scratch = makeTempDir('cli');
  const node = await startNode(path.join(scratch, 'pool'));
  try {
    const created = await node.cli('volume', 'create', 'alpha', '--size', '10GiB');
    assert.equal(created.code, 0, created.stderr);
    assert.match(created.stdout, /created volume alpha of 10 GiB/);
    assert.match((await node.cli('volume', 'create', 'alpha', '--size', '1GiB')).stderr, /already exists/);
    const info = JSON.parse((await node.cli('volume', 'info', 'alpha', '--json')).stdout);
    assert.deepEqual([info.sizeBytes, info.allocatedBytes], [10 * 2 ** 30, 0]);

    const client = await TestNbdClient.connect(node.nbdSocket, 'alpha');
    await client.write(9 * 2 ** 30, crypto.randomBytes(MiB));
    await client.flush();
    assert.equal(JSON.parse((await node.cli('volume', 'info', 'alpha', '--json')).stdout).allocatedBytes, MiB);
    // Shrinking needs --force, and no client may have the volume open; growing works at once.
    assert.match((await node.cli('volume', 'resize', 'alpha', '--size', '1GiB')).stderr, /pass --force/);
    assert.match((await node.cli('volume', 'resize', 'alpha', '--size', '1GiB', '--force')).stderr, /in use/);
    assert.match((await node.cli('volume', 'rm', 'alpha')).stderr, /in use/);
    assert.equal((await node.cli('volume', 'resize', 'alpha', '--size', '20GiB')).code, 0);
    await client.disconnect();
    const shrunk = JSON.parse((await node.cli('volume', 'resize', 'alpha', '--size', '1GiB', '--force', '--json')).stdout);
    assert.deepEqual([shrunk.sizeBytes, shrunk.allocatedBytes], [2 ** 30, 0], 'data past the new end is freed');

    assert.equal((await node.cli('volume', 'create', 'beta', '--size', '4KiB')).code, 0);
    const list = JSON.parse((await node.cli('volume', 'list', '--json')).stdout) as Array<{ name: string }>;
    assert.deepEqual(list.map((v) => v.name), ['alpha', 'beta']);
    assert.match((await node.cli('volume', 'list')).stdout, /alpha\tsize 1 GiB/);
    assert.equal((await node.cli('volume', 'rm', 'beta')).code, 0);
    assert.match((await node.cli('volume', 'info', 'beta')).stderr, /no volume named beta/);

    const status = await node.cli('status');
    assert.match(status.stdout, /volumes: 1/);
    assert.match(status.stdout, /^pool .*: [\d.]+ \S+ allocated in [\d.]+ \S+ of chunk files, /m);
    assert.match(status.stdout, /^event loop utilisation [\d.]+%, longest pause \d+ ms \(\d+ on CPU, \d+ waiting for a CPU, \d+ elsewhere; \d+ in collections(?: \(\d+ full\))?; other threads \d+ ms of CPU\)$/m);
    const metrics = await runTool('curl', ['-s', '--unix-socket', node.apiSocket, 'http://chunkd/metrics']);
    assert.match(metrics.stdout, /chunkd_volume_size_bytes\{volume="alpha"\} 1073741824/);
    for (const part of ['gap', 'on_cpu', 'run_queue', 'elsewhere', 'gc', 'gc_full']) assert.match(metrics.stdout, new RegExp(`^chunkd_event_loop_longest_pause_seconds\\{part="${part}"\\} [\\d.e-]+$`, 'm'));
    assert.equal(fs.statSync(node.apiSocket).mode & 0o777, 0o600, 'the API socket is for its owner only');
    assert.equal(await node.stop(), 0);

    // No node: the CLI says so in one line.
    const offline = await runTool(nodeBinary, [chunkdBin, 'status', '--api', node.apiSocket]);
    assert.equal(offline.code, 1);
    assert.match(offline.stderr, /^chunkd: no chunkd node answers at/);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('a node replaces stale sockets left by a crash, and its data survives the restart', async () => {
  const scratch = makeTempDir('stale');
  const pool = path.join(scratch, 'pool');
  let node = await startNode(pool, ['--default-volume', 'default:1GiB']);
  const data = crypto.randomBytes(MiB);
  let client = await TestNbdClient.connect(node.nbdSocket, 'default');
  await client.write(3 * MiB, data);
  await client.flush();
  client.close();
  await node.kill();
  assert.ok(fs.existsSync(node.nbdSocket) && fs.existsSync(node.apiSocket), 'the crash left its sockets behind');
  node = await startNode(pool);
  client = await TestNbdClient.connect(node.nbdSocket, 'default');
  assert.ok((await client.read(3 * MiB, MiB)).equals(data));
  await client.disconnect();
  // A socket path that a live process answers on is not taken over.
  const squatter = net.createServer().listen(path.join(scratch, 'live.sock'));
  await new Promise((resolve) => squatter.once('listening', resolve));
  const refused = await runTool(nodeBinary, [chunkdBin, 'serve', '--pool', path.join(scratch, 'other'), '--listen', 'none', '--api', path.join(scratch, 'live.sock')]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /in use by a running process/);
  squatter.close();
  // A directory that holds something else is not taken for a pool.
  const notAPool = path.join(scratch, 'photos');
  fs.mkdirSync(notAPool);
  fs.writeFileSync(path.join(notAPool, 'cat.jpg'), 'meow');
  const refusedDir = await runTool(nodeBinary, [chunkdBin, 'serve', '--pool', notAPool, '--listen', 'none']);
  assert.equal(refusedDir.code, 1);
  assert.match(refusedDir.stderr, /is not empty and holds no chunkd pool/);
  assert.deepEqual(fs.readdirSync(notAPool), ['cat.jpg'], 'nothing was written into it');
  assert.equal(await node.stop(), 0);
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('thin provisioning: 100 MiB scattered over a 64 TiB volume uses about 100 MiB, and a trim gives it back', async () => {
  const seed = testSeed('thin');
  const random = makeRandom(seed);
  const scratch = makeTempDir('thin');
  const pool = path.join(scratch, 'pool');
  const node = await startNode(pool);
  try {
    assert.equal((await node.cli('volume', 'create', 'huge', '--size', '64TiB')).code, 0);
    const client = await TestNbdClient.connect(node.nbdSocket, 'huge');
    assert.equal(client.sizeBytes, 64 * TiB);
    const baseline = poolDiskBytes(pool);
    // 100 MiB as 4 KiB-aligned writes of 4 KiB..256 KiB at random offsets across the whole 64 TiB.
    const written: Array<[number, number]> = [];
    let total = 0;
    while (total < 100 * MiB) {
      const length = Math.min(100 * MiB - total, 4096 * (1 + randomInt(random, 64)));
      const offset = randomInt(random, (64 * TiB - length) / 4096) * 4096;
      written.push([offset, length]);
      total += length;
    }
    for (let i = 0; i < written.length; i += 32) {
      await Promise.all(written.slice(i, i + 32).map(([offset, length]) => client.write(offset, Buffer.alloc(length, 0xa5))));
    }
    await client.flush();
    const used = poolDiskBytes(pool) - baseline;
    const info = JSON.parse((await node.cli('volume', 'info', 'huge', '--json')).stdout);
    console.log(`# thin: ${written.length} writes, ${info.allocatedBytes} bytes allocated, ${used} bytes on disk (metadata included)`);
    assert.ok(info.allocatedBytes <= 100 * MiB && info.allocatedBytes >= 99 * MiB, `allocated ${info.allocatedBytes}`);
    assert.ok(used < 110 * MiB + 8 * MiB, `the pool grew by ${used} bytes for 100 MiB written (seed ${seed})`);
    const [sampleOffset, sampleLength] = written[7]!;
    assert.ok((await client.read(sampleOffset, sampleLength)).equals(Buffer.alloc(sampleLength, 0xa5)));

    for (let i = 0; i < written.length; i += 32) {
      await Promise.all(written.slice(i, i + 32).map(([offset, length]) => client.trim(offset, length)));
    }
    await client.flush();
    const afterTrim = poolDiskBytes(pool) - baseline;
    console.log(`# thin: after trim ${afterTrim} bytes on disk above the baseline`);
    assert.ok(afterTrim < 8 * MiB, `after trimming everything the pool still holds ${afterTrim} bytes more (seed ${seed})`);
    assert.equal(JSON.parse((await node.cli('volume', 'info', 'huge', '--json')).stdout).allocatedBytes, 0);
    assert.ok((await client.read(sampleOffset, sampleLength)).equals(Buffer.alloc(sampleLength)));
    await client.disconnect();
  } finally {
    await node.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('fsck finds damage: a corrupted checkpoint, a truncated chunk file; the node refuses a damaged pool clearly', async () => {
  const scratch = makeTempDir('fsck');
  const pool = path.join(scratch, 'pool');
  const node = await startNode(pool, ['--default-volume', 'default:64MiB']);
  const client = await TestNbdClient.connect(node.nbdSocket, 'default');
  await client.write(32 * MiB, crypto.randomBytes(MiB));
  await client.disconnect();
  assert.equal(await node.stop(), 0);
  const clean = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool, '--json']);
  assert.equal(clean.code, 0, clean.stdout);
  assert.equal(JSON.parse(clean.stdout).mappedBytes, MiB);

  // A chunk file cut short: the mapped chunks past its end are reported.
  const chunkFile = path.join(pool, 'chunks', '00000000.chunk');
  const size = fs.statSync(chunkFile).size;
  fs.truncateSync(chunkFile, size - 8192);
  const truncated = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
  assert.equal(truncated.code, 1);
  assert.match(truncated.stdout, /DAMAGED[\s\S]*damage: chunk file 0 is \d+ bytes, shorter than its referenced chunks/);
  fs.truncateSync(chunkFile, size);

  // A flipped byte in one checkpoint copy: fsck calls it damage it can repair; a start repairs it, logged.
  const flip = (file: string, offset: number): void => {
    const bytes = fs.readFileSync(path.join(pool, file));
    bytes[offset]! ^= 0xff;
    fs.writeFileSync(path.join(pool, file), bytes);
  };
  const checkpointBytes = fs.statSync(path.join(pool, 'checkpoint.0')).size;
  flip('checkpoint.0', checkpointBytes - 10);
  const damaged = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
  assert.equal(damaged.code, 1, damaged.stdout);
  assert.match(damaged.stdout, /DAMAGED \(repairable, nothing lost\)[\s\S]*damage: metadata: .*checkpoint\.0 is damaged at byte \d+; read from the other copy/);
  const repairing = await startNode(pool);
  assert.equal(await repairing.stop(), 0, repairing.stderr());
  assert.match(repairing.stderr(), /metadata repaired: .*checkpoint\.0 is damaged at byte \d+; read from the other copy/);
  const repaired = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
  assert.equal(repaired.code, 0, repaired.stdout);

  // The same byte flipped in both copies: no whole checkpoint is left; fsck says where, and the node refuses to start.
  for (const copy of ['checkpoint.0', 'checkpoint.1']) flip(copy, checkpointBytes - 10);
  const corrupt = await runTool(nodeBinary, [chunkdBin, 'fsck', '--pool', pool]);
  assert.equal(corrupt.code, 1);
  assert.match(corrupt.stdout, /damage: metadata: no whole checkpoint: checkpoint\.0 is damaged at byte \d+, checkpoint\.1 is damaged at byte \d+/);
  const refused = await runTool(nodeBinary, [chunkdBin, 'serve', '--pool', pool, '--listen', 'none']);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /^chunkd: no whole checkpoint: checkpoint\.0 is damaged/m);
  fs.rmSync(scratch, { recursive: true, force: true });
});
