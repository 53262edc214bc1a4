// Seeded randomness: the same seed gives the same sequence. For tests (src/testing/random.ts and
// test/helpers/random.ts re-export it, the latter with their seed handling), the cluster soak
// (bench/soak-cluster.ts), and the pool upgrade's order of records (store/pool-upgrade.ts: the same pool upgrades
// to the same pages).

/** mulberry32: small, fast, good enough to drive tests and to shuffle; not for anything secret. */
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
