// The event loop's longest pause split into the main thread's CPU, its wait for a CPU and the rest
// (loop-pauses.ts): each part shown by making the thread spend a pause that way for real: a busy loop (CPU), a
// sleep (elsewhere), and a busy loop on a core another busy process shares (run queue); and beside the split, the
// CPU the process's other threads took within the gap (a worker thread's busy loop while the main thread sleeps).
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { Worker } from 'node:worker_threads';
import { test } from 'vitest';
import { describeLoopPause, LoopPauses, openThreadClock, overlapMs, parseSchedstat, splitGap, type LoopPause } from '../../src/node/loop-pauses.ts';

const loopPausesModule = path.resolve(import.meta.dirname, '../../src/node/loop-pauses.ts');

test('schedstat is read as CPU and run-queue nanoseconds; a gap is split into them and the rest', () => {
  assert.deepEqual(parseSchedstat('43447405 8997848 68\n'), { cpuNs: 43447405, runQueueNs: 8997848 });
  assert.equal(parseSchedstat('garbage'), null);
  const pause = splitGap(120e6, 10e6, { cpuNs: 1e6, runQueueNs: 2e6, processCpuNs: 10e6 }, { cpuNs: 31e6, runQueueNs: 72e6, processCpuNs: 140e6 }, 5);
  assert.deepEqual(pause, { delaySeconds: 0.11, gapSeconds: 0.12, onCpuSeconds: 0.03, runQueueSeconds: 0.07, elsewhereSeconds: 0.02, gcSeconds: 0, majorGcSeconds: 0, otherThreadsCpuSeconds: 0.1, endedAtMs: 5 });
  assert.equal(overlapMs({ startMs: 10, endMs: 20 }, { startMs: 15, endMs: 30 }), 5);
  assert.equal(overlapMs({ startMs: 10, endMs: 20 }, { startMs: 20, endMs: 30 }), 0);
  assert.equal(overlapMs({ startMs: 10, endMs: 20 }, { startMs: 12, endMs: 13 }), 1);
  const unknownQueue = splitGap(50e6, 10e6, { cpuNs: 0, runQueueNs: null, processCpuNs: 0 }, { cpuNs: 20e6, runQueueNs: null, processCpuNs: 20e6 }, 0);
  assert.equal(unknownQueue.runQueueSeconds, null);
  assert.equal(unknownQueue.elsewhereSeconds, 0.03);
  assert.equal(unknownQueue.otherThreadsCpuSeconds, 0);
  assert.equal(describeLoopPause({ ...pause, gcSeconds: 0.012 }), '120 ms (30 on CPU, 70 waiting for a CPU, 20 elsewhere; 12 in collections; other threads 100 ms of CPU)');
  assert.equal(describeLoopPause({ ...pause, gcSeconds: 0.05, majorGcSeconds: 0.04 }), '120 ms (30 on CPU, 70 waiting for a CPU, 20 elsewhere; 50 in collections (40 full); other threads 100 ms of CPU)');
  // This kernel says: the tests below need the run queue.
  assert.notEqual(openThreadClock().read().runQueueNs, null);
});

const ticks = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function busy(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until);
}

test('a pause the thread spends computing is on its CPU, one it spends asleep is elsewhere', async () => {
  const pauses = new LoopPauses();
  pauses.start();
  try {
    await ticks(30);
    busy(150);
    await ticks(30);
    const computing = pauses.longest()!;
    assert.ok(computing.gapSeconds >= 0.15, `gap ${computing.gapSeconds}`);
    // The test's machine may be shared: the CPU plus the wait for it make the busy loop's wall time, less what the
    // hypervisor took (steal time counts as neither: seen here, 139 ms of CPU and 21 ms elsewhere in a 160 ms gap).
    assert.ok(computing.onCpuSeconds + (computing.runQueueSeconds ?? 0) >= 0.12, JSON.stringify(computing));
    assert.ok(computing.elsewhereSeconds < 0.045, JSON.stringify(computing));

    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 300);
    await ticks(30);
    const asleep = pauses.longest()!;
    assert.ok(asleep.gapSeconds >= 0.3, `gap ${asleep.gapSeconds}`);
    assert.ok(asleep.endedAtMs > computing.endedAtMs);
    assert.ok(asleep.onCpuSeconds < 0.05, JSON.stringify(asleep));
    assert.ok(asleep.elsewhereSeconds >= 0.25, JSON.stringify(asleep));
    assert.ok(asleep.otherThreadsCpuSeconds < 0.1, JSON.stringify(asleep));
  } finally {
    pauses.stop();
  }
});

test("the CPU the process's other threads took within a gap: a worker's busy loop while the main thread sleeps", { timeout: 20_000 }, async () => {
  const pauses = new LoopPauses();
  pauses.start();
  const signal = new Int32Array(new SharedArrayBuffer(4));
  // The worker spins until told to stop; the main thread sleeps 300 ms meanwhile, then tells it.
  const worker = new Worker('const { workerData } = require("node:worker_threads"); const flag = new Int32Array(workerData); Atomics.store(flag, 0, 1); while (Atomics.load(flag, 0) === 1);', { eval: true, workerData: signal.buffer });
  try {
    while (Atomics.load(signal, 0) !== 1) await ticks(10);
    await ticks(30);
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 300);
    Atomics.store(signal, 0, 2);
    await ticks(30);
    const pause = pauses.longest()!;
    assert.ok(pause.gapSeconds >= 0.3, JSON.stringify(pause));
    assert.ok(pause.onCpuSeconds < 0.05, JSON.stringify(pause));
    // The worker ran for most of the gap (on a shared machine, at least half of it).
    assert.ok(pause.otherThreadsCpuSeconds >= 0.15 && pause.otherThreadsCpuSeconds <= pause.gapSeconds * 2 + 0.02, JSON.stringify(pause));
  } finally {
    pauses.stop();
    await worker.terminate();
  }
});

test("a pause V8's collector took is counted as the collections' time within it, and a long gap is told with it", { timeout: 20_000 }, async () => {
  // A child with --expose-gc: 300 ms of busy loop around full collections of a heap of some 100 MiB of live
  // objects; its longest gap holds them, and the gap told (over 50 ms) says the same. The heap is made before the
  // probe starts: its scavenges would make a gap of their own, as long.
  const script = `
    import { LoopPauses } from ${JSON.stringify(loopPausesModule)};
    const told = [];
    const live = Array.from({ length: 1_000_000 }, (_, i) => ({ i, text: 'x' + i }));
    const pauses = new LoopPauses({ longGapMs: 50, onLongGap: (pause) => told.push(pause) });
    pauses.start();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const until = performance.now() + 300;
    let collections = 0;
    while (performance.now() < until) if (collections < 3) { globalThis.gc(); collections += 1; }
    await new Promise((resolve) => setTimeout(resolve, 300));
    process.stdout.write(JSON.stringify({ longest: pauses.longest(), told, live: live.length }));
    pauses.stop();
  `;
  const { stdout } = await promisify(execFile)(process.execPath, ['--expose-gc', '--input-type=module', '-e', script]);
  const { longest, told } = JSON.parse(stdout) as { longest: LoopPause; told: LoopPause[] };
  assert.ok(longest.gapSeconds >= 0.3, stdout);
  assert.ok(longest.gcSeconds > 0.005 && longest.gcSeconds <= longest.gapSeconds, stdout);
  // gc() is a full collection: its pauses are the full ones' time (less any scavenge V8 slipped in beside them).
  assert.ok(longest.majorGcSeconds > 0.005 && longest.majorGcSeconds <= longest.gcSeconds, stdout);
  const same = told.find((pause) => pause.endedAtMs === longest.endedAtMs);
  assert.ok(same !== undefined, stdout);
  assert.equal(same.gcSeconds, longest.gcSeconds);
  assert.equal(same.majorGcSeconds, longest.majorGcSeconds);
});

test('a pause spent waiting for a core another process holds is run-queue time', { timeout: 20_000 }, async () => {
  // Both on core 0: a busy process, and a child that busies its main thread for 600 ms of wall time and reports
  // its longest pause; the scheduler shares the core, so about half of the child's pause is spent waiting.
  const hog = spawn('taskset', ['-c', '0', process.execPath, '-e', 'for (;;);'], { stdio: 'ignore' });
  try {
    await ticks(100);
    const script = `
      import { LoopPauses } from ${JSON.stringify(loopPausesModule)};
      const pauses = new LoopPauses();
      pauses.start();
      await new Promise((resolve) => setTimeout(resolve, 50));
      const until = performance.now() + 600;
      while (performance.now() < until);
      await new Promise((resolve) => setTimeout(resolve, 50));
      process.stdout.write(JSON.stringify(pauses.longest()));
      pauses.stop();
    `;
    const { stdout } = await promisify(execFile)('taskset', ['-c', '0', process.execPath, '--input-type=module', '-e', script]);
    const pause = JSON.parse(stdout) as LoopPause;
    assert.ok(pause.gapSeconds >= 0.6, stdout);
    assert.ok(pause.runQueueSeconds! >= 0.15, stdout);
    assert.ok(pause.onCpuSeconds >= 0.15, stdout);
    assert.ok(Math.abs(pause.gapSeconds - pause.onCpuSeconds - pause.runQueueSeconds! - pause.elsewhereSeconds) < 1e-6, stdout);
  } finally {
    hog.kill('SIGKILL');
  }
});
