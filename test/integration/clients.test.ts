// Real NBD clients against a real node: nbdinfo, qemu-io, qemu-img, nbdcopy and fio.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { makeTempDir, mustRun, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';

let node: RunningNode;
let scratch: string;
const MiB = 1024 * 1024;

beforeAll(async () => {
  scratch = makeTempDir('clients');
  node = await startNode(path.join(scratch, 'pool'), ['--default-volume', 'default:1GiB']);
});

afterAll(async () => {
  assert.equal(await node.stop(), 0, 'the node exits 0 on SIGTERM');
  const fsck = await node.cli('fsck', '--pool', node.pool);
  assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('nbdinfo --list and --json show exports, size, flags and block sizes', async () => {
  assert.equal((await node.cli('volume', 'create', 'second', '--size', '64MiB')).code, 0);
  const list = await mustRun('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${node.nbdSocket}`]);
  const names = (JSON.parse(list).exports as Array<{ 'export-name': string }>).map((e) => e['export-name']).sort();
  assert.deepEqual(names, ['default', 'second']);
  const info = JSON.parse(await mustRun('nbdinfo', ['--json', node.uri('default')]));
  const exported = info.exports[0];
  assert.equal(exported['export-size'], 1024 * MiB);
  assert.equal(exported['is_read_only'], false);
  assert.equal(exported['can_flush'], true);
  assert.equal(exported['can_fua'], true);
  assert.equal(exported['can_trim'], true);
  assert.equal(exported['can_zero'], true);
  assert.equal(exported['can_fast_zero'], true);
  assert.equal(exported['can_multi_conn'], true);
  assert.equal(exported['can_cache'], true);
  assert.equal(exported['block_size_minimum'], 1);
  assert.equal(exported['block_size_preferred'], 4096);
  assert.equal(exported['block_size_maximum'], 32 * MiB);
  assert.ok((exported.contexts as string[]).includes('base:allocation'));
  assert.equal(info.protocol, 'newstyle-fixed');
  // TCP too.
  const tcp = JSON.parse(await mustRun('nbdinfo', ['--json', `nbd://127.0.0.1:${node.tcpPort}/second`]));
  assert.equal(tcp.exports[0]['export-size'], 64 * MiB);
});

/** nbdinfo --map as [offset, length, type] with type 0 data, 3 hole+zero. */
async function map(exportName: string): Promise<Array<[number, number, number]>> {
  const extents = JSON.parse(await mustRun('nbdinfo', ['--map', '--json', node.uri(exportName)])) as Array<{ offset: number; length: number; type: number }>;
  return extents.map((e) => [e.offset, e.length, e.type]);
}

test('qemu-io pattern writes read back; nbdinfo --map follows writes, trims and zero writes', async () => {
  await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('second'),
    '-c', 'write -P 0x5a 1M 2M',
    '-c', 'write -P 0x11 8M 64k',
    '-c', 'write -P 0x22 12M 512', // a partial chunk
  ]);
  assert.deepEqual(await map('second'), [
    [0, 1 * MiB, 3],
    [1 * MiB, 2 * MiB, 0],
    [3 * MiB, 5 * MiB, 3],
    [8 * MiB, 64 * 1024, 0],
    [8 * MiB + 64 * 1024, 4 * MiB - 64 * 1024, 3],
    [12 * MiB, 4096, 0],
    [12 * MiB + 4096, 52 * MiB - 4096, 3],
  ]);
  const verify = await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('second'),
    '-c', 'read -P 0x5a 1M 2M', '-c', 'read -P 0x11 8M 64k', '-c', 'read -P 0x22 12M 512', '-c', 'read -P 0 12583424 3584', '-c', 'read -P 0 0 1M']);
  assert.doesNotMatch(verify, /Pattern verification failed/);
  // Trim 1 MiB in the middle; a zero write that may unmap (-u: no NO_HOLE) gives the space back; a plain
  // `write -z` sends NO_HOLE, so its range stays allocated.
  await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('second'), '-c', 'discard 1536k 1M', '-c', 'write -z -u 8M 64k', '-c', 'write -z 2560k 256k']);
  const after = await map('second');
  assert.deepEqual(after.slice(0, 4), [
    [0, 1 * MiB, 3],
    [1 * MiB, 512 * 1024, 0],
    [1536 * 1024, 1 * MiB, 3],
    [2560 * 1024, 512 * 1024, 0],
  ]);
  const covering8M = after.find(([offset, length]) => offset <= 8 * MiB && 8 * MiB < offset + length);
  assert.equal(covering8M?.[2], 3, 'a zero write without NO_HOLE gives back the space');
  const reread = await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('second'),
    '-c', 'read -P 0x5a 1M 512k', '-c', 'read -P 0 1536k 1M', '-c', 'read -P 0 2560k 256k', '-c', 'read -P 0x5a 2816k 256k', '-c', 'read -P 0 8M 64k']);
  assert.doesNotMatch(reread, /Pattern verification failed/);
  const info = JSON.parse((await node.cli('volume', 'info', 'second', '--json')).stdout);
  assert.equal(info.allocatedBytes, 512 * 1024 + 512 * 1024 + 4096);
});

test('qemu-io aio reads and writes at many offsets in flight at once', async () => {
  const commands: string[] = [];
  for (let i = 0; i < 64; i++) commands.push('-c', `aio_write -P ${(i % 250) + 1} ${i * 3 * MiB + (i % 7) * 4096} 64k`);
  commands.push('-c', 'aio_flush');
  for (let i = 0; i < 64; i++) commands.push('-c', `aio_read -P ${(i % 250) + 1} ${i * 3 * MiB + (i % 7) * 4096} 64k`);
  commands.push('-c', 'aio_flush');
  const output = await mustRun('qemu-io', ['-f', 'raw', node.qemuUri('default'), ...commands]);
  assert.doesNotMatch(output, /Pattern verification failed|error/i);
  assert.equal((output.match(/read 65536\/65536 bytes/g) ?? []).length, 64);
});

test('qemu-img convert in and out, and qemu-img compare says identical', async () => {
  const image = path.join(scratch, 'image.raw');
  const file = fs.openSync(image, 'w');
  const random = crypto.randomBytes(4 * MiB);
  fs.writeSync(file, random, 0, random.length, 0);
  fs.writeSync(file, random, 0, MiB, 40 * MiB);
  fs.ftruncateSync(file, 64 * MiB);
  fs.closeSync(file);
  assert.equal((await node.cli('volume', 'create', 'converted', '--size', '64MiB')).code, 0);
  await mustRun('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', image, node.qemuUri('converted')]);
  const compare = await runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, node.qemuUri('converted')]);
  assert.equal(compare.code, 0, compare.stdout + compare.stderr);
  assert.match(compare.stdout, /Images are identical/);
  const back = path.join(scratch, 'back.qcow2');
  await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', node.qemuUri('converted'), back]);
  assert.match(await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', image, back]), /Images are identical/);
  // Holes stay holes: only the written 5 MiB is allocated.
  const info = JSON.parse((await node.cli('volume', 'info', 'converted', '--json')).stdout);
  assert.ok(info.allocatedBytes <= 5 * MiB, `allocated ${info.allocatedBytes}`);
});

test('nbdcopy round trip keeps checksums', async () => {
  const source = path.join(scratch, 'source.bin');
  const target = path.join(scratch, 'target.bin');
  fs.writeFileSync(source, crypto.randomBytes(48 * MiB));
  assert.equal((await node.cli('volume', 'create', 'copied', '--size', '48MiB')).code, 0);
  await mustRun('nbdcopy', [source, node.uri('copied')]);
  await mustRun('nbdcopy', ['--connections=4', node.uri('copied'), target]);
  const sha = (file: string): string => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
  assert.equal(sha(target), sha(source));
});

test('fio with the nbd engine: random writes then crc32c verify at iodepth 32', async () => {
  const result = await mustRun('fio', [
    '--name=verify', '--ioengine=nbd', `--uri=${node.uri('default')}`, '--rw=randwrite', '--bs=4k', '--iodepth=32',
    '--size=64M', '--offset=256M', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--verify_state_save=0', '--output-format=json',
  ], { timeoutMs: 300_000 });
  const job = JSON.parse(result.slice(result.indexOf('{'))).jobs[0];
  assert.equal(job.error, 0);
  assert.ok(job.write.io_bytes >= 64 * MiB);
  assert.ok(job.read.io_bytes >= 64 * MiB, 'fio read everything back to verify it');
});
