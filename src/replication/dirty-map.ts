// The owner's record of where a synchronous replica may differ from it, in regions of limits.syncRegionBytes:
// pure sets and counters (sync-replicas.ts persists them and says when). Two kinds:
//
//   dirty map (per replica)   regions written while the replica was not in sync; cleared only when a resync has
//                             copied them and the replica has flushed them
//   activity log (per volume) extents (larger regions) with writes in flight or written since the last flushes (DRBD's activity
//                             log): after an owner crash these are the regions where an in-sync replica may hold
//                             other bytes than the owner (a write applied on one side, not yet on the other)
//
// A region leaves the activity log once a flush that started after its last write finished has completed on the
// owner and every in-sync replica, and it has been cold for one more flush (so that a region written between every
// flush is not added and removed, with a state-file write each time, over and over).
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';

/** The regions [first, end) that the bytes [offsetBytes, offsetBytes + lengthBytes) touch. */
export function regionsOf(offsetBytes: number, lengthBytes: number, regionBytes: number): [first: number, end: number] {
  assert(lengthBytes > 0 && offsetBytes >= 0 && regionBytes > 0);
  return [Math.floor(offsetBytes / regionBytes), Math.ceil((offsetBytes + lengthBytes) / regionBytes)];
}

/** A set of region indexes, stored as runs [start, count] in ascending order. */
export class RegionSet {
  readonly #regions = new Set<number>();

  /** Adds [first, end); true when one of them was not there. */
  addRange(first: number, end: number): boolean {
    let added = false;
    for (let region = first; region < end; region++) {
      if (this.#regions.has(region)) continue;
      this.#regions.add(region);
      added = true;
    }
    return added;
  }

  /** Adds every region of `other`; true when one of them was not there. */
  addAll(other: RegionSet): boolean {
    let added = false;
    for (const region of other.#regions) {
      if (this.#regions.has(region)) continue;
      this.#regions.add(region);
      added = true;
    }
    return added;
  }

  has(region: number): boolean {
    return this.#regions.has(region);
  }

  delete(region: number): boolean {
    return this.#regions.delete(region);
  }

  clear(): void {
    this.#regions.clear();
  }

  get size(): number {
    return this.#regions.size;
  }

  /** Drops the regions from `limit` on (a volume shrank); true when one was there. */
  truncate(limit: number): boolean {
    let removed = false;
    for (const region of this.#regions) {
      if (region >= limit) removed = this.#regions.delete(region) || removed;
    }
    return removed;
  }

  /** Each region r of this set as the regions [r * factor, (r + 1) * factor) of a finer set, below `limit`. */
  scaled(factor: number, limit: number): RegionSet {
    assert(Number.isSafeInteger(factor) && factor >= 1);
    const finer = new RegionSet();
    for (const region of this.#regions) finer.addRange(region * factor, Math.min((region + 1) * factor, limit));
    return finer;
  }

  /** The regions in ascending order. */
  sorted(): number[] {
    return [...this.#regions].sort((a, b) => a - b);
  }

  /** As runs [start, count], ascending: what the state file holds. */
  toRuns(): Array<[number, number]> {
    const runs: Array<[number, number]> = [];
    for (const region of this.sorted()) {
      const last = runs[runs.length - 1];
      if (last !== undefined && last[0] + last[1] === region) last[1] += 1;
      else runs.push([region, 1]);
    }
    return runs;
  }

  /**
   * Reads runs back, each checked to lie inside [0, regionCount); throws ECORRUPT naming `what` otherwise. With
   * `clipAt`, regions from there on are dropped once read (a volume that shrank after the runs were written).
   */
  static fromRuns(runs: unknown, regionCount: number, what: string, clipAt = regionCount): RegionSet {
    const set = new RegionSet();
    if (!Array.isArray(runs)) throw ChunkdError.corrupt(`${what}: regions are not a list of runs`);
    for (const run of runs) {
      const [start, count] = Array.isArray(run) ? run : [];
      if (!Number.isSafeInteger(start) || !Number.isSafeInteger(count) || start < 0 || count < 1 || start + count > regionCount) {
        throw ChunkdError.corrupt(`${what}: ${JSON.stringify(run)} is not a run of regions inside the volume`);
      }
      set.addRange(start, Math.min(start + count, clipAt));
    }
    return set;
  }
}

/** The activity log of one volume: regions that may differ between the owner and an in-sync replica after a crash. */
export class ActivityLog {
  /** What the state file must hold before a write to these regions is applied anywhere. */
  readonly active = new RegionSet();
  /** Writes in flight per region. */
  readonly #inFlight = new Map<number, number>();
  /** Per region, the flush generation in which its last write finished. */
  readonly #finishedIn = new Map<number, number>();
  /** Flushes started: a write that finishes in generation g is covered by a flush that starts later (g + 1 on). */
  #generation = 0;

  /** Drops the regions from `limit` on (the volume shrank; nothing is in flight there). */
  truncate(limit: number): void {
    this.active.truncate(limit);
    for (const region of this.#finishedIn.keys()) if (region >= limit) this.#finishedIn.delete(region);
  }

  /** A write to [first, end) starts; true when a region was not active (the state file must be written first). */
  begin(first: number, end: number): boolean {
    for (let region = first; region < end; region++) this.#inFlight.set(region, (this.#inFlight.get(region) ?? 0) + 1);
    return this.active.addRange(first, end);
  }

  /** A write to [first, end) has finished (applied or failed) on every side. */
  end(first: number, end: number): void {
    for (let region = first; region < end; region++) {
      const count = this.#inFlight.get(region);
      assert(count !== undefined && count > 0, 'ActivityLog.end without begin');
      if (count === 1) this.#inFlight.delete(region);
      else this.#inFlight.set(region, count - 1);
      this.#finishedIn.set(region, this.#generation);
    }
  }

  /** A flush starts; its generation goes to flushDone once it has completed everywhere. */
  flushStarted(): number {
    this.#generation += 1;
    return this.#generation;
  }

  /**
   * The flush started as `generation` is durable on the owner and every in-sync replica: regions with nothing in
   * flight whose last write finished two generations before it (covered by it, and cold since the flush before)
   * leave the log. Returns how many left.
   */
  flushDone(generation: number): number {
    let removed = 0;
    for (const region of this.active.sorted()) {
      if (this.#inFlight.has(region)) continue;
      const finished = this.#finishedIn.get(region);
      if (finished !== undefined && finished > generation - 2) continue;
      this.active.delete(region);
      this.#finishedIn.delete(region);
      removed += 1;
    }
    return removed;
  }
}
