// A pool's metadata on pages (pool format 4, `--metadata paged`): the paged catalog (paged-catalog.ts) behind the
// interface the commit engine and the volumes use (catalog-backend.ts), with the journal as its write-ahead log.
//
// Generations. The catalog's durable root names the journal generation it covers: every record of that
// generation and the ones before is in its pages. A FLUSH is still one append of the records to both copies of
// the current generation's journal and one fdatasync each (commit-engine.ts). A checkpoint, begun by the commit
// that takes the records at the moment it takes them (so that it covers exactly what was applied before), goes:
//   1. the root covering generation G is queued in the catalog, after every record applied so far;
//   2. the commit's records are appended to journal G (durable);
//   3. journal G+1 is created (both copies, empty, fdatasynced) and the directory synced;
//   4. the root is written (dirty pages, fdatasync, root slot, fdatasync: page-file.ts);
//   5. the journals older than G+1 are removed.
// The commit waits for all of it, so no commit goes to G+1 before the root covering G is durable. A crash leaves
// a root covering G-1 with journals G (whole) and maybe G+1 (empty), or a root covering G with maybe journal G
// left: an open replays, in order, the journals after the root's generation, which must follow each other.
//
// Open: read the root and the table (no map page: paged-catalog.ts), replay the journals after the root's
// generation into the catalog, each free final at once (the punch of free chunks after the open gives their space
// back: pool.ts, chunk-store.ts's `punchFreeInBackground`), start a fresh generation (its journal created and its
// name durable), and serve; the root covering what was replayed (which drops a torn tail for good, as the
// format-3 open's checkpoint does) is written in the background, then the journals it covers are removed
// (`openPaged` says why a crash before it is safe). The work is bounded by one journal, not by the data held; a
// clean close ends with a checkpoint, so that a clean restart replays nothing (`checkpointAtClose`).
//
// Failures: a failed apply (damage, or a bug) rejects `settled`, which the engine makes its sticky failure, as a
// failed root write is (the catalog is then ahead of its file: writes are refused until a restart).
import path from 'node:path';
import { assert } from '../core/assert.ts';
import type { Log } from '../core/log.ts';
import { ChunkdError, isNoSpace } from '../core/errors.ts';
import { chunkSizeBytes, pagedJournalCheckpointBytes } from '../core/limits.ts';
import { type CatalogBackend, type ChunkLookup, type MapHandle, type PendingCheckpoint, type ScrubPlan, type ScrubTarget } from './catalog-backend.ts';
import type { ChunkRun } from './chunk-map.ts';
import { ChunkSums } from './chunk-sums.ts';
import { ContentDigest } from './content-digest.ts';
import type { FileLayer } from './file-layer.ts';
import { recoverJournal, salvageJournal, type SalvageItem } from './journal-format.ts';
import { JournalFile } from './journal-file.ts';
import type { ChangedExtent } from './map-diff.ts';
import type { MetaRecord } from './metadata.ts';
import { pageBytes } from './page-file.ts';
import { dirtyHoldFactor, PagedCatalog, type PagedCatalogOptions } from './paged-catalog.ts';
import { PagedMap, type PagedRun } from './paged-map.ts';
import type { ChunkSpace } from './space-map.ts';
import { journalGenerations, journalPaths, pagedFormatVersion, readCopies } from './pool-layout.ts';

const resolved = Promise.resolve();

/** A hold of writes (`PagedBackend`'s `#holdWrite`) is logged at most this often. */
const holdLogIntervalMs = 60_000;

export class PagedBackend implements CatalogBackend {
  readonly formatVersion = pagedFormatVersion;
  readonly journalCheckpointBytes = pagedJournalCheckpointBytes;
  /** The replay is most of a paged open (4 to 9 us a record, in batches: `replayBatches`): none after a clean close. */
  readonly checkpointAtClose = true;
  readonly #catalog: PagedCatalog;
  readonly #files: FileLayer;
  readonly #directory: string;
  /** The last apply queued (settles, never rejects), and how many are queued and not yet applied. */
  #last: Promise<void> = resolved;
  #pending = 0;
  #failure: Error | null = null;
  /** The root covering an open's replay, written after the open (`openPaged`); settles, never rejects. */
  readonly #rootAfterOpen: Promise<void>;
  /** The root of the checkpoint under way (settles, never rejects), or null. */
  #checkpointUnderWay: Promise<void> | null = null;
  /**
   * Writes held while a checkpoint was behind (`#holdWrite`): each write that waited, the holds (a run of writes
   * held until one checkpoint was durable) and their time, told in the hold's log line; when the current hold began.
   */
  #held = { writes: 0, holds: 0, seconds: 0 };
  #holdStarted: number | null = null;
  #holdLoggedAt = -Infinity;
  #log: Log | undefined;
  onApplied: ((record: MetaRecord) => void) | null = null;

  constructor(catalog: PagedCatalog, files: FileLayer, directory: string, rootAfterOpen: Promise<unknown> = resolved) {
    this.#catalog = catalog;
    this.#files = files;
    this.#directory = directory;
    // Its failure is the sticky failure (the catalog is then ahead of its file), as a checkpoint's is; but on a full
    // file system it is only not written: the old root stands with every journal after it, and the next
    // checkpoint, whose root covers them all, removes them.
    this.#rootAfterOpen = rootAfterOpen.then(
      () => {},
      (error: unknown) => {
        if (!isNoSpace(error)) this.#failure ??= error as Error;
      },
    );
    catalog.chunks.allocationGate = () => this.#holdWrite();
  }

  setLog(log: Log): void {
    this.#log = log;
  }

  /**
   * The allocation gate of the catalog's chunk space (`ChunkSpace.allocationGate`): while a checkpoint is under way
   * and the map nodes changed since the last one are past `dirtyHoldFactor` times what asks for one, a write waits
   * for that checkpoint's root before it takes its chunks (so before it writes or records anything). Dirty nodes are
   * never evicted: without it, a checkpoint slower than the writes (a loaded machine) let them grow with the writes,
   * past the cache's size many times (BENCHMARKS.md, issue 15: 183 MiB of heap in use with a 16 MiB cache). A
   * write waits for the checkpoint under way only, then goes on: the next checkpoint is begun by the records after.
   */
  #holdWrite(): Promise<void> | null {
    const underWay = this.#checkpointUnderWay;
    if (underWay === null || !this.#catalog.dirtyFarPastLimit) return null;
    this.#held.writes += 1;
    if (this.#holdStarted === null) {
      this.#holdStarted = performance.now();
      this.#held.holds += 1;
      if (this.#holdStarted - this.#holdLoggedAt >= holdLogIntervalMs) {
        this.#holdLoggedAt = this.#holdStarted;
        const { writes, holds, seconds } = this.#held;
        this.#log?.(`writes held until the checkpoint under way is durable: ${this.#catalog.dirtyPages} map nodes changed since the last one, past ${dirtyHoldFactor} times their limit (${holds} holds so far, ${writes} writes, ${seconds.toFixed(1)} s)`, 'warn');
      }
    }
    return underWay;
  }

  /** The map nodes changed since the last checkpoint hold the memory that asks for one (`PagedCatalog.dirtyPastLimit`). */
  get checkpointWanted(): boolean {
    return this.#catalog.dirtyPastLimit;
  }

  get tables(): PagedCatalog['tables'] {
    return this.#catalog.tables;
  }

  get allocator(): ChunkSpace {
    return this.#catalog.chunks;
  }

  /** The catalog itself (for checks and tools). */
  get catalog(): PagedCatalog {
    return this.#catalog;
  }

  apply(record: MetaRecord, punchFrees: boolean): void {
    // Most live writes apply at once, in place (PagedCatalog.applyNow); the rest queue. A failure there is the
    // sticky failure, as a queued apply's is.
    try {
      if (this.#catalog.applyNow(record, punchFrees)) {
        this.onApplied?.(record);
        return;
      }
    } catch (error) {
      this.#failure ??= error as Error;
      return;
    }
    this.#pending += 1;
    this.#last = this.#catalog.apply(record, punchFrees).then(
      () => {
        this.#pending -= 1;
      },
      (error: unknown) => {
        this.#pending -= 1;
        this.#failure ??= error as Error;
      },
    );
    // Told once queued: a count whose walk waits for `settled` after this sees what the record changes.
    this.onApplied?.(record);
  }

  get failure(): Error | null {
    return this.#failure;
  }

  async settled(): Promise<void> {
    await this.#last;
    if (this.#failure !== null) throw this.#failure;
  }

  lookup(map: MapHandle, virtualChunk: number, chunkCount: number): ChunkLookup | Promise<ChunkLookup> {
    const paged = pagedMap(map);
    // Nothing queued: what is in memory is what the writes before this read left.
    if (this.#pending === 0) {
      const runs = paged.runsCached(virtualChunk, chunkCount);
      if (runs !== undefined) return withSums(runs);
    }
    return this.#last.then(() => paged.runs(virtualChunk, chunkCount)).then(withSums);
  }

  /** A walk of the two trees together that skips every page both reach (paged-map.ts): O(pages that differ). */
  diff(from: MapHandle | null, to: MapHandle, chunkLimit: number): Promise<ChangedExtent[]> {
    return pagedMap(to).diff(from === null ? null : pagedMap(from), chunkLimit);
  }

  /**
   * The leaves' runs in order, a slice at a time, each chunk's checksum from its leaf: O(chunks mapped), no data
   * read. A snapshot's map does not change; a live volume's is read slice by slice, so a write meanwhile may or
   * may not be in the digest (as it may or may not be in a read of the volume's bytes).
   */
  async contentDigest(map: MapHandle, sizeBytes: number): Promise<Buffer> {
    const digest = new ContentDigest(sizeBytes);
    for await (const run of mappedRunsOf(pagedMap(map), sizeBytes / chunkSizeBytes)) {
      digest.add(run.virtualChunk, run.chunkCount, (i) => run.sums[i]!);
      const turn = digest.turn();
      if (turn !== null) await turn;
    }
    return digest.digest();
  }

  /** A walk of the map's pages of count 1, a slice at a time (paged-map.ts's `uniqueChunks`): O(pages it holds alone). */
  uniqueChunks(map: MapHandle): Promise<number> {
    return pagedMap(map).uniqueChunks(this.#catalog.chunks);
  }

  /**
   * Each export's mapped runs from a walk of its map's leaves in slices, their checksums kept by physical chunk
   * for the scrub; a chunk found bad is damage if the export's map, looked up again at the place it named it,
   * still names it with that checksum.
   */
  async scrubPlan(targets: readonly ScrubTarget[]): Promise<ScrubPlan> {
    const sums = new ChunkSums();
    const exports: Array<{ name: string; runs: ChunkRun[] }> = [];
    for (const target of targets) {
      const map = target.map();
      const runs: ChunkRun[] = [];
      if (map !== undefined) {
        for await (const run of mappedRunsOf(pagedMap(map), target.sizeBytes / chunkSizeBytes)) {
          runs.push({ virtualChunk: run.virtualChunk, chunkCount: run.chunkCount, physicalChunk: run.physicalChunk });
          sums.setRun(run.physicalChunk, run.sums);
        }
      }
      exports.push({ name: target.name, runs });
    }
    const stillNamed = async (chunk: number, sum: number): Promise<boolean> => {
      for (const [index, entry] of exports.entries()) {
        const map = targets[index]!.map();
        if (map === undefined) continue;
        for (const run of entry.runs) {
          if (chunk < run.physicalChunk || chunk >= run.physicalChunk + run.chunkCount) continue;
          const found = await this.lookup(map, run.virtualChunk + chunk - run.physicalChunk, 1);
          const now = found.runs[0]!;
          if (now.physicalChunk === chunk && found.sumOf(now, 0) === sum) return true;
        }
      }
      return false;
    };
    return { exports, source: { sumOf: (chunk) => sums.get(chunk), stillNamed } };
  }

  beginCheckpoint(generation: number): PendingCheckpoint {
    const started = performance.now();
    const bytes = this.#catalog.dirtyPages * pageBytes;
    // Queued now, after every record applied so far: the root covers exactly the generation that ends here.
    const root = this.#catalog.checkpoint(generation - 1);
    root.catch(() => {});
    const underWay: Promise<void> = root.then(
      () => {},
      () => {},
    );
    this.#checkpointUnderWay = underWay;
    void underWay.then(() => {
      if (this.#checkpointUnderWay === underWay) this.#checkpointUnderWay = null;
      if (this.#holdStarted !== null) {
        this.#held.seconds += (performance.now() - this.#holdStarted) / 1000;
        this.#holdStarted = null;
      }
    });
    return {
      encodeSeconds: (performance.now() - started) / 1000,
      appendsRecords: true,
      // A retry after a full file system starts the same generation: journal `generation` is still empty (created
      // again), and a root of the page file whose write failed is written again whole in the same slot (page-file.ts).
      write: async () => {
        // Its root is queued behind the open's (the catalog's queue), but the open's removal of the journals
        // that root covers must end before this one lists and removes journals itself.
        await this.#rootAfterOpen;
        if (this.#failure !== null) throw this.#failure;
        return { journal: await startJournal(this.#files, this.#directory, generation, root), bytes };
      },
    };
  }

  async close(): Promise<void> {
    await this.#rootAfterOpen;
    await this.#catalog.close();
  }

  /** A simulated crash (Pool.abandon): nothing more reaches the page file, the root after the open included. */
  abandon(): void {
    this.#catalog.abandon();
  }
}

/** Chunks of a map read per step of a walk (a slice of its leaves: `runs` of this many chunks). */
const walkSliceChunks = 65_536;

/** The mapped runs of `map` below `chunkLimit` with their checksums, in order, read a slice at a time. */
export async function* mappedRunsOf(map: PagedMap, chunkLimit: number): AsyncGenerator<PagedRun> {
  for (let first = 0; first < chunkLimit; first += walkSliceChunks) {
    for (const run of await map.runs(first, Math.min(walkSliceChunks, chunkLimit - first))) if (run.physicalChunk >= 0) yield run;
  }
}

function pagedMap(map: MapHandle): PagedMap {
  assert(map instanceof PagedMap, 'a map of another catalog');
  return map;
}

/** A chunk's checksum from the runs of a paged lookup (each run carries its own): one function for every lookup, no closure made per read. */
const sumOfPagedRun = (run: ChunkRun, index: number): number => (run as PagedRun).sums[index]!;

function withSums(runs: readonly PagedRun[]): ChunkLookup {
  return { runs, sumOf: sumOfPagedRun };
}

/**
 * Creates journal `generation` and makes its name durable, waits for `root` (the root covering the generation
 * before), then removes every other journal and reserves space for the new one (steps 3 to 5 at the top).
 */
async function startJournal(files: FileLayer, directory: string, generation: number, root: Promise<unknown>): Promise<JournalFile> {
  const journal = await JournalFile.create(files, journalPaths(directory, generation), generation);
  try {
    await files.syncDirectory(directory);
    await root;
    for (const older of journalGenerations(directory).filter((g) => g !== generation)) {
      for (const file of journalPaths(directory, older)) await files.unlink(file);
    }
    await journal.reserveAhead();
  } catch (error) {
    journal.close();
    throw error;
  }
  return journal;
}

/** A paged catalog with the journals after its root replayed into it (see `replayPaged`). */
export interface ReplayedPaged {
  catalog: PagedCatalog;
  /** The newest journal generation replayed (the root's own when none was). */
  generation: number;
  replayedRecords: number;
  /** Map pages the replay's prefetch read ahead of its passes (`PagedCatalog.prefetchMaps`). */
  prefetchedPages: number;
  tornTail: boolean;
  /** Damage found in one copy of a journal and read from the other: one line each. */
  repairs: string[];
  /** Journals the root already covers (the next start removes them). */
  leftovers: string[];
  /** Seconds spent reading the root and the table, and replaying the journals. */
  seconds: { root: number; replay: number };
  /** With `salvage`: where the replay stopped (null: nowhere, every journal was read whole), and what it left out. */
  salvage: { gap: string | null; lost: SalvageItem[]; where: (item: SalvageItem) => string } | null;
}

export interface ReplayOptions extends PagedCatalogOptions {
  /**
   * fsck --repair's salvage: a journal damaged in both copies (or a generation missing) is not refused; the records
   * are applied up to the first that cannot be read or applied and none after it (a record applied past a gap
   * could name a chunk a lost record freed and a later write reused), and what is left out is returned.
   */
  salvage?: boolean;
}

/**
 * Opens the paged catalog of `directory` and replays the journals after its root's generation, in memory (nothing
 * written but what the page file's open repairs). Throws ECORRUPT when a journal is damaged in both copies or
 * a generation is missing between the root's and a newer journal.
 */
export async function replayPaged(files: FileLayer, directory: string, options: ReplayOptions): Promise<ReplayedPaged> {
  const started = performance.now();
  const catalog = await PagedCatalog.open(files, directory, options);
  const rootRead = performance.now();
  try {
    const rootGeneration = catalog.journalGeneration;
    let generation = rootGeneration;
    let replayedRecords = 0;
    let prefetchedPages = 0;
    let tornTail = false;
    const repairs: string[] = [];
    const leftovers: string[] = [];
    const chunks = catalog.chunks;
    const all = journalGenerations(directory);
    for (const older of all.filter((g) => g <= rootGeneration)) leftovers.push(`journal-${older} (covered by the metadata root)`);
    if (options.salvage === true) {
      const salvage = await salvageReplay(files, directory, catalog, all.filter((g) => g > rootGeneration));
      const seconds = { root: (rootRead - started) / 1000, replay: (performance.now() - rootRead) / 1000 };
      return { catalog, generation: Math.max(rootGeneration, ...all), replayedRecords: salvage.applied, prefetchedPages: 0, tornTail: false, repairs, leftovers, seconds, salvage };
    }
    for (const newer of all.filter((g) => g > rootGeneration)) {
      const paths = journalPaths(directory, newer);
      if (newer !== generation + 1) {
        throw ChunkdError.corrupt(`pool ${directory}: the metadata root covers journal generation ${generation}, but the next journal is ${path.basename(paths[0]!)} (generation ${generation + 1} is missing)`);
      }
      const copies = await readCopies(files, paths);
      const journal = recoverJournal(copies, newer);
      if (journal.damage !== null) {
        const { offsetBytes, sequence } = journal.damage;
        throw ChunkdError.corrupt(`${paths.join(' and ')}: commit ${sequence} at byte ${offsetBytes} is damaged in both copies (damage, not a crash); the pool is left untouched`);
      }
      for (const { copy, offsetBytes, sequence } of journal.repairs) {
        repairs.push(`${paths[copy]} ${copies[copy] === null ? 'is missing' : `is damaged at byte ${offsetBytes}`} (commit ${sequence}); read from the other copy`);
      }
      // A chunk a record freed may be named by the next (it was reused after the commit that freed it): frees
      // replayed are final at once, as in the format-3 load. (Within a batch, a chunk freed and named again is
      // counted up before it is counted down: it is never free in between.)
      const freesFinal = (): void => chunks.releaseTaken(chunks.takeDeferred(chunks.deferredMark()));
      /**
       * A batch of map records: the pages its pass visits read first, many at once (a cold cache after a crash),
       * then one pass. A batch whose pages would not fit the cache (a map larger than it: the prefetch stops) is
       * cut in two halves applied in order, as records applied one by one would be, each read ahead whole.
       */
      const applyBatch = async (batch: MapRecord[]): Promise<void> => {
        const prefetched = await catalog.prefetchMaps(batch);
        prefetchedPages += prefetched.pages;
        if (!prefetched.fits && batch.length >= 2 * replayBatchRecordsMin) {
          prefetched.release();
          const half = Math.floor(batch.length / 2);
          await applyBatch(batch.slice(0, half));
          await applyBatch(batch.slice(half));
          return;
        }
        try {
          await catalog.applyMaps(batch);
        } finally {
          prefetched.release();
        }
        freesFinal();
      };
      for (const batch of replayBatches(journal.records)) {
        if (batch.length > 1) {
          await applyBatch(batch as MapRecord[]);
        } else {
          await catalog.apply(batch[0]!);
          freesFinal();
        }
      }
      replayedRecords += journal.records.length;
      tornTail ||= journal.tornTail;
      generation = newer;
    }
    const seconds = { root: (rootRead - started) / 1000, replay: (performance.now() - rootRead) / 1000 };
    return { catalog, generation, replayedRecords, prefetchedPages, tornTail, repairs, leftovers, seconds, salvage: null };
  } catch (error) {
    await catalog.close().catch(() => {});
    throw error;
  }
}

type MapRecord = Extract<MetaRecord, { type: 'map' }>;

/** The salvage's replay (`ReplayOptions.salvage`): record by record, up to the first gap. */
async function salvageReplay(files: FileLayer, directory: string, catalog: PagedCatalog, generations: number[]): Promise<{ applied: number; gap: string | null; lost: SalvageItem[]; where: (item: SalvageItem) => string }> {
  const chunks = catalog.chunks;
  const places = new Map<SalvageItem, string>();
  const lost: SalvageItem[] = [];
  let gap: string | null = null;
  let applied = 0;
  let expected = catalog.journalGeneration + 1;
  for (const generation of generations) {
    if (generation !== expected) gap ??= `journal generation ${expected} is missing`;
    expected = generation + 1;
    const items = salvageJournal(await readCopies(files, journalPaths(directory, generation)), generation);
    for (const item of items) {
      places.set(item, `journal-${generation} byte ${item.offsetBytes}`);
      if (gap === null && item.kind === 'record') {
        try {
          await catalog.apply(item.record);
          chunks.releaseTaken(chunks.takeDeferred(chunks.deferredMark()));
          applied += 1;
          continue;
        } catch (error) {
          if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
          gap = `journal-${generation} byte ${item.offsetBytes}: a record that does not apply (${error.message})`;
        }
      }
      if (gap === null) gap = item.kind === 'lost-stretch' ? `journal-${generation} byte ${item.offsetBytes}: commits ${item.sequences} unreadable in both copies` : `journal-${generation} byte ${item.offsetBytes}: a record damaged in both copies`;
      lost.push(item);
    }
  }
  return { applied, gap, lost, where: (item) => places.get(item) ?? 'the journal' };
}

/**
 * Map records replayed in one pass of their volume's map (`PagedCatalog.applyMaps`), at most: the leaves they
 * change stay in memory until the root written after the replay anyway; the bound is on the pages one pass pins.
 * More than a journal's records of one 4 KiB write each (2 MiB, about 51,000), so that a full journal is one pass
 * where its pages fit the cache (else it is cut in halves, `replayPaged`): each pass opens (copies) every leaf it
 * changes, so 16,384 copied most leaves three times at the end of a journal (a quarter of the replay's CPU).
 */
export const replayBatchRecords = 65_536;

/** A batch whose pages do not fit the cache is cut in halves down to about this many records (`replayPaged`). */
export const replayBatchRecordsMin = 64;

/**
 * `records` cut into the batches a replay applies: runs of consecutive map records of one volume (at most
 * `replayBatchRecords`), and every other record alone. A replay after a crash is mostly 4 KiB writes, each a
 * record: applied one by one, each copied a leaf and the nodes above it (about 30 us a record).
 */
export function replayBatches(records: readonly MetaRecord[]): MetaRecord[][] {
  const batches: MetaRecord[][] = [];
  let batch: MapRecord[] = [];
  for (const record of records) {
    const joins = record.type === 'map' && batch.length > 0 && batch.length < replayBatchRecords && batch[0]!.volumeId === record.volumeId;
    if (!joins && batch.length > 0) {
      batches.push(batch);
      batch = [];
    }
    if (record.type === 'map') batch.push(record);
    else batches.push([record]);
  }
  if (batch.length > 0) batches.push(batch);
  return batches;
}

/** What a node opens a paged pool with: the backend, and the journal of the generation just started. */
export interface OpenedPaged extends ReplayedPaged {
  backend: PagedBackend;
  journal: JournalFile;
  /** Seconds spent starting the new generation (its journal created and named durably) before the node serves. */
  checkpointSeconds: number;
  /**
   * The root covering the replay, written after the open returns: resolves with the seconds it took (from the
   * open's end) once it is durable and the journals it covers are removed; rejects if it failed (the backend's
   * sticky failure then).
   */
  rootWritten: Promise<number>;
}

/**
 * Opens a paged pool's metadata for a node: replay, a fresh generation, and the root covering the replay written
 * in the background (see the top). Not waiting for that root is safe: until it is durable the old root stands with
 * every journal after it, the new generation's among them (created, and its name made durable, before the open
 * returns, so before anything is committed to it), and an open replays them all in order; a torn tail is dropped
 * by every replay of its journal, not only the last one's (the journal it ends is never written again). A
 * checkpoint begun meanwhile queues its root behind this one and removes journals only after this one has.
 */
export async function openPaged(files: FileLayer, directory: string, options: PagedCatalogOptions, rootAfter?: Promise<unknown>): Promise<OpenedPaged> {
  const replayed = await replayPaged(files, directory, options);
  try {
    const started = performance.now();
    const generation = replayed.generation + 1;
    // The journal first, alone on the disk (its fdatasyncs waited behind the root's pages: 0.25 to 0.7 s).
    const journal = await JournalFile.create(files, journalPaths(directory, generation), generation);
    try {
      await files.syncDirectory(directory);
      await journal.reserveAhead();
    } catch (error) {
      journal.close();
      throw error;
    }
    // Queued before the backend exists, so before any record: it covers exactly what was replayed. With
    // `rootAfter` (a node: until it is ready) its work waits, so that it does not compete with the rest of the start
    // for the CPU (the replay's leaves encoded and written twice: 0.1 to 0.3 s of a crashed start at 4 GiB), unless
    // a record or a checkpoint is queued first (PagedCatalog.checkpoint).
    const root = replayed.catalog.checkpoint(replayed.generation, rootAfter);
    root.catch(() => {});
    const opened = performance.now();
    const rootWritten = root.then(async () => {
      await removeJournalsBefore(files, directory, generation);
      return (performance.now() - opened) / 1000;
    });
    rootWritten.catch(() => {});
    const backend = new PagedBackend(replayed.catalog, files, directory, rootWritten);
    return { ...replayed, generation, backend, journal, checkpointSeconds: (opened - started) / 1000, rootWritten };
  } catch (error) {
    await replayed.catalog.close().catch(() => {});
    throw error;
  }
}

/** Removes the journals of generations before `generation` (a root covering them is durable). */
async function removeJournalsBefore(files: FileLayer, directory: string, generation: number): Promise<void> {
  for (const older of journalGenerations(directory).filter((g) => g < generation)) {
    for (const file of journalPaths(directory, older)) await files.unlink(file);
  }
}

/**
 * Writes the root covering what `replayed` replayed (always one at open, the first one of a new pool too: small,
 * bounded by one journal's records), then starts the next journal generation, removing the journals the root
 * covers. Used by the node's open and by `fsck --repair` (repair.ts).
 */
export async function startAfterReplay(files: FileLayer, directory: string, replayed: ReplayedPaged): Promise<{ generation: number; journal: JournalFile; checkpointSeconds: number }> {
  const generation = replayed.generation + 1;
  const started = performance.now();
  const journal = await startJournal(files, directory, generation, replayed.catalog.checkpoint(replayed.generation));
  return { generation, journal, checkpointSeconds: (performance.now() - started) / 1000 };
}
