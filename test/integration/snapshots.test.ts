// Snapshots and clones through the CLI and real clients: qemu-io on VOL@SNAP sees the old data while the volume
// has the new, nbdinfo --map on a snapshot, writes to a snapshot export refused (EPERM), qemu-img compare of a
// clone against its snapshot, rollback, diff, and removal rules.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { makeTempDir, mustRun, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';
import { NbdReplyError, TestNbdClient } from '../helpers/nbd-client.ts';

let node: RunningNode;
let scratch: string;
const MiB = 1024 * 1024;

beforeAll(async () => {
  scratch = makeTempDir('snapshots');
  node = await startNode(path.join(scratch, 'pool'), ['--default-volume', 'vol:256MiB']);
});

afterAll(async () => {
  assert.equal(await node.stop(), 0);
  const fsck = await node.cli('fsck', '--pool', node.pool);
  assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
  fs.rmSync(scratch, { recursive: true, force: true });
});

const cliJson = async (...args: string[]): Promise<any> => {
  const result = await node.cli(...args, '--json');
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout);
};

test('a snapshot keeps the old pattern while the volume takes the new one', async () => {
  await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('vol'), '-c', 'write -P 0xaa 0 8M', '-c', 'write -P 0xbb 64M 1M']);
  assert.match((await node.cli('snapshot', 'create', 'vol', 'first')).stdout, /created snapshot vol@first/);
  await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('vol'), '-c', 'write -P 0xcc 4096 4096', '-c', 'write -P 0xdd 4M 2M', '-c', 'discard 64M 1M']);
  const old = await mustRun('qemu-io', ['-r', '-f', 'raw', node.qemuUri('vol@first'), '-c', 'read -P 0xaa 0 8M', '-c', 'read -P 0xbb 64M 1M']);
  assert.doesNotMatch(old, /Pattern verification failed/);
  const fresh = await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('vol'),
    '-c', 'read -P 0xaa 0 4096', '-c', 'read -P 0xcc 4096 4096', '-c', 'read -P 0xaa 8192 4186112', '-c', 'read -P 0xdd 4M 2M', '-c', 'read -P 0 64M 1M']);
  assert.doesNotMatch(fresh, /Pattern verification failed/);
  // A 4 KiB write after the snapshot copied 4 KiB, not a larger unit: the volume holds 8 MiB + 4 KiB + 2 MiB - ... of
  // its own, and the snapshot alone holds exactly what the volume overwrote or trimmed.
  const [snapshot] = await cliJson('snapshot', 'list', 'vol');
  assert.equal(snapshot.name, 'first');
  // The same figure over paged metadata (a walk of the snapshot's unshared pages) and in memory.
  assert.equal(snapshot.uniqueBytes, 4096 + 2 * MiB + MiB);
  assert.match((await node.cli('snapshot', 'list', 'vol')).stdout, /first\t.*\tholds alone [\d.]+ MiB \(3149824 bytes\)/);
});

test('nbdinfo lists snapshot exports read-only and maps their allocation', async () => {
  const list = JSON.parse(await mustRun('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${node.nbdSocket}`]));
  const names = (list.exports as Array<{ 'export-name': string }>).map((e) => e['export-name']);
  assert.ok(names.includes('vol@first'), names.join(','));
  const info = JSON.parse(await mustRun('nbdinfo', ['--json', node.uri('vol@first')]));
  assert.equal(info.exports[0].is_read_only, true);
  assert.equal(info.exports[0]['export-size'], 256 * MiB);
  const map = JSON.parse(await mustRun('nbdinfo', ['--map', '--json', node.uri('vol@first')])) as Array<{ offset: number; length: number; type: number }>;
  assert.deepEqual(map.slice(0, 4).map((e) => [e.offset, e.length, e.type]), [
    [0, 8 * MiB, 0],
    [8 * MiB, 56 * MiB, 3],
    [64 * MiB, MiB, 0],
    [65 * MiB, 191 * MiB, 3],
  ]);
});

test('writes, trims and zero writes to a snapshot export get EPERM', async () => {
  const client = await TestNbdClient.connect(node.nbdSocket, 'vol@first');
  await assert.rejects(client.write(0, Buffer.alloc(4096)), (error: NbdReplyError) => error.errno === 1);
  await assert.rejects(client.trim(0, 4096), (error: NbdReplyError) => error.errno === 1);
  assert.ok((await client.read(0, 4096)).equals(Buffer.alloc(4096, 0xaa)));
  await client.disconnect();
  const qemu = await runTool('qemu-io', ['-f', 'raw', node.qemuUri('vol@first'), '-c', 'write -P 1 0 4k']);
  assert.notEqual(qemu.code, 0);
});

test('a clone is identical to its snapshot until written, then independent', async () => {
  assert.match((await node.cli('clone', 'vol@first', 'copy')).stdout, /created volume copy from vol@first/);
  const compare = await runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', node.qemuUri('vol@first'), node.qemuUri('copy')]);
  assert.equal(compare.code, 0, compare.stdout + compare.stderr);
  await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('copy'), '-c', 'write -P 0xee 0 1M']);
  const differs = await runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', node.qemuUri('vol@first'), node.qemuUri('copy')]);
  assert.equal(differs.code, 1);
  const old = await mustRun('qemu-io', ['-r', '-f', 'raw', node.qemuUri('vol@first'), '-c', 'read -P 0xaa 0 1M']);
  assert.doesNotMatch(old, /Pattern verification failed/);
  // Clones can be snapshotted and cloned again.
  await node.cli('snapshot', 'create', 'copy', 'c1');
  assert.equal((await node.cli('clone', 'copy@c1', 'copy2')).code, 0);
  const copy2 = await mustRun('qemu-io', ['-r', '-f', 'raw', node.qemuUri('copy2'), '-c', 'read -P 0xee 0 1M', '-c', 'read -P 0xaa 1M 7M']);
  assert.doesNotMatch(copy2, /Pattern verification failed/);
});

test('snapshot diff lists what changed, from metadata', async () => {
  await node.cli('snapshot', 'create', 'vol', 'second');
  const between = await cliJson('snapshot', 'diff', 'vol', 'first', 'second');
  assert.deepEqual(between.extents, [
    { offsetBytes: 4096, lengthBytes: 4096 },
    { offsetBytes: 4 * MiB, lengthBytes: 2 * MiB },
    { offsetBytes: 64 * MiB, lengthBytes: MiB },
  ]);
  await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('vol'), '-c', 'write -P 1 100M 8k']);
  const live = await cliJson('snapshot', 'diff', 'vol', 'second');
  assert.deepEqual(live.extents, [{ offsetBytes: 100 * MiB, lengthBytes: 8192 }]);
});

test('rollback is refused while the volume is exported, then restores the snapshot', async () => {
  const client = await TestNbdClient.connect(node.nbdSocket, 'vol');
  const refused = await node.cli('snapshot', 'rollback', 'vol', 'first');
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /exported .*disconnect/);
  await client.disconnect();
  assert.equal((await node.cli('snapshot', 'rollback', 'vol', 'first')).code, 0);
  const back = await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('vol'), '-c', 'read -P 0xaa 0 8M', '-c', 'read -P 0xbb 64M 1M', '-c', 'read -P 0 100M 8k']);
  assert.doesNotMatch(back, /Pattern verification failed/);
});

test('removal rules: a volume with snapshots is refused; a snapshot with clones goes, the clones keep their data', async () => {
  const refused = await node.cli('volume', 'rm', 'vol');
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /has 2 snapshot\(s\) \(first, second\); remove them first/);
  const exported = await TestNbdClient.connect(node.nbdSocket, 'vol@second');
  assert.match((await node.cli('snapshot', 'rm', 'vol', 'second')).stderr, /is exported/);
  await exported.disconnect();
  assert.equal((await node.cli('snapshot', 'rm', 'vol', 'second')).code, 0);
  assert.equal((await node.cli('snapshot', 'rm', 'vol', 'first')).code, 0);
  const copy = await mustRun('qemu-io', ['-r', '-f', 'raw', node.qemuUri('copy'), '-c', 'read -P 0xee 0 1M', '-c', 'read -P 0xaa 1M 7M', '-c', 'read -P 0xbb 64M 1M']);
  assert.doesNotMatch(copy, /Pattern verification failed/);
  assert.equal((await node.cli('volume', 'rm', 'vol')).code, 0);
  assert.match((await node.cli('snapshot', 'create', 'copy', '-bad')).stderr, /invalid snapshot name|unknown option/i);
  assert.match((await node.cli('snapshot', 'list', 'nope')).stderr, /no volume named nope/);
  assert.match((await node.cli('clone', 'copy@missing', 'x')).stderr, /no snapshot copy@missing/);
});
