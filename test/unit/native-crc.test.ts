// The chunk checksums' native CRC (native/crc32.c through src/store/native-crc.ts): every kernel this CPU runs
// gives @node-rs/crc32's value for every length (the folds start at 64 and 128 bytes, the byte table takes the
// rest) and every alignment, over plain and shared memory, a block at a time and many in one call; and the store's
// checksum functions give the same sums through either engine (a node without a C compiler uses @node-rs/crc32).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { crc32 } from '@node-rs/crc32';
import { test } from 'vitest';
import { chunkSizeBytes } from '../../src/core/limits.ts';
import { blockChecksum, checksumEngine, zeroChunkSum } from '../../src/store/checksum.ts';
import { chunkSums } from '../../src/store/chunk-io.ts';
import { loadNativeCrc, nativeCrcLibrary, type NativeCrc } from '../../src/store/native-crc.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';
import { mustRun, nodeBinary, repoRoot } from '../helpers/node-process.ts';

const reference = (bytes: Uint8Array): number => crc32(bytes as Buffer) >>> 0;

function randomBytes(random: () => number, length: number, shared: boolean): Uint8Array {
  const bytes = shared ? new Uint8Array(new SharedArrayBuffer(length)) : new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = randomInt(random, 256);
  return bytes;
}

/** Each kernel this CPU runs, the best first. */
function kernels(): NativeCrc[] {
  const best = loadNativeCrc('auto');
  assert.ok(best !== null);
  const order = ['vpclmul', 'pclmul', 'table'];
  return order.slice(order.indexOf(best.kernel)).map((kernel) => loadNativeCrc(kernel)!);
}

test('the native CRC is built on x86-64 Linux (npm ci runs native/build.sh) and runs its best kernel by default', () => {
  if (process.arch !== 'x64' || process.platform !== 'linux') return;
  assert.ok(fs.existsSync(nativeCrcLibrary), `${nativeCrcLibrary} is missing: setup.sh installs gcc and npm ci builds it (sh native/build.sh)`);
  const loaded = loadNativeCrc('auto');
  assert.ok(loaded !== null && loaded.kernel !== 'table', `the native CRC chose ${loaded?.kernel}: an x86-64 CPU without PCLMULQDQ?`);
  assert.match(checksumEngine(), new RegExp(`^CRC-32 by .*libchunkd-crc32\\.so \\(${loaded.kernel} kernel\\)$`));
  assert.equal(loadNativeCrc('node-rs'), null);
  assert.throws(() => loadNativeCrc('sse9'), /CHUNKD_CRC="sse9": expected one of auto, table, pclmul, vpclmul, node-rs/);
});

test('every kernel gives the reference CRC for every length up to 600 bytes and at every alignment', () => {
  const random = makeRandom(testSeed('native CRC lengths'));
  const backing = randomBytes(random, 700, false);
  for (const crc of kernels()) {
    for (let length = 0; length <= 600; length++) {
      const offset = length % 17;
      const bytes = backing.subarray(offset, offset + length);
      assert.equal(crc.checksum(bytes), reference(bytes), `${crc.kernel}: ${length} bytes at offset ${offset}`);
    }
  }
});

test('every kernel checks out on 4 KiB blocks and long runs, in plain and shared memory, one block or many in a call', () => {
  const random = makeRandom(testSeed('native CRC blocks'));
  for (const shared of [false, true]) {
    const data = randomBytes(random, 64 * chunkSizeBytes + 24, shared);
    for (const crc of kernels()) {
      for (const [offset, count] of [[0, 1], [0, 64], [8, 17], [3, 1], [24, 64]] as const) {
        const bytes = data.subarray(offset, offset + count * chunkSizeBytes);
        const backing = new Uint32Array(count + 4).fill(0xdeadbeef);
        const out = backing.subarray(2, 2 + count);
        crc.blocks(bytes, chunkSizeBytes, count, out);
        for (let i = 0; i < count; i++) assert.equal(out[i], reference(bytes.subarray(i * chunkSizeBytes, (i + 1) * chunkSizeBytes)), `${crc.kernel}, shared ${shared}: block ${i} of ${count} at offset ${offset}`);
        assert.deepEqual([backing[0], backing[1], backing[count + 2], backing[count + 3]], [0xdeadbeef, 0xdeadbeef, 0xdeadbeef, 0xdeadbeef], `${crc.kernel}: wrote outside its sums`);
        assert.equal(crc.checksum(bytes), reference(bytes), `${crc.kernel}: ${count} blocks as one run`);
      }
      // Blocks of other sizes: under and across the folds' thresholds.
      for (const blockBytes of [1, 63, 64, 100, 127, 128, 144, 1000]) {
        const out = new Uint32Array(20);
        crc.blocks(data, blockBytes, 20, out);
        for (let i = 0; i < 20; i++) assert.equal(out[i], reference(data.subarray(i * blockBytes, (i + 1) * blockBytes)), `${crc.kernel}: block ${i} of ${blockBytes} bytes`);
      }
      assert.throws(() => crc.blocks(data.subarray(0, chunkSizeBytes), chunkSizeBytes, 2, new Uint32Array(2)), RangeError);
      assert.throws(() => crc.blocks(data, chunkSizeBytes, 2, new Uint32Array(1)), RangeError);
    }
  }
  // A damaged byte changes the block's sum and no other.
  const crc = kernels()[0]!;
  const data = randomBytes(random, 8 * chunkSizeBytes, false);
  const before = new Uint32Array(8);
  crc.blocks(data, chunkSizeBytes, 8, before);
  data[5 * chunkSizeBytes + 1234]! ^= 0x10;
  const after = new Uint32Array(8);
  crc.blocks(data, chunkSizeBytes, 8, after);
  assert.deepEqual([...after].map((sum, i) => sum !== before[i]), [false, false, false, false, false, true, false, false]);
});

test('the store\'s checksums are the same through the native CRC and through @node-rs/crc32 (CHUNKD_CRC=node-rs)', async () => {
  const random = makeRandom(testSeed('checksum engines'));
  const data = randomBytes(random, 40 * chunkSizeBytes, false);
  const sums = chunkSums(data);
  for (let i = 0; i < 40; i++) assert.equal(sums[i], reference(data.subarray(i * chunkSizeBytes, (i + 1) * chunkSizeBytes)));
  assert.equal(blockChecksum(data.subarray(0, chunkSizeBytes)), sums[0]);
  assert.equal(zeroChunkSum, reference(new Uint8Array(chunkSizeBytes)));
  // The same bytes in a process whose checksums take the fallback.
  const script = [
    `import { chunkSums } from ${JSON.stringify(`${repoRoot}/src/store/chunk-io.ts`)};`,
    `import { checksumEngine } from ${JSON.stringify(`${repoRoot}/src/store/checksum.ts`)};`,
    "import fs from 'node:fs';",
    "const data = Buffer.from(fs.readFileSync(0, 'utf8'), 'base64');",
    'console.log(JSON.stringify({ engine: checksumEngine(), sums: [...chunkSums(data)] }));',
  ].join('\n');
  const output = JSON.parse(await mustRun(nodeBinary, ['--input-type=module', '-e', script], { env: { ...process.env, CHUNKD_CRC: 'node-rs' }, input: Buffer.from(data).toString('base64') })) as { engine: string; sums: number[] };
  assert.equal(output.engine, 'CRC-32 by @node-rs/crc32 (CHUNKD_CRC=node-rs)');
  assert.deepEqual(output.sums, [...sums]);
});
