// The malloc trim after V8's full collections (core/malloc-trim.ts): a full collection leads to one trim, trims
// keep their spacing, a trim that fails or a libc that cannot be loaded changes nothing else, and glibc's own
// malloc_trim runs off the event loop and gives freed memory back.
import assert from 'node:assert/strict';
import v8 from 'node:v8';
import vm from 'node:vm';
import { test } from 'vitest';
import { libcTrim, MallocTrimmer, type TrimCall } from '../../src/core/malloc-trim.ts';

v8.setFlagsFromString('--expose-gc');
const fullCollection = vm.runInNewContext('gc') as (options?: { type: 'major' | 'minor' }) => void;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits (polling, which also keeps the event loop turning: Node hands gc entries over on its next turn) until `done`, or 5 s. */
async function until(done: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !done(); i++) await sleep(10);
}

/** A trim that only counts its calls (and fails when told to). */
function countingTrim(fail = false): { calls: number; call: () => TrimCall } {
  const counter = { calls: 0, call: (): TrimCall => (done) => {
    counter.calls += 1;
    setImmediate(() => done(fail ? new Error('trim failed') : null, true));
  } };
  return counter;
}

test('a full collection leads to one trim after the delay; minor ones to none', async () => {
  const counter = countingTrim();
  const trimmer = new MallocTrimmer({ trim: counter.call, delayMs: 20, minIntervalMs: 0 });
  trimmer.start();
  try {
    fullCollection({ type: 'minor' });
    for (let i = 0; i < 20; i++) await sleep(10);
    assert.equal(counter.calls, 0, 'a scavenge is not a full collection');
    fullCollection({ type: 'major' });
    assert.equal(counter.calls, 0, 'not at once');
    await until(() => trimmer.stats.trims === 1);
    assert.equal(counter.calls, 1);
    fullCollection({ type: 'major' });
    await until(() => trimmer.stats.trims === 2);
    assert.equal(counter.calls, 2);
  } finally {
    trimmer.stop();
  }
  fullCollection({ type: 'major' });
  for (let i = 0; i < 20; i++) await sleep(10);
  assert.equal(counter.calls, 2, 'none once stopped');
});

test('trims keep their spacing: collections within the interval of the last trim add none', async () => {
  const counter = countingTrim();
  const trimmer = new MallocTrimmer({ trim: counter.call, delayMs: 0, minIntervalMs: 60_000 });
  trimmer.start();
  try {
    fullCollection({ type: 'major' });
    await until(() => counter.calls === 1);
    for (let i = 0; i < 2; i++) {
      fullCollection({ type: 'major' });
      for (let j = 0; j < 10; j++) await sleep(10);
    }
    assert.equal(counter.calls, 1);
  } finally {
    trimmer.stop();
  }
});

test('a failed trim is counted and the next one still runs; a libc that cannot be loaded turns trimming off', async () => {
  const failing = countingTrim(true);
  const logged: string[] = [];
  const trimmer = new MallocTrimmer({ trim: failing.call, minIntervalMs: 0, log: (line) => logged.push(line) });
  trimmer.trimNow();
  await sleep(20);
  trimmer.trimNow();
  await sleep(20);
  assert.equal(failing.calls, 2);
  assert.deepEqual(trimmer.stats, { trims: 0, failures: 2, secondsTotal: 0, secondsMax: 0, releasedBytes: 0 });
  assert.match(logged[0]!, /malloc_trim failed: trim failed/);

  let loads = 0;
  const missing = new MallocTrimmer({
    trim: () => {
      loads += 1;
      throw new Error('libc.so.6: cannot open shared object file');
    },
    minIntervalMs: 0,
    log: (line) => logged.push(line),
  });
  missing.trimNow();
  missing.trimNow();
  missing.afterMajorCollection();
  await sleep(300);
  assert.equal(loads, 1, 'loaded once, then off');
  assert.match(logged.at(-1)!, /malloc_trim is not available/);
  assert.equal(missing.stats.trims, 0);
});

test("glibc's malloc_trim runs on koffi's thread and hands freed memory back", async (context) => {
  let call: TrimCall;
  try {
    call = libcTrim();
  } catch {
    context.skip(); // not glibc
    return;
  }
  // Freed small buffers below the top of the arena: glibc keeps them resident until a trim.
  let held: Buffer[] = Array.from({ length: 20_000 }, () => Buffer.alloc(4064));
  const keep = held.filter((_, index) => index % 64 === 63);
  held = [];
  fullCollection({ type: 'major' });
  await sleep(100);
  const trimmer = new MallocTrimmer({ trim: () => call, minIntervalMs: 0 });
  trimmer.trimNow();
  await until(() => trimmer.stats.trims > 0);
  assert.equal(trimmer.stats.failures, 0);
  assert.equal(trimmer.stats.trims, 1);
  assert.ok(trimmer.stats.releasedBytes > 16 * 2 ** 20, `released ${trimmer.stats.releasedBytes} bytes`);
  assert.equal(keep.length, 312);
});
