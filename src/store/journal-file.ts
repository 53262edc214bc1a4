// The journal on disk: one file per generation (journal-<generation>), appended in commits and fdatasynced.
// Space is reserved ahead with fallocate, so that most commits neither change the file's size (a cheaper
// fdatasync) nor meet a full file system halfway through a record.
import fs from 'node:fs';
import { fromSystemError } from '../core/errors.ts';
import { journalReserveBytes } from '../core/limits.ts';
import { fdatasync, writeFully } from './chunk-files.ts';
import { reserveSpace } from './native.ts';

export class JournalFile {
  readonly path: string;
  readonly #fd: number;
  #endBytes: number;
  #reservedBytes: number;

  private constructor(path: string, fd: number, endBytes: number, reservedBytes: number) {
    this.path = path;
    this.#fd = fd;
    this.#endBytes = endBytes;
    this.#reservedBytes = reservedBytes;
  }

  /** Creates an empty journal with space reserved; the caller fsyncs the directory. */
  static async create(path: string): Promise<JournalFile> {
    const fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
    const journal = new JournalFile(path, fd, 0, 0);
    await journal.#reserve(journalReserveBytes);
    await fdatasync(fd);
    return journal;
  }

  /** Bytes of records in the journal. */
  get sizeBytes(): number {
    return this.#endBytes;
  }

  /** Appends encoded records and makes them durable. On failure nothing counts as appended; a retry overwrites. */
  async append(bytes: Buffer): Promise<void> {
    if (bytes.length === 0) return;
    try {
      if (this.#endBytes + bytes.length > this.#reservedBytes) await this.#reserve(this.#endBytes + bytes.length + journalReserveBytes - this.#reservedBytes);
      await writeFully(this.#fd, bytes, this.#endBytes);
      await fdatasync(this.#fd);
    } catch (error) {
      throw fromSystemError(error, 'journal commit');
    }
    this.#endBytes += bytes.length;
  }

  close(): void {
    fs.closeSync(this.#fd);
  }

  async #reserve(extraBytes: number): Promise<void> {
    try {
      await reserveSpace(this.#fd, this.#reservedBytes, extraBytes);
    } catch (error) {
      // A file system without fallocate still works: the journal then grows as it is written.
      if ((error as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw error;
    }
    this.#reservedBytes += extraBytes;
  }
}

/** Reads a whole journal file, or returns null if it does not exist. */
export function readJournal(path: string): Buffer | null {
  try {
    return fs.readFileSync(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw error;
  }
}
