// Scrub: reads every chunk that a volume or its snapshots map, checks it against its checksum, and reports the
// damaged extents of each export. Each physical chunk is read once however many snapshots share it; reads go
// through the pool's chunk I/O engine in batches of up to `scrubBatchChunks`, a few at a time, without any range
// lock, so client I/O to the volume goes on meanwhile. The exports' runs are captured when the scrub starts;
// a chunk found bad is reported only if, once read, the metadata still names it with the checksum it had at
// the start (a chunk freed and reused meanwhile was not damaged, only replaced). A read the disk fails (EIO) is
// damage too: the batch is read again chunk by chunk, and the chunks that cannot be read are reported; the scrub
// goes on.
import { ChunkdError, isSystemError } from '../core/errors.ts';
import { chunkSizeBytes } from '../core/limits.ts';
import type { ChunkRun } from './chunk-map.ts';
import type { ChunkIo } from './chunk-io.ts';
import type { ChunkRefcounts } from './chunk-refcounts.ts';
import type { ChunkSums } from './chunk-sums.ts';
import type { Log } from '../core/log.ts';

/** Chunks read per request (1 MiB) and requests in flight: enough to stream, little enough to share the disk. */
export const scrubBatchChunks = 256;
export const scrubReadsInFlight = 4;

export interface ScrubExport {
  /** The volume, or VOL@SNAP. */
  name: string;
  runs: ChunkRun[];
}

export interface BadExtent {
  export: string;
  offsetBytes: number;
  lengthBytes: number;
}

export interface ScrubReport {
  volume: string;
  exports: string[];
  /** Distinct bytes read and checked (shared chunks once). */
  checkedBytes: number;
  badChunks: number;
  badExtents: BadExtent[];
}

/** What a scrub checks chunks against (catalog-backend.ts makes one for each catalog). */
export interface ScrubSource {
  /** The checksum recorded for a chunk the exports named when the scrub started. */
  sumOf(physicalChunk: number): number;
  /** Whether metadata still names the chunk with checksum `sum` (one freed and reused meanwhile was replaced, not damaged). */
  stillNamed(physicalChunk: number, sum: number): boolean | Promise<boolean>;
}

/** A scrub's source over an in-memory catalog's checksums and counts (the pool's, and fsck --repair's). */
export function memoryScrubSource(sums: ChunkSums, refs: Pick<ChunkRefcounts, 'get'>): ScrubSource {
  return { sumOf: (chunk) => sums.get(chunk), stillNamed: (chunk, sum) => refs.get(chunk) > 0 && sums.get(chunk) === sum };
}

export interface ScrubStore extends ScrubSource {
  readonly io: ChunkIo;
  log: Log;
}

/** Physical chunks of all exports, each once, as sorted batches of contiguous chunks. Pure. */
export function planScrub(exports: readonly ScrubExport[]): Array<{ physicalChunk: number; chunkCount: number }> {
  const chunks = new Set<number>();
  for (const entry of exports) for (const run of entry.runs) for (let i = 0; i < run.chunkCount; i++) chunks.add(run.physicalChunk + i);
  const sorted = Float64Array.from(chunks).sort();
  const batches: Array<{ physicalChunk: number; chunkCount: number }> = [];
  for (const chunk of sorted) {
    const last = batches[batches.length - 1];
    if (last !== undefined && last.physicalChunk + last.chunkCount === chunk && last.chunkCount < scrubBatchChunks) last.chunkCount += 1;
    else batches.push({ physicalChunk: chunk, chunkCount: 1 });
  }
  return batches;
}

/** The extents of each export that map a bad physical chunk, merged where adjacent. Pure. */
export function badExtentsOf(exports: readonly ScrubExport[], bad: ReadonlySet<number>): BadExtent[] {
  const extents: BadExtent[] = [];
  for (const entry of exports) {
    let pending: BadExtent | undefined;
    for (const run of entry.runs) {
      for (let i = 0; i < run.chunkCount; i++) {
        if (!bad.has(run.physicalChunk + i)) continue;
        const offsetBytes = (run.virtualChunk + i) * chunkSizeBytes;
        if (pending !== undefined && pending.offsetBytes + pending.lengthBytes === offsetBytes) {
          pending.lengthBytes += chunkSizeBytes;
          continue;
        }
        if (pending !== undefined) extents.push(pending);
        pending = { export: entry.name, offsetBytes, lengthBytes: chunkSizeBytes };
      }
    }
    if (pending !== undefined) extents.push(pending);
  }
  return extents;
}

/** Reads and checks every chunk of `exports`; `onProgress` hears bytes checked so far and the total. */
export async function scrub(
  store: ScrubStore,
  volume: string,
  exports: readonly ScrubExport[],
  onProgress: (doneBytes: number, totalBytes: number) => void = () => {},
): Promise<ScrubReport> {
  const batches = planScrub(exports);
  const expected = new Map<number, number>();
  for (const batch of batches) for (let i = 0; i < batch.chunkCount; i++) expected.set(batch.physicalChunk + i, store.sumOf(batch.physicalChunk + i));
  const totalBytes = batches.reduce((sum, batch) => sum + batch.chunkCount * chunkSizeBytes, 0);
  const bad = new Set<number>();
  let doneBytes = 0;
  let next = 0;
  onProgress(0, totalBytes);

  const checkRange = async (physicalChunk: number, chunkCount: number): Promise<void> => {
    const buffer = Buffer.allocUnsafe(chunkCount * chunkSizeBytes);
    const sums = new Uint32Array(chunkCount);
    for (let i = 0; i < chunkCount; i++) sums[i] = expected.get(physicalChunk + i)!;
    let from = 0;
    // A mismatch names only the first bad chunk: go on checking after it.
    while (from < chunkCount) {
      const mismatch = await store.io.readChunks(buffer.subarray(from * chunkSizeBytes), Float64Array.of(physicalChunk + from, chunkCount - from, 0), sums.subarray(from), true);
      if (mismatch === null) break;
      const chunk = physicalChunk + from + mismatch.chunkIndex;
      if (await store.stillNamed(chunk, mismatch.expected)) {
        bad.add(chunk);
        store.log(`scrub of ${volume}: 4 KiB chunk ${chunk} does not match its checksum (expected crc32 ${hex(mismatch.expected)}, read ${hex(mismatch.actual)})`, 'error');
      }
      from += mismatch.chunkIndex + 1;
    }
  };
  const checkBatch = async (physicalChunk: number, chunkCount: number): Promise<void> => {
    try {
      await checkRange(physicalChunk, chunkCount);
    } catch (error) {
      if (!readFailure(error)) throw error;
      // The disk failed a read: find which chunks it cannot give, one at a time.
      for (let chunk = physicalChunk; chunk < physicalChunk + chunkCount; chunk++) {
        try {
          await checkRange(chunk, 1);
        } catch (chunkError) {
          if (!readFailure(chunkError)) throw chunkError;
          if (!(await store.stillNamed(chunk, expected.get(chunk)!))) continue;
          bad.add(chunk);
          store.log(`scrub of ${volume}: 4 KiB chunk ${chunk} cannot be read (${(chunkError as Error).message})`, 'error');
        }
      }
    }
  };
  const worker = async (): Promise<void> => {
    while (next < batches.length) {
      const batch = batches[next++]!;
      await checkBatch(batch.physicalChunk, batch.chunkCount);
      doneBytes += batch.chunkCount * chunkSizeBytes;
      onProgress(doneBytes, totalBytes);
    }
  };
  await Promise.all(Array.from({ length: scrubReadsInFlight }, worker));
  return { volume, exports: exports.map((entry) => entry.name), checkedBytes: totalBytes, badChunks: bad.size, badExtents: badExtentsOf(exports, bad) };
}

/** A failed read (an errno from the disk), as opposed to a bug, which must not be taken for damage. */
function readFailure(error: unknown): boolean {
  return error instanceof ChunkdError || isSystemError(error);
}

/** A CRC-32 as eight hex digits, as every checksum message writes it. */
export function hex(value: number): string {
  return value.toString(16).padStart(8, '0');
}
