// Two small on-disk forms the space maps (space-map.ts) keep their own state in, over the page cache, written
// copy-on-write like every page of the paged metadata (a page the durable root names is never written again; a
// changed page goes to a new page number and the old one is released, reusable once the new root is durable):
//  - a PagedTable: an array of entries (a 48-bit value and a 16-bit one), held whole in memory and written as a
//    radix tree of pages (leaves of 508 entries; each level above names 508 pages of the one below; the root
//    names the top page). A flush rewrites only the leaves changed since the last one and the pages above them,
//    so what a commit writes grows with what changed, not with the table. The space maps keep one entry per page
//    of counts in one (8 bytes per 8 MiB of pool): small enough to hold in memory, which is what lets a search
//    for free space skip full pages without reading them. The page allocator names its leaves of free pages in
//    one (page-allocator.ts).
//  - a chain: a list of 48-bit values in pages that each name the next, written whole (for lists that are small
//    or rarely change: the overflow counts; the free-page list of pools before the bitmap, read once to convert).
// Entries, page bodies: little-endian, 6 bytes per 48-bit value.
import { ChunkdError } from '../core/errors.ts';
import type { CachedPage } from './page-cache.ts';
import { pageBodyBytesMax } from './page-file.ts';

/** Page kinds of the space maps (page-file.ts's header byte). */
export const pageKinds = { counts: 0x30, table: 0x31, chain: 0x32, freePages: 0x33 } as const;

const tableEntryBytes = 8;
export const tableEntriesPerPage = Math.floor(pageBodyBytesMax / tableEntryBytes);
const chainNextBytes = 6;
const chainValueBytes = 6;
export const chainValuesPerPage = Math.floor((pageBodyBytesMax - chainNextBytes) / chainValueBytes);

/** Where pages of the metadata go: new page numbers, released ones, and pages to write at the next commit. */
export interface PageSink {
  allocate(): number;
  release(pageNumber: number): void;
  put(pageNumber: number, kind: number, body: Buffer): void;
}

/** Where pages come from (the page cache). */
export interface PageSource {
  get(pageNumber: number): Promise<CachedPage>;
}

/** What a root records of a table. */
export interface TableRoot {
  length: number;
  /** Levels of pages: 0 for an empty table, 1 when the top page is the only leaf. */
  depth: number;
  top: number;
}

export const emptyTable: TableRoot = { length: 0, depth: 0, top: 0 };

export class PagedTable {
  #values: Float64Array;
  #smalls: Uint16Array;
  #length: number;
  /** The 16-bit value of an entry never set. */
  readonly #fill: number;
  /** Page numbers of each level's pages, level 0 the leaves. */
  #levels: number[][] = [];
  /** Leaves changed since the last flush. */
  readonly #dirty = new Set<number>();

  constructor(fill = 0) {
    this.#fill = fill;
    this.#length = 0;
    this.#values = new Float64Array(tableEntriesPerPage);
    this.#smalls = new Uint16Array(tableEntriesPerPage).fill(fill);
  }

  /** Reads a table from its root: every page of it (a table is held whole). */
  static async open(source: PageSource, root: TableRoot, fill = 0): Promise<PagedTable> {
    const table = new PagedTable(fill);
    if (root.depth === 0) {
      if (root.length !== 0 || root.top !== 0) throw ChunkdError.corrupt(`space map table: ${root.length} entries and no pages`);
      return table;
    }
    table.#grow(root.length);
    table.#length = root.length;
    const levels: number[][] = [];
    let pages = [root.top];
    for (let level = root.depth - 1; level >= 0; level--) {
      levels[level] = pages;
      const below: number[] = [];
      const bodies = await Promise.all(pages.map((pageNumber) => readKind(source, pageNumber, pageKinds.table)));
      for (const [index, body] of bodies.entries()) {
        const first = index * tableEntriesPerPage;
        for (let entry = 0; entry * tableEntryBytes < body.length; entry++) {
          const value = body.readUIntLE(entry * tableEntryBytes, 6);
          if (level > 0) below.push(value);
          else if (first + entry < root.length) {
            table.#values[first + entry] = value;
            table.#smalls[first + entry] = body.readUInt16LE(entry * tableEntryBytes + 6);
          }
        }
      }
      pages = below;
    }
    if (levels[0]!.length !== Math.ceil(root.length / tableEntriesPerPage)) throw ChunkdError.corrupt(`space map table: ${levels[0]!.length} leaves for ${root.length} entries`);
    table.#levels = levels;
    return table;
  }

  get length(): number {
    return this.#length;
  }

  /** The pages the table was last flushed to (for a check that every page is named once). */
  pages(): number[] {
    return this.#levels.flat();
  }

  /** The 48-bit value of entry `index` (0 past the end). */
  value(index: number): number {
    return index < this.#length ? this.#values[index]! : 0;
  }

  /** The 16-bit value of entry `index` (the fill past the end). */
  small(index: number): number {
    return index < this.#length ? this.#smalls[index]! : this.#fill;
  }

  /** Sets an entry, growing the table (entries between get 0 and the fill). */
  set(index: number, value: number, small: number): void {
    if (index >= this.#length) {
      this.#grow(index + 1);
      this.#length = index + 1;
    }
    this.#values[index] = value;
    this.#smalls[index] = small;
    this.#dirty.add(Math.floor(index / tableEntriesPerPage));
  }

  /**
   * Writes the leaves changed since the last flush and the pages above them to new page numbers (releasing the old
   * ones), through `sink`; returns what the next root records.
   */
  flush(sink: PageSink): TableRoot {
    if (this.#length === 0) return emptyTable;
    const sizes = [Math.ceil(this.#length / tableEntriesPerPage)];
    while (sizes[sizes.length - 1]! > 1) sizes.push(Math.ceil(sizes[sizes.length - 1]! / tableEntriesPerPage));
    let dirty = new Set(this.#dirty);
    this.#dirty.clear();
    for (let level = 0; level < sizes.length; level++) {
      const pages = this.#levels[level] ?? [];
      for (let index = pages.length; index < sizes[level]!; index++) dirty.add(index);
      const above = new Set<number>();
      for (const index of [...dirty].sort((a, b) => a - b)) {
        const old = pages[index];
        if (old !== undefined) sink.release(old);
        const pageNumber = sink.allocate();
        pages[index] = pageNumber;
        sink.put(pageNumber, pageKinds.table, this.#encode(level, index));
        above.add(Math.floor(index / tableEntriesPerPage));
      }
      this.#levels[level] = pages;
      dirty = above;
    }
    return { length: this.#length, depth: sizes.length, top: this.#levels[sizes.length - 1]![0]! };
  }

  #encode(level: number, index: number): Buffer {
    const first = index * tableEntriesPerPage;
    if (level === 0) {
      const count = Math.min(tableEntriesPerPage, this.#length - first);
      const body = Buffer.alloc(count * tableEntryBytes);
      for (let entry = 0; entry < count; entry++) {
        body.writeUIntLE(this.#values[first + entry]!, entry * tableEntryBytes, 6);
        body.writeUInt16LE(this.#smalls[first + entry]!, entry * tableEntryBytes + 6);
      }
      return body;
    }
    const children = this.#levels[level - 1]!.slice(first, first + tableEntriesPerPage);
    const body = Buffer.alloc(children.length * tableEntryBytes);
    for (const [entry, child] of children.entries()) body.writeUIntLE(child, entry * tableEntryBytes, 6);
    return body;
  }

  #grow(length: number): void {
    if (length <= this.#values.length) return;
    const capacity = Math.max(length, this.#values.length * 2);
    const values = new Float64Array(capacity);
    values.set(this.#values);
    const smalls = new Uint16Array(capacity).fill(this.#fill);
    smalls.set(this.#smalls);
    this.#values = values;
    this.#smalls = smalls;
  }
}

/** Pages a chain of `count` values takes. */
export function chainPagesFor(count: number): number {
  return Math.ceil(count / chainValuesPerPage);
}

/** Writes `values` into the pages `pageNumbers` (in order, each naming the next); returns the first (0: none). */
export function writeChain(sink: PageSink, pageNumbers: readonly number[], values: readonly number[]): number {
  if (values.length > pageNumbers.length * chainValuesPerPage) throw new Error(`a chain of ${pageNumbers.length} pages holds at most ${pageNumbers.length * chainValuesPerPage} values, not ${values.length}`);
  for (const [index, pageNumber] of pageNumbers.entries()) {
    const part = values.slice(index * chainValuesPerPage, (index + 1) * chainValuesPerPage);
    const body = Buffer.alloc(chainNextBytes + part.length * chainValueBytes);
    body.writeUIntLE(pageNumbers[index + 1] ?? 0, 0, 6);
    for (const [i, value] of part.entries()) body.writeUIntLE(value, chainNextBytes + i * chainValueBytes, 6);
    sink.put(pageNumber, pageKinds.chain, body);
  }
  return pageNumbers[0] ?? 0;
}

/** Reads a chain from its first page: its pages and its values (`count` of them, as its root recorded). */
export async function readChain(source: PageSource, first: number, count: number): Promise<{ pages: number[]; values: number[] }> {
  const pages: number[] = [];
  const seen = new Set<number>();
  const values: number[] = [];
  for (let pageNumber = first; pageNumber !== 0; ) {
    if (seen.has(pageNumber) || values.length > count) throw ChunkdError.corrupt(`space map chain from page ${first}: a loop, or more than the ${count} values its root records`);
    pages.push(pageNumber);
    seen.add(pageNumber);
    const body = await readKind(source, pageNumber, pageKinds.chain);
    for (let offset = chainNextBytes; offset < body.length; offset += chainValueBytes) values.push(body.readUIntLE(offset, 6));
    pageNumber = body.readUIntLE(0, 6);
  }
  if (values.length !== count) throw ChunkdError.corrupt(`space map chain from page ${first}: ${values.length} values, the root says ${count}`);
  return { pages, values };
}

/** A page's body, refused as damage if the page is not of the kind expected. */
export async function readKind(source: PageSource, pageNumber: number, kind: number): Promise<Buffer> {
  const page = await source.get(pageNumber);
  if (page.kind !== kind) throw ChunkdError.corrupt(`metadata page ${pageNumber}: kind ${page.kind}, expected ${kind}`);
  return page.body;
}
