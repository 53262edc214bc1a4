// The micro benchmarks' common frame: each file registers tinybench tasks for one piece of hot pure code and
// returns a teardown. `run.ts` runs them all (or some) and prints ops/s and latency percentiles; with `smoke`
// each task runs a handful of iterations only, which is what the test suite does so that they never rot.
import { Bench } from 'tinybench';

export interface MicroModule {
  /** Short name, used by `npm run bench:micro -- NAME`. */
  name: string;
  /** Adds tasks to `bench`; returns what to undo afterwards (a worker pool to close). */
  register(bench: Bench): Promise<() => Promise<void>>;
}

export interface MicroResult {
  module: string;
  task: string;
  opsPerSecond: number;
  latencyNsMean: number;
  latencyNsP50: number;
  latencyNsP99: number;
  samples: number;
}

/** Runs one module's tasks: for `timeMs` each (default 1 s), or a few iterations in smoke mode. */
export async function runModule(module: MicroModule, options: { smoke: boolean; timeMs?: number }): Promise<MicroResult[]> {
  const bench = options.smoke
    ? new Bench({ name: module.name, time: 0, iterations: 8, warmupTime: 0, warmupIterations: 2, throws: true })
    : new Bench({ name: module.name, time: options.timeMs ?? 1000, warmupTime: 200, throws: true });
  const teardown = await module.register(bench);
  try {
    await bench.run();
  } finally {
    await teardown();
  }
  return bench.tasks.map((task) => {
    const result = task.result;
    if (result.state !== 'completed') throw new Error(`${module.name}/${task.name}: ${result.state}${'error' in result ? `: ${result.error.message}` : ''}`);
    return {
      module: module.name,
      task: task.name,
      opsPerSecond: result.throughput.mean,
      // tinybench measures in milliseconds.
      latencyNsMean: result.latency.mean * 1e6,
      latencyNsP50: result.latency.p50 * 1e6,
      latencyNsP99: result.latency.p99 * 1e6,
      samples: result.latency.samplesCount,
    };
  });
}
