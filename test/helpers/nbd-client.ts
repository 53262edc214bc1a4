// Moved to src/testing/nbd-client.ts, which the benchmarks use too (bench/ must not import test/).
export * from '../../src/testing/nbd-client.ts';
