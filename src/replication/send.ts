// The sending side of a replication stream (the format: stream-format.ts). What changed is found from metadata
// (the snapshot diff; a full stream is a diff against an empty volume), and only those chunks are read, through
// the chunk store's verified read: a chunk that fails its checksum stops the stream with an ABORT record naming
// the extent, so damaged bytes are never shipped. Reads go a record (at most 1 MiB) at a time, several ahead (small
// ones a batch at a time, read together where they lie side by side on disk), and the records are
// yielded to a consumer that applies backpressure (the API's HTTP response), so memory stays bounded.
//
// Reads land in shared memory, so that a chunk I/O worker reads and verifies in place (store/worker-io.ts stages
// any other buffer through a copy). A consumer that says when it is done with a record's bytes (recycle(), the
// replicator once the peer has answered) has its read buffers reused, so a long stream allocates a few buffers,
// not one per record; a consumer that does not leaves them to the garbage collector.
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, inlineReadBytesMax, sendArenasFreeMax, sendGatheredReadBytesMax, sendReadAheadBytes, sendReadsAheadMax, sendSmallReadsAheadMax, streamDataRecordBytesMax } from '../core/limits.ts';
import type { ChunkLookup } from '../store/catalog-backend.ts';
import { combinedChecksum, zeroChunkSum } from '../store/checksum.ts';
import { isZero } from '../store/frames.ts';
import type { ChangedExtent } from '../store/map-diff.ts';
import type { Pool } from '../store/pool.ts';
import { dataRecordDataStart, dataRecordOverheadBytes, decodeResumeToken, encodeAbort, encodeData, encodeEnd, encodeHeader, encodeZero, sealDataRecord, type StreamHeader } from './stream-format.ts';
import type { Log } from '../core/log.ts';

/** What a sender needs of a pool. */
export type SendSource = Pick<Pool, 'snapshotInfo' | 'diff' | 'contentDigest' | 'openSnapshot' | 'findSnapshot'>;

export interface SendRequest {
  volume: string;
  snapshot: string;
  /** The base snapshot's name for an incremental stream, or null for a full one. */
  from: string | null;
  resumeOffsetBytes: number;
}

/** A stream ready to go: its header (for the caller's progress), and its bytes. */
export interface PreparedSend {
  header: StreamHeader;
  /** The stream's records, each as the buffers to write in order; after an ABORT record it ends, and `failure` says why. */
  records: AsyncGenerator<Buffer[]>;
  /**
   * The same records, several at a time (those ready together, in order): for a consumer that frames them itself
   * (the replicator), at a promise per batch rather than per record. Iterate this or `records`, not both.
   */
  batches: AsyncGenerator<Buffer[][]>;
  failure(): ChunkdError | null;
  /** Bytes of the changed extents (data and zeros) the records yielded so far cover: progress against header.dataBytes. */
  coveredBytes(): number;
  /** The consumer is done with these records' bytes (each record once): their read buffers may be reused. */
  recycle(records: Buffer[][]): void;
}

/** Turns a resume token into the request it continues (the snapshots found by id). */
export function resumeRequest(source: SendSource, tokenText: string): SendRequest {
  const token = decodeResumeToken(tokenText);
  const target = source.findSnapshot(token.target);
  if (target === null) throw ChunkdError.notFound(`no snapshot with id ${token.target} on this node: the token is for a stream from another node or snapshot`);
  let from: string | null = null;
  if (token.base !== null) {
    const base = source.findSnapshot(token.base, target.volume);
    if (base === null) throw ChunkdError.notFound(`the token's base snapshot (id ${token.base}) is not a snapshot of ${target.volume} on this node`);
    from = base.snapshot;
  }
  return { volume: target.volume, snapshot: target.snapshot, from, resumeOffsetBytes: token.offsetBytes };
}

/** Checks the request and plans the stream; errors here come before any byte is sent. */
export async function prepareSend(source: SendSource, request: SendRequest, log: Log): Promise<PreparedSend> {
  const target = source.snapshotInfo(request.volume, request.snapshot);
  const base = request.from === null ? null : source.snapshotInfo(request.volume, request.from);
  if (base !== null && base.uuid === target.uuid) throw ChunkdError.invalid(`the base and the target are both ${request.volume}@${request.snapshot}`);
  if (request.resumeOffsetBytes % chunkSizeBytes !== 0 || request.resumeOffsetBytes > target.sizeBytes) {
    throw ChunkdError.invalid(`resume offset ${request.resumeOffsetBytes} is not inside ${request.volume}@${request.snapshot}`);
  }
  const extents = clipExtents(await source.diff(request.volume, request.from, request.snapshot), request.resumeOffsetBytes, target.sizeBytes);
  const header: StreamHeader = {
    volumeSizeBytes: target.sizeBytes,
    base: base === null ? null : { uuid: base.uuid, name: base.name },
    target: { uuid: target.uuid, name: target.name },
    resumeOffsetBytes: request.resumeOffsetBytes,
    dataBytes: extents.reduce((sum, extent) => sum + extent.lengthBytes, 0),
  };
  return new SendStream(source, request, header, extents, log);
}

/**
 * A prepared stream's state and its steps, as one object whose methods are the same functions for every stream.
 * They were closures made anew by each prepareSend: every replication cycle's stream had its own generator (a map
 * of its own for the generator objects, which the replicator's framing loop met as a new map each cycle) and its own
 * helpers (a new call target at each call site), so V8 threw the optimized code of the stream's loops away and
 * compiled them again every cycle: about 2 µs of the owner's CPU per client write in the capped 4 KiB row,
 * on V8's compiler threads (BENCHMARKS.md, issue 14).
 */
class SendStream implements PreparedSend {
  readonly header: StreamHeader;
  readonly batches: AsyncGenerator<Buffer[][]>;
  readonly records: AsyncGenerator<Buffer[]>;
  readonly #source: SendSource;
  readonly #request: SendRequest;
  readonly #extents: Array<{ offsetBytes: number; lengthBytes: number }>;
  readonly #log: Log;
  #failure: ChunkdError | null = null;
  #coveredBytes = 0;
  // Read buffers (shared memory) by their memory: the data records yielded from each and not yet recycled.
  readonly #users = new Map<ArrayBufferLike, { buffer: Buffer; records: number }>();
  readonly #free: Buffer[] = [];
  // A read small enough to be done on this thread (worker-io.ts) gains nothing from shared memory (a random
  // writer's scattered chunks): it goes straight into the middle of its own record, carved from an arena, and
  // the record is sealed in place (sealDataRecord): one buffer per record, not four, and no allocation of its own.
  // An arena is reused once nothing holds a part of it: `holds` counts its reads not yet looked at and its records
  // yielded and not yet recycled; a used-up arena whose holds fall to zero goes back to `#freeArenas`. Each arena
  // fresh from the allocator was 1 MiB of external memory per 250 records, and the major collections that brings
  // were a good part of the sender's CPU (BENCHMARKS.md, issue 14).
  readonly #arenas = new Map<ArrayBufferLike, SendArena>();
  readonly #freeArenas: Buffer[] = [];
  #arena: SendArena | null = null;
  #arenaUsed = 0;
  // The reads in flight (#readAhead), their source, and their bytes.
  readonly #reads: PendingRead[] = [];
  #pieces: Generator<{ offset: number; length: number; extent: { offsetBytes: number; lengthBytes: number } }> | null = null;
  #device: ReturnType<SendSource['openSnapshot']> | null = null;
  #readingBytes = 0;
  /** Reads of at most sendGatheredReadBytesMax in #reads (read a batch at a time: #readAhead). */
  #smallAhead = 0;
  /**
   * How many of those may be ahead: sendSmallReadsAheadMax once the last batch came wholly from the page cache,
   * else (at the start, and while reads wait on the disk) sendReadsAheadMax, so that a cold stream keeps no more
   * reads queued on libuv's pool, beside the clients' writes and flushes, than a read ahead one at a time did.
   */
  #smallLimit = sendReadsAheadMax;
  #digest: Promise<Buffer> | undefined;

  constructor(source: SendSource, request: SendRequest, header: StreamHeader, extents: Array<{ offsetBytes: number; lengthBytes: number }>, log: Log) {
    this.#source = source;
    this.#request = request;
    this.header = header;
    this.#extents = extents;
    this.#log = log;
    this.batches = this.#batches();
    this.records = this.#records();
  }

  failure(): ChunkdError | null {
    return this.#failure;
  }

  coveredBytes(): number {
    return this.#coveredBytes;
  }

  recycle(records: Buffer[][]): void {
    for (const record of records) {
      for (const piece of record) {
        const held = this.#arenas.get(piece.buffer);
        if (held !== undefined) {
          this.#letGoArena(held, 1);
          break;
        }
        const user = this.#users.get(piece.buffer);
        if (user === undefined) continue;
        user.records -= 1;
        if (user.records === 0) {
          this.#users.delete(piece.buffer);
          this.#giveBack(user.buffer);
        }
        break;
      }
    }
  }

  async *#records(): AsyncGenerator<Buffer[]> {
    for await (const batch of this.batches) yield* batch;
  }

  // Bigger reads land in shared memory, in the middle of a buffer with room for their record's head and CRC around
  // them, so that a record of data with no zero chunk is sealed in place (sealDataRecord) and goes to the socket as
  // one buffer: one TLS write of it, not three (head, data, tail; BENCHMARKS.md, issue 14). Only whole-record
  // buffers are reused (a full stream is made of them), so none holds more than it reads.
  #takeBuffer(length: number): Buffer {
    if (length < streamDataRecordBytesMax) return Buffer.from(new SharedArrayBuffer(length + dataRecordOverheadBytes));
    return this.#free.pop() ?? Buffer.from(new SharedArrayBuffer(streamDataRecordBytesMax + dataRecordOverheadBytes));
  }

  #giveBack(buffer: Buffer): void {
    if (buffer.buffer instanceof SharedArrayBuffer && buffer.length === streamDataRecordBytesMax + dataRecordOverheadBytes && this.#free.length < sendReadsAheadMax) this.#free.push(buffer);
  }

  #letGoArena(held: SendArena, count: number): void {
    held.holds -= count;
    if (held.holds > 0 || !held.usedUp) return;
    this.#arenas.delete(held.bytes.buffer);
    if (this.#freeArenas.length < sendArenasFreeMax) this.#freeArenas.push(held.bytes);
  }

  #takeRecord(length: number): Buffer {
    const bytes = length + dataRecordOverheadBytes;
    let arena = this.#arena;
    if (arena === null || arena.bytes.length - this.#arenaUsed < bytes) {
      if (arena !== null) {
        arena.usedUp = true;
        this.#letGoArena(arena, 0);
      }
      const memory = (bytes <= streamDataRecordBytesMax ? this.#freeArenas.pop() : undefined) ?? Buffer.allocUnsafe(Math.max(bytes, streamDataRecordBytesMax));
      arena = { bytes: memory, holds: 0, usedUp: false };
      this.#arena = arena;
      this.#arenas.set(memory.buffer, arena);
      this.#arenaUsed = 0;
    }
    this.#arenaUsed += bytes;
    arena.holds += 1;
    return arena.bytes.subarray(this.#arenaUsed - bytes, this.#arenaUsed);
  }

  // Reads run a few records ahead of what is yielded, so the disk works while the consumer sends. A read the page
  // cache answers is done at once (readNowOrLater: no promise); one that waits on the disk settles later. Reads of
  // a few chunks (a random writer's scattered ones) go a batch at a time, once half of those ahead were used, read
  // together in order of their place on disk (readManyNowOrLater): a cycle's chunks were written close together
  // in time, so in a batch of a thousand about half lie next to another of it, and are read with it in one call
  // (BENCHMARKS.md, issue 14); a read ahead one at a time found almost none.
  #readAhead(): void {
    const reads = this.#reads;
    // A batch at a time: once half of those ahead were used, or half of their bytes (reads of 8-16 KiB fill the
    // bytes' bound before the count's, and would otherwise be read a batch of one at a time).
    if (this.#smallAhead > this.#smallLimit / 2 || (this.#smallAhead > 0 && this.#readingBytes > sendReadAheadBytes / 2)) return;
    const gathered: PendingRead[] = [];
    // Bounded by bytes, not only by count, so that scattered 4 KiB extents keep as much in flight as big ones.
    while (reads.length - this.#smallAhead < sendReadsAheadMax && this.#smallAhead < this.#smallLimit && this.#readingBytes < sendReadAheadBytes) {
      const next = this.#pieces!.next();
      if (next.done === true) break;
      const { offset, length, extent } = next.value;
      const shared = length <= inlineReadBytesMax ? null : this.#takeBuffer(length);
      const record = shared === null ? this.#takeRecord(length) : shared;
      const buffer = record.subarray(dataRecordDataStart, dataRecordDataStart + length);
      this.#readingBytes += length;
      // The error is kept and looked at in order, when the piece's turn comes.
      const read: PendingRead = { offset, extent, buffer, record, shared, settled: false, error: null, done: null, found: null };
      reads.push(read);
      if (length <= sendGatheredReadBytesMax) {
        this.#smallAhead += 1;
        gathered.push(read);
        continue;
      }
      try {
        settle(read, this.#device!.readNowOrLater(offset, buffer));
      } catch (error) {
        read.error = error;
        read.settled = true;
      }
    }
    if (gathered.length === 0) return;
    const outcomes = this.#device!.readManyNowOrLater(
      gathered.map((read) => read.offset),
      gathered.map((read) => read.buffer),
    );
    let cached = true;
    for (let i = 0; i < gathered.length; i++) {
      settle(gathered[i]!, outcomes[i]!);
      if (!gathered[i]!.settled) cached = false;
    }
    this.#smallLimit = cached ? sendSmallReadsAheadMax : sendReadsAheadMax;
  }

  // The END record's digest is computed while the stream goes (a snapshot's map does not change), once a read
  // ahead's worth of data is out: computed before the header, it held the whole stream back (0.2-1.6 s for 4 GiB
  // on a busy machine); at that point the peer has records to write while this thread digests. Its failure
  // (metadata that cannot be read) ends the stream before its END, as a cut link does.
  #startDigest(): Promise<Buffer> {
    if (this.#digest === undefined) {
      this.#digest = this.#source.contentDigest(this.#request.volume, this.#request.snapshot);
      this.#digest.catch(() => {}); // looked at before the END; a consumer that stops early never asks
    }
    return this.#digest;
  }

  async *#batches(): AsyncGenerator<Buffer[][]> {
    const request = this.#request;
    const exportName = `${request.volume}@${request.snapshot}`;
    yield [[encodeHeader(this.header)]];
    let recordCount = 1;
    let dataBytes = 0;
    this.#device = this.#source.openSnapshot(request.volume, request.snapshot);
    this.#pieces = recordPieces(this.#extents);
    const reads = this.#reads;
    // Records go out a batch at a time: what is ready, up to a bound (so that coveredBytes runs little ahead of
    // what the consumer has framed), and at once before waiting on a read that went to the disk.
    let batch: Buffer[][] = [];
    let batchBytes = 0;
    try {
      this.#readAhead();
      for (let read = reads.shift(); read !== undefined; read = reads.shift()) {
        if (!read.settled) {
          if (batch.length > 0) {
            yield batch;
            batch = [];
            batchBytes = 0;
          }
          await read.done;
        }
        const error = read.error;
        if (error !== null) {
          if (!(error instanceof ChunkdError)) throw error;
          const failure = ChunkdError.io(
            `send of ${exportName} stopped: the extent at byte ${read.extent.offsetBytes} of ${read.extent.lengthBytes} bytes could not be read intact ` +
              `(${error.message}); nothing damaged was sent`,
          );
          this.#failure = failure;
          this.#log(failure.message);
          batch.push([encodeAbort(failure.message)]);
          yield batch;
          return;
        }
        this.#readingBytes -= read.buffer.length;
        if (read.buffer.length <= sendGatheredReadBytesMax) this.#smallAhead -= 1;
        this.#readAhead();
        const { offset, buffer, shared } = read;
        // Runs of zero chunks go as ZERO records (the receiver unmaps them), the rest as DATA.
        if (!mayHoldZeroChunk(read.found, buffer)) {
          // The read's hold on its arena (or its shared buffer) becomes the record's, until the consumer recycles it.
          if (shared !== null) this.#users.set(shared.buffer, { buffer: shared, records: 1 });
          recordCount += 1;
          this.#coveredBytes += buffer.length;
          dataBytes += buffer.length;
          // Its CRC appended to the head's from the checksums the read verified: the data is not gone over again.
          const record = shared === null ? read.record : read.record.subarray(0, buffer.length + dataRecordOverheadBytes);
          batch.push([sealDataRecord(record, offset, read.found === null ? undefined : dataChecksum(read.found, buffer.length / chunkSizeBytes))]);
          batchBytes += record.length;
          if (this.#coveredBytes >= sendReadAheadBytes) this.#startDigest();
          if (batch.length >= batchRecordsMax || batchBytes >= batchBytesMax) {
            yield batch;
            batch = [];
            batchBytes = 0;
          }
          continue;
        }
        const runs = zeroRuns(buffer);
        const dataRuns = runs.filter((run) => !run.zero).length;
        const held = shared !== null ? undefined : this.#arenas.get(read.record.buffer);
        if (held !== undefined) {
          // Its data records hold the arena instead of the read.
          held.holds += dataRuns;
          this.#letGoArena(held, 1);
        } else if (shared !== null) {
          if (dataRuns === 0) this.#giveBack(shared);
          else this.#users.set(shared.buffer, { buffer: shared, records: dataRuns });
        }
        for (const run of runs) {
          recordCount += 1;
          this.#coveredBytes += run.end - run.start;
          if (run.zero) {
            batch.push([encodeZero(offset + run.start, run.end - run.start)]);
          } else {
            dataBytes += run.end - run.start;
            batch.push(encodeData(offset + run.start, buffer.subarray(run.start, run.end)));
            batchBytes += run.end - run.start;
          }
        }
        if (this.#coveredBytes >= sendReadAheadBytes) this.#startDigest();
        if (batch.length >= batchRecordsMax || batchBytes >= batchBytesMax) {
          yield batch;
          batch = [];
          batchBytes = 0;
        }
      }
      batch.push([encodeEnd(recordCount, dataBytes, await this.#startDigest())]);
      yield batch;
    } finally {
      // Reads still running when the consumer stopped early must end before the device closes.
      await Promise.all(reads.map((read) => read.done));
      await this.#digest?.catch(() => {});
      await this.#device.close();
    }
  }
}

/** Records a batch holds at most, and their bytes (prepareSend's batches): a few frames' worth of small records. */
const batchRecordsMax = 64;
const batchBytesMax = 256 * 1024;

/** A read of prepareSend's read-ahead: settled at once when the page cache answered it, else when `done` resolves. */
interface PendingRead {
  offset: number;
  extent: { offsetBytes: number; lengthBytes: number };
  buffer: Buffer;
  /** The record the read lands in (its data part is `buffer`; for a big read, from the start of `shared`, as long as it may be). */
  record: Buffer;
  /** A big read's buffer of its own in shared memory (reused once recycled), or null for a small read carved from an arena. */
  shared: Buffer | null;
  settled: boolean;
  /** Why the read failed, once settled; null if it did not. */
  error: unknown;
  done: Promise<void> | null;
  /** What the read looked up (the chunks' recorded checksums), once it settled without an error. */
  found: ChunkLookup | null;
}

/** Records what a read gave (readNowOrLater's, or its failure): settled now, or once its promise settles. */
function settle(read: PendingRead, reading: ChunkLookup | Promise<ChunkLookup> | Error): void {
  if (reading instanceof Promise) {
    read.done = reading.then(
      (found) => {
        read.found = found;
        read.settled = true;
      },
      (error: unknown) => {
        read.error = error;
        read.settled = true;
      },
    );
    return;
  }
  if (reading instanceof Error) read.error = reading;
  else read.found = reading;
  read.settled = true;
}

/**
 * The combined recorded checksum of a lookup's `chunkCount` chunks in order (combinedChecksum's), or undefined if
 * one is a hole or the runs do not cover exactly that many (the record is then checksummed over its bytes).
 */
function dataChecksum(found: ChunkLookup, chunkCount: number): number | undefined {
  const runs = found.runs;
  if (runs.length === 1 && runs[0]!.chunkCount === 1) return runs[0]!.physicalChunk < 0 || chunkCount !== 1 ? undefined : found.sumOf(runs[0]!, 0);
  let count = 0;
  for (const run of runs) {
    if (run.physicalChunk < 0) return undefined;
    count += run.chunkCount;
  }
  if (count !== chunkCount) return undefined;
  const sums = new Uint32Array(count);
  let index = 0;
  for (const run of runs) for (let i = 0; i < run.chunkCount; i++) sums[index++] = found.sumOf(run, i);
  return combinedChecksum(sums, 0, count);
}

/** The pieces of at most one record each that the extents are read in, in order. */
function* recordPieces(extents: Array<{ offsetBytes: number; lengthBytes: number }>): Generator<{ offset: number; length: number; extent: { offsetBytes: number; lengthBytes: number } }> {
  for (const extent of extents) {
    for (let offset = extent.offsetBytes; offset < extent.offsetBytes + extent.lengthBytes; offset += streamDataRecordBytesMax) {
      yield { offset, length: Math.min(streamDataRecordBytesMax, extent.offsetBytes + extent.lengthBytes - offset), extent };
    }
  }
}

/** The diff's extents in bytes, from `fromBytes` on (a resume), and inside the target's size. */
function clipExtents(changed: ChangedExtent[], fromBytes: number, sizeBytes: number): Array<{ offsetBytes: number; lengthBytes: number }> {
  const out: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  for (const extent of changed) {
    const start = Math.max(fromBytes, extent.virtualChunk * chunkSizeBytes);
    const end = Math.min(sizeBytes, (extent.virtualChunk + extent.chunkCount) * chunkSizeBytes);
    if (start < end) out.push({ offsetBytes: start, lengthBytes: end - start });
  }
  return out;
}

/**
 * Whether a chunk of a read may be all zeros: a chunk of zeros has zeroChunkSum for its CRC, and the read verified
 * each chunk against the checksum its lookup recorded, so only a read that has a chunk with that checksum, or a hole
 * (read as zeros), is scanned (hasZeroChunk); a read without its lookup is scanned whole. The scan of every chunk was
 * 0.2-0.3 µs per 4 KiB chunk sent (a view and a native compare each). With reads not verified (--verify-reads
 * off), a chunk whose bytes lost their checksum's goes as data whatever it holds, sealed from that checksum, and
 * the receiver refuses the stream as damaged (sealDataRecord).
 */
function mayHoldZeroChunk(found: ChunkLookup | null, buffer: Buffer): boolean {
  if (found === null) return hasZeroChunk(buffer);
  for (const run of found.runs) {
    if (run.physicalChunk < 0) return true;
    for (let i = 0; i < run.chunkCount; i++) if (found.sumOf(run, i) === zeroChunkSum) return hasZeroChunk(buffer);
  }
  return false;
}

/** Whether any whole chunk of the buffer is all zeros. */
function hasZeroChunk(buffer: Buffer): boolean {
  for (let start = 0; start < buffer.length; start += chunkSizeBytes) if (isZero(buffer, start, start + chunkSizeBytes)) return true;
  return false;
}

/** The buffer's whole chunks as alternating runs of zero and non-zero chunks. */
function zeroRuns(buffer: Buffer): Array<{ start: number; end: number; zero: boolean }> {
  const runs: Array<{ start: number; end: number; zero: boolean }> = [];
  for (let start = 0; start < buffer.length; start += chunkSizeBytes) {
    const zero = isZero(buffer, start, start + chunkSizeBytes);
    const last = runs[runs.length - 1];
    if (last !== undefined && last.zero === zero) last.end = start + chunkSizeBytes;
    else runs.push({ start, end: start + chunkSizeBytes, zero });
  }
  return runs;
}

/** A buffer records are carved from (prepareSend's takeRecord): the parts not yet given back, and whether it is full. */
interface SendArena {
  bytes: Buffer;
  holds: number;
  usedUp: boolean;
}
