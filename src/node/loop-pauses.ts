// The event loop's longest pause, and what the main thread did through it: ran (its own CPU), waited for a CPU
// (the scheduler's run queue: other threads and processes had the cores), or neither (blocked in a system call, on
// a lock, in a page fault, or idle until the timer was due). monitorEventLoopDelay says how long a pause was, not
// why; on a machine whose cores the clients share (fio beside the node on 2 vCPUs) a 100 ms pause may be 20 ms of
// the node's work and 80 ms of waiting for a core, and only the split says which (issue 15's pause goal,
// BENCHMARKS.md "Where a pause goes").
//
// A timer every `intervalMs` notes the monotonic clock and the main thread's times from Linux's
// /proc/thread-self/schedstat (nanoseconds on a CPU, nanoseconds waiting on a run queue); the longest gap between
// two ticks is kept with the split of that gap, and with the time V8's collections paused the thread within it
// (PerformanceObserver's 'gc' entries): a collection's pause is CPU, or waiting for its helper threads (elsewhere:
// a futex) when those wait for a CPU. Beside the split, the CPU the process's other threads took within the gap
// (the process's CPU from getrusage less the main thread's): a main thread waiting for a CPU while they took one or
// both is waiting for the node's own work (chunk I/O, libuv's pool, V8's helpers), else for other processes.
// Without schedstat (another kernel) the CPU comes from process.threadCpuUsage() and the run queue is unknown
// (null).
import fs from 'node:fs';
import { constants, performance, PerformanceObserver } from 'node:perf_hooks';

/** The main thread's cumulative times, nanoseconds. */
export interface ThreadTimes {
  cpuNs: number;
  /** null where the kernel does not say. */
  runQueueNs: number | null;
  /** The whole process's CPU, every thread (getrusage). */
  processCpuNs: number;
}

/** One gap between two ticks of the timer, split. */
export interface LoopPause {
  /** How late the second tick ran: the gap less the interval (what monitorEventLoopDelay calls the delay). */
  delaySeconds: number;
  /** The whole gap between the two ticks. */
  gapSeconds: number;
  /** The main thread's CPU through the gap. */
  onCpuSeconds: number;
  /** Its wait for a CPU through the gap; null where unknown. */
  runQueueSeconds: number | null;
  /** The rest of the gap: blocked or idle (includes up to one interval of waiting for the timer). */
  elsewhereSeconds: number;
  /**
   * V8's collections within the gap (the main thread's pauses for them, from PerformanceObserver's 'gc' entries):
   * part of the CPU, and of the rest where the main thread waited for the collector's helper threads.
   */
  gcSeconds: number;
  /**
   * Of gcSeconds, the full collections' (mark-compact of the whole heap, V8's major GC): the rest were scavenges of
   * the young generation and V8's smaller steps. Which of the two holds a pause says which knob could shorten it.
   */
  majorGcSeconds: number;
  /**
   * The CPU the process's other threads took within the gap (not a part of it: up to the CPUs' count times the
   * gap), on whatever cores they ran.
   */
  otherThreadsCpuSeconds: number;
  /** When the gap ended (ms since the epoch). */
  endedAtMs: number;
}

/**
 * "102 ms (18 on CPU, 80 waiting for a CPU, 4 elsewhere; 12 in collections; other threads 70 ms of CPU)", as the
 * log and chunkd status say it.
 */
export function describeLoopPause(pause: Pick<LoopPause, 'gapSeconds' | 'onCpuSeconds' | 'runQueueSeconds' | 'elsewhereSeconds'> & { gcSeconds?: number; majorGcSeconds?: number; otherThreadsCpuSeconds?: number }): string {
  const ms = (seconds: number): string => (seconds * 1000).toFixed(0);
  const queue = pause.runQueueSeconds === null ? '' : `${ms(pause.runQueueSeconds)} waiting for a CPU, `;
  const full = pause.majorGcSeconds === undefined || pause.majorGcSeconds === 0 ? '' : ` (${ms(pause.majorGcSeconds)} full)`;
  const gc = pause.gcSeconds === undefined ? '' : `; ${ms(pause.gcSeconds)} in collections${full}`;
  const others = pause.otherThreadsCpuSeconds === undefined ? '' : `; other threads ${ms(pause.otherThreadsCpuSeconds)} ms of CPU`;
  return `${ms(pause.gapSeconds)} ms (${ms(pause.onCpuSeconds)} on CPU, ${queue}${ms(pause.elsewhereSeconds)} elsewhere${gc}${others})`;
}

/** Parses /proc/.../schedstat: "<ns on cpu> <ns waiting on a run queue> <timeslices>". */
export function parseSchedstat(text: string): Omit<ThreadTimes, 'processCpuNs'> | null {
  const match = /^(\d+) (\d+) \d+/.exec(text);
  return match === null ? null : { cpuNs: Number(match[1]), runQueueNs: Number(match[2]) };
}

/** The split of one gap of `gapNs` between two readings of the thread's times. */
export function splitGap(gapNs: number, intervalNs: number, before: ThreadTimes, after: ThreadTimes, endedAtMs: number): LoopPause {
  const onCpuNs = Math.max(0, after.cpuNs - before.cpuNs);
  const runQueueNs = after.runQueueNs === null || before.runQueueNs === null ? null : Math.max(0, after.runQueueNs - before.runQueueNs);
  return {
    delaySeconds: Math.max(0, gapNs - intervalNs) / 1e9,
    gapSeconds: gapNs / 1e9,
    onCpuSeconds: onCpuNs / 1e9,
    runQueueSeconds: runQueueNs === null ? null : runQueueNs / 1e9,
    elsewhereSeconds: Math.max(0, gapNs - onCpuNs - (runQueueNs ?? 0)) / 1e9,
    gcSeconds: 0,
    majorGcSeconds: 0,
    otherThreadsCpuSeconds: Math.max(0, after.processCpuNs - before.processCpuNs - onCpuNs) / 1e9,
    endedAtMs,
  };
}

/** Reads the calling thread's times; opened on the thread that will read them (the fd stays on that thread). */
export interface ThreadClock {
  read(): ThreadTimes;
  close(): void;
}

export function openThreadClock(): ThreadClock {
  let fd: number | null = null;
  try {
    fd = fs.openSync('/proc/thread-self/schedstat', 'r');
    const buffer = Buffer.alloc(96);
    const readSchedstat = (): ThreadTimes | null => {
      const bytes = fs.readSync(fd!, buffer, 0, buffer.length, 0);
      const times = parseSchedstat(buffer.toString('latin1', 0, bytes));
      return times === null ? null : { ...times, processCpuNs: processCpuNs() };
    };
    if (readSchedstat() !== null) {
      return {
        read: () => readSchedstat() ?? cpuOnly(),
        close: () => fs.closeSync(fd!),
      };
    }
    fs.closeSync(fd);
  } catch {
    if (fd !== null) fs.closeSync(fd);
  }
  return { read: cpuOnly, close: () => {} };
}

function cpuOnly(): ThreadTimes {
  const usage = process.threadCpuUsage();
  return { cpuNs: (usage.user + usage.system) * 1000, runQueueNs: null, processCpuNs: processCpuNs() };
}

function processCpuNs(): number {
  const usage = process.cpuUsage();
  return (usage.user + usage.system) * 1000;
}

/** A span of performance.now() (ms). */
interface Span {
  startMs: number;
  endMs: number;
}

/** A collection's pause: its span, and whether it was a full one. */
interface Collection extends Span {
  major: boolean;
}

/** The collections' time within `span`, all and the full ones' (seconds). */
function collectionsWithin(span: Span, collections: Iterable<Collection>): { gcSeconds: number; majorGcSeconds: number } {
  let gcMs = 0;
  let majorMs = 0;
  for (const collection of collections) {
    const overlap = overlapMs(span, collection);
    gcMs += overlap;
    if (collection.major) majorMs += overlap;
  }
  return { gcSeconds: gcMs / 1000, majorGcSeconds: majorMs / 1000 };
}

/** How much of `b` lies within `a`, ms. */
export function overlapMs(a: Span, b: Span): number {
  return Math.max(0, Math.min(a.endMs, b.endMs) - Math.max(a.startMs, b.startMs));
}

/** How long after a long gap it is told (onLongGap), ms. */
const longGapToldAfterMs = 100;

/** Collections kept to match against a gap whose tick ran before their entries arrived. */
const recentCollectionsKept = 32;

/**
 * The longest gap between two ticks of a timer on this thread, since start(), with its split; `onLongGap` hears
 * of every gap over `longGapMs` (the node logs them at debug level), 100 ms after it, with the collections in it.
 */
export class LoopPauses {
  readonly #intervalNs: number;
  readonly #clock: () => ThreadClock;
  readonly #longGapMs: number;
  readonly #onLongGap: ((pause: LoopPause) => void) | null;
  #timer: NodeJS.Timeout | null = null;
  #threadClock: ThreadClock | null = null;
  #observer: PerformanceObserver | null = null;
  #last: { atNs: bigint; atMs: number; times: ThreadTimes } | null = null;
  #longest: { pause: LoopPause; span: Span; collections: Set<Collection> } | null = null;
  readonly #recentCollections: Collection[] = [];

  constructor(options: { intervalMs?: number; clock?: () => ThreadClock; longGapMs?: number; onLongGap?: (pause: LoopPause) => void } = {}) {
    this.#intervalNs = (options.intervalMs ?? 10) * 1e6;
    this.#clock = options.clock ?? openThreadClock;
    this.#longGapMs = options.longGapMs ?? 50;
    this.#onLongGap = options.onLongGap ?? null;
  }

  start(): void {
    if (this.#timer !== null) return;
    this.#threadClock = this.#clock();
    this.#last = { atNs: process.hrtime.bigint(), atMs: performance.now(), times: this.#threadClock.read() };
    this.#timer = setInterval(() => this.#tick(), this.#intervalNs / 1e6);
    this.#timer.unref();
    this.#observer = new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) {
        const major = ((entry as { detail?: unknown }).detail as { kind?: number } | undefined)?.kind === constants.NODE_PERFORMANCE_GC_MAJOR;
        this.#collected({ startMs: entry.startTime, endMs: entry.startTime + entry.duration, major });
      }
    });
    this.#observer.observe({ entryTypes: ['gc'] });
  }

  stop(): void {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
    this.#observer?.disconnect();
    this.#observer = null;
    this.#threadClock?.close();
    this.#threadClock = null;
    this.#last = null;
  }

  /** The longest gap so far (null before two ticks), with the collections within it. */
  longest(): LoopPause | null {
    const longest = this.#longest;
    if (longest === null) return null;
    return { ...longest.pause, ...collectionsWithin(longest.span, longest.collections) };
  }

  #tick(): void {
    const atNs = process.hrtime.bigint();
    const atMs = performance.now();
    const times = this.#threadClock!.read();
    const last = this.#last!;
    const gapNs = Number(atNs - last.atNs);
    const long = gapNs / 1e6 > this.#longGapMs;
    if (long || this.#longest === null || gapNs / 1e9 > this.#longest.pause.gapSeconds) {
      const pause = splitGap(gapNs, this.#intervalNs, last.times, times, Date.now());
      const span = { startMs: last.atMs, endMs: atMs };
      if (this.#longest === null || pause.gapSeconds > this.#longest.pause.gapSeconds) {
        this.#longest = { pause, span, collections: new Set(this.#recentCollections.filter((collection) => overlapMs(span, collection) > 0)) };
      }
      // Told a little later, when the collections' entries (which come after the gap) are in.
      if (long && this.#onLongGap !== null) {
        const onLongGap = this.#onLongGap;
        setTimeout(() => onLongGap({ ...pause, ...collectionsWithin(span, this.#recentCollections) }), longGapToldAfterMs).unref();
      }
    }
    this.#last = { atNs, atMs, times };
  }

  #collected(collection: Collection): void {
    this.#recentCollections.push(collection);
    if (this.#recentCollections.length > recentCollectionsKept) this.#recentCollections.shift();
    const longest = this.#longest;
    if (longest !== null && overlapMs(longest.span, collection) > 0) longest.collections.add(collection);
  }
}
