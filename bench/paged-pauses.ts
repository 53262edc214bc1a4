// In process, the event loop's pauses while 4 KiB writes at random go into a paged pool (issue 15: "no event-loop
// pause over 50 ms", checkpoints included). A fresh pool with paged metadata and a cache of --cache, one volume of
// --volume, --writes 4 KiB writes at random at QD32 and a flush; a checkpoint starts whenever the journal fills.
// Prints, every --report writes and for the whole run: writes a second, the process's CPU per write (user +
// system, all threads), the longest pause of the loop and the 99th percentile of its delay (perf_hooks'
// monitorEventLoopDelay, 1 ms resolution); then the longest gaps over 50 ms (a 1 ms timer that came late) with
// the writes and checkpoints done by then. With GAPS_FILE=F the gaps are written to F with their end in
// microseconds of the monotonic clock, to be laid over a `node --cpu-prof` profile of the same run.
// On a loaded machine a gap is mostly time the process waited for a CPU: so each gap also says how much CPU the
// main thread used in it (`process.threadCpuUsage`), and the run ends with the longest such CPU between two turns
// of the timer and the turns that held the loop for over 50 ms of its own CPU (what a pause would be on an idle
// machine; the garbage collector's main-thread work included, its helper threads' not).
// --tree DIR loads the store from another checkout (a worktree of a base commit), so that old and new run the
// same script, interleaved.
// Usage: node bench/paged-pauses.ts [--writes 2097152] [--cache 64MiB] [--volume 64GiB] [--report 524288] [--dir DIR] [--tree DIR]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    writes: { type: 'string', default: '2097152' },
    cache: { type: 'string', default: '64MiB' },
    volume: { type: 'string', default: '64GiB' },
    report: { type: 'string', default: '524288' },
    dir: { type: 'string' },
    tree: { type: 'string', default: path.join(import.meta.dirname, '..') },
  },
});
const tree = path.resolve(values.tree);
const { Pool } = (await import(path.join(tree, 'src/store/pool.ts'))) as typeof import('../src/store/pool.ts');
const { parseSize } = (await import(path.join(tree, 'src/core/units.ts'))) as typeof import('../src/core/units.ts');
const writes = Number(values.writes);
const reportEvery = Number(values.report);
const volumeBytes = parseSize(values.volume);
const blocks = volumeBytes / 4096;
const queueDepth = 32;
const directory = values.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-paged-pauses-'));
fs.rmSync(directory, { recursive: true, force: true });
fs.mkdirSync(directory, { recursive: true });

interface Gap {
  atSeconds: number;
  ms: number;
  writes: number;
  checkpoints: number;
  endUs: number;
  /** The main thread's CPU during the gap. */
  cpuMs: number;
}

try {
  const pool = await Pool.open({ directory: path.join(directory, 'pool'), metadata: 'paged', metadataCacheBytes: parseSize(values.cache) });
  await pool.createVolume('v', volumeBytes);
  const volume = pool.openVolume('v');
  const data = Buffer.alloc(4096, 7);
  const gaps: Gap[] = [];
  let issued = 0;
  let checkpoints = 0;
  const started = performance.now();
  let last = started;
  const threadCpuMs = (): number => {
    const usage = process.threadCpuUsage();
    return (usage.user + usage.system) / 1000;
  };
  let lastCpu = threadCpuMs();
  let heldCpuMax = 0;
  let heldOver50 = 0;
  const tick = setInterval(() => {
    const now = performance.now();
    const cpuNow = threadCpuMs();
    const cpuMs = cpuNow - lastCpu;
    if (now - last > 50) gaps.push({ atSeconds: (now - started) / 1000, ms: Math.round(now - last), writes: issued, checkpoints, endUs: Number(process.hrtime.bigint() / 1000n), cpuMs: Math.round(cpuMs) });
    heldCpuMax = Math.max(heldCpuMax, cpuMs);
    if (cpuMs > 50) heldOver50 += 1;
    last = now;
    lastCpu = cpuNow;
  }, 1);
  const poll = setInterval(() => {
    void pool.status().then((status) => {
      checkpoints = status.checkpointsTotal;
    });
  }, 200);
  const total = monitorEventLoopDelay({ resolution: 1 });
  total.enable();
  let window = monitorEventLoopDelay({ resolution: 1 });
  window.enable();
  const cpu = process.cpuUsage();
  let windowStart = performance.now();
  let windowCpu = process.cpuUsage();
  const cpuPerWrite = (usage: NodeJS.CpuUsage, count: number): string => ((usage.user + usage.system) / count).toFixed(1);
  const ms = (nanoseconds: number): string => (nanoseconds / 1e6).toFixed(1);
  await Promise.all(Array.from({ length: queueDepth }, async () => {
    while (issued < writes) {
      issued += 1;
      if (issued % reportEvery === 0) {
        console.log(`${((issued * 4096) / 2 ** 30).toFixed(2)} GiB: ${Math.round(reportEvery / ((performance.now() - windowStart) / 1000))} writes/s, ${cpuPerWrite(process.cpuUsage(windowCpu), reportEvery)} us CPU each, longest pause ${ms(window.max)} ms, p99 ${ms(window.percentile(99))} ms, RSS ${(process.memoryUsage().rss / 2 ** 20).toFixed(0)} MiB`);
        window.disable();
        window = monitorEventLoopDelay({ resolution: 1 });
        window.enable();
        windowStart = performance.now();
        windowCpu = process.cpuUsage();
      }
      await volume.write(Math.floor(Math.random() * blocks) * 4096, data);
    }
  }));
  await volume.flush();
  const used = process.cpuUsage(cpu);
  clearInterval(tick);
  clearInterval(poll);
  total.disable();
  window.disable();
  const status = await pool.status();
  console.log(`total: ${writes} writes in ${((performance.now() - started) / 1000).toFixed(1)} s, ${cpuPerWrite(used, writes)} us CPU each, ${status.checkpointsTotal} checkpoints, longest pause ${ms(total.max)} ms, p99 ${ms(total.percentile(99))} ms, p99.9 ${ms(total.percentile(99.9))} ms`);
  const longest = [...gaps].sort((a, b) => b.ms - a.ms).slice(0, 8);
  console.log(`gaps over 50 ms: ${gaps.length}; longest: ${longest.map((gap) => `${gap.ms} ms (${gap.cpuMs} ms CPU) at ${gap.atSeconds.toFixed(1)} s (${gap.checkpoints} checkpoints)`).join(', ')}`);
  const mostCpu = [...gaps].sort((a, b) => b.cpuMs - a.cpuMs).slice(0, 8);
  console.log(`main thread's CPU between two turns: longest ${heldCpuMax.toFixed(1)} ms; turns over 50 ms of CPU: ${heldOver50}; the gaps of most CPU: ${mostCpu.map((gap) => `${gap.cpuMs} ms CPU in ${gap.ms} ms at ${gap.atSeconds.toFixed(1)} s`).join(', ')}`);
  if (process.env.GAPS_FILE) fs.writeFileSync(process.env.GAPS_FILE, JSON.stringify(gaps));
  await volume.close();
  await pool.close();
} finally {
  fs.rmSync(directory, { recursive: true, force: true });
}
