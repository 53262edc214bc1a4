// Seeded randomness for tests: src/core/random.ts's, where the product's own shuffles take it from.
export { makeRandom, randomInt } from '../core/random.ts';
