// The bounded cache of the paged metadata (step 1 of the plan in paged-metadata.md; nothing uses it yet) over a
// page file (page-file.ts). Clean pages live in an lru-cache bounded in bytes (what `serve --metadata-cache SIZE`
// will set); a page changed since the last commit is dirty and lives apart, never evicted, until `commit` writes
// it and it becomes clean. So the memory the cache holds is its bound plus the dirty pages, which the caller keeps
// in check by committing when `dirtyBytes` grows (the checkpoint trigger of the plan). What an owner keeps beside a
// cached page while it is cached (paged-map.ts's node: an interior node's arrays, about 5 KiB, more than the page's
// 4 KiB image; a leaf's object, its words being the image) is counted with the page against the bound (`hold`):
// the bound is the memory, not the images only.
// Pages are shared, not copied: a page got from the cache must not be changed in place; `put` gives the cache a
// new page (copy-on-write in memory as on disk).
import { performance } from 'node:perf_hooks';
import { LRUCache } from 'lru-cache';
import { ChunkdError } from '../core/errors.ts';
import { pageBytes, sortedPageNumbers, type Page, type PageFile, type Root } from './page-file.ts';

export interface CachedPage {
  kind: number;
  body: Buffer;
  /** Bytes its owner keeps beside it while it is cached (its decoded form), counted with it against the bound (`hold`). */
  heldBytes?: number;
  /** Its owner's decoded form, kept with it while it is cached (paged-map.ts's node): not read by the cache. */
  decoded?: unknown;
  /** What its owner holds of it outside the cache (paged-map.ts: a leaf, whose words view its body), counted in `heldBytes`: not read by the cache. */
  heldAs?: unknown;
  /**
   * Where its owner holds `heldAs` outside the cache (an array and an index in it: paged-map.ts's leaf held by its
   * parent), set with `holdOutside`; emptied when the page leaves the cache (evicted, discarded, put again), so
   * that nothing holds a page the cache no longer counts.
   */
  holder?: unknown[];
  holderIndex?: number;
}

/** What a page counts against the cache's bound: its image, and what its owner keeps beside it. */
const cachedBytes = (page: CachedPage): number => pageBytes + (page.heldBytes ?? 0);

export interface PageCacheStats {
  /** Clean pages held, in bytes (at most the bound), with what their owners keep beside them (`hold`). */
  cleanBytes: number;
  dirtyBytes: number;
  hits: number;
  /** Reads of the page file (a page asked for by several callers at once is read once). */
  misses: number;
}

/** A commit's work on its pages in memory gives the event loop a turn after about this long (checked every `sliceCheck` pages). */
const commitSliceMs = 2;
const sliceCheck = 64;
const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
/** lru-cache's `get` options, the defaults (it sets `status` on them, undefined unless its metrics are watched). */
const getOptions: LRUCache.GetOptions<number, CachedPage, unknown> = {};

/** Empties the slot where its owner holds `page` outside the cache, if it still does (the slot may hold another's since). */
function letGo(page: CachedPage): void {
  if (page.holder === undefined) return;
  if (page.holder[page.holderIndex!] === page.heldAs) page.holder[page.holderIndex!] = undefined;
  page.holder = undefined;
}

export class PageCache {
  readonly #file: PageFile;
  readonly #clean: LRUCache<number, CachedPage>;
  readonly #dirty = new Map<number, CachedPage>();
  readonly #loading = new Map<number, Promise<CachedPage>>();
  readonly #sliceMs: number;
  #hits = 0;
  #misses = 0;
  /** Clean pages evicted so far (`evictions`). */
  #evictions = 0;
  /** Set while `hold` sizes a page again (a delete and a set of the same page): it does not leave the cache. */
  #resizing = false;

  /**
   * `sliceMs`: the longest a commit works on its pages in memory before it gives the event loop a turn (0: a turn
   * every `sliceCheck` pages, for tests).
   */
  constructor(file: PageFile, maxBytes: number, sliceMs = commitSliceMs) {
    this.#sliceMs = sliceMs;
    if (!Number.isSafeInteger(maxBytes) || maxBytes < pageBytes) throw ChunkdError.invalid(`a metadata cache holds at least one page (${pageBytes} bytes), not ${maxBytes} bytes`);
    this.#file = file;
    this.#clean = new LRUCache<number, CachedPage>({
      maxSize: maxBytes,
      sizeCalculation: cachedBytes,
      dispose: (page, _pageNumber, reason) => {
        if (reason === 'evict') this.#evictions += 1;
        if (!this.#resizing) letGo(page);
      },
    });
  }

  /** The page as last put or committed, from memory or else read from the file (checked, repaired from the other copy). */
  async get(pageNumber: number): Promise<CachedPage> {
    const held = this.#dirty.get(pageNumber) ?? this.#clean.get(pageNumber);
    if (held !== undefined) {
      this.#hits += 1;
      return held;
    }
    let loading = this.#loading.get(pageNumber);
    if (loading === undefined) {
      this.#misses += 1;
      loading = this.#file.read(pageNumber).then((page: Page) => ({ kind: page.kind, body: page.body }));
      this.#loading.set(pageNumber, loading);
      const read = loading;
      void read.then(
        (page) => {
          // A put or discard while the read was under way wins (it forgot this read): the page read is older, and
          // may be older than a clean page a commit has made of the put since.
          if (this.#loading.get(pageNumber) !== read) return;
          this.#loading.delete(pageNumber);
          if (!this.#dirty.has(pageNumber) && !this.#clean.has(pageNumber)) this.#clean.set(pageNumber, page);
        },
        () => {
          if (this.#loading.get(pageNumber) === read) this.#loading.delete(pageNumber);
        },
      );
    }
    const page = await loading;
    return this.#dirty.get(pageNumber) ?? this.#clean.peek(pageNumber) ?? page;
  }

  /** The page if it is in memory (dirty, or clean and cached), else undefined: no read, never waits. */
  peek(pageNumber: number): CachedPage | undefined {
    // A lookup's path (paged-map.ts): one options object for every call, where lru-cache would make one a call.
    const held = (this.#dirty.size === 0 ? undefined : this.#dirty.get(pageNumber)) ?? this.#clean.get(pageNumber, getOptions);
    if (held !== undefined) this.#hits += 1;
    return held;
  }

  /**
   * Clean pages evicted so far. A use of a page its owner holds outside the cache (`holdOutside`) is recorded with
   * `touch` only when this has moved since its last record (paged-metadata.md, "Leaves held by their parents"): a
   * page used since the last eviction is more recent than any page not used since, which is all eviction asks.
   */
  get evictions(): number {
    return this.#evictions;
  }

  /** Records a use of a clean page (its recency, as `peek` does), without returning it. */
  touch(pageNumber: number): void {
    this.#clean.get(pageNumber, getOptions);
    this.#hits += 1;
  }

  /**
   * Lets its owner hold `page` (got from `peek`) outside the cache, as `page.heldAs` in `holder[index]`, while the
   * page is clean and cached: the slot is emptied when the page leaves the cache, and where another slot held it,
   * that one is emptied now (one holder a page). False, holding nothing, when the page is not among the clean
   * pages (dirty, or no longer cached).
   */
  holdOutside(pageNumber: number, page: CachedPage, holder: unknown[], index: number): boolean {
    if (page.heldAs === undefined || this.#clean.peek(pageNumber) !== page) return false;
    letGo(page);
    page.holder = holder;
    page.holderIndex = index;
    holder[index] = page.heldAs;
    return true;
  }

  /** Forgets a page its owner freed: a dirty one is not written at the next commit, a clean one leaves the cache. */
  discard(pageNumber: number): void {
    this.#loading.delete(pageNumber);
    this.#dirty.delete(pageNumber);
    this.#clean.delete(pageNumber);
  }

  /**
   * Counts `bytes` its owner keeps beside `page` (its decoded form) against the bound from now on, with the page's
   * image: a clean page is sized again (older pages are evicted if need be), a dirty one when its commit makes it
   * clean. A page grown past the whole bound leaves the cache (lru-cache's rule), as one that never fitted.
   */
  hold(pageNumber: number, page: CachedPage, bytes: number): void {
    if (page.heldBytes === bytes) return;
    page.heldBytes = bytes;
    if (this.#clean.peek(pageNumber) !== page) return;
    // lru-cache sizes an entry when it is set with a new value only: delete it and set it again (not a page
    // leaving: what holds it outside keeps it, unless the set evicts it).
    this.#resizing = true;
    try {
      this.#clean.delete(pageNumber);
    } finally {
      this.#resizing = false;
    }
    this.#clean.set(pageNumber, page);
    if (this.#clean.peek(pageNumber) !== page) letGo(page);
  }

  /** Replaces a page in memory; it is written at the next commit. */
  put(pageNumber: number, page: CachedPage): void {
    this.#loading.delete(pageNumber);
    this.#clean.delete(pageNumber);
    this.#dirty.set(pageNumber, page);
  }

  /**
   * Writes the dirty pages (in page order), commits them with `rootBody` as the new root, and keeps them as clean
   * pages. A checkpoint after 16 GiB written at random has some 20,000 dirty pages: what is done for each of them
   * in memory (sorting them, moving them to the clean ones after the write) gives the event loop a turn every
   * `sliceMs` (the constructor's), so that no part of a commit holds it proportionally to the dirty pages.
   */
  async commit(rootBody: Buffer): Promise<Root> {
    const numbers = sortedPageNumbers(this.#dirty.size, this.#dirty.keys());
    const pages = Array.from(numbers, (pageNumber) => this.#dirty.get(pageNumber)!);
    await this.#file.writePages(numbers, pages);
    const root = await this.#file.commit(rootBody);
    let sliceStarted = performance.now();
    for (let index = 0; index < pages.length; index++) {
      const pageNumber = numbers[index]!;
      const page = pages[index]!;
      // A page put again during the commit stays dirty (its newer body is the next commit's); one discarded is gone.
      if (this.#dirty.get(pageNumber) !== page) continue;
      this.#dirty.delete(pageNumber);
      this.#clean.set(pageNumber, page);
      if ((index + 1) % sliceCheck === 0 && performance.now() - sliceStarted >= this.#sliceMs) {
        // Between turns a page not yet moved is still dirty, as during the write: found by `get`, not evicted.
        await nextTurn();
        sliceStarted = performance.now();
      }
    }
    return root;
  }

  /** The bound on the clean pages' bytes (`serve --metadata-cache`). */
  get maxBytes(): number {
    return this.#clean.maxSize;
  }

  stats(): PageCacheStats {
    return { cleanBytes: this.#clean.calculatedSize, dirtyBytes: this.#dirty.size * pageBytes, hits: this.#hits, misses: this.#misses };
  }
}
