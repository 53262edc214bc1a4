// A node's freed malloc memory given back to the system after V8's full collections (issue 15, "RSS under the
// cache size plus a fixed base"; BENCHMARKS.md, "malloc_trim after a full collection").
//
// Why: the Buffers' bytes (a checkpoint's page bodies, the pages copied on their first change, the journal's
// frames) live in glibc's main malloc arena and are freed only when a full collection of V8 frees their Buffer
// objects. glibc gives back only the top of the arena, so the arena stays as large as its peak, nearly all of it
// free but resident (120 to 132 MiB free of 122 at 8 GiB written: "Page bodies in a pool"), and that peak grows
// with the data. malloc_trim(0) hands every free page inside the arenas back (madvise), so the arena's RSS falls
// to what is in use after each full collection.
//
// How: a PerformanceObserver sees each full (major) collection; `delayMs` later (V8 frees the dead buffers'
// memory on a background thread after the collection's pause) malloc_trim(0) runs on koffi's worker thread
// (`.async`), not on the event loop: the trim of an arena holds that arena's lock, which a malloc of the main
// thread may wait for, but the walk of the others and the system calls' wait are not the event loop's. At most one
// trim at a time, and none within `minIntervalMs` of the last one's start. glibc only: where libc.so.6 or its
// malloc_trim is missing (musl, another system) the first attempt fails and trimming stays off; a failed trim is
// counted and changes nothing else.
import { constants, PerformanceObserver, type PerformanceEntry } from 'node:perf_hooks';
import fs from 'node:fs';
import type { Log } from './log.ts';
import { libcFunction } from './libc.ts';

/** Runs malloc_trim(0) somewhere (its callback: an error, or whether memory was released). */
export type TrimCall = (done: (error: unknown, released: boolean) => void) => void;

const mallocTrim = libcFunction('int malloc_trim(size_t pad)');

/** malloc_trim(0) on koffi's worker thread; throws at once where libc or the function cannot be loaded. */
export function libcTrim(): TrimCall {
  const trim = mallocTrim();
  return (done) => {
    trim.async(0, (error: unknown, result: number) => done(error ?? null, result === 1));
  };
}

export interface TrimmerOptions {
  /** The trim itself (tests give their own); default libcTrim(), loaded at the first trim. */
  trim?: () => TrimCall;
  /** After a full collection, how long to wait before trimming, ms. */
  delayMs?: number;
  /** The least time between two trims' starts, ms. */
  minIntervalMs?: number;
  log?: Log;
  /** The process's resident bytes (default /proc/self/statm), for the log line; null where unknown. */
  residentBytes?: () => number | null;
}

export interface TrimStats {
  trims: number;
  failures: number;
  /** Wall time of the trims (on the worker thread), seconds. */
  secondsTotal: number;
  secondsMax: number;
  /** RSS before minus after, summed (what other threads did meanwhile included), bytes. */
  releasedBytes: number;
}

const pageBytes = 4096;

function statmResidentBytes(): number | null {
  try {
    return Number(fs.readFileSync('/proc/self/statm', 'latin1').split(' ')[1]) * pageBytes;
  } catch {
    return null;
  }
}

export class MallocTrimmer {
  readonly #trim: () => TrimCall;
  readonly #delayMs: number;
  readonly #minIntervalMs: number;
  readonly #log: Log | undefined;
  readonly #residentBytes: () => number | null;
  #call: TrimCall | null = null;
  /** Off for good: libc could not be loaded, or the trimmer was stopped. */
  #off = false;
  #inFlight = false;
  #timer: NodeJS.Timeout | null = null;
  #lastStartMs = -Infinity;
  #observer: PerformanceObserver | null = null;
  readonly stats: TrimStats = { trims: 0, failures: 0, secondsTotal: 0, secondsMax: 0, releasedBytes: 0 };

  constructor(options: TrimmerOptions = {}) {
    this.#trim = options.trim ?? libcTrim;
    this.#delayMs = options.delayMs ?? 200;
    this.#minIntervalMs = options.minIntervalMs ?? 1000;
    this.#log = options.log;
    this.#residentBytes = options.residentBytes ?? statmResidentBytes;
  }

  /** Watches V8's full collections and trims after them. */
  start(): void {
    if (this.#observer !== null || this.#off) return;
    this.#observer = new PerformanceObserver((list) => {
      if (list.getEntries().some(isMajorCollection)) this.afterMajorCollection();
    });
    this.#observer.observe({ entryTypes: ['gc'] });
  }

  stop(): void {
    this.#off = true;
    this.#observer?.disconnect();
    this.#observer = null;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
  }

  /** A full collection ended: a trim `delayMs` from now, unless one is due, running or too recent. */
  afterMajorCollection(): void {
    if (this.#off || this.#timer !== null || this.#inFlight) return;
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.trimNow();
    }, this.#delayMs);
    this.#timer.unref();
  }

  /** One trim now, unless off, running or within `minIntervalMs` of the last. */
  trimNow(): void {
    if (this.#off || this.#inFlight) return;
    const startMs = performance.now();
    if (startMs - this.#lastStartMs < this.#minIntervalMs) return;
    if (this.#call === null) {
      try {
        this.#call = this.#trim();
      } catch (error) {
        this.#off = true;
        this.#log?.(`malloc_trim is not available, freed memory stays with malloc: ${(error as Error).message}`, 'debug');
        return;
      }
    }
    this.#lastStartMs = startMs;
    this.#inFlight = true;
    const before = this.#residentBytes();
    try {
      this.#call((error, released) => this.#done(startMs, before, error, released));
    } catch (error) {
      this.#done(startMs, before, error, false);
    }
  }

  #done(startMs: number, before: number | null, error: unknown, released: boolean): void {
    this.#inFlight = false;
    const seconds = (performance.now() - startMs) / 1000;
    if (error !== null && error !== undefined) {
      this.stats.failures += 1;
      this.#log?.(`malloc_trim failed: ${(error as Error).message ?? String(error)}`, 'debug');
      return;
    }
    const after = this.#residentBytes();
    const releasedBytes = before !== null && after !== null ? Math.max(0, before - after) : 0;
    this.stats.trims += 1;
    this.stats.secondsTotal += seconds;
    this.stats.secondsMax = Math.max(this.stats.secondsMax, seconds);
    this.stats.releasedBytes += releasedBytes;
    this.#log?.(`malloc_trim: ${(seconds * 1000).toFixed(1)} ms, RSS ${(releasedBytes / 2 ** 20).toFixed(1)} MiB lower${released ? '' : ' (nothing released)'}`, 'debug');
  }
}

function isMajorCollection(entry: PerformanceEntry): boolean {
  return ((entry as PerformanceEntry & { detail?: { kind?: number } }).detail)?.kind === constants.NODE_PERFORMANCE_GC_MAJOR;
}
