// The page file: step 1 of the paged metadata (issue 15; the design is src/store/paged-metadata.md). Fixed 4 KiB
// pages in a metadata file kept in two copies (same bytes at the same offsets, as the journal's copies), written
// only through the FileLayer, so the fault-injecting layer and the power-loss model see every byte of it. The
// trees built on it (the paged maps, the space maps) come later; this file knows pages, generations, a root, free
// pages and a cache, nothing of what pages hold.
//
// Pages. Page p lives at byte p * 4096 of each copy: a 32-byte header (magic, kind, page number, generation that
// wrote it, crc32 of the whole page but the crc field) and a body. Every read checks the magic, the page number
// (a misdirected write) and the crc; a page failing in one copy is read from the other and the bad copy rewritten
// (counted); failing in both, the read is an EIO naming the page and both files, never wrong bytes.
//
// Generations and copy-on-write. A commit makes one generation durable: every page allocated and written since the
// last one, then the root. A page that a durable root can reach is never written again: a writer allocates a new
// page (a tree copies the path down to what it changes), and frees the old one, which becomes reusable only once
// the root that stops naming it is durable (deferred reuse, as the allocator does for chunks). So a crash at any
// point leaves the previous root and everything it reaches intact: the new generation appears whole or not at all.
//
// The root. Pages 0 and 1 are the root's two slots; generation g is written to slot g % 2, so the other slot
// still holds g - 1 while g is written. A start reads the four slots (two per copy), takes the newest whole one,
// and repairs a copy whose slot is older or damaged: O(1), whatever the pages hold. The root names the page count
// (the high-water mark), the head of the free-page chain, and a small payload for the trees above (their root page
// numbers, the journal generation they cover).
//
// Free pages. The free set is kept as a chain of free-list pages written at each commit, from pages free before
// it; the chain of the previous root is freed (deferred) at the next commit, like any page that root reaches.
//
// The cache. Clean pages sit in an lru-cache bounded in bytes (`cacheBytes`); pages written in the generation
// being built are pinned (held outside the LRU) until their commit has made them durable.
import { LRUCache } from 'lru-cache';
import { crc32 } from 'node:zlib';
import { assert } from '../core/assert.ts';
import { ChunkdError } from '../core/errors.ts';
import type { FileLayer } from './file-layer.ts';

export const pageBytes = 4096;
const headerBytes = 32;
export const pageBodyBytes = pageBytes - headerBytes;
const pageMagic = 0x474b5043; // "CPKG" little-endian
const rootMagic = 0x544f5243; // "CROT"
const rootSlots = 2;
/** Root fields before the payload: magic, version, generation (6 bytes in 8), page count, free chain head, payload length, crc. */
const rootFieldsBytes = 32;
export const rootPayloadBytesMax = pageBytes - rootFieldsBytes;
const formatVersion = 1;
/** The kind of a free-list page (kinds 1-15 are the page file's; the trees above use 16 and up). */
export const freeListKind = 1;
/** Entries per free-list page: a count, the next page, then page numbers. */
const freeListEntriesMax = (pageBodyBytes - 8) / 4;
const noPage = 0;

/** A page as read: its body is the cache's, not to be changed (a change is a new page: allocate). */
export interface Page {
  readonly pageNumber: number;
  readonly kind: number;
  readonly generation: number;
  readonly body: Buffer;
}

/** A page allocated in the generation being built: its body may be written until the commit. */
export interface WritablePage extends Page {
  readonly writable: true;
}

export interface PageFileStats {
  generation: number;
  pageCount: number;
  freePages: number;
  /** Pages allocated or freed and not yet committed. */
  dirtyPages: number;
  cachedPages: number;
  cacheBytes: number;
  /** Page and root copies found damaged or stale and rewritten from the other copy. */
  repairs: number;
}

export interface PageFileOptions {
  files: FileLayer;
  /** The two copies' paths. */
  paths: readonly [string, string];
  /** The directory holding them (synced when they are made). */
  directory: string;
  /** Bytes of clean pages the cache may hold (at least a few pages). */
  cacheBytes: number;
}

interface RootRecord {
  generation: number;
  pageCount: number;
  freeHead: number;
  payload: Buffer;
}

/** The bytes of page `pageNumber`: header and body, its crc filled in (pure). */
export function encodePage(pageNumber: number, kind: number, generation: number, body: Uint8Array): Buffer {
  assert(body.length <= pageBodyBytes, 'page body too large');
  const page = Buffer.alloc(pageBytes);
  page.writeUInt32LE(pageMagic, 0);
  page.writeUInt8(kind, 4);
  page.writeUInt32LE(pageNumber, 8);
  page.writeUIntLE(generation, 16, 6);
  page.set(body, headerBytes);
  page.writeUInt32LE(pageCrc(page), 24);
  return page;
}

function pageCrc(page: Buffer): number {
  return crc32(page.subarray(28), crc32(page.subarray(0, 24)));
}

/** The page in `bytes` if it is whole and is page `pageNumber`, else why not (pure). */
export function decodePage(bytes: Buffer, pageNumber: number): Page | string {
  if (bytes.length < pageBytes) return 'short read (past the end of the file)';
  if (bytes.readUInt32LE(0) !== pageMagic) return 'no page header';
  if (bytes.readUInt32LE(24) !== pageCrc(bytes)) return 'checksum mismatch';
  const found = bytes.readUInt32LE(8);
  if (found !== pageNumber) return `holds page ${found} (a misdirected write)`;
  return { pageNumber, kind: bytes.readUInt8(4), generation: bytes.readUIntLE(16, 6), body: bytes.subarray(headerBytes, pageBytes) };
}

function encodeRoot(root: RootRecord): Buffer {
  assert(root.payload.length <= rootPayloadBytesMax, 'root payload too large');
  const slot = Buffer.alloc(pageBytes);
  slot.writeUInt32LE(rootMagic, 0);
  slot.writeUInt16LE(formatVersion, 4);
  slot.writeUIntLE(root.generation, 8, 6);
  slot.writeUInt32LE(root.pageCount, 16);
  slot.writeUInt32LE(root.freeHead, 20);
  slot.writeUInt32LE(root.payload.length, 24);
  slot.set(root.payload, rootFieldsBytes);
  slot.writeUInt32LE(rootCrc(slot), 28);
  return slot;
}

/** crc32 of a root slot but its crc field (bytes 28-31). */
function rootCrc(slot: Buffer): number {
  return crc32(slot.subarray(rootFieldsBytes), crc32(slot.subarray(0, 28)));
}

function decodeRoot(bytes: Buffer): RootRecord | null {
  if (bytes.length < pageBytes || bytes.readUInt32LE(0) !== rootMagic) return null;
  if (rootCrc(bytes) !== bytes.readUInt32LE(28)) return null;
  if (bytes.readUInt16LE(4) !== formatVersion) return null;
  const payloadLength = bytes.readUInt32LE(24);
  if (payloadLength > rootPayloadBytesMax) return null;
  return {
    generation: bytes.readUIntLE(8, 6),
    pageCount: bytes.readUInt32LE(16),
    freeHead: bytes.readUInt32LE(20),
    payload: Buffer.from(bytes.subarray(rootFieldsBytes, rootFieldsBytes + payloadLength)),
  };
}

export class PageFile {
  readonly #files: FileLayer;
  readonly #paths: readonly [string, string];
  readonly #fds: [number, number];
  readonly #clean: LRUCache<number, Page>;
  /** Pages allocated (and written) in the generation being built: pinned until their commit. */
  #dirty = new Map<number, WritablePage>();
  /** Reusable now: no durable root reaches them. */
  readonly #free = new Set<number>();
  /** Freed in the generation being built (a durable root may still reach them): reusable after its commit. */
  #freed: number[] = [];
  /** The free-list pages of the durable root: freed at the next commit. */
  #chain: number[] = [];
  #root: RootRecord;
  #pageCount: number;
  #committing = false;
  /** Why the last commit failed, if it did: nothing more is written (see commit). */
  #poisoned: unknown = null;
  #repairs = 0;

  private constructor(options: PageFileOptions, fds: [number, number], root: RootRecord, repairs: number) {
    this.#files = options.files;
    this.#paths = options.paths;
    this.#fds = fds;
    this.#root = root;
    this.#pageCount = root.pageCount;
    this.#repairs = repairs;
    assert(options.cacheBytes >= 4 * pageBytes, 'a page cache of at least 4 pages');
    this.#clean = new LRUCache<number, Page>({ maxSize: options.cacheBytes, sizeCalculation: () => pageBytes });
  }

  /** Makes a new, empty page file (both copies; generation 0, an empty payload) and opens it. */
  static async create(options: PageFileOptions): Promise<PageFile> {
    const root: RootRecord = { generation: 0, pageCount: rootSlots, freeHead: noPage, payload: Buffer.alloc(0) };
    for (const file of options.paths) {
      const fd = await options.files.open(file, 'truncate');
      try {
        await options.files.write(fd, Buffer.concat([encodeRoot(root), Buffer.alloc(pageBytes)]), 0);
        await options.files.fdatasync(fd);
      } finally {
        options.files.close(fd);
      }
    }
    await options.files.syncDirectory(options.directory);
    return PageFile.open(options);
  }

  /** Opens a page file from its newest whole root (repairing a copy that lags or is damaged) and its free chain. */
  static async open(options: PageFileOptions): Promise<PageFile> {
    const fds: [number, number] = [await options.files.open(options.paths[0], 'write'), await options.files.open(options.paths[1], 'write')];
    try {
      const slots: Array<Array<RootRecord | null>> = [];
      for (const fd of fds) {
        const bytes = Buffer.alloc(rootSlots * pageBytes);
        const read = await options.files.read(fd, bytes, 0);
        bytes.fill(0, read);
        slots.push([decodeRoot(bytes.subarray(0, pageBytes)), decodeRoot(bytes.subarray(pageBytes))]);
      }
      let newest: RootRecord | null = null;
      for (const copy of slots) for (const slot of copy) if (slot !== null && (newest === null || slot.generation > newest.generation)) newest = slot;
      if (newest === null) throw ChunkdError.corrupt(`no whole root in either copy of the page file (${options.paths.join(', ')}): both copies of both root slots are damaged`);
      // A copy whose slot for the newest generation is not that root (the crash came between the copies' root
      // writes, or a slot is damaged) gets it back: its pages were made durable before either root was written.
      let repairs = 0;
      const slotIndex = newest.generation % rootSlots;
      for (const [copy, fd] of fds.entries()) {
        if (slots[copy]![slotIndex]?.generation === newest.generation) continue;
        await options.files.write(fd, encodeRoot(newest), slotIndex * pageBytes);
        await options.files.fdatasync(fd);
        repairs += 1;
      }
      const file = new PageFile(options, fds, newest, repairs);
      await file.#loadFreeChain();
      return file;
    } catch (error) {
      for (const fd of fds) options.files.close(fd);
      throw error;
    }
  }

  /** The durable root's generation (the next commit writes generation + 1). */
  get generation(): number {
    return this.#root.generation;
  }

  /** The payload of the durable root (what the trees above keep there). */
  get payload(): Buffer {
    return this.#root.payload;
  }

  stats(): PageFileStats {
    return {
      generation: this.#root.generation,
      pageCount: this.#pageCount,
      freePages: this.#free.size,
      dirtyPages: this.#dirty.size + this.#freed.length,
      cachedPages: this.#clean.size,
      cacheBytes: this.#clean.calculatedSize,
      repairs: this.#repairs,
    };
  }

  /** A page from the cache, without waiting: undefined when it must be read (a hot path's fast case). */
  cached(pageNumber: number): Page | undefined {
    return this.#dirty.get(pageNumber) ?? this.#clean.get(pageNumber);
  }

  /** A page, from the cache or from disk (either copy, whichever is whole). */
  async read(pageNumber: number): Promise<Page> {
    const cached = this.cached(pageNumber);
    if (cached !== undefined) return cached;
    assert(pageNumber >= rootSlots && pageNumber < this.#pageCount, `page ${pageNumber} is not a page of this file (${this.#pageCount} pages)`);
    const page = await this.#readFromDisk(pageNumber);
    this.#clean.set(pageNumber, page);
    return page;
  }

  /** A new page of `kind` in the generation being built, its body zeroed, to be written until the commit. */
  allocate(kind: number): WritablePage {
    assert(kind > 0 && kind < 256, 'page kind 1-255');
    assert(!this.#committing, 'pages change between commits, not during one');
    let pageNumber: number;
    const reused = this.#free.values().next();
    if (!reused.done) {
      pageNumber = reused.value;
      this.#free.delete(pageNumber);
    } else pageNumber = this.#pageCount++;
    const page: WritablePage = { pageNumber, kind, generation: this.#root.generation + 1, body: Buffer.alloc(pageBodyBytes), writable: true };
    this.#dirty.set(pageNumber, page);
    this.#clean.delete(pageNumber);
    return page;
  }

  /**
   * Gives a page back. One allocated in the generation being built was never durable: reusable at once. Any
   * other may still be reached by the durable root: reusable once the next root is durable.
   */
  free(pageNumber: number): void {
    assert(!this.#committing, 'pages change between commits, not during one');
    assert(pageNumber >= rootSlots && pageNumber < this.#pageCount && !this.#free.has(pageNumber), `page ${pageNumber} freed twice or never allocated`);
    this.#clean.delete(pageNumber);
    if (this.#dirty.delete(pageNumber)) this.#free.add(pageNumber);
    else this.#freed.push(pageNumber);
  }

  /**
   * Makes the generation being built durable with `payload` in its root: the pages written since the last commit
   * and the free chain, in both copies, synced; then the root, in both copies, synced. Pages freed in it become
   * reusable after. A failure leaves the durable root as it was, and this page file unusable (as the commit
   * engine treats a failed fdatasync: what reached the disk is unknown, so nothing more is written). No page is
   * allocated or freed while it runs (the trees above serialize their changes with their commits).
   */
  async commit(payload: Buffer): Promise<void> {
    assert(!this.#committing, 'one commit at a time');
    assert(payload.length <= rootPayloadBytesMax, `root payload of ${payload.length} bytes, at most ${rootPayloadBytesMax}`);
    this.#committing = true;
    try {
      const generation = this.#root.generation + 1;
      const written = [...this.#dirty.values()];
      // Reusable after this root: what was freed in it, and the previous root's free chain.
      const released = [...this.#freed, ...this.#chain];
      const chain = this.#buildFreeChain(generation, released);
      const pages = [...written.map((page) => encodePage(page.pageNumber, page.kind, page.generation, page.body)), ...chain.pages];
      const numbers = [...written.map((page) => page.pageNumber), ...chain.numbers];
      await Promise.all(this.#fds.map((fd) => this.#writePages(fd, numbers, pages)));
      await Promise.all(this.#fds.map((fd) => this.#files.fdatasync(fd)));
      const root: RootRecord = { generation, pageCount: this.#pageCount, freeHead: chain.numbers[0] ?? noPage, payload: Buffer.from(payload) };
      const slot = encodeRoot(root);
      await Promise.all(this.#fds.map((fd) => this.#files.write(fd, slot, (generation % rootSlots) * pageBytes)));
      await Promise.all(this.#fds.map((fd) => this.#files.fdatasync(fd)));
      // Durable: the written pages are clean now, and what this root no longer reaches is free.
      this.#root = root;
      for (const page of written) {
        this.#dirty.delete(page.pageNumber);
        this.#clean.set(page.pageNumber, { pageNumber: page.pageNumber, kind: page.kind, generation: page.generation, body: page.body });
      }
      for (const pageNumber of released) this.#free.add(pageNumber);
      this.#freed = [];
      this.#chain = chain.numbers;
    } catch (error) {
      this.#poisoned = error;
      throw error;
    } finally {
      this.#committing = false;
    }
  }

  close(): void {
    for (const fd of this.#fds) this.#files.close(fd);
  }

  /**
   * The free-list pages for a root: the free set after it (free now, plus `released`), stored in pages taken
   * from the free set itself (or past the end) and so left out of the list they hold.
   */
  #buildFreeChain(generation: number, released: readonly number[]): { numbers: number[]; pages: Buffer[] } {
    if (this.#poisoned !== null) throw ChunkdError.io(`the page file's last commit failed; nothing more is written until it is reopened: ${(this.#poisoned as Error).message}`);
    const listed = new Set([...this.#free, ...released]);
    const numbers: number[] = [];
    while (numbers.length * freeListEntriesMax < listed.size) {
      // Only pages free before this commit hold the chain (not `released`: the durable root may still reach them).
      const candidate = [...this.#free].find((pageNumber) => listed.has(pageNumber));
      const pageNumber = candidate ?? this.#pageCount++;
      if (candidate !== undefined) {
        this.#free.delete(candidate);
        listed.delete(candidate);
      }
      numbers.push(pageNumber);
    }
    const entries = [...listed];
    const pages = numbers.map((pageNumber, i) => {
      const part = entries.slice(i * freeListEntriesMax, (i + 1) * freeListEntriesMax);
      const body = Buffer.alloc(8 + part.length * 4);
      body.writeUInt32LE(part.length, 0);
      body.writeUInt32LE(numbers[i + 1] ?? noPage, 4);
      for (const [j, entry] of part.entries()) body.writeUInt32LE(entry, 8 + j * 4);
      return encodePage(pageNumber, freeListKind, generation, body);
    });
    return { numbers, pages };
  }

  async #loadFreeChain(): Promise<void> {
    for (let pageNumber = this.#root.freeHead; pageNumber !== noPage; ) {
      const page = await this.#readFromDisk(pageNumber);
      if (page.kind !== freeListKind) throw ChunkdError.corrupt(`page ${pageNumber} of ${this.#paths[0]} should be a free-list page (kind ${freeListKind}) and is of kind ${page.kind}`);
      this.#chain.push(pageNumber);
      const count = page.body.readUInt32LE(0);
      for (let i = 0; i < count; i++) this.#free.add(page.body.readUInt32LE(8 + i * 4));
      pageNumber = page.body.readUInt32LE(4);
    }
  }

  async #writePages(fd: number, numbers: readonly number[], pages: readonly Buffer[]): Promise<void> {
    // Adjacent page numbers go out as one write.
    const order = numbers.map((_, i) => i).sort((a, b) => numbers[a]! - numbers[b]!);
    for (let i = 0; i < order.length; ) {
      let j = i + 1;
      while (j < order.length && numbers[order[j]!] === numbers[order[j - 1]!]! + 1) j++;
      const run = order.slice(i, j).map((k) => pages[k]!);
      await this.#files.write(fd, run.length === 1 ? run[0]! : Buffer.concat(run), numbers[order[i]!]! * pageBytes);
      i = j;
    }
  }

  async #readFromDisk(pageNumber: number): Promise<Page> {
    const problems: string[] = [];
    for (const [copy, fd] of this.#fds.entries()) {
      const bytes = Buffer.alloc(pageBytes);
      const read = await this.#files.read(fd, bytes, pageNumber * pageBytes);
      const page = decodePage(read === pageBytes ? bytes : bytes.subarray(0, read), pageNumber);
      if (typeof page === 'string') {
        problems.push(`${this.#paths[copy]}: ${page}`);
        continue;
      }
      // Whole in this copy: put it back in the copies before it that were not (their durable content is this).
      for (let bad = 0; bad < copy; bad++) {
        await this.#files.write(this.#fds[bad]!, bytes, pageNumber * pageBytes);
        await this.#files.fdatasync(this.#fds[bad]!);
        this.#repairs += 1;
      }
      return page;
    }
    throw ChunkdError.io(`metadata page ${pageNumber} is damaged in both copies (${problems.join('; ')})`);
  }
}
