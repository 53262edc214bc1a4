// The benchmark suite in smoke mode (--quick: one short run per row), so that it never rots: it must exit 0,
// measure a row of each kind (random 4 KiB read at queue depth 1, random mixed 4 KiB with four connections, 1 MiB
// sequential write) on every system whose tools are here, write well-formed JSON, Markdown and SVG charts,
// and leave nothing behind on the target. A missing peer tool must skip its systems with one clear line.
// The figures themselves are not checked: a loaded test machine says nothing about speed.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { haveTool, makeTempDir, nodeBinary, repoRoot, runTool } from '../helpers/node-process.ts';
import { allRows, type RowSummary, type Sample, type SystemInfo } from '../../bench/report.ts';

const suite = path.join(repoRoot, 'bench', 'suite.ts');
const missing = ['fio', 'qemu-nbd', 'qemu-img', 'nbdkit', 'nbdinfo', 'openssl'].filter((tool) => !haveTool(tool));
// The smallest volume the suite takes (16 MiB, not --quick's 128): every system is filled before it is measured,
// and in the first and third tests that is ten systems; no check of theirs depends on the size. (The emulated
// volume's test keeps --quick's size: it checks figures, the IOPS and latency under the emulated latency.)
const smallest = ['--size-mib', '16'];
const everySystem = ['raw', 'qemu-nbd-raw', 'qemu-nbd-qcow2', 'qemu-nbd-qcow2-snap', 'nbdkit-file', 'chunkd', 'chunkd-10snap', 'chunkd-mounted', 'tls-qemu-nbd-raw', 'tls-chunkd'];

interface Report {
  machine: Record<string, unknown>;
  systems: (SystemInfo & { failed: boolean })[];
  rows: { id: string }[];
  samples: Sample[];
  summaries: RowSummary[];
  charts: string[];
}

function readReport(out: string): Report {
  return JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8')) as Report;
}

/** Every Markdown table line has as many cells as its header. */
function checkTables(markdown: string): number {
  const tables: string[][] = [];
  let current: string[] | null = null;
  for (const line of markdown.split('\n')) {
    if (line.startsWith('|')) {
      if (current === null) tables.push((current = []));
      current.push(line);
    } else current = null;
  }
  // A cell may hold an escaped pipe (\|) inside a command.
  const cellCount = (line: string): number => line.replaceAll('\\|', '').split('|').length - 2;
  for (const table of tables) for (const line of table) assert.equal(cellCount(line), cellCount(table[0]!), line);
  return tables.length;
}

test('npm run bench -- --quick measures a row of each kind on every system and writes JSON, Markdown and charts', { skip: missing.length > 0, timeout: 300_000 }, async () => {
  const scratch = makeTempDir('bench');
  // One row of each kind keeps the test short (CI's time is bounded); every default row is built by the same
  // `row()`, and bench-report.test.ts checks that the default selection names them all.
  const rowIds = ['randread-4k-qd1-c1', 'randrw-4k-qd32-c4', 'write-1m-qd8-c1'];
  try {
    const target = path.join(scratch, 'target');
    const out = path.join(scratch, 'out');
    fs.mkdirSync(target);
    const started = Date.now();
    const result = await runTool(nodeBinary, [suite, '--quick', ...smallest, '--target', target, '--out', out, '--only', rowIds.join(',')], { timeoutMs: 290_000 });
    assert.equal(result.code, 0, `bench exited ${result.code}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`);
    assert.ok(Date.now() - started < 300_000, '--quick finishes in under 5 minutes');
    assert.deepEqual(fs.readdirSync(target), [], 'the bench leaves nothing on the target');

    const report = readReport(out);
    for (const key of ['nproc', 'cpuModel', 'kernel', 'node', 'fio', 'qemuNbd', 'nbdkit', 'gitCommit']) assert.ok(report.machine[key], `machine.${key}`);
    assert.deepEqual(report.systems.map((system) => system.id), everySystem);
    for (const system of report.systems) {
      assert.equal(system.failed, false, `${system.id} did not fail: ${system.skipped}`);
      // The mounted path needs chunkd's FUSE front end; until then it is skipped with a reason.
      if (system.id !== 'chunkd-mounted') assert.equal(system.skipped, null, `${system.id} ran`);
      else if (system.skipped !== null) assert.match(result.stdout, /^chunkd-mounted: skipped, .+/m);
    }
    assert.deepEqual(report.rows.map((row) => row.id), rowIds);
    const measured = report.systems.filter((system) => system.skipped === null);
    for (const rowId of rowIds) {
      for (const system of measured) {
        const samples = report.samples.filter((sample) => sample.rowId === rowId && sample.system === system.id);
        assert.equal(samples.length, 1, `${rowId} on ${system.id}: one run in quick mode`);
        const sample = samples[0]!;
        assert.equal(sample.error, null, `${rowId} on ${system.id}`);
        for (const field of ['iops', 'mbps', 'latencyUsP50', 'latencyUsP99', 'ioBytes'] as const) assert.ok(Number.isFinite(sample[field]) && sample[field]! > 0, `${rowId} on ${system.id}: ${field}`);
        if (system.kind !== 'raw') assert.ok(Number.isFinite(sample.serverCpuSecondsPerGB), `${rowId} on ${system.id}: server CPU`);
      }
      const summary = report.summaries.find((entry) => entry.rowId === rowId);
      assert.ok(summary, `summary of ${rowId}`);
      assert.ok(summary.bestPeer !== null, `${rowId}: a best peer`);
      for (const system of measured) {
        const entry = summary.systems[system.id]!;
        if (system.kind !== 'raw') assert.ok(Number.isFinite(entry.ratioToRaw), `${rowId} ${system.id}: ratio to raw`);
        if (system.kind === 'chunkd') assert.ok(Number.isFinite(entry.ratioToBestPeer), `${rowId} ${system.id}: ratio to the best peer`);
      }
    }

    const markdown = fs.readFileSync(path.join(out, 'results.md'), 'utf8');
    assert.equal(checkTables(markdown), 5, 'systems, throughput, ratios, latency, CPU');
    for (const rowId of rowIds) assert.ok(markdown.includes(`| ${allRows.find((row) => row.id === rowId)!.title} |`), rowId);
    assert.ok(report.charts.length >= 4, 'IOPS, latency, MB/s and ratio charts');
    for (const chart of report.charts) {
      const svg = fs.readFileSync(path.join(out, chart), 'utf8');
      assert.match(svg, /^<svg [^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/, chart);
      assert.match(svg, /<\/svg>\s*$/, chart);
      assert.ok(svg.includes('chunkd'), `${chart} names chunkd`);
      assert.ok(markdown.includes(`](${chart})`), `${chart} is in the Markdown`);
    }
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('a missing peer tool skips its systems with one clear line, and the rest still run', { skip: missing.length > 0, timeout: 120_000 }, async () => {
  const scratch = makeTempDir('bench-missing');
  try {
    const target = path.join(scratch, 'target');
    const out = path.join(scratch, 'out');
    fs.mkdirSync(target);
    const absent = path.join(scratch, 'no-such-dir', 'qemu-nbd');
    const result = await runTool(nodeBinary, [suite, '--quick', ...smallest, '--no-progress', '--target', target, '--out', out, '--only', 'randread-4k-qd1-c1', '--systems', 'raw,qemu-nbd,nbdkit-file', '--tool', `qemu-nbd=${absent}`], { timeoutMs: 110_000 });
    assert.equal(result.code, 0, `bench exited ${result.code}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`);
    for (const id of ['qemu-nbd-raw', 'qemu-nbd-qcow2', 'qemu-nbd-qcow2-snap']) {
      assert.ok(result.stdout.split('\n').includes(`${id}: skipped, qemu-nbd not found at ${absent}`), `${id}'s skip line in:\n${result.stdout}`);
    }
    const report = readReport(out);
    assert.deepEqual(report.systems.map((system) => [system.id, system.skipped === null]), [['raw', true], ['qemu-nbd-raw', false], ['qemu-nbd-qcow2', false], ['qemu-nbd-qcow2-snap', false], ['nbdkit-file', true]]);
    assert.deepEqual(report.samples.map((sample) => [sample.system, sample.error]), [['raw', null], ['nbdkit-file', null]]);
    const markdown = fs.readFileSync(path.join(out, 'results.md'), 'utf8');
    assert.match(markdown, /\| qemu-nbd-raw \| .* \| \*\*skipped\*\*: qemu-nbd not found at /);
    checkTables(markdown);
    assert.deepEqual(fs.readdirSync(target), [], 'the bench leaves nothing on the target');
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

/** Processes whose command line mentions `text` (the scratch directory: every server the suite starts names it). */
function processesMentioning(text: string): string[] {
  const found: string[] = [];
  for (const pid of fs.readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    try {
      const commandLine = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ');
      if (commandLine.includes(text) && Number(pid) !== process.pid) found.push(`${pid}: ${commandLine}`);
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

test('an interrupted run stops every server and removes what it made', { skip: missing.length > 0, timeout: 120_000 }, async () => {
  const scratch = makeTempDir('bench-interrupt');
  try {
    const target = path.join(scratch, 'target');
    fs.mkdirSync(target);
    const { spawn } = await import('node:child_process');
    // Three systems of three kinds (a file, a peer's server, a chunkd node; every system is set up and filled
    // before the first sample): the first test starts them all, this one what an interrupt leaves.
    const systems = ['raw', 'nbdkit-file', 'chunkd'];
    const child = spawn(nodeBinary, [suite, '--quick', ...smallest, '--no-progress', '--systems', systems.join(','), '--target', target, '--out', path.join(scratch, 'out'), '--runtime', '5'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    // Interrupt once the first sample is under way: every server is up then.
    const deadline = Date.now() + 90_000;
    while (!/^randread-4k-qd1-c1 +raw +run 1\/1/m.test(stdout)) {
      assert.ok(Date.now() < deadline, `no first sample in 90 s:\n${stdout}`);
      assert.equal(child.exitCode, null, `bench exited early:\n${stdout}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.ok(processesMentioning(target).length > 0, 'servers run on the target');
    child.kill('SIGINT');
    const code = await new Promise<number | null>((resolve) => child.once('exit', (exitCode) => resolve(exitCode)));
    assert.equal(code, 130);
    assert.deepEqual(processesMentioning(target), [], 'no server left running');
    assert.deepEqual(fs.readdirSync(target), [], 'nothing left on the target');
    assert.equal(fs.existsSync(path.join(scratch, 'out')), false, 'no report from an interrupted run');
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

const emulationTools = ['nbdkit', 'nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4'].filter((tool) => !haveTool(tool));
const notRoot = process.getuid?.() !== 0;

test('--profile ebs-gp3 measures on an emulated volume with its latency, and takes it all down afterwards', { skip: missing.length + emulationTools.length > 0 || notRoot, timeout: 120_000 }, async () => {
  const scratch = makeTempDir('bench-profile');
  try {
    const target = path.join(scratch, 'target');
    const out = path.join(scratch, 'out');
    fs.mkdirSync(target);
    const result = await runTool(nodeBinary, [suite, '--quick', '--no-progress', '--profile', 'ebs-gp3', '--target', target, '--out', out, '--systems', 'raw,nbdkit-file', '--only', 'randread-4k-qd1-c1', '--runtime', '2'], { timeoutMs: 110_000 });
    assert.equal(result.code, 0, `bench exited ${result.code}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`);
    assert.match(result.stdout, /^profile ebs-gp3: emulated volume .* on \/dev\/loop\d+, ext4 mounted at /m);
    const report = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8')) as { samples: Sample[]; target: { measuredDirectory: string }; profile: { emulationCommands: string[][] } };
    assert.notEqual(report.target.measuredDirectory, target, 'the run measured on the emulated volume, not the target itself');
    assert.ok(report.profile.emulationCommands.some((command) => command.includes('--filter=delay')));
    // 1 ms per request at queue depth 1 caps 4 KiB reads below 1,000 IOPS (a local disk's page cache gives 100x that).
    for (const sample of report.samples) {
      assert.equal(sample.error, null);
      assert.ok(sample.iops! > 50 && sample.iops! < 1000, `${sample.system}: ${sample.iops} IOPS at QD1 on a 1 ms volume`);
      assert.ok(sample.latencyUsP50! >= 1000, `${sample.system}: p50 ${sample.latencyUsP50} µs`);
    }
    assert.deepEqual(fs.readdirSync(target), [], 'nothing left on the target');
    assert.ok(!fs.readFileSync('/proc/mounts', 'utf8').includes(scratch), 'no mount left');
    const loops = await runTool('losetup', ['-a']);
    assert.ok(!loops.stdout.includes(scratch), `no loop device left:\n${loops.stdout}`);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
