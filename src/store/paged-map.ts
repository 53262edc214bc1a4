// A volume's (or snapshot's) chunk map as a copy-on-write B+tree in pages of the page cache (step 2 of the plan in
// paged-metadata.md; nothing in the pool uses it yet). Keyed by virtual chunk; a leaf entry is (virtual chunk,
// physical chunk, crc32 of the chunk), 16 bytes, up to 253 to a page; an interior entry is (the least key below
// it, child page), 12 bytes, up to 338 to a page. The maps of a pool share one `PagedMaps` (cache, page allocator,
// page reference counts); a `PagedMap` is a root page number and a count of chunks mapped, which is all a root slot
// needs to record of it.
//
// Layout of a page body (little-endian; the page header, crc and copies are page-file.ts's):
//   leaf (kind 1):     u16 entry count | u16 0 | entries of u48 virtual chunk, u48 physical chunk, u32 crc32
//   interior (kind 2): u16 child count | u8 level (1 above the leaves) | u8 0 | entries of u48 key, u48 page
//
// Invariants (checked by the model test, test/unit/paged-map.test.ts):
//   1. Keys are strictly increasing in a node; an interior key is the least virtual chunk of its child's subtree,
//      and every child of an interior node at level L is at level L - 1 (all leaves at level 0).
//   2. No node is empty; a node other than a root holds at least half its capacity (rounded down, at least one).
//   3. A page's reference count is the number of maps holding it as their root plus the number of interior pages
//      naming it, each distinct page counted once, whatever the number of maps reaching it.
//   4. A chunk's reference count (ChunkRefs) is the number of distinct leaf pages naming it, exactly the rule of
//      chunk-map.ts's pages: copying a leaf adds one to each chunk it names, freeing one removes one.
//   5. A page the durable root can reach is never rewritten: only a page allocated since the last commit (fresh,
//      dirty) and held once is changed in place (its page number reused); any other is copied to a new page, and
//      the old one, once no longer referenced, goes to `PageAllocator.release` (reusable after the next commit).
//
// Sharing, as dm-thin's mapping trees: `clone` takes one more reference on the root page (O(1), no page written);
// a write below a page held more than once copies the path from it down, each copy taking a reference on the
// children it names (or, for a leaf, on the chunks). `drop` releases the root; pages whose count falls to zero
// release their children in turn. `diff` walks two trees in key order and skips a page both reach.
//
// Leaves are kept as their page images (`LeafPage`: the body's layout as 32-bit words), interior nodes decoded
// into arrays. A leaf read from the cache is checked, not decoded (its words a view of the cached body); a leaf
// copied for changing has room for 16 more entries (grown by doubling past them); a commit hands a changed
// leaf's words to the cache as its page's body (no encoding), and the leaf is frozen from then on: the next
// change copies it (one copy of up to 4 KiB a leaf per checkpoint). paged-metadata.md, "Leaves as their page
// images".
//
// Shape of an operation: a pure synchronous pass over nodes in memory computes every change (new nodes, count
// changes, pages freed) and then applies it, in one turn of the event loop. The pass reads pages through `Pins`:
// a page not in the cache stops the pass (`MissingPages`, with every missing page it can name at once), the pages
// are read (async, in parallel), kept in the pins so that eviction cannot take them again, and the pass starts
// over. So a pass never sees a half-applied change, and the tree logic (check, split, merge) stays pure.
// Counts kept in pages (space-map.ts's RefCountMap, given as `pageCountPages` and `chunkCountPages`) are loaded
// the same way: a pass stops at a page count not in memory, and before it applies it names every count it will
// change (the pages whose counts move, the pages it will allocate, the chunks counted up or down); those are
// loaded and pinned until it has applied. A drop loads the counts of each page it frees as it goes.
// Mutations (mapRun, unmapRange, drop) and commits are applied in the order they were called; reads see what was
// applied.
//
// Nodes changed since the last commit stay in `PagedMaps` (not in the cache, which holds page images) until
// `commit` hands them to the cache, an interior node encoded, a leaf as its own words; `dirtyPages` counts them.
//
// Lookups: a node in memory lives on its cached page (`CachedPage.decoded`). A one-chunk lookup (`#runCached`, a
// 4 KiB read's) takes the root's node from the map (`PagedMap.rootNode`, forgotten at every `setState`: a pass may
// place a new node on the page it leaves, the root's among them) and each interior node below the root from its
// parent (`InteriorNode.below`, filled as lookups pass), and a clean leaf from its parent too (`InteriorNode.leaves`:
// the `LeafPage` over its cached page's body, searched in its words, held only while the page is in the cache, whose
// use is recorded in the cache once per eviction: `#leafRun`, and paged-metadata.md, "Leaves held by their
// parents"). Right for a node's whole life: an interior node above the leaves' parents never changes once placed (a
// change below it copies the path up to the root, new nodes holding nothing below); a leaves' parent changed since
// the commit may name a new leaf in place (`#mapInPlace`, which empties what it held of the old leaf); and a page a
// node names keeps its content while it names it (a leaf changed in place is the same object, and a clean page's
// image never changes: a change puts a new page). An interior node so held stays while its parent does, cached or
// not: a 160th to a 250th of the leaves, beside the cache's bound.
//
// `drop` is the exception: not one pass (a large map would pin all its pages and free them in one turn), it walks
// the pages it frees one at a time, in slices.
//
// Batches and the fast way: `mapRuns` applies many runs in one pass (a replay's records: each leaf and the path
// above it copied once for all the runs that meet it), and a one-run mapRun below interior nodes all dirty and held
// once goes in without a pass (`#mapInPlace`): a dirty leaf changed in place, no page placed; a leaf committed since
// its last change (held once) copied to a new page (its words are its committed image, frozen), and its parent
// changed in place to name it; so does one over chunks all mapped across several dirty leaves
// (`#overwriteInPlace`: a large write's overwrite). A pass's chunk count changes are runs
// (`ChunkRunList`), applied a run at a time where the counts can (space-map.ts's ChunkSpace). Before a replay's batch, `prefetchRuns`
// reads the pages its pass will visit and pins the pages of chunk counts it will change (within the cache's size),
// so that a cold pass computes its edit once instead of again after missing counts.
//
// Known weaknesses: any other change (a pass: the first write below interior nodes after a commit, a split, a
// merge, a new least key, a shared node) copies the nodes on its path whole (an interior node's arrays of up to
// 338 numbers each, a leaf's 4 KiB of words); an interior node in memory takes more than its image (two arrays of
// numbers: about 5 KiB against 4, counted by the cache with its page; they are a 160th to a 250th of the nodes); a
// leaf copied for changing is a new 4 KiB (or less) typed array, many of them between two full collections, where
// its arrays were V8's (the bytes a write allocates are about the same, more of them outside V8's heap: the main
// malloc arena holds them until a full collection; the longest pause while writing was longer than with decoded
// leaves in some bench:scale rounds, not explained yet: BENCHMARKS.md, "Leaves as their page images"); leaves
// filled by appends in key order end about half full (a split shares entries evenly); a commit's first part
// is queued with the mutations (they wait for its nodes' hand-over to the cache, interior ones encoded, not for
// its write: `commitBeside`; it gives the event loop a turn every few ms, but the mutations, and the reads after
// them, wait for all of it);
// a pass that misses a page count starts over once per page of counts missed (2,032 pages a page of counts, so
// rarely); a walk does not check page generations against the
// root's yet; a cold diff starts over once per node whose children differ on both sides (it reads a node's
// children at once, not a whole level of both trees: a few restarts per thousand leaves at full capacity), and
// every restart walks again from the roots; a pass that starts over keeps the nodes it read, and a page freed,
// reused and evicted between two tries would be seen as it was (reuse waits for a commit, so this needs a
// checkpoint and an eviction within one pass).
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { assert } from '../core/assert.ts';
import { ChunkdError, isNoSpace } from '../core/errors.ts';
import { continuesRun, type ChunkRefs, type ChunkRun } from './chunk-map.ts';
import type { ChangedExtent } from './map-diff.ts';
import type { PageAllocator } from './page-allocator.ts';
import type { CachedPage, PageCache } from './page-cache.ts';
import { firstDataPage, pageBodyBytesMax, pageBytes, type Root } from './page-file.ts';

/** Reference counts of metadata pages (space-map.ts will keep them in pages); a page at zero is free. */
export interface PageRefs {
  get(page: number): number;
  increment(page: number): void;
  /** Returns the count after. */
  decrement(page: number): number;
}

export const mapLeafKind = 1;
export const mapInteriorKind = 2;
const nodeHeaderBytes = 4;
const leafEntryBytes = 16;
const interiorEntryBytes = 12;
export const leafCapacityMax = Math.floor((pageBodyBytesMax - nodeHeaderBytes) / leafEntryBytes);
export const interiorCapacityMax = Math.floor((pageBodyBytesMax - nodeHeaderBytes) / interiorEntryBytes);
/** Virtual and physical chunks are 48-bit on a page. */
export const mapKeyLimit = 2 ** 48;

/** Whether a run of `chunkCount` chunks mapped from `virtualChunk` to `physicalChunk` is one a map takes. */
const runInRange = (virtualChunk: number, physicalChunk: number, chunkCount: number): boolean =>
  chunkCount > 0 && virtualChunk >= 0 && physicalChunk >= 0 && virtualChunk + chunkCount <= mapKeyLimit && physicalChunk + chunkCount <= mapKeyLimit;
/** The root page of an empty map (page 0 is a root slot, never a node). */
export const emptyRoot = 0;

/** A page's body read as 32-bit words of the machine's order is its layout little-endian, as written (else converted at the page's edge). */
const wordsInPageOrder = os.endianness() === 'LE';
/** The heap a `LeafPage` takes beside its words (its object, the typed array's and the buffer's, about). */
const leafObjectBytes = 256;
/**
 * Entries a leaf copied for changing has room for beyond its own (`copy`, `slice`, `concat`): the 4 KiB writes into
 * holes between two checkpoints insert a few entries a leaf at scale (more grow it: `#shift`). Not a full page's room:
 * every byte of a copy is allocated again at each checkpoint interval, and a leaf's words are its image once
 * committed, held while it is cached.
 */
const leafRoom = 16;
/** The key of entry `i` of a leaf's words (`LeafPage.words`): its low 32 bits, then its high 16 in the next word's low half. */
const viewKey = (words: Uint32Array, i: number): number => words[1 + 4 * i]! + (words[2 + 4 * i]! & 0xffff) * 2 ** 32;
/** Words of a leaf of `entries` entries: the header's one, four an entry. */
const leafWords = (entries: number): number => 1 + 4 * entries;

/**
 * A leaf in its page image's layout (the body `encodeNode` writes: u16 count, u16 0, then 16-byte entries of u48
 * virtual chunk, u48 physical chunk, u32 crc32), as 32-bit words: entry i at word 1 + 4i is the key's low 32 bits,
 * then the key's high 16 bits and the physical chunk's low 16, the physical chunk's high 32, the crc32. So a leaf
 * read from its page is checked, not decoded (its words a view of the cached body), and a leaf changed since the
 * last commit is its own image: the commit hands its words to the cache as the page's body, not encoded. A leaf
 * copied for changing has room for `leafRoom` more entries (an insert moves the entries after it, most often
 * without reallocating), grown by doubling past them (beyond a page's where a pass builds one it will split). A leaf whose words are a page's image (read from the cache, or
 * committed) is frozen: it is never changed again, and a change copies it (`copy`).
 */
export class LeafPage {
  readonly kind = 'leaf' as const;
  #words: Uint32Array;
  #count: number;
  #frozen: boolean;
  /** Whether its words are a cached page's body (counted with the page), not a copy of its own. */
  #sharesImage: boolean;

  private constructor(words: Uint32Array, count: number, frozen: boolean, sharesImage: boolean) {
    this.#words = words;
    this.#count = count;
    this.#frozen = frozen;
    this.#sharesImage = sharesImage;
  }

  /** An empty leaf with room for `room` entries. */
  static empty(room: number = leafRoom): LeafPage {
    return new LeafPage(new Uint32Array(leafWords(room)), 0, false, false);
  }

  /** A leaf of these entries (for tests and tools). */
  static of(keys: readonly number[], physical: readonly number[], sums: readonly number[]): LeafPage {
    assert(physical.length === keys.length && sums.length === keys.length);
    const leaf = LeafPage.empty(keys.length + leafRoom);
    for (let i = 0; i < keys.length; i++) leaf.#write(i, keys[i]!, physical[i]!, sums[i]!);
    leaf.#count = keys.length;
    return leaf;
  }

  /**
   * The leaf on a page, checked as `decodeNode` checks one (count, size, keys in order): its words a view of the
   * page's body where the machine's order and the body's alignment allow (the usual case), else a copy. Frozen.
   */
  static fromPage(page: CachedPage, fail: (why: string) => never): LeafPage {
    const body = page.body;
    const count = body.readUInt16LE(0);
    if (count > leafCapacityMax || body.length !== nodeHeaderBytes + count * leafEntryBytes) fail(`${count} leaf entries in ${body.length} bytes`);
    let words: Uint32Array;
    const sharesImage = wordsInPageOrder && body.byteOffset % 4 === 0;
    if (sharesImage) words = new Uint32Array(body.buffer, body.byteOffset, body.length / 4);
    else {
      words = new Uint32Array(body.length / 4);
      for (let j = 0; j < words.length; j++) words[j] = body.readUInt32LE(4 * j);
    }
    const leaf = new LeafPage(words, count, true, sharesImage);
    for (let i = 1; i < count; i++) if (leaf.keyAt(i) <= leaf.keyAt(i - 1)) fail('keys out of order');
    return leaf;
  }

  get count(): number {
    return this.#count;
  }

  /** The words, entry i at word 1 + 4i (for a lookup's search, `viewLowerBound`); only the first `count` entries are the leaf's. */
  get words(): Uint32Array {
    return this.#words;
  }

  /** Whether it is a page's image, never to change again. */
  get frozen(): boolean {
    return this.#frozen;
  }

  /** The memory it takes beside a cached page's image (counted with the page: `PageCache.hold`): its words too where they are not the image. */
  get heldBytes(): number {
    return leafObjectBytes + (this.#sharesImage ? Math.max(0, this.#words.byteLength - pageBytes) : this.#words.byteLength);
  }

  keyAt(i: number): number {
    return viewKey(this.#words, i);
  }

  physicalAt(i: number): number {
    const w = this.#words;
    return (w[2 + 4 * i]! >>> 16) + w[3 + 4 * i]! * 65536;
  }

  sumAt(i: number): number {
    return this.#words[4 + 4 * i]!;
  }

  /** The first entry whose key is at or above `key` (`count` if none). */
  lowerBound(key: number): number {
    let lo = 0;
    let hi = this.#count;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.keyAt(mid) < key) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** The physical chunks it names, in key order. */
  physicalChunks(): number[] {
    const chunks = new Array<number>(this.#count);
    for (let i = 0; i < this.#count; i++) chunks[i] = this.physicalAt(i);
    return chunks;
  }

  /** Its entries as arrays (for checks, tests and tools). */
  entries(): { keys: number[]; physical: number[]; sums: number[] } {
    const keys: number[] = [];
    const physical: number[] = [];
    const sums: number[] = [];
    for (let i = 0; i < this.#count; i++) {
      keys.push(this.keyAt(i));
      physical.push(this.physicalAt(i));
      sums.push(this.sumAt(i));
    }
    return { keys, physical, sums };
  }

  /** Entry `i` maps to `physical` with `sum` (its key stays). */
  set(i: number, physical: number, sum: number): void {
    assert(!this.#frozen && i < this.#count);
    this.#write(i, this.keyAt(i), physical, sum);
  }

  /** Entry `key` inserted at `i` (the first entry at or above it). */
  insert(i: number, key: number, physical: number, sum: number): void {
    this.#shift(i, i, 1);
    this.#write(i, key, physical, sum);
  }

  /** Entries [from, to) removed. */
  remove(from: number, to: number): void {
    this.#shift(from, to, 0);
  }

  /**
   * Entries [from, to) replaced by `count` entries of consecutive keys from `key` and consecutive physical chunks
   * from `physical`, with the sums `sums[sumsFrom..]` (read as unsigned).
   */
  replaceRun(from: number, to: number, count: number, key: number, physical: number, sums: ArrayLike<number>, sumsFrom: number): void {
    this.#shift(from, to, count);
    for (let i = 0; i < count; i++) this.#write(from + i, key + i, physical + i, sums[sumsFrom + i]!);
  }

  /** A copy to change (with room for `leafRoom` more entries). */
  copy(): LeafPage {
    return this.slice(0, this.#count);
  }

  /** Entries [from, to) as a new leaf, with room for `leafRoom` more entries. */
  slice(from: number, to: number): LeafPage {
    const count = to - from;
    const copy = LeafPage.empty(count + leafRoom);
    copy.#words.set(this.#words.subarray(leafWords(from), leafWords(to)), 1);
    copy.#count = count;
    return copy;
  }

  /** Its entries then `other`'s, as a new leaf (whose keys must follow its own). */
  concat(other: LeafPage): LeafPage {
    const count = this.#count + other.#count;
    const joined = LeafPage.empty(count + leafRoom);
    joined.#words.set(this.#words.subarray(1, leafWords(this.#count)), 1);
    joined.#words.set(other.#words.subarray(1, leafWords(other.#count)), leafWords(this.#count));
    joined.#count = count;
    return joined;
  }

  /**
   * The page's body, `encodeNode`'s layout: its words themselves where the machine's order is the page's (no copy),
   * and from then on it is frozen (the body is the cache's, which must not change).
   */
  image(): Buffer {
    const count = this.#count;
    assert(count <= leafCapacityMax);
    this.#frozen = true;
    const bytes = nodeHeaderBytes + count * leafEntryBytes;
    if (wordsInPageOrder) {
      this.#words[0] = count;
      this.#sharesImage = true;
      return Buffer.from(this.#words.buffer, this.#words.byteOffset, bytes);
    }
    const body = Buffer.alloc(bytes);
    body.writeUInt16LE(count, 0);
    for (let j = 1; j < bytes / 4; j++) body.writeUInt32LE(this.#words[j]!, 4 * j);
    return body;
  }

  #write(i: number, key: number, physical: number, sum: number): void {
    const w = this.#words;
    const at = 1 + 4 * i;
    const physicalLow = physical % 65536;
    w[at] = key % 2 ** 32;
    w[at + 1] = Math.floor(key / 2 ** 32) + physicalLow * 65536;
    w[at + 2] = (physical - physicalLow) / 65536;
    w[at + 3] = sum;
  }

  /**
   * Makes entries [from, to) take `count` entries' room (the ones after them moved), growing the words if need be:
   * to twice its entries, at most a full page's while it fits one (a pass building a leaf it will split grows past).
   */
  #shift(from: number, to: number, count: number): void {
    assert(!this.#frozen && from <= to && to <= this.#count);
    const total = this.#count - (to - from) + count;
    if (leafWords(total) > this.#words.length) {
      const doubled = total <= leafCapacityMax ? Math.min(leafCapacityMax, 2 * this.#count) : 2 * this.#count;
      const grown = new Uint32Array(leafWords(Math.max(total, doubled)));
      grown.set(this.#words.subarray(0, leafWords(this.#count)));
      this.#words = grown;
    }
    if (count !== to - from) this.#words.copyWithin(leafWords(from + count), leafWords(to), leafWords(this.#count));
    this.#count = total;
  }
}

/** A leaf, in its page image's layout. */
export type LeafNode = LeafPage;

export interface InteriorNode {
  kind: 'interior';
  /** 1 for the parents of leaves. */
  level: number;
  keys: number[];
  children: number[];
  /**
   * Above level 1: the decoded interior nodes below it by child index, as lookups found them (`#runCached`), held
   * while this node is, so that a lookup pays the cache for its leaf only (see "Lookups" at `PagedMaps`). Undefined
   * until the first lookup through it; set on nodes of this file only.
   */
  below?: Array<InteriorNode | undefined>;
  /**
   * At level 1: the leaves below it by child index, each the `LeafPage` over its clean cached page's body, as
   * lookups found them, held while the page is cached (`PageCache.holdOutside` empties the slot when it leaves),
   * and the cache's eviction count when each one's use was last recorded (`leafUses`). See "Lookups" at `PagedMaps`.
   */
  leaves?: Array<LeafPage | undefined>;
  leafUses?: number[];
}

export type MapNode = LeafNode | InteriorNode;

/** A hole (`physicalChunk` -1, no sums) or a physically contiguous run with the crc32 of each chunk. */
export interface PagedRun extends ChunkRun {
  sums: number[];
}

export const levelOf = (node: MapNode): number => (node.kind === 'leaf' ? 0 : node.level);

/** The page image of a node: a leaf's is its own words, the leaf frozen from then on (`LeafPage.image`). */
export function encodeNode(node: MapNode): CachedPage {
  if (node.kind === 'leaf') return { kind: mapLeafKind, body: node.image() };
  const count = node.keys.length;
  assert(count <= interiorCapacityMax && node.children.length === count && node.level >= 1 && node.level < 256);
  const body = Buffer.alloc(nodeHeaderBytes + count * interiorEntryBytes);
  body.writeUInt16LE(count, 0);
  body.writeUInt8(node.level, 2);
  for (let i = 0, at = nodeHeaderBytes; i < count; i++, at += interiorEntryBytes) {
    body.writeUIntLE(node.keys[i]!, at, 6);
    body.writeUIntLE(node.children[i]!, at + 6, 6);
  }
  return { kind: mapInteriorKind, body };
}

/**
 * The memory a node in memory takes beside its page's image, about: a leaf's object (its words are the image's,
 * or a copy of them: `LeafPage.heldBytes`); an interior node's two arrays of numbers (V8, Node 24: 8 bytes an
 * element and their headers; measured 4,986 bytes for one of 300 children). The cache counts it with the page
 * (`PageCache.hold`).
 */
export const decodedBytes = (node: MapNode): number => (node.kind === 'leaf' ? node.heldBytes : 128 + node.keys.length * 16);

/** The node on a page, checked (sizes, order, page numbers); ECORRUPT naming the page when it is not one. */
export function decodeNode(page: CachedPage, pageNumber: number): MapNode {
  const fail = (why: string): never => {
    throw ChunkdError.corrupt(`metadata page ${pageNumber}: not a chunk map node (${why})`);
  };
  const body = page.body;
  if (body.length < nodeHeaderBytes) fail(`a body of ${body.length} bytes`);
  const count = body.readUInt16LE(0);
  if (count === 0) fail('no entries');
  if (page.kind === mapLeafKind) return LeafPage.fromPage(page, fail);
  const keys = new Array<number>(count);
  if (page.kind !== mapInteriorKind) fail(`page kind ${page.kind}`);
  const level = body.readUInt8(2);
  if (level === 0 || count > interiorCapacityMax || body.length !== nodeHeaderBytes + count * interiorEntryBytes) fail(`${count} children at level ${level} in ${body.length} bytes`);
  const children = new Array<number>(count);
  for (let i = 0, at = nodeHeaderBytes; i < count; i++, at += interiorEntryBytes) {
    keys[i] = body.readUIntLE(at, 6);
    children[i] = body.readUIntLE(at + 6, 6);
    if (i > 0 && keys[i]! <= keys[i - 1]!) fail('keys out of order');
    if (children[i]! < firstDataPage) fail(`a child at page ${children[i]}`);
  }
  return { kind: 'interior', level, keys, children, below: undefined, leaves: undefined, leafUses: undefined };
}

/**
 * The first entry of a leaf's words (`LeafPage.words`) of `count` entries whose key is at or above `key`, given that the leaf's keys
 * lie in [`from`, `to`) (its parent's keys around it): a first probe where `key` would be if the keys were spread
 * evenly over that range (random writes spread them so; sequential ones fill it), then steps of doubling length
 * from there to a pair of entries around `key`, then a binary search between them. So a leaf of keys spread
 * evenly is searched in a few neighbouring cache lines (a binary search from the middle touches about six of a
 * full leaf's 64), and any other in at most about twice a binary search's probes.
 */
function viewLowerBound(words: Uint32Array, count: number, key: number, from: number, to: number): number {
  let guess = Math.floor(((key - from) / (to - from)) * count);
  if (!(guess >= 0)) guess = 0;
  else if (guess >= count) guess = count - 1;
  // Invariant of the binary search below: entries before lo are below key, entries from hi on are at or above it.
  let lo: number;
  let hi: number;
  if (viewKey(words, guess) < key) {
    lo = guess + 1;
    hi = count;
    for (let step = 1; lo < count; step *= 2) {
      const probe = Math.min(count - 1, guess + step);
      if (viewKey(words, probe) >= key) {
        hi = probe;
        break;
      }
      lo = probe + 1;
    }
  } else {
    hi = guess;
    lo = 0;
    for (let step = 1; hi > 0; step *= 2) {
      const probe = Math.max(0, guess - step);
      if (viewKey(words, probe) < key) {
        lo = probe + 1;
        break;
      }
      hi = probe;
    }
  }
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (viewKey(words, mid) < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The one-chunk run of `virtualChunk` in a leaf. */
function leafRun(leaf: LeafPage, virtualChunk: number): PagedRun[] {
  const i = leaf.lowerBound(virtualChunk);
  if (i < leaf.count && leaf.keyAt(i) === virtualChunk) return [{ virtualChunk, chunkCount: 1, physicalChunk: leaf.physicalAt(i), sums: [leaf.sumAt(i)] }];
  return [{ virtualChunk, chunkCount: 1, physicalChunk: -1, sums: [] }];
}

/** Pages a drop frees between two turns of the event loop. */
const dropSliceNodes = 256;
/**
 * Chunks whose counts `uniqueChunks` loads at once, in order of chunk: at most this many pages of counts pinned
 * (16 MiB where every chunk falls in a page of its own), far fewer where the chunks are dense.
 */
const uniqueCountRun = 4096;
/** A commit encodes its dirty nodes for about this long between two turns of the event loop (checked every `commitSliceCheck` nodes). */
const commitSliceMs = 5;
const commitSliceCheck = 16;
/**
 * Mutations queued one behind another (the records that arrived while a checkpoint encoded its nodes: thousands once
 * the map is much larger than a journal's records touch) run as one chain of promises, without a turn of the event
 * loop between them when their nodes are in memory; after this long, the next waits for a turn.
 */
const mutationRunMs = 5;

/** Resolves after the event loop's next turn (its timers and I/O callbacks run first). */
const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

function checkLevel(node: MapNode, page: number, level: number | undefined): MapNode {
  if (level !== undefined && levelOf(node) !== level) throw ChunkdError.corrupt(`metadata page ${page}: a chunk map node at level ${levelOf(node)} where its parent expects level ${level}`);
  return node;
}

/** The least node fill of a non-root node (invariant 2). */
export const minFill = (capacity: number): number => Math.max(1, Math.floor(capacity / 2));

/** Sizes of the fewest nodes of at most `capacity` that hold `total` items, as even as can be. */
export function splitSizes(total: number, capacity: number): number[] {
  const parts = Math.ceil(total / capacity);
  const base = Math.floor(total / parts);
  const sizes: number[] = [];
  for (let i = 0; i < parts; i++) sizes.push(base + (i < total % parts ? 1 : 0));
  return sizes;
}

/** The index of the child whose range holds `key`: the last key at or below it (0 below the first). */
export function childIndex(keys: readonly number[], key: number): number {
  let lo = 0;
  let hi = keys.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (keys[mid]! <= key) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/**
 * Thrown by a pass that needs pages the cache does not hold, or counts not in memory (not an Error: never escapes
 * `PagedMaps`): map pages, and the indexes of page counts and chunk counts whose pages of counts must be loaded.
 */
class MissingPages {
  readonly pages: number[];
  readonly pageCounts: number[];
  readonly chunkCounts: number[];
  constructor(pages: number[], pageCounts: number[] = [], chunkCounts: number[] = []) {
    this.pages = pages;
    this.pageCounts = pageCounts;
    this.chunkCounts = chunkCounts;
  }
}

/**
 * Counts kept in pages that must be loaded before they are read or changed (space-map.ts's RefCountMap, whose
 * `load` pins them). Absent, counts are always in memory (ChunkRefcounts, a Map in tests).
 */
export interface CountPages {
  /** Whether the count of `index` can be read and changed now. */
  loaded(index: number): boolean;
  load(indexes: Iterable<number>): Promise<{ release(): void }>;
}

/**
 * Children in a node being built, as parallel arrays (no object per child): the least key below each, and each
 * an existing page (kept, with the reference its old parent held) or a new node.
 */
interface Outs {
  keys: number[];
  items: Item[];
}
type Item = number | Built;
/** A node being built by a pass. */
type Built = LeafNode | ({ kind: 'interior'; level: number } & Outs);

const builtSize = (built: Built): number => (built.kind === 'leaf' ? built.count : built.keys.length);

/**
 * Chunks counted up or down by a pass, in order, as runs of consecutive chunks (a large write's 256 chunks are one
 * run, and so, most often, are the chunks it replaces): the counts change a run at a time (ChunkRefs' run calls).
 */
class ChunkRunList {
  readonly starts: number[] = [];
  readonly counts: number[] = [];
  /** The chunks of all its runs. */
  chunks = 0;

  get empty(): boolean {
    return this.starts.length === 0;
  }

  push(chunk: number): void {
    this.pushRun(chunk, 1);
  }

  pushRun(start: number, count: number): void {
    this.chunks += count;
    const last = this.starts.length - 1;
    if (last >= 0 && this.starts[last]! + this.counts[last]! === start) this.counts[last]! += count;
    else {
      this.starts.push(start);
      this.counts.push(count);
    }
  }
}

/** Everything a pass changes, applied at its end in one go (increments before decrements, so no count dips to zero). */
class Changes {
  readonly pageDelta = new Map<number, number>();
  readonly chunkIncrements = new ChunkRunList();
  readonly chunkDecrements = new ChunkRunList();
  /** Pages left by the tree that were fresh (never committed): their numbers are reused by the new nodes. */
  readonly reusable: number[] = [];
  /** Pages left by the tree that a durable root may still name: released. */
  readonly freed: number[] = [];
  mappedDelta = 0;
  readonly #refs: PageRefs;
  readonly #countPages: CountPages | undefined;

  constructor(refs: PageRefs, countPages: CountPages | undefined) {
    this.#refs = refs;
    this.#countPages = countPages;
  }

  /** The count `page` will have once these changes apply (its page of counts loaded first: the pass stops if not). */
  count(page: number): number {
    if (this.#countPages !== undefined && !this.#countPages.loaded(page)) throw new MissingPages([], [page]);
    return this.#refs.get(page) + (this.pageDelta.get(page) ?? 0);
  }

  add(page: number, delta: number): void {
    this.pageDelta.set(page, (this.pageDelta.get(page) ?? 0) + delta);
  }
}

export interface PagedMapsOptions {
  cache: PageCache;
  allocator: PageAllocator;
  pageRefs: PageRefs;
  /** Entries per leaf, at most `leafCapacityMax` (smaller in tests, for deep trees). */
  leafCapacity?: number;
  interiorCapacity?: number;
  /**
   * Where page counts and chunk counts are kept in pages that must be loaded first (space-map.ts): a pass then
   * loads the counts it will read or change alongside the map pages it visits, and pins them until it applies.
   */
  pageCountPages?: CountPages;
  chunkCountPages?: CountPages;
  /** How long a commit encodes dirty nodes between two turns of the event loop (default `commitSliceMs`; 0 in tests: a turn every few nodes). */
  commitSliceMs?: number;
  /** How long mutations run back to back before the next waits for a turn of the event loop (default `mutationRunMs`; 0: a turn before every mutation but the first of a turn). */
  mutationRunMs?: number;
}

/**
 * A mapRuns or unmapRange: the keys it covers, as sorted, disjoint ranges [starts[i], ends[i]) (at least one), and
 * what it does to a leaf there. A pass visits only the children whose range meets one of them.
 */
interface Edit {
  starts: readonly number[];
  ends: readonly number[];
  /** Rewrites the entries of a private leaf whose range is [lo, hi), recording chunk and count changes. */
  apply(leaf: LeafNode, lo: number, hi: number, changes: Changes): LeafNode;
  /**
   * Only adds or replaces entries (a mapRuns): no node ends below its fill (a split's parts are at least half
   * full), so a pass needs no neighbour of a child it changes. Were one needed, the pass would miss it and read it.
   */
  grows?: boolean;
}

const editFirst = (edit: Edit): number => edit.starts[0]!;
const editEnd = (edit: Edit): number => edit.ends[edit.ends.length - 1]!;

/** The index of the first of `edit`'s ranges that ends above `key` (its count if none). */
function firstRangeAbove(edit: Edit, key: number): number {
  let lo = 0;
  let hi = edit.ends.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (edit.ends[mid]! <= key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** A node a pass visits, and the keys that route to it. */
interface Visit {
  page: number;
  lo: number;
  hi: number;
}

/** Reads at once of `PagedMaps.prefetchRuns` (libuv's pool runs 16: chunkd's `UV_THREADPOOL_SIZE`). */
const prefetchReads = 64;
/** Less than the counts in a page of counts (space-map.ts's `countsPerPage`, 2,032): a span stepped by it names each page. */
const chunkCountsPageStep = 1024;

/** Adds to `into` the children of `node` (visited as `visit`) that an edit visits: those it meets, and a neighbour on each side (none for an edit that `grows`). */
function visitedChildren(node: InteriorNode, visit: Visit, edit: Edit, into: Visit[]): void {
  const { lo, hi } = visit;
  const count = node.children.length;
  const side = edit.grows === true ? 0 : 1;
  let after = -1;
  for (const touched of touchedChildren(node.keys, lo, hi, edit)) {
    for (let i = Math.max(after + 1, touched - side); i <= Math.min(count - 1, touched + side); i++) {
      into.push({ page: node.children[i]!, lo: i === 0 ? lo : node.keys[i]!, hi: i === count - 1 ? hi : node.keys[i + 1]! });
      after = i;
    }
  }
}

/** Adds to `into` the physical chunks `leaf` (visited as `visit`) maps at keys `edit` changes. */
function mappedUnder(leaf: LeafNode, visit: Visit, edit: Edit, into: number[]): void {
  for (let r = firstRangeAbove(edit, visit.lo); r < edit.starts.length && edit.starts[r]! < visit.hi; r++) {
    const end = Math.min(visit.hi, edit.ends[r]!);
    for (let i = leaf.lowerBound(Math.max(visit.lo, edit.starts[r]!)); i < leaf.count && leaf.keyAt(i) < end; i++) into.push(leaf.physicalAt(i));
  }
}

/** The indexes, ascending, of the children of an interior node routing [lo, hi) whose range meets `edit`. */
function touchedChildren(keys: readonly number[], lo: number, hi: number, edit: Edit): number[] {
  const touched: number[] = [];
  for (let r = firstRangeAbove(edit, lo); r < edit.starts.length && edit.starts[r]! < hi; r++) {
    const from = childIndex(keys, Math.max(lo, edit.starts[r]!));
    const to = childIndex(keys, Math.min(hi, edit.ends[r]!) - 1);
    for (let i = Math.max(from, (touched[touched.length - 1] ?? -1) + 1); i <= to; i++) touched.push(i);
  }
  return touched;
}

/** One run of a `mapRuns`: `sums.length` chunks from `virtualChunk` at consecutive physical chunks from `physicalChunk`. */
export interface MapRunEdit {
  virtualChunk: number;
  physicalChunk: number;
  sums: ArrayLike<number>;
}

const oneRun = Int32Array.of(0);

/** The indexes of `runs` in the order of their first keys (ties in any order). */
function sortedByKey(runs: readonly MapRunEdit[]): Int32Array {
  const count = runs.length;
  // Key and index in one number, sorted as a typed array (no comparator call per comparison), while exact.
  if (runs.every((run) => run.virtualChunk * count + count <= Number.MAX_SAFE_INTEGER)) {
    const keyed = new Float64Array(count);
    for (let i = 0; i < count; i++) keyed[i] = runs[i]!.virtualChunk * count + i;
    keyed.sort();
    const order = new Int32Array(count);
    for (let k = 0; k < count; k++) order[k] = keyed[k]! % count;
    return order;
  }
  return Int32Array.from({ length: count }, (_, i) => i).sort((a, b) => runs[a]!.virtualChunk - runs[b]!.virtualChunk);
}

/**
 * The edit of a `mapRuns`: each leaf gets the runs that meet it in call order, so chunk counts move exactly as
 * if the runs had applied one after another (a chunk one run maps and a later one overwrites is counted up, then
 * down), and the tree above a leaf is copied once for all of them.
 */
function mapRunsEdit(runs: readonly MapRunEdit[]): Edit {
  const count = runs.length;
  // The sums copied into one array (the caller may reuse its arrays before the pass runs): run i's from at[i].
  const at = new Float64Array(count + 1);
  for (let i = 0; i < count; i++) at[i + 1] = at[i]! + runs[i]!.sums.length;
  const allSums = new Uint32Array(at[count]!);
  for (let i = 0; i < count; i++) allSums.set(runs[i]!.sums, at[i]);
  // Runs that overlap or touch share a range: range r holds the runs order[groups[r]] to order[groups[r + 1] - 1],
  // put back in call order.
  const order = count === 1 ? oneRun : sortedByKey(runs);
  const starts: number[] = [];
  const ends: number[] = [];
  const groups: number[] = [];
  for (let k = 0; k < count; k++) {
    const i = order[k]!;
    const first = runs[i]!.virtualChunk;
    const end = first + at[i + 1]! - at[i]!;
    const last = ends.length - 1;
    if (last >= 0 && first <= ends[last]!) {
      if (end > ends[last]!) ends[last] = end;
    } else {
      starts.push(first);
      ends.push(end);
      groups.push(k);
    }
  }
  groups.push(count);
  for (let r = 0; r + 1 < groups.length; r++) if (groups[r + 1]! - groups[r]! > 1) order.subarray(groups[r], groups[r + 1]).sort();
  const edit: Edit = {
    starts,
    ends,
    grows: true,
    apply: (leaf, lo, hi, changes) => {
      for (let r = firstRangeAbove(edit, lo); r < starts.length && starts[r]! < hi; r++) {
        for (let k = groups[r]!; k < groups[r + 1]!; k++) {
          const i = order[k]!;
          const run = runs[i]!;
          const sumAt = at[i]! - run.virtualChunk;
          const from = Math.max(lo, run.virtualChunk);
          const to = Math.min(hi, run.virtualChunk + at[i + 1]! - at[i]!);
          if (from >= to) continue;
          const a = leaf.lowerBound(from);
          const b = leaf.lowerBound(to);
          for (let k = a; k < b; k++) changes.chunkDecrements.push(leaf.physicalAt(k));
          changes.mappedDelta += to - from - (b - a);
          const physicalFrom = run.physicalChunk + from - run.virtualChunk;
          if (to - from === 1 && b - a <= 1) {
            // One chunk (a 4 KiB write): overwritten or inserted.
            changes.chunkIncrements.push(physicalFrom);
            if (b === a) leaf.insert(a, from, physicalFrom, allSums[sumAt + from]!);
            else leaf.set(a, physicalFrom, allSums[sumAt + from]!);
            continue;
          }
          changes.chunkIncrements.pushRun(physicalFrom, to - from);
          // The leaf is the pass's own copy (#open): changed in place.
          leaf.replaceRun(a, b, to - from, from, physicalFrom, allSums, sumAt + from);
        }
      }
      return leaf;
    },
  };
  return edit;
}

/** The pages all maps of a pool share, and the tree operations over them; a map is a `PagedMap`. */
export class PagedMaps {
  readonly #cache: PageCache;
  readonly #allocator: PageAllocator;
  readonly #pageRefs: PageRefs;
  readonly #leafCapacity: number;
  readonly #interiorCapacity: number;
  readonly #pageCountPages: CountPages | undefined;
  readonly #chunkCountPages: CountPages | undefined;
  readonly #commitSliceMs: number;
  readonly #mutationRunMs: number;
  /** When the queue's tasks began running back to back in this turn of the event loop (undefined: none ran since the last turn). */
  #runStarted: number | undefined;
  /**
   * The nodes of pages allocated since the last commit, kept in memory until a commit puts them in the cache (an
   * interior node encoded once however often it changed; a leaf's words are its image, frozen from then on). No
   * durable root names these pages, so they are the ones that may be rewritten in place.
   */
  readonly #dirty = new Map<number, MapNode>();
  readonly #memoryPins = this.#pins();
  /** The last mutation queued: mutations apply in call order. */
  #mutations: Promise<unknown> = Promise.resolve();
  /** Mutations (and commits) queued and not yet settled: none, and a mutation may apply at once (`mapRunNow`). */
  #queued = 0;
  /** The last commit's write (`commitBeside`): the next commit waits for it. */
  #lastWrite: Promise<unknown> = Promise.resolve();
  #passRestarts = 0;
  /** Reference counts a pass changed since the last commit (`countChanges`). */
  #countChanges = 0;

  constructor(options: PagedMapsOptions) {
    this.#cache = options.cache;
    this.#allocator = options.allocator;
    this.#pageRefs = options.pageRefs;
    this.#leafCapacity = options.leafCapacity ?? leafCapacityMax;
    this.#interiorCapacity = options.interiorCapacity ?? interiorCapacityMax;
    this.#pageCountPages = options.pageCountPages;
    this.#chunkCountPages = options.chunkCountPages;
    this.#commitSliceMs = options.commitSliceMs ?? commitSliceMs;
    this.#mutationRunMs = options.mutationRunMs ?? mutationRunMs;
    assert(this.#leafCapacity >= 2 && this.#leafCapacity <= leafCapacityMax, `leaf capacity ${this.#leafCapacity}`);
    // At least 4: an interior node of one child must be below its fill, so that its lone child gets merged.
    assert(this.#interiorCapacity >= 4 && this.#interiorCapacity <= interiorCapacityMax, `interior capacity ${this.#interiorCapacity}`);
  }

  /** A new, empty map. */
  empty(): PagedMap {
    return new PagedMap(this, emptyRoot, 0);
  }

  /** The map a root slot recorded (its root page holds the reference the map had). */
  open(state: PagedMapState): PagedMap {
    return new PagedMap(this, state.rootPage, state.mappedCount);
  }

  /**
   * Writes the dirty pages and the root (page-cache.ts), then lets the pages released before it be reused; resolves
   * once the root is durable (`commitBeside`'s `durable`).
   */
  commit(rootBody: () => Buffer): Promise<Root> {
    return this.commitBeside(rootBody).durable;
  }

  /**
   * A commit whose write runs beside the mutations called after it. Queued with the mutations: its synchronous
   * part follows those called before it (the dirty nodes encoded into the cache, `rootBody` taken, the cache's
   * dirty pages taken for the write), and `sealed` settles then; the mutations called after it run from there on,
   * beside the write: nothing they do reaches what it writes (every node it wrote is copied before a change, as
   * after any commit; pages they release wait for the next root, `sealForCommit`; pages they place stay dirty for
   * the next commit). `durable` settles once the root is durable. One root is written at a time: a commit's
   * synchronous part waits for the previous write, and a failed write fails every commit after it (the maps are
   * then ahead of the file).
   */
  commitBeside(rootBody: () => Buffer): { sealed: Promise<void>; durable: Promise<Root> } {
    let durable: Promise<Root> | undefined;
    const sealed = this.#queue(async () => {
      // A write that met a full file system made nothing durable that this one does not write again whole (the
      // cache keeps its pages dirty; the root goes to the same slot): it may be retried. Any other failure may have
      // left pages in doubt: it fails every commit after it.
      await this.#lastWrite.catch((error: unknown) => {
        if (!isNoSpace(error)) throw error;
      });
      // From here on the pages written are named by the root being committed: none may change in place (a leaf's
      // image is its words: `encodeNode` freezes it). Handed over in slices of about `commitSliceMs`, giving the
      // event loop a turn between them (after 16 GiB written at random a checkpoint encoded some 20,000 leaves: 0.3
      // to 3 s of the loop held in one piece, with this machine's load, before the slices; leaves are no longer
      // encoded, interior nodes are). The mutations wait meanwhile (this task holds their queue), so no node
      // changes before the root takes it; lookups find each node among the dirty or in the cache, the same entries.
      let sliceStarted = performance.now();
      let encoded = 0;
      for (const [page, node] of this.#dirty) {
        const image = encodeNode(node);
        this.#cache.put(page, image);
        this.#attach(page, image, node);
        if (++encoded % commitSliceCheck === 0 && performance.now() - sliceStarted >= this.#commitSliceMs) {
          await nextTurn();
          sliceStarted = performance.now();
        }
      }
      this.#dirty.clear();
      this.#countChanges = 0;
      const written = this.#cache.commit(rootBody()).then((root) => {
        this.#allocator.committed();
        return root;
      });
      written.catch(() => {});
      this.#lastWrite = written;
      durable = written;
    });
    return { sealed, durable: sealed.then(() => durable!) };
  }

  /**
   * Chunk reference counts the passes changed since the last commit: each a count a replay of the same records
   * changes again (`increment`, `decrement`), most of them from copies of shared leaves (a leaf a snapshot shares
   * counts up each chunk it names when first written after it). The replay's cost beside its pages read
   * (paged-catalog.ts's `replayCostUs`).
   */
  get countChanges(): number {
    return this.#countChanges;
  }

  /** Times a pass started over after reading what it missed, since these maps were made (for tests and benchmarks). */
  get passRestarts(): number {
    return this.#passRestarts;
  }

  /**
   * The memory a leaf takes in the cache, its image and its object (`decodedBytes`: its words are the image), and
   * a dirty one until its commit (its words, with room for a few more entries, become the image): the cache holds
   * about its size over this many leaves.
   */
  get nodeBytes(): number {
    return pageBytes + leafObjectBytes;
  }

  /** Pages changed since the last commit (what the commit will write; their memory is not the cache's). */
  get dirtyPages(): number {
    return this.#dirty.size;
  }

  /** The decoded node of `page` as it is now, read from the file if need be (for checks and tools). */
  async node(page: number): Promise<MapNode> {
    return this.#resident(page) ?? this.#decode(await this.#cache.get(page), page);
  }

  /** The node of `page` if it is in memory: changed since the commit, or in the cache. */
  #resident(page: number): MapNode | undefined {
    const dirty = this.#dirty.size === 0 ? undefined : this.#dirty.get(page);
    if (dirty !== undefined) return dirty;
    const cached = this.#cache.peek(page);
    return cached === undefined ? undefined : this.#decode(cached, page);
  }

  #pins(): Pins {
    return new Pins(
      (page) => this.#resident(page),
      async (page) => this.#decode(await this.#cache.get(page), page),
    );
  }

  // The operations below are PagedMap's; they take and return root pages.

  /** @internal */
  runsCached(map: PagedMap, virtualChunk: number, chunkCount: number): PagedRun[] | undefined {
    if (chunkCount === 1) return this.#runCached(map, virtualChunk);
    try {
      // Pins that never load hold nothing: one set serves every call.
      return this.#runs(this.#memoryPins, map.rootPage, virtualChunk, chunkCount);
    } catch (error) {
      if (error instanceof MissingPages) return undefined;
      throw error;
    }
  }

  /**
   * `runsCached` of one chunk (a 4 KiB read, the most common lookup): the same runs as `#runs` gives, found by a
   * loop down the path, with no pins, closure or run merging. The root's node from the map, an interior node from
   * its parent once found (`InteriorNode.below`), the leaf from the cache (see "Lookups" at `PagedMaps`).
   */
  #runCached(map: PagedMap, virtualChunk: number): PagedRun[] | undefined {
    let page = map.rootPage;
    if (page === emptyRoot) return [{ virtualChunk, chunkCount: 1, physicalChunk: -1, sums: [] }];
    let node = map.rootNode ?? this.#resident(page);
    if (node === undefined) return undefined;
    map.rootNode = checkLevel(node, page, undefined);
    while (node.kind === 'interior') {
      const i = childIndex(node.keys, virtualChunk);
      page = node.children[i]!;
      const level = node.level - 1;
      if (level === 0) return this.#leafRun(node, i, page, virtualChunk);
      const below = (node.below ??= new Array<InteriorNode | undefined>(node.children.length));
      let child: MapNode | undefined = below[i];
      if (child === undefined) {
        child = this.#resident(page);
        if (child !== undefined && child.kind === 'interior') below[i] = child;
      }
      if (child === undefined) return undefined;
      node = checkLevel(child, page, level);
    }
    // A root that is a leaf.
    return leafRun(node, virtualChunk);
  }

  /**
   * The run of `virtualChunk` in the leaf at `page`, child `i` of `parent` (level 1): from the leaf `parent` holds
   * (its use recorded in the cache only once per eviction since the last record: `PageCache.evictions`), else from
   * the cache's page, then held by `parent` if it is clean, else the leaf changed since the commit. Undefined when
   * the leaf is not in memory. Searched in its words (`viewLowerBound`), as every leaf is kept.
   */
  #leafRun(parent: InteriorNode, i: number, page: number, virtualChunk: number): PagedRun[] | undefined {
    let leaf = parent.leaves === undefined ? undefined : parent.leaves[i];
    if (leaf !== undefined) {
      const evictions = this.#cache.evictions;
      if (parent.leafUses![i] !== evictions) {
        this.#cache.touch(page);
        parent.leafUses![i] = evictions;
      }
    } else {
      const dirty = this.#dirty.size === 0 ? undefined : this.#dirty.get(page);
      if (dirty !== undefined) leaf = checkLevel(dirty, page, 0) as LeafPage;
      else {
        const cached = this.#cache.peek(page);
        if (cached === undefined) return undefined;
        leaf = checkLevel(this.#decode(cached, page), page, 0) as LeafPage;
        this.#holdLeaf(parent, i, page, cached);
      }
    }
    const words = leaf.words;
    const count = leaf.count;
    const keys = parent.keys;
    const at = 1 + 4 * viewLowerBound(words, count, virtualChunk, keys[i]!, i + 1 < keys.length ? keys[i + 1]! : virtualChunk + 1);
    if (at < 1 + 4 * count && words[at]! + (words[at + 1]! & 0xffff) * 2 ** 32 === virtualChunk) {
      return [{ virtualChunk, chunkCount: 1, physicalChunk: (words[at + 1]! >>> 16) + words[at + 2]! * 65536, sums: [words[at + 3]!] }];
    }
    return [{ virtualChunk, chunkCount: 1, physicalChunk: -1, sums: [] }];
  }

  /**
   * Holds the leaf of a clean cached page (decoded: `#decode`, its `heldAs`) on its parent until the page leaves
   * the cache; nothing where the page is not clean.
   */
  #holdLeaf(parent: InteriorNode, i: number, page: number, cached: CachedPage): void {
    const leaves = (parent.leaves ??= new Array<LeafPage | undefined>(parent.children.length));
    const uses = (parent.leafUses ??= new Array<number>(parent.children.length).fill(-1));
    if (this.#cache.holdOutside(page, cached, leaves, i)) uses[i] = this.#cache.evictions;
  }

  /** @internal */
  async runs(map: PagedMap, virtualChunk: number, chunkCount: number): Promise<PagedRun[]> {
    return this.#pass((pins) => this.#runs(pins, map.rootPage, virtualChunk, chunkCount));
  }

  /** @internal */
  mapRuns(map: PagedMap, runs: readonly MapRunEdit[], refs: ChunkRefs): Promise<void> {
    for (const { virtualChunk, physicalChunk, sums } of runs) {
      const chunkCount = sums.length;
      if (!runInRange(virtualChunk, physicalChunk, chunkCount)) {
        return Promise.reject(ChunkdError.invalid(`a paged map maps ${chunkCount} chunks at ${virtualChunk} to ${physicalChunk}: out of range`));
      }
    }
    if (runs.length === 0) return Promise.resolve();
    if (runs.length > 1) {
      const edit = mapRunsEdit(runs);
      return this.#mutate(map, (pins, changes) => this.#edit(pins, changes, map.rootPage, edit, false), refs).then(() => {});
    }
    // One run (a live write's record): its sums copied now, as mapRunsEdit copies them, and the edit built only if
    // the run cannot go in place, the usual case for a volume written since the last commit.
    const run = { ...runs[0]!, sums: Uint32Array.from(runs[0]!.sums) };
    let edit: Edit | null = null;
    return this.#mutate(map, (pins, changes) => this.#edit(pins, changes, map.rootPage, (edit ??= mapRunsEdit([run])), false), refs, () => {
      const inPlace = this.#mapInPlace(map, run, refs);
      return inPlace === false ? this.#overwriteInPlace(map, run, refs) : inPlace;
    }).then(() => {});
  }

  /**
   * A one-run mapRun applied now, in this turn, when nothing is queued before it (no mutation, no commit's
   * synchronous part) and `#mapInPlace` takes it: the same as `mapRuns` of the run, without its queue's promises
   * (paged-metadata.md, "CPU per write"). False, having changed nothing, otherwise: the caller then queues it.
   * `sums` is read now, not kept.
   */
  mapRunNow(map: PagedMap, virtualChunk: number, physicalChunk: number, sums: ArrayLike<number>, refs: ChunkRefs): boolean {
    const chunkCount = sums.length;
    if (this.#queued > 0 || !runInRange(virtualChunk, physicalChunk, chunkCount)) return false;
    const run = { virtualChunk, physicalChunk, sums };
    const inPlace = this.#mapInPlace(map, run, refs);
    return inPlace === true || (inPlace === false && this.#overwriteInPlace(map, run, refs));
  }

  /**
   * The fast way of a one-run mapRun, tried before its pass: when every interior node from the root down to the
   * one leaf the run falls in is changed since the last commit (so no durable root names it) and held once (so no
   * other map reaches it), the leaf takes the run without passing its capacity, its least key
   * stays (so no interior key moves), and every count it changes is loaded, the run goes in without a pass: a leaf
   * changed since the last commit is changed in place; a leaf committed since its last change (the first write
   * below it after a checkpoint: most of them once the map has many more leaves than a checkpoint's writes meet)
   * is copied once to a new page, which its parent, changed since the commit, then names in place; a leaf another
   * map shares too (a snapshot's or a clone's: the first write below it since the snapshot) is copied to a new page
   * the same way, the shared page left as it is with one reference fewer and the chunks the copy keeps counted up,
   * as a pass's copy would. No interior node is copied (a pass copies every node on its path, even those changed since the commit: at 4 GiB written at
   * random into 64 GiB with a 16 MiB cache, two interior nodes and the leaf a write, most of what a write allocated:
   * paged-metadata.md, "Allocations per write"). The same tree and counts as the pass would leave (the new leaf may
   * get another page number). Copy-on-write against the durable tree holds: only nodes no durable root names change
   * in place, and the leaf's old page, which one does, is left unchanged: released (reusable after the next
   * commit) when this map held it alone, one reference fewer when another map shares it. Returns true when applied; false, having changed nothing, when any of that does not hold (the pass
   * then runs); or the page of the leaf when it is not in memory (changed nothing: the caller may read it and try
   * again). Checks everything before changing anything, in one synchronous turn.
   */
  #mapInPlace(map: PagedMap, run: MapRunEdit, refs: ChunkRefs): boolean | number {
    const first = run.virtualChunk;
    const count = run.sums.length;
    const end = first + count;
    const pageCounts = this.#pageCountPages;
    let page = map.rootPage;
    let hi = mapKeyLimit;
    /** The node naming `page` (changed since the commit, held once), and the index of `page` in it. */
    let parent: InteriorNode | undefined;
    let index = 0;
    for (;;) {
      if (page === emptyRoot || (pageCounts !== undefined && !pageCounts.loaded(page))) return false;
      const pageCount = this.#pageRefs.get(page);
      // Held by another map too (a snapshot's or a clone's): only a leaf below a parent changed since the commit and
      // held once is taken here (copied, as a pass copies it); a shared interior node is the pass's.
      const shared = pageCount !== 1;
      if (pageCount < 1 || (shared && (parent === undefined || parent.level !== 1))) return false;
      let node: MapNode | undefined = this.#dirty.get(page);
      const dirty = node !== undefined;
      if (!dirty) {
        // Committed: only a leaf below a parent changed since the commit is taken here (moved, or copied if shared); the rest is the pass's.
        if (parent === undefined || parent.level !== 1) return false;
        try {
          node = this.#resident(page);
        } catch {
          // A page that does not decode: the pass meets it too, and fails where a mutation's failure belongs.
          return false;
        }
        if (node === undefined) return page;
        if (node.kind !== 'leaf') return false;
      }
      // Below a parent of level 1 a node is a leaf: one that is not (damage) is the pass's to meet.
      if (shared && node!.kind !== 'leaf') return false;
      if (node!.kind === 'leaf') {
        const old = node as LeafPage;
        const a = old.lowerBound(first);
        const b = old.lowerBound(end);
        if (end > hi || old.count - (b - a) + count > this.#leafCapacity) return false;
        const chunkCounts = this.#chunkCountPages;
        if (chunkCounts !== undefined) {
          // A shared leaf's copy counts up every chunk it keeps (as `#open` has a pass do).
          for (let i = shared ? 0 : a; i < (shared ? old.count : b); i++) if (!chunkCounts.loaded(old.physicalAt(i))) return false;
          for (let i = 0; i < count; i++) if (!chunkCounts.loaded(run.physicalChunk + i)) return false;
        }
        // The copy's page, and one for a page of counts copied on its first change (as `#wantCounts` asks of a pass).
        if ((!dirty || shared) && pageCounts !== undefined && !this.#allocator.upcoming(2).every((upcoming) => pageCounts.loaded(upcoming))) return false;
        // A leaf committed since its last change (its words are its cached page's image, frozen) or shared with
        // another map (a snapshot's or a clone's) is copied (with room for `leafRoom` more entries, as `#open`'s), and
        // the copy takes the run on a new page: one copy a leaf per checkpoint, where the commit then encodes nothing. A shared
        // page keeps what it holds for the maps that still name it, one reference fewer. No interior node is copied
        // (a pass would copy the root and every node down to the leaf, though they are changed since the commit and
        // held once: with a snapshot every few thousand writes, most of what a write allocated; BENCHMARKS.md, issue
        // 15, "Allocations per write with snapshots").
        const leaf = !dirty || shared ? old.copy() : old;
        if (!dirty || shared) {
          const placed = this.#allocator.allocate();
          assert(this.#pageRefs.get(placed) === 0, `page ${placed} allocated with a count of ${this.#pageRefs.get(placed)}`);
          this.#pageRefs.increment(placed);
          this.#dirty.set(placed, leaf);
          parent!.children[index] = placed;
          // What lookups held of the old page goes with it (the discard below of one held once empties the slot too).
          if (parent!.leaves !== undefined) parent!.leaves[index] = undefined;
        }
        // Counted up before down, as a pass applies (a chunk named again is never free in between). A copy counts
        // up the chunks it keeps; those the run replaces are not counted up and down (the counts the pass's copy and
        // edit leave).
        if (shared) {
          incrementChunks(refs, old, 0, a);
          incrementChunks(refs, old, b, old.count);
          this.#countChanges += old.count - (b - a) + count;
        }
        for (let i = 0; i < count; i++) refs.increment(run.physicalChunk + i);
        if (!shared) for (let i = a; i < b; i++) refs.decrement(leaf.physicalAt(i));
        leaf.replaceRun(a, b, count, first, run.physicalChunk, run.sums, 0);
        if (shared) assert(this.#pageRefs.decrement(page) > 0);
        else if (!dirty) {
          // The committed leaf left: released (its page written again only after the next root, which no longer names it).
          assert(this.#pageRefs.decrement(page) === 0);
          this.#allocator.release(page);
          this.#cache.discard(page);
        }
        map.setState(map.rootPage, map.mappedCount + count - (b - a));
        return true;
      }
      const interior = node as InteriorNode;
      const i = childIndex(interior.keys, first);
      // Below the least key of the node (a new least key would move keys in the parents: the pass). So a leaf
      // below the root is reached only at or above its least key, which then stays.
      if (first < interior.keys[i]!) return false;
      if (i + 1 < interior.keys.length) hi = interior.keys[i + 1]!;
      parent = interior;
      index = i;
      page = interior.children[i]!;
    }
  }

  /**
   * The fast way of a one-run mapRun over chunks all mapped already, in one leaf or several (an overwrite: the
   * steady state of large writes, whose runs span two leaves or more, which `#mapInPlace` leaves to the pass):
   * when every node on the paths from the root to those leaves is changed since the last commit and held once (as
   * `#mapInPlace` asks) and every chunk count it changes is loaded, each entry's physical chunk and sum are
   * replaced in place. No entry is added or removed, so no key moves, no node splits or merges, and the count of
   * chunks mapped stays. The same tree and chunk counts as the pass would leave (its frees may come in another
   * order: a pass visits a node's children last first). False, having changed nothing, otherwise (a hole in the
   * run, a node shared or clean); checks everything before changing anything, in one synchronous turn.
   */
  #overwriteInPlace(map: PagedMap, run: MapRunEdit, refs: ChunkRefs): boolean {
    const first = run.virtualChunk;
    const count = run.sums.length;
    const end = first + count;
    const pageCounts = this.#pageCountPages;
    const chunkCounts = this.#chunkCountPages;
    // The leaves the run falls in, in key order, and the index in each of the run's first entry there.
    const leaves: LeafPage[] = [];
    const from: number[] = [];
    let key = first;
    while (key < end) {
      let page = map.rootPage;
      let node: MapNode | undefined;
      for (;;) {
        if (page === emptyRoot) return false;
        node = this.#dirty.get(page);
        if (node === undefined || (pageCounts !== undefined && !pageCounts.loaded(page)) || this.#pageRefs.get(page) !== 1) return false;
        if (node.kind === 'leaf') break;
        page = node.children[childIndex(node.keys, key)]!;
      }
      const leaf = node;
      const a = leaf.lowerBound(key);
      let i = a;
      for (; i < leaf.count && key < end && leaf.keyAt(i) === key; i++, key++) if (chunkCounts !== undefined && !chunkCounts.loaded(leaf.physicalAt(i))) return false;
      // A hole (no entry for `key`, here or at the start of the next leaf): entries would be added, the pass's work.
      if (i === a) return false;
      leaves.push(leaf);
      from.push(a);
    }
    if (chunkCounts !== undefined) {
      for (let chunk = run.physicalChunk; chunk < run.physicalChunk + count; chunk += chunkCountsPageStep) if (!chunkCounts.loaded(chunk)) return false;
      if (!chunkCounts.loaded(run.physicalChunk + count - 1)) return false;
    }
    const increments = new ChunkRunList();
    const decrements = new ChunkRunList();
    increments.pushRun(run.physicalChunk, count);
    let v = first;
    for (let l = 0; l < leaves.length; l++) {
      const leaf = leaves[l]!;
      for (let i = from[l]!; i < leaf.count && v < end && leaf.keyAt(i) === v; i++, v++) {
        decrements.push(leaf.physicalAt(i));
        leaf.set(i, run.physicalChunk + v - first, run.sums[v - first]!);
      }
    }
    assert(v === end);
    // Counted up before down, as a pass applies (a chunk named again is never free in between).
    applyChunkRuns(refs, increments, decrements);
    return true;
  }

  /** @internal */
  unmapRange(map: PagedMap, virtualChunk: number, chunkCount: number, refs: ChunkRefs): Promise<number> {
    const end = Math.min(virtualChunk + chunkCount, mapKeyLimit);
    const edit: Edit = {
      starts: [virtualChunk],
      ends: [end],
      apply: (leaf, _lo, _hi, changes) => {
        const a = leaf.lowerBound(virtualChunk);
        const b = leaf.lowerBound(end);
        for (let i = a; i < b; i++) changes.chunkDecrements.push(leaf.physicalAt(i));
        changes.mappedDelta -= b - a;
        leaf.remove(a, b);
        return leaf;
      },
    };
    return this.#mutate(map, (pins, changes) => this.#edit(pins, changes, map.rootPage, edit, true), refs);
  }

  /** @internal Over counts in pages, the root's count must be loaded (`cloneLoaded` loads it). */
  clone(map: PagedMap): PagedMap {
    if (map.rootPage !== emptyRoot) this.#pageRefs.increment(map.rootPage);
    return new PagedMap(this, map.rootPage, map.mappedCount);
  }

  /** A clone of `map` (queued with the mutations, so it clones what those before it left), its root's count loaded. */
  cloneLoaded(map: PagedMap): Promise<PagedMap> {
    return this.#queue(async () => {
      const pin = map.rootPage === emptyRoot ? undefined : await this.#pageCountPages?.load([map.rootPage]);
      try {
        return this.clone(map);
      } finally {
        pin?.release();
      }
    });
  }

  /**
   * @internal Not one pass: a large map would pin all its pages at once and release them in one turn. Queued, it
   * walks the pages it frees one at a time (the map is empty from the start, so no pass reaches them), reads each
   * before releasing it (a page that cannot be read stays held: space lost, counts still right), and yields to
   * the event loop every `dropSliceNodes` pages.
   */
  drop(map: PagedMap, refs: ChunkRefs): Promise<number> {
    return this.#queue(async () => {
      const mapped = map.mappedCount;
      const stack: Array<{ page: number; level: number | undefined }> = map.rootPage === emptyRoot ? [] : [{ page: map.rootPage, level: undefined }];
      map.setState(emptyRoot, 0);
      let freed = 0;
      while (stack.length > 0) {
        const { page, level } = stack.pop()!;
        if (!(await this.#dropPage(page, level, refs, stack))) continue;
        if (++freed % dropSliceNodes === 0) await new Promise((resolve) => setImmediate(resolve));
      }
      return mapped;
    });
  }

  /**
   * Drops one reference to `page` for a drop; returns whether that freed it (its children then pushed on `stack`,
   * a leaf's chunks released). The counts it changes are loaded first, and pinned only while it runs.
   */
  async #dropPage(page: number, level: number | undefined, refs: ChunkRefs, stack: Array<{ page: number; level: number | undefined }>): Promise<boolean> {
    const pagePin = await this.#pageCountPages?.load([page]);
    let chunkPin: { release(): void } | undefined;
    try {
      const count = this.#pageRefs.get(page);
      assert(count >= 1, `chunk map page ${page} reached with a count of ${count}`);
      if (count > 1) {
        this.#pageRefs.decrement(page);
        return false;
      }
      const node = this.#resident(page) ?? (await this.node(page));
      checkLevel(node, page, level);
      if (node.kind === 'leaf') chunkPin = await this.#chunkCountPages?.load(node.physicalChunks());
      assert(this.#pageRefs.decrement(page) === 0);
      this.#allocator.release(page);
      this.#cache.discard(page);
      this.#dirty.delete(page);
      if (node.kind === 'leaf') for (let i = 0; i < node.count; i++) refs.decrement(node.physicalAt(i));
      else for (const child of node.children) stack.push({ page: child, level: node.level - 1 });
      return true;
    } finally {
      pagePin?.release();
      chunkPin?.release();
    }
  }

  /**
   * @internal Chunks only `map` holds (what dropping it would free): those of the leaves it reaches through pages
   * of count 1 only (a page of a larger count is shared, with all below it), named by no other leaf (a chunk's
   * count is the leaves naming it). Walked as `drop` does, a stack of page numbers, so its memory does not grow
   * with the map; each slice of `dropSliceNodes` pages is queued with the mutations (none seen half applied, and
   * writes go on between slices). Meant for a snapshot's map, which nothing changes but its drop: ENOENT if it is
   * dropped during the walk. Pages shared when the walk passed them and made the map's own since (the volume's
   * writes copy their path) are not counted: the figure is the map's as the walk found it, slice by slice.
   */
  async uniqueChunks(map: PagedMap, refs: { get(physicalChunk: number): number }): Promise<number> {
    const rootPage = map.rootPage;
    const stack: Array<{ page: number; level: number | undefined }> = rootPage === emptyRoot ? [] : [{ page: rootPage, level: undefined }];
    let unique = 0;
    while (stack.length > 0) {
      unique += await this.#queue(async () => {
        if (map.rootPage !== rootPage) throw ChunkdError.notFound('the map was dropped while its chunks held alone were counted');
        // A slice at once: its pages' counts loaded together, the nodes of those held alone read together, and the
        // counts of their leaves' chunks loaded in order of chunk, a run of them at a time. A leaf's chunks lie all
        // over the counts (written at random, then copied by snapshots), so loading them leaf by leaf fetched the
        // same pages of counts once per leaf: about 100 fetches per leaf at 1 GiB written, 3 s of CPU for
        // `snapshot list` of 24 snapshots (paged-metadata.md, "Bytes held alone").
        const slice = stack.splice(Math.max(0, stack.length - dropSliceNodes));
        const pagePin = await this.#pageCountPages?.load(slice.map(({ page }) => page));
        let alone: typeof slice;
        try {
          alone = slice.filter(({ page }) => this.#pageRefs.get(page) === 1);
        } finally {
          pagePin?.release();
        }
        const nodes = await Promise.all(alone.map(({ page }) => this.#resident(page) ?? this.node(page)));
        let chunkCount = 0;
        for (const [i, { page, level }] of alone.entries()) {
          const node = checkLevel(nodes[i]!, page, level);
          if (node.kind === 'interior') for (const child of node.children) stack.push({ page: child, level: node.level - 1 });
          else chunkCount += node.count;
        }
        const chunks = new Float64Array(chunkCount);
        let at = 0;
        for (const node of nodes) if (node.kind === 'leaf') for (let i = 0; i < node.count; i++) chunks[at++] = node.physicalAt(i);
        chunks.sort();
        let found = 0;
        for (let from = 0; from < chunks.length; from += uniqueCountRun) {
          const run = chunks.subarray(from, from + uniqueCountRun);
          const chunkPin = await this.#chunkCountPages?.load(run);
          try {
            for (const physical of run) if (refs.get(physical) === 1) found += 1;
          } finally {
            chunkPin?.release();
          }
        }
        return found;
      });
    }
    return unique;
  }

  /** @internal `b` null: an empty map. */
  async diff(a: PagedMap, b: PagedMap | null, chunkLimit: number): Promise<ChangedExtent[]> {
    return this.#pass((pins) => this.#diff(pins, a.rootPage, b === null ? emptyRoot : b.rootPage, chunkLimit));
  }

  /** Runs a pure pass, reading what it misses and starting it over until it completes. */
  async #pass<T>(run: (pins: Pins) => T): Promise<T> {
    const pins = this.#pins();
    /** Pages of counts loaded for this pass: held until it has applied. */
    const countPins: Array<{ release(): void }> = [];
    try {
      for (;;) {
        try {
          return run(pins);
        } catch (error) {
          if (!(error instanceof MissingPages)) throw error;
          this.#passRestarts += 1;
          const loads: Array<Promise<unknown>> = [pins.load(error.pages)];
          if (error.pageCounts.length > 0) loads.push(this.#pageCountPages!.load(error.pageCounts).then((pin) => countPins.push(pin)));
          if (error.chunkCounts.length > 0) loads.push(this.#chunkCountPages!.load(error.chunkCounts).then((pin) => countPins.push(pin)));
          await Promise.all(loads);
        }
      }
    } finally {
      for (const pin of countPins) pin.release();
    }
  }

  /**
   * Stops the pass unless every count `#apply` will read or change is loaded: the pages whose counts change, the
   * pages it will allocate (at most two per node placed: the node's, and one for a page of counts copied on its
   * first change), and the chunks counted up or down.
   */
  #wantCounts(changes: Changes, root: Item | null): void {
    const pageCounts = this.#pageCountPages;
    const chunkCounts = this.#chunkCountPages;
    if (pageCounts !== undefined) {
      let placed = 0;
      const countPlaced = (item: Built): void => {
        placed += 1;
        if (item.kind !== 'interior') return;
        for (let i = 0; i < item.items.length; i++) {
          const child = item.items[i]!;
          if (typeof child !== 'number') countPlaced(child);
        }
      };
      if (root !== null && typeof root !== 'number') countPlaced(root);
      const fresh = Math.max(0, placed - changes.reusable.length);
      const pages = [...changes.pageDelta.keys(), ...this.#allocator.upcoming(2 * fresh)].filter((page) => !pageCounts.loaded(page));
      if (pages.length > 0) throw new MissingPages([], pages);
    }
    if (chunkCounts !== undefined) {
      // A chunk of each page of counts a run meets (its first, its last, one every `chunkCountsPageStep` between).
      const chunks: number[] = [];
      for (const list of [changes.chunkIncrements, changes.chunkDecrements]) {
        for (let r = 0; r < list.starts.length; r++) {
          const start = list.starts[r]!;
          const end = start + list.counts[r]!;
          for (let chunk = start; chunk < end; chunk += chunkCountsPageStep) if (!chunkCounts.loaded(chunk)) chunks.push(chunk);
          if (end - 1 > start && !chunkCounts.loaded(end - 1)) chunks.push(end - 1);
        }
      }
      if (chunks.length > 0) throw new MissingPages([], [], chunks);
    }
  }

  /** Queues a mutation of `map`: its pass computes the new root (or null: the map is left empty), then it applies. */
  #mutate(map: PagedMap, compute: (pins: Pins, changes: Changes) => Item | null, refs?: ChunkRefs, inPlace?: () => boolean | number): Promise<number> {
    return this.#queue(async () => {
      if (inPlace !== undefined) {
        let tried = inPlace();
        // A leaf it would copy is not in memory: read (as the pass would), then tried once more.
        if (typeof tried === 'number') {
          this.#decode(await this.#cache.get(tried), tried);
          tried = inPlace();
        }
        if (tried === true) return 0;
      }
      return this.#pass((pins) => {
        const changes = new Changes(this.#pageRefs, this.#pageCountPages);
        const root = compute(pins, changes);
        this.#wantCounts(changes, root);
        const rootPage = this.#apply(changes, root, refs);
        map.setState(rootPage, map.mappedCount + changes.mappedDelta);
        return changes.mappedDelta === 0 ? 0 : -changes.mappedDelta;
      });
    });
  }

  /** Runs `task` after every mutation and commit queued before it. */
  #queue<T>(task: () => Promise<T>): Promise<T> {
    this.#queued += 1;
    const settle = (): void => {
      this.#queued -= 1;
    };
    const run = (): Promise<T> => {
      const now = performance.now();
      if (this.#runStarted === undefined) {
        this.#runStarted = now;
        setImmediate(() => {
          this.#runStarted = undefined;
        });
      } else if (now - this.#runStarted >= this.#mutationRunMs) {
        // The loop's turn comes first; its start (queued before) has cleared the mark by then.
        return nextTurn().then(run);
      }
      return task();
    };
    const result = this.#mutations.then(run, run);
    this.#mutations = result.then(settle, settle);
    return result;
  }

  #decode(page: CachedPage, pageNumber: number): MapNode {
    let node = page.decoded as MapNode | undefined;
    if (node === undefined) {
      node = decodeNode(page, pageNumber);
      this.#attach(pageNumber, page, node);
    }
    return node;
  }

  /** Keeps `node` with its cached page, counted with it (a leaf also as what its parent holds for lookups: `#holdLeaf`). */
  #attach(pageNumber: number, page: CachedPage, node: MapNode): void {
    page.decoded = node;
    if (node.kind === 'leaf') page.heldAs = node;
    this.#cache.hold(pageNumber, page, decodedBytes(node));
  }

  /** The node of `page`, checked to sit at `level` where the parent says. */
  #node(pins: Pins, page: number, level: number | undefined): MapNode {
    return checkLevel(pins.node(page), page, level);
  }

  /** The node of `page` for changing: a private copy; the page is left (reused or freed) or, if shared, copied. */
  #open(pins: Pins, changes: Changes, page: number, level: number | undefined): MapNode {
    const node = this.#node(pins, page, level);
    const count = changes.count(page);
    assert(count >= 1, `chunk map page ${page} reached with a count of ${count}`);
    changes.add(page, -1);
    if (count > 1) {
      // Copy-on-write: the copy names what the page names, once more.
      if (node.kind === 'leaf') for (let i = 0; i < node.count; i++) changes.chunkIncrements.push(node.physicalAt(i));
      else for (const child of node.children) changes.add(child, 1);
    } else {
      (this.#dirty.has(page) ? changes.reusable : changes.freed).push(page);
    }
    return node.kind === 'leaf'
      ? node.copy()
      : { kind: 'interior', level: node.level, keys: node.keys.slice(), children: node.children.slice(), below: undefined, leaves: undefined, leafUses: undefined };
  }

  #runs(pins: Pins, rootPage: number, virtualChunk: number, chunkCount: number): PagedRun[] {
    const runs: PagedRun[] = [];
    const end = virtualChunk + chunkCount;
    let next = virtualChunk;
    const visit = (page: number, level: number | undefined): void => {
      const node = this.#node(pins, page, level);
      if (node.kind === 'interior') {
        const first = childIndex(node.keys, virtualChunk);
        const last = childIndex(node.keys, end - 1);
        if (last > first) pins.want(node.children.slice(first, last + 1));
        for (let i = first; i <= last; i++) visit(node.children[i]!, node.level - 1);
        return;
      }
      for (let i = node.lowerBound(virtualChunk); i < node.count && node.keyAt(i) < end; i++) {
        const v = node.keyAt(i);
        if (next < v) pushRun(runs, next, v - next, -1, undefined);
        pushRun(runs, v, 1, node.physicalAt(i), node.sumAt(i));
        next = v + 1;
      }
    };
    if (chunkCount <= 0) return runs;
    if (rootPage !== emptyRoot) visit(rootPage, undefined);
    if (next < end) pushRun(runs, next, end - next, -1, undefined);
    return runs;
  }

  /** Whether the subtree at `page` has an entry in [first, end). */
  #anyIn(pins: Pins, page: number, level: number, first: number, end: number): boolean {
    const node = this.#node(pins, page, level);
    if (node.kind === 'leaf') {
      const i = node.lowerBound(first);
      return i < node.count && node.keyAt(i) < end;
    }
    const from = childIndex(node.keys, first);
    const to = childIndex(node.keys, end - 1);
    pins.want(node.children.slice(from, to + 1));
    for (let i = from; i <= to; i++) if (this.#anyIn(pins, node.children[i]!, level - 1, first, end)) return true;
    return false;
  }

  /** The pass of mapRun and unmapRange: the new root, or null for an empty map. */
  #edit(pins: Pins, changes: Changes, rootPage: number, edit: Edit, onlyWhereMapped: boolean): Item | null {
    if (editFirst(edit) >= editEnd(edit)) return rootPage === emptyRoot ? null : rootPage;
    if (rootPage === emptyRoot) {
      if (onlyWhereMapped) return null;
      const leaf = edit.apply(LeafPage.empty(), 0, mapKeyLimit, changes);
      return this.#rootOf(this.#split(leaf, 0), 0);
    }
    const root = this.#node(pins, rootPage, undefined);
    if (pins.retrying) this.#prefetch(pins, rootPage, edit);
    if (onlyWhereMapped && !this.#anyIn(pins, rootPage, levelOf(root), editFirst(edit), editEnd(edit))) return rootPage;
    return this.#rootOf(this.#modify(pins, changes, rootPage, levelOf(root), 0, mapKeyLimit, edit, onlyWhereMapped), levelOf(root));
  }

  /**
   * Names at once, a level at a time, every page below `rootPage` whose range meets `edit`, with a neighbour on
   * each side (what #modify visits): a pass that misses pages then starts over once per level, not once per
   * interior node of the range (each start redoing the pass so far). Only once a pass has missed: a warm one pays
   * nothing for it.
   */
  #prefetch(pins: Pins, rootPage: number, edit: Edit): void {
    let level: Visit[] = [{ page: rootPage, lo: 0, hi: mapKeyLimit }];
    for (;;) {
      const next: Visit[] = [];
      for (const visit of level) {
        const node = pins.node(visit.page);
        if (node.kind === 'leaf') return;
        visitedChildren(node, visit, edit, next);
      }
      pins.want(next.map((item) => item.page));
      level = next;
    }
  }

  /**
   * Reads ahead of a pass of `runs` over `map` (a replay's batch) what it would otherwise miss and start over for:
   * the pages `#prefetch` names for it, a level at a time, at most `prefetchReads` reads at once (each checked and
   * repaired as any read) and no more pages than the cache holds, so that none is evicted before the pass uses it
   * (`fits` false: it stopped there, and the caller may cut the batch: paged-backend.ts's `replayPaged`); then the
   * pages of counts the pass changes, pinned until `release` (a pass that misses counts starts over after computing
   * its whole edit): of the chunks (the runs', and those mapped where they go now) and of the map pages (those it
   * visits, and those it may allocate). Queued with the mutations (it reads the root they leave). Changes nothing:
   * the pass still reads whatever it misses.
   */
  prefetchRuns(map: PagedMap, runs: readonly MapRunEdit[]): Promise<{ pages: number; fits: boolean; release(): void }> {
    return this.#queue(async () => {
      const nothingPinned = (pages: number, fits = true): { pages: number; fits: boolean; release(): void } => ({ pages, fits, release: () => {} });
      if (runs.length === 0 || map.rootPage === emptyRoot) return nothingPinned(0);
      const edit = mapRunsEdit(runs);
      // Half the cache: what else it holds (pages of counts, the levels above) must not push out what was read.
      let budget = Math.floor(this.#cache.maxBytes / this.nodeBytes / 2);
      let pages = 0;
      let level: Visit[] = [{ page: map.rootPage, lo: 0, hi: mapKeyLimit }];
      // The chunks the pass counts down: those the leaves map where the runs go.
      const chunks: number[] = [];
      // The map pages it visits (whose page counts it reads and changes).
      const visited: number[] = [];
      while (level.length > 0) {
        const missing = [...new Set(level.filter((visit) => this.#resident(visit.page) === undefined).map((visit) => visit.page))];
        if (missing.length > budget) return nothingPinned(pages, false);
        budget -= missing.length;
        pages += missing.length;
        let cursor = 0;
        const reader = async (): Promise<void> => {
          while (cursor < missing.length) await this.#cache.get(missing[cursor++]!);
        };
        await Promise.all(Array.from({ length: Math.min(prefetchReads, missing.length) }, reader));
        const next: Visit[] = [];
        for (const visit of level) {
          visited.push(visit.page);
          const node = this.#resident(visit.page) ?? (await this.node(visit.page));
          if (node.kind !== 'leaf') visitedChildren(node, visit, edit, next);
          else mappedUnder(node, visit, edit, chunks);
        }
        level = next;
      }
      const pins: Array<{ release(): void }> = [];
      const release = (): void => {
        for (const pin of pins.splice(0)) pin.release();
      };
      try {
        const pageCounts = this.#pageCountPages;
        if (pageCounts !== undefined) {
          // The pages it may allocate: two for each node placed (`#wantCounts`), about one placed per node visited
          // and a few more for splits. Fewer than it needs only costs a restart.
          const wanted = [...visited, ...this.#allocator.upcoming(2 * visited.length + 16)].filter((page) => !pageCounts.loaded(page));
          if (wanted.length > 0) pins.push(await pageCounts.load(wanted));
        }
        const counts = this.#chunkCountPages;
        if (counts !== undefined) {
          // And the chunks it counts up: an index of each page of counts a run meets (its first, its last, every page between).
          for (const { physicalChunk, sums } of runs) {
            for (let chunk = physicalChunk; chunk < physicalChunk + sums.length; chunk += chunkCountsPageStep) chunks.push(chunk);
            chunks.push(physicalChunk + sums.length - 1);
          }
          const wanted = chunks.filter((chunk) => !counts.loaded(chunk));
          if (wanted.length > 0) pins.push(await counts.load(wanted));
        }
      } catch (error) {
        release();
        throw error;
      }
      return { pages, fits: true, release };
    });
  }

  /** Applies `edit` below `page` (whose keys route from [lo, hi)); returns the nodes that replace it. */
  #modify(pins: Pins, changes: Changes, page: number, level: number, lo: number, hi: number, edit: Edit, onlyWhereMapped: boolean): Outs {
    const node = this.#open(pins, changes, page, level);
    if (node.kind === 'leaf') return this.#split(edit.apply(node, lo, hi, changes), 0);
    const count = node.children.length;
    const touched = touchedChildren(node.keys, lo, hi, edit);
    // The children changed, and a neighbour on each side in case one of them ends below its fill (none for an
    // edit that only grows: each neighbour was a page read for nothing, a leaf per record at scale).
    const side = edit.grows === true ? 0 : 1;
    const wanted: number[] = [];
    for (const i of touched) {
      for (let j = Math.max(i - side, wanted.length === 0 ? 0 : wanted[wanted.length - 1]! + 1); j <= Math.min(count - 1, i + side); j++) wanted.push(j);
    }
    pins.want(wanted.map((i) => node.children[i]!));
    // The ranges of the children changed, before any is replaced.
    const bounds = touched.map((i) => [i === 0 ? lo : node.keys[i]!, i === count - 1 ? hi : node.keys[i + 1]!] as const);
    // The node is the pass's own copy (#open): each child changed is replaced in place, last first so that the
    // indexes still to visit do not move.
    const outs: Outs = { keys: node.keys, items: node.children };
    for (let t = touched.length - 1; t >= 0; t--) {
      const i = touched[t]!;
      const child = node.children[i]! as number;
      const [childLo, childHi] = bounds[t]!;
      if (onlyWhereMapped && !this.#anyIn(pins, child, level - 1, Math.max(childLo, editFirst(edit)), Math.min(childHi, editEnd(edit)))) continue;
      const below = this.#modify(pins, changes, child, level - 1, childLo, childHi, edit, onlyWhereMapped);
      splice(outs.keys, i, i + 1, below.keys);
      splice(outs.items, i, i + 1, below.items);
    }
    this.#rebalance(pins, changes, outs, level - 1);
    return this.#split({ kind: 'interior', level, ...outs }, level);
  }

  /** Merges each new child below its fill with a neighbour (or shares their entries evenly), so invariant 2 holds. */
  #rebalance(pins: Pins, changes: Changes, outs: Outs, childLevel: number): void {
    const capacity = childLevel === 0 ? this.#leafCapacity : this.#interiorCapacity;
    const least = minFill(capacity);
    let i = 0;
    while (i < outs.items.length) {
      const item = outs.items[i]!;
      if (outs.items.length === 1 || typeof item === 'number' || builtSize(item) >= least) {
        i += 1;
        continue;
      }
      const left = i + 1 < outs.items.length ? i : i - 1;
      const merged = this.#concat(this.#contents(pins, changes, outs.items[left]!, childLevel), this.#contents(pins, changes, outs.items[left + 1]!, childLevel));
      // Two interior nodes merged: a child below its fill that was alone under its parent now has a neighbour.
      if (merged.kind === 'interior') this.#rebalance(pins, changes, merged, childLevel - 1);
      const parts = this.#split(merged, childLevel);
      outs.keys.splice(left, 2, ...parts.keys);
      outs.items.splice(left, 2, ...parts.items);
      i = left;
    }
  }

  /** A child's entries as a node being built (an existing page is opened: left or copied). */
  #contents(pins: Pins, changes: Changes, item: Item, level: number): Built {
    if (typeof item !== 'number') return item;
    const node = this.#open(pins, changes, item, level);
    if (node.kind === 'leaf') return node;
    return { kind: 'interior', level: node.level, keys: node.keys, items: node.children };
  }

  #concat(a: Built, b: Built): Built {
    if (a.kind === 'leaf' && b.kind === 'leaf') return a.concat(b);
    assert(a.kind === 'interior' && b.kind === 'interior' && a.level === b.level);
    return { kind: 'interior', level: a.level, keys: a.keys.concat(b.keys), items: a.items.concat(b.items) };
  }

  /** A node being built cut into the fewest nodes that fit a page, evenly. */
  #split(built: Built, level: number): Outs {
    const outs: Outs = { keys: [], items: [] };
    let at = 0;
    if (built.kind === 'leaf') {
      const sizes = splitSizes(built.count, this.#leafCapacity);
      if (sizes.length === 1) return { keys: [built.keyAt(0)], items: [built] };
      for (const size of sizes) {
        outs.keys.push(built.keyAt(at));
        outs.items.push(built.slice(at, at + size));
        at += size;
      }
      return outs;
    }
    assert(built.level === level);
    const sizes = splitSizes(built.keys.length, this.#interiorCapacity);
    if (sizes.length === 1) return { keys: [built.keys[0]!], items: [built] };
    for (const size of sizes) {
      outs.keys.push(built.keys[at]!);
      outs.items.push({ kind: 'interior', level, keys: built.keys.slice(at, at + size), items: built.items.slice(at, at + size) });
      at += size;
    }
    return outs;
  }

  /** The root over `outs` (nodes at `level`): new levels above while more than one, interior roots of one child removed. */
  #rootOf(outs: Outs, level: number): Item | null {
    let top = outs;
    let topLevel = level;
    while (top.items.length > 1) {
      topLevel += 1;
      top = this.#split({ kind: 'interior', level: topLevel, ...top }, topLevel);
    }
    let root = top.items[0];
    while (root !== undefined && typeof root !== 'number' && root.kind === 'interior' && root.items.length === 1) root = root.items[0];
    return root ?? null;
  }

  /** Writes the nodes built (fresh pages reused first), then applies the counts; returns the root page. */
  #apply(changes: Changes, root: Item | null, refs: ChunkRefs | undefined): number {
    const place = (built: Item): number => {
      if (typeof built === 'number') return built;
      if (built.kind === 'interior') {
        for (let i = 0; i < built.items.length; i++) {
          const item = built.items[i]!;
          if (typeof item !== 'number') built.items[i] = place(item);
        }
      }
      const node: MapNode = built.kind === 'leaf' ? built : { kind: 'interior', level: built.level, keys: built.keys, children: built.items as number[], below: undefined, leaves: undefined, leafUses: undefined };
      let page = changes.reusable.pop();
      if (page !== undefined) changes.add(page, 1);
      else {
        page = this.#allocator.allocate();
        assert(this.#pageRefs.get(page) === 0, `page ${page} allocated with a count of ${this.#pageRefs.get(page)}`);
        this.#pageRefs.increment(page);
      }
      this.#dirty.set(page, node);
      return page;
    };
    const rootPage = root === null ? emptyRoot : place(root);
    const left = new Set([...changes.freed, ...changes.reusable]);
    for (const [page, delta] of changes.pageDelta) for (let i = 0; i < delta; i++) this.#pageRefs.increment(page);
    for (const [page, delta] of changes.pageDelta) {
      for (let i = 0; i < -delta; i++) {
        if (this.#pageRefs.decrement(page) > 0) continue;
        assert(left.delete(page), `chunk map page ${page} lost its last reference without being left`);
        this.#allocator.release(page);
        this.#cache.discard(page);
        this.#dirty.delete(page);
      }
    }
    assert(left.size === 0, `chunk map pages ${[...left].join(', ')} left but still referenced`);
    assert(refs !== undefined || (changes.chunkIncrements.empty && changes.chunkDecrements.empty));
    if (refs !== undefined) applyChunkRuns(refs, changes.chunkIncrements, changes.chunkDecrements);
    this.#countChanges += changes.chunkIncrements.chunks + changes.chunkDecrements.chunks;
    return rootPage;
  }

  #diff(pins: Pins, rootA: number, rootB: number, chunkLimit: number): ChangedExtent[] {
    type Item = { page: number; level: number | undefined; lo: number } | { entry: number; physical: number };
    const stackA: Item[] = rootA === emptyRoot ? [] : [{ page: rootA, level: undefined, lo: 0 }];
    const stackB: Item[] = rootB === emptyRoot ? [] : [{ page: rootB, level: undefined, lo: 0 }];
    const changed: ChangedExtent[] = [];
    const mark = (v: number): void => {
      if (v >= chunkLimit) return;
      const last = changed[changed.length - 1];
      if (last !== undefined && last.virtualChunk + last.chunkCount === v) last.chunkCount += 1;
      else changed.push({ virtualChunk: v, chunkCount: 1 });
    };
    const lo = (item: Item): number => ('page' in item ? item.lo : item.entry);
    const levelOfItem = (item: Item): number => ('page' in item ? (item.level ?? levelOf(this.#node(pins, item.page, undefined))) : -1);
    // The pages of a stack with the keys each may hold: from its least key to the next item's (the one below it).
    const ranges = (stack: Item[]): Array<{ page: number; level: number; lo: number; hi: number }> => {
      const out: Array<{ page: number; level: number; lo: number; hi: number }> = [];
      let hi = Infinity;
      for (const item of stack) {
        if ('page' in item) out.push({ page: item.page, level: item.level ?? Infinity, lo: item.lo, hi });
        hi = lo(item);
      }
      return out;
    };
    // Pages of `stack` not in memory that the other tree cannot share: it holds neither them nor a higher page
    // over any of their keys. Lowest keys first (the next to be expanded).
    const alone = (stack: Item[], other: Item[]): number[] => {
      const theirs = ranges(other);
      const mine = ranges(stack);
      const found: number[] = [];
      for (let i = mine.length - 1; i >= 0; i--) {
        const p = mine[i]!;
        if (p.level === Infinity || pins.holds(p.page)) continue;
        if (theirs.some((q) => q.page === p.page || (q.level > p.level && q.lo < p.hi && p.lo < q.hi))) continue;
        found.push(p.page);
      }
      return found;
    };
    const expand = (stack: Item[]): void => {
      const item = stack[stack.length - 1]!;
      assert('page' in item);
      let node: MapNode;
      try {
        node = this.#node(pins, item.page, item.level);
      } catch (error) {
        if (!(error instanceof MissingPages)) throw error;
        // Read with it the pages of either stack that will be expanded (`alone`), so that a diff starts over about
        // once per level of each subtree that differs (up to `diffPrefetchPages` pages at once), not once per
        // page, and never reads a page the two trees share. Looked for only at a miss: the stacks hold a leaf's
        // entries, too many to scan at every step.
        pins.want([item.page, ...alone(stackA, stackB), ...alone(stackB, stackA)].slice(0, diffPrefetchPages));
        throw error;
      }
      stack.pop();
      if (node.kind === 'leaf') {
        for (let i = node.count - 1; i >= 0; i--) stack.push({ entry: node.keyAt(i), physical: node.physicalAt(i) });
      } else {
        for (let i = node.children.length - 1; i >= 0; i--) stack.push({ page: node.children[i]!, level: node.level - 1, lo: i === 0 ? item.lo : node.keys[i]! });
      }
    };
    for (;;) {
      const a = stackA[stackA.length - 1];
      const b = stackB[stackB.length - 1];
      if (a === undefined && b === undefined) break;
      if ((a !== undefined && lo(a) >= chunkLimit && (b === undefined || lo(b) >= chunkLimit)) || (a === undefined && lo(b!) >= chunkLimit)) break;
      if (a !== undefined && b !== undefined && 'page' in a && 'page' in b && a.page === b.page) {
        stackA.pop();
        stackB.pop();
        continue;
      }
      if (a === undefined || b === undefined) {
        const stack = a === undefined ? stackB : stackA;
        const item = (a ?? b)!;
        if ('page' in item) expand(stack);
        else {
          stack.pop();
          mark(item.entry);
        }
        continue;
      }
      if ('entry' in a && 'entry' in b) {
        if (a.entry === b.entry) {
          if (a.physical !== b.physical) mark(a.entry);
          stackA.pop();
          stackB.pop();
        } else if (a.entry < b.entry) {
          mark(a.entry);
          stackA.pop();
        } else {
          mark(b.entry);
          stackB.pop();
        }
        continue;
      }
      // One side or both are pages: an entry below the other side's page is changed; else expand a page (the
      // one starting first, or the higher one, so that a page shared at a different depth still meets itself).
      if ('entry' in a && a.entry < lo(b)) {
        mark(a.entry);
        stackA.pop();
      } else if ('entry' in b && b.entry < lo(a)) {
        mark(b.entry);
        stackB.pop();
      } else if (!('page' in b) || ('page' in a && (lo(a) < lo(b) || (lo(a) === lo(b) && levelOfItem(a) >= levelOfItem(b))))) {
        expand(stackA);
      } else {
        expand(stackB);
      }
    }
    return changed;
  }
}

/** Pages a diff that misses reads at once (one level of the two trees' frontier, at most). */
const diffPrefetchPages = 1024;

/** The state of a map that a root slot records. */
export interface PagedMapState {
  rootPage: number;
  mappedCount: number;
}

/** One map (a volume's or a snapshot's) in `PagedMaps`: what `ChunkMap` offers the store, with pages read on demand. */
export class PagedMap {
  readonly #maps: PagedMaps;
  #rootPage: number;
  #mappedCount: number;
  /**
   * @internal The root page's node once a lookup found it (`PagedMaps.#runCached`), forgotten at every `setState`
   * (a pass may leave the root page and place a new node on the same page number).
   */
  rootNode: MapNode | undefined = undefined;

  /** @internal use PagedMaps.empty, open or PagedMap.clone. */
  constructor(maps: PagedMaps, rootPage: number, mappedCount: number) {
    this.#maps = maps;
    this.#rootPage = rootPage;
    this.#mappedCount = mappedCount;
  }

  get rootPage(): number {
    return this.#rootPage;
  }

  /** Chunks mapped. */
  get mappedCount(): number {
    return this.#mappedCount;
  }

  /** What a root slot records of this map. */
  state(): PagedMapState {
    return { rootPage: this.#rootPage, mappedCount: this.#mappedCount };
  }

  /** @internal set by PagedMaps when a mutation applies. */
  setState(rootPage: number, mappedCount: number): void {
    assert(mappedCount >= 0);
    this.#rootPage = rootPage;
    this.#mappedCount = mappedCount;
    this.rootNode = undefined;
  }

  /** Splits [virtualChunk, virtualChunk + chunkCount) into holes and physically contiguous runs with their sums. */
  runs(virtualChunk: number, chunkCount: number): Promise<PagedRun[]> {
    return this.#maps.runs(this, virtualChunk, chunkCount);
  }

  /** The same as `runs` if every page it needs is in memory (no promise, no read), else undefined. */
  runsCached(virtualChunk: number, chunkCount: number): PagedRun[] | undefined {
    return this.#maps.runsCached(this, virtualChunk, chunkCount);
  }

  /** Points `sums.length` chunks from `virtualChunk` at consecutive physical chunks with these crc32s. */
  mapRun(virtualChunk: number, physicalChunk: number, sums: ArrayLike<number>, refs: ChunkRefs): Promise<void> {
    return this.#maps.mapRuns(this, [{ virtualChunk, physicalChunk, sums }], refs);
  }

  /** `mapRun` applied now if it can be, in place with nothing queued before it (`PagedMaps.mapRunNow`); false otherwise, nothing changed. */
  mapRunNow(virtualChunk: number, physicalChunk: number, sums: ArrayLike<number>, refs: ChunkRefs): boolean {
    return this.#maps.mapRunNow(this, virtualChunk, physicalChunk, sums, refs);
  }

  /**
   * The runs mapped one after another in one pass (a leaf and the nodes above it copied once for all the runs
   * that meet it); the same tree and the same count changes as `mapRun` of each in turn.
   */
  mapRuns(runs: readonly MapRunEdit[], refs: ChunkRefs): Promise<void> {
    return this.#maps.mapRuns(this, runs, refs);
  }

  /** Reads what a `mapRuns` of `runs` will need, ahead of it (`PagedMaps.prefetchRuns`); `release` after it. */
  prefetchRuns(runs: readonly MapRunEdit[]): Promise<{ pages: number; fits: boolean; release(): void }> {
    return this.#maps.prefetchRuns(this, runs);
  }

  /** Unmaps every chunk in [virtualChunk, virtualChunk + chunkCount); resolves to how many were mapped. */
  unmapRange(virtualChunk: number, chunkCount: number, refs: ChunkRefs): Promise<number> {
    return this.#maps.unmapRange(this, virtualChunk, chunkCount, refs);
  }

  /** A map with the same contents sharing every page with this one: one more reference on the root, O(1). */
  clone(): PagedMap {
    return this.#maps.clone(this);
  }

  /** Lets go of the root; pages and chunks nothing else holds are released. The map is empty after. */
  async drop(refs: ChunkRefs): Promise<void> {
    await this.#maps.drop(this, refs);
  }

  /** Chunks only this map holds (see `PagedMaps.uniqueChunks`): for a snapshot's map. */
  uniqueChunks(refs: { get(physicalChunk: number): number }): Promise<number> {
    return this.#maps.uniqueChunks(this, refs);
  }

  /**
   * Extents of virtual chunks below `chunkLimit` mapped differently here and in `other` (null: an empty map, so
   * every chunk mapped here), skipping shared pages.
   */
  diff(other: PagedMap | null, chunkLimit: number): Promise<ChangedExtent[]> {
    return this.#maps.diff(this, other, chunkLimit);
  }
}

/**
 * The pages a pass has read: the cache's current page first (a page rewritten in place since is seen as it is
 * now), else the one read for this pass (so an eviction between two tries cannot make it miss again).
 */
class Pins {
  readonly #lookup: (page: number) => MapNode | undefined;
  readonly #read: (page: number) => Promise<MapNode>;
  readonly #held = new Map<number, MapNode>();

  constructor(lookup: (page: number) => MapNode | undefined, read: (page: number) => Promise<MapNode>) {
    this.#lookup = lookup;
    this.#read = read;
  }

  node(page: number): MapNode {
    const node = this.#resident(page);
    if (node === undefined) throw new MissingPages([page]);
    return node;
  }

  holds(page: number): boolean {
    return this.#resident(page) !== undefined;
  }

  /** Whether this pass has read pages already (it is being run again). */
  get retrying(): boolean {
    return this.#held.size > 0;
  }

  /** Stops the pass if any of `pages` is missing, naming all that are. */
  want(pages: readonly number[]): void {
    const missing = pages.filter((page) => this.#resident(page) === undefined);
    if (missing.length > 0) throw new MissingPages(missing);
  }

  async load(pages: readonly number[]): Promise<void> {
    const unique = [...new Set(pages)];
    const read = await Promise.all(unique.map((page) => this.#read(page)));
    unique.forEach((page, i) => this.#held.set(page, read[i]!));
  }

  #resident(page: number): MapNode | undefined {
    const node = this.#lookup(page);
    if (node === undefined) return this.#held.get(page);
    if (this.#held.size > 0) this.#held.set(page, node);
    return node;
  }
}

/** Counts up the physical chunks of `leaf`'s entries [from, to), a run of consecutive chunks at a time. */
function incrementChunks(refs: ChunkRefs, leaf: LeafPage, from: number, to: number): void {
  let i = from;
  while (i < to) {
    const start = leaf.physicalAt(i);
    let j = i + 1;
    while (j < to && leaf.physicalAt(j) === start + (j - i)) j++;
    if (j - i > 1) refs.incrementRun(start, j - i);
    else refs.increment(start);
    i = j;
  }
}

/** Counts up the chunks of `increments`, then down those of `decrements`, a run at a time (a chunk alone, as a 4 KiB write's or a copied leaf's, costs less by itself). */
function applyChunkRuns(refs: ChunkRefs, increments: ChunkRunList, decrements: ChunkRunList): void {
  for (let r = 0; r < increments.starts.length; r++) {
    const start = increments.starts[r]!;
    const count = increments.counts[r]!;
    if (count > 1) refs.incrementRun(start, count);
    else refs.increment(start);
  }
  for (let r = 0; r < decrements.starts.length; r++) {
    const start = decrements.starts[r]!;
    const count = decrements.counts[r]!;
    if (count > 1) refs.decrementRun(start, count);
    else refs.decrement(start);
  }
}

/** Replaces values[from..to) with `replacement` in place (a spread of at most a few thousand, else a rebuild). */
function splice<T>(values: T[], from: number, to: number, replacement: T[]): void {
  if (replacement.length === to - from) {
    for (let i = 0; i < replacement.length; i++) values[from + i] = replacement[i]!;
    return;
  }
  if (replacement.length <= 4096) {
    values.splice(from, to - from, ...replacement);
    return;
  }
  const tail = values.slice(to);
  values.length = from;
  for (const value of replacement) values.push(value);
  for (const value of tail) values.push(value);
}

function pushRun(runs: PagedRun[], virtualChunk: number, chunkCount: number, physicalChunk: number, sum: number | undefined): void {
  const last = runs[runs.length - 1];
  if (continuesRun(last, virtualChunk, physicalChunk)) {
    last.chunkCount += chunkCount;
    if (sum !== undefined) last.sums.push(sum);
  } else {
    runs.push({ virtualChunk, chunkCount, physicalChunk, sums: sum === undefined ? [] : [sum] });
  }
}
