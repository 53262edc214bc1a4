// The page file of the paged metadata (step 1 of the plan in paged-metadata.md; nothing uses it yet): fixed 4 KiB
// pages, each checksummed and kept in two copies (NAME.0 and NAME.1, same offsets, as the journal's copies), read
// and written only through the file layer, so the fault-injecting and power-loss layers run under it. Pages 0 and
// 1 are the two root slots; the rest are the caller's.
//
// Page: a 32-byte header, then the body (zeros after what the caller gave):
//   u32 magic "CKPG" | u32 crc32 of bytes 8..4096 | u48 page number | u8 kind | u8 0 | u32 generation |
//   u16 body bytes | 10 bytes 0
// A page that is all zeros was never written. A page whose checksum, magic or number is wrong in one copy, or
// whose read fails there (EIO: a bad sector), is read from the other and rewritten there (a repair, counted;
// durable with the next commit; a rewrite is also what makes a disk remap a bad sector). Wrong in both: damage,
// refused with the file and offset. Opened read-only (fsck), nothing is rewritten: `checkCopies` says what is
// damaged where, and `fsck --repair` opens it writable to rewrite it (paged-check.ts).
//
// Commit (copy-on-write, as the two meta pages of LMDB and the uberblocks of ZFS): the caller writes its changed
// pages to page numbers the durable root does not reach, then `commit(rootBody)` makes them durable (fdatasync of
// both copies), and only then writes the root slot of the next generation (generation mod 2, so the previous root
// stays whole in the other slot) to both copies and syncs it. Open takes the valid root slot of the highest
// generation. A crash at any moment leaves the previous root or the new one, and either names only durable pages.
// Encoding and choosing are pure; the class is the I/O around them.
import { crc32 } from 'node:zlib';
import { ChunkdError } from '../core/errors.ts';
import type { Log } from '../core/log.ts';
import { readFully, type FileLayer } from './file-layer.ts';
import { batchPages, pageWriterMinPages, PageWriter } from './page-writer.ts';

export const pageBytes = 4096;
export const pageHeaderBytes = 32;
export const pageBodyBytesMax = pageBytes - pageHeaderBytes;
/** Page numbers below this are the root slots. */
export const firstDataPage = 2;
export const pageCopies = 2;
const magic = 0x47504b43; // "CKPG" little-endian
const rootKind = 0xff;
/** Page images kept for reuse: as many as a commit writes at once through libuv's pool (`runsInFlight`), and some. */
const imagesKept = 64;
/** The most pages `writeRun` writes at once (128 KiB), and how many of its buffers are kept for reuse. */
export const runPagesMax = 32;
const runImagesKept = 16;
/** Runs `writePages` has in flight through libuv's pool (a write per copy each). */
const runsInFlight = 16;

export interface Page {
  pageNumber: number;
  kind: number;
  generation: number;
  body: Buffer;
}

/**
 * The `count` page numbers of `sources`, in ascending order. Sorted as a Float64Array (a native sort, no comparator
 * called from it): after 16 GiB written at random a checkpoint sorts some 20,000 dirty pages and a free list as
 * long, whose sorts with a comparator held the event loop for milliseconds at every checkpoint.
 */
export function sortedPageNumbers(count: number, ...sources: ReadonlyArray<Iterable<number>>): Float64Array {
  const numbers = new Float64Array(count);
  let at = 0;
  for (const source of sources) for (const page of source) numbers[at++] = page;
  return numbers.sort();
}

/** The 4 KiB image of a page. */
export function encodePage(page: Page): Buffer {
  return encodePageInto(Buffer.allocUnsafe(pageBytes), page);
}

/** The 4 KiB image of a page, written over all of `out` (a buffer of `pageBytes`, reused: whatever it held goes). */
export function encodePageInto(out: Buffer, page: Page): Buffer {
  return sealPageImage(encodePageUnsealed(out, page));
}

/** A page's image in `out` but for its checksum, which `sealPageImage` writes (the page writer thread does: page-writer.ts). */
export function encodePageUnsealed(out: Buffer, page: Page): Buffer {
  if (page.body.length > pageBodyBytesMax) throw ChunkdError.invalid(`a page body holds at most ${pageBodyBytesMax} bytes, not ${page.body.length}`);
  if (!Number.isSafeInteger(page.pageNumber) || page.pageNumber < 0 || page.pageNumber >= 2 ** 48) throw ChunkdError.invalid(`bad page number ${page.pageNumber}`);
  if (out.length !== pageBytes) throw new Error(`a page image is ${pageBytes} bytes, not ${out.length}`);
  out.writeUInt32LE(magic, 0);
  out.writeUIntLE(page.pageNumber, 8, 6);
  out.writeUInt8(page.kind, 14);
  out.writeUInt8(0, 15);
  out.writeUInt32LE(page.generation >>> 0, 16);
  out.writeUInt16LE(page.body.length, 20);
  out.fill(0, 22, pageHeaderBytes);
  page.body.copy(out, pageHeaderBytes);
  out.fill(0, pageHeaderBytes + page.body.length);
  return out;
}

/** Writes the checksum of the image in `out` (a page's `pageBytes`, encoded by `encodePageUnsealed`). */
export function sealPageImage(out: Buffer): Buffer {
  out.writeUInt32LE(crc32(out.subarray(8)), 4);
  return out;
}

/** The page in `bytes` if it is whole and is page `pageNumber`; else why not ('unwritten' for all zeros). */
export function decodePage(bytes: Buffer, pageNumber: number): Page | string {
  if (bytes.length !== pageBytes) return `${bytes.length} bytes, not ${pageBytes}`;
  if (bytes.every((byte) => byte === 0)) return 'unwritten';
  if (bytes.readUInt32LE(0) !== magic) return 'no page magic';
  if (bytes.readUInt32LE(4) !== crc32(bytes.subarray(8))) return 'checksum mismatch';
  const found = bytes.readUIntLE(8, 6);
  if (found !== pageNumber) return `holds page ${found}`;
  const bodyBytes = bytes.readUInt16LE(20);
  if (bodyBytes > pageBodyBytesMax) return `body of ${bodyBytes} bytes`;
  // Copied into a buffer of its own, not Node's shared pool (`Buffer.from` takes a slice of a 64 KiB pool for a
  // body this small): a cached body, and a leaf or counts viewing it, would keep the whole pool alive, with the
  // other pages and buffers cut from it, where the cache counts a page.
  const body = Buffer.allocUnsafeSlow(bodyBytes);
  bytes.copy(body, 0, pageHeaderBytes, pageHeaderBytes + bodyBytes);
  return { pageNumber, kind: bytes.readUInt8(14), generation: bytes.readUInt32LE(16), body };
}

export interface Root {
  generation: number;
  body: Buffer;
}

/** What the two copies of a page hold: both whole, one damaged (`bad`: its copy, and why), or both damaged. */
export type PageCopies = { state: 'whole' } | { state: 'one-damaged'; bad: number; reason: string } | { state: 'lost'; reasons: string[] };

export interface PageFileOptions {
  /** Read only: no repair is written (fsck); `write` and `commit` refuse. */
  readOnly?: boolean;
  /**
   * `writePages` of at least this many pages writes them on a thread of its own (page-writer.ts), started at the
   * first such call; null: never (default page-writer.ts's `pageWriterMinPages`).
   */
  writerMinPages?: number | null;
  /** Where the page writer thread's failures are reported (the node's log). */
  log?: Log;
}

/**
 * The 4 KiB image of page `pageNumber` in one copy, or why it cannot be read: a disk read error (EIO, a bad
 * sector) is damage to that copy, which the other covers as it covers a checksum mismatch; other errors throw.
 */
async function readPageImage(files: FileLayer, fd: number, pageNumber: number, bytes: Buffer = Buffer.alloc(pageBytes)): Promise<Buffer | string> {
  // From the OS page cache in one call on this thread when it holds the page (a replay after a crash reads
  // thousands of leaves the node had just written: 4 to 6 us of CPU a page this way, 12 to 13 through libuv's
  // pool, 20,000 reads at random here); else, or on any error, the read below.
  if (files.readCached(fd, bytes, pageNumber * pageBytes) === pageBytes) return bytes;
  try {
    await readFully(files, fd, bytes, pageNumber * pageBytes);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EIO') throw error;
    return `cannot be read (${(error as Error).message})`;
  }
  return bytes;
}

/** The newest valid root among the slots' images (each slot in each copy); null if none was ever written. */
export function chooseRoot(images: ReadonlyArray<{ slot: number; bytes: Buffer }>): Root | null {
  let best: Root | null = null;
  for (const { slot, bytes } of images) {
    const page = decodePage(bytes, slot);
    if (typeof page === 'string' || page.kind !== rootKind || page.generation % 2 !== slot) continue;
    if (best === null || page.generation > best.generation) best = { generation: page.generation, body: page.body };
  }
  return best;
}

/** A copy's write that failed, as `PageFile.write` keeps it until both copies have settled. */
interface WriteFailure {
  error: unknown;
}
const writeDone = (): undefined => undefined;
const writeFailed = (error: unknown): WriteFailure => ({ error });

export class PageFile {
  readonly #files: FileLayer;
  readonly #paths: string[];
  readonly #fds: number[];
  readonly #readOnly: boolean;
  readonly #writerMinPages: number | null;
  readonly #log: Log | undefined;
  /** The page writer thread, from the first `writePages` of `#writerMinPages` pages on (null: none yet); once lost, kept so, and none started again. */
  #writer: PageWriter | null = null;
  #root: Root | null;
  #repairs = 0;
  /** The copies that lacked the newest root at open (a commit cut short by a crash, or damage). */
  #rootMissingFrom: number[] = [];
  #closed = false;
  /** Page images whose writes have settled, for the next writes to reuse. */
  readonly #images: Buffer[] = [];
  readonly #runImages: Buffer[] = [];

  private constructor(files: FileLayer, paths: string[], fds: number[], root: Root | null, readOnly: boolean, options: PageFileOptions) {
    this.#files = files;
    this.#paths = paths;
    this.#fds = fds;
    this.#root = root;
    this.#readOnly = readOnly;
    this.#writerMinPages = options.writerMinPages === undefined ? pageWriterMinPages : options.writerMinPages;
    this.#log = options.log;
  }

  /**
   * Opens (or creates) the copies `${base}.0` and `${base}.1` and reads the newest valid root. A file with pages
   * but no valid root in either slot of either copy is damage, refused. The caller syncs the directory when it
   * created the files.
   */
  static async open(files: FileLayer, base: string, options: PageFileOptions = {}): Promise<PageFile> {
    const paths = Array.from({ length: pageCopies }, (_, copy) => `${base}.${copy}`);
    const fds: number[] = [];
    try {
      for (const path of paths) fds.push(await files.open(path, 'create'));
      const images: Array<{ slot: number; bytes: Buffer }> = [];
      let anyWritten = false;
      for (const fd of fds) {
        for (const slot of [0, 1]) {
          const read = await readPageImage(files, fd, slot);
          // A slot that cannot be read is damage, never the blank slot of a new file.
          const bytes = typeof read === 'string' ? Buffer.alloc(pageBytes, 0xff) : read;
          anyWritten ||= bytes.some((byte) => byte !== 0);
          images.push({ slot, bytes });
        }
      }
      const root = chooseRoot(images);
      if (root === null && anyWritten) throw ChunkdError.corrupt(`${base}.0 and ${base}.1: neither root slot is readable in either copy`);
      const readOnly = options.readOnly === true;
      const file = new PageFile(files, paths, fds, root, readOnly, options);
      // A root whole in one copy only is written whole to the other now: else damage to the one good copy later
      // would make an older root the newest valid one, and the pool would silently go back in time.
      if (root !== null) {
        const slot = root.generation % 2;
        const image = encodePage({ pageNumber: slot, kind: rootKind, generation: root.generation, body: root.body });
        for (let copy = 0; copy < pageCopies; copy++) {
          if (images[copy * 2 + slot]!.bytes.equals(image)) continue;
          file.#rootMissingFrom.push(copy);
          if (readOnly) continue;
          await files.write(fds[copy]!, image, slot * pageBytes);
          await files.fdatasync(fds[copy]!);
          file.#repairs += 1;
        }
      }
      return file;
    } catch (error) {
      for (const fd of fds) files.close(fd);
      throw error;
    }
  }

  /** The durable root (its generation and the caller's bytes), or null before the first commit. */
  get root(): Root | null {
    return this.#root;
  }

  /** Pages found damaged in one copy and rewritten from the other since open. */
  get repairs(): number {
    return this.#repairs;
  }

  /** The copies' paths (`${base}.0`, `${base}.1`). */
  get paths(): readonly string[] {
    return this.#paths;
  }

  /** The copies that did not hold the newest root at open (rewritten there unless read-only). */
  get rootMissingFrom(): readonly number[] {
    return this.#rootMissingFrom;
  }

  /**
   * Reads both copies of a page and says which are whole; with `repair` (and not read-only), a copy that is
   * damaged while the other is whole is rewritten from it (durable with the next `sync` or commit). Both whole but
   * different (damage a checksum did not catch, or a page no root names): the first copy wins, as `read` takes it.
   */
  async checkCopies(pageNumber: number, repair: boolean): Promise<PageCopies> {
    this.#check();
    const images: Buffer[] = [];
    const pages: Array<Page | string> = [];
    for (let copy = 0; copy < pageCopies; copy++) {
      const read = await readPageImage(this.#files, this.#fds[copy]!, pageNumber);
      images.push(typeof read === 'string' ? Buffer.alloc(pageBytes) : read);
      pages.push(typeof read === 'string' ? read : decodePage(read, pageNumber));
    }
    const whole = pages.map((page) => typeof page !== 'string');
    if (whole.every((ok) => !ok)) return { state: 'lost', reasons: pages.map((page, copy) => `${this.#paths[copy]}: ${page as string}`) };
    if (whole.every((ok) => ok) && images[0]!.equals(images[1]!)) return { state: 'whole' };
    const good = whole[0] ? 0 : 1;
    const bad = 1 - good;
    const reason = whole[bad] ? `differs from ${this.#paths[good]} (both pass their checksums)` : (pages[bad] as string);
    if (repair && !this.#readOnly) {
      await this.#files.write(this.#fds[bad]!, images[good]!, pageNumber * pageBytes);
      this.#repairs += 1;
    }
    return { state: 'one-damaged', bad, reason };
  }

  /** Makes the repairs written so far durable (fdatasync of both copies). */
  async sync(): Promise<void> {
    this.#check();
    await Promise.all(this.#fds.map((fd) => this.#files.fdatasync(fd)));
  }

  /** The generation that the next commit makes durable (pages written now carry it). */
  get nextGeneration(): number {
    return (this.#root?.generation ?? 0) + 1;
  }

  /**
   * Writes pages `firstPage`, `firstPage + 1`, ... to both copies, one write per copy for the run (not yet durable:
   * `commit` makes it so). A checkpoint's dirty pages lie in runs (copy-on-write puts a pass's new nodes side by
   * side: 31 pages a run over all of a run's checkpoints, 22 to 290 in each of those of 1,000 pages or more, writing
   * 3 GiB at random into 1 TiB with a 64 MiB cache), and a write each cost a job of libuv's pool per copy, the
   * pool's threads taking the CPU the event loop then waited for (BENCHMARKS.md, issue 15). At most `runPagesMax`
   * pages a call.
   */
  async writeRun(firstPage: number, pages: ReadonlyArray<{ kind: number; body: Buffer }>): Promise<void> {
    this.#check();
    this.#writable();
    if (pages.length === 0) return;
    if (pages.length > runPagesMax) throw ChunkdError.invalid(`a run of pages is at most ${runPagesMax} pages, not ${pages.length}`);
    if (firstPage < firstDataPage) throw ChunkdError.invalid(`page ${firstPage} is a root slot`);
    // The buffer is reused once both writes have settled (the file layers keep nothing of a buffer after its write
    // settles; a write that never settles, a frozen layer's, keeps its buffer): a checkpoint writes thousands of
    // pages, and a buffer each was garbage for the collector to find while the loop waits. A page alone takes a
    // 4 KiB image, a run a view of a buffer of the longest run's size.
    const alone = pages.length === 1;
    const images = alone ? this.#images : this.#runImages;
    const buffer = images.pop() ?? Buffer.allocUnsafe(alone ? pageBytes : runPagesMax * pageBytes);
    const generation = this.nextGeneration;
    try {
      for (let index = 0; index < pages.length; index++) {
        const { kind, body } = pages[index]!;
        if (kind === rootKind) throw ChunkdError.invalid(`page kind ${rootKind} is the root's`);
        encodePageInto(buffer.subarray(index * pageBytes, (index + 1) * pageBytes), { pageNumber: firstPage + index, kind, generation, body });
      }
    } catch (error) {
      images.push(buffer);
      throw error;
    }
    const failure = await this.#writeCopies(buffer.subarray(0, pages.length * pageBytes), firstPage * pageBytes);
    if (images.length < (alone ? imagesKept : runImagesKept)) images.push(buffer);
    if (failure !== undefined) throw failure.error;
  }

  /** Writes a page to both copies (not yet durable: `commit` makes it so): a run of one. */
  write(pageNumber: number, kind: number, body: Buffer): Promise<void> {
    return this.writeRun(pageNumber, [{ kind, body }]);
  }

  /**
   * Writes pages `numbers[i]` (ascending, no page twice) to both copies (not yet durable: `commit` makes it so), as
   * a checkpoint does: consecutive pages as one write. Many pages go to the page writer thread, a batch of images
   * a message (page-writer.ts: a checkpoint past the cache's fill writes thousands of scattered pages); fewer, or
   * until the thread is up, runs of `runPagesMax` through libuv's pool, `runsInFlight` at once. Their order does not
   * matter: none is durable before the fdatasync that precedes the root. Rejects with the first failure.
   */
  async writePages(numbers: Float64Array, pages: ReadonlyArray<{ kind: number; body: Buffer }>): Promise<void> {
    this.#check();
    this.#writable();
    if (numbers.length !== pages.length) throw new Error(`writePages: ${numbers.length} page numbers for ${pages.length} pages`);
    // Checked before anything is written, whichever way the pages go.
    if (numbers.length > 0 && numbers[0]! < firstDataPage) throw ChunkdError.invalid(`page ${numbers[0]} is a root slot`);
    for (let index = 1; index < numbers.length; index++) if (!(numbers[index]! > numbers[index - 1]!)) throw ChunkdError.invalid(`writePages: page numbers out of order at ${numbers[index]}`);
    for (const { kind } of pages) if (kind === rootKind) throw ChunkdError.invalid(`page kind ${rootKind} is the root's`);
    const writer = this.#writerFor(pages.length);
    if (writer !== null) return this.#writePagesOnThread(writer, numbers, pages);
    const writes: Array<Promise<void>> = [];
    let index = 0;
    while (index < pages.length) {
      writes.length = 0;
      while (index < pages.length && writes.length < runsInFlight) {
        let end = index + 1;
        while (end < pages.length && end - index < runPagesMax && numbers[end] === numbers[end - 1]! + 1) end++;
        writes.push(this.writeRun(numbers[index]!, pages.slice(index, end)));
        index = end;
      }
      await Promise.all(writes);
    }
  }

  /** The page writer thread: none started yet, starting, up, or lost (writes go through libuv's pool then). */
  get writerThread(): 'none' | 'starting' | 'up' | 'lost' {
    if (this.#writer === null) return 'none';
    if (this.#writer.lost) return 'lost';
    return this.#writer.ready ? 'up' : 'starting';
  }

  /** Test hook: ends the page writer thread as a crash would (see PageWriter.stopThreadForTest). */
  async stopWriterThreadForTest(): Promise<void> {
    await this.#writer?.stopThreadForTest();
  }

  /** The page writer thread when a write of `pageCount` pages should go to it and it is up (started here if need be), else null. */
  #writerFor(pageCount: number): PageWriter | null {
    if (this.#writerMinPages === null || pageCount < this.#writerMinPages) return null;
    this.#writer ??= new PageWriter(this.#files, this.#paths, batchPages * pageBytes, this.#log);
    return this.#writer.ready ? this.#writer : null;
  }

  /** `writePages` through the thread: each batch encoded into a free slab while the one before is written. */
  async #writePagesOnThread(writer: PageWriter, numbers: Float64Array, pages: ReadonlyArray<{ kind: number; body: Buffer }>): Promise<void> {
    const generation = this.nextGeneration;
    const writes: Array<Promise<void>> = [];
    let failure: { error: unknown } | undefined;
    const failed = (error: unknown): void => {
      failure ??= { error };
    };
    let index = 0;
    while (index < pages.length && failure === undefined) {
      const slab = await writer.acquire();
      if (failure !== undefined) {
        writer.release(slab);
        break;
      }
      const images = writer.images(slab);
      const runs: number[] = [];
      let used = 0;
      try {
        while (index < pages.length && used < batchPages) {
          const first = numbers[index]!;
          let count = 0;
          while (index < pages.length && used < batchPages && (count === 0 || numbers[index] === first + count)) {
            const { kind, body } = pages[index]!;
            // The checksum is the thread's to write (writeBatch), off this one.
            encodePageUnsealed(images.subarray(used * pageBytes, (used + 1) * pageBytes), { pageNumber: first + count, kind, generation, body });
            used++;
            count++;
            index++;
          }
          runs.push(used - count, count, first);
        }
      } catch (error) {
        writer.release(slab);
        failed(error);
        break;
      }
      writes.push(writer.write(slab, Float64Array.from(runs)).catch(failed));
    }
    await Promise.all(writes);
    if (failure === undefined) return;
    // A thread that died (not a write that failed) is no failure of the disk's: the pages are written again, all
    // of them, through libuv's pool (the same images at the same places, none durable before the commit).
    if (writer.lost) return this.writePages(numbers, pages);
    throw failure.error;
  }

  /**
   * Writes `image` at `position` in both copies at once, each write's outcome handled as it settles (a rejection
   * left unhandled while the other copy is awaited is reported by Node), then awaited in turn: not
   * `Promise.allSettled` of a mapped array, whose array, closure and result objects were several hundred bytes of
   * what a 4 KiB write allocated over paged metadata, at about a checkpoint's page per write. Answers the first
   * failure, in copy order, once both have settled.
   */
  async #writeCopies(image: Buffer, position: number): Promise<WriteFailure | undefined> {
    const writes: Array<Promise<WriteFailure | undefined>> = [];
    for (const fd of this.#fds) writes.push(this.#files.write(fd, image, position).then(writeDone, writeFailed));
    let failure: WriteFailure | undefined;
    for (const write of writes) {
      const outcome = await write;
      failure ??= outcome;
    }
    return failure;
  }

  /** Reads a page, from the other copy where one is damaged (and repairs it); both damaged: ECORRUPT. */
  async read(pageNumber: number): Promise<Page> {
    this.#check();
    if (pageNumber < firstDataPage) throw ChunkdError.invalid(`page ${pageNumber} is a root slot`);
    const reasons: string[] = [];
    // Read into a reused image (the page's body is copied out of it): kept for the next read or write once the
    // reads, and the repair's writes, have settled.
    const image = this.#images.pop() ?? Buffer.allocUnsafe(pageBytes);
    for (let copy = 0; copy < pageCopies; copy++) {
      const bytes = await readPageImage(this.#files, this.#fds[copy]!, pageNumber, image);
      const page = typeof bytes === 'string' ? bytes : decodePage(bytes, pageNumber);
      if (typeof page === 'string') {
        reasons.push(`${this.#paths[copy]}: ${page}`);
        continue;
      }
      for (let bad = 0; bad < copy && !this.#readOnly; bad++) {
        await this.#files.write(this.#fds[bad]!, image, pageNumber * pageBytes);
        this.#repairs += 1;
      }
      if (this.#images.length < imagesKept) this.#images.push(image);
      return page;
    }
    throw ChunkdError.corrupt(`metadata page ${pageNumber} (byte ${pageNumber * pageBytes}) is damaged in both copies: ${reasons.join('; ')}`);
  }

  /**
   * Makes every page written since the last commit durable, then the new root: pages first (both copies synced),
   * then the root slot of the new generation in both copies, synced. Until it resolves the old root stands.
   */
  async commit(rootBody: Buffer): Promise<Root> {
    this.#check();
    this.#writable();
    const generation = this.nextGeneration;
    const slot = generation % 2;
    const image = encodePage({ pageNumber: slot, kind: rootKind, generation, body: rootBody });
    await Promise.all(this.#fds.map((fd) => this.#files.fdatasync(fd)));
    // Closed meanwhile (Pool.abandon: a simulated crash): the descriptors may be another file's by now.
    this.#check();
    await Promise.all(this.#fds.map((fd) => this.#files.write(fd, image, slot * pageBytes)));
    this.#check();
    await Promise.all(this.#fds.map((fd) => this.#files.fdatasync(fd)));
    this.#root = { generation, body: Buffer.from(rootBody) };
    return this.#root;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#writer?.close();
    for (const fd of this.#fds) this.#files.close(fd);
  }

  #check(): void {
    if (this.#closed) throw new ChunkdError('ESHUTDOWN', 'the page file is closed');
  }

  #writable(): void {
    if (this.#readOnly) throw ChunkdError.invalid('the page file is open read-only');
  }
}
