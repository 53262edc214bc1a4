// The scale benchmark's figures (bench/scale.ts) as data: the per-step record, the projection from the measured
// slopes, and the Markdown table. Pure, so that test/unit/bench-report.test.ts checks the arithmetic.
import { formatSize } from '../src/core/units.ts';
import { markdownTable } from './report.ts';

const GiB = 2 ** 30;
const TiB = 2 ** 40;

/** One step: the figures after `writtenBytes` (cumulative) were written at random in 4 KiB writes. */
export interface ScaleStep {
  writtenBytes: number;
  /** Snapshots of the volume taken so far. */
  snapshots: number;
  /** 4 KiB random write IOPS (QD32) over this step's writes; null for the baseline (nothing written). */
  writeIops: number | null;
  /** The node's RSS (/proc/PID/status VmRSS) after the writes, before the restart. */
  rssBytesBeforeRestart: number;
  /** The same RSS by kind of mapping (`memoryParts`), and the node's peak RSS since its start; absent in runs before they were kept. */
  memoryBeforeRestart?: MemoryParts | null;
  /** The node's CPU (user + system, every thread) per 4 KiB write of this step, µs; null for the baseline. */
  writeCpuMicros?: number | null;
  /** The event loop's longest pause over the writes (the node's since its last start: GC, natural checkpoints). */
  eventLoopDelayMaxWritingSeconds: number;
  /**
   * The longest gap between two ticks of the node's 10 ms timer over the same span, and what its main thread did
   * through it (src/node/loop-pauses.ts): its CPU, its wait for a CPU, the rest; absent in runs before it was kept.
   */
  longestPauseWriting?: { gapSeconds: number; onCpuSeconds: number; runQueueSeconds: number | null; elsewhereSeconds: number; gcSeconds?: number } | null;
  /** Every gap of the event loop over 50 ms over the writes, as the node logged it (src/node/loop-pauses.ts); absent in runs before it was kept. */
  longGapsWriting?: string[];
  /**
   * The whole machine's CPU time over the same span (/proc/stat): the share a hypervisor stole (a virtual CPU with
   * work, not run: the node's threads waited for a CPU or stood still in the middle of their work meanwhile), and
   * the share idle; null for the baseline, absent in runs before it was kept.
   */
  machineWriting?: { stealPercent: number; idlePercent: number } | null;
  /** Small writes the node's main thread pwrote itself or handed to the chunk writer's thread over the same span, and the longest of its own (chunk-writer.ts); absent in runs before it was kept. */
  smallWritesWriting?: { inline: number; thread: number; longestInlineSeconds: number } | null;
  /** Checkpoints the node wrote during the writes (its journal filled). */
  checkpointsWhileWriting: number;
  /**
   * From spawn to the ready line after a kill -9: the open replays this step's journal (since the last checkpoint)
   * and writes a checkpoint (format 3: of everything; paged: the pages the replay changed).
   */
  startSeconds: number;
  /** The same for a second restart, after a stop (SIGTERM) once the reads are done: no journal to replay. */
  startSecondsAgain: number;
  /** The node's debug lines about each of those starts (the pool open's phases, records replayed, its own parts). */
  startPhases?: string[];
  startPhasesAgain?: string[];
  rssBytesAfterStart: number;
  /** Checkpoint and journal files in the pool, bytes allocated, after the checkpoint asked for below. */
  metadataBytes: number;
  /** The checkpoint asked for after the restart (POST /v1/checkpoint): one copy's size, time, synchronous part. */
  checkpointBytes: number;
  checkpointSeconds: number;
  checkpointEncodeSeconds: number;
  /** The event loop's longest pause from the restart through that checkpoint (the node idle otherwise). */
  eventLoopDelayMaxCheckpointSeconds: number;
  /** 4 KiB random read IOPS, QD32, over the whole volume: right after the restart, then again. */
  coldReadIops: number;
  warmReadIops: number;
  /** The node's CPU (user + system, every thread) from its spawn to its ready line after the kill -9, s; absent in runs before it was kept. */
  startCpuSeconds?: number | null;
  /** The node's CPU (user + system, every thread) per read of each sample, µs; absent in runs before it was kept. */
  coldReadCpuMicros?: number | null;
  warmReadCpuMicros?: number | null;
  rssBytesAfterReads: number;
  /** The snapshots taken during this step's writes: how long each took to answer (median, largest). */
  snapshotSeconds?: { count: number; median: number; max: number } | null;
  /** After the reads, with two snapshots or more: `snapshot diff` of the last two, its time and what it found. */
  diff?: { seconds: number; changedBytes: number; extents: number } | null;
  /** After the diff, with snapshots: `snapshot list` (GET /v1/volumes/VOL/snapshots, each snapshot's bytes held alone counted). */
  snapshotListSeconds?: number | null;
  /** Right after it, nothing written between: the same list again, the counts remembered (held-alone.ts). */
  snapshotListAgainSeconds?: number | null;
}

/**
 * A process's resident memory by kind of mapping (/proc/PID/smaps), bytes: the main malloc arena (`[heap]`), the
 * other malloc arenas (glibc's 64 MiB-aligned reservations, one per thread that allocated while the others were
 * busy), file-backed mappings (the binary, libraries), and the rest of the anonymous memory (V8's pages, thread
 * stacks, malloc's mmapped blocks of 128 KiB and more); with VmHWM (the peak RSS since the start).
 */
export interface MemoryParts {
  peakBytes: number;
  mallocMainBytes: number;
  mallocArenaBytes: number;
  mallocArenas: number;
  fileBytes: number;
  otherAnonBytes: number;
}

/** Where `count` snapshots go among `totalBytes` written: after every `totalBytes / count`, on 4 KiB boundaries. */
export function snapshotPoints(totalBytes: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => Math.round(((i + 1) * totalBytes) / count / 4096) * 4096);
}

/** The figures projected; each is a function of bytes written. */
export const projectedFigures = ['rssBytesAfterReads', 'metadataBytes', 'startSeconds', 'checkpointEncodeSeconds', 'eventLoopDelayMaxCheckpointSeconds'] as const;
export type ProjectedFigure = (typeof projectedFigures)[number];

export interface Projection {
  figure: ProjectedFigure;
  /** Per GiB written, between the last two steps: the marginal cost at the largest size measured. */
  perGiB: number;
  /** Per GiB written, from the baseline (nothing written) to the last step: the average cost. */
  perGiBAverage: number;
  /**
   * At 1, 4 and 16 TiB written: `value` extends the last step by the marginal slope; `valueAverage` by the average
   * slope. The first is the lower estimate where the last steps only filled in map pages that already existed
   * (a volume small beside the data); the second holds where more data also means as many more pages (the data
   * spread as thinly over volumes as large in proportion). A slope below zero (a figure that fell between the steps:
   * start time and pauses within their noise) is not extended downwards: the projection holds the last step's value.
   */
  at: Array<{ writtenBytes: number; value: number; valueAverage: number }>;
}

export const projectionSizes = [TiB, 4 * TiB, 16 * TiB];

/** Projects each figure from the last step (see Projection); none without a baseline and two steps that wrote. */
export function project(steps: readonly ScaleStep[], sizes: readonly number[] = projectionSizes): Projection[] {
  const baseline = steps.find((step) => step.writtenBytes === 0);
  const wrote = steps.filter((step) => step.writtenBytes > 0);
  if (baseline === undefined || wrote.length < 2) return [];
  const [previous, last] = [wrote[wrote.length - 2]!, wrote[wrote.length - 1]!];
  const spanGiB = (last.writtenBytes - previous.writtenBytes) / GiB;
  if (spanGiB <= 0) throw new Error('steps must write more each time');
  return projectedFigures.map((figure) => {
    const perGiB = (last[figure] - previous[figure]) / spanGiB;
    const perGiBAverage = (last[figure] - baseline[figure]) / (last.writtenBytes / GiB);
    const extend = (slope: number, writtenBytes: number): number => last[figure] + Math.max(0, slope) * ((writtenBytes - last.writtenBytes) / GiB);
    return { figure, perGiB, perGiBAverage, at: sizes.map((writtenBytes) => ({ writtenBytes, value: extend(perGiB, writtenBytes), valueAverage: extend(perGiBAverage, writtenBytes) })) };
  });
}

const mib = (bytes: number): string => (bytes / 2 ** 20).toFixed(bytes < 10 * 2 ** 20 ? 1 : 0);
const ms = (seconds: number): string => (seconds * 1000).toFixed(0);
const round = (value: number): string => Math.round(value).toString();
const micros = (cold: number | null | undefined, warm: number | null | undefined): string =>
  cold == null || warm == null ? '' : `${cold.toFixed(0)} / ${warm.toFixed(0)}`;

const pauseText = (p: NonNullable<ScaleStep['longestPauseWriting']>): string =>
  `${ms(p.gapSeconds)}: ${ms(p.onCpuSeconds)} / ${p.runQueueSeconds === null ? '?' : ms(p.runQueueSeconds)} / ${ms(p.elsewhereSeconds)}${p.gcSeconds === undefined ? '' : ` (${ms(p.gcSeconds)})`}`;

const memoryPartsText = (parts: MemoryParts | null | undefined): string =>
  parts == null ? '' : `${mib(parts.mallocMainBytes)} / ${mib(parts.mallocArenaBytes)} (${parts.mallocArenas}) / ${mib(parts.otherAnonBytes)} / ${mib(parts.fileBytes)}`;

export function formatStepsTable(steps: readonly ScaleStep[]): string {
  return markdownTable(
    ['written', 'snapshots', 'write IOPS', 'node CPU per write µs', 'RSS before restart MiB (peak)', 'RSS before restart MiB: [heap] / arenas (count) / other anon / file', 'start after kill -9 s (after a stop)', 'RSS after start MiB', 'metadata on disk MiB', 'checkpoint MiB', 'checkpoint s', 'checkpoint encode ms', 'longest pause, checkpoint ms', 'longest pause, writing ms', 'longest gap writing ms: on CPU / waiting for a CPU / elsewhere (in collections)', 'gaps over 50 ms writing', 'machine CPU writing: stolen / idle %', 'small writes inline / on the thread (longest inline ms)', 'read IOPS cold', 'read IOPS warm', 'node CPU per read µs cold / warm', 'RSS after reads MiB', 'snapshots taken: ms median (max)', 'diff of the last two s (changed)', 'snapshot list s (again)'],
    steps.map((s) => [
      formatSize(s.writtenBytes), String(s.snapshots), s.writeIops === null ? '' : round(s.writeIops), s.writeCpuMicros == null ? '' : s.writeCpuMicros.toFixed(1),
      `${mib(s.rssBytesBeforeRestart)}${s.memoryBeforeRestart == null ? '' : ` (${mib(s.memoryBeforeRestart.peakBytes)})`}`, memoryPartsText(s.memoryBeforeRestart), `${s.startSeconds.toFixed(2)} (${s.startSecondsAgain.toFixed(2)})`, mib(s.rssBytesAfterStart),
      mib(s.metadataBytes), mib(s.checkpointBytes), s.checkpointSeconds.toFixed(2), ms(s.checkpointEncodeSeconds), ms(s.eventLoopDelayMaxCheckpointSeconds),
      s.writtenBytes === 0 ? '' : `${ms(s.eventLoopDelayMaxWritingSeconds)}${s.checkpointsWhileWriting > 0 ? ` (${s.checkpointsWhileWriting} checkpoint${s.checkpointsWhileWriting > 1 ? 's' : ''})` : ''}`,
      s.longestPauseWriting == null || s.writtenBytes === 0 ? '' : pauseText(s.longestPauseWriting),
      s.longGapsWriting == null || s.writtenBytes === 0 ? '' : String(s.longGapsWriting.length),
      s.machineWriting == null ? '' : `${s.machineWriting.stealPercent.toFixed(1)} / ${s.machineWriting.idlePercent.toFixed(1)}`,
      s.smallWritesWriting == null || s.writtenBytes === 0 ? '' : `${s.smallWritesWriting.inline} / ${s.smallWritesWriting.thread} (${ms(s.smallWritesWriting.longestInlineSeconds)})`,
      round(s.coldReadIops), round(s.warmReadIops), micros(s.coldReadCpuMicros, s.warmReadCpuMicros), mib(s.rssBytesAfterReads),
      s.snapshotSeconds == null ? '' : `${s.snapshotSeconds.count}: ${ms(s.snapshotSeconds.median)} (${ms(s.snapshotSeconds.max)})`,
      s.diff == null ? '' : `${s.diff.seconds.toFixed(2)} (${mib(s.diff.changedBytes)} MiB)`,
      s.snapshotListSeconds == null ? '' : `${s.snapshotListSeconds.toFixed(2)}${s.snapshotListAgainSeconds == null ? '' : ` (${s.snapshotListAgainSeconds.toFixed(3)})`}`,
    ]),
  );
}

const figureTitles: Record<ProjectedFigure, { title: string; format: (value: number) => string }> = {
  rssBytesAfterReads: { title: 'node RSS', format: (v) => `${(v / GiB).toFixed(1)} GiB` },
  metadataBytes: { title: 'metadata on disk', format: (v) => `${(v / GiB).toFixed(1)} GiB` },
  startSeconds: { title: 'start time', format: (v) => (v < 600 ? `${v.toFixed(0)} s` : `${(v / 60).toFixed(0)} min`) },
  checkpointEncodeSeconds: { title: 'checkpoint encode (event loop held)', format: (v) => (v < 600 ? `${v.toFixed(1)} s` : `${(v / 60).toFixed(0)} min`) },
  eventLoopDelayMaxCheckpointSeconds: { title: 'longest event-loop pause at a checkpoint', format: (v) => (v < 600 ? `${v.toFixed(1)} s` : `${(v / 60).toFixed(0)} min`) },
};

export function formatProjectionTable(projections: readonly Projection[]): string {
  if (projections.length === 0) return '';
  const perGiB = (figure: ProjectedFigure, value: number): string =>
    figure === 'rssBytesAfterReads' || figure === 'metadataBytes' ? `${mib(value)} MiB` : `${ms(value)} ms`;
  return markdownTable(
    ['projected: slope of the last two steps – average slope from nothing', 'per GiB written', ...projections[0]!.at.map((point) => `${formatSize(point.writtenBytes)} written`)],
    projections.map((p) => [
      figureTitles[p.figure].title,
      `${perGiB(p.figure, p.perGiB)} – ${perGiB(p.figure, p.perGiBAverage)}`,
      ...p.at.map((point) => `${figureTitles[p.figure].format(point.value)} – ${figureTitles[p.figure].format(point.valueAverage)}`),
    ]),
  );
}
