// The pool's files, and the steps that read and write its metadata, shared by the node (pool.ts) and the offline
// check (fsck.ts):
//
//   chunkd-pool.json       format name and version, chunk geometry, which metadata (written once, at creation)
//   lock                   flock()ed by the one process (node or fsck) that owns the pool; holds its pid
//   checkpoint.0 .1        two copies of the catalog as of the start of one journal generation (checkpoint.ts)
//   journal-<gen>.0 .1     two copies of the commits since that checkpoint (journal-format.ts)
//   metadata.0 .1          format 4 (paged metadata) only, in place of the checkpoint: two copies of the paged
//                          catalog's page file, whose root names the journal generation it covers (paged-backend.ts
//                          says how its generations start)
//   chunks/NNNNNNNN.chunk  the data (chunk-files.ts)
//   upgrade.tmp/           only while `chunkd pool upgrade` builds a format-3 pool's paged metadata (pool-upgrade.ts
//                          says in which order it switches; what a crash leaves is removed by the next open)
//   pool-id                the pool's identity, a random UUID written once at the first start of a node on it
//                          (poolIdentity below); not metadata: nothing in the pool's format depends on it
//
// A new generation starts in this order, each step durable before the next, so that a crash or power loss at any
// point leaves a pool that loads: (1) the new journal's copies, empty, and the directory synced; (2) each
// checkpoint copy, written whole to a temporary file and renamed over the old one; the directory synced;
// (3) the older journals removed, and only then space reserved for the new one. Hence: a checkpoint of generation G on disk means journal G exists (so a
// missing journal is damage, never "nothing was committed"), and a journal newer than every readable checkpoint
// must be empty (else its checkpoint was lost: damage, never an older state served silently).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { chunkSizeBytes, chunksPerFile } from '../core/limits.ts';
import { ChunkRefcounts } from './chunk-refcounts.ts';
import { chooseCheckpoint, type CheckpointChoice } from './checkpoint.ts';
import { readFully, readWholeFile, replaceFile, type FileLayer } from './file-layer.ts';
import { journalCopies, recoverJournal } from './journal-format.ts';
import { JournalFile } from './journal-file.ts';
import { applyRecord, countReferences, emptyCatalog, type Catalog } from './metadata.ts';
import { tryLockExclusive } from './native.ts';

export const poolFormatName = 'chunkd-pool';
/** Version 3: two checksummed copies of every metadata file (version 2 had one; version 1 no block checksums). */
export const poolFormatVersion = 3;
/** Version 4: paged metadata (paged-catalog.ts) with the journal as its write-ahead log; chosen at creation. */
export const pagedFormatVersion = 4;

/** Which catalog a pool's metadata is in: all in memory (format 3, the default), or paged (format 4). */
export type MetadataKind = 'memory' | 'paged';
export const metadataKinds: readonly MetadataKind[] = ['memory', 'paged'];
export const checkpointCopies = 2;

export const markerPath = (directory: string): string => path.join(directory, 'chunkd-pool.json');
export const chunksDirectory = (directory: string): string => path.join(directory, 'chunks');

/** Whether the pool's chunks/ holds a chunk file: data was written, so its metadata cannot be missing. */
export function chunksHoldData(directory: string): boolean {
  const chunks = chunksDirectory(directory);
  return fs.existsSync(chunks) && fs.readdirSync(chunks).some((name) => name.endsWith('.chunk'));
}
export const checkpointPath = (directory: string, copy: number): string => path.join(directory, `checkpoint.${copy}`);
export const journalPaths = (directory: string, generation: number): string[] =>
  Array.from({ length: journalCopies }, (_, copy) => path.join(directory, `journal-${generation}.${copy}`));

/** What a pool's metadata says after the checkpoint and the journal are read back; shared by the node and fsck. */
export interface LoadedMetadata {
  catalog: Catalog;
  refs: ChunkRefcounts;
  generation: number;
  replayedRecords: number;
  /** The journal ended in bytes of a commit a crash cut short (never acknowledged), now dropped. */
  tornTail: boolean;
  /** Damage found in one copy of a metadata file and read from the other: one line each. */
  repairs: string[];
  /** Metadata files from an older generation or a rotation cut short (the next start removes them). */
  leftovers: string[];
}

/**
 * Creates the pool's marker file in a missing or empty directory, for metadata of kind `metadata`; refuses a
 * non-empty directory that is not a pool. An existing pool keeps the kind it was made with.
 */
export async function initializePool(files: FileLayer, directory: string, metadata: MetadataKind = 'memory'): Promise<void> {
  fs.mkdirSync(directory, { recursive: true, mode: 0o700 });
  if (fs.existsSync(markerPath(directory))) return;
  // What a creation cut short by a crash leaves (the marker's temporary file, the lock) does not make it a non-pool.
  const entries = fs.readdirSync(directory).filter((name) => !name.endsWith('.sock') && name !== 'lock' && name !== 'chunkd-pool.json.tmp');
  if (entries.length > 0) throw ChunkdError.invalid(`${directory} is not empty and holds no chunkd pool (no chunkd-pool.json); use an empty or new directory`);
  const createdAt = new Date().toISOString();
  const marker = metadata === 'paged' ? pagedPoolMarker(createdAt) : Buffer.from(`${JSON.stringify({ format: poolFormatName, formatVersion: poolFormatVersion, chunkSizeBytes, chunksPerFile, createdAt }, null, 2)}\n`);
  await replaceFile(files, markerPath(directory), marker);
  await files.syncDirectory(directory);
}

/** The marker file of a pool of paged metadata (format 4) created at `createdAt` (or upgraded to it: pool-upgrade.ts). */
export function pagedPoolMarker(createdAt: string): Buffer {
  const marker = { format: poolFormatName, formatVersion: pagedFormatVersion, metadata: 'paged', chunkSizeBytes, chunksPerFile, createdAt };
  return Buffer.from(`${JSON.stringify(marker, null, 2)}\n`);
}

/** Checks the marker file and says which metadata the pool has; throws a clear error for anything that is not a pool of a version this reads. */
export async function checkPoolMarker(files: FileLayer, directory: string): Promise<MetadataKind> {
  const where = markerPath(directory);
  const bytes = await readWholeFile(files, where);
  if (bytes === null) throw ChunkdError.notFound(`${directory} is not a chunkd pool (no chunkd-pool.json)`);
  let marker: { format?: unknown; formatVersion?: unknown; metadata?: unknown; chunkSizeBytes?: unknown; chunksPerFile?: unknown };
  try {
    marker = JSON.parse(bytes.toString('utf8'));
  } catch (error) {
    throw ChunkdError.corrupt(`${where} is unreadable: ${(error as Error).message}`);
  }
  if (marker.format !== poolFormatName) throw ChunkdError.corrupt(`${where} does not describe a chunkd pool`);
  if (marker.formatVersion === 1) {
    throw ChunkdError.invalid(`pool ${directory} has format version 1, from before per-block checksums; this chunkd reads version ${poolFormatVersion}: copy its volumes out with chunkd 0.1 (e.g. nbdcopy) into a new pool`);
  }
  if (marker.formatVersion === 2) {
    throw ChunkdError.invalid(`pool ${directory} has format version 2, from before redundant metadata; this chunkd reads version ${poolFormatVersion}: copy its volumes out with the chunkd that made it (e.g. nbdcopy) into a new pool`);
  }
  const paged = marker.formatVersion === pagedFormatVersion;
  if (paged && marker.metadata !== 'paged') throw ChunkdError.corrupt(`${where}: format version ${pagedFormatVersion} without "metadata": "paged"`);
  if (marker.formatVersion !== poolFormatVersion && !paged) throw ChunkdError.invalid(`pool ${directory} has format version ${String(marker.formatVersion)}; this chunkd reads versions ${poolFormatVersion} and ${pagedFormatVersion}`);
  if (marker.chunkSizeBytes !== chunkSizeBytes || marker.chunksPerFile !== chunksPerFile) throw ChunkdError.invalid(`pool ${directory} was made with another chunk geometry`);
  return paged ? 'paged' : 'memory';
}

/** Takes the pool's lock for this process; refuses with EBUSY (naming the holder's pid) if another has it. */
export function lockPool(files: FileLayer, directory: string): number {
  const lockPath = path.join(directory, 'lock');
  const fd = files.openSync(lockPath, 'create');
  if (!tryLockExclusive(fd)) {
    const holder = fs.readFileSync(lockPath, 'utf8').trim();
    files.close(fd);
    throw ChunkdError.busy(`pool ${directory} is in use by another chunkd process${holder ? ` (pid ${holder})` : ''}`);
  }
  // Fixed width, so that a shorter pid overwrites a longer one whole.
  files.writeSync(fd, Buffer.from(`${String(process.pid).padEnd(15)}\n`), 0);
  return fd;
}

/** Runs `work` on an existing pool, holding its lock meanwhile (the offline tools: fsck, repair); EBUSY if a node has it. */
export async function withPoolLocked<T>(files: FileLayer, directory: string, work: (directory: string) => Promise<T>): Promise<T> {
  const resolved = path.resolve(directory);
  if (!fs.existsSync(markerPath(resolved))) throw ChunkdError.notFound(`${resolved} is not a chunkd pool (no chunkd-pool.json)`);
  const lockFd = lockPool(files, resolved);
  try {
    return await work(resolved);
  } finally {
    files.close(lockFd);
  }
}

export const poolIdPath = (directory: string): string => path.join(directory, 'pool-id');
const uuidPattern = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * The pool's stable identity (peers tell pools apart by it): read from `pool-id`, or, the first time, made and
 * written durably (temporary file, fdatasync, rename, directory fsync). Call with the pool locked.
 */
export async function poolIdentity(files: FileLayer, directory: string): Promise<string> {
  const where = poolIdPath(directory);
  const bytes = await readWholeFile(files, where);
  if (bytes !== null) {
    const text = bytes.toString('utf8').trim();
    if (!uuidPattern.test(text)) throw ChunkdError.corrupt(`${where} does not hold a pool id (a UUID): ${JSON.stringify(text.slice(0, 64))}`);
    return text;
  }
  const id = crypto.randomUUID();
  await replaceFile(files, where, Buffer.from(`${id}\n`));
  await files.syncDirectory(directory);
  return id;
}

/** Journal generations present in the pool directory, by file name. */
export function journalGenerations(directory: string): number[] {
  const generations = new Set<number>();
  for (const name of fs.readdirSync(directory)) {
    const match = /^journal-(\d+)\.\d+$/.exec(name);
    if (match) generations.add(Number(match[1]));
  }
  return [...generations].sort((a, b) => a - b);
}

/**
 * The copies of a file kept in two (a checkpoint, a journal), each null if it does not exist. A block of a copy
 * whose read fails with EIO (a bad sector) comes back as 0xff bytes, which no frame's checksum passes, so the
 * reader takes the other copy there as for any other damage (and an open rewrites the damaged one): the second
 * copy is there for exactly that. Other errors throw.
 */
export async function readCopies(files: FileLayer, paths: readonly string[]): Promise<Array<Buffer | null>> {
  return Promise.all(paths.map((file) => readCopy(files, file)));
}

/** What a copy is read by once a whole read failed with EIO: the unit a bad sector spoils. */
const copyBlockBytes = 4096;

async function readCopy(files: FileLayer, file: string): Promise<Buffer | null> {
  try {
    return await readWholeFile(files, file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EIO') throw error;
  }
  // Block by block, its length from the file system (the layer has no stat): the blocks past a bad one count too.
  const bytes = Buffer.alloc(fs.statSync(file).size);
  const fd = await files.open(file, 'read');
  try {
    for (let at = 0; at < bytes.length; at += copyBlockBytes) {
      const block = bytes.subarray(at, Math.min(bytes.length, at + copyBlockBytes));
      try {
        await readFully(files, fd, block, at);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EIO') throw error;
        block.fill(0xff);
      }
    }
  } finally {
    files.close(fd);
  }
  return bytes;
}

/**
 * Reads the checkpoint and replays its journal, from whichever copies are whole, without changing anything on
 * disk. Throws ECORRUPT, naming the file and byte offset, when the metadata cannot be read without losing
 * something that was committed.
 */
export async function loadMetadata(files: FileLayer, directory: string): Promise<LoadedMetadata> {
  if ((await checkPoolMarker(files, directory)) === 'paged') {
    throw ChunkdError.invalid(`pool ${directory} has paged metadata (format ${pagedFormatVersion}); this step reads only pools of format ${poolFormatVersion}`);
  }
  const repairs: string[] = [];
  const leftovers: string[] = [];
  const journals = journalGenerations(directory);
  const checkpoints = await readCopies(files, Array.from({ length: checkpointCopies }, (_, copy) => checkpointPath(directory, copy)));
  let catalog = emptyCatalog();
  let generation = 0;
  let choice: CheckpointChoice | null = null;
  if (checkpoints.every((copy) => copy === null)) {
    // A new pool, or a first start cut short before its first checkpoint: nothing can have been committed.
    if (chunksHoldData(directory)) throw ChunkdError.corrupt(`pool ${directory}: checkpoint.0 and checkpoint.1 are both missing, but chunks/ holds data`);
  } else {
    choice = chooseCheckpoint(checkpoints);
    ({ catalog, generation } = choice);
  }
  // Frees during replay need no action: the allocator is built from the counts that remain.
  const refs = new ChunkRefcounts(() => {});
  countReferences(catalog, refs);
  let replayedRecords = 0;
  let tornTail = false;
  if (generation > 0) {
    const paths = journalPaths(directory, generation);
    const copies = await readCopies(files, paths);
    if (copies.every((copy) => copy === null)) throw ChunkdError.corrupt(`pool ${directory}: the checkpoint is of generation ${generation}, but ${paths.map((p) => path.basename(p)).join(' and ')} are missing`);
    const journal = recoverJournal(copies, generation);
    if (journal.damage !== null) {
      const { offsetBytes, sequence, later } = journal.damage;
      const proof = later === null ? 'though both were written whole' : `and commit ${later.sequence} at byte ${later.offsetBytes} follows it`;
      throw ChunkdError.corrupt(
        `${paths.join(' and ')}: commit ${sequence} at byte ${offsetBytes} is damaged in both copies, ${proof} ` +
          `(damage, not a crash); the pool is left untouched: run chunkd fsck --repair to salvage what can be`,
      );
    }
    for (const { copy, offsetBytes, sequence } of journal.repairs) {
      repairs.push(`${paths[copy]} ${copies[copy] === null ? 'is missing' : `is damaged at byte ${offsetBytes}`} (commit ${sequence}); read from the other copy`);
    }
    for (const record of journal.records) applyRecord(catalog, record, refs);
    replayedRecords = journal.records.length;
    tornTail = journal.tornTail;
    // A checkpoint copy missing or of an older generation is what a rotation cut short leaves, as long as the
    // journal it started holds nothing yet; once it holds a commit, the rotation had finished (pool-layout note).
    const rotationDone = journal.commitCount > 0;
    for (const { copy, offsetBytes } of choice!.damagedCopies) {
      const missing = checkpoints[copy] === null;
      if (missing && !rotationDone) leftovers.push(`checkpoint.${copy} (missing: a checkpoint rotation cut short)`);
      else repairs.push(`${checkpointPath(directory, copy)} is ${missing ? 'missing' : `damaged at byte ${offsetBytes}`}; read from the other copy`);
    }
    for (const copy of choice!.staleCopies) {
      if (!rotationDone) leftovers.push(`checkpoint.${copy} (generation older than ${generation}: a checkpoint rotation cut short)`);
      else repairs.push(`${checkpointPath(directory, copy)} is of an older generation than the other copy, whose journal holds commits; read from the other copy`);
    }
  }
  for (const newer of journals.filter((g) => g > generation)) {
    const paths = journalPaths(directory, newer);
    const journal = recoverJournal(await readCopies(files, paths), newer);
    if (journal.commitCount > 0 || journal.damage !== null) {
      throw ChunkdError.corrupt(`${paths.join(' and ')} hold commits of generation ${newer}, but no whole checkpoint of that generation exists (the newest readable is ${generation}); the pool is left untouched`);
    }
    leftovers.push(`journal-${newer} (empty: a checkpoint rotation cut short)`);
  }
  for (const older of journals.filter((g) => g < generation)) leftovers.push(`journal-${older} (an older generation)`);
  return { catalog, refs, generation, replayedRecords, tornTail, repairs, leftovers };
}

/**
 * Starts metadata generation `generation` from `checkpoint` (the catalog's state), in the order the design note
 * gives, and returns its journal, ready for commits. Older journals are removed last.
 */
export async function beginGeneration(files: FileLayer, directory: string, checkpoint: Buffer, generation: number): Promise<JournalFile> {
  const journal = await JournalFile.create(files, journalPaths(directory, generation), generation);
  try {
    await files.syncDirectory(directory);
    for (let copy = 0; copy < checkpointCopies; copy++) await replaceFile(files, checkpointPath(directory, copy), checkpoint);
    await files.syncDirectory(directory);
  } catch (error) {
    journal.close();
    throw error;
  }
  for (const older of journalGenerations(directory).filter((g) => g !== generation)) {
    for (const file of journalPaths(directory, older)) await files.unlink(file);
  }
  // Space for the new journal only now, after the old one's went back: a node restarted on a full file system.
  await journal.reserveAhead();
  return journal;
}
