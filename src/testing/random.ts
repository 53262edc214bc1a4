// Seeded randomness, for tests (test/helpers/random.ts re-exports it with their seed handling) and the cluster
// soak (bench/soak-cluster.ts): the same seed gives the same sequence.

/** mulberry32: small, fast, good enough to drive tests. */
export function makeRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomInt(random: () => number, below: number): number {
  return Math.floor(random() * below);
}
