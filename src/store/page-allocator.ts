// Page numbers for the paged metadata's copy-on-write (step 1 of the plan in paged-metadata.md; nothing uses it
// yet). A page replaced by copy-on-write is still named by the durable root until the commit that replaces the
// root is durable, so it is reusable only after that commit: `release` holds it, `committed` frees it (the rule
// the chunk allocator follows for chunks, allocator.ts). Allocation takes a freed page first, else a new one above
// the high-water mark. Pure: no I/O. Its state is kept on disk by space-map.ts (a free list in pages, written with
// each root: `sealForCommit` says what that root records).
import { ChunkdError } from '../core/errors.ts';
import { firstDataPage, sortedPageNumbers } from './page-file.ts';

export interface PageAllocatorState {
  /** The lowest page number never handed out. */
  nextPage: number;
  /** Pages free to hand out again. */
  free: number[];
}

export class PageAllocator {
  #nextPage: number;
  readonly #free: Set<number>;
  /** Released since the last commit: still named by the durable root. */
  readonly #released = new Set<number>();
  /** Released before the commit in flight was sealed (`sealForCommit`): free once that commit is durable. */
  #sealed: Set<number> | null = null;

  constructor(state: PageAllocatorState = { nextPage: firstDataPage, free: [] }) {
    if (!Number.isSafeInteger(state.nextPage) || state.nextPage < firstDataPage) throw ChunkdError.corrupt(`page allocator: next page ${state.nextPage}`);
    for (const page of state.free) {
      if (!Number.isSafeInteger(page) || page < firstDataPage || page >= state.nextPage) throw ChunkdError.corrupt(`page allocator: free page ${page} outside ${firstDataPage}..${state.nextPage - 1}`);
    }
    this.#nextPage = state.nextPage;
    this.#free = new Set(state.free);
    if (this.#free.size !== state.free.length) throw ChunkdError.corrupt('page allocator: a page is free twice');
  }

  allocate(): number {
    for (const page of this.#free) {
      this.#free.delete(page);
      return page;
    }
    return this.#nextPage++;
  }

  /** The pages the next `count` calls of `allocate` will return, in order (nothing released or committed between). */
  upcoming(count: number): number[] {
    const pages: number[] = [];
    for (const page of this.#free) {
      if (pages.length >= count) return pages;
      pages.push(page);
    }
    for (let page = this.#nextPage; pages.length < count; page++) pages.push(page);
    return pages;
  }

  /** A page the next root will no longer name: free once that root is durable. */
  release(page: number): void {
    if (!Number.isSafeInteger(page) || page < firstDataPage || page >= this.#nextPage) throw new Error(`page allocator: release of page ${page}, never handed out`);
    if (this.#free.has(page) || this.#released.has(page) || this.#sealed?.has(page) === true) throw new Error(`page allocator: page ${page} released twice`);
    this.#released.add(page);
  }

  /**
   * Seals the releases made so far into the commit about to be made, and returns what its root records: the pages
   * released so far count as free there (that root no longer names them), though they are handed out only after
   * `committed`. Pages released from now on wait for the commit after (its root is the one that stops naming them).
   */
  sealForCommit(): PageAllocatorState {
    const sealed = (this.#sealed ??= new Set());
    for (const page of this.#released) sealed.add(page);
    this.#released.clear();
    return { nextPage: this.#nextPage, free: Array.from(sortedPageNumbers(this.#free.size + sealed.size, this.#free, sealed)) };
  }

  /**
   * The root that stopped naming the released pages is durable: they may be written again (after `sealForCommit`,
   * those released before it; without one, all).
   */
  committed(): void {
    const freed = this.#sealed ?? this.#released;
    for (const page of freed) this.#free.add(page);
    freed.clear();
    this.#sealed = null;
  }

  /** Pages free to hand out now. */
  get freeCount(): number {
    return this.#free.size;
  }

  /** Released and not yet free (waiting for a commit). */
  get waitingCount(): number {
    return this.#released.size + (this.#sealed?.size ?? 0);
  }

  /** The state without the pages waiting for a commit (they count as in use: the durable root may name them). */
  state(): PageAllocatorState {
    return { nextPage: this.#nextPage, free: Array.from(sortedPageNumbers(this.#free.size, this.#free)) };
  }
}
