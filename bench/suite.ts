// npm run bench (also `chunkd bench`): chunkd against the raw disk and its peers, the same fio jobs on every
// system, on one target directory, in one run.
//
// Design note. One run: build the target (the directory given, or an emulated cloud volume on it: profiles.ts),
// start and fill every system side by side in one fresh directory on it (systems.ts), then run every row `runs`
// times, the systems interleaved within each run (raw, peers, chunkd, raw, ...), because on a small shared machine
// noise comes in bursts and should hit every system alike. A row reports per system the median and min–max of its
// runs, p50/p99/p99.9 latency, the server's CPU per GB, and ratios to the raw file system and to the best peer
// (report.ts), in JSON (every sample), Markdown and SVG charts (charts.ts). A missing tool skips its systems with
// one line; everything made is undone on exit, error or interrupt (processes.ts).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import cliProgress from 'cli-progress';
import { renderCharts } from './charts.ts';
import { measure, type MeasureOptions } from './fio.ts';
import { cleanup, cleanupOnSignals, commandOutput, isStopping, onCleanup, setClockTicks, Tools } from './processes.ts';
import { buildEmulatedTarget, dropCaches, profileByName, profileTools, type Profile } from './profiles.ts';
import {
  formatMarkdownTables,
  formatSampleLine,
  formatTextTable,
  rowBlocked,
  selectRows,
  type RowSummary,
  summariseRow,
  type RowSpec,
  type Sample,
  type SystemInfo,
} from './report.ts';
import { parseVariant, systemDefinitions, type RunningSystem, type SystemDefinition, type VariantSpec, type Workspace } from './systems.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const MiB = 2 ** 20;
const GiB = 2 ** 30;

export interface SuiteOptions {
  targetDirectory: string;
  profile: Profile;
  rows: RowSpec[];
  /** System ids (or prefixes) to run; null: all. */
  systems: string[] | null;
  runs: number;
  runtimeSeconds: number;
  rampSeconds: number;
  volumeBytes: number;
  cache: 'warm' | 'cold';
  flushEveryBytes: number | null;
  variants: VariantSpec[];
  outDirectory: string;
  chunkdCheckout: string;
  quick: boolean;
  progress: boolean;
  toolOverrides: Map<string, string>;
}

export const usage = `usage: npm run bench -- [options]      (or: chunkd bench [options])
  --target DIR              directory on the disk to measure (default .); a temporary directory is made inside
  --profile NAME            local (default): the target as it is; ebs-gp3, pd-balanced: an emulated cloud
                            volume built on the target (needs root, nbdkit, nbdfuse, losetup, mkfs.ext4)
  --quick                   smoke mode: 1 run x 1 s, no ramp, 128 MiB per system (explicit options still win)
  --only ROWS               comma-separated row ids or prefixes (randread, randwrite-4k-qd32, ...), or "all"
  --systems IDS             comma-separated system ids or prefixes (default: all): raw, qemu-nbd-raw,
                            qemu-nbd-qcow2, qemu-nbd-qcow2-snap, nbdkit-file, chunkd, chunkd-10snap,
                            chunkd-NAME (variants), chunkd-mounted, tls-qemu-nbd-raw, tls-chunkd (tls: both)
  --chunkd-variant NAME=ARGS  also measure chunkd serve ARGS as system chunkd-NAME (repeatable),
                            e.g. --chunkd-variant w4="--workers 4"; NAME@DIR=ARGS runs the chunkd of
                            the checkout DIR (an older tree, interleaved with this one in the same run)
  --runs N                  runs per row and system, interleaved (default 3)
  --runtime S               seconds per run after the ramp (default 3)
  --ramp S                  seconds of ramp before each measured run (default 1)
  --size-mib N              size of each system's file / volume in MiB (default 1024)
  --cache warm|cold         warm: the filled exports stay in the page cache; cold: every sample starts with
                            the system's files dropped from it (default: the profile's)
  --flush-every-mib N       write rows flush every N MiB written (0: never; default: the profile's)
  --out DIR                 results.json, results.md and charts/ (default bench/results/<timestamp>/)
  --chunkd DIR              measure the chunkd of another checkout (its bin/chunkd.js)
  --tool NAME=PATH          use PATH for a tool (fio, qemu-nbd, nbdkit, ...); a missing PATH skips its systems
  --no-progress             no progress bar
  --rechart DIR             draw the charts of an earlier run again from DIR/results.json`;

export function parseOptions(argv: string[]): SuiteOptions | 'help' | { rechart: string } {
  const { values } = parseArgs({
    args: argv,
    options: {
      target: { type: 'string' },
      profile: { type: 'string' },
      quick: { type: 'boolean', default: false },
      only: { type: 'string' },
      systems: { type: 'string' },
      'chunkd-variant': { type: 'string', multiple: true },
      runs: { type: 'string' },
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      'size-mib': { type: 'string' },
      cache: { type: 'string' },
      'flush-every-mib': { type: 'string' },
      out: { type: 'string' },
      chunkd: { type: 'string' },
      tool: { type: 'string', multiple: true },
      'no-progress': { type: 'boolean', default: false },
      rechart: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) return 'help';
  if (values.rechart !== undefined) return { rechart: path.resolve(values.rechart) };
  const quick = values.quick;
  const number = (name: string, text: string | undefined, fallback: number, minimum: number): number => {
    if (text === undefined) return fallback;
    const value = Number(text);
    if (!Number.isFinite(value) || value < minimum) throw new Error(`--${name} must be a number of at least ${minimum}, not "${text}"`);
    return value;
  };
  const profile = profileByName(values.profile ?? 'local');
  const cache = values.cache ?? profile.cache;
  if (cache !== 'warm' && cache !== 'cold') throw new Error(`--cache must be warm or cold, not "${cache}"`);
  const flushMiB = values['flush-every-mib'] === undefined ? null : number('flush-every-mib', values['flush-every-mib'], 0, 0);
  const toolOverrides = new Map<string, string>();
  for (const text of values.tool ?? []) {
    const at = text.indexOf('=');
    if (at <= 0) throw new Error(`--tool takes NAME=PATH, not "${text}"`);
    toolOverrides.set(text.slice(0, at), path.resolve(text.slice(at + 1)));
  }
  const variants = (values['chunkd-variant'] ?? []).map(parseVariant);
  const names = new Set<string>();
  for (const variant of variants) {
    if (names.has(variant.name) || variant.name === '10snap' || variant.name === 'mounted') throw new Error(`--chunkd-variant: name "${variant.name}" is taken`);
    names.add(variant.name);
  }
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  return {
    targetDirectory: path.resolve(values.target ?? '.'),
    profile,
    rows: selectRows(values.only),
    systems: values.systems === undefined ? null : values.systems.split(',').map((name) => name.trim()).filter((name) => name !== ''),
    runs: Math.round(number('runs', values.runs, quick ? 1 : 3, 1)),
    runtimeSeconds: Math.round(number('runtime', values.runtime, quick ? 1 : 3, 1)),
    rampSeconds: Math.round(number('ramp', values.ramp, quick ? 0 : 1, 0)),
    // Whole MiB, at least 16: every system's size is identical and a multiple of chunkd's 4 KiB.
    volumeBytes: Math.round(number('size-mib', values['size-mib'], quick ? 128 : 1024, 16)) * MiB,
    cache,
    flushEveryBytes: flushMiB === null ? profile.flushEveryBytes : flushMiB === 0 ? null : flushMiB * MiB,
    variants,
    outDirectory: path.resolve(values.out ?? path.join(repoRoot, 'bench', 'results', stamp)),
    chunkdCheckout: path.resolve(values.chunkd ?? repoRoot),
    quick,
    progress: !values['no-progress'],
    toolOverrides,
  };
}

// ---- the machine ----

async function firstLine(command: string | null, args: string[]): Promise<string | null> {
  if (command === null) return null;
  const output = await commandOutput(command, args);
  return output?.split('\n')[0]?.trim() ?? null;
}

/** The machine, the tools' versions, and the commit of the chunkd measured (dirty: it has uncommitted changes). */
async function machineInfo(options: SuiteOptions, tools: Tools, target: string): Promise<Record<string, unknown>> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const checkout = options.chunkdCheckout;
  const gitStatus = await commandOutput('git', ['status', '--porcelain', '--untracked-files=no'], checkout);
  const df = await commandOutput('df', ['--output=source,fstype', target]);
  return {
    nproc: os.availableParallelism(),
    cpuModel: /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? null,
    memoryGiB: Math.round((os.totalmem() / GiB) * 10) / 10,
    // Other work on the machine skews every figure; the load average says how busy it was when we began.
    loadAverageAtStart: os.loadavg().map((load) => Math.round(load * 100) / 100),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    fio: await firstLine(tools.find('fio'), ['--version']),
    qemuNbd: await firstLine(tools.find('qemu-nbd'), ['--version']),
    qemuImg: await firstLine(tools.find('qemu-img'), ['--version']),
    nbdkit: await firstLine(tools.find('nbdkit'), ['--version']),
    nbdfuse: await firstLine(tools.find('nbdfuse'), ['--version']),
    targetFileSystem: df?.split('\n')[1]?.trim().replace(/\s+/, ' ') ?? null,
    uvThreadpoolSize: process.env.UV_THREADPOOL_SIZE ?? 'chunkd default (bin/chunkd.js sets 16)',
    chunkdCheckout: checkout,
    gitCommit: await commandOutput('git', ['rev-parse', 'HEAD'], checkout),
    gitDirty: gitStatus === null ? null : gitStatus !== '',
  };
}

// ---- progress ----

/** A progress bar with time left on a terminal; on a pipe, a line every tenth of the run. */
class Progress {
  private readonly total: number;
  private readonly bar: cliProgress.SingleBar | null;
  private readonly multibar: cliProgress.MultiBar | null;
  private done = 0;
  private secondsPerSample: number;
  private readonly startedAt = performance.now();
  private lastTenth = 0;

  constructor(total: number, estimateSecondsPerSample: number, enabled: boolean) {
    this.total = total;
    this.secondsPerSample = estimateSecondsPerSample;
    if (enabled && process.stderr.isTTY === true) {
      this.multibar = new cliProgress.MultiBar(
        { format: 'bench [{bar}] {percentage}% | {value}/{total} samples | {left} left | {what}', hideCursor: true, clearOnComplete: true, fps: 4 },
        cliProgress.Presets.shades_classic,
      );
      this.bar = this.multibar.create(total, 0, { left: this.left(), what: 'starting' });
    } else {
      this.multibar = null;
      this.bar = null;
    }
  }

  private left(): string {
    const seconds = Math.max(0, (this.total - this.done) * this.secondsPerSample);
    return seconds >= 60 ? `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s` : `${Math.round(seconds)} s`;
  }

  log(line: string): void {
    if (this.multibar !== null) {
      this.multibar.log(`${line}\n`);
      // The bar writes logged lines when it redraws; redraw now, or the last lines are lost when it stops.
      this.multibar.update();
    }
    else process.stdout.write(`${line}\n`);
  }

  what(text: string): void {
    this.bar?.update(this.done, { left: this.left(), what: text });
  }

  sampleDone(): void {
    this.done += 1;
    this.secondsPerSample = (performance.now() - this.startedAt) / 1000 / this.done;
    this.bar?.update(this.done, { left: this.left(), what: '' });
    const tenth = Math.floor((this.done * 10) / Math.max(1, this.total));
    if (this.bar === null && tenth > this.lastTenth) {
      this.lastTenth = tenth;
      process.stdout.write(`progress: ${this.done}/${this.total} samples, about ${this.left()} left\n`);
    }
  }

  stop(): void {
    this.multibar?.stop();
  }
}

// ---- the run ----

function selected(definition: SystemDefinition, wanted: string[] | null): boolean {
  return wanted === null || wanted.some((name) => definition.id === name || definition.id.startsWith(`${name}-`) || (name.endsWith('*') && definition.id.startsWith(name.slice(0, -1))));
}

/** Why the mounted path cannot be measured, or the module that mounts it (written with the FUSE front end). */
async function loadMounted(): Promise<{ module: unknown } | { missing: string }> {
  const file = path.join(repoRoot, 'bench', 'mounted.ts');
  if (!fs.existsSync(file)) return { missing: 'the mounted path is not built yet (no bench/mounted.ts, and `chunkd serve --fuse` is not there)' };
  try {
    return { module: await import(file) };
  } catch (error) {
    return { missing: `bench/mounted.ts does not load: ${(error as Error).message}` };
  }
}

interface SystemRecord extends SystemInfo {
  /** A start that failed (not a missing tool): the run exits non-zero. */
  failed: boolean;
}

/** Starts and prepares each selected system; a missing tool or an unavailable feature skips it with one line. */
async function prepareSystems(definitions: SystemDefinition[], workspace: Workspace, tools: Tools, progress: Progress): Promise<{ running: RunningSystem[]; records: SystemRecord[] }> {
  const running: RunningSystem[] = [];
  const records: SystemRecord[] = [];
  for (const definition of definitions) {
    const skip = (reason: string, failed: boolean): void => {
      progress.log(`${definition.id}: skipped, ${reason}`);
      records.push({ id: definition.id, title: definition.title, kind: definition.kind, multiConn: null, command: null, skipped: reason, preparation: null, failed });
    };
    const missing = definition.tools.filter((tool) => tools.find(tool) === null);
    if (missing.length > 0) {
      skip(`${missing.map((tool) => `${tool} not found${tools.overrides.has(tool) ? ` at ${tools.overrides.get(tool)}` : ' on PATH'}`).join(', ')}`, false);
      continue;
    }
    progress.what(`starting ${definition.id}`);
    try {
      const system = await definition.start(workspace);
      progress.log(`${definition.id}: ${system.info.command === null ? '' : `pid ${system.serverPid}: ${system.info.command.join(' ')}; `}${system.info.preparation ?? ''}`);
      running.push(system);
      records.push({ ...system.info, failed: false });
    } catch (error) {
      if (isStopping()) throw error;
      const message = (error as Error).message;
      // The mounted path is a feature chunkd may not have yet: that is a skip, not a failure.
      skip(`it failed to start or fill: ${message}`, definition.id !== 'chunkd-mounted');
    }
  }
  return { running, records };
}

interface PlannedSample {
  spec: RowSpec;
  run: number;
  system: RunningSystem;
}

function planSamples(rows: readonly RowSpec[], runs: number, systems: readonly RunningSystem[]): PlannedSample[] {
  const plan: PlannedSample[] = [];
  for (const spec of rows) {
    for (let run = 1; run <= runs; run++) {
      for (const system of systems) if (rowBlocked(spec, system.info) === null) plan.push({ spec, run, system });
    }
  }
  return plan;
}

function markdownReport(options: SuiteOptions, records: readonly SystemRecord[], tables: string, charts: readonly { file: string; title: string }[], machine: Record<string, unknown>, context: { startedAt: string; argv: string[]; emulation: string[][] | null; wallSeconds: number }): string {
  const lines = [
    `# chunkd benchmark suite: ${options.profile.name}${options.quick ? ' (quick)' : ''}`,
    '',
    `${context.startedAt}, commit \`${String(machine.gitCommit ?? 'unknown').slice(0, 12)}\`${machine.gitDirty ? ' (with local changes)' : ''}; ${machine.nproc} CPUs (${machine.cpuModel}), ${machine.memoryGiB} GiB, ${machine.kernel}; load average at start ${(machine.loadAverageAtStart as number[]).join(' ')}; wall time ${Math.round(context.wallSeconds)} s.`,
    '',
    '```sh',
    `npm run bench -- ${context.argv.join(' ')}`,
    '```',
    '',
    `Target: \`${options.targetDirectory}\` (${machine.targetFileSystem ?? 'unknown file system'}). Profile \`${options.profile.name}\`: ${options.profile.title}.`,
  ];
  if (context.emulation !== null) {
    const emulation = options.profile.emulation!;
    lines.push(
      '',
      `Emulated volume (an emulation from real parts, not the cloud service): ${emulation.iops.toLocaleString('en-US')} IOPS, ${emulation.bandwidthMiBps} MiB/s, ${emulation.latencyMs} ms per request; source: ${options.profile.source}.`,
      '',
      '```sh',
      ...context.emulation.map((command) => command.join(' ')),
      '```',
    );
  }
  lines.push(
    '',
    `Tools: ${[machine.fio, machine.qemuNbd, machine.nbdkit, `Node.js ${machine.node}`].filter((entry) => entry !== null).join('; ')}.`,
    '',
    '## Systems',
    '',
    '| system | what | command | preparation |',
    '| --- | --- | --- | --- |',
    ...records.map((record) => `| ${record.id} | ${record.title} | ${record.command === null ? '-' : `\`${record.command.join(' ').replaceAll('|', '\\|')}\``} | ${record.skipped !== null ? `**skipped**: ${record.skipped.replaceAll('|', '\\|')}` : (record.preparation ?? '-')}${record.multiConn === false ? ' (no multi-conn)' : ''} |`),
    '',
    tables,
    '## Charts',
    '',
    ...charts.flatMap((chart) => [`![${chart.title}](charts/${chart.file})`, '']),
  );
  return lines.join('\n');
}

/** Draws the charts of an earlier run again from its results.json (after a change to bench/charts.ts). */
function rechart(directory: string): number {
  const report = JSON.parse(fs.readFileSync(path.join(directory, 'results.json'), 'utf8')) as { summaries: RowSummary[]; systems: SystemInfo[]; profile: { name: string }; options: { quick: boolean } };
  const charts = renderCharts(report.summaries, report.systems, `${report.profile.name}${report.options.quick ? ', quick' : ''}`);
  fs.mkdirSync(path.join(directory, 'charts'), { recursive: true });
  for (const chart of charts) fs.writeFileSync(path.join(directory, 'charts', chart.file), chart.svg);
  process.stdout.write(`${charts.map((chart) => path.join(directory, 'charts', chart.file)).join('\n')}\n`);
  return 0;
}

/** Runs the suite with command-line arguments; returns the exit code. */
export async function runSuite(argv: string[]): Promise<number> {
  let options: SuiteOptions | 'help' | { rechart: string };
  try {
    options = parseOptions(argv);
  } catch (error) {
    process.stderr.write(`bench: ${(error as Error).message}\n`);
    return 2;
  }
  if (options === 'help') {
    process.stdout.write(`${usage}\n`);
    return 0;
  }
  if ('rechart' in options) return rechart(options.rechart);
  const tools = new Tools(options.toolOverrides);
  if (tools.find('fio') === null) {
    process.stderr.write(`bench: fio not found${options.toolOverrides.has('fio') ? ` at ${options.toolOverrides.get('fio')}` : ' on PATH'}; install it (scripts/setup.sh does) to benchmark\n`);
    return 1;
  }
  const missingForProfile = profileTools(options.profile).filter((tool) => tools.find(tool) === null);
  if (missingForProfile.length > 0) {
    process.stderr.write(`bench: profile ${options.profile.name} needs ${missingForProfile.join(', ')} (not found), and root to mount\n`);
    return 1;
  }
  cleanupOnSignals();
  try {
    return await runMeasured(options, tools, argv);
  } catch (error) {
    if (isStopping()) return 130;
    process.stderr.write(`bench: ${(error as Error).message}\n`);
    return 1;
  } finally {
    await cleanup();
  }
}

async function runMeasured(options: SuiteOptions, tools: Tools, argv: string[]): Promise<number> {
  const started = performance.now();
  setClockTicks(Number(await commandOutput('getconf', ['CLK_TCK'])) || 100);
  const startedAt = new Date().toISOString();
  const definitions = systemDefinitions(options.variants, loadMounted).filter((definition) => selected(definition, options.systems));
  if (definitions.length === 0) throw new Error(`--systems ${options.systems?.join(',')}: no such system`);

  fs.mkdirSync(options.targetDirectory, { recursive: true });
  let target = options.targetDirectory;
  let emulation: string[][] | null = null;
  const earlyLog = (line: string): void => void process.stdout.write(`${line}\n`);
  if (options.profile.emulation !== null) {
    // Room for every system's file and its snapshots, with slack for ext4: a sparse file, nothing is written up front.
    const diskBytes = Math.max(4 * GiB, Math.ceil((options.volumeBytes * (definitions.length + 3) * 1.3) / GiB) * GiB);
    const built = await buildEmulatedTarget(options.profile, options.targetDirectory, diskBytes, tools, earlyLog);
    target = built.directory;
    emulation = built.commands;
  }
  const machine = await machineInfo(options, tools, target);
  earlyLog(`machine: ${machine.nproc} CPUs, ${machine.memoryGiB} GiB, ${machine.kernel}, load ${(machine.loadAverageAtStart as number[]).join(' ')}; commit ${machine.gitCommit ?? 'unknown'}${machine.gitDirty ? ' (dirty)' : ''}`);

  const dataDirectory = fs.mkdtempSync(path.join(target, '.chunkd-bench-'));
  onCleanup(`directory ${dataDirectory}`, () => fs.rmSync(dataDirectory, { recursive: true, force: true }));
  const socketDirectory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-bench-'));
  onCleanup(`directory ${socketDirectory}`, () => fs.rmSync(socketDirectory, { recursive: true, force: true }));
  earlyLog(`target: ${dataDirectory}; profile ${options.profile.name}, cache ${options.cache}, ${options.rows.length} rows, ${options.runs} run(s) x ${options.runtimeSeconds} s after a ${options.rampSeconds} s ramp, ${options.volumeBytes / MiB} MiB per system`);

  const measureOptions: MeasureOptions = { runtimeSeconds: options.runtimeSeconds, rampSeconds: options.rampSeconds, sizeBytes: options.volumeBytes, flushEveryBytes: options.flushEveryBytes };
  // The bar counts samples; preparing the systems comes first and prints its own lines.
  const prepProgress = new Progress(0, 0, false);
  const workspace: Workspace = { dataDirectory, socketDirectory, volumeBytes: options.volumeBytes, tools, chunkdCheckout: options.chunkdCheckout, log: (line) => prepProgress.log(line) };
  const { running, records } = await prepareSystems(definitions, workspace, tools, prepProgress);

  const plan = planSamples(options.rows, options.runs, running);
  for (const spec of options.rows) {
    for (const system of running) {
      const blocked = rowBlocked(spec, system.info);
      if (blocked !== null) earlyLog(`${spec.id} on ${system.info.id}: not run (${blocked})`);
    }
  }
  const progress = new Progress(plan.length, options.runtimeSeconds + options.rampSeconds + (options.cache === 'cold' ? 2 : 0.7), options.progress);
  const samples: Sample[] = [];
  try {
    for (const planned of plan) {
      progress.what(`${planned.spec.id} on ${planned.system.info.id}, run ${planned.run}`);
      if (options.cache === 'cold') await dropCaches(dataDirectory, planned.system.cachePaths);
      const sample = await measure(tools, planned.system.target, planned.system.serverPid, planned.spec, planned.system.info.id, planned.run, { ...measureOptions, sizeBytes: planned.system.sizeBytes ?? options.volumeBytes });
      if (isStopping()) throw new Error('interrupted');
      samples.push(sample);
      progress.log(formatSampleLine(planned.spec, sample, options.runs));
      progress.sampleDone();
    }
  } finally {
    progress.stop();
  }

  const systemInfos: SystemInfo[] = records.map(({ failed: _failed, ...infoOnly }) => infoOnly);
  const summaries = options.rows.map((spec) => summariseRow(spec, systemInfos, samples));
  const label = `${options.profile.name}${options.quick ? ', quick' : ''}`;
  const charts = renderCharts(summaries, systemInfos, label);
  const tables = formatMarkdownTables(summaries, systemInfos, {
    runs: options.runs, runtimeSeconds: options.runtimeSeconds, rampSeconds: options.rampSeconds, volumeBytes: options.volumeBytes, cache: options.cache,
    flushEveryBytes: options.flushEveryBytes,
  });
  const wallSeconds = (performance.now() - started) / 1000;
  const markdown = markdownReport(options, records, tables, charts, machine, { startedAt, argv, emulation, wallSeconds });
  const report = {
    version: 2,
    startedAt,
    finishedAt: new Date().toISOString(),
    wallSeconds,
    argv,
    options: { ...options, profile: options.profile.name, rows: options.rows.map((spec) => spec.id), toolOverrides: Object.fromEntries(options.toolOverrides) },
    profile: { ...options.profile, emulationCommands: emulation },
    machine: { ...machine, loadAverageAtEnd: os.loadavg().map((load) => Math.round(load * 100) / 100) },
    target: { directory: options.targetDirectory, measuredDirectory: target },
    systems: records,
    rows: options.rows,
    samples,
    summaries,
    charts: charts.map((chart) => `charts/${chart.file}`),
  };
  fs.mkdirSync(path.join(options.outDirectory, 'charts'), { recursive: true });
  for (const chart of charts) fs.writeFileSync(path.join(options.outDirectory, 'charts', chart.file), chart.svg);
  fs.writeFileSync(path.join(options.outDirectory, 'results.json'), `${JSON.stringify(report, null, 2)}\n`);
  fs.writeFileSync(path.join(options.outDirectory, 'results.md'), markdown);
  process.stdout.write(`\n${formatTextTable(summaries, systemInfos)}\n\nresults: ${path.join(options.outDirectory, 'results.json')}, results.md and charts/ (${Math.round(wallSeconds)} s)\n`);
  const sampleFailures = samples.filter((sample) => sample.error !== null).length;
  if (sampleFailures > 0) process.stdout.write(`${sampleFailures} sample(s) failed\n`);
  const failedStarts = records.filter((record) => record.failed).length;
  return sampleFailures > 0 || failedStarts > 0 ? 1 : 0;
}

if (import.meta.main) {
  process.exitCode = await runSuite(process.argv.slice(2));
}

