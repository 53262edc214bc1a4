// End-to-end integrity: a byte flipped on disk under a written block is caught. Reading that block over NBD
// fails with EIO (our client and qemu-io), the blocks around it read fine, `chunkd scrub` reports exactly that
// extent (in the volume and in a snapshot that shares it), the node logs and counts it, and it keeps serving.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { NbdReplyError, TestNbdClient } from '../helpers/nbd-client.ts';
import { flipByteUnder as flipByteIn, namedBlock } from '../helpers/damage.ts';
import { makeTempDir, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const blockBytes = 4 * KiB;
const firstBlockOffset = 1 * MiB;
const blockCount = 16;
const damagedBlock = 5;

let node: RunningNode;
let scratch: string;

function blockPattern(index: number): Buffer {
  return namedBlock('integrity test', index);
}

beforeAll(async () => {
  scratch = makeTempDir('integrity');
  node = await startNode(path.join(scratch, 'pool'), ['--default-volume', 'vol:64MiB']);
  const client = await TestNbdClient.connect(node.nbdSocket, 'vol');
  for (let i = 0; i < blockCount; i++) await client.write(firstBlockOffset + i * blockBytes, blockPattern(i));
  await client.flush();
  await client.disconnect();
});

afterAll(async () => {
  if (node.process.exitCode === null) await node.stop();
  fs.rmSync(scratch, { recursive: true, force: true });
});

/** Flips one byte inside the on-disk copy of `index`'s block; returns the chunk file and offset changed. */
function flipByteUnder(index: number): { file: string; offset: number } {
  return flipByteIn(node.pool, blockPattern(index));
}

test('a clean volume scrubs clean', async () => {
  const result = await node.cli('scrub', 'vol');
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /scrub of vol: 64 KiB \(65536 bytes\) checked across 1 export\(s\); no damage found/);
});

test('one flipped byte: EIO for that block only, scrub names exactly that extent, the node keeps serving', async () => {
  assert.equal((await node.cli('snapshot', 'create', 'vol', 'before')).code, 0);
  const damaged = flipByteUnder(damagedBlock);
  const damagedOffset = firstBlockOffset + damagedBlock * blockBytes;

  const client = await TestNbdClient.connect(node.nbdSocket, 'vol');
  await assert.rejects(client.read(damagedOffset, blockBytes), (error) => error instanceof NbdReplyError && error.errno === 5, 'EIO for the damaged block');
  await assert.rejects(client.read(firstBlockOffset, 1 * MiB), (error) => error instanceof NbdReplyError && error.errno === 5, 'EIO for any read that covers it');
  await assert.rejects(client.read(damagedOffset + 1000, 10), (error) => error instanceof NbdReplyError && error.errno === 5, 'EIO for a partial read inside it');
  for (const neighbour of [damagedBlock - 1, damagedBlock + 1, 0, blockCount - 1]) {
    assert.deepEqual(await client.read(firstBlockOffset + neighbour * blockBytes, blockBytes), blockPattern(neighbour), `block ${neighbour} reads fine`);
  }
  // A real client sees the same.
  const qemu = await runTool('qemu-io', ['-r', '-f', 'raw', node.qemuUri('vol'), '-c', `read ${damagedOffset} 4096`]);
  assert.match(qemu.stdout + qemu.stderr, /Input\/output error/);
  const qemuSnapshot = await runTool('qemu-io', ['-r', '-f', 'raw', node.qemuUri('vol@before'), '-c', `read ${damagedOffset} 4096`]);
  assert.match(qemuSnapshot.stdout + qemuSnapshot.stderr, /Input\/output error/, 'the snapshot shares the block, and its checksum');

  const scrub = await node.cli('scrub', 'vol');
  assert.equal(scrub.code, 1, `scrub exits 1 on damage: ${scrub.stdout}${scrub.stderr}`);
  const badLines = scrub.stdout.split('\n').filter((line) => line.startsWith('bad extent:'));
  assert.deepEqual(badLines, [`bad extent: vol offset ${damagedOffset} length 4096`, `bad extent: vol@before offset ${damagedOffset} length 4096`]);
  assert.match(scrub.stdout, /1 damaged 4 KiB chunk\(s\) in 2 extent\(s\)/);
  const json = await node.cli('scrub', 'vol', '--json');
  assert.equal(json.code, 1);
  assert.deepEqual(JSON.parse(json.stdout).badExtents, [
    { export: 'vol', offsetBytes: damagedOffset, lengthBytes: 4096 },
    { export: 'vol@before', offsetBytes: damagedOffset, lengthBytes: 4096 },
  ]);

  // Logged with volume, offset and chunk file; counted; and the node goes on serving reads and writes.
  assert.match(node.stderr(), new RegExp(`checksum mismatch: vol at byte ${damagedOffset} \\(4 KiB chunk \\d+, ${damaged.file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} at byte ${damaged.offset - 100}\\)`));
  const status = JSON.parse((await node.cli('status', '--json')).stdout);
  assert.ok(status.pool.checksumErrorsTotal >= 4, `counted: ${status.pool.checksumErrorsTotal}`);
  const metrics = await runTool('curl', ['-s', '--unix-socket', node.apiSocket, 'http://chunkd/metrics']);
  assert.match(metrics.stdout, /chunkd_checksum_errors_total [1-9]/);
  await client.write(2 * MiB, Buffer.alloc(blockBytes, 0x5a));
  assert.deepEqual(await client.read(2 * MiB, blockBytes), Buffer.alloc(blockBytes, 0x5a));

  // Overwriting the damaged block whole heals the volume (a new chunk); the snapshot keeps the damaged one.
  await client.write(damagedOffset, blockPattern(99));
  assert.deepEqual(await client.read(damagedOffset, blockBytes), blockPattern(99));
  await client.disconnect();
  const after = await node.cli('scrub', 'vol');
  assert.deepEqual(after.stdout.split('\n').filter((line) => line.startsWith('bad extent:')), [`bad extent: vol@before offset ${damagedOffset} length 4096`]);
});

test('scrub while fio rewrites and verifies the volume: no false damage, and fio sees its data', async () => {
  assert.equal((await node.cli('volume', 'create', 'busy', '--size', '64MiB')).code, 0);
  assert.equal((await node.cli('snapshot', 'create', 'busy', 'empty')).code, 0);
  const fio = runTool('fio', ['--ioengine=nbd', `--uri=${node.uri('busy')}`, '--name=busy', '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=64M',
    '--loops=3', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--randrepeat=0', '--verify_state_save=0'], { timeoutMs: 300_000 });
  // Scrub over and over while fio writes (and so frees and recycles chunks under the scrub's feet).
  let scrubs = 0;
  let fioDone = false;
  void fio.then(() => (fioDone = true));
  while (!fioDone || scrubs === 0) {
    const result = await node.cli('scrub', 'busy');
    assert.equal(result.code, 0, `scrub ${scrubs} of a busy, healthy volume: ${result.stdout}${result.stderr}`);
    scrubs += 1;
  }
  const output = await fio;
  assert.equal(output.code, 0, output.stdout + output.stderr);
  assert.doesNotMatch(output.stdout, /verify: bad/);
  assert.ok(scrubs >= 2, `scrubbed ${scrubs} times while fio ran`);
});

test('scrub of a missing volume is a clear error', async () => {
  const result = await node.cli('scrub', 'nope');
  assert.equal(result.code, 1);
  assert.match(result.stderr, /no volume named nope/);
});
