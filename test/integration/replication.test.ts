// Replication streams between two nodes (two pools, two API sockets on one machine), through the real CLI and
// pipes the test holds (so it counts the stream's bytes and can cut it): a received snapshot equals its source
// (nbdcopy of both exports, hashed); a 1% incremental sends about 1% of the volume; a flipped byte in a stream file is refused and nothing appears; a stream on the wrong base is a
// clear error; a damaged block at the source stops the send naming the extent. kill -9 mid-stream and resume:
// replication-resume.test.ts (it shares this file's helpers).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { haveTool, makeTempDir, mustRun, startNode, type RunningNode } from '../helpers/node-process.ts';
import { exportHash, ok, stopAndCheck, transfer } from '../helpers/stream-pipe.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';
import { StreamDecoder } from '../../src/replication/stream-format.ts';

const MiB = 1024 * 1024;
let scratch: string;
let source: RunningNode;
let target: RunningNode;

beforeAll(async () => {
  scratch = makeTempDir('replication');
  source = await startNode(path.join(scratch, 'a'), ['--default-volume', 'vol:128MiB']);
  target = await startNode(path.join(scratch, 'b'));
});

afterAll(async () => {
  await stopAndCheck(source);
  await stopAndCheck(target);
  fs.rmSync(scratch, { recursive: true, force: true });
});


test('a full stream through a pipe: the received snapshot equals its source and keeps its id', { skip: !haveTool('nbdcopy') }, async () => {
  await mustRun('qemu-io', ['-f', 'raw', source.qemuUri('vol'), '-c', 'write -P 0x11 0 24M', '-c', 'write -P 0 32M 4M', '-c', 'write -P 0x22 100M 1M']);
  await ok(source, 'snapshot', 'create', 'vol', 's1');
  const result = await transfer(source, target, ['vol@s1'], ['vol']);
  assert.equal(result.send.code, 0, result.send.stderr);
  assert.equal(result.receive.code, 0, result.receive.stderr);
  assert.match(result.receive.stdout, /received vol@s1 \(id [0-9a-f]{32}\)/);
  // 25 MiB of data; the 4 MiB written as zeros travel as zero records.
  assert.ok(result.bytes > 25 * MiB && result.bytes < 25 * MiB + 64 * 1024, `full stream of ${result.bytes} bytes`);
  assert.equal(await exportHash(target, 'vol@s1'), await exportHash(source, 'vol@s1'));
  const [a] = JSON.parse(await ok(source, 'snapshot', 'list', 'vol', '--json'));
  const [b] = JSON.parse(await ok(target, 'snapshot', 'list', 'vol', '--json'));
  assert.equal(b.uuid, a.uuid);
});

test('an incremental after 1% of the volume changed sends about that much', { skip: !haveTool('nbdcopy') }, async () => {
  const seed = testSeed('replication incremental');
  const random = makeRandom(seed);
  // 1% of 128 MiB in scattered 4 KiB writes (the worst case for per-record overhead), some into holes.
  const chunks = new Set<number>();
  while (chunks.size < Math.round((0.01 * 128 * MiB) / 4096)) chunks.add(randomInt(random, (128 * MiB) / 4096));
  const commands = [...chunks].flatMap((chunk) => ['-c', `write -P ${1 + randomInt(random, 255)} ${chunk * 4096} 4k`]);
  await mustRun('qemu-io', ['-f', 'raw', source.qemuUri('vol'), ...commands]);
  await ok(source, 'snapshot', 'create', 'vol', 's2');
  const diff = JSON.parse(await ok(source, 'snapshot', 'diff', 'vol', 's1', 's2', '--json'));
  const result = await transfer(source, target, ['vol@s2', '--from', 's1'], ['vol']);
  assert.equal(result.receive.code, 0, result.receive.stderr);
  const overhead = result.bytes / diff.changedBytes - 1;
  console.log(`# incremental (seed ${seed}): ${diff.changedBytes} bytes changed (${(100 * diff.changedBytes / (128 * MiB)).toFixed(2)}% of 128 MiB, ${diff.extents.length} extents), ${result.bytes} bytes of stream: ${(100 * overhead).toFixed(2)}% over`);
  assert.ok(result.bytes >= diff.changedBytes && overhead < 0.02, `stream ${result.bytes} bytes for ${diff.changedBytes} changed`);
  assert.equal(await exportHash(target, 'vol@s2'), await exportHash(source, 'vol@s2'));
});

test('a stream on the wrong base is refused with a clear error', async () => {
  await mustRun('qemu-io', ['-f', 'raw', source.qemuUri('vol'), '-c', 'write -P 0x33 8M 1M']);
  await ok(source, 'snapshot', 'create', 'vol', 's3');
  // The target has s2; a stream from s3 to a later snapshot needs s3.
  await ok(source, 'snapshot', 'create', 'vol', 's4');
  const result = await transfer(source, target, ['vol@s4', '--from', 's3'], ['vol']);
  assert.equal(result.receive.code, 1);
  assert.match(result.receive.stderr, /wrong base: an incremental stream from s3 \(id [0-9a-f]{32}\) of s4 .* needs a snapshot with id [0-9a-f]{32} in vol; its snapshots are: s1 .*, s2 /);
  // A full stream into an existing volume is refused too.
  const full = await transfer(source, target, ['vol@s4'], ['vol']);
  assert.match(full.receive.stderr, /volume vol exists; a full stream of s4 \(id [0-9a-f]{32}\) makes a new volume/);
});

test('a flipped byte in a stream file: the receive refuses it and nothing appears', async () => {
  const full = path.join(scratch, 'full.stream');
  const incremental = path.join(scratch, 'inc.stream');
  await ok(source, 'send', 'vol@s3', '--out', full);
  await ok(source, 'send', 'vol@s3', '--from', 's2', '--out', incremental);
  for (const [file, volume] of [[full, 'fresh'], [incremental, 'vol']] as const) {
    const bytes = fs.readFileSync(file);
    bytes[Math.floor(bytes.length / 2)]! ^= 0x04;
    fs.writeFileSync(`${file}.bad`, bytes);
    const before = await ok(target, 'snapshot', 'list', 'vol', '--json');
    const result = await target.cli('receive', volume, '--in', `${file}.bad`);
    assert.equal(result.code, 1);
    assert.match(result.stderr, /fails its checksum: the stream is damaged; the stream is refused and nothing of it was kept/);
    assert.equal(await ok(target, 'snapshot', 'list', 'vol', '--json'), before);
    assert.doesNotMatch(await ok(target, 'volume', 'list'), /fresh/);
    assert.deepEqual(JSON.parse(await ok(target, 'snapshot', 'diff', 'vol', 's2', '--json')).extents, []);
  }
  // The same streams whole are taken, from files.
  assert.match(await ok(target, 'receive', 'fresh', '--in', full), /received fresh@s3/);
  assert.match(await ok(target, 'receive', 'vol', '--in', incremental), /received vol@s3/);
  assert.equal(await exportHash(target, 'vol@s3'), await exportHash(source, 'vol@s3'));
});

test('a damaged block at the source stops the send, naming the extent; nothing damaged is shipped', async () => {
  await ok(source, 'volume', 'create', 'dmg', '--size', '16MiB');
  await mustRun('qemu-io', ['-f', 'raw', source.qemuUri('dmg'), '-c', 'write -P 0x5a 5M 64k', '-c', 'write -P 0x66 9M 2k', '-c', 'write -P 0x99 9218k 2k']);
  await ok(source, 'snapshot', 'create', 'dmg', 'd1');
  // Find that block (half 0x66, half 0x99) in the chunk files, and flip one byte of it on disk.
  const chunks = path.join(source.pool, 'chunks');
  const block = Buffer.concat([Buffer.alloc(2048, 0x66), Buffer.alloc(2048, 0x99)]);
  let damaged = 0;
  for (const file of fs.readdirSync(chunks)) {
    const bytes = fs.readFileSync(path.join(chunks, file));
    for (let at = bytes.indexOf(block); at >= 0; at = bytes.indexOf(block, at + 4096)) {
      const fd = fs.openSync(path.join(chunks, file), 'r+');
      fs.writeSync(fd, Buffer.from([0x67]), 0, 1, at + 100);
      fs.closeSync(fd);
      damaged += 1;
    }
  }
  assert.equal(damaged, 1);
  const out = path.join(scratch, 'damaged.stream');
  const result = await source.cli('send', 'dmg@d1', '--out', out);
  assert.equal(result.code, 1);
  assert.match(result.stderr, /send of dmg@d1 stopped: the extent at byte 9437184 of 4096 bytes could not be read intact \(checksum mismatch: dmg@d1 at byte 9437184 .*nothing damaged was sent/);
  const records = new StreamDecoder().push(fs.readFileSync(out));
  assert.deepEqual(records.map((record) => record.type), ['header', 'data', 'abort']);
  assert.equal((records[1] as { offsetBytes: number }).offsetBytes, 5 * MiB);
  // Through a pipe the receiver stops too, keeps the good part for a resume, and no snapshot appears.
  const piped = await transfer(source, target, ['dmg@d1'], ['dmg']);
  assert.equal(piped.send.code, 1);
  assert.match(piped.receive.stderr, /interrupted: the sender stopped: send of dmg@d1 stopped: the extent at byte 9437184/);
  assert.match(await ok(target, 'snapshot', 'list', 'dmg'), /has no snapshots/);
  assert.match(await ok(target, 'receive', '--abort', 'dmg'), /aborted/);
  assert.doesNotMatch(await ok(target, 'volume', 'list'), /dmg/);
});
