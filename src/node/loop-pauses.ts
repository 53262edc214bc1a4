// The event loop's longest pause, and what the main thread did through it: ran (its own CPU), waited for a CPU
// (the scheduler's run queue: other threads and processes had the cores), or neither (blocked in a system call, on
// a lock, in a page fault, or idle until the timer was due). monitorEventLoopDelay says how long a pause was, not
// why; on a machine whose cores the clients share (fio beside the node on 2 vCPUs) a 100 ms pause may be 20 ms of
// the node's work and 80 ms of waiting for a core, and only the split says which (issue 15's pause goal,
// BENCHMARKS.md "Where a pause goes").
//
// A timer every `intervalMs` notes the monotonic clock and the main thread's times from Linux's
// /proc/thread-self/schedstat (nanoseconds on a CPU, nanoseconds waiting on a run queue); the longest gap between
// two ticks is kept with the split of that gap. Without schedstat (another kernel) the CPU comes from
// process.threadCpuUsage() and the run queue is unknown (null).
import fs from 'node:fs';

/** The main thread's cumulative times, nanoseconds. */
export interface ThreadTimes {
  cpuNs: number;
  /** null where the kernel does not say. */
  runQueueNs: number | null;
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
  /** When the gap ended (ms since the epoch). */
  endedAtMs: number;
}

/** Parses /proc/.../schedstat: "<ns on cpu> <ns waiting on a run queue> <timeslices>". */
export function parseSchedstat(text: string): ThreadTimes | null {
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
      return parseSchedstat(buffer.toString('latin1', 0, bytes));
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
  return { cpuNs: (usage.user + usage.system) * 1000, runQueueNs: null };
}

/** The longest gap between two ticks of a timer on this thread, since start(), with its split. */
export class LoopPauses {
  readonly #intervalNs: number;
  readonly #clock: () => ThreadClock;
  #timer: NodeJS.Timeout | null = null;
  #threadClock: ThreadClock | null = null;
  #last: { atNs: bigint; times: ThreadTimes } | null = null;
  #longest: LoopPause | null = null;

  constructor(options: { intervalMs?: number; clock?: () => ThreadClock } = {}) {
    this.#intervalNs = (options.intervalMs ?? 10) * 1e6;
    this.#clock = options.clock ?? openThreadClock;
  }

  start(): void {
    if (this.#timer !== null) return;
    this.#threadClock = this.#clock();
    this.#last = { atNs: process.hrtime.bigint(), times: this.#threadClock.read() };
    this.#timer = setInterval(() => this.#tick(), this.#intervalNs / 1e6);
    this.#timer.unref();
  }

  stop(): void {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
    this.#threadClock?.close();
    this.#threadClock = null;
    this.#last = null;
  }

  /** The longest gap so far (null before two ticks). */
  longest(): LoopPause | null {
    return this.#longest;
  }

  #tick(): void {
    const atNs = process.hrtime.bigint();
    const times = this.#threadClock!.read();
    const last = this.#last!;
    const gapNs = Number(atNs - last.atNs);
    if (this.#longest === null || gapNs / 1e9 > this.#longest.gapSeconds) this.#longest = splitGap(gapNs, this.#intervalNs, last.times, times, Date.now());
    this.#last = { atNs, times };
  }
}
