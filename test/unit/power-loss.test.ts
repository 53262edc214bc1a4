// Seeded power-loss model tests of the store (test/helpers/power-loss-model.ts), in both chunk I/O layouts, for
// a fixed time budget each: POWER_LOSS_SECONDS (default 25 per layout). `npm run soak` runs them for longer.
// SEED= replays one run (one seed, both layouts).
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { runPowerLossSeed, type Layout, type RunStats } from '../helpers/power-loss-model.ts';
import { makeRandom, testSeed } from '../helpers/random.ts';

const budgetMs = Number(process.env.POWER_LOSS_SECONDS ?? 25) * 1000;

for (const layout of ['inline', 'workers'] as Layout[]) {
  test(`power loss at random points (${layout} chunk I/O): no acknowledged write lost, no block torn or mixed, fsck clean`, { timeout: budgetMs + 300_000 }, async () => {
    const first = testSeed(`power loss ${layout}`);
    const seeds = makeRandom(first);
    const totals: RunStats = { lives: 0, cutsMidway: 0, cuts: 0, operations: 0, acknowledgedWrites: 0, flushes: 0, checkedBlocks: 0, sectorsDropped: 0, sectorsKept: 0 };
    const started = Date.now();
    let runs = 0;
    do {
      const seed = runs === 0 ? first : Math.floor(seeds() * 2 ** 32);
      const stats = await runPowerLossSeed(seed, layout);
      for (const key of Object.keys(totals) as Array<keyof RunStats>) totals[key] += stats[key];
      runs += 1;
    } while (process.env.SEED === undefined && Date.now() - started < budgetMs);
    console.log(`# power loss ${layout}: ${runs} runs, ${totals.cuts} power cuts (${totals.cutsMidway} mid-operation), ${totals.operations} operations, ` +
      `${totals.acknowledgedWrites} acknowledged writes, ${totals.flushes} flushes, ${totals.checkedBlocks} blocks checked, ` +
      `${totals.sectorsDropped} unsynced sectors dropped and ${totals.sectorsKept} kept, 0 acknowledged writes lost`);
    assert.ok(totals.cutsMidway > 0, 'some power cuts hit mid-operation');
  });
}
