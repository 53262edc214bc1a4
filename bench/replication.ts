// npm run bench:replication: what replicating a volume to another node costs (the replication issue's figures).
//
// Design note. Two nodes on loopback, each with its own pool and a peer port, mutual TLS from `chunkd tls init DIR
// --node alpha --node beta`. alpha serves volume `vol` of --size bytes, filled once with random data (fio, fresh
// random bytes in every buffer, so nothing compresses or dedupes). Each run measures, in this order:
//   1. Full first replication against nbdcopy, interleaved (the order swaps every run). Beta's replica from the
//      run before is dropped first (a replica cannot be removed as it is: it is promoted, its snapshots removed,
//      then the volume). Replication: from the
//      request that adds the link (`replica add vol --peer beta --every 1h`) to alpha's log line "replicated
//      vol@... (full)", which ends the first cycle (snapshot, connect, stream, the peer's commit and prune).
//      nbdcopy: alpha's snapshot export vol@SNAP over its unix socket into a fresh volume of the same size on
//      beta, with --flush (the replica's receiver also makes what it got durable). MB/s is 10^6 bytes of volume
//      per second, for both.
//   2. An incremental after 1% of the volume changed in scattered 4 KiB writes (fio randwrite, --io_size of 1%,
//      its random map: no block twice): the changed bytes (`snapshot diff vol POINT`, before the sync) against
//      the cycle's stream bytes (`replica sync vol`), and its time.
//   3. Client I/O on alpha's volume (fio, nbd engine, 4 KiB random write QD32 and 1 MiB sequential write QD8)
//      with no link, with only the snapshot cycle a link runs on alpha (a snapshot taken and the one before it
//      removed, 500 ms after the last, through the API: no diff, no digest, no stream, no peer), with a link
//      replicating every 500 ms, and with the same link at --max-rate 100MiB/s; interleaved (--modes picks).
//      Before each sample a catch-up link brings beta current and is removed, so every sample starts alike; a
//      sample's link is added and its first cycle waited for before fio starts, and removed after. The link's
//      stream rate over the sample comes from alpha's streamBytesSentTotal. Each node's CPU per client I/O:
//      alpha's over fio's measured window (after its ramp), beta's over the whole fio run scaled to the window.
//      --warm-up S runs each linked mode once for S seconds before a row's first run, not measured: a fresh pool's
//      first capped laps grow its chunk files to the peak the cycles' two snapshots need (the first touch of that
//      memory costs the VM 7-10 ms per MiB; BENCHMARKS.md, issue 14), which a node that has run for long has
//      behind it; the default, 0, measures from a fresh pool, first laps included.
//      --perf DIR records each node with perf over each sample (the nodes then run with --perf-basic-prof, so
//      JavaScript frames have names); --chunkd DIR runs both nodes from another checkout (old and new code,
//      one bench run each, alternated by the caller).
//   4. Handoff with 1% dirty, after the runs above (it moves the volume, so it comes last; each handoff goes back the
//      other way): the owner's replica is brought current, 1% of the volume is written at random (as in 2), then
//      `volume handoff vol --to OTHER`; the pause is the handoff's own report (from the freeze, when writes are
//      refused, to the new owner's answer). Two loads, interleaved: quiet (no client writes during the handoff,
//      so phase 1 sends the 1% and the final increment is what is left), and a writer (fio 4 KiB random writes,
//      QD32, paced at 0.1% of the volume per second, from 2 s before the request until the freeze disconnects it),
//      where the final increment holds what it wrote during phase 1's last increment. (Faster writers made phase 1
//      diverge on a loaded 2-vCPU machine: at 1% per second each increment was larger than the one before, as the
//      cycles' snapshot pruning of scattered 4 KiB chunks took tens of seconds, and unpaced ones rewrite a small
//      volume faster than any increment ships it; phase 1 then gives up after 8.)
// Everything runs --runs times; the tables give medians and min–max. The control calls go straight to the API
// sockets (what `chunkd replica add/sync/remove --json` send), so no CLI process start is timed.
// Usage: npm run bench:replication -- [--size 4GiB] [--runs 3] [--runtime 10] [--warm-up 0] [--max-rate 100MiB/s] [--steps LIST] [--modes LIST] [--target DIR] [--out DIR]
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { callApi } from '../src/cli/api-client.ts';
import { ChunkdError } from '../src/core/errors.ts';
import { formatSize, parseRate, parseSize } from '../src/core/units.ts';
import { chunkdBin, nodeBinary, startNode, type Launcher, type RunningNode } from '../src/testing/node-process.ts';
import { fioFailure, measure, nbdTarget, runFio, type MeasureOptions } from './fio.ts';
import { cleanup, cleanupOnSignals, commandOutput, mustRun, onCleanup, processCpuSeconds, setClockTicks, sleep, Tools } from './processes.ts';
import { markdownTable, median, type RowSpec } from './report.ts';

const MiB = 2 ** 20;
const volume = 'vol';
/** The link that brings beta current between samples, and the one of the full replication: no timed cycles. */
const idleEveryMs = 3_600_000;
const cycleTimeoutMs = 30 * 60_000;
const fioTimeoutMs = 30 * 60_000;

const steps = ['full', 'incremental', 'client', 'handoff'] as const;
type Step = (typeof steps)[number];

const modeIds = ['no-link', 'snapshots-500ms', 'every-500ms', 'every-500ms-limited'] as const;

const usage = `usage: npm run bench:replication -- [--size 4GiB] [--runs 3] [--runtime 10] [--warm-up 0] [--max-rate 100MiB/s] [--steps LIST] [--modes LIST] [--target DIR] [--out DIR]
  --size SIZE      the volume replicated (default 4GiB; 256MiB for a quick check)
  --runs N         runs of every measurement, interleaved (default 3)
  --runtime S      seconds of each client I/O sample, after a 1 s ramp (default 10)
  --warm-up S      before a client row's first run, each linked mode for S seconds, not measured (default 0: none)
  --max-rate RATE  the limited link's rate in the client I/O rows (default 100MiB/s)
  --steps LIST     which measurements, comma-separated (default full,incremental,client,handoff; incremental needs full)
  --rows LIST      the client step's rows (default randwrite-4k-qd32,write-1m-qd8)
  --modes LIST     the client step's modes (default ${modeIds.join(',')}; no-link is always measured: the ratios are to it)
  --chunkd DIR     run both nodes from the checkout DIR (its bin/chunkd.js) instead of this one
  --perf DIR       perf record each node over each client sample into DIR (the nodes run with --perf-basic-prof)
  --target DIR     where the two pools go (default .); needs about 2 x SIZE free per node
  --out DIR        also write results.json and results.md there`;

interface Peer {
  name: string;
  node: RunningNode;
  address: string;
}

interface ReplicaStatus {
  peer: string;
  lastReplicated: { snapshot: string } | null;
  streamBytesSentTotal: number;
  cyclesTotal: number;
  lastError: { message: string } | null;
}

interface Cycle {
  outcome: 'full' | 'incremental' | 'resumed' | 'current';
  snapshot: string;
  streamBytes: number;
  dataBytes: number;
  seconds: number;
}

interface FullSample {
  run: number;
  system: 'replication' | 'nbdcopy';
  seconds: number;
  mbps: number;
  /** Replication only: the stream's own time (alpha's log line), and its bytes. */
  streamSeconds: number | null;
  streamBytes: number | null;
  /** CPU seconds (user + system, every thread) of each node over the copy. */
  alphaCpuSeconds: number;
  betaCpuSeconds: number;
}

interface IncrementalSample {
  run: number;
  changedBytes: number;
  streamBytes: number;
  dataBytes: number;
  cycleSeconds: number;
  wallSeconds: number;
}

interface ClientSample {
  run: number;
  row: string;
  mode: string;
  value: number;
  /** Bytes per second the link sent over the sample (null without a link). */
  linkBytesPerSecond: number | null;
  /** CPU microseconds (user + system, every thread) per client I/O: alpha over fio's measured window, beta scaled to it. */
  alphaCpuUsPerIo: number;
  betaCpuUsPerIo: number;
  /** alphaCpuUsPerIo's part on alpha's main thread (its share of alpha's CPU ticks over the whole fio run). */
  alphaMainCpuUsPerIo: number;
  /** Snapshot cycles alpha ran over the sample (a link's, or the bare snapshot cycle's); null with neither. */
  cycles: number | null;
}

interface HandoffSample {
  run: number;
  load: HandoffLoad;
  from: string;
  to: string;
  /** Bytes written at random before the request (1% of the volume). */
  dirtyBytes: number;
  /** The handoff's report: seconds writes were refused, increments of phase 1, the final increment's data bytes. */
  pauseSeconds: number;
  increments: number;
  finalBytes: number;
  /** The whole request. */
  seconds: number;
}

type HandoffLoad = 'quiet' | 'writer';

interface Mode {
  id: (typeof modeIds)[number];
  title: string;
  /** The link's settings during the sample, or null for none. */
  link: { everyMs: number; maxRateBytesPerSecond: number | null } | null;
  /** Without a link: take a snapshot and remove the one before, this long after the last (a link's cycle on alpha, bare). */
  snapshotsEveryMs: number | null;
}

const clientRows: RowSpec[] = [
  { id: 'randwrite-4k-qd32', title: '4 KiB random write, QD32', rw: 'randwrite', blockSize: '4k', iodepth: 32, connections: 1, metric: 'iops', readPercent: null },
  { id: 'write-1m-qd8', title: '1 MiB sequential write, QD8', rw: 'write', blockSize: '1M', iodepth: 8, connections: 1, metric: 'mbps', readPercent: null },
];

const api = (peer: Peer, method: string, route: string, body?: unknown): Promise<any> => callApi(peer.node.apiSocket, method, route, body);

async function replicas(alpha: Peer): Promise<ReplicaStatus[]> {
  return ((await api(alpha, 'GET', `/v1/volumes/${volume}/replicas`)) as { replicas: ReplicaStatus[] }).replicas;
}

async function addLink(alpha: Peer, beta: Peer, everyMs: number, maxRateBytesPerSecond: number | null = null): Promise<void> {
  await api(alpha, 'POST', `/v1/volumes/${volume}/replicas`, { peer: beta.address, everyMs, maxRateBytesPerSecond });
}

async function removeLink(alpha: Peer, beta: Peer): Promise<void> {
  if ((await replicas(alpha)).length > 0) await api(alpha, 'DELETE', `/v1/volumes/${volume}/replicas`, { peer: beta.address });
}

/** A cycle that starts after this call (`chunkd replica sync vol --json`). */
async function sync(alpha: Peer): Promise<Cycle> {
  const { cycles } = (await api(alpha, 'POST', `/v1/volumes/${volume}/replicate`, {})) as { cycles: Cycle[] };
  return cycles[0]!;
}

/**
 * Brings beta's replica current with a link of no schedule, then removes it: every sample starts from here. A
 * stream cut by removing the previous link is resumed first, then what changed since is sent, until a cycle finds
 * nothing new. Right after a cut beta may still be winding the old receive up: a failed cycle is retried.
 */
async function catchUp(alpha: Peer, beta: Peer): Promise<void> {
  await removeLink(alpha, beta);
  await addLink(alpha, beta, idleEveryMs);
  let failure: unknown = null;
  for (let attempt = 0; ; attempt++) {
    if (attempt > 10) throw new Error(`beta does not catch up: ${(failure as Error | null)?.message ?? 'no cycle finds it current'}`);
    const cycle = await sync(alpha).catch((error: unknown) => {
      failure = error;
      return null;
    });
    if (cycle?.outcome === 'current') break;
    if (cycle === null) await sleep(250);
  }
  await removeLink(alpha, beta);
}

/**
 * Removes the link and beta's replica, so that the next link sends the volume whole. A replica cannot be removed
 * as it is (its snapshots are its owner's to prune), so it is promoted first, as in a failover; promote also gives
 * up a receive that removing the link cut, once beta has wound it up (until then it answers EBUSY).
 */
async function dropReplica(alpha: Peer, beta: Peer): Promise<void> {
  await removeLink(alpha, beta);
  if (!((await api(beta, 'GET', '/v1/volumes')) as { volumes: Array<{ name: string }> }).volumes.some((v) => v.name === volume)) return;
  for (let attempt = 0; ; attempt++) {
    const refused = await api(beta, 'POST', `/v1/volumes/${volume}/promote`, {}).then(() => null, (error: unknown) => error);
    if (refused === null) break;
    if (attempt >= 20 || !(refused instanceof ChunkdError) || refused.code !== 'EBUSY') throw refused;
    await sleep(250);
  }
  for (const { name } of ((await api(beta, 'GET', `/v1/volumes/${volume}/snapshots`)) as { snapshots: Array<{ name: string }> }).snapshots) {
    await api(beta, 'DELETE', `/v1/volumes/${volume}/snapshots/${name}`);
  }
  await api(beta, 'DELETE', `/v1/volumes/${volume}`);
}

/** Waits for the first log line of a full cycle of vol that alpha writes past `logOffset`; returns the stream's seconds it names. */
async function fullCycleLine(alpha: Peer, logOffset: number): Promise<number> {
  const deadline = Date.now() + cycleTimeoutMs;
  for (;;) {
    const log = alpha.node.stderr().slice(logOffset);
    const done = /replicated vol@repl-\d+ to beta \(full\): .* in ([\d.]+) s/.exec(log);
    if (done !== null) return Number(done[1]);
    const failed = /replication of vol to \S+ failed.*/.exec(log);
    if (failed !== null) throw new Error(failed[0]);
    if (Date.now() > deadline) throw new Error(`no full cycle in ${cycleTimeoutMs / 1000} s`);
    await sleep(20);
  }
}

/** Starts counting both nodes' CPU seconds; the function returned reads what they used since. */
function cpuMeter(alpha: Peer, beta: Peer): () => { alphaCpuSeconds: number; betaCpuSeconds: number } {
  const cpu = (peer: Peer): number => processCpuSeconds(peer.node.process.pid!) ?? Number.NaN;
  const [alphaStart, betaStart] = [cpu(alpha), cpu(beta)];
  return () => ({ alphaCpuSeconds: cpu(alpha) - alphaStart, betaCpuSeconds: cpu(beta) - betaStart });
}

async function fullReplication(alpha: Peer, beta: Peer, sizeBytes: number, run: number): Promise<FullSample> {
  const logOffset = alpha.node.stderr().length;
  const cpu = cpuMeter(alpha, beta);
  const started = performance.now();
  await addLink(alpha, beta, idleEveryMs); // its first cycle starts now
  const streamSeconds = await fullCycleLine(alpha, logOffset);
  const seconds = (performance.now() - started) / 1000;
  const [link] = await replicas(alpha);
  if (link!.lastError !== null) throw new Error(`replication: ${link!.lastError.message}`);
  return { run, system: 'replication', seconds, mbps: sizeBytes / seconds / 1e6, streamSeconds, streamBytes: link!.streamBytesSentTotal, ...cpu() };
}

async function fullNbdcopy(tools: Tools, alpha: Peer, beta: Peer, sizeBytes: number, run: number): Promise<FullSample> {
  const snapshot = `copy-src-${run}`;
  await api(alpha, 'POST', `/v1/volumes/${volume}/snapshots`, { name: snapshot });
  await api(beta, 'POST', '/v1/volumes', { name: 'copy', sizeBytes });
  const cpu = cpuMeter(alpha, beta);
  const started = performance.now();
  await mustRun(tools.get('nbdcopy'), ['--flush', alpha.node.uri(`${volume}@${snapshot}`), beta.node.uri('copy')], { timeoutMs: cycleTimeoutMs });
  const seconds = (performance.now() - started) / 1000;
  const used = cpu();
  await api(beta, 'DELETE', '/v1/volumes/copy');
  await api(alpha, 'DELETE', `/v1/volumes/${volume}/snapshots/${snapshot}`);
  return { run, system: 'nbdcopy', seconds, mbps: sizeBytes / seconds / 1e6, streamSeconds: null, streamBytes: null, ...used };
}

async function incremental(tools: Tools, alpha: Peer, sizeBytes: number, run: number): Promise<IncrementalSample> {
  const [link] = await replicas(alpha);
  const point = link!.lastReplicated!.snapshot;
  const writes = Math.round((0.01 * sizeBytes) / 4096);
  const fio = await runFio(tools, ['--name=scatter', '--ioengine=nbd', `--uri=${alpha.node.uri(volume)}`, `--size=${sizeBytes}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
    `--io_size=${writes * 4096}`, `--randseed=${run + 1}`, '--refill_buffers', '--end_fsync=1', '--output-format=json'], fioTimeoutMs, null, 0, true);
  if (fio.code !== 0) throw new Error(fioFailure(fio));
  const { changedBytes } = (await api(alpha, 'GET', `/v1/volumes/${volume}/snapshots/${point}/diff`)) as { changedBytes: number };
  const started = performance.now();
  const cycle = await sync(alpha);
  const wallSeconds = (performance.now() - started) / 1000;
  if (cycle.outcome !== 'incremental') throw new Error(`the sync after 1% changed was ${cycle.outcome}, not incremental`);
  return { run, changedBytes, streamBytes: cycle.streamBytes, dataBytes: cycle.dataBytes, cycleSeconds: cycle.seconds, wallSeconds };
}

/**
 * A link's snapshot cycle on alpha without the link: a snapshot, then the one before it removed, `everyMs` after
 * the last cycle ended (as a link schedules); the function returned stops it, removes the last snapshot, and
 * resolves with the cycles run.
 */
function snapshotCycles(alpha: Peer, everyMs: number): () => Promise<number> {
  let stopping = false;
  let cycles = 0;
  const loop = (async () => {
    let previous: string | null = null;
    while (!stopping) {
      const name = `bench-cycle-${cycles}`;
      await api(alpha, 'POST', `/v1/volumes/${volume}/snapshots`, { name });
      if (previous !== null) await api(alpha, 'DELETE', `/v1/volumes/${volume}/snapshots/${previous}`);
      previous = name;
      cycles += 1;
      await sleep(everyMs);
    }
    if (previous !== null) await api(alpha, 'DELETE', `/v1/volumes/${volume}/snapshots/${previous}`);
  })();
  return async () => {
    stopping = true;
    await loop;
    return cycles;
  };
}

/** perf record of a node (every thread, call graphs) into `file` until the function returned is called. */
function perfRecord(pid: number, file: string): () => Promise<void> {
  const perf = spawn('perf', ['record', '-F', '499', '-g', '-p', String(pid), '-o', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  perf.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const exited = new Promise<void>((resolve) => perf.once('exit', () => resolve()));
  perf.once('error', (error) => process.stderr.write(`perf: ${error.message}\n`));
  return async () => {
    perf.kill('SIGINT');
    await exited;
    if (!fs.existsSync(file)) process.stderr.write(`perf wrote no ${file}: ${stderr}\n`);
  };
}

async function clientSample(tools: Tools, alpha: Peer, beta: Peer, row: RowSpec, mode: Mode, run: number, options: MeasureOptions, perfDir: string | null): Promise<ClientSample> {
  await catchUp(alpha, beta);
  if (mode.link !== null) {
    await addLink(alpha, beta, mode.link.everyMs, mode.link.maxRateBytesPerSecond);
    await sync(alpha); // the link's first cycle: beta is current, the link's base is set
  }
  const linkBefore = mode.link === null ? null : (await replicas(alpha))[0]!;
  const stopCycles = mode.snapshotsEveryMs === null ? null : snapshotCycles(alpha, mode.snapshotsEveryMs);
  const stopPerf = perfDir === null ? [] : [alpha, beta].map((peer) => perfRecord(peer.node.process.pid!, path.join(perfDir, `${row.id}-${mode.id}-run${run + 1}-${peer.name}.data`)));
  const cpu = cpuMeter(alpha, beta);
  const ticksBefore = threadTicks(alpha.node.process.pid!);
  const started = performance.now();
  const sample = await measure(tools, nbdTarget(alpha.node.uri(volume)), alpha.node.process.pid!, row, mode.id, run, options);
  const seconds = (performance.now() - started) / 1000;
  const ticksAfter = threadTicks(alpha.node.process.pid!);
  const mainShare = (ticksAfter.main - ticksBefore.main) / Math.max(1, ticksAfter.all - ticksBefore.all);
  const { betaCpuSeconds } = cpu();
  await Promise.all(stopPerf.map((stop) => stop()));
  const linkAfter = mode.link === null ? null : (await replicas(alpha))[0]!;
  const cycles = stopCycles !== null ? await stopCycles() : linkAfter === null ? null : linkAfter.cyclesTotal - linkBefore!.cyclesTotal;
  await removeLink(alpha, beta);
  if (sample.error !== null) throw new Error(`${row.id} ${mode.id}: ${sample.error}`);
  const value = row.metric === 'iops' ? sample.iops! : sample.mbps!;
  const ios = (sample.ioBytes ?? Number.NaN) / parseSize(row.blockSize);
  return {
    run,
    row: row.id,
    mode: mode.id,
    value,
    linkBytesPerSecond: linkAfter === null ? null : (linkAfter.streamBytesSentTotal - linkBefore!.streamBytesSentTotal) / seconds,
    alphaCpuUsPerIo: ((sample.serverCpuSeconds ?? Number.NaN) * 1e6) / ios,
    betaCpuUsPerIo: ((betaCpuSeconds * options.runtimeSeconds) / seconds) * 1e6 / ios,
    alphaMainCpuUsPerIo: (((sample.serverCpuSeconds ?? Number.NaN) * 1e6) / ios) * mainShare,
    cycles,
  };
}

/** CPU clock ticks (user + system) of a process's main thread and of the whole process, from /proc. */
function threadTicks(pid: number): { main: number; all: number } {
  const ticks = (file: string): number => {
    const stat = fs.readFileSync(file, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[14 - 3]) + Number(fields[15 - 3]);
  };
  return { main: ticks(`/proc/${pid}/task/${pid}/stat`), all: ticks(`/proc/${pid}/stat`) };
}

/** Writes 1% of the volume on `owner` at random, in 4 KiB writes, no block twice; returns the bytes written. */
async function dirtyOnePercent(tools: Tools, owner: Peer, sizeBytes: number, seed: number): Promise<number> {
  const writes = Math.round((0.01 * sizeBytes) / 4096);
  const fio = await runFio(tools, ['--name=scatter', '--ioengine=nbd', `--uri=${owner.node.uri(volume)}`, `--size=${sizeBytes}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
    `--io_size=${writes * 4096}`, `--randseed=${seed}`, '--refill_buffers', '--end_fsync=1', '--output-format=json'], fioTimeoutMs, null, 0, true);
  if (fio.code !== 0) throw new Error(fioFailure(fio));
  return writes * 4096;
}

/** Step 4: `owner` hands the volume to `target` with 1% dirty (see the note at the top); the caller swaps the two after. */
async function handoffSample(tools: Tools, owner: Peer, target: Peer, sizeBytes: number, run: number, load: HandoffLoad): Promise<HandoffSample> {
  await catchUp(owner, target);
  const dirtyBytes = await dirtyOnePercent(tools, owner, sizeBytes, 100 + run * 2 + (load === 'quiet' ? 0 : 1));
  let writer: Promise<{ code: number | null; stdout: string; stderr: string }> | null = null;
  if (load === 'writer') {
    writer = runFio(tools, ['--name=writer', '--ioengine=nbd', `--uri=${owner.node.uri(volume)}`, `--size=${sizeBytes}`, '--rw=randwrite', '--bs=4k', '--iodepth=32',
      `--rate=${Math.round(sizeBytes / 1000)}`, '--time_based', '--runtime=600', '--refill_buffers'], 660_000, null, 0, true);
    await sleep(2000);
  }
  const started = performance.now();
  const result = (await api(owner, 'POST', `/v1/volumes/${volume}/handoff`, { to: target.address })) as { pauseSeconds: number; increments: number; finalBytes: number; completedEarlier: boolean };
  const seconds = (performance.now() - started) / 1000;
  if (writer !== null && (await writer).code === 0) throw new Error('the writer ran its 600 s to the end before the freeze (phase 1 did not converge) or was not disconnected by it');
  if (result.completedEarlier) throw new Error('the handoff reports an earlier attempt');
  return { run, load, from: owner.name, to: target.name, dirtyBytes, pauseSeconds: result.pauseSeconds, increments: result.increments, finalBytes: result.finalBytes, seconds };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

async function startPeer(scratch: string, name: string, launcher: Launcher, extra: string[] = []): Promise<Peer> {
  const port = await freePort();
  const node = await startNode(path.join(scratch, name), ['--peer-listen', `127.0.0.1:${port}`, '--tls-dir', path.join(scratch, 'tls', name), ...extra], { launcher });
  onCleanup(`node ${name}`, async () => {
    if ((await node.stop()) !== 0) process.stderr.write(`bench:replication: node ${name} did not stop cleanly:\n${node.stderr().split('\n').slice(-20).join('\n')}\n`);
  });
  return { name, node, address: `127.0.0.1:${port}` };
}

interface Spread {
  median: number;
  min: number;
  max: number;
}

function spread(values: number[]): Spread {
  return { median: median(values), min: Math.min(...values), max: Math.max(...values) };
}

const fixed = (value: number, digits: number): string => value.toFixed(digits);
const cell = (s: Spread, digits = 0, unit = ''): string => `${fixed(s.median, digits)}${unit} [${fixed(s.min, digits)}–${fixed(s.max, digits)}]`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      size: { type: 'string', default: '4GiB' },
      runs: { type: 'string', default: '3' },
      runtime: { type: 'string', default: '10' },
      'warm-up': { type: 'string', default: '0' },
      'max-rate': { type: 'string', default: '100MiB/s' },
      target: { type: 'string', default: '.' },
      steps: { type: 'string', default: steps.join(',') },
      modes: { type: 'string', default: modeIds.join(',') },
      rows: { type: 'string', default: clientRows.map((row) => row.id).join(',') },
      chunkd: { type: 'string' },
      perf: { type: 'string' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    return;
  }
  const sizeBytes = parseSize(values.size);
  const runs = Number(values.runs);
  const maxRate = parseRate(values['max-rate'], '--max-rate');
  const chosen = new Set(values.steps.split(',').map((step) => step.trim()));
  for (const step of chosen) if (!(steps as readonly string[]).includes(step)) throw new Error(`--steps: unknown step ${step} (known: ${steps.join(', ')})`);
  if (chosen.has('incremental') && !chosen.has('full')) throw new Error('--steps: incremental needs full (it sends what changed since the full replication)');
  const doing = (step: Step): boolean => chosen.has(step);
  if (sizeBytes % MiB !== 0 || sizeBytes < 64 * MiB) throw new Error('--size must be a whole number of MiB, at least 64MiB');
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs must be a whole number, at least 1');
  const options: MeasureOptions = { runtimeSeconds: Number(values.runtime), rampSeconds: 1, sizeBytes, flushEveryBytes: null };
  const warmUpSeconds = Number(values['warm-up']);
  if (!Number.isFinite(warmUpSeconds) || warmUpSeconds < 0) throw new Error('--warm-up must be a number of seconds, 0 or more');
  const tools = new Tools(new Map());
  for (const tool of ['fio', 'nbdcopy']) tools.get(tool);
  setClockTicks(Number((await commandOutput('getconf', ['CLK_TCK'])) ?? '100'));
  cleanupOnSignals();
  const scratch = fs.mkdtempSync(path.join(path.resolve(values.target), '.chunkd-replbench-'));
  onCleanup('scratch', () => fs.rmSync(scratch, { recursive: true, force: true }));
  const allModes: Mode[] = [
    { id: 'no-link', title: 'no replica link', link: null, snapshotsEveryMs: null },
    { id: 'snapshots-500ms', title: 'snapshot + remove every 500 ms, no link', link: null, snapshotsEveryMs: 500 },
    { id: 'every-500ms', title: 'replicating every 500 ms', link: { everyMs: 500, maxRateBytesPerSecond: null }, snapshotsEveryMs: null },
    { id: 'every-500ms-limited', title: `every 500 ms, --max-rate ${formatSize(maxRate)}/s`, link: { everyMs: 500, maxRateBytesPerSecond: maxRate }, snapshotsEveryMs: null },
  ];
  const chosenModes = new Set(['no-link', ...values.modes.split(',').map((mode) => mode.trim())]);
  for (const mode of chosenModes) if (!(modeIds as readonly string[]).includes(mode)) throw new Error(`--modes: unknown mode ${mode} (known: ${modeIds.join(', ')})`);
  const modes = allModes.filter((mode) => chosenModes.has(mode.id));
  const rows = values.rows.split(',').map((id) => clientRows.find((row) => row.id === id.trim()) ?? null);
  if (rows.includes(null)) throw new Error(`--rows: one of ${values.rows} is not a row (known: ${clientRows.map((row) => row.id).join(', ')})`);
  const bin = values.chunkd === undefined ? chunkdBin : path.join(path.resolve(values.chunkd), 'bin', 'chunkd.js');
  if (!fs.existsSync(bin)) throw new Error(`--chunkd: no ${bin}`);
  const perfDir = values.perf === undefined ? null : path.resolve(values.perf);
  if (perfDir !== null) fs.mkdirSync(perfDir, { recursive: true });
  const launcher: Launcher = { command: nodeBinary, prefix: [bin], ...(perfDir === null ? {} : { env: { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --perf-basic-prof`.trim() } }) };

  await mustRun(process.execPath, [bin, 'tls', 'init', path.join(scratch, 'tls'), '--node', 'alpha', '--node', 'beta']);
  const alpha = await startPeer(scratch, 'alpha', launcher, ['--default-volume', `${volume}:${sizeBytes / MiB}MiB`]);
  const beta = await startPeer(scratch, 'beta', launcher);
  try {
    console.log(`alpha pid ${alpha.node.process.pid}, beta pid ${beta.node.process.pid} (${bin}); filling ${formatSize(sizeBytes)} of ${volume} with random data`);
    const fill = await runFio(tools, ['--name=fill', '--ioengine=nbd', `--uri=${alpha.node.uri(volume)}`, `--size=${sizeBytes}`, '--rw=write', '--bs=1M', '--iodepth=8',
      '--refill_buffers', '--end_fsync=1', '--output-format=json'], fioTimeoutMs, null, 0, true);
    if (fill.code !== 0) throw new Error(fioFailure(fill));

    const full: FullSample[] = [];
    const increments: IncrementalSample[] = [];
    const client: ClientSample[] = [];
    const handoffs: HandoffSample[] = [];
    for (let run = 0; run < runs; run++) {
      // 1. A fresh start on beta: no link, no replica.
      if (doing('full')) await dropReplica(alpha, beta);
      for (const system of !doing('full') ? [] : run % 2 === 0 ? ['replication', 'nbdcopy'] : ['nbdcopy', 'replication']) {
        const sample = system === 'replication' ? await fullReplication(alpha, beta, sizeBytes, run) : await fullNbdcopy(tools, alpha, beta, sizeBytes, run);
        full.push(sample);
        console.log(`run ${run + 1} full ${system}: ${sample.seconds.toFixed(2)} s, ${sample.mbps.toFixed(0)} MB/s, CPU s alpha ${sample.alphaCpuSeconds.toFixed(1)} beta ${sample.betaCpuSeconds.toFixed(1)}${sample.streamBytes === null ? '' : ` (stream ${sample.streamSeconds} s, ${sample.streamBytes} bytes)`}`);
      }
      // 2. The link of step 1 is still there (every 1h): 1% changed, one sync.
      if (doing('incremental')) {
        const inc = await incremental(tools, alpha, sizeBytes, run);
        increments.push(inc);
        console.log(`run ${run + 1} incremental: ${inc.changedBytes} bytes changed, ${inc.streamBytes} bytes of stream (${(inc.streamBytes / inc.changedBytes).toFixed(4)}x) in ${inc.wallSeconds.toFixed(2)} s`);
      }
      // 3. Client I/O with and without a link; the modes' order turns every run.
      for (const row of doing('client') ? (rows as RowSpec[]) : []) {
        for (const mode of run > 0 || warmUpSeconds === 0 ? [] : modes.filter((m) => m.link !== null)) {
          const warm = await clientSample(tools, alpha, beta, row, mode, run, { ...options, runtimeSeconds: warmUpSeconds }, null);
          console.log(`warm-up ${row.id} ${mode.id} (not measured): ${warm.value.toFixed(0)} ${row.metric === 'iops' ? 'IOPS' : 'MB/s'}, CPU us per I/O alpha ${warm.alphaCpuUsPerIo.toFixed(1)} beta ${warm.betaCpuUsPerIo.toFixed(1)}`);
        }
        for (let i = 0; i < modes.length; i++) {
          const mode = modes[(i + run) % modes.length]!;
          const sample = await clientSample(tools, alpha, beta, row, mode, run, options, perfDir);
          client.push(sample);
          const rate = sample.linkBytesPerSecond === null ? '' : `, link ${(sample.linkBytesPerSecond / MiB).toFixed(1)} MiB/s`;
          const cycles = sample.cycles === null ? '' : `, ${sample.cycles} cycles`;
          console.log(`run ${run + 1} ${row.id} ${mode.id}: ${sample.value.toFixed(0)} ${row.metric === 'iops' ? 'IOPS' : 'MB/s'}${rate}${cycles}, CPU us per I/O alpha ${sample.alphaCpuUsPerIo.toFixed(1)} (main thread ${sample.alphaMainCpuUsPerIo.toFixed(1)}) beta ${sample.betaCpuUsPerIo.toFixed(1)}`);
        }
      }
    }

    // 4. Handoffs, back and forth: the volume's owner changes with each.
    let [owner, other] = [alpha, beta];
    for (let run = 0; run < runs && doing('handoff'); run++) {
      for (const load of run % 2 === 0 ? (['quiet', 'writer'] as const) : (['writer', 'quiet'] as const)) {
        const sample = await handoffSample(tools, owner, other, sizeBytes, run, load);
        handoffs.push(sample);
        [owner, other] = [other, owner];
        console.log(`run ${run + 1} handoff ${sample.from} -> ${sample.to} (${load}): writes paused ${sample.pauseSeconds.toFixed(3)} s, ${sample.increments} increment(s), final ${sample.finalBytes} bytes, ${sample.seconds.toFixed(2)} s in all`);
      }
    }

    const report = summarise(sizeBytes, runs, maxRate, modes, full, increments, client, handoffs, options);
    const markdown = formatReport(report, modes) + (warmUpSeconds > 0 && doing('client') ? `\n\nBefore each row's first run, each linked mode ran ${warmUpSeconds} s, not measured (--warm-up).` : '');
    console.log(`\n${markdown}`);
    if (values.out !== undefined) {
      fs.mkdirSync(values.out, { recursive: true });
      const machine = { cpus: os.availableParallelism(), cpuModel: os.cpus()[0]?.model ?? null, kernel: os.release(), node: process.version, loadAverage: os.loadavg() };
      const commit = (await commandOutput('git', ['rev-parse', 'HEAD'])) ?? null;
      const command = `npm run bench:replication -- ${process.argv.slice(2).join(' ')}`.trim();
      fs.writeFileSync(path.join(values.out, 'results.json'), `${JSON.stringify({ command, commit, machine, warmUpSeconds, ...report, samples: { full, increments, client, handoffs } }, null, 2)}\n`);
      fs.writeFileSync(path.join(values.out, 'results.md'), `${markdown}\n`);
      for (const peer of [alpha, beta]) fs.writeFileSync(path.join(values.out, `${peer.name}.log`), peer.node.stderr());
      console.log(`results: ${values.out}`);
    }
  } catch (error) {
    for (const peer of [alpha, beta]) process.stderr.write(`${peer.name} log (last lines):\n${peer.node.stderr().split('\n').slice(-15).join('\n')}\n`);
    throw error;
  }
}

function summarise(sizeBytes: number, runs: number, maxRate: number, modes: Mode[], full: FullSample[], increments: IncrementalSample[], client: ClientSample[], handoffs: HandoffSample[], options: MeasureOptions) {
  const of = (system: string): FullSample[] => full.filter((s) => s.system === system);
  const cpuPerGB = (samples: FullSample[]) => ({
    alphaCpuSecondsPerGB: spread(samples.map((s) => s.alphaCpuSeconds / (sizeBytes / 1e9))),
    betaCpuSecondsPerGB: spread(samples.map((s) => s.betaCpuSeconds / (sizeBytes / 1e9))),
  });
  // Ratios per run (the two systems of a run ran back to back), then their median.
  const fullRatios = of('replication').map((r) => r.mbps / of('nbdcopy').find((c) => c.run === r.run)!.mbps);
  const clientSummary = client.length === 0 ? null : clientRows.filter((row) => client.some((s) => s.row === row.id)).map((row) => {
    const byMode = Object.fromEntries(modes.map((mode) => {
      const mine = client.filter((s) => s.row === row.id && s.mode === mode.id);
      const base = client.filter((s) => s.row === row.id && s.mode === 'no-link');
      const ratios = mine.map((s) => s.value / base.find((b) => b.run === s.run)!.value);
      const rates = mine.map((s) => s.linkBytesPerSecond).filter((r): r is number => r !== null);
      return [mode.id, {
        value: spread(mine.map((s) => s.value)),
        ratioToNoLink: spread(ratios),
        linkMiBPerSecond: rates.length === 0 ? null : spread(rates.map((r) => r / MiB)),
        alphaCpuUsPerIo: spread(mine.map((s) => s.alphaCpuUsPerIo)),
        betaCpuUsPerIo: spread(mine.map((s) => s.betaCpuUsPerIo)),
      }];
    }));
    return { row: row.id, title: row.title, metric: row.metric, modes: byMode };
  });
  return {
    sizeBytes,
    runs,
    runtimeSeconds: options.runtimeSeconds,
    maxRateBytesPerSecond: maxRate,
    full: full.length === 0 ? null : {
      replication: { mbps: spread(of('replication').map((s) => s.mbps)), seconds: spread(of('replication').map((s) => s.seconds)), streamSeconds: spread(of('replication').map((s) => s.streamSeconds!)), streamBytesPerVolumeByte: spread(of('replication').map((s) => s.streamBytes! / sizeBytes)), ...cpuPerGB(of('replication')) },
      nbdcopy: { mbps: spread(of('nbdcopy').map((s) => s.mbps)), seconds: spread(of('nbdcopy').map((s) => s.seconds)), ...cpuPerGB(of('nbdcopy')) },
      ratio: spread(fullRatios),
    },
    incremental: increments.length === 0 ? null : {
      changedBytes: spread(increments.map((s) => s.changedBytes)),
      streamBytes: spread(increments.map((s) => s.streamBytes)),
      streamPerChanged: spread(increments.map((s) => s.streamBytes / s.changedBytes)),
      overheadBytes: spread(increments.map((s) => s.streamBytes - s.changedBytes)),
      seconds: spread(increments.map((s) => s.wallSeconds)),
    },
    client: clientSummary,
    handoff: handoffs.length === 0 ? null : (['quiet', 'writer'] as const).map((load) => {
      const mine = handoffs.filter((s) => s.load === load);
      return {
        load,
        dirtyBytes: spread(mine.map((s) => s.dirtyBytes)),
        pauseSeconds: spread(mine.map((s) => s.pauseSeconds)),
        increments: spread(mine.map((s) => s.increments)),
        finalBytes: spread(mine.map((s) => s.finalBytes)),
        seconds: spread(mine.map((s) => s.seconds)),
      };
    }),
  };
}

function formatReport(report: ReturnType<typeof summarise>, modes: Mode[]): string {
  const size = formatSize(report.sizeBytes);
  const { full, incremental, client, handoff } = report;
  const cpu = (system: NonNullable<typeof full>['nbdcopy']): string => `${fixed(system.alphaCpuSecondsPerGB.median, 1)} / ${fixed(system.betaCpuSecondsPerGB.median, 1)}`;
  const fullTable = (full: NonNullable<typeof report.full>): string => markdownTable([`full first replication of ${size}`, 'MB/s', 'seconds', 'vs nbdcopy (goal ≥ 0.8x)', 'node CPU s per GB, alpha / beta'], [
    [`chunkd replica add → first cycle done (stream alone ${cell(full.replication.streamSeconds, 2, ' s')}; ${fixed(full.replication.streamBytesPerVolumeByte.median, 4)} stream bytes per volume byte)`, cell(full.replication.mbps), cell(full.replication.seconds, 2), `${cell(full.ratio, 2, 'x')}`, cpu(full.replication)],
    ['nbdcopy --flush alpha vol@snap → fresh volume on beta', cell(full.nbdcopy.mbps), cell(full.nbdcopy.seconds, 2), '1.00x', cpu(full.nbdcopy)],
  ]);
  const incTable = (incremental: NonNullable<typeof report.incremental>): string => markdownTable(['incremental, 1% changed in 4 KiB writes', 'changed bytes', 'stream bytes', 'stream / changed (goal ≤ 1.05x)', 'overhead bytes', 'seconds'], [
    ['replica sync', cell(incremental.changedBytes), cell(incremental.streamBytes), cell(incremental.streamPerChanged, 4, 'x'), cell(incremental.overheadBytes), cell(incremental.seconds, 2)],
  ]);
  const others = modes.filter((m) => m.id !== 'no-link');
  const linked = modes.filter((m) => m.link !== null);
  const clientTable = (rows: NonNullable<typeof report.client>): string => markdownTable(['client I/O on alpha', ...modes.map((m) => m.title), ...others.map((m) => `${m.id} / no link${m.link === null ? '' : ' (goal ≥ 0.8x)'}`), ...linked.map((m) => `link MiB/s, ${m.id}`)],
    rows.map((row) => {
      const unit = row.metric === 'iops' ? ' IOPS' : ' MB/s';
      return [row.title, ...modes.map((m) => cell(row.modes[m.id]!.value, 0, unit)), ...others.map((m) => cell(row.modes[m.id]!.ratioToNoLink, 2, 'x')), ...linked.map((m) => cell(row.modes[m.id]!.linkMiBPerSecond!, 1))];
    }));
  // CPU per client I/O: what each node spends beside the client's own work.
  const cpuTable = (rows: NonNullable<typeof report.client>): string => markdownTable(['node CPU µs per client I/O, alpha / beta', ...modes.map((m) => m.title)],
    rows.map((row) => [row.title, ...modes.map((m) => `${fixed(row.modes[m.id]!.alphaCpuUsPerIo.median, 1)} / ${fixed(row.modes[m.id]!.betaCpuUsPerIo.median, 1)}`)]));
  const handoffTitle: Record<HandoffLoad, string> = {
    quiet: 'volume handoff, 1% dirty, no client writing',
    writer: 'volume handoff, 1% dirty, fio writing 0.1% of the volume per second (4 KiB random, QD32) until the freeze',
  };
  const handoffTable = (rows: NonNullable<typeof report.handoff>): string => markdownTable(['handoff (back and forth)', 'dirty bytes at the request', 'write pause, s (goal < 1 s)', 'phase-1 increments', 'final increment bytes', 'whole handoff, s'],
    rows.map((row) => [handoffTitle[row.load], cell(row.dirtyBytes), cell(row.pauseSeconds, 3), cell(row.increments), cell(row.finalBytes), cell(row.seconds, 2)]));
  const note = `${report.runs} run(s), medians [min–max]; a ${size} volume of random data, two nodes on loopback (mutual TLS on the peer port); client I/O samples ${report.runtimeSeconds} s after a 1 s ramp; ${os.availableParallelism()} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')} at the end.`;
  const tables = [
    ...(full === null ? [] : [fullTable(full), '']),
    ...(incremental === null ? [] : [incTable(incremental), '']),
    ...(client === null ? [] : [clientTable(client), '', cpuTable(client), '']),
    ...(handoff === null ? [] : [handoffTable(handoff), '']),
  ];
  return [...tables, note].join('\n');
}

main()
  .catch((error: unknown) => {
    process.stderr.write(`bench:replication: ${(error as Error).message}\n`);
    process.exitCode = 1;
  })
  .finally(() => cleanup());
