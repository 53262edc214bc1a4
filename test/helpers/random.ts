// Seeded randomness for tests: every test that uses it prints its seed, and SEED=<n> replays it. The generator
// itself is in src/testing/random.ts (the soak, bench/soak-cluster.ts, uses it too; bench/ must not import test/).
export { makeRandom, randomInt } from '../../src/testing/random.ts';

/** The seed from $SEED, or a fresh one; logged so that a failure can be replayed. */
export function testSeed(label: string): number {
  const seed = process.env.SEED !== undefined ? Number(process.env.SEED) : Math.floor(Math.random() * 2 ** 32);
  console.log(`# ${label}: SEED=${seed}`);
  return seed;
}

/**
 * fast-check's run options for a model test: the seed (testSeed), the runs (`runsVariable` from the environment,
 * else `runs`), FC_PATH replaying a shrunk case directly, and shrinking bounded in time (it reruns a failing
 * sequence many times; past the bound it reports the smallest failing one found so far).
 */
export function modelRunOptions(seed: number, runsVariable: string, runs: number, shrinkLimitMs = 240_000): { seed: number; numRuns: number; path?: string; interruptAfterTimeLimit: number; markInterruptAsFailure: boolean } {
  return {
    seed,
    numRuns: Number(process.env[runsVariable] ?? runs),
    ...(process.env.FC_PATH ? { path: process.env.FC_PATH } : {}),
    interruptAfterTimeLimit: shrinkLimitMs,
    markInterruptAsFailure: true,
  };
}
