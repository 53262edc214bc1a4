// The checks fsck makes of paged metadata beyond a walk of each map's runs, and what `fsck --repair` repairs from
// them (fsck.ts, repair.ts):
//  - Both copies of every page the durable root names (`scanPageCopies`): every page below the page allocator's
//    mark that its free pages, as the root recorded them, do not hold. A page damaged in one copy is rewritten
//    from the other by the repair; a read repairs only the pages it reads, and a page damaged in one copy that
//    nothing reads stays one damage away from lost. A page damaged in both copies is lost.
//  - Every map tree walked once, page by page (`walkMaps`): how many references each map page has (one per table
//    entry whose root it is, one per interior entry naming it) and how many leaves name each chunk, which is what
//    the reference counts must hold (paged-map.ts: a chunk's count is the leaves naming it, a page's the roots and
//    interior pages naming it). Pages that cannot be read are lost, and `lostExtents` says which stretches of which
//    volumes and snapshots they held.
//  - The counts compared with the walk (`countMismatches`): a chunk counted above the leaves naming it is space
//    that never comes back, one counted below is space an allocation may hand out while a map still names it (a
//    write then overwrites another volume's data). `recount` sets them to what the maps say, in memory; the
//    repair's root makes it durable.
// Known weakness: the walk holds a count per chunk and per map page in memory (ChunkRefcounts: 4 bytes an index,
// in blocks of 65,536 allocated where touched), so fsck of a pool of a billion chunks needs 4 GiB; a bounded walk
// would sort references by chunk on disk. (Maps, before, took tens of bytes an entry and threw past 2^24 entries:
// 64 GiB of chunks in use.)
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes } from '../core/limits.ts';
import { firstDataPage, pageBytes } from './page-file.ts';
import type { PagedCatalog } from './paged-catalog.ts';
import { ChunkRefcounts } from './chunk-refcounts.ts';
import { emptyRoot } from './paged-map.ts';
import { countsPerPage, type RefCountMap } from './space-map.ts';

/** Pages read at once by the scan of both copies. */
const scanWindowPages = 64;

export interface DamagedPage {
  pageNumber: number;
  /** One line: which copy, where, why. */
  line: string;
}

export interface PageScan {
  /** Pages damaged in one copy (rewritten from the other when the scan repairs). */
  oneCopy: DamagedPage[];
  /** Pages damaged in both copies. */
  lost: DamagedPage[];
  pagesChecked: number;
}

/** Reads both copies of every page the durable root names; with `repair`, rewrites a damaged copy from a whole one. */
export async function scanPageCopies(catalog: PagedCatalog, repair: boolean): Promise<PageScan> {
  const { nextPage, isFree } = catalog.pagesAtOpen;
  const file = catalog.file;
  const scan: PageScan = { oneCopy: [], lost: [], pagesChecked: 0 };
  const pages: number[] = [];
  for (let page = firstDataPage; page < nextPage; page++) if (!isFree(page)) pages.push(page);
  for (let start = 0; start < pages.length; start += scanWindowPages) {
    const window = pages.slice(start, start + scanWindowPages);
    const results = await Promise.all(window.map((page) => file.checkCopies(page, repair)));
    results.forEach((copies, i) => {
      const pageNumber = window[i]!;
      const where = `metadata page ${pageNumber} (byte ${pageNumber * pageBytes})`;
      if (copies.state === 'one-damaged') scan.oneCopy.push({ pageNumber, line: `${where} in ${file.paths[copies.bad]}: ${copies.reason}` });
      else if (copies.state === 'lost') scan.lost.push({ pageNumber, line: `${where} is damaged in both copies: ${copies.reasons.join('; ')}` });
    });
    scan.pagesChecked += window.length;
  }
  return scan;
}

/** A map: a volume's or a snapshot's, as fsck names it. */
interface MapEntry {
  name: string;
  rootPage: number;
  sizeChunks: number;
}

export interface MapWalk {
  /** References to each map page: table entries whose root it is, interior entries naming it. */
  pageRefs: ChunkRefcounts;
  /** Leaves naming each chunk. */
  chunkRefs: ChunkRefcounts;
  /** Map pages that could not be read, with why. */
  lost: Map<number, string>;
}

function mapEntries(catalog: PagedCatalog): MapEntry[] {
  const entries: MapEntry[] = [];
  for (const volume of catalog.tables.volumes.values()) {
    entries.push({ name: `volume ${volume.name}`, rootPage: volume.map.rootPage, sizeChunks: Math.floor(volume.sizeBytes / chunkSizeBytes) });
    for (const snapshot of volume.snapshots.values()) {
      entries.push({ name: `snapshot ${volume.name}@${snapshot.name}`, rootPage: snapshot.map.rootPage, sizeChunks: Math.floor(snapshot.sizeBytes / chunkSizeBytes) });
    }
  }
  return entries;
}

/** Walks every map tree of the catalog (as applied so far) once, page by page: see the top. */
export async function walkMaps(catalog: PagedCatalog): Promise<MapWalk> {
  // Counts only go up here: nothing is freed.
  const counts = (): ChunkRefcounts => new ChunkRefcounts(() => {});
  const walk: MapWalk = { pageRefs: counts(), chunkRefs: counts(), lost: new Map() };
  const stack: number[] = [];
  for (const entry of mapEntries(catalog)) {
    if (entry.rootPage === emptyRoot) continue;
    walk.pageRefs.increment(entry.rootPage);
    stack.push(entry.rootPage);
  }
  const visited = counts();
  while (stack.length > 0) {
    const page = stack.pop()!;
    if (visited.get(page) !== 0) continue;
    visited.increment(page);
    let node;
    try {
      node = await catalog.mapNode(page);
    } catch (error) {
      if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
      walk.lost.set(page, error.message);
      continue;
    }
    if (node.kind === 'interior') {
      for (const child of node.children) {
        walk.pageRefs.increment(child);
        stack.push(child);
      }
    } else {
      for (let i = 0; i < node.count; i++) walk.chunkRefs.increment(node.physicalAt(i));
    }
  }
  return walk;
}

export interface LostExtentOfMap {
  /** `volume NAME` or `snapshot VOL@SNAP`. */
  map: string;
  firstChunk: number;
  chunkCount: number;
  pageNumber: number;
}

/** The stretches of each map below lost pages (clipped to its size), in map order. */
export async function lostExtents(catalog: PagedCatalog, lost: ReadonlySet<number>): Promise<LostExtentOfMap[]> {
  const extents: LostExtentOfMap[] = [];
  if (lost.size === 0) return extents;
  // Whether a page's subtree reaches a lost page, once known: shared subtrees are walked once when they do not.
  const reachesLost = new Map<number, boolean>();
  const visit = async (entry: MapEntry, page: number, from: number, to: number): Promise<boolean> => {
    if (lost.has(page)) {
      const end = Math.min(to, entry.sizeChunks);
      if (from < end) extents.push({ map: entry.name, firstChunk: from, chunkCount: end - from, pageNumber: page });
      return true;
    }
    if (reachesLost.get(page) === false) return false;
    const node = await catalog.mapNode(page);
    let found = false;
    if (node.kind === 'interior') {
      for (let i = 0; i < node.children.length; i++) {
        const childFrom = i === 0 ? from : node.keys[i]!;
        const childTo = i + 1 < node.children.length ? node.keys[i + 1]! : to;
        if (await visit(entry, node.children[i]!, childFrom, childTo)) found = true;
      }
    }
    reachesLost.set(page, found);
    return found;
  };
  for (const entry of mapEntries(catalog)) {
    if (entry.rootPage !== emptyRoot) await visit(entry, entry.rootPage, 0, Number.MAX_SAFE_INTEGER);
  }
  return extents;
}

export interface CountMismatch {
  index: number;
  counted: number;
  /** What the maps say it should be. */
  named: number;
}

export interface SummaryMismatch {
  /** Which counts: chunks' or map pages'. */
  of: 'chunk' | 'page';
  /** The page of counts (countsPerPage counts each). */
  page: number;
  /** Zeros its summary records, and zeros its counts hold. */
  recorded: number;
  counted: number;
}

export interface CountCheck {
  chunks: CountMismatch[];
  pages: CountMismatch[];
  /** Pages of counts whose summary (free counts per page, what the allocator searches by) disagrees with them. */
  summaries: SummaryMismatch[];
  /** Map pages a map names that the page allocator holds as free (the next write could overwrite them). */
  namedButFree: number[];
}

/** The chunk and page counts that differ from what the maps name (`walkMaps`), reading each page of counts once. */
export async function countMismatches(catalog: PagedCatalog, walk: MapWalk): Promise<CountCheck> {
  const check: CountCheck = { chunks: [], pages: [], summaries: [], namedButFree: [] };
  const chunks = catalog.chunks;
  const chunkEnd = Math.max(await chunks.settledHighWater(), walk.chunkRefs.end());
  await compareCounts('chunk', chunks.counts, chunkEnd, walk.chunkRefs, check, 0);
  const space = catalog.space;
  const nextPage = space.pages.nextPage;
  const pageEnd = Math.max(nextPage, walk.pageRefs.end());
  await compareCounts('page', space.pageRefs, pageEnd, walk.pageRefs, check, firstDataPage);
  for (let page = firstDataPage; page < nextPage; page++) if (space.pages.isFree(page) && walk.pageRefs.get(page) !== 0) check.namedButFree.push(page);
  return check;
}

async function compareCounts(of: 'chunk' | 'page', counts: RefCountMap, end: number, named: ChunkRefcounts, check: CountCheck, start: number): Promise<void> {
  const out = of === 'chunk' ? check.chunks : check.pages;
  const pages = Math.max(counts.pageCount, Math.ceil(end / countsPerPage));
  for (let page = Math.floor(start / countsPerPage); page < pages; page++) {
    const pin = await counts.loadPages([page]);
    try {
      for (let index = Math.max(start, page * countsPerPage); index < Math.min(end, (page + 1) * countsPerPage); index++) {
        const counted = counts.get(index);
        const expected = named.get(index);
        if (counted !== expected) out.push({ index, counted, named: expected });
      }
      if (page < counts.pageCount && counts.zeros(page) !== counts.countZeros(page)) check.summaries.push({ of, page, recorded: counts.zeros(page), counted: counts.countZeros(page) });
    } finally {
      pin.release();
    }
  }
}

/**
 * Sets the counts of `check` to what the maps name, and the summaries to what the counts hold, in memory (the
 * next root makes it durable): a chunk whose count falls to zero is free once its deferred free is released (here,
 * at once: nothing committed names it), a map page no map names goes back to the page allocator. Call with
 * nothing else applying to the catalog.
 */
export async function recount(catalog: PagedCatalog, check: CountCheck): Promise<void> {
  const chunks = catalog.chunks;
  const space = catalog.space;
  // The summaries first: a count crossing zero below moves its page's summary by one from what it says.
  for (const { of, page } of check.summaries) {
    const counts = of === 'chunk' ? chunks.counts : space.pageRefs;
    const pin = await counts.loadPages([page]);
    try {
      counts.resummarize(page);
    } finally {
      pin.release();
    }
  }
  for (const { index, counted, named } of check.chunks) {
    const pin = await chunks.counts.load([index]);
    try {
      for (let count = counted; count < named; count++) chunks.increment(index);
      for (let count = counted; count > named; count--) chunks.decrement(index);
    } finally {
      pin.release();
    }
  }
  chunks.releaseTaken(chunks.takeDeferred(chunks.deferredMark()));
  const nextPage = space.pages.nextPage;
  const owned = new Set([...space.ownedPages(), ...catalog.tablePages]);
  for (const { index, counted, named } of check.pages) {
    const pin = await space.pageRefs.load([index]);
    try {
      space.pageRefs.add(index, named - counted);
    } finally {
      pin.release();
    }
    if (named === 0 && index < nextPage && !space.pages.isFree(index) && !owned.has(index)) space.release(index);
  }
}

/** What `checkPagedCatalog` found: damage `fsck --repair` repairs with nothing lost, and damage it cannot repair. */
export interface PagedFindings {
  scan: PageScan;
  walk: MapWalk;
  lost: LostExtentOfMap[];
  /** Null when pages are lost (the counts cannot be checked against maps not read whole, or not read at all). */
  counts: CountCheck | null;
  /** One line each. */
  repairable: string[];
  unrepairable: string[];
}

/** Mismatches named in a line: the first few, then how many more. */
const shownMismatches = 4;

/** The checks at the top over an opened (and replayed) catalog, each finding as a line of fsck's. */
export async function checkPagedCatalog(catalog: PagedCatalog): Promise<PagedFindings> {
  const scan = await scanPageCopies(catalog, false);
  const walk = await walkMaps(catalog);
  const lost = await lostExtents(catalog, new Set(walk.lost.keys()));
  const repairable = scan.oneCopy.map((page) => `metadata: ${page.line} (repairable: fsck --repair rewrites it from the other copy; nothing is lost)`);
  const tablePages = new Set(catalog.tablePages);
  const spacePages = new Set(catalog.space.ownedPages());
  const roleOf = (page: number): string =>
    walk.pageRefs.get(page) !== 0
      ? 'a map page: the bytes it held are below'
      : tablePages.has(page)
        ? 'a page of the table of volumes and snapshots: the next open fails'
        : spacePages.has(page)
          ? 'a page of the space maps (reference counts, their summary or the free pages\' bitmap): a write or removal that needs it fails'
          : 'named by the root';
  const unrepairable = scan.lost.map((page) => `metadata: ${page.line} (${roleOf(page.pageNumber)})`);
  for (const [page, why] of walk.lost) if (!scan.lost.some((found) => found.pageNumber === page)) unrepairable.push(`metadata: map page ${page} cannot be read: ${why}`);
  for (const extent of lost) {
    const from = extent.firstChunk * chunkSizeBytes;
    unrepairable.push(`${extent.map}: bytes ${from}-${from + extent.chunkCount * chunkSizeBytes - 1} cannot be read (their map page ${extent.pageNumber} is damaged in both copies; fsck --repair does not salvage paged metadata)`);
  }
  let counts: CountCheck | null = null;
  // With a page lost, the counts cannot be checked: a lost map page hides what it names, a lost page of counts is
  // unreadable (and named above).
  if (walk.lost.size === 0 && scan.lost.length === 0) {
    counts = await countMismatches(catalog, walk);
    const describe = (what: string, list: CountMismatch[], named: string): void => {
      if (list.length === 0) return;
      const shown = list.slice(0, shownMismatches).map((m) => `${what} ${m.index}: counted ${m.counted}, named by ${m.named}`).join(', ');
      const more = list.length > shownMismatches ? `, and ${list.length - shownMismatches} more` : '';
      repairable.push(`space maps: ${list.length} ${what} reference count(s) differ from the ${named} naming them (${shown}${more}) (repairable: fsck --repair recounts them from the maps; nothing is lost)`);
    };
    describe('chunk', counts.chunks, 'map leaves');
    describe('page', counts.pages, 'map roots and interior pages');
    for (const m of counts.summaries) {
      repairable.push(`space maps: the summary of page ${m.page} of ${m.of} reference counts records ${m.recorded} free, its counts hold ${m.counted} (repairable: fsck --repair sets it from the counts; nothing is lost)`);
    }
    for (const page of counts.namedButFree) unrepairable.push(`space maps: map page ${page} is named by a map but free in the page allocator (fsck --repair does not rebuild the free pages)`);
  }
  return { scan, walk, lost, counts, repairable, unrepairable };
}
