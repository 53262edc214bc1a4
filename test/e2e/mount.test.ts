// The mounted path with real parts: nbdfuse turns the export into a file, losetup makes it a block device,
// mkfs.ext4 + mount + files with known checksums + umount + e2fsck -fn + remount + verify.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { makeTempDir, mustRun, runTool, startNode } from '../helpers/node-process.ts';

async function waitFor(condition: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test('nbdfuse + loop device + ext4: files survive umount, fsck and remount', { timeout: 180_000 }, async () => {
  const scratch = makeTempDir('mount');
  const node = await startNode(path.join(scratch, 'pool'));
  const fuseDir = path.join(scratch, 'fuse');
  const mountPoint = path.join(scratch, 'mnt');
  fs.mkdirSync(fuseDir);
  fs.mkdirSync(mountPoint);
  const pidFile = path.join(scratch, 'nbdfuse.pid');
  let loopDevice = '';
  let mounted = false;
  assert.equal((await node.cli('volume', 'create', 'fs', '--size', '512MiB')).code, 0);
  const nbdfuse = spawn('nbdfuse', ['-P', pidFile, fuseDir, node.uri('fs')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let nbdfuseErr = '';
  nbdfuse.stderr.on('data', (chunk: Buffer) => {
    nbdfuseErr += chunk.toString();
  });
  const nbdfuseExited = new Promise((resolve) => nbdfuse.once('exit', resolve));
  try {
    await waitFor(() => fs.existsSync(pidFile) && fs.existsSync(path.join(fuseDir, 'nbd')), `nbdfuse (${nbdfuseErr})`);
    loopDevice = (await mustRun('losetup', ['--find', '--show', path.join(fuseDir, 'nbd')])).trim();
    assert.match(loopDevice, /^\/dev\/loop\d+$/);
    await mustRun('mkfs.ext4', ['-q', '-F', loopDevice]);
    await mustRun('mount', [loopDevice, mountPoint]);
    mounted = true;
    const files = new Map<string, string>();
    for (let i = 0; i < 6; i++) {
      const data = crypto.randomBytes((i + 1) * 3 * 1024 * 1024 + i * 777);
      const name = `file-${i}.bin`;
      fs.writeFileSync(path.join(mountPoint, name), data);
      files.set(name, crypto.createHash('sha256').update(data).digest('hex'));
    }
    fs.mkdirSync(path.join(mountPoint, 'dir/nested'), { recursive: true });
    fs.writeFileSync(path.join(mountPoint, 'dir/nested/small.txt'), 'hello from chunkd\n');
    await mustRun('umount', [mountPoint]);
    mounted = false;

    const fsck = await runTool('e2fsck', ['-fn', loopDevice]);
    assert.equal(fsck.code, 0, `e2fsck -fn: ${fsck.stdout}${fsck.stderr}`);

    await mustRun('mount', [loopDevice, mountPoint]);
    mounted = true;
    for (const [name, sha] of files) {
      assert.equal(crypto.createHash('sha256').update(fs.readFileSync(path.join(mountPoint, name))).digest('hex'), sha, name);
    }
    assert.equal(fs.readFileSync(path.join(mountPoint, 'dir/nested/small.txt'), 'utf8'), 'hello from chunkd\n');
    const info = JSON.parse((await node.cli('volume', 'info', 'fs', '--json')).stdout);
    assert.ok(info.allocatedBytes > 60 * 1024 * 1024 && info.allocatedBytes < 200 * 1024 * 1024, `thin: ${info.allocatedBytes} allocated`);
  } finally {
    if (mounted) await runTool('umount', [mountPoint]);
    if (loopDevice) await runTool('losetup', ['-d', loopDevice]);
    await runTool('fusermount3', ['-u', fuseDir]);
    await Promise.race([nbdfuseExited, new Promise((resolve) => setTimeout(resolve, 5000))]);
    nbdfuse.kill('SIGKILL');
    assert.equal(await node.stop(), 0);
    const fsckPool = await node.cli('fsck', '--pool', node.pool);
    assert.equal(fsckPool.code, 0, fsckPool.stdout);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
