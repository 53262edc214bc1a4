// `chunkd completion bash` (issue 18): the script it prints, loaded into a real bash and asked as bash asks
// (COMP_WORDS, COMP_CWORD, then the function), completes commands, options, option values and volume names.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { commands } from '../../src/cli/help.ts';
import { chunkdBin, makeTempDir, mustRun, nodeBinary, startNode, type RunningNode } from '../helpers/node-process.ts';

const work = makeTempDir('completion');
const script = path.join(work, 'chunkd.bash');
const bin = path.join(work, 'bin');
let node: RunningNode;

beforeAll(async () => {
  fs.writeFileSync(script, await mustRun(nodeBinary, [chunkdBin, 'completion', 'bash']));
  // The script asks `chunkd volume list` for names: a chunkd on PATH, as an installed one would be.
  fs.mkdirSync(bin);
  fs.writeFileSync(path.join(bin, 'chunkd'), `#!/bin/sh\nexec ${nodeBinary} ${chunkdBin} "$@"\n`, { mode: 0o755 });
  node = await startNode(path.join(work, 'pool'));
  for (const name of ['alpha', 'albatross', 'beta']) assert.equal((await node.cli('volume', 'create', name, '--size', '4MiB')).code, 0);
});
afterAll(async () => {
  await node?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

/** What bash offers for the command line `line` (completing its last word; a trailing space starts a new one). */
async function complete(line: string): Promise<string[]> {
  const words = line.split(' ');
  const program = [
    `source ${script}`,
    `COMP_WORDS=(${words.map((word) => `'${word}'`).join(' ')})`,
    `COMP_CWORD=${words.length - 1}`,
    '_chunkd',
    'printf "%s\\n" "${COMPREPLY[@]}"',
  ].join('\n');
  const output = await mustRun('bash', ['-c', program], { cwd: work, env: { ...process.env, PATH: `${bin}:${process.env.PATH}`, CHUNKD_API: node.apiSocket } });
  return output.split('\n').filter((word) => word !== '').sort();
}

test('the script is valid bash and completes every command of the help table', async () => {
  await mustRun('bash', ['-n', script]);
  const top = [...new Set(Object.keys(commands).map((key) => key.split(' ')[0]!))].sort();
  assert.deepEqual(await complete('chunkd '), top);
  assert.deepEqual(await complete('chunkd vo'), ['volume']);
  assert.deepEqual(await complete('chunkd volume '), Object.keys(commands).filter((key) => key.startsWith('volume ')).map((key) => key.slice(7)).sort());
  assert.deepEqual(await complete('chunkd replica pr'), ['promote']);
});

test('options, their values, and volume names from the node', async () => {
  assert.deepEqual(await complete('chunkd volume create data --si'), ['--size']);
  assert.deepEqual(await complete('chunkd volume create data --s'), ['--size', '--sync', '--sync-timeout']);
  assert.ok((await complete('chunkd serve --')).includes('--nbd-threads'));
  assert.deepEqual(await complete('chunkd serve --tls '), ['off', 'on', 'require']);
  assert.deepEqual(await complete('chunkd serve --verify-reads o'), ['off', 'on']);
  fs.mkdirSync(path.join(work, 'pooldir'), { recursive: true });
  assert.deepEqual(await complete('chunkd serve --pool poold'), ['pooldir']);
  assert.deepEqual(await complete('chunkd volume info al'), ['albatross', 'alpha']);
  assert.deepEqual(await complete('chunkd snapshot create b'), ['beta']);
  // A new volume's name is the user's: nothing to offer.
  assert.deepEqual(await complete('chunkd volume create '), []);
});

test('completion takes bash only', async () => {
  const result = await node.cli('completion', 'zsh');
  assert.equal(result.code, 2);
  assert.match(result.stderr, /chunkd completion bash/);
});
