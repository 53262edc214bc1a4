// npm run bench:scale: how a node's memory, metadata, start time, checkpoint pause and read IOPS grow with the
// data it holds (issue 15, metadata that scales past memory; the baseline the paged store is compared against).
//
// Design note. One node, one thin volume of --volume-size (default 1TiB). Before the first step (the baseline,
// nothing written) and after each of --steps (cumulative bytes, default 1GiB,4GiB,16GiB), written with fio's nbd
// engine in 4 KiB random writes at QD32 over the whole volume (fio's random data, --randrepeat=0 so every run
// draws new offsets, its random map so no block is written twice within one fio run; a step is one run unless
// snapshots cut it), the step records:
//   1. the node's RSS (/proc/PID/status VmRSS), the event loop's longest pause over the writes and the checkpoints
//      a full journal caused meanwhile (GET /v1/status);
//   2. a restart after a crash: SIGKILL, then the time from spawn to the ready line (the open reads the checkpoint
//      or root and replays the step's journal since the last one, then writes a checkpoint or root), and the RSS
//      then. A crash, not a stop: a paged pool's clean close ends with a checkpoint, so only a crash shows what its
//      start costs at worst (format 3's close writes none: for it the two are the same; runs before this change,
//      at `3e73638` and earlier, stopped the node with SIGTERM here);
//   3. a checkpoint asked for at once (POST /v1/checkpoint): its size, time and synchronous encode, the event
//      loop's longest pause since the restart (the node otherwise idle), and the checkpoint and journal files'
//      allocated bytes in the pool;
//   4. 4 KiB random read IOPS at QD32 over the whole volume, --runtime seconds each, twice: cold (the first reads
//      after the restart, no ramp) and warm (the same again after --warmup seconds of reads, runs before it had
//      none, and a 1 s ramp); then the RSS. Most reads of a large
//      volume fall where nothing was written: they measure the metadata lookup (a map page per 2 MiB; with
//      16 GiB written at random into 1 TiB nearly every page exists), not the chunk files;
//   4b. with two snapshots or more, `snapshot diff` of the last two timed, and with any, `snapshot list` (which
//      counts each snapshot's bytes held alone) timed twice: the first after the restart walks every snapshot,
//      the second finds their counts remembered (held-alone.ts);
//   5. a second restart, after a stop (SIGTERM; its time kept too: the journal is empty then), so that the next step's writes start with
//      the node's pause monitor and checkpoint count at zero.
// Steps may write more than the volume: fio's random map covers the volume once, then starts over, so the bytes
// past --volume-size overwrite blocks written before (each pass in a new random order). That measures a node whose
// metadata has stopped growing (every block mapped): what its RSS and its CPU per write settle at.
// With --snapshots N, N snapshots of the volume are taken at even spacing of the bytes written (a step's writes
// are cut there: a block may then be written twice within a step), each timed. The node's CPU per read (every
// thread, /proc/PID/stat) is kept with each read sample.
// With --metadata paged the pool is made with paged metadata (paged-metadata.md) and a page cache of --metadata-cache.
// Usage: npm run bench:scale -- [--steps 1GiB,4GiB,16GiB] [--volume-size 1TiB] [--snapshots 0] [--runtime 10] [--warmup S] [--metadata memory|paged] [--metadata-cache SIZE] [--node-env N=V] [--node-flag FLAG] [--target DIR] [--out DIR]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { callApi } from '../src/cli/api-client.ts';
import { formatSize, parseSize } from '../src/core/units.ts';
import { chunkdBin, nodeBinary, startNode, type Launcher, type RunningNode } from '../src/testing/node-process.ts';
import { fioFailure, nbdTarget, parseFioJson, runFio } from './fio.ts';
import { cleanup, cleanupOnSignals, commandOutput, machineCpuShares, machineCpuTicks, onCleanup, processCpuSeconds, Tools } from './processes.ts';
import { formatProjectionTable, formatStepsTable, project, snapshotPoints, type MemoryParts, type ScaleStep } from './scale-report.ts';

const volume = 'vol';
const blockBytes = 4096;
const fioTimeoutMs = 60 * 60_000;
/** A pool with much metadata takes long to open today; the point is to measure it, not to give up. */
const readyTimeoutMs = 30 * 60_000;

const usage = `usage: npm run bench:scale -- [--steps 1GiB,4GiB,16GiB] [--volume-size 1TiB] [--snapshots N] [--runtime S] [--warmup S] [--metadata memory|paged] [--metadata-cache SIZE] [--node-env NAME=VALUE]... [--node-flag FLAG]... [--target DIR] [--out DIR]
  --steps LIST        cumulative bytes written at random in 4 KiB writes, measured after each (default 1GiB,4GiB,16GiB);
                      past --volume-size the writes overwrite, a pass over the volume at a time
  --volume-size SIZE  the thin volume written into (default 1TiB)
  --snapshots N       snapshots of the volume taken along the way, evenly spaced (default 0)
  --runtime S         seconds of each random read sample (default 10)
  --warmup S          seconds of unmeasured random reads between the cold and the warm sample (default --runtime; 0: none, as before)
  --metadata KIND     the pool's metadata: memory (default) or paged
  --metadata-cache S  paged metadata: the page cache (default serve's)
  --node-env N=V      set this in the node's environment only (repeatable), e.g. to run it under another malloc:
                      LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
  --node-flag=FLAG    give Node.js this flag when it runs the node (repeatable), e.g. --node-flag=--single-threaded-gc
  --target DIR        where the pool goes (default .); needs the last step's bytes free, and some more
  --out DIR           also write results.json and results.md there`;

interface NodeStatusPart {
  eventLoopDelayMaxSeconds: number;
  eventLoopLongestPause?: ScaleStep['longestPauseWriting'];
  io?: { smallWrites?: ScaleStep['smallWritesWriting'] };
  pool: { checkpointsTotal: number };
}

interface CheckpointAnswer {
  bytes: number;
  seconds: number;
  encodeSeconds: number;
}

function rssBytes(pid: number): number {
  const match = /^VmRSS:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (match === null) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Number(match[1]) * 1024;
}

const mallocArenaBytes = 64 * 2 ** 20;

/** The process's RSS by kind of mapping (scale-report.ts's MemoryParts), from /proc/PID/smaps and VmHWM. */
function memoryParts(pid: number): MemoryParts | null {
  let smaps: string;
  let status: string;
  try {
    smaps = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8');
    status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return null;
  }
  const mappings: Array<{ start: bigint; end: bigint; perms: string; name: string; rssBytes: number }> = [];
  for (const line of smaps.split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(.*)$/.exec(line);
    if (head !== null) {
      mappings.push({ start: BigInt(`0x${head[1]}`), end: BigInt(`0x${head[2]}`), perms: head[3]!, name: head[4] === '0' ? head[5]! : `inode ${head[4]}`, rssBytes: 0 });
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB$/.exec(line);
    if (rss !== null) mappings.at(-1)!.rssBytes = Number(rss[1]) * 1024;
  }
  const parts: MemoryParts = { peakBytes: Number(/^VmHWM:\s+(\d+) kB$/m.exec(status)?.[1] ?? 0) * 1024, mallocMainBytes: 0, mallocArenaBytes: 0, mallocArenas: 0, fileBytes: 0, otherAnonBytes: 0 };
  const arena = BigInt(mallocArenaBytes);
  for (const [i, m] of mappings.entries()) {
    const next = mappings[i + 1];
    if (m.name === '[heap]') parts.mallocMainBytes += m.rssBytes;
    else if (m.name.startsWith('inode ') || m.name.startsWith('/')) parts.fileBytes += m.rssBytes;
    else if (m.start % arena === 0n && m.perms.startsWith('rw') && (m.end - m.start === arena || (next !== undefined && next.perms.startsWith('---') && next.start === m.end && next.end - m.start === arena))) {
      parts.mallocArenaBytes += m.rssBytes;
      parts.mallocArenas += 1;
    } else parts.otherAnonBytes += m.rssBytes;
  }
  return parts;
}

/**
 * Bytes allocated to the pool's checkpoint (or page file) and journal copies (pool-layout.ts names them). The node
 * is running: a journal listed may be removed by a checkpoint before its stat (counted as nothing).
 */
function metadataBytes(pool: string): number {
  return fs.readdirSync(pool)
    .filter((name) => /^(checkpoint\.\d+|metadata\.\d+|journal-\d+\.\d+)$/.test(name))
    .reduce((sum, name) => sum + (fs.statSync(path.join(pool, name), { throwIfNoEntry: false })?.blocks ?? 0) * 512, 0);
}

/** The node's own account of its start (debug lines: the pool open's phases, the records replayed, the node's parts). */
function startLines(node: RunningNode): string[] {
  return node.stderr().split('\n').filter((line) => /opened in|replayed \d+ journal records|node started/.test(line)).map((line) => line.replace(/^\S+ chunkd: (debug: )?/, ''));
}

/** The gaps of the node's event loop over 50 ms it logged (debug: "event loop paused ..."), as it said them. */
function pauseLines(node: RunningNode): string[] {
  return node.stderr().split('\n').filter((line) => line.includes('event loop paused ')).map((line) => line.replace(/^.*event loop paused /, ''));
}

/** Median and largest of the times a step's snapshots took (API call to answer); null when it took none. */
function summarize(seconds: readonly number[]): ScaleStep['snapshotSeconds'] {
  if (seconds.length === 0) return null;
  const sorted = [...seconds].sort((a, b) => a - b);
  return { count: sorted.length, median: sorted[Math.floor(sorted.length / 2)]!, max: sorted[sorted.length - 1]! };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      steps: { type: 'string', default: '1GiB,4GiB,16GiB' },
      'volume-size': { type: 'string', default: '1TiB' },
      snapshots: { type: 'string', default: '0' },
      runtime: { type: 'string', default: '10' },
      warmup: { type: 'string' },
      metadata: { type: 'string', default: 'memory' },
      'metadata-cache': { type: 'string' },
      'node-env': { type: 'string', multiple: true, default: [] },
      'node-flag': { type: 'string', multiple: true, default: [] },
      target: { type: 'string', default: '.' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    return;
  }
  const steps = values.steps.split(',').map((text) => parseSize(text));
  const volumeBytes = parseSize(values['volume-size']);
  const snapshotCount = Number(values.snapshots);
  const runtimeSeconds = Number(values.runtime);
  const warmupSeconds = values.warmup === undefined ? runtimeSeconds : Number(values.warmup);
  if (steps.some((bytes, i) => bytes % blockBytes !== 0 || bytes <= (steps[i - 1] ?? 0))) throw new Error('--steps must grow, each a whole number of 4 KiB blocks');
  if (!Number.isInteger(snapshotCount) || snapshotCount < 0) throw new Error('--snapshots must be a whole number');
  if (!Number.isInteger(runtimeSeconds) || runtimeSeconds < 1) throw new Error('--runtime must be a whole number of seconds, at least 1');
  if (!Number.isInteger(warmupSeconds) || warmupSeconds < 0) throw new Error('--warmup must be a whole number of seconds');

  // At debug level the node logs where its start went (the pool open's phases, modules, the rest): kept per step.
  const nodeArgs = ['--log-level', 'debug', '--metadata', values.metadata, ...(values['metadata-cache'] === undefined ? [] : ['--metadata-cache', values['metadata-cache']])];
  const nodeEnv = values['node-env'].map((pair) => {
    const at = pair.indexOf('=');
    if (at < 1) throw new Error(`--node-env takes NAME=VALUE, not ${pair}`);
    return [pair.slice(0, at), pair.slice(at + 1)] as const;
  });
  const launcher: Launcher = { command: nodeBinary, prefix: [...values['node-flag'], chunkdBin], env: { ...process.env, ...Object.fromEntries(nodeEnv) } };
  const tools = new Tools(new Map());
  tools.get('fio');
  cleanupOnSignals();
  const scratch = fs.mkdtempSync(path.join(path.resolve(values.target), '.chunkd-scalebench-'));
  onCleanup('scratch', () => fs.rmSync(scratch, { recursive: true, force: true }));
  const pool = path.join(scratch, 'pool');
  let node: RunningNode | null = null;
  onCleanup('node', async () => {
    if (node !== null) await node.kill();
  });
  const api = <T>(method: string, route: string, body?: unknown): Promise<T> => callApi(node!.apiSocket, method, route, body) as Promise<T>;

  const fio = async (args: string[]): Promise<ReturnType<typeof parseFioJson>> => {
    const run = await runFio(tools, [...args, ...nbdTarget(node!.uri(volume)).args, `--size=${volumeBytes}`, '--bs=4k', '--iodepth=32', '--randrepeat=0', '--output-format=json'], fioTimeoutMs, null, 0, true);
    if (run.code !== 0) throw new Error(fioFailure(run));
    const job = parseFioJson(run.stdout);
    if (job.error !== 0) throw new Error(`fio job error ${job.error}`);
    return job;
  };
  // The node's CPU (every thread, /proc/PID/stat) over the sample, per read: wall IOPS on a shared machine move
  // several times between runs, the CPU a read costs much less. The warm sample's 1 s ramp is counted as if it
  // read at the measured rate (its reads are not in fio's figures, its CPU is in the node's).
  const readIops = async (warm: boolean): Promise<{ iops: number; cpuMicros: number | null }> => {
    const pid = node!.process.pid!;
    const cpuBefore = processCpuSeconds(pid);
    const iops = (await fio(['--name=randread', '--rw=randread', '--norandommap', '--time_based', `--runtime=${runtimeSeconds}`, ...(warm ? ['--ramp_time=1'] : [])])).read.iops;
    const cpuAfter = processCpuSeconds(pid);
    const reads = iops * (runtimeSeconds + (warm ? 1 : 0));
    return { iops, cpuMicros: cpuBefore === null || cpuAfter === null || reads === 0 ? null : ((cpuAfter - cpuBefore) / reads) * 1e6 };
  };

  onCleanup('node log', () => {
    if (process.exitCode === 1 && node !== null) process.stderr.write(`node log (last lines):\n${node.stderr().split('\n').slice(-15).join('\n')}\n`);
  });
  const results: ScaleStep[] = [];
  const pending = snapshotPoints(steps.at(-1)!, snapshotCount);
  let written = 0;
  let snapshots = 0;
  let snapshotSeconds: number[] = [];
  node = await startNode(pool, nodeArgs, { readyTimeoutMs, launcher });
  await api('POST', '/v1/volumes', { name: volume, sizeBytes: volumeBytes });
  console.log(`node pid ${node.process.pid}; volume ${volume} of ${formatSize(volumeBytes)}; steps ${steps.map(formatSize).join(', ')}${snapshotCount > 0 ? `; ${snapshotCount} snapshots along the way` : ''}`);

  for (const stepBytes of [0, ...steps]) {
    // 1. The writes, cut where a snapshot is due.
    let writeSeconds = 0;
    const stepStart = written;
    const cpuBeforeWrites = processCpuSeconds(node.process.pid!);
    const pausesBeforeWrites = pauseLines(node).length;
    const machineBeforeWrites = machineCpuTicks();
    while (written < stepBytes) {
      const until = Math.min(stepBytes, pending[0] ?? Infinity);
      const job = await fio(['--name=randwrite', '--rw=randwrite', `--io_size=${until - written}`, '--end_fsync=1']);
      writeSeconds += job.write.io_bytes / job.write.bw_bytes;
      written = until;
      while (pending.length > 0 && pending[0]! <= written) {
        pending.shift();
        const asked = performance.now();
        await api('POST', `/v1/volumes/${volume}/snapshots`, { name: `s${snapshots}` });
        snapshotSeconds.push((performance.now() - asked) / 1000);
        snapshots += 1;
      }
    }
    const writing = await api<NodeStatusPart>('GET', '/v1/status');
    const longGapsWriting = pauseLines(node).slice(pausesBeforeWrites);
    const cpuAfterWrites = processCpuSeconds(node.process.pid!);
    const machineWriting = written === stepStart ? null : machineCpuShares(machineBeforeWrites, machineCpuTicks());
    const writeCpuMicros = cpuBeforeWrites === null || cpuAfterWrites === null || written === stepStart ? null : ((cpuAfterWrites - cpuBeforeWrites) / ((written - stepStart) / blockBytes)) * 1e6;
    const rssBytesBeforeRestart = rssBytes(node.process.pid!);
    const memoryBeforeRestart = memoryParts(node.process.pid!);

    // 2. The restart after a crash (the writes ended with a flush: everything acknowledged is in the journal).
    await node.kill();
    node = null;
    const spawned = performance.now();
    node = await startNode(pool, nodeArgs, { readyTimeoutMs, launcher });
    const startSeconds = (performance.now() - spawned) / 1000;
    // Its CPU from spawn to the ready line (every thread): on a loaded machine it moves less than the wall time.
    const startCpuSeconds = processCpuSeconds(node.process.pid!);
    const startPhases = startLines(node);
    const rssBytesAfterStart = rssBytes(node.process.pid!);

    // 3. A checkpoint now, and the longest pause since the restart.
    const checkpoint = await api<CheckpointAnswer>('POST', '/v1/checkpoint');
    const afterCheckpoint = await api<NodeStatusPart>('GET', '/v1/status');

    // 4. Reads, cold then warm.
    const cold = await readIops(false);
    // Random reads touch every leaf of a large map only after several times as many reads as it has leaves
    // (4 GiB written at random: about 6,500 leaves, some 57,000 reads), more than a cold sample makes on a loaded
    // machine: unmeasured reads first, so that the warm sample finds the cache warm.
    if (warmupSeconds > 0) await fio(['--name=warmup', '--rw=randread', '--norandommap', '--time_based', `--runtime=${warmupSeconds}`]);
    const warm = await readIops(true);
    const rssBytesAfterReads = rssBytes(node.process.pid!);

    // 4b. With two snapshots or more: a diff of the last two (their maps walked together, shared pages skipped).
    let diff: ScaleStep['diff'] = null;
    if (snapshots >= 2) {
      const asked = performance.now();
      const report = await api<{ changedBytes: number; extents: unknown[] }>('GET', `/v1/volumes/${volume}/snapshots/s${snapshots - 2}/diff?to=s${snapshots - 1}`);
      diff = { seconds: (performance.now() - asked) / 1000, changedBytes: report.changedBytes, extents: report.extents.length };
    }
    // 4c. With snapshots: `snapshot list`, which counts the bytes each holds alone (a walk of the pages it holds alone).
    // The first after the restart counts them all; the second, nothing written between, finds them remembered
    // (held-alone.ts): both timed.
    let snapshotListSeconds: number | null = null;
    let snapshotListAgainSeconds: number | null = null;
    if (snapshots > 0) {
      const listSeconds = async (): Promise<number> => {
        const asked = performance.now();
        await api('GET', `/v1/volumes/${volume}/snapshots`);
        return (performance.now() - asked) / 1000;
      };
      snapshotListSeconds = await listSeconds();
      snapshotListAgainSeconds = await listSeconds();
    }

    // 5. A second restart, so that the next step's writes start with the counters and the pause monitor at zero.
    await node.stop();
    node = null;
    const respawned = performance.now();
    node = await startNode(pool, nodeArgs, { readyTimeoutMs, launcher });
    const startSecondsAgain = (performance.now() - respawned) / 1000;
    const startPhasesAgain = startLines(node);
    const step: ScaleStep = {
      writtenBytes: written,
      snapshots,
      writeIops: written === stepStart ? null : (written - stepStart) / blockBytes / writeSeconds,
      writeCpuMicros,
      rssBytesBeforeRestart,
      memoryBeforeRestart,
      eventLoopDelayMaxWritingSeconds: writing.eventLoopDelayMaxSeconds,
      longestPauseWriting: writing.eventLoopLongestPause ?? null,
      smallWritesWriting: writing.io?.smallWrites ?? null,
      longGapsWriting,
      machineWriting,
      checkpointsWhileWriting: writing.pool.checkpointsTotal,
      startSeconds,
      startCpuSeconds,
      startSecondsAgain,
      startPhases,
      startPhasesAgain,
      rssBytesAfterStart,
      metadataBytes: metadataBytes(pool),
      checkpointBytes: checkpoint.bytes,
      checkpointSeconds: checkpoint.seconds,
      checkpointEncodeSeconds: checkpoint.encodeSeconds,
      eventLoopDelayMaxCheckpointSeconds: afterCheckpoint.eventLoopDelayMaxSeconds,
      coldReadIops: cold.iops,
      warmReadIops: warm.iops,
      coldReadCpuMicros: cold.cpuMicros,
      warmReadCpuMicros: warm.cpuMicros,
      rssBytesAfterReads,
      snapshotSeconds: summarize(snapshotSeconds),
      diff,
      snapshotListSeconds,
      snapshotListAgainSeconds,
    };
    snapshotSeconds = [];
    results.push(step);
    console.log(`${formatSize(written)} written (${snapshots} snapshots): ${JSON.stringify(step)}`);
  }
  await node.stop();
  node = null;

  const projections = project(results);
  const note = `4 KiB random writes (QD32, fio nbd engine) into a ${formatSize(volumeBytes)} thin volume${snapshotCount > 0 ? `, ${snapshotCount} snapshots taken along the way` : ''}; reads: 4 KiB random, QD32, over the whole volume, ${runtimeSeconds} s each; ${os.availableParallelism()} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')} at the end.`;
  const markdown = [formatStepsTable(results), '', formatProjectionTable(projections), '', note].join('\n');
  console.log(`\n${markdown}`);
  if (values.out !== undefined) {
    fs.mkdirSync(values.out, { recursive: true });
    const machine = { cpus: os.availableParallelism(), cpuModel: os.cpus()[0]?.model ?? null, kernel: os.release(), node: process.version, loadAverage: os.loadavg() };
    const commit = (await commandOutput('git', ['rev-parse', 'HEAD'])) ?? null;
    const command = `npm run bench:scale -- ${process.argv.slice(2).join(' ')}`.trim();
    fs.writeFileSync(path.join(values.out, 'results.json'), `${JSON.stringify({ command, commit, machine, volumeBytes, snapshots: snapshotCount, runtimeSeconds, steps: results, projections }, null, 2)}\n`);
    fs.writeFileSync(path.join(values.out, 'results.md'), `${markdown}\n`);
    console.log(`results: ${values.out}`);
  }
}

main()
  .catch((error: unknown) => {
    process.stderr.write(`bench:scale: ${(error as Error).message}\n`);
    process.exitCode = 1;
  })
  .finally(() => cleanup());
