// The commit engine: how a pool's metadata changes become durable.
//
// Metadata is all in memory, made durable by a write-ahead journal of small records plus a periodic checkpoint,
// not by a general-purpose database (LMDB was weighed): the records are small (one per write or trim: 37 bytes
// and 4 per chunk), replay is a fold of `applyRecord` (the same code the live node runs, metadata.ts), group
// commit falls out of one file append, and the crash-ordering rules below are ours to see and test rather than
// hidden in a store's sync modes. The cost is that a checkpoint rewrites the whole map (compact: runs, not
// chunks). Both the journal and the checkpoint are kept in two copies with checksummed frames, as ZFS keeps ditto
// copies of its metadata: a damaged copy is read from the other and rewritten whole at the next start
// (journal-format.ts says how a torn tail is told from damage; pool-layout.ts names the files).
//
// The catalog is one of two behind catalog-backend.ts's interface: this in-memory one (pool format 3), or the paged
// catalog (format 4, paged-backend.ts), for which the journal is the write-ahead log of pages written only at
// checkpoints; a checkpoint is begun when the commit takes its records, so that it covers exactly those applied
// before. What is said below of checkpoints is the in-memory catalog's; paged-backend.ts says the paged one's.
//
// `record` applies a record to the live catalog at once (or, over pages, queues its apply) and queues it; `commit` makes every record queued before
// it durable, concurrent callers sharing one commit (group commit). A commit runs alone: it fdatasyncs the chunk
// files, then appends the queued records to both journal copies, or, once the journal is past its size, starts a
// new generation whose checkpoint holds everything.
//
// Invariants that make a crash at any moment safe, including a power loss that drops or tears writes no
// fdatasync covered (src/testing/power-loss.ts simulates exactly that):
//  1. A map record is queued only after its chunk's data write completed; a commit fdatasyncs the chunk files
//     (and their directory, when a file is new) before it writes the journal. So committed metadata never names
//     a chunk whose data is not durable.
//  2. A freed chunk is punched and reused only after the commit that recorded the free is durable (deferred
//     frees, chunk-store.ts), so a crash can neither show a volume a chunk another has since written, nor bring
//     back a removed snapshot whose data was already punched. With invariant 1 and redirect-on-write, a chunk's
//     bytes never change while any metadata on disk names it, so its recorded checksum stays true across any crash.
//  3. A commit is durable in both journal copies before the next one starts, and a FLUSH replies only after its
//     commit's fdatasyncs, so everything it covers is in both; only the last commit can be torn by a crash.
//  4. A generation starts in the order pool-layout.ts gives: a crash leaves the old checkpoint and journal, or
//     the new ones, and never a newer journal with commits whose checkpoint is gone.
//  5. Reference counts are never stored: they are rebuilt from the maps at load, so they cannot disagree with them.
//  6. At load, chunks the metadata does not name are punched out: data written but never committed, and chunks
//     recycled by overwrites, are space only. Metadata that cannot be read whole refuses the load before anything
//     is written, so a damaged pool is never punched.
// After a failed fdatasync, or a failed write of the journal or a checkpoint, the engine refuses all further writes
// (a sticky error, as SQLite's pager): the kernel may have dropped the pages, so later flushes could not be trusted.
// Reads go on. Only a restart, which reads back what is durable, clears it. A full file system is not such a
// failure: a commit that meets ENOSPC fails and is retried by the next, a checkpoint's too (each commit begins one
// until one is written; nothing goes to the old journal meanwhile: catalog-backend.ts's PendingCheckpoint says why a
// retry is safe), so that writes go on once space is back. Not at once, though: while the file system was full a
// moment ago (`fullRetryMs`), the commits nobody waits for as a FLUSH (a write that met ENOSPC asking for freed
// chunks, the early commits `record` starts) fail at once with that ENOSPC instead of another round of fdatasyncs,
// and the failures are logged once, then at most once per `fullLogIntervalMs` with a count, and once more when a
// commit succeeds again: under writes at queue depth 32 on a full disk, each write would otherwise run a commit of
// its own and log a line (2,400 a second measured, store-faults.test.ts). A client's FLUSH and the background commit
// always try. A paged checkpoint appends the commit's records to the journal first: once they are there, a
// checkpoint that meets ENOSPC leaves that commit done (its FLUSH succeeds) and is owed to the next.
import { performance } from 'node:perf_hooks';
import { ChunkdError, fromSystemError, isNoSpace } from '../core/errors.ts';
import { expectedError } from '../core/fail-stop.ts';
import { chunkSizeBytes, freedChunksHoldFactor } from '../core/limits.ts';
import { formatSize } from '../core/units.ts';
import type { CatalogBackend, ChunkLookup, MapHandle, PendingCheckpoint } from './catalog-backend.ts';
import type { ChunkStore } from './chunk-store.ts';
import type { JournalFile } from './journal-file.ts';
import { encodeRecords, type MetaRecord } from './metadata.ts';
import type { Log } from '../core/log.ts';

/** After a commit met a full file system, the commits nobody waits for as a FLUSH wait this long to try again. */
export const fullRetryMs = 1_000;
/** A full file system failing commit after commit is logged at most this often (with how many failed since). */
export const fullLogIntervalMs = 10_000;

export interface CommitEngineParts {
  /** The catalog records apply to, and which writes a new generation's checkpoint (catalog-backend.ts). */
  catalog: CatalogBackend;
  chunks: ChunkStore;
  /** The journal of the generation the pool opened with, and that generation. */
  journal: JournalFile;
  generation: number;
  /** Journal size that starts a new checkpoint. */
  journalCheckpointBytes: number;
  /** Chunks freed and not yet reusable that start a commit (limits.deferredChunksCommitMax). */
  freedChunksCommitMax: number;
  /** How often unflushed writes are committed in the background. */
  backgroundCommitIntervalMs: number;
  log: Log;
}

/** The engine's part of `chunkd status`. */
export interface CommitStatus {
  journalBytes: number;
  generation: number;
  /** Why writes are refused (a failed sync or metadata write), or null while they are taken. */
  failure: string | null;
  /** The last commit's failure when it was not final (a full file system), or null once a commit succeeds again. */
  commitError: string | null;
  commitFailuresTotal: number;
  /** Bytes of free chunks punched out of the pool's files because the metadata met a full file system (holes punched again counted too). */
  freeChunksGivenBackBytesTotal: number;
  /** Writes `#spaceGate` held for the commit under way. */
  writesHeldForFreedSpaceTotal: number;
  /** Checkpoints written since the pool opened (a full journal, or one asked for), not counting the one at open. */
  checkpointsTotal: number;
  /** The newest of those, or null before the first. */
  lastCheckpoint: CheckpointReport | null;
  /** The longest a checkpoint held the event loop to encode the catalog (seconds): the pause it causes. */
  checkpointEncodeSecondsMax: number;
}

/** One checkpoint the engine wrote: its generation, size, time from encode to durable, and the encode alone. */
export interface CheckpointReport {
  generation: number;
  bytes: number;
  seconds: number;
  /** The synchronous part (the catalog encoded in one go, nothing else runs meanwhile). */
  encodeSeconds: number;
}

export class CommitEngine {
  readonly #catalog: CatalogBackend;
  readonly #chunks: ChunkStore;
  readonly #journalCheckpointBytes: number;
  readonly #freedChunksCommitMax: number;
  readonly #log: Log;
  #generation: number;
  #journal: JournalFile;
  /** Records applied but not yet committed, each already encoded as a journal frame (the cost spread over writes). */
  #queue: Buffer[] = [];
  /** The bytes of those frames: with the journal's size, what starts a commit and its checkpoint. */
  #queueBytes = 0;
  #currentCommit: Promise<void> | null = null;
  #pendingCommit: Promise<void> | null = null;
  #failure: ChunkdError | null = null;
  #commitError: string | null = null;
  #commitFailures = 0;
  /** While commits meet a full file system: the last one's error and time, failures so far and not yet logged, the last line's time. */
  #full: { error: ChunkdError; atMs: number; failures: number; unlogged: number; loggedAtMs: number } | null = null;
  /** A checkpoint was asked for (checkpoint()): the next commit starts a new generation whatever the journal's size. */
  #checkpointRequested = false;
  /**
   * A checkpoint met a full file system: every commit from now on is a checkpoint until one succeeds. None may go
   * to the old journal meanwhile: what the failed one left of the new generation could hide it after a restart.
   */
  #checkpointOwed = false;
  /** Free chunks given back to the file system when the metadata met it full (`#giveBackFree`): the last try, the chunks punched, the tries, the last line. */
  readonly #gaveBack = { atMs: -Infinity, chunks: 0, times: 0, loggedAtMs: -Infinity };
  #checkpointsTotal = 0;
  /** Writes held by `#spaceGate`. */
  #spaceHolds = 0;
  #lastCheckpoint: CheckpointReport | null = null;
  #checkpointEncodeSecondsMax = 0;
  #timer: NodeJS.Timeout;
  #closed = false;

  constructor(parts: CommitEngineParts) {
    this.#catalog = parts.catalog;
    this.#chunks = parts.chunks;
    this.#journal = parts.journal;
    this.#generation = parts.generation;
    this.#journalCheckpointBytes = parts.journalCheckpointBytes;
    this.#freedChunksCommitMax = parts.freedChunksCommitMax;
    this.#log = parts.log;
    parts.catalog.setLog?.(parts.log);
    parts.chunks.allocationGate = () => this.#spaceGate();
    this.#timer = setInterval(() => {
      // A failure is logged, counted and shown in status by the commit itself; only a bug goes further (fail-stop).
      if (this.#queue.length > 0 || this.#chunks.deferredCount > 0 || this.#checkpointOwed) this.commit().catch((error: unknown) => expectedError(error, 'background commit'));
    }, parts.backgroundCommitIntervalMs);
    this.#timer.unref();
  }

  /**
   * Applies a metadata record to the live catalog and queues it for the next commit. The chunks it frees are
   * punched out of their files once the commit is durable, or only recycled (`punchFrees` false) for the next
   * writes to reuse.
   */
  record(record: MetaRecord, punchFrees = record.type !== 'map'): void {
    // A map record replaces chunks with new ones of the same size: the next writes reuse their space, so punching
    // it out of the file (and having the file system allocate it again) would be wasted work.
    this.#catalog.apply(record, punchFrees);
    const frame = encodeRecords([record]);
    this.#queue.push(frame);
    this.#queueBytes += frame.length;
    // A commit running or due takes this record; and while the file system was full a moment ago, the next FLUSH or
    // background commit tries again, not each write.
    if (this.#pendingCommit !== null || this.#fullRecently()) return;
    // Chunks freed by overwrites are reusable only after a commit: under a stream of overwrites and no FLUSH, commit
    // early rather than let the files grow by five seconds of writes.
    if (this.#chunks.deferredCount >= this.#freedChunksCommitMax) {
      this.commit().catch((error: unknown) => expectedError(error, 'commit to reuse freed space'));
    } else if (this.#journal.sizeBytes + this.#queueBytes >= this.#journalCheckpointBytes || this.#catalog.checkpointWanted) {
      // The journal with the records queued is past its checkpoint size: commit, and so checkpoint, now rather
      // than at the next FLUSH or background commit, seconds of writes away (15,000 writes a second for 5 s are
      // about 3 MiB of records). What a crash leaves to replay is then about one journal's checkpoint size. The
      // same when the catalog's memory asks for one (paged: its dirty map nodes past the cache's size).
      this.commit().catch((error: unknown) => expectedError(error, 'commit of a full journal'));
    }
  }

  /**
   * Resolves once every record queued before the call is applied to the catalog (at once in memory; over pages,
   * queued): what a control verb waits for after its commit, to read what it did. A commit does not wait for it:
   * a FLUSH is the journal's append and fdatasync only. A failed apply is the sticky failure.
   */
  async settled(): Promise<void> {
    try {
      await this.#catalog.settled();
    } catch (error) {
      this.checkHealthy();
      throw error;
    }
  }

  /** The runs of a range of `map` with their checksums, after the records applied before (catalog-backend.ts). */
  lookup(map: MapHandle, virtualChunk: number, chunkCount: number): ChunkLookup | Promise<ChunkLookup> {
    return this.#catalog.lookup(map, virtualChunk, chunkCount);
  }

  /** Throws the sticky failure, if an earlier sync or metadata write failed, or ESHUTDOWN once closed. */
  checkHealthy(): void {
    const applyFailure = this.#catalog.failure;
    if (this.#failure === null && applyFailure !== null) this.#fail(`applying a metadata record failed (${applyFailure.message})`, applyFailure);
    if (this.#failure !== null) throw this.#failure;
    if (this.#closed) throw new ChunkdError('ESHUTDOWN', 'the pool is closed');
  }

  /**
   * Writes wait for the commit under way while the chunks freed and not yet reusable (those it makes reusable, and
   * those freed since it began) in runs a large write can reuse are `freedChunksHoldFactor` times what starts a
   * commit. Without it a disk slower than the writes made each commit's fdatasync longer (it writes back what the
   * page cache holds dirty), and the writes meanwhile went above the high-water mark: a 512 MiB volume rewritten by
   * 1 MiB writes for 30 s left 6.3 GB of chunk files, and the copy into new page-cache folios cost the writes 2.4
   * times nbdkit's (BENCHMARKS.md, issue 19). Frees of single chunks (an overwrite of data written at random) do
   * not count: waiting for them would slow the writes and give them no room their runs fit.
   */
  #spaceGate(): Promise<void> | null {
    const running = this.#currentCommit;
    if (running === null || this.#chunks.deferredRunCount < freedChunksHoldFactor * this.#freedChunksCommitMax) return null;
    this.#spaceHolds += 1;
    return running.then(
      () => {},
      () => {},
    );
  }

  /** Makes every write completed before this call durable; concurrent callers share one commit (group commit). */
  commit(): Promise<void> {
    if (this.#pendingCommit !== null) return this.#pendingCommit;
    const previous = this.#currentCommit ?? Promise.resolve();
    const next: Promise<void> = previous
      .catch(() => {})
      .then(() => {
        this.#pendingCommit = null;
        this.#currentCommit = next;
        return this.#runCommit();
      })
      .finally(() => {
        if (this.#currentCommit === next) this.#currentCommit = null;
      });
    this.#pendingCommit = next;
    return next;
  }

  /**
   * A commit asked for by the pool itself, not a client's FLUSH (a write that met a full file system, to reuse the
   * chunks freed since the last commit): while the file system was full a moment ago, it fails at once with that
   * ENOSPC rather than running another round of fdatasyncs to meet it again.
   */
  reclaim(): Promise<void> {
    if (this.#pendingCommit === null && this.#fullRecently()) return Promise.reject(this.#full!.error);
    return this.commit();
  }

  /** Whether the journal lacks its reserve ahead (the file system was full when it was to be taken). */
  get journalReserveShort(): boolean {
    return this.#journal.reserveShort;
  }

  /**
   * Commits what is queued and writes a checkpoint of the whole catalog now, as a full journal does; resolves
   * with that checkpoint. For operators (before a backup of the pool directory) and for the scale benchmark, which
   * measures the pause a checkpoint causes.
   */
  async checkpoint(): Promise<CheckpointReport> {
    this.checkHealthy();
    const before = this.#checkpointsTotal;
    this.#checkpointRequested = true;
    await this.commit();
    // A commit already running when we asked did not see the request: the next one does.
    if (this.#checkpointsTotal === before) await this.commit();
    // A commit whose records reached the journal succeeds without its checkpoint on a full file system.
    if (this.#checkpointsTotal === before) throw this.#full?.error ?? ChunkdError.busy('the checkpoint was not written; try again');
    return this.#lastCheckpoint!;
  }

  status(): CommitStatus {
    return {
      checkpointsTotal: this.#checkpointsTotal,
      lastCheckpoint: this.#lastCheckpoint,
      checkpointEncodeSecondsMax: this.#checkpointEncodeSecondsMax,
      journalBytes: this.#journal.sizeBytes,
      generation: this.#generation,
      failure: this.#failure?.message ?? null,
      commitError: this.#commitError,
      commitFailuresTotal: this.#commitFailures,
      freeChunksGivenBackBytesTotal: this.#gaveBack.chunks * chunkSizeBytes,
      writesHeldForFreedSpaceTotal: this.#spaceHolds,
    };
  }

  /** Commits what is queued (unless writes are refused), with a checkpoint if the catalog asks, then stops and closes the journal. */
  async close(): Promise<void> {
    if (this.#closed) return;
    clearInterval(this.#timer);
    try {
      if (this.#failure === null) {
        // A catalog whose replay is the slow part of its open (paged) ends with a root covering everything, so
        // that a clean restart replays nothing.
        if (this.#catalog.checkpointAtClose && (this.#queue.length > 0 || this.#journal.sizeBytes > 0)) await this.#checkpointAtClose();
        else await this.commit();
      }
    } finally {
      this.#closed = true;
      this.#journal.close();
    }
  }

  /**
   * The checkpoint a clean close ends with (paged): it only spares the next open its replay. On a full file system,
   * once every record is durable in the journal (its append is the checkpoint's first step), the close goes on
   * without it: the next open replays the journal, and its root, or the next checkpoint's, is written once the
   * open's punch of free chunks gives space back. A node stopped on a full disk must be able to start again.
   */
  async #checkpointAtClose(): Promise<void> {
    try {
      await this.checkpoint();
    } catch (error) {
      if (!isNoSpace(error) || this.#failure !== null || this.#queue.length > 0) throw error;
      this.#log(`the checkpoint at close met a full file system (${(error as Error).message}); every commit is in the journal, which the next open replays`, 'warn');
    }
  }

  /** Stops without writing anything more (a simulated power loss); the journal's descriptors are the test's to close. */
  abandon(): void {
    this.#closed = true;
    clearInterval(this.#timer);
  }

  /** `gaveBack`: this is the commit run again at once after a give-back of free chunks (below): not run a third time. */
  async #runCommit(gaveBack = false): Promise<void> {
    this.checkHealthy();
    const records = this.#queue;
    const recordsBytes = this.#queueBytes;
    this.#queue = [];
    this.#queueBytes = 0;
    const freeMark = this.#chunks.deferredMark();
    const started = performance.now();
    const checkpointDue = this.#checkpointRequested || this.#checkpointOwed || this.#journal.sizeBytes + recordsBytes >= this.#journalCheckpointBytes || this.#catalog.checkpointWanted;
    // Begun now, as the records are taken: it covers exactly the records applied before (catalog-backend.ts).
    const checkpoint = checkpointDue ? this.#catalog.beginCheckpoint(this.#generation + 1) : null;
    const encodeSeconds = checkpoint?.encodeSeconds ?? 0;
    let checkpointBytes = 0;
    try {
      await this.#chunks.sync();
    } catch (error) {
      this.#queue = records.concat(this.#queue);
      this.#queueBytes += recordsBytes;
      throw this.#fail(`syncing chunk files failed (${(error as Error).message})`, error);
    }
    /** The records are durable in the journal (before a paged checkpoint): a retry must not append them again. */
    let appended = false;
    try {
      if (checkpoint !== null) {
        if (checkpoint.appendsRecords) {
          await this.#journal.append(Buffer.concat(records));
          appended = true;
        }
        checkpointBytes = await this.#startGeneration(checkpoint);
      } else {
        await this.#journal.append(Buffer.concat(records));
      }
    } catch (error) {
      if (!appended) {
        this.#queue = records.concat(this.#queue);
        this.#queueBytes += recordsBytes;
      }
      // A full file system stops this commit only: at most part of it reached a copy, unsynced, and the next
      // commit writes the same offset with the same sequence number; a checkpoint is begun again by every commit
      // until one succeeds (PendingCheckpoint says why a retry is safe). Anything else may have left a copy
      // written but not durable, or a rotation half done.
      if (isNoSpace(error)) {
        if (checkpoint !== null) this.#checkpointOwed = true;
        this.#commitFailures += 1;
        const thrown = fromSystemError(error, checkpoint === null ? 'metadata commit' : 'metadata checkpoint');
        // Records appended before a checkpoint (paged) are durable in the journal: the commit is done, and only
        // its checkpoint waits for space (every later commit tries it again); a FLUSH it covers succeeds.
        this.#commitError = appended ? `metadata checkpoint failed (the commits are durable in the journal): ${thrown.message}` : `metadata commit failed: ${thrown.message}`;
        // The pool's files may be holding the room: an overwrite's free chunk keeps its space for the next write.
        // Punch the free chunks out, then run the commit again at once (it takes the records put back, and begins
        // the checkpoint owed anew), so that the FLUSH or the write waiting for it need not fail.
        if (!gaveBack && (await this.#giveBackFree()) > 0) {
          if (appended) await this.#chunks.reuseFreed(freeMark);
          return this.#runCommit(true);
        }
        this.#fullFailure(thrown);
        if (!appended) throw thrown;
        await this.#chunks.reuseFreed(freeMark);
        return;
      }
      throw this.#fail(`${checkpoint === null ? 'writing the metadata journal' : 'starting a new metadata checkpoint'} failed (${(error as Error).message})`, error);
    }
    this.#commitError = null;
    if (this.#full !== null) {
      this.#log(`metadata commits succeed again, after ${this.#full.failures} failed on a full file system`);
      this.#full = null;
    }
    if (checkpoint !== null) {
      this.#checkpointRequested = false;
      this.#checkpointOwed = false;
      this.#checkpointsTotal += 1;
      this.#checkpointEncodeSecondsMax = Math.max(this.#checkpointEncodeSecondsMax, encodeSeconds);
      this.#lastCheckpoint = { generation: this.#generation, bytes: checkpointBytes, seconds: (performance.now() - started) / 1000, encodeSeconds };
    }
    // The frees are durable now: punch their space out, then let the allocator hand them out again.
    await this.#chunks.reuseFreed(freeMark);
  }

  /**
   * Punches the pool's free chunks out of its files (ChunkStore.giveBackFree), at most once per `fullRetryMs`;
   * the chunks punched (0 when it did not run or failed). Logged at most once per `fullLogIntervalMs`.
   */
  async #giveBackFree(): Promise<number> {
    const now = performance.now();
    if (now - this.#gaveBack.atMs < fullRetryMs) return 0;
    this.#gaveBack.atMs = now;
    try {
      const punched = await this.#chunks.giveBackFree();
      this.#gaveBack.chunks += punched;
      this.#gaveBack.times += 1;
      if (punched > 0 && now - this.#gaveBack.loggedAtMs >= fullLogIntervalMs) {
        const since = this.#gaveBack.times > 1 ? ` (${this.#gaveBack.times} times since the node started)` : '';
        this.#log(`the metadata met a full file system: ${formatSize(punched * chunkSizeBytes)} of free chunks punched out of the pool's files to give it room, and the commit tried again${since}`, 'warn');
        this.#gaveBack.loggedAtMs = now;
      }
      return punched;
    } catch (error) {
      this.#log(`giving free chunks back to the file system failed: ${(error as Error).message}`, 'warn');
      return 0;
    }
  }

  /** Whether a commit met a full file system less than `fullRetryMs` ago. */
  #fullRecently(): boolean {
    return this.#full !== null && performance.now() - this.#full.atMs < fullRetryMs;
  }

  /** Notes a commit that met a full file system; logs it if it is the first, or the first for `fullLogIntervalMs`. */
  #fullFailure(error: ChunkdError): void {
    const now = performance.now();
    const full = (this.#full ??= { error, atMs: now, failures: 0, unlogged: 0, loggedAtMs: -Infinity });
    full.error = error;
    full.atMs = now;
    full.failures += 1;
    if (now - full.loggedAtMs < fullLogIntervalMs) {
      full.unlogged += 1;
      return;
    }
    const since = full.unlogged > 0 ? ` (and ${full.unlogged} more since the last such line)` : '';
    this.#log(`${this.#commitError}${since}`, 'error');
    full.unlogged = 0;
    full.loggedAtMs = now;
  }

  /** Makes the pool refuse writes from now on (the sticky failure); returns the error to throw. */
  #fail(reason: string, cause: unknown): ChunkdError {
    this.#commitFailures += 1;
    this.#failure = ChunkdError.io(`${reason}; the pool refuses writes until the node restarts`, cause);
    this.#commitError = this.#failure.message;
    this.#log(this.#failure.message, 'error');
    return this.#failure;
  }

  async #startGeneration(checkpoint: PendingCheckpoint): Promise<number> {
    const { journal, bytes } = await checkpoint.write(this.#journal);
    const old = this.#journal;
    this.#journal = journal;
    this.#generation = journal.generation;
    old.close();
    return bytes;
  }
}
