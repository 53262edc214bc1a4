// npm run bench:micro [-- NAME ...] [--smoke] [--time MS] [--json FILE]: the micro benchmarks of the hot pure
// code (NBD codec, extent mapping, checksums, worker round trip, per-request counting, the paged chunk map), with tinybench. --smoke runs a few iterations
// of each task only (the test suite does, so that they never rot); figures then mean nothing.
import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { checksum } from './checksum.ts';
import { extents } from './extents.ts';
import { ioStats } from './io-stats.ts';
import { runModule, type MicroModule, type MicroResult } from './harness.ts';
import { nbdCodec } from './nbd-codec.ts';
import { pagedMap } from './paged-map.ts';
import { worker } from './worker.ts';

export const microModules: readonly MicroModule[] = [nbdCodec, extents, checksum, worker, ioStats, pagedMap];

function format(value: number): string {
  return value >= 100 ? Math.round(value).toLocaleString('en-US') : value.toFixed(1);
}

/** Runs the named modules (all when none is named); prints one line per task. */
export async function runMicro(names: readonly string[], options: { smoke: boolean; timeMs?: number }): Promise<MicroResult[]> {
  const unknown = names.filter((name) => !microModules.some((module) => module.name === name));
  if (unknown.length > 0) throw new Error(`no micro benchmark ${unknown.join(', ')} (have: ${microModules.map((module) => module.name).join(', ')})`);
  const results: MicroResult[] = [];
  for (const module of microModules.filter((entry) => names.length === 0 || names.includes(entry.name))) {
    for (const result of await runModule(module, options)) {
      results.push(result);
      process.stdout.write(`${`${result.module}: ${result.task}`.padEnd(62)} ${format(result.opsPerSecond).padStart(12)} ops/s  mean ${format(result.latencyNsMean)} ns  p50 ${format(result.latencyNsP50)} ns  p99 ${format(result.latencyNsP99)} ns  (${result.samples} samples)\n`);
    }
  }
  return results;
}

if (import.meta.main) {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { smoke: { type: 'boolean', default: false }, time: { type: 'string' }, json: { type: 'string' } } });
  const timeMs = values.time === undefined ? undefined : Number(values.time);
  const results = await runMicro(positionals, { smoke: values.smoke, ...(timeMs === undefined ? {} : { timeMs }) });
  if (values.json !== undefined) fs.writeFileSync(values.json, `${JSON.stringify({ node: process.version, startedAt: new Date().toISOString(), results }, null, 2)}\n`);
}
