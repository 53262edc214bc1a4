// The NBD server against real clients (libnbd's nbdinfo, qemu-io), as nbdkit's own tests do: a memory export
// on a temporary unix socket. Each test is skipped where its client is not installed.
import { test } from 'vitest';
import type { TestContext } from 'vitest';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { NbdServer } from '../../src/nbd/server.ts';
import { MemoryProvider } from './helpers/memory-device.ts';

const run = promisify(execFile);
const MiB = 1 << 20;

function findTool(name: string): string | null {
  for (const directory of (process.env.PATH ?? '').split(path.delimiter)) {
    const candidate = path.join(directory, name);
    if (directory !== '' && existsSync(candidate)) return candidate;
  }
  return null;
}

const nbdinfo = findTool('nbdinfo');
const qemuIo = findTool('qemu-io');

async function serve(t: TestContext): Promise<{ provider: MemoryProvider; uri: (name: string) => string; server: NbdServer }> {
  const directory = await fs.mkdtemp(path.join(os.tmpdir(), 'chunkd-nbd-'));
  const socketPath = path.join(directory, 'nbd.sock');
  const provider = new MemoryProvider();
  provider.add('mem', 16 * MiB, { description: 'a memory disk' });
  provider.add('ro', MiB, { readOnly: true });
  const server = new NbdServer({ provider });
  await server.listenUnix(socketPath);
  t.onTestFinished(async () => {
    await server.close();
    await fs.rm(directory, { recursive: true, force: true });
  });
  return { provider, server, uri: (name) => `nbd+unix:///${name}?socket=${socketPath}` };
}

test('nbdinfo --json sees the export, its size, flags, block sizes and base:allocation', { skip: nbdinfo === null }, async (t) => {
  const { uri, provider } = await serve(t);
  const { stdout } = await run(nbdinfo!, ['--json', uri('mem')]);
  const info = JSON.parse(stdout) as { protocol: string; structured: boolean; exports: Array<Record<string, unknown>> };
  assert.equal(info.protocol, 'newstyle-fixed');
  assert.equal(info.structured, true);
  const [mem] = info.exports;
  assert.equal(mem!['export-name'], 'mem');
  assert.equal(mem!['export-size'], 16 * MiB);
  assert.equal(mem!.description, 'a memory disk');
  assert.deepEqual(mem!.contexts, ['base:allocation']);
  for (const capability of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_cache', 'can_df', 'can_multi_conn']) {
    assert.equal(mem![capability], true, capability);
  }
  assert.equal(mem!.is_read_only, false);
  assert.equal(mem!.block_size_minimum, 1);
  assert.equal(mem!.block_size_preferred, 4096);
  assert.equal(mem!.block_size_maximum, 32 * MiB);
  const readOnly = JSON.parse((await run(nbdinfo!, ['--json', uri('ro')])).stdout) as typeof info;
  assert.equal(readOnly.exports[0]!.is_read_only, true);
  const list = (await run(nbdinfo!, ['--list', '--json', uri('')])).stdout;
  assert.deepEqual((JSON.parse(list) as typeof info).exports.map((entry) => entry['export-name']).sort(), ['mem', 'ro']);
  await assert.rejects(run(nbdinfo!, [uri('missing')]));
  assert.equal(provider.openDevices, 0);
});

test('nbdinfo --map reports holes and data', { skip: nbdinfo === null }, async (t) => {
  const { uri, provider } = await serve(t);
  const disk = provider.exports.get('mem')!.disk;
  disk.allocated.fill(1, 256, 512); // 1 MiB of data at 1 MiB
  const { stdout } = await run(nbdinfo!, ['--map', '--json', uri('mem')]);
  const map = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
  assert.deepEqual(map.map(({ offset, length, type }) => [offset, length, type]), [
    [0, MiB, 3],
    [MiB, MiB, 0],
    [2 * MiB, 14 * MiB, 3],
  ]);
});

test('qemu-io writes, reads back, zeroes and discards', { skip: qemuIo === null }, async (t) => {
  const { uri, provider } = await serve(t);
  const { stdout } = await run(qemuIo!, [
    '-f', 'raw', uri('mem'),
    '-c', 'write -P 0xab 0 64k',
    '-c', 'read -P 0xab 0 64k',
    '-c', 'write -f -P 0xcd 1M 4k',
    '-c', 'read -P 0xcd 1M 4k',
    '-c', 'write -z -u 0 4k',
    '-c', 'read -P 0 0 4k',
    '-c', 'read -P 0xab 4k 60k',
    '-c', 'discard 32k 32k',
    '-c', 'read -P 0 32k 32k',
    '-c', 'aio_write -P 0x11 2M 128k',
    '-c', 'aio_write -P 0x22 3M 128k',
    '-c', 'aio_flush',
    '-c', 'read -P 0x22 3M 128k',
    '-c', 'flush',
  ]);
  assert.doesNotMatch(stdout, /Pattern verification failed|error|failed/i, stdout);
  assert.match(stdout, /read 65536\/65536 bytes at offset 0/);
  const disk = provider.exports.get('mem')!.disk.data;
  assert.ok(disk.subarray(4096, 32768).every((byte) => byte === 0xab));
  assert.ok(disk.subarray(2 * MiB, 2 * MiB + 131072).every((byte) => byte === 0x11));
  assert.ok(provider.writeLog.some((entry) => entry.op === 'write' && entry.options?.fua === true), 'qemu-io write -f sends FUA');
  assert.ok(provider.flushes >= 1);
});

test('qemu-io on a read-only export can read and cannot write', { skip: qemuIo === null }, async (t) => {
  const { uri, provider } = await serve(t);
  await run(qemuIo!, ['-r', '-f', 'raw', uri('ro'), '-c', 'read -P 0 0 64k']);
  const writing = await run(qemuIo!, ['-f', 'raw', uri('ro'), '-c', 'write -P 1 0 4k']).then(
    (result) => `${result.stdout}${result.stderr}`,
    (error: { stdout?: string; stderr?: string }) => `${error.stdout ?? ''}${error.stderr ?? ''}`,
  );
  assert.match(writing, /read-only|Operation not permitted|Permission denied/i);
  assert.equal(provider.writeLog.length, 0);
});
