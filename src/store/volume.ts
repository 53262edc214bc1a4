// Volumes and snapshots as BlockDevices. A volume maps byte ranges to chunk runs and asks its chunk store
// (chunk-store.ts) for the data and its commit engine (commit-engine.ts) for the records; each
// request holds its chunk range in the volume's RangeLock for its whole life (writes exclusively), which gives
// DESIGN.md's per-block ordering and lets the rest of the path assume no one else changes those map entries.
//
// Writes never overwrite a chunk that metadata names (redirect-on-write, as ZFS and btrfs): every write gets a
// fresh contiguous physical run for the chunks it covers, written whole (only a partly covered first and last
// chunk are read, verified, to fill in), and only after the data is written is the mapping recorded, with the
// checksum of each chunk. The chunks it replaces are freed once that record is committed. So a chunk's bytes
// and the checksum the metadata holds for it can never disagree, even after a crash in the middle of a write
// (an in-place overwrite could leave new bytes under an old checksum), snapshots and clones need no special
// case (a shared chunk is never written), and a write touches no metadata but its own record.
// Reads check every chunk they return against its checksum (the chunk store's `read`); a mismatch is an EIO for
// that read, logged and counted, never wrong bytes. Trims unmap whole chunks (their space is punched out once the
// unmap is committed) and zero the partly covered ends. A snapshot device reads through the snapshot's frozen
// map and refuses nothing itself: the NBD edge answers EPERM for writes to a read-only export before they reach it.
import { assert } from '../core/assert.ts';
import { doneNow, type BlockDevice, type Extent, type WriteOptions, type ZeroOptions } from '../core/block-device.ts';
import { ChunkdError, fromSystemError } from '../core/errors.ts';
import { settleAll } from '../core/settle.ts';
import { blockStatusExtentsMax, chunkSizeBytes, inlineWriteBytesMax, readDefragBytesMin, readDefragPieceBytesMax } from '../core/limits.ts';
import type { ChunkLookup, MapHandle, SnapshotView, VolumeView } from './catalog-backend.ts';
import type { ChunkRun } from './chunk-map.ts';
import type { ChunkStore, WrittenRun } from './chunk-store.ts';
import type { CommitEngine } from './commit-engine.ts';
import { copyBytes } from './native.ts';
import type { RangeLock, Release } from './range-lock.ts';

/**
 * What a volume needs from its pool, and all it gets: the chunk store's data verbs (write fresh chunks, zero,
 * read through a map's lookup with verification) and the commit engine's record, commit, lookup and health check.
 */
export interface VolumeStore {
  readonly chunks: Pick<ChunkStore, 'write' | 'zero' | 'read' | 'readCachedMany'>;
  readonly metadata: Pick<CommitEngine, 'record' | 'commit' | 'checkHealthy' | 'lookup'>;
  /**
   * Asked at every write, trim, zero and flush of a volume (not of the stream receiver's handle), before it is
   * applied and again before it is acknowledged: null lets it through (the cluster's fencing by time, Pool.setWriteGate).
   */
  readonly writeGate: (volume: string) => ChunkdError | null;
  /** Rewrites of scattered ranges that large reads ask for (Volume#defragment; absent: never). */
  readonly readDefrag?: ReadDefrag;
}

/**
 * What a volume's large reads may ask of their pool: a range found in many small pieces (a range rewritten at
 * random) written again as one fresh run, in the background (Volume#defragment). The pool decides whether, and
 * counts the bytes.
 */
export interface ReadDefrag {
  /**
   * Whether ranges may be rewritten now: the option is on, reads are verified (only bytes just checked against
   * their checksums are written again), no snapshot in the pool may share the chunks, the pool is open and healthy.
   */
  allowed(): boolean;
  /**
   * Runs `rewrite` (it resolves true when it rewrote the range) unless `bytes` more would pass the bound on those
   * in flight (limits.readDefragInFlightBytesMax): whether it runs. The pool waits for those in flight before it closes.
   */
  start(bytes: number, rewrite: () => Promise<boolean>): boolean;
}

/** Shared by every open of one volume or snapshot. */
export interface ExportRuntime {
  openCount: number;
}

export interface VolumeRuntime extends ExportRuntime {
  meta: VolumeView;
  lock: RangeLock;
  /** Why writes are refused (a handoff in progress, an owner fenced by a newer one), or null. Pool.blockWrites sets it. */
  writeBlock: ChunkdError | null;
}

/** Source of the bytes written at absolute volume offsets [start, end). */
type ByteSource = (start: number, end: number) => Buffer;

/** A small plain write held to the end of its turn, its chunks already asked of the range lock. */
interface TurnWrite {
  offsetBytes: number;
  data: Buffer;
  /** Its chunks' checksums when the caller gave them (write's `sums`). */
  sums: Uint32Array | undefined;
  lock: Release | Promise<Release>;
  resolve: () => void;
  reject: (error: unknown) => void;
}

/** The most bytes of a turn's small writes written as one run (what the store writes on its own thread: limits.ts). */
const turnBatchBytesMax = inlineWriteBytesMax;

/**
 * Buffers a group's writes are gathered into (turnBatchBytesMax each), kept for the next group once its write is
 * done, at most groupBuffersKept of them. A fresh buffer per group (Buffer.concat) is memory outside V8's heap that
 * V8 counts towards its next full collection: at queue depth 32 that was a Mark-Compact every 100-200 ms against
 * one every 1-3 s without the turn batch, and the p99.9 latency rose with them (BENCHMARKS.md, issue 19).
 */
const groupBuffers: Buffer[] = [];
const groupBuffersKept = 8;

/**
 * The first chunks of ranges that large reads found scattered once, by volume, oldest first (#maybeDefragment):
 * the second such read rewrites the range. At most readDefragSeenMax a volume (a MiB each: 64 GiB of reads).
 */
const scatteredSeen = new WeakMap<VolumeRuntime, Set<number>>();
const readDefragSeenMax = 65_536;

/** Buffers read defragmentation copied ranges into (#maybeDefragment), kept for the next (limits.readDefragInFlightBytesMax bounds those in use). */
const defragBuffers: Buffer[] = [];
const defragBuffersKept = 8;

export class Volume implements BlockDevice {
  readonly readOnly = false;
  readonly #store: VolumeStore;
  readonly #runtime: VolumeRuntime;
  #closed = false;

  /** The stream receiver's handle writes past the volume's write block (it is what feeds a replica). */
  readonly #receiver: boolean;

  /** True from a turn's first small plain write until the turn ends (setImmediate): later ones wait in #turnWrites. */
  #turnOpen = false;
  #turnWrites: TurnWrite[] = [];

  constructor(store: VolumeStore, runtime: VolumeRuntime, receiver = false) {
    this.#store = store;
    this.#runtime = runtime;
    this.#receiver = receiver;
    runtime.openCount += 1;
  }

  get name(): string {
    return this.#runtime.meta.name;
  }

  get sizeBytes(): number {
    return this.#runtime.meta.sizeBytes;
  }

  get #map(): MapHandle {
    return this.#runtime.meta.map;
  }

  /**
   * Reads under the range lock. Without a promise of its own where none is needed: the lock granted at once, the
   * lookup in memory and the bytes in the page cache, the read is done before this returns (block-device.ts's doneNow).
   */
  read(offsetBytes: number, target: Buffer): Promise<void> {
    try {
      this.#assertRange(offsetBytes, target.length);
      if (target.length === 0) return doneNow;
      const locked = this.#lock(offsetBytes, target.length, false);
      if (locked instanceof Promise) return locked.then((release) => this.#readLocked(offsetBytes, target, release));
      return this.#readLocked(offsetBytes, target, locked);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  #readLocked(offsetBytes: number, target: Buffer, release: Release): Promise<void> {
    let read: ChunkLookup | Promise<ChunkLookup>;
    try {
      read = readThrough(this.#store, this.name, this.#map, offsetBytes, target);
    } catch (error) {
      release();
      return Promise.reject(fromSystemError(error, `read of volume ${this.name} at ${offsetBytes}`));
    }
    if (!(read instanceof Promise)) {
      release();
      this.#afterRead(offsetBytes, target, read);
      return doneNow;
    }
    return read.then(
      (found) => {
        release();
        this.#afterRead(offsetBytes, target, found);
      },
      (error: unknown) => {
        release();
        throw fromSystemError(error, `read of volume ${this.name} at ${offsetBytes}`);
      },
    );
  }

  #afterRead(offsetBytes: number, target: Buffer, found: ChunkLookup): void {
    if (target.length >= readDefragBytesMin && this.#store.readDefrag !== undefined && !this.#receiver) this.#maybeDefragment(offsetBytes, target, found);
  }

  /**
   * After a large read of `data` at `offsetBytes` through `found`: when the range is whole chunks, all mapped, in
   * pieces of readDefragPieceBytesMax or less on average, and a read found it so before, asks the pool to rewrite it
   * as one fresh run (#defragment) from a copy of the bytes just read and verified. Synchronous: the copy is made before the
   * caller gets `data` back.
   */
  #maybeDefragment(offsetBytes: number, data: Buffer, found: ChunkLookup): void {
    if (offsetBytes % chunkSizeBytes !== 0 || data.length % chunkSizeBytes !== 0) return;
    const pieces = physicalPieces(found.runs);
    if (pieces <= 1 || pieces * readDefragPieceBytesMax < data.length) return;
    const defrag = this.#store.readDefrag!;
    if (!defrag.allowed()) return;
    // Only a range found scattered a second time: a range read once (a backup, a copy) is not worth a write.
    const first = offsetBytes / chunkSizeBytes;
    let seen = scatteredSeen.get(this.#runtime);
    if (seen === undefined) scatteredSeen.set(this.#runtime, (seen = new Set()));
    if (!seen.delete(first)) {
      seen.add(first);
      if (seen.size > readDefragSeenMax) seen.delete(seen.values().next().value!);
      return;
    }
    const started = defrag.start(data.length, async () => {
      // A copy with libc's memcpy (Buffer's copy of a reply buffer in shared memory is V8's slower relaxed one),
      // into a buffer kept from an earlier rewrite: a fresh one costs a page fault per 4 KiB, more than the copy.
      const index = defragBuffers.findIndex((buffer) => buffer.length === data.length);
      const copy = index >= 0 ? defragBuffers.splice(index, 1)[0]! : Buffer.allocUnsafeSlow(data.length);
      copyBytes(copy, data);
      try {
        return await this.#defragment(offsetBytes, copy, chunksOf(found));
      } finally {
        // Written (or dropped) by now: the chunk store holds no part of it once its write has settled.
        if (defragBuffers.length < defragBuffersKept) defragBuffers.push(copy);
      }
    });
    // Refused (too many bytes of rewrites in flight): the next read that finds it scattered asks again.
    if (!started) seen.add(first);
  }

  /**
   * Writes `copy` (bytes read and verified from the chunks `read` names) at `offsetBytes` again as one fresh run,
   * as a write would: under the range lock, only if the map still names those chunks with those checksums (else a
   * write came between, and nothing is done), through the chunk store's write (redirect-on-write: the old chunks
   * stay until the new map record is committed, then are freed as any overwrite frees them) and one map record,
   * durable at the next commit. A power loss before that commit leaves the old map and chunks, the same bytes.
   * The volume counts as open meanwhile, so that it is not removed, shrunk or rolled back under it. Resolves
   * whether it rewrote the range.
   */
  async #defragment(offsetBytes: number, copy: Buffer, read: MappedChunks): Promise<boolean> {
    const runtime = this.#runtime;
    runtime.openCount += 1;
    try {
      const release = await this.#lock(offsetBytes, copy.length, true);
      try {
        if (runtime.writeBlock !== null || this.#store.writeGate(this.name) !== null) return false;
        if (!this.#store.readDefrag!.allowed()) return false;
        this.#store.metadata.checkHealthy();
        const first = offsetBytes / chunkSizeBytes;
        const count = copy.length / chunkSizeBytes;
        if (!sameChunks(read, chunksOf(await lookup(this.#store, this.#map, first, count)))) return false;
        const written = await this.#store.chunks.write(copy);
        // The copy was verified against these checksums as it was read: a difference is a bug, and is not recorded.
        for (let i = 0; i < count; i++) assert(written.sums[i] === read.sums[i], 'a defragmented chunk differs from the one read');
        this.#recordMapped(first, written, 0, count);
        return true;
      } finally {
        release();
      }
    } finally {
      runtime.openCount -= 1;
    }
  }

  /**
   * `options.sums`: the chunks' CRC-32s of a write of whole chunks, taken from these bytes by the caller (a
   * replication receiver's decoder checks each record's CRC from them): recorded as they are, the bytes not summed
   * again (in a turn's batch too, #writeGroup). A write of part of a chunk sums its bytes as any other.
   */
  async write(offsetBytes: number, data: Buffer, options?: WriteOptions & { sums?: Uint32Array }): Promise<void> {
    this.#assertRange(offsetBytes, data.length);
    this.#store.metadata.checkHealthy();
    if (options?.fua !== true && isTurnBatchable(offsetBytes, data.length)) {
      if (this.#turnOpen) return this.#holdForTurn(offsetBytes, data, options?.sums);
      // A turn's first small write goes now, as it always has (a lone write, QD1, waits for nothing); the turn's
      // later ones are written together when it ends.
      this.#turnOpen = true;
      setImmediate(this.#endTurn);
    }
    if (data.length > 0) {
      const release = await this.#lock(offsetBytes, data.length, true);
      try {
        // Under the lock, so that a block set while this write waited for it applies (blockWrites takes the whole range).
        this.#checkWritable();
        await this.#writeBytes(offsetBytes, data.length, (start, end) => data.subarray(start - offsetBytes, end - offsetBytes), options?.sums);
      } catch (error) {
        throw fromSystemError(error, `write to volume ${this.name} at ${offsetBytes}`);
      } finally {
        release();
      }
    }
    if (options?.fua) await this.#store.metadata.commit();
    this.#checkAcknowledge();
  }

  /**
   * Several whole-chunk writes that do not share a chunk, as one: one fresh physical run for all their chunks, one
   * write of the file, one map record each, with its own chunks' checksums, as `write` records one. Each small
   * write's own pwrite and thread hand-off is most of its CPU: a replication receiver writes a stream's scattered
   * small records so (replication/receive.ts; a turn's small writes through `write` are grouped the same way,
   * #endTurn). The bytes are copied before the first await, so the caller
   * may reuse the writes' buffers once this returns its promise. The range from the first write to the last is asked
   * of the lock at once, so the batch is ordered against single writes as they were asked. All succeed or all fail;
   * none with FUA (the caller flushes). A write's `sums`, when every write has them, are its chunks' CRC-32s the
   * caller has already taken (a replication receiver's decoder checks each record's CRC from them): recorded as
   * they are, the bytes not summed again.
   */
  async writeMany(writes: ReadonlyArray<{ offsetBytes: number; data: Buffer; sums?: Uint32Array }>): Promise<void> {
    assert(writes.length > 0, 'writeMany: at least one write');
    const sorted = [...writes].sort((a, b) => a.offsetBytes - b.offsetBytes);
    let totalBytes = 0;
    for (const [index, { offsetBytes, data }] of sorted.entries()) {
      this.#assertRange(offsetBytes, data.length);
      assert(offsetBytes % chunkSizeBytes === 0 && data.length % chunkSizeBytes === 0 && data.length > 0, 'writeMany: whole chunks');
      assert(index === 0 || sorted[index - 1]!.offsetBytes + sorted[index - 1]!.data.length <= offsetBytes, 'writeMany: writes that share no chunk');
      totalBytes += data.length;
    }
    // Gathered in a kept buffer when it fits one (a replication receiver's batches do): a fresh one per call made
    // the receiver's V8 run a full collection several times a second (as groupBuffers says of the turn's groups).
    const kept = totalBytes <= turnBatchBytesMax ? (groupBuffers.pop() ?? Buffer.allocUnsafeSlow(turnBatchBytesMax)) : null;
    const payload = kept === null ? Buffer.concat(sorted.map((write) => write.data), totalBytes) : kept.subarray(0, totalBytes);
    if (kept !== null) {
      let at = 0;
      for (const { data } of sorted) at += data.copy(payload, at);
    }
    const sums = joinedSums(sorted, totalBytes / chunkSizeBytes);
    this.#store.metadata.checkHealthy();
    // One range from the first write's start to the last one's end, asked for now: the lock grants overlapping
    // requests first come, first served, so this batch is ordered against writes asked for before and after it as a
    // single write would be. One range rather than one per write: the lock is a list that each request scans (a few
    // are in flight from clients), and a receiver's 8 batches of 256 scattered chunks made it most of the receive's
    // CPU; the chunks between the writes are held too, which only makes requests on them wait a little longer.
    const last = sorted[sorted.length - 1]!;
    const lock = this.#lock(sorted[0]!.offsetBytes, last.offsetBytes + last.data.length - sorted[0]!.offsetBytes, true);
    const releases: Release[] = [];
    try {
      releases.push(lock instanceof Promise ? await lock : lock);
      this.#checkWritable();
      await this.#writeRun(sorted, payload, sums);
      // Kept only after a write that succeeded, as #writeGroup keeps its buffers.
      if (kept !== null && groupBuffers.length < groupBuffersKept) groupBuffers.push(kept);
    } catch (error) {
      throw fromSystemError(error, `write of ${sorted.length} ranges to volume ${this.name} from ${sorted[0]!.offsetBytes}`);
    } finally {
      for (const release of releases) release();
    }
    this.#checkAcknowledge();
  }

  /**
   * A small plain whole-chunk write after the first of its turn: its chunks are asked of the range lock now, in
   * arrival order (so it is ordered against every request as `write` would be), and it is written with the turn's
   * others when the turn ends (#endTurn), acknowledged once that write is done and its map record made: the same
   * durability as a lone write (page cache, recorded, durable at the next flush).
   */
  #holdForTurn(offsetBytes: number, data: Buffer, sums: Uint32Array | undefined): Promise<void> {
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    this.#turnWrites.push({ offsetBytes, data, sums, lock: this.#lock(offsetBytes, data.length, true), resolve, reject });
    return promise;
  }

  /**
   * The turn's held writes, in arrival order, cut into groups of writes that share no chunk (a write that shares
   * one with an earlier write of the group starts the next group, and waits in the lock for that group to be done),
   * each group one fresh run, one write of the file, one map record per write (#writeGroup).
   */
  readonly #endTurn = (): void => {
    this.#turnOpen = false;
    const writes = this.#turnWrites;
    if (writes.length === 0) return;
    this.#turnWrites = [];
    let group: TurnWrite[] = [];
    let groupBytes = 0;
    for (const write of writes) {
      const fits = groupBytes + write.data.length <= turnBatchBytesMax && group.every((other) => !sharesChunk(other, write));
      if (!fits) {
        void this.#writeGroup(group);
        group = [];
        groupBytes = 0;
      }
      group.push(write);
      groupBytes += write.data.length;
    }
    void this.#writeGroup(group);
  };

  /** Writes a group of held whole-chunk writes that share no chunk as one run; settles each write's promise. */
  async #writeGroup(group: TurnWrite[]): Promise<void> {
    const releases: Release[] = [];
    try {
      for (const { lock } of group) releases.push(lock instanceof Promise ? await lock : lock);
      this.#checkWritable();
      const sorted = [...group].sort((a, b) => a.offsetBytes - b.offsetBytes);
      if (sorted.length === 1) {
        await this.#writeRun(sorted, sorted[0]!.data, sorted[0]!.sums);
      } else {
        const buffer = groupBuffers.pop() ?? Buffer.allocUnsafeSlow(turnBatchBytesMax);
        let bytes = 0;
        for (const { data } of sorted) bytes += data.copy(buffer, bytes);
        await this.#writeRun(sorted, buffer.subarray(0, bytes), joinedSums(sorted, bytes / chunkSizeBytes));
        // Only after a write that succeeded: every part of a failed one settled too (chunk-files.ts), but a buffer
        // that failed is not worth the doubt.
        if (groupBuffers.length < groupBuffersKept) groupBuffers.push(buffer);
      }
    } catch (error) {
      for (const release of releases) release();
      // A lock not yet granted when another failed: released once granted, so no later request waits on it forever.
      for (const { lock } of group.slice(releases.length)) void Promise.resolve(lock).then((release) => release());
      for (const write of group) write.reject(fromSystemError(error, `write to volume ${this.name} at ${write.offsetBytes}`));
      return;
    }
    for (const release of releases) release();
    let refusal: unknown = null;
    try {
      this.#checkAcknowledge();
    } catch (error) {
      refusal = error;
    }
    for (const write of group) {
      if (refusal === null) write.resolve();
      else write.reject(refusal);
    }
  }

  async trim(offsetBytes: number, lengthBytes: number, options?: WriteOptions): Promise<void> {
    await this.#zero(offsetBytes, lengthBytes, false, 'trim');
    if (options?.fua) await this.#store.metadata.commit();
    this.#checkAcknowledge();
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void> {
    // Without NO_HOLE, giving the space back is the fastest way to zeros: reads of holes give zeros.
    await this.#zero(offsetBytes, lengthBytes, options?.noHole === true, 'write zeroes');
    if (options?.fua) await this.#store.metadata.commit();
    this.#checkAcknowledge();
  }

  async flush(): Promise<void> {
    // A flush that succeeds tells the client its writes are safe: not while another node may be taking over.
    this.#checkAcknowledge();
    await this.#store.metadata.commit();
    this.#checkAcknowledge();
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#assertRange(offsetBytes, lengthBytes);
    return blockStatusOfMap(this.#store, this.#map, offsetBytes, lengthBytes);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#runtime.openCount -= 1;
  }

  #checkWritable(): void {
    if (this.#receiver) return;
    if (this.#runtime.writeBlock !== null) throw this.#runtime.writeBlock;
    const refusal = this.#store.writeGate(this.name);
    if (refusal !== null) throw refusal;
  }

  /** Before a write is acknowledged: the gate may have closed while it ran (a lease that lapsed meanwhile). */
  #checkAcknowledge(): void {
    if (this.#receiver) return;
    const refusal = this.#store.writeGate(this.name);
    if (refusal !== null) throw refusal;
  }

  #assertRange(offsetBytes: number, lengthBytes: number): void {
    assert(!this.#closed, 'I/O on a closed volume');
    assertRange(offsetBytes, lengthBytes, this.sizeBytes);
  }

  #lock(offsetBytes: number, lengthBytes: number, exclusive: boolean): Release | Promise<Release> {
    const first = Math.floor(offsetBytes / chunkSizeBytes);
    const end = Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes);
    return this.#runtime.lock.acquire(first, end, exclusive);
  }

  /** Whole-chunk writes sorted by offset, sharing no chunk, as one fresh run (`payload`, their bytes in that order): one map record each, with its own chunks' checksums. */
  async #writeRun(sorted: ReadonlyArray<{ offsetBytes: number; data: Buffer }>, payload: Buffer, sums?: Uint32Array): Promise<void> {
    const written = await this.#store.chunks.write(payload, sums);
    let chunk = 0;
    for (const { offsetBytes, data } of sorted) {
      const count = data.length / chunkSizeBytes;
      this.#recordMapped(offsetBytes / chunkSizeBytes, written, chunk, count);
      chunk += count;
    }
  }

  /**
   * The map records of chunks [from, from + count) of `written` at `virtualChunk`: one, or one for each piece they
   * lie in when a full file system had the write in pieces (ChunkStore.write). Their sums are views, not copies: the
   * run's sums are its own (fresh for this write) and the record's readers copy them.
   */
  #recordMapped(virtualChunk: number, written: WrittenRun, from: number, count: number): void {
    let pieceStart = 0;
    for (const piece of written.pieces) {
      const start = Math.max(from, pieceStart);
      const end = Math.min(from + count, pieceStart + piece.chunkCount);
      if (start < end) {
        this.#store.metadata.record({
          type: 'map', volumeId: this.#runtime.meta.id, virtualChunk: virtualChunk + start - from, physicalChunk: piece.physicalChunk + start - pieceStart, chunkCount: end - start,
          sums: start === 0 && end === written.sums.length ? written.sums : written.sums.subarray(start, end),
        });
      }
      pieceStart += piece.chunkCount;
    }
  }

  /** Trim (noHole false) or zero-write with NO_HOLE: whole chunks are unmapped or zeroed, partial ends zero-written. */
  async #zero(offsetBytes: number, lengthBytes: number, noHole: boolean, what: string): Promise<void> {
    this.#assertRange(offsetBytes, lengthBytes);
    this.#store.metadata.checkHealthy();
    if (lengthBytes === 0) return;
    const release = await this.#lock(offsetBytes, lengthBytes, true);
    try {
      this.#checkWritable();
      const end = offsetBytes + lengthBytes;
      const firstWhole = Math.ceil(offsetBytes / chunkSizeBytes);
      const endWhole = Math.floor(end / chunkSizeBytes);
      const parts: Array<Promise<void>> = [];
      const zeroPart = (start: number, stop: number): void => {
        parts.push(
          (async () => {
            // A hole already reads as zeros; without NO_HOLE it may stay one.
            if (!noHole && (await lookup(this.#store, this.#map, Math.floor(start / chunkSizeBytes), 1)).runs[0]!.physicalChunk < 0) return;
            await this.#writeBytes(start, stop - start, (a, b) => Buffer.alloc(b - a));
          })(),
        );
      };
      // A partly covered chunk at each end (one chunk when the range lies inside it), whole chunks between.
      const headEnd = Math.min(end, firstWhole * chunkSizeBytes);
      if (offsetBytes < headEnd) zeroPart(offsetBytes, headEnd);
      const tailStart = Math.max(headEnd, endWhole * chunkSizeBytes);
      if (tailStart < end) zeroPart(tailStart, end);
      if (endWhole > firstWhole) {
        if (noHole) parts.push(this.#zeroWholeChunks(firstWhole, endWhole - firstWhole));
        else this.#store.metadata.record({ type: 'unmap', volumeId: this.#runtime.meta.id, virtualChunk: firstWhole, chunkCount: endWhole - firstWhole });
      }
      await settleAll(parts);
    } catch (error) {
      throw fromSystemError(error, `${what} of volume ${this.name} at ${offsetBytes}`);
    } finally {
      release();
    }
  }

  /** Writes `lengthBytes` at `offsetBytes` from `source` into a fresh physical run covering its chunks. */
  /** `sums`: the chunks' checksums when the write covers whole chunks and the caller took them (write's). */
  async #writeBytes(offsetBytes: number, lengthBytes: number, source: ByteSource, sums?: Uint32Array): Promise<void> {
    const first = Math.floor(offsetBytes / chunkSizeBytes);
    const count = Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes) - first;
    const runStart = first * chunkSizeBytes;
    const runBytes = count * chunkSizeBytes;
    let payload: Buffer;
    let given: Uint32Array | undefined;
    if (offsetBytes === runStart && lengthBytes === runBytes) {
      payload = source(offsetBytes, offsetBytes + lengthBytes);
      given = sums;
    } else {
      // Only the partly covered first and last chunks keep old bytes; they are read (and verified) to fill in.
      payload = Buffer.alloc(runBytes);
      const reads: Array<Promise<unknown>> = [];
      if (offsetBytes > runStart) reads.push(readThroughLater(this.#store, this.name, this.#map, runStart, payload.subarray(0, chunkSizeBytes)));
      const end = offsetBytes + lengthBytes;
      if (end < runStart + runBytes && (count > 1 || offsetBytes === runStart)) {
        reads.push(readThroughLater(this.#store, this.name, this.#map, runStart + runBytes - chunkSizeBytes, payload.subarray(runBytes - chunkSizeBytes)));
      }
      await settleAll(reads);
      source(offsetBytes, end).copy(payload, offsetBytes - runStart);
    }
    assert(given === undefined || given.length === count, 'a write\'s given checksums cover its chunks');
    const written = await this.#store.chunks.write(payload, given);
    this.#recordMapped(first, written, 0, count);
  }

  /** NO_HOLE zeroing of whole chunks: a fresh run, zeroed by the file system and kept allocated. */
  async #zeroWholeChunks(firstChunk: number, chunkCount: number): Promise<void> {
    const written = await this.#store.chunks.zero(chunkCount);
    this.#recordMapped(firstChunk, written, 0, chunkCount);
  }
}

/** A plain write small enough to share a run with a turn's others, of whole chunks (a large one is a batch already). */
function isTurnBatchable(offsetBytes: number, lengthBytes: number): boolean {
  return lengthBytes > 0 && lengthBytes <= turnBatchBytesMax / 4 && offsetBytes % chunkSizeBytes === 0 && lengthBytes % chunkSizeBytes === 0;
}

function sharesChunk(a: { offsetBytes: number; data: Buffer }, b: { offsetBytes: number; data: Buffer }): boolean {
  return a.offsetBytes < b.offsetBytes + b.data.length && b.offsetBytes < a.offsetBytes + a.data.length;
}

/** A snapshot as a read-only BlockDevice: its map never changes while it exists, so reads need no lock. */
export class SnapshotDevice implements BlockDevice {
  readonly readOnly = true;
  readonly name: string;
  readonly #snapshot: SnapshotView;
  readonly #store: VolumeStore;
  readonly #runtime: ExportRuntime;
  #closed = false;

  constructor(volumeName: string, snapshot: SnapshotView, store: VolumeStore, runtime: ExportRuntime) {
    this.name = `${volumeName}@${snapshot.name}`;
    this.#snapshot = snapshot;
    this.#store = store;
    this.#runtime = runtime;
    runtime.openCount += 1;
  }

  get sizeBytes(): number {
    return this.#snapshot.sizeBytes;
  }

  async read(offsetBytes: number, target: Buffer): Promise<void> {
    await this.readNowOrLater(offsetBytes, target);
  }

  /**
   * read, done right here when it can be (the map in memory, every byte in the page cache), else a promise; either
   * way the lookup it read by (the runs and their recorded checksums, which the read verified the bytes against
   * unless the pool's verifyReads is off); a failure is thrown (or rejects) as read's. A sender reads a
   * large extent this way (replication/send.ts; a random writer's scattered small chunks a batch at a time:
   * readManyNowOrLater), and the promises of an asynchronous read were a good part of each one's CPU.
   */
  readNowOrLater(offsetBytes: number, target: Buffer): ChunkLookup | Promise<ChunkLookup> {
    assertRange(offsetBytes, target.length, this.sizeBytes);
    let reading: ChunkLookup | Promise<ChunkLookup>;
    try {
      reading = readThrough(this.#store, this.name, this.#snapshot.map, offsetBytes, target);
    } catch (error) {
      throw fromSystemError(error, `read of snapshot ${this.name} at ${offsetBytes}`);
    }
    if (!(reading instanceof Promise)) return reading;
    return this.#later(offsetBytes, reading);
  }

  /**
   * readNowOrLater for many ranges at once (a sender's scattered chunks, a window of them): those whose lookups are
   * in memory and whose bytes the page cache holds are read together, in order of their place on disk
   * (ChunkStore.readCachedMany: a read call per stretch of chunks back to back there, not one per range); each of
   * the others as readNowOrLater reads it. `outcomes[i]` is what readNowOrLater(offsets[i], targets[i]) would
   * give, its failure as an Error (in the slot, not thrown): the lookup, a promise of it, or the error.
   */
  readManyNowOrLater(offsets: readonly number[], targets: readonly Buffer[]): Array<ChunkLookup | Promise<ChunkLookup> | Error> {
    const outcomes = new Array<ChunkLookup | Promise<ChunkLookup> | Error>(offsets.length);
    const founds: ChunkLookup[] = [];
    const at: number[] = [];
    for (let i = 0; i < offsets.length; i++) {
      try {
        assertRange(offsets[i]!, targets[i]!.length, this.sizeBytes);
        const first = Math.floor(offsets[i]! / chunkSizeBytes);
        const lookedUp = lookup(this.#store, this.#snapshot.map, first, Math.ceil((offsets[i]! + targets[i]!.length) / chunkSizeBytes) - first);
        if (lookedUp instanceof Promise) {
          outcomes[i] = this.#later(offsets[i]!, lookedUp.then((found) => readFound(this.#store, this.name, found, offsets[i]!, targets[i]!)));
        } else {
          outcomes[i] = lookedUp;
          founds.push(lookedUp);
          at.push(i);
        }
      } catch (error) {
        outcomes[i] = this.#failed(offsets[i]!, error);
      }
    }
    if (founds.length === 0) return outcomes;
    const read = this.#store.chunks.readCachedMany(this.name, founds, at.map((i) => offsets[i]!), at.map((i) => targets[i]!));
    for (let k = 0; k < at.length; k++) {
      const i = at[k]!;
      const outcome = read[k];
      if (outcome === null) continue;
      if (outcome !== undefined) {
        outcomes[i] = this.#failed(offsets[i]!, outcome);
        continue;
      }
      try {
        const reading = readFound(this.#store, this.name, founds[k]!, offsets[i]!, targets[i]!);
        outcomes[i] = reading instanceof Promise ? this.#later(offsets[i]!, reading) : reading;
      } catch (error) {
        outcomes[i] = this.#failed(offsets[i]!, error);
      }
    }
    return outcomes;
  }

  /** A read's failure as read throws it (a failure that is not the system's, a bug, as it is). */
  #failed(offsetBytes: number, error: unknown): Error {
    try {
      return fromSystemError(error, `read of snapshot ${this.name} at ${offsetBytes}`);
    } catch (other) {
      return other as Error;
    }
  }

  #later(offsetBytes: number, reading: Promise<ChunkLookup>): Promise<ChunkLookup> {
    return reading.catch((error: unknown) => {
      throw fromSystemError(error, `read of snapshot ${this.name} at ${offsetBytes}`);
    });
  }

  write(): Promise<void> {
    return refuseWrite();
  }

  trim(): Promise<void> {
    return refuseWrite();
  }

  writeZeroes(): Promise<void> {
    return refuseWrite();
  }

  async flush(): Promise<void> {}

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    assertRange(offsetBytes, lengthBytes, this.sizeBytes);
    return blockStatusOfMap(this.#store, this.#snapshot.map, offsetBytes, lengthBytes);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#runtime.openCount -= 1;
  }
}

function refuseWrite(): Promise<void> {
  assert(false, 'a write reached a read-only snapshot: the NBD edge must refuse it');
}

function assertRange(offsetBytes: number, lengthBytes: number, sizeBytes: number): void {
  assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0 && Number.isSafeInteger(lengthBytes) && lengthBytes >= 0);
  assert(offsetBytes + lengthBytes <= sizeBytes, 'request past the end of the export');
}

/** The runs of a range of `map` with their checksums: at once when the catalog has them in memory (catalog-backend.ts). */
function lookup(store: VolumeStore, map: MapHandle, virtualChunk: number, chunkCount: number): ChunkLookup | Promise<ChunkLookup> {
  return store.metadata.lookup(map, virtualChunk, chunkCount);
}

/**
 * Reads target.length bytes at `offsetBytes` of `map`, verified (the chunk store's read of the map's lookup); the
 * lookup read through. At once (or a throw) when the lookup and the chunk store's read were done at once.
 */
function readThrough(store: VolumeStore, exportName: string, map: MapHandle, offsetBytes: number, target: Buffer): ChunkLookup | Promise<ChunkLookup> {
  const first = Math.floor(offsetBytes / chunkSizeBytes);
  const lookedUp = lookup(store, map, first, Math.ceil((offsetBytes + target.length) / chunkSizeBytes) - first);
  if (lookedUp instanceof Promise) return lookedUp.then((found) => readFound(store, exportName, found, offsetBytes, target));
  return readFound(store, exportName, lookedUp, offsetBytes, target);
}

/** readThrough as a promise always (a throw becomes its rejection), for callers that wait on several together. */
async function readThroughLater(store: VolumeStore, exportName: string, map: MapHandle, offsetBytes: number, target: Buffer): Promise<ChunkLookup> {
  return readThrough(store, exportName, map, offsetBytes, target);
}

function readFound(store: VolumeStore, exportName: string, found: ChunkLookup, offsetBytes: number, target: Buffer): ChunkLookup | Promise<ChunkLookup> {
  const reading = store.chunks.read(exportName, found, offsetBytes, target);
  return reading === undefined ? found : reading.then(() => found);
}

/** The physically contiguous pieces the runs of a lookup make (0 when one is a hole). */
export function physicalPieces(runs: readonly ChunkRun[]): number {
  let pieces = 0;
  for (let i = 0; i < runs.length; i++) {
    const run = runs[i]!;
    if (run.physicalChunk < 0) return 0;
    const before = runs[i - 1];
    if (before === undefined || run.physicalChunk !== before.physicalChunk + before.chunkCount) pieces += 1;
  }
  return pieces;
}

/** The physical chunk and checksum of each chunk of a lookup with no hole, taken now (a lookup's sumOf may read live tables). */
interface MappedChunks {
  physical: Float64Array;
  sums: Uint32Array;
}

function chunksOf(found: ChunkLookup): MappedChunks {
  let count = 0;
  for (const run of found.runs) count += run.chunkCount;
  const physical = new Float64Array(count);
  const sums = new Uint32Array(count);
  let index = 0;
  for (const run of found.runs) {
    for (let i = 0; i < run.chunkCount; i++) {
      physical[index] = run.physicalChunk < 0 ? -1 : run.physicalChunk + i;
      sums[index++] = run.physicalChunk < 0 ? 0 : found.sumOf(run, i);
    }
  }
  return { physical, sums };
}

/** Whether two looks at one range found the same physical chunks with the same checksums. */
function sameChunks(a: MappedChunks, b: MappedChunks): boolean {
  if (a.physical.length !== b.physical.length) return false;
  for (let i = 0; i < a.physical.length; i++) if (a.physical[i] !== b.physical[i] || a.sums[i] !== b.sums[i]) return false;
  return true;
}

/** The allocation map of [offsetBytes, offsetBytes + lengthBytes): holes (zero) and data, merged. */
async function blockStatusOfMap(store: VolumeStore, map: MapHandle, offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
  assert(lengthBytes > 0);
  const first = Math.floor(offsetBytes / chunkSizeBytes);
  const extents: Extent[] = [];
  for (const run of (await lookup(store, map, first, Math.ceil((offsetBytes + lengthBytes) / chunkSizeBytes) - first)).runs) {
    const [start, end] = clip(run, offsetBytes, lengthBytes);
    const hole = run.physicalChunk < 0;
    const last = extents[extents.length - 1];
    if (last !== undefined && last.hole === hole) {
      last.lengthBytes += end - start;
      continue;
    }
    if (extents.length === blockStatusExtentsMax) break;
    extents.push({ lengthBytes: end - start, hole, zero: hole });
  }
  return extents;
}


/** The bytes of `run` inside the request [offsetBytes, offsetBytes + lengthBytes), as absolute offsets. */
function clip(run: ChunkRun, offsetBytes: number, lengthBytes: number): [number, number] {
  const start = Math.max(offsetBytes, run.virtualChunk * chunkSizeBytes);
  const end = Math.min(offsetBytes + lengthBytes, (run.virtualChunk + run.chunkCount) * chunkSizeBytes);
  return [start, end];
}

/** The writes' chunk sums in their order as one array, when every write has them (Volume.writeMany), else undefined. */
function joinedSums(writes: ReadonlyArray<{ data: Buffer; sums?: Uint32Array }>, chunkCount: number): Uint32Array | undefined {
  if (!writes.every((write) => write.sums !== undefined)) return undefined;
  const sums = new Uint32Array(chunkCount);
  let at = 0;
  for (const { data, sums: given } of writes) {
    assert(given!.length === data.length / chunkSizeBytes, 'given checksums: one for each chunk');
    sums.set(given!, at);
    at += given!.length;
  }
  return sums;
}
