// Page numbers for the paged metadata's copy-on-write (step 1 of the plan in paged-metadata.md; nothing uses it
// yet). A page replaced by copy-on-write is still named by the durable root until the commit that replaces the
// root is durable, so it is reusable only after that commit: `release` holds it, `committed` frees it (the rule
// the chunk allocator follows for chunks, allocator.ts). Allocation takes a freed page first, else a new one above
// the high-water mark. Pure: no I/O. Where its state is kept on disk (a free list in pages, as LMDB's) is step 2's.
import { ChunkdError } from '../core/errors.ts';
import { firstDataPage } from './page-file.ts';

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

  /** A page the next root will no longer name: free once that root is durable. */
  release(page: number): void {
    if (!Number.isSafeInteger(page) || page < firstDataPage || page >= this.#nextPage) throw new Error(`page allocator: release of page ${page}, never handed out`);
    if (this.#free.has(page) || this.#released.has(page)) throw new Error(`page allocator: page ${page} released twice`);
    this.#released.add(page);
  }

  /** The root that stopped naming the released pages is durable: they may be written again. */
  committed(): void {
    for (const page of this.#released) this.#free.add(page);
    this.#released.clear();
  }

  /** What a root records: pages released but not yet committed count as in use (a crash leaves them named). */
  state(): PageAllocatorState {
    return { nextPage: this.#nextPage, free: [...this.#free].sort((a, b) => a - b) };
  }
}
