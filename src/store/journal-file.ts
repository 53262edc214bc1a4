// The journal on disk: one generation is two files, journal-<gen>.0 and journal-<gen>.1, that get the same
// commits at the same offsets (journal-format.ts says why and how a load reads them back). A commit is written to
// both and fdatasynced in both, side by side, before it counts: one more pwrite and fdatasync per commit, in
// parallel, for metadata that survives a damaged sector. Space is reserved ahead with fallocate, so that most
// commits neither change the files' size (a cheaper fdatasync) nor meet a full file system halfway through; where
// the reserve does not fit, a commit reserves what it needs alone (`reserveShort` says so until a reserve fits).
import { fromSystemError, isNoSpace } from '../core/errors.ts';
import { settleAll } from '../core/settle.ts';
import { journalReserveBytes } from '../core/limits.ts';
import type { FileLayer } from './file-layer.ts';
import { encodeCommit, journalCopies } from './journal-format.ts';

export class JournalFile {
  readonly paths: readonly string[];
  readonly generation: number;
  readonly #files: FileLayer;
  readonly #fds: number[];
  #endBytes = 0;
  #reservedBytes = 0;
  #reserveShort = false;
  #nextSequence = 1;

  private constructor(files: FileLayer, paths: string[], fds: number[], generation: number) {
    this.#files = files;
    this.paths = paths;
    this.#fds = fds;
    this.generation = generation;
  }

  /**
   * Creates the copies of an empty journal, durable but with no space reserved yet (`reserveAhead` does that,
   * once the caller has made room: a new generation starts before the old one's files are removed); the caller
   * syncs the directory.
   */
  static async create(files: FileLayer, paths: readonly string[], generation: number): Promise<JournalFile> {
    const fds: number[] = [];
    try {
      for (let copy = 0; copy < journalCopies; copy++) fds.push(await files.open(paths[copy]!, 'truncate'));
      await Promise.all(fds.map((fd) => files.fdatasync(fd)));
      return new JournalFile(files, [...paths], fds, generation);
    } catch (error) {
      for (const fd of fds) files.close(fd);
      throw error;
    }
  }

  /**
   * Reserves space ahead for the next commits. A full file system is not an error here: the journal then grows
   * as it is written, and a commit that meets ENOSPC fails alone.
   */
  async reserveAhead(): Promise<void> {
    try {
      await this.#reserve(Math.max(0, this.#endBytes + journalReserveBytes - this.#reservedBytes));
      this.#reserveShort = false;
      await settleAll(this.#fds.map((fd) => this.#files.fdatasync(fd)));
    } catch (error) {
      if (!isNoSpace(error)) throw error;
      this.#reserveShort = true;
    }
  }

  /** Whether the last try to reserve space ahead met a full file system (the journal grows as it is written). */
  get reserveShort(): boolean {
    return this.#reserveShort;
  }

  /** Bytes of commits in the journal. */
  get sizeBytes(): number {
    return this.#endBytes;
  }

  /**
   * Appends framed records as one commit and makes it durable in both copies. On failure nothing counts as
   * appended (a retry writes the same place again); the pool decides whether the failure is final.
   */
  async append(frames: Buffer): Promise<void> {
    if (frames.length === 0) return;
    const commit = encodeCommit(this.generation, this.#nextSequence, frames);
    try {
      if (this.#endBytes + commit.length > this.#reservedBytes) {
        try {
          await this.#reserve(this.#endBytes + commit.length + journalReserveBytes - this.#reservedBytes);
          this.#reserveShort = false;
        } catch (error) {
          // Not room for the reserve: room for this commit is enough (the next tries the reserve again).
          if (!isNoSpace(error)) throw error;
          this.#reserveShort = true;
          await this.#reserve(this.#endBytes + commit.length - this.#reservedBytes);
        }
      }
      await settleAll(this.#fds.map((fd) => this.#files.write(fd, commit, this.#endBytes)));
      await settleAll(this.#fds.map((fd) => this.#files.fdatasync(fd)));
    } catch (error) {
      throw fromSystemError(error, 'journal commit');
    }
    this.#endBytes += commit.length;
    this.#nextSequence += 1;
  }

  close(): void {
    for (const fd of this.#fds) this.#files.close(fd);
  }

  async #reserve(extraBytes: number): Promise<void> {
    try {
      await settleAll(this.#fds.map((fd) => this.#files.allocate(fd, 'reserve', this.#reservedBytes, extraBytes)));
    } catch (error) {
      // A file system without fallocate still works: the journal then grows as it is written.
      if ((error as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw error;
    }
    this.#reservedBytes += extraBytes;
  }
}
