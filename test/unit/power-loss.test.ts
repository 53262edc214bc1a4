// Seeded power-loss model tests of the store (test/helpers/power-loss-model.ts), in both chunk I/O layouts, for
// a fixed time budget each: POWER_LOSS_SECONDS (default 15 per layout: CI's time is bounded). `npm run soak` runs them for longer.
// SEED= replays one run (one seed, both layouts).
//
// Shrinking: a run draws every choice it makes (operations, ranges, the file-system call the power is cut at,
// which unsynced sectors survive) from one random source. A failing run is replayed from the tape of its draws,
// and fast-check shrinks that tape (shorter, smaller draws: fewer and simpler operations, earlier cuts) to a
// smallest one that still fails, bounded in time (POWER_LOSS_SHRINK_SECONDS, default 120). The failure then names
// the seed and prints the shrunk tape; POWER_LOSS_TAPE=<file of the tape as JSON> replays it.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'vitest';
import fc from 'fast-check';
import { runPowerLoss, runPowerLossSeed, type Layout, type RunStats } from '../helpers/power-loss-model.ts';
import { makeRandom, testSeed } from '../helpers/random.ts';

const budgetMs = Number(process.env.POWER_LOSS_SECONDS ?? 15) * 1000;
const shrinkMs = Number(process.env.POWER_LOSS_SHRINK_SECONDS ?? 120) * 1000;

/** `random`, with every draw recorded. */
function recording(random: () => number): { random: () => number; tape: number[] } {
  const tape: number[] = [];
  return { tape, random: () => {
    const value = random();
    tape.push(value);
    return value;
  } };
}

/** Draws from `tape` in order, then 0 once it is used up (the simplest choice everywhere). */
function playing(tape: readonly number[]): () => number {
  let next = 0;
  return () => tape[next++] ?? 0;
}

/** Replays a failing run's draws and shrinks them; always throws: the shrunk failure, or the original's. */
async function shrinkFailure(tape: number[], layout: Layout, seed: number, original: unknown): Promise<never> {
  const draws = fc.array(fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }), { maxLength: tape.length });
  try {
    await fc.assert(
      fc.asyncProperty(draws, async (candidate) => {
        await runPowerLoss(playing(candidate), layout, `a tape of ${candidate.length} draws shrunk from SEED=${seed}`);
      }),
      { examples: [[tape]], numRuns: 1, interruptAfterTimeLimit: shrinkMs, markInterruptAsFailure: true },
    );
  } catch (shrunk) {
    throw new Error(`power loss (${layout} chunk I/O) failed with SEED=${seed}; its draws shrunk (POWER_LOSS_TAPE replays them):\n${(shrunk as Error).message}`, { cause: original });
  }
  // The replay passed: the failure came from something the draws do not decide (timing); report it as it was.
  throw original;
}

for (const layout of ['inline', 'workers'] as Layout[]) {
  test(`power loss at random points (${layout} chunk I/O): no acknowledged write lost, no block torn or mixed, fsck clean`, { timeout: budgetMs + shrinkMs + 300_000 }, async () => {
    if (process.env.POWER_LOSS_TAPE !== undefined) {
      const tape = JSON.parse(fs.readFileSync(process.env.POWER_LOSS_TAPE, 'utf8')) as number[];
      await runPowerLoss(playing(tape), layout, `POWER_LOSS_TAPE=${process.env.POWER_LOSS_TAPE}`);
      return;
    }
    const first = testSeed(`power loss ${layout}`);
    const seeds = makeRandom(first);
    const totals: RunStats = { lives: 0, cutsMidway: 0, cuts: 0, operations: 0, acknowledgedWrites: 0, flushes: 0, checkedBlocks: 0, sectorsDropped: 0, sectorsKept: 0 };
    const started = Date.now();
    let runs = 0;
    do {
      const seed = runs === 0 ? first : Math.floor(seeds() * 2 ** 32);
      const source = recording(makeRandom(seed));
      let stats: RunStats;
      try {
        stats = await runPowerLoss(source.random, layout, `SEED=${seed}`);
      } catch (error) {
        return shrinkFailure(source.tape, layout, seed, error);
      }
      for (const key of Object.keys(totals) as Array<keyof RunStats>) totals[key] += stats[key];
      runs += 1;
    } while (process.env.SEED === undefined && Date.now() - started < budgetMs);
    console.log(`# power loss ${layout}: ${runs} runs, ${totals.cuts} power cuts (${totals.cutsMidway} mid-operation), ${totals.operations} operations, ` +
      `${totals.acknowledgedWrites} acknowledged writes, ${totals.flushes} flushes, ${totals.checkedBlocks} blocks checked, ` +
      `${totals.sectorsDropped} unsynced sectors dropped and ${totals.sectorsKept} kept, 0 acknowledged writes lost`);
    assert.ok(totals.cutsMidway > 0, 'some power cuts hit mid-operation');
  });
}

test('a run replayed from the tape of its draws is the same run', async () => {
  const source = recording(makeRandom(12345));
  const recorded = await runPowerLoss(source.random, 'inline', 'SEED=12345', 1);
  const replayed = await runPowerLoss(playing(source.tape), 'inline', 'the tape of SEED=12345', 1);
  assert.deepEqual(replayed, recorded);
  assert.ok(source.tape.length > 10);
  assert.deepEqual(await runPowerLossSeed(12345, 'inline', 1), recorded, 'runPowerLossSeed is the same run');
});
