// Moved to src/testing/node-process.ts, which the benchmarks use too (bench/ must not import test/).
export * from '../../src/testing/node-process.ts';
