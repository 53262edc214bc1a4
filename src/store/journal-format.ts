// The journal's on-disk format, and how a load reads it back from its two copies. Pure: bytes in, values out.
//
// A journal generation is two files, journal-<gen>.0 and journal-<gen>.1, written with the same bytes at the same
// offsets and fdatasynced together: one commit (a group of records, frames.ts) is appended to both before a FLUSH
// replies. A commit is a 24-byte header, its record frames, and zeros up to a multiple of 8 bytes:
//   u32 magic | u32 crc32 of the next 16 header bytes | u32 generation | u32 sequence (1, 2, ...) |
//   u32 bytes of frames | u32 crc32 of frames and padding
// The files are reserved ahead and read as zeros past the last commit.
//
// Why two copies and sequence numbers: a journal alone cannot tell a record torn by a crash (never acknowledged,
// safe to drop) from a record damaged on the medium later (acknowledged: dropping it loses data silently, and
// everything after it). Here the rules are:
//  1. A commit is read from whichever copy holds it whole; if neither does, frame by frame from both (damage in
//     different frames of the two copies still leaves every frame whole somewhere). A copy that did not hold it
//     is damaged at that offset and is repaired (the next generation is written whole from what was read).
//  2. A commit no copy can give ends the journal only if it was never written whole: a commit is acknowledged
//     only once it is durable in both copies, so one that some copy shows unfinished (a 512-byte sector of its
//     span still all zeros, as a crash leaves the reserved space) was never acknowledged and is dropped. If every
//     copy holds it written through and it still fails its checksums, that is damage. So is any valid commit of
//     a later sequence after it: commits are serialized, so only the last can have been in flight. On damage the
//     load refuses the pool with the offset rather than drop acknowledged records.
//  3. Non-zero bytes past the end are the torn tail of the commit in flight: reported, dropped, never an error.
//     So is a last commit that a copy holds torn, differing from the commit as written only by zeros (sectors a
//     crash kept from reaching it; a flipped byte is damage), whether the other copy holds it whole or the two
//     together hold every frame: it is kept, as its records' data was durable before it was written (invariant 1
//     of pool.ts).
// Known weakness: a sector that media damage turned to zeros reads as a crash's unwritten sector (a commit whose
// two copies are damaged, one of them that way, reads as a torn tail). A copy that is missing or short counts as
// damaged wherever the other has data.
import { crc32 } from 'node:zlib';
import { ChunkdError } from '../core/errors.ts';
import { encodeFrames, frameAt, isZero, readFramesFromCopies } from './frames.ts';
import { decodeRecord, type MetaRecord } from './metadata.ts';

export const journalCopies = 2;
const commitMagic = 0x334a4b43; // "CKJ3"
export const commitHeaderBytes = 24;
const commitAlignBytes = 8;
/** The magic as it lies in a file, for `indexOf`. */
const commitMagicBytes = Buffer.alloc(4);
commitMagicBytes.writeUInt32LE(commitMagic, 0);

/** A commit of already-framed records (metadata.ts encodeRecords), padded, ready to append at an aligned offset. */
export function encodeCommit(generation: number, sequence: number, frames: Buffer): Buffer {
  const totalBytes = alignUp(commitHeaderBytes + frames.length);
  const out = Buffer.alloc(totalBytes);
  out.writeUInt32LE(commitMagic, 0);
  out.writeUInt32LE(generation, 8);
  out.writeUInt32LE(sequence, 12);
  out.writeUInt32LE(frames.length, 16);
  frames.copy(out, commitHeaderBytes);
  out.writeUInt32LE(crc32(out.subarray(commitHeaderBytes)), 20);
  out.writeUInt32LE(crc32(out.subarray(8, commitHeaderBytes)), 4);
  return out;
}

interface CommitHeader {
  sequence: number;
  framesBytes: number;
  bodyCrc: number;
  /** Where the commit (header, frames, padding) ends. */
  end: number;
}

/** The commit header at `offset` if it is whole, of this generation, and its commit fits in the file. */
function headerAt(view: Buffer | null, offset: number, generation: number): CommitHeader | null {
  if (view === null || offset + commitHeaderBytes > view.length) return null;
  if (view[offset] !== (commitMagic & 0xff) || view.readUInt32LE(offset) !== commitMagic) return null;
  if (crc32(view.subarray(offset + 8, offset + commitHeaderBytes)) !== view.readUInt32LE(offset + 4)) return null;
  if (view.readUInt32LE(offset + 8) !== generation) return null;
  const framesBytes = view.readUInt32LE(offset + 16);
  const end = offset + alignUp(commitHeaderBytes + framesBytes);
  if (end > view.length) return null;
  return { sequence: view.readUInt32LE(offset + 12), framesBytes, bodyCrc: view.readUInt32LE(offset + 20), end };
}

/** The commit's body (frames and padding) from `copy` if it matches the header's checksum. */
function bodyIn(copy: Buffer | null, offset: number, header: CommitHeader): Buffer | null {
  if (copy === null || header.end > copy.length) return null;
  const body = copy.subarray(offset + commitHeaderBytes, header.end);
  return crc32(body) === header.bodyCrc ? body : null;
}

export interface JournalRecovery {
  records: MetaRecord[];
  commitCount: number;
  /** Bytes of whole commits: where the next one would go. */
  endBytes: number;
  /** Commits one copy did not hold whole (damaged or missing there), read from the other. */
  repairs: Array<{ copy: number; offsetBytes: number; sequence: number }>;
  /** Non-zero bytes past the last commit in some copy: a commit torn by a crash, never acknowledged. */
  tornTail: boolean;
  /**
   * A commit no copy holds whole though each holds it written through, or with a valid later commit after it:
   * damage, not a crash (null if none). `later`: that later commit, when there is one.
   */
  damage: { offsetBytes: number; sequence: number; later: { offsetBytes: number; sequence: number } | null } | null;
}

/**
 * Reads the commits of generation `generation` from its copies (null: that file is missing). Stops at the first
 * commit no copy holds whole; `damage` says whether that was damage (later commits exist) or the end.
 */
export function recoverJournal(files: ReadonlyArray<Uint8Array | null>, generation: number): JournalRecovery {
  const copies = files.map((copy) => (copy === null ? null : Buffer.from(copy.buffer, copy.byteOffset, copy.length)));
  const records: MetaRecord[] = [];
  const repairs: JournalRecovery['repairs'] = [];
  let offset = 0;
  let sequence = 1;
  /** The last commit read, as it was written (whole in some copy, or assembled frame by frame from them). */
  let lastBytes: Buffer | null = null;
  for (;;) {
    const commit = readCommit(copies, offset, generation, sequence);
    if (commit === null) break;
    lastBytes = commit.bytes;
    for (let copy = 0; copy < copies.length; copy++) if (!commit.wholeIn.includes(copy)) repairs.push({ copy, offsetBytes: offset, sequence });
    for (const record of commit.records) records.push(record);
    offset = commit.end;
    sequence += 1;
  }
  const later = findLaterCommit(copies, offset, generation, sequence);
  const writtenThrough = later === null && copies.some((copy) => copy !== null) && copies.every((copy) => copy === null || !unfinishedAt(copy, offset, generation));
  // The last commit, torn (not damaged) in a copy: where that copy differs from the commit as written, it holds
  // zeros, the sectors a crash kept from it. (Torn in both copies at different sectors, it is read frame by frame.)
  const tornLast = (repair: JournalRecovery['repairs'][number]): boolean => {
    if (later !== null || repair.sequence !== sequence - 1 || lastBytes === null) return false;
    const torn = copies[repair.copy];
    if (torn === null || torn === undefined) return false;
    for (let i = 0; i < lastBytes.length; i++) if (torn[repair.offsetBytes + i] !== lastBytes[i] && torn[repair.offsetBytes + i] !== 0) return false;
    return true;
  };
  const tornCopies = repairs.filter(tornLast);
  const tornTail = later === null && !writtenThrough && (tornCopies.length > 0 || copies.some((copy) => copy !== null && !isZero(copy, offset)));
  return {
    records,
    commitCount: sequence - 1,
    endBytes: offset,
    repairs: repairs.filter((repair) => !tornCopies.includes(repair)),
    tornTail,
    damage: later !== null || writtenThrough ? { offsetBytes: offset, sequence, later } : null,
  };
}

/** The commit `sequence` at `offset`, from whichever copies hold it, or null if none can give it whole. */
function readCommit(
  copies: ReadonlyArray<Buffer | null>,
  offset: number,
  generation: number,
  sequence: number,
): { records: MetaRecord[]; end: number; wholeIn: number[]; bytes: Buffer } | null {
  const headers = copies.map((copy) => headerAt(copy, offset, generation)).map((header) => (header?.sequence === sequence ? header : null));
  for (const [headerCopy, header] of headers.entries()) {
    if (header === null) continue;
    let bytes: Buffer;
    const wholeIn = copies.flatMap((copy, index) => (headers[index] !== null && sameHeader(headers[index]!, header) && bodyIn(copy, offset, header) !== null ? [index] : []));
    let payloads: Buffer[];
    if (wholeIn.length > 0) {
      const body = bodyIn(copies[wholeIn[0]!]!, offset, header)!;
      const framed = readFramesFromCopies([body], 0, header.framesBytes);
      if (!('payloads' in framed)) throw ChunkdError.corrupt(`journal commit ${sequence} at byte ${offset}: its frames do not parse though its checksum matches`);
      payloads = framed.payloads;
      bytes = copies[wholeIn[0]!]!.subarray(offset, header.end);
    } else {
      // Damaged in every copy: frame by frame, each from a copy that holds it whole (rule 1).
      const framed = readFramesFromCopies(copies, offset + commitHeaderBytes, offset + commitHeaderBytes + header.framesBytes);
      if (!('payloads' in framed)) continue;
      const padding = header.end - offset - commitHeaderBytes - header.framesBytes;
      const body = Buffer.concat([encodeFrames(framed.payloads), Buffer.alloc(padding)]);
      if (crc32(body) !== header.bodyCrc) continue;
      payloads = framed.payloads;
      bytes = Buffer.concat([copies[headerCopy]!.subarray(offset, offset + commitHeaderBytes), body]);
    }
    const records: MetaRecord[] = [];
    for (const payload of payloads) {
      const record = decodeRecord(payload);
      if (record === null) throw ChunkdError.corrupt(`journal commit ${sequence} at byte ${offset}: a record this version does not know (type ${payload[0]})`);
      records.push(record);
    }
    return { records, end: header.end, wholeIn, bytes };
  }
  return null;
}

function sameHeader(a: CommitHeader, b: CommitHeader): boolean {
  return a.sequence === b.sequence && a.framesBytes === b.framesBytes && a.bodyCrc === b.bodyCrc;
}

const sectorBytes = 512;

/**
 * Whether the commit starting at `offset` in `copy` shows it was never written through: nothing there (zeros), or
 * a 512-byte sector of its span (the header's when no header is whole) whose part in the span is all zeros.
 */
function unfinishedAt(copy: Buffer, offset: number, generation: number): boolean {
  const header = headerAt(copy, offset, generation);
  const end = Math.min(copy.length, header === null ? offset + commitHeaderBytes : header.end);
  if (offset >= copy.length) return true;
  for (let sector = Math.floor(offset / sectorBytes) * sectorBytes; sector < end; sector += sectorBytes) {
    if (isZero(copy, Math.max(sector, offset), Math.min(sector + sectorBytes, end))) return true;
  }
  return false;
}

/** The first valid commit of a sequence after `sequence` at an aligned offset past `offset`, in any copy (rule 2). */
function findLaterCommit(copies: ReadonlyArray<Buffer | null>, offset: number, generation: number, sequence: number): { offsetBytes: number; sequence: number } | null {
  let found: { offsetBytes: number; sequence: number } | null = null;
  for (const copy of copies) {
    if (copy === null) continue;
    // The magic is looked for by indexOf (native), then its alignment checked: a loop over every aligned offset
    // read every 8th byte of the whole file (8 MiB reserved, both copies), about 60 ms at every open of a journal.
    const more = (at: number): boolean => at >= 0 && at + commitHeaderBytes <= copy.length && (found === null || at < found.offsetBytes);
    for (let at = copy.indexOf(commitMagicBytes, alignUp(offset + 1)); more(at); at = copy.indexOf(commitMagicBytes, at + 1)) {
      if (at % commitAlignBytes !== 0) continue;
      const header = headerAt(copy, at, generation);
      // A whole header of a later sequence is proof enough: its own checksum covers it, and no crash writes one.
      if (header === null || header.sequence <= sequence) continue;
      found = { offsetBytes: at, sequence: header.sequence };
    }
  }
  return found;
}

function alignUp(bytes: number): number {
  return Math.ceil(bytes / commitAlignBytes) * commitAlignBytes;
}

/** One thing salvage found in a damaged journal, in journal order. */
export type SalvageItem =
  | { kind: 'record'; record: MetaRecord; offsetBytes: number; sequence: number }
  /** A frame no copy holds whole, with what its damaged bytes seem to say (never applied, only reported). */
  | { kind: 'lost-frame'; offsetBytes: number; sequence: number; seemsToBe: MetaRecord | null }
  /** A stretch without a readable commit header, skipped up to the next whole commit of a later sequence. */
  | { kind: 'lost-stretch'; offsetBytes: number; endBytes: number; sequences: string };

/**
 * Reads everything of a damaged journal that can be read (fsck --repair): whole commits; the whole frames of a
 * commit whose header survives; past a stretch without a readable header, on from the next whole commit.
 */
export function salvageJournal(files: ReadonlyArray<Uint8Array | null>, generation: number): SalvageItem[] {
  const copies = files.map((copy) => (copy === null ? null : Buffer.from(copy.buffer, copy.byteOffset, copy.length)));
  const items: SalvageItem[] = [];
  let offset = 0;
  let sequence = 1;
  for (;;) {
    const commit = readCommit(copies, offset, generation, sequence);
    if (commit !== null) {
      for (const record of commit.records) items.push({ kind: 'record', record, offsetBytes: offset, sequence });
      offset = commit.end;
      sequence += 1;
      continue;
    }
    const header = copies.map((copy) => headerAt(copy, offset, generation)).find((found) => found?.sequence === sequence);
    if (header !== undefined && header !== null) {
      salvageFrames(copies, offset + commitHeaderBytes, offset + commitHeaderBytes + header.framesBytes, sequence, items);
      offset = header.end;
      sequence += 1;
      continue;
    }
    const later = findLaterCommit(copies, offset, generation, sequence);
    if (later === null) return items;
    items.push({ kind: 'lost-stretch', offsetBytes: offset, endBytes: later.offsetBytes, sequences: later.sequence - 1 > sequence ? `${sequence}-${later.sequence - 1}` : `${sequence}` });
    offset = later.offsetBytes;
    sequence = later.sequence;
  }
}

/** The frames of one commit's body: whole ones kept, a damaged one skipped by a length that leads on (or the rest lost). */
function salvageFrames(copies: ReadonlyArray<Buffer | null>, start: number, end: number, sequence: number, items: SalvageItem[]): void {
  const present = copies.filter((copy): copy is Buffer => copy !== null);
  const frameIn = (copy: Buffer, at: number): { payload: Buffer; end: number } | null => frameAt(copy, at, Math.min(end, copy.length));
  let offset = start;
  while (offset < end) {
    const frame = present.map((copy) => frameIn(copy, offset)).find((found) => found !== null) ?? null;
    if (frame !== null) {
      const record = decodeRecord(frame.payload);
      items.push(record !== null ? { kind: 'record', record, offsetBytes: offset, sequence } : { kind: 'lost-frame', offsetBytes: offset, sequence, seemsToBe: null });
      offset = frame.end;
      continue;
    }
    const next = present
      .map((copy) => (offset + 8 <= copy.length ? offset + 8 + copy.readUInt32LE(offset) : -1))
      .find((candidate) => candidate > offset && candidate <= end && (candidate === end || present.some((copy) => frameIn(copy, candidate) !== null)));
    const seemsToBe = next === undefined ? null : (present.map((copy) => decodeRecord(copy.subarray(offset + 8, next))).find((record) => record !== null) ?? null);
    items.push({ kind: 'lost-frame', offsetBytes: offset, sequence, seemsToBe });
    if (next === undefined) return;
    offset = next;
  }
}
