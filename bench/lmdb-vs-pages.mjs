// The micro benchmark behind the choice in src/store/paged-metadata.md ("Measured to inform the choice"): map
// lookups in today's in-memory pages, in 4 KiB pages behind lru-cache (all cached, and 1/16 cached with a pread
// per miss), and in LMDB, for N entries spread as 4 KiB random writes leave them in a 1 TiB volume.
// lmdb is not a dependency of chunkd: run this outside the repo, in a scratch directory of its own:
//   mkdir /tmp/lmdb-scratch && cp bench/lmdb-vs-pages.mjs /tmp/lmdb-scratch && cd /tmp/lmdb-scratch &&
//   npm init -y && npm install lmdb@3 lru-cache@11 && node --expose-gc lmdb-vs-pages.mjs [ENTRIES] [DATA_DIR]
// (default 4,194,304 entries: 16 GiB of 4 KiB chunks; DATA_DIR is removed at the end).
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import { open } from 'lmdb';
import { LRUCache } from 'lru-cache';

const N = Number(process.argv[2] ?? 4_194_304); // 16 GiB of 4 KiB chunks
const LOOKUPS = 2_000_000;
const dir = process.argv[3] ?? '/tmp/lmdb-scratch/data';
fs.rmSync(dir, { recursive: true, force: true });
fs.mkdirSync(dir, { recursive: true });
const rss = () => Math.round(process.memoryUsage().rss / 2 ** 20);
let seed = 12345;
const rand = () => (seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0);
// Keys: N distinct chunks spread over a 1 TiB volume (2^28 chunks), as random 4 KiB writes leave them.
const keys = new Uint32Array(N);
{
  const seen = new Set();
  for (let i = 0; i < N; ) { const k = rand() & (2 ** 28 - 1); if (!seen.has(k)) { seen.add(k); keys[i++] = k; } }
}
const order = new Uint32Array(LOOKUPS).map(() => keys[rand() % N]);
const out = {};

// 1. In memory: a page (Uint32Array of 512 x 2 words) per 2 MiB, in a Map, as chunk-map.ts does today.
{
  const pages = new Map();
  let t = performance.now();
  for (const k of keys) {
    const p = k >>> 9; let page = pages.get(p);
    if (page === undefined) pages.set(p, (page = new Uint32Array(1024)));
    page[(k & 511) * 2] = k; page[(k & 511) * 2 + 1] = k ^ 0xdead;
  }
  out.memoryInsertNsPerEntry = ((performance.now() - t) * 1e6) / N;
  t = performance.now(); let x = 0;
  for (const k of order) x ^= pages.get(k >>> 9)[(k & 511) * 2];
  out.memoryLookupNs = ((performance.now() - t) * 1e6) / LOOKUPS;
  out.memoryPages = pages.size; out.memoryRssMiB = rss(); out.x1 = x;
  // Our own pages in a file, read through lru-cache: a full cache, and one of 1/16 of the pages (misses pread).
  const file = `${dir}/pages.bin`; const fd = fs.openSync(file, 'w+');
  const slot = new Map(); let n = 0;
  for (const [p, page] of pages) { fs.writeSync(fd, Buffer.from(page.buffer), 0, 4096, n * 4096); slot.set(p, n++); }
  for (const [label, max] of [['lruAll', pages.size], ['lruSixteenth', Math.ceil(pages.size / 16)]]) {
    const cache = new LRUCache({ max });
    const load = (p) => { let b = cache.get(p); if (b === undefined) { b = Buffer.allocUnsafe(4096); fs.readSync(fd, b, 0, 4096, slot.get(p) * 4096); cache.set(p, b); } return b; };
    for (const k of order) load(k >>> 9); // warm
    t = performance.now(); x = 0;
    for (const k of order) x ^= load(k >>> 9).readUInt32LE((k & 511) * 8);
    out[`${label}LookupNs`] = ((performance.now() - t) * 1e6) / LOOKUPS; out[`x_${label}`] = x;
  }
  fs.closeSync(fd);
}
global.gc?.();

// 2. lmdb: one entry per chunk, key the chunk number, 8-byte value; writes in transactions of 4096 (a group
// commit), each durable (lmdb's default sync); then random gets (the file in the page cache).
{
  const db = open({ path: `${dir}/lmdb`, keyEncoding: 'uint32', encoding: 'binary', compression: false });
  const value = Buffer.alloc(8);
  let t = performance.now();
  for (let i = 0; i < N; i += 4096) {
    await db.transaction(() => { for (let j = i; j < Math.min(N, i + 4096); j++) { value.writeUInt32LE(keys[j], 0); db.put(keys[j], value); } });
  }
  out.lmdbInsertNsPerEntry = ((performance.now() - t) * 1e6) / N;
  t = performance.now(); let x = 0;
  for (const k of order) x ^= db.getBinaryFast(k).readUInt32LE(0);
  out.lmdbLookupNs = ((performance.now() - t) * 1e6) / LOOKUPS; out.x2 = x;
  // A small durable commit (one put), as a FLUSH after one write would be.
  const lat = [];
  for (let i = 0; i < 200; i++) { const s = performance.now(); await db.transaction(() => db.put(keys[i], value)); lat.push(performance.now() - s); }
  lat.sort((a, b) => a - b); out.lmdbOnePutCommitMsMedian = lat[100];
  const o = performance.now(); const db2 = open({ path: `${dir}/lmdb-reopen-probe`, keyEncoding: 'uint32', encoding: 'binary' }); out.lmdbOpenMs = performance.now() - o; db2.close();
  await db.close();
  const st = fs.statSync(`${dir}/lmdb`);
  const bytes = st.isDirectory() ? fs.readdirSync(`${dir}/lmdb`).reduce((s, f) => s + fs.statSync(`${dir}/lmdb/${f}`).blocks * 512, 0) : st.blocks * 512;
  out.lmdbFileMiB = Math.round(bytes / 2 ** 20);
  out.lmdbRssMiB = rss();
}
fs.rmSync(dir, { recursive: true, force: true });
console.log(JSON.stringify({ N, LOOKUPS, ...out }, null, 1));
