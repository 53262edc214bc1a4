// npm run bench:metadata-cost -- --baseline DIR: what a change to the store costs, chunkd against chunkd.
//
// Design note. Two chunkd builds serve a 1 GiB volume each, over a unix socket, on the same target directory: the
// checkout this runs from, and a baseline checkout given with --baseline (a `git worktree add DIR COMMIT` with
// node_modules, e.g. a symlink to this checkout's). Made for the storage-faults issue's question: what do two
// metadata copies and the directory syncs cost. The rows are the writes the journal is on the path of: 4 KiB
// random writes at queue depth 32 and 1 MiB sequential writes at depth 8 (no flushes: commits come from the
// background and from reuse of freed space), and 4 KiB random writes at depth 1 with a FLUSH after each (every
// write a commit: the worst case for a second journal copy). Each system is filled first; every row runs
// --runs times, the two systems interleaved. Reported: medians and the ratio current / baseline.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fill, measure, nbdTarget, type MeasureOptions } from './fio.ts';
import { cleanup, cleanupOnSignals, spawnTracked, stopChild, tail, Tools, waitForSocket } from './processes.ts';
import { median, type RowSpec, type Sample } from './report.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const MiB = 2 ** 20;

interface Row {
  spec: RowSpec;
  flushEveryBytes: number | null;
}

const rows: Row[] = [
  { spec: { id: 'randwrite-4k-qd32', title: '4 KiB random write, QD32', rw: 'randwrite', blockSize: '4k', iodepth: 32, connections: 1, metric: 'iops', readPercent: null }, flushEveryBytes: null },
  { spec: { id: 'write-1m-qd8', title: '1 MiB sequential write, QD8', rw: 'write', blockSize: '1M', iodepth: 8, connections: 1, metric: 'mbps', readPercent: null }, flushEveryBytes: null },
  { spec: { id: 'randwrite-4k-qd1-flush', title: '4 KiB random write, QD1, FLUSH after each', rw: 'randwrite', blockSize: '4k', iodepth: 1, connections: 1, metric: 'iops', readPercent: null }, flushEveryBytes: 4096 },
];

const usage = 'usage: npm run bench:metadata-cost -- --baseline DIR [--target DIR] [--runs N] [--runtime S] [--size-mib N] [--out FILE]';

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      baseline: { type: 'string' },
      target: { type: 'string', default: '.' },
      runs: { type: 'string', default: '5' },
      runtime: { type: 'string', default: '10' },
      'size-mib': { type: 'string', default: '1024' },
      out: { type: 'string' },
    },
  });
  if (values.baseline === undefined) throw new Error(usage);
  const baseline = path.resolve(values.baseline);
  if (!fs.existsSync(path.join(baseline, 'bin', 'chunkd.js'))) throw new Error(`${baseline} holds no chunkd checkout (bin/chunkd.js)`);
  const runs = Number(values.runs);
  const sizeBytes = Number(values['size-mib']) * MiB;
  const tools = new Tools(new Map());
  cleanupOnSignals();
  const scratch = fs.mkdtempSync(path.join(path.resolve(values.target), 'chunkd-metadata-cost-'));
  const systems = [
    { id: 'baseline', checkout: baseline },
    { id: 'current', checkout: repoRoot },
  ];
  const servers = new Map<string, { pid: number; uri: string; stop: () => Promise<void> }>();
  try {
    for (const system of systems) {
      const pool = path.join(scratch, system.id);
      const socket = path.join(scratch, `${system.id}.sock`);
      const child = spawnTracked(process.execPath, [path.join(system.checkout, 'bin', 'chunkd.js'), 'serve', '--pool', pool, '--listen', 'none', '--socket', socket, '--default-volume', `default:${sizeBytes}`]);
      const stderr = tail(child.stderr);
      await waitForSocket(socket, child, stderr);
      const uri = `nbd+unix:///default?socket=${socket}`;
      servers.set(system.id, { pid: child.pid!, uri, stop: () => stopChild(child) });
      const filled = await fill(tools, nbdTarget(uri), sizeBytes);
      console.log(`${system.id}: filled ${sizeBytes / MiB} MiB at ${filled.mbps.toFixed(0)} MB/s`);
    }
    const samples: Sample[] = [];
    for (const row of rows) {
      const options: MeasureOptions = { runtimeSeconds: Number(values.runtime), rampSeconds: 2, sizeBytes, flushEveryBytes: row.flushEveryBytes };
      for (let run = 0; run < runs; run++) {
        for (const system of run % 2 === 0 ? systems : [...systems].reverse()) {
          const server = servers.get(system.id)!;
          const sample = await measure(tools, nbdTarget(server.uri), server.pid, row.spec, system.id, run, options);
          if (sample.error !== null) throw new Error(`${system.id} ${row.spec.id}: ${sample.error}`);
          samples.push(sample);
          const value = row.spec.metric === 'iops' ? sample.iops! : sample.mbps!;
          console.log(`  ${row.spec.id} run ${run + 1} ${system.id}: ${value.toFixed(0)} ${row.spec.metric === 'iops' ? 'IOPS' : 'MB/s'}`);
        }
      }
    }
    const lines = ['| row | baseline (median) | current (median) | current / baseline | runs |', '|---|---|---|---|---|'];
    for (const row of rows) {
      const value = (system: string): number => median(samples.filter((s) => s.rowId === row.spec.id && s.system === system).map((s) => (row.spec.metric === 'iops' ? s.iops! : s.mbps!)));
      const unit = row.spec.metric === 'iops' ? 'IOPS' : 'MB/s';
      lines.push(`| ${row.spec.title} | ${value('baseline').toFixed(0)} ${unit} | ${value('current').toFixed(0)} ${unit} | ${(value('current') / value('baseline')).toFixed(3)}x | ${runs} |`);
    }
    console.log(lines.join('\n'));
    if (values.out !== undefined) fs.writeFileSync(values.out, `${JSON.stringify({ baseline, runs, sizeBytes, samples }, null, 2)}\n`);
  } finally {
    for (const server of servers.values()) await server.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
    await cleanup();
  }
}

main().catch(async (error: unknown) => {
  console.error(`bench:metadata-cost: ${(error as Error).message}`);
  await cleanup();
  process.exit(1);
});
