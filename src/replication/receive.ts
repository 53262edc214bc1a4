// The receiving side of a replication stream (the format: stream-format.ts).
//
// A receive goes into a volume: a full stream creates it, an incremental needs it to hold a snapshot whose id is
// the stream's base and no change since that snapshot. While the receive runs, and until it completes or is
// aborted, clients cannot open or change the volume (Pool.beginReceive). Extents are written as they arrive;
// the snapshot is taken, with the sender's name and id, only once the END record's counts match and its content
// digest equals the digest of what this node stored. So the snapshot appears complete or not at all.
//
// Resume state, one file per volume, <pool>/receive/<volume>.json, written whole (temporary file, fdatasync,
// rename, directory sync): the stream's base and target, and `offsetBytes`, below which every extent is applied
// and committed. Order that keeps it true across a crash or kill -9 at any moment:
//   1. before anything is applied: the state at its start offset (written before a full stream creates its
//      volume, so a state without its volume means the creation never happened: the state is dropped at start);
//   2. every limits.receiveCommitBytes of stream, and when the stream stops: commit the volume's writes, then
//      write the state with the new offset (the state never runs ahead of durable data; it may lag, and then a
//      resume sends again what came after it, written again with the same bytes);
//   3. at the END: digest checked, snapshot taken and committed, then the state removed (a state whose target
//      snapshot exists is a completed receive: dropped at start).
// A stream that stops early (cut off, the sender killed, or an ABORT from the sender) keeps what arrived, for a
// resume. A stream that is damaged (a record fails its checksum, the counts or the digest do not match) is
// refused whole: a full receive removes the volume it created, an incremental rolls the volume back to its base,
// and nothing appears.
import fs from 'node:fs';
import path from 'node:path';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import { receiveBatchRecordBytesMax, receiveCommitBytes, receiveWritesInFlightMax, streamDataRecordBytesMax } from '../core/limits.ts';
import { checkName } from '../core/names.ts';
import { formatSize } from '../core/units.ts';
import { isSnapshotUuid } from '../store/metadata.ts';
import type { Pool } from '../store/pool.ts';
import type { Volume } from '../store/volume.ts';
import { readStateFile, removeStateFile, writeStateFile } from './state-file.ts';
import { encodeResumeToken, StreamDecoder, type SnapshotRef, type StreamHeader } from './stream-format.ts';
import type { Log } from '../core/log.ts';

interface ReceiveState {
  volume: string;
  base: SnapshotRef | null;
  target: SnapshotRef;
  volumeSizeBytes: number;
  offsetBytes: number;
  /** A full stream made the volume; refusing the stream removes it. */
  createdVolume: boolean;
  /**
   * A full stream into an existing volume (a replica resent whole in a cluster: `replace`): the volume is emptied
   * first (trimmed whole, at offset 0), its snapshots stay; refusing the stream leaves it emptied or partly written.
   */
  replacing?: boolean;
}

export interface ReceiveResult {
  volume: string;
  snapshot: string;
  uuid: string;
  full: boolean;
  resumedFromBytes: number;
  streamBytes: number;
  dataBytes: number;
}

/** A stream that stopped before its end; what arrived is kept for a resume. */
class Interrupted extends Error {}

export class StreamReceiver {
  readonly #pool: Pool;
  readonly #directory: string;
  readonly #log: Log;
  readonly #active = new Set<string>();

  constructor(pool: Pool, log: Log) {
    this.#pool = pool;
    this.#directory = path.join(pool.directory, 'receive');
    this.#log = log;
  }

  /** At start: marks volumes with an interrupted receive (so clients cannot write them) and drops finished or stale states. */
  async restore(): Promise<void> {
    if (!fs.existsSync(this.#directory)) return;
    for (const file of fs.readdirSync(this.#directory)) {
      if (!file.endsWith('.json')) continue;
      const volume = file.slice(0, -'.json'.length);
      if (checkName(volume) !== null) continue;
      const state = await this.#load(volume);
      if (state === null) continue;
      if (!this.#pool.hasVolume(volume)) {
        this.#log(`receive into ${volume}: the volume does not exist (its creation never committed); its resume state is dropped`);
        await this.#remove(volume);
      } else if (this.#pool.findSnapshot(state.target.uuid, volume) !== null) {
        await this.#remove(volume);
      } else {
        this.#pool.beginReceive(volume);
        this.#log(`receive into ${volume} of ${state.target.name} is interrupted at byte ${state.offsetBytes}: resume it (chunkd receive --resume-token ${volume}) or abort it (chunkd receive --abort ${volume})`);
      }
    }
  }

  /** The resume token of the interrupted receive into `volume`. */
  async resumeToken(volume: string): Promise<{ token: string; volume: string; target: string; offsetBytes: number }> {
    const state = await this.#load(volume);
    if (state === null) throw ChunkdError.notFound(`volume ${volume} has no interrupted receive`);
    return { token: encodeResumeToken({ base: state.base?.uuid ?? null, target: state.target.uuid, offsetBytes: state.offsetBytes }), volume, target: state.target.name, offsetBytes: state.offsetBytes };
  }

  /** Whether a stream into `volume` is being applied now. */
  isActive(volume: string): boolean {
    return this.#active.has(volume);
  }

  /** What an interrupted receive into `volume` holds (for an owner that resumes it over the peer port), or null. */
  async interrupted(volume: string): Promise<{ base: string | null; target: string; offsetBytes: number } | null> {
    if (this.#active.has(volume)) return null;
    const state = await this.#load(volume);
    return state === null ? null : { base: state.base?.uuid ?? null, target: state.target.uuid, offsetBytes: state.offsetBytes };
  }

  /** Gives up an interrupted receive: what it brought is discarded (the volume removed, or rolled back to the base). */
  async abort(volume: string): Promise<{ aborted: string }> {
    if (this.#active.has(volume)) throw ChunkdError.busy(`a receive into ${volume} is running`);
    const state = await this.#load(volume);
    if (state === null) throw ChunkdError.notFound(`volume ${volume} has no interrupted receive`);
    await this.#discard(state);
    return { aborted: volume };
  }

  /**
   * Applies the stream in `body` to `volume`; see the note at the top for what a failure leaves. With `recycle`,
   * a piece of the body that held whole records is handed back once every write of its bytes is done (the peer
   * server reuses its frame buffers so); a piece the decoder still holds part of is left to the garbage collector.
   */
  async receive(volume: string, body: AsyncIterable<Buffer>, options: { recycle?: (piece: Buffer) => void; replace?: boolean } = {}): Promise<ReceiveResult> {
    if (this.#active.has(volume)) throw ChunkdError.busy(`a receive into ${volume} is already running`);
    this.#active.add(volume);
    try {
      return await this.#receive(volume, body, options.recycle ?? null, options.replace === true);
    } finally {
      this.#active.delete(volume);
    }
  }

  async #receive(volumeName: string, body: AsyncIterable<Buffer>, recycle: ((piece: Buffer) => void) | null, replace: boolean): Promise<ReceiveResult> {
    const decoder = new StreamDecoder();
    const input = body[Symbol.asyncIterator]();
    let pending: ReturnType<StreamDecoder['push']> = [];
    // The header decides everything else: read until it is whole.
    while (decoder.header === null) {
      const next = await input.next().catch((error: unknown) => {
        throw ChunkdError.protocol(`the stream was cut off before its header (${(error as Error).message})`);
      });
      if (next.done === true) throw ChunkdError.protocol(decoder.offsetBytes + decoder.trailingBytes === 0 ? 'the stream is empty' : 'the stream ends inside its header');
      pending = decoder.push(next.value);
    }
    const header = decoder.header;
    const state = await this.#start(volumeName, header, replace);
    let volume: Volume | null = null;
    let sinceCommitBytes = 0;
    let dataBytes = 0;
    // Writes of data records run several at once (extents never overlap), so the disk and the link overlap. A
    // resume point is made in the background while the stream goes on: it waits for the writes issued before it,
    // commits, then saves the offset they reach (never one past a write that failed). The END, and any stop,
    // wait for all of them.
    const writing = new Set<Promise<void>>();
    let writeFailure: unknown = null;
    let saving: Promise<void> = Promise.resolve();
    const drain = async (): Promise<void> => {
      await Promise.all(writing);
      await saving;
      if (writeFailure !== null) throw writeFailure;
    };
    const saveInBackground = (): void => {
      const before = [...writing];
      const reached: ReceiveState = { ...state };
      const previous = saving;
      sinceCommitBytes = 0;
      saving = (async () => {
        await previous;
        await Promise.all(before);
        if (writeFailure !== null || volume === null) return;
        await volume.flush();
        await this.#save(reached);
      })().catch((error: unknown) => {
        writeFailure ??= error;
      });
    };
    /** A resume point now: the one the background makes, waited for (throws what stopped it). */
    const checkpoint = async (): Promise<void> => {
      if (volume === null) return;
      saveInBackground();
      await drain();
    };
    // The piece `pending` came from, while it may be recycled: `holds` counts its writes in flight, plus one for
    // this loop until it has issued all of them.
    let piece: { bytes: Buffer; holds: number } | null = null;
    const letGo = (held: { bytes: Buffer; holds: number }): void => {
      held.holds -= 1;
      if (held.holds === 0) recycle!(held.bytes);
    };
    /**
     * Issues a write of `writtenBytes` bytes that ends at `endBytes` of the volume, several at once, and moves the
     * state's offset to its end: the offset a resume point saves never passes a write not yet issued. `from`: the
     * memory its bytes are in while it runs (null when they were copied), so that their piece is not reused before.
     */
    const issue = async (endBytes: number, writtenBytes: number, start: (target: Volume) => Promise<void>, from: ArrayBufferLike | null): Promise<void> => {
      while (writing.size >= receiveWritesInFlightMax) await Promise.race(writing);
      if (writeFailure !== null) throw writeFailure;
      const held = piece !== null && from === piece.bytes.buffer ? piece : null;
      if (held !== null) held.holds += 1;
      const write: Promise<void> = start(volume!).then(
        () => {
          writing.delete(write);
          if (held !== null) letGo(held);
        },
        (error: unknown) => {
          writing.delete(write);
          writeFailure ??= error;
        },
      );
      writing.add(write);
      state.offsetBytes = endBytes;
      sinceCommitBytes += writtenBytes;
      dataBytes += writtenBytes;
    };
    // Small data records waiting to be written together (in stream order: increasing, not overlapping).
    let batch: Array<{ offsetBytes: number; data: Buffer; sums?: Uint32Array }> = [];
    let batchBytes = 0;
    const writeBatch = async (): Promise<void> => {
      if (batch.length === 0) return;
      const extents = batch;
      const last = extents[extents.length - 1]!;
      const bytes = batchBytes;
      batch = [];
      batchBytes = 0;
      // writeMany copies the bytes before its first await: the piece they are in may be reused at once.
      await issue(last.offsetBytes + last.data.length, bytes, (target) => target.writeMany(extents), null);
    };
    try {
      volume = this.#pool.openVolumeForReceive(volumeName);
      // A replaced volume starts empty: its old content goes (its snapshots keep theirs) before the first extent.
      if (state.replacing === true && header.resumeOffsetBytes === 0) await volume.trim(0, header.volumeSizeBytes);
      let ended = false;
      for (;;) {
        for (const record of pending) {
          if (record.type !== 'data') await writeBatch();
          switch (record.type) {
            case 'header':
              break;
            case 'data': {
              // Small records (a random writer's scattered 4 KiB chunks) are gathered and written together,
              // one fresh run and one write for many (Volume.writeMany); big ones go as they are, uncopied.
              if (record.data.length < receiveBatchRecordBytesMax) {
                // A batch stays within one record's size, which Volume.writeMany gathers in a buffer it keeps.
                if (batchBytes + record.data.length > streamDataRecordBytesMax) await writeBatch();
                // With the chunks' sums the decoder checked the record's CRC from: the volume records them, not summed again.
                batch.push({ offsetBytes: record.offsetBytes, data: record.data, sums: record.sums });
                batchBytes += record.data.length;
                if (batchBytes >= streamDataRecordBytesMax) await writeBatch();
                break;
              }
              await writeBatch();
              await issue(record.offsetBytes + record.data.length, record.data.length, (target) => target.write(record.offsetBytes, record.data, { sums: record.sums }), record.data.buffer);
              break;
            }
            case 'zero':
              await volume.trim(record.offsetBytes, record.lengthBytes);
              state.offsetBytes = record.offsetBytes + record.lengthBytes;
              break;
            case 'abort':
              throw new Interrupted(`the sender stopped: ${record.message}`);
            case 'end': {
              await drain();
              await volume.flush();
              const digest = await this.#pool.contentDigest(volumeName, null);
              if (!digest.equals(record.digest)) {
                throw ChunkdError.corrupt(`the content received into ${volumeName} does not match the stream's digest of ${header.target.name} (${record.digest.toString('hex').slice(0, 16)}..., stored ${digest.toString('hex').slice(0, 16)}...)`);
              }
              ended = true;
              break;
            }
          }
        }
        if (ended) break;
        await writeBatch();
        if (piece !== null) letGo(piece);
        piece = null;
        if (sinceCommitBytes >= receiveCommitBytes) saveInBackground();
        let next: IteratorResult<Buffer>;
        try {
          next = await input.next();
        } catch (error) {
          throw new Interrupted(`the stream was cut off (${(error as Error).message})`);
        }
        if (next.done === true) throw new Interrupted(`the stream ended after ${decoder.offsetBytes + decoder.trailingBytes} bytes, before its end record`);
        pending = decoder.push(next.value);
        if (recycle !== null && decoder.trailingBytes === 0) piece = { bytes: next.value, holds: 1 };
      }
      await drain();
      const finished = volume;
      volume = null;
      await finished.close();
      const snapshot = await this.#pool.receiveSnapshot(volumeName, header.target.name, header.target.uuid);
      await this.#remove(volumeName);
      this.#pool.endReceive(volumeName);
      this.#log(`received ${volumeName}@${snapshot.name} (id ${snapshot.uuid}): ${formatSize(decoder.offsetBytes)} of stream`);
      return { volume: volumeName, snapshot: snapshot.name, uuid: snapshot.uuid, full: header.base === null, resumedFromBytes: header.resumeOffsetBytes, streamBytes: decoder.offsetBytes, dataBytes };
    } catch (error) {
      if (error instanceof Interrupted) {
        await checkpoint().catch((failure: unknown) => this.#log(`receive into ${volumeName}: saving what arrived failed: ${(failure as Error).message}`, 'warn'));
        await volume?.close();
        throw ChunkdError.protocol(
          `receive into ${volumeName} interrupted: ${error.message}; what arrived up to byte ${state.offsetBytes} of the volume is kept: ` +
            `continue with chunkd send --resume $(chunkd receive --resume-token ${volumeName}), or give up with chunkd receive --abort ${volumeName}`,
        );
      }
      await Promise.all(writing);
      await saving;
      await volume?.close();
      if (error instanceof ChunkdError && (error.code === 'ECORRUPT' || error.code === 'EPROTO')) {
        await this.#discard(state);
        throw new ChunkdError(error.code, `${error.message}; the stream is refused and nothing of it was kept`);
      }
      // A failure of this node (a full or failed disk): keep what is durable, for a resume once it is fixed. The
      // state moves on only if the writes before the failure commit.
      await checkpoint().catch(() => {});
      throw error;
    }
  }

  /** Checks the header against the volume (and any interrupted receive), marks the volume, and returns the state to keep. */
  async #start(volumeName: string, header: StreamHeader, replace: boolean): Promise<ReceiveState> {
    const pool = this.#pool;
    const what = `${header.base === null ? 'a full stream' : `an incremental stream from ${header.base.name} (id ${header.base.uuid})`} of ${header.target.name} (id ${header.target.uuid})`;
    const existing = await this.#load(volumeName);
    if (existing !== null) {
      if (existing.target.uuid !== header.target.uuid || existing.base?.uuid !== header.base?.uuid) {
        throw ChunkdError.busy(`volume ${volumeName} has an interrupted receive of ${existing.target.name} (id ${existing.target.uuid}), not ${what}: resume it (chunkd receive --resume-token ${volumeName}) or abort it (chunkd receive --abort ${volumeName})`);
      }
      if (header.resumeOffsetBytes > existing.offsetBytes) {
        throw ChunkdError.invalid(`the stream resumes at byte ${header.resumeOffsetBytes}, but ${volumeName} holds the receive only up to byte ${existing.offsetBytes}: use the token chunkd receive --resume-token ${volumeName} prints`);
      }
      pool.beginReceive(volumeName);
      existing.offsetBytes = header.resumeOffsetBytes;
      return existing;
    }
    if (header.resumeOffsetBytes !== 0) throw ChunkdError.invalid(`the stream resumes at byte ${header.resumeOffsetBytes}, but volume ${volumeName} has no interrupted receive`);
    const state: ReceiveState = { volume: volumeName, base: header.base, target: header.target, volumeSizeBytes: header.volumeSizeBytes, offsetBytes: 0, createdVolume: header.base === null };
    if (header.base === null && replace && pool.hasVolume(volumeName)) return this.#begin({ ...state, createdVolume: false, replacing: true });
    if (header.base === null) {
      if (pool.hasVolume(volumeName)) throw ChunkdError.exists(`volume ${volumeName} exists; ${what} makes a new volume: receive it under a new name (or send an incremental from a snapshot ${volumeName} has)`);
      await this.#save(state);
      await pool.createVolume(volumeName, header.volumeSizeBytes);
      pool.beginReceive(volumeName);
      return state;
    }
    if (!pool.hasVolume(volumeName)) throw ChunkdError.notFound(`${what} needs volume ${volumeName} with snapshot ${header.base.name}, but there is no volume ${volumeName}`);
    const base = pool.findSnapshot(header.base.uuid, volumeName);
    if (base === null) {
      const have = pool.listSnapshots(volumeName).map((s) => `${s.name} (id ${s.uuid})`).join(', ') || 'none';
      throw ChunkdError.invalid(`wrong base: ${what} needs a snapshot with id ${header.base.uuid} in ${volumeName}; its snapshots are: ${have}`);
    }
    if (pool.findSnapshot(header.target.uuid, volumeName) !== null) throw ChunkdError.exists(`volume ${volumeName} already has snapshot ${header.target.name} (id ${header.target.uuid})`);
    if (pool.listSnapshots(volumeName).some((s) => s.name === header.target.name)) throw ChunkdError.exists(`volume ${volumeName} already has a snapshot named ${header.target.name} (another id)`);
    if ((await pool.diff(volumeName, base.snapshot, null)).length > 0) {
      throw ChunkdError.busy(`volume ${volumeName} was written since its snapshot ${base.snapshot}; an incremental applies only to the base as it was: roll it back first (chunkd snapshot rollback ${volumeName} ${base.snapshot})`);
    }
    if (pool.volumeInfo(volumeName).sizeBytes !== pool.snapshotInfo(volumeName, base.snapshot).sizeBytes) {
      throw ChunkdError.busy(`volume ${volumeName} was resized since its snapshot ${base.snapshot}; roll it back first (chunkd snapshot rollback ${volumeName} ${base.snapshot})`);
    }
    return this.#begin(state);
  }

  /** Marks an existing volume for the receive, saves its state, and sizes the volume as the stream's. */
  async #begin(state: ReceiveState): Promise<ReceiveState> {
    const pool = this.#pool;
    pool.beginReceive(state.volume);
    try {
      await this.#save(state);
      if (state.volumeSizeBytes !== pool.volumeInfo(state.volume).sizeBytes) await pool.receiveResize(state.volume, state.volumeSizeBytes);
    } catch (error) {
      pool.endReceive(state.volume);
      throw error;
    }
    return state;
  }

  /** Undoes a receive: removes the volume it created, or rolls the volume back to its base (a replaced one stays as it is); then forgets it. */
  async #discard(state: ReceiveState): Promise<void> {
    const pool = this.#pool;
    if (pool.hasVolume(state.volume)) {
      pool.beginReceive(state.volume);
      if (state.createdVolume) {
        await pool.receiveDiscardVolume(state.volume);
      } else if (state.replacing === true) {
        // Nothing to go back to: its old content was given up for this stream; the owner sends it whole again.
      } else {
        const base = state.base === null ? null : pool.findSnapshot(state.base.uuid, state.volume);
        assert(base !== null, 'an incremental receive whose base snapshot is gone (removal is refused while receiving)');
        await pool.receiveRollback(state.volume, base.snapshot);
      }
    }
    await this.#remove(state.volume);
    pool.endReceive(state.volume);
    this.#log(`receive into ${state.volume} of ${state.target.name} discarded`);
  }

  #path(volume: string): string {
    return path.join(this.#directory, `${volume}.json`);
  }

  async #load(volume: string): Promise<ReceiveState | null> {
    let state: ReceiveState | null;
    try {
      state = (await readStateFile(this.#path(volume))) as ReceiveState | null;
    } catch (error) {
      if (!(error instanceof ChunkdError)) throw error;
      throw ChunkdError.corrupt(`${error.message}: remove it to forget that receive`);
    }
    if (state === null) return null;
    if (state.volume !== volume || !isSnapshotUuid(state.target?.uuid) || !Number.isSafeInteger(state.offsetBytes)) {
      throw ChunkdError.corrupt(`${this.#path(volume)} is not a receive state: remove it to forget that receive`);
    }
    return state;
  }

  async #save(state: ReceiveState): Promise<void> {
    await writeStateFile(this.#path(state.volume), state);
  }

  async #remove(volume: string): Promise<void> {
    await removeStateFile(this.#path(volume));
  }
}
