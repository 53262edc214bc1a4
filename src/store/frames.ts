// Checksummed frames, the unit of every metadata file (journal commits and checkpoints) and what makes their two
// copies repairable from each other: [u32 payload length][u32 crc32 of the payload][payload]. Both copies of a
// metadata file are written with the same bytes at the same offsets, so a frame damaged in one copy is read from
// the other at the same offset, and a stretch damaged in both copies is still whole if the damage lies in
// different frames. Pure: bytes in, values out.
import { crc32 } from 'node:zlib';

export const frameHeaderBytes = 8;

/** Frames around each payload, in one buffer. */
export function encodeFrames(payloads: readonly Uint8Array[]): Buffer {
  const out = Buffer.allocUnsafe(payloads.reduce((sum, payload) => sum + frameHeaderBytes + payload.length, 0));
  let offset = 0;
  for (const payload of payloads) {
    out.writeUInt32LE(payload.length, offset);
    out.writeUInt32LE(crc32(payload), offset + 4);
    out.set(payload, offset + frameHeaderBytes);
    offset += frameHeaderBytes + payload.length;
  }
  return out;
}

/** The payload of the frame at `offset` if it is whole and matches its checksum, and where the next frame starts. */
export function frameAt(bytes: Uint8Array, offset: number, endBytes = bytes.length): { payload: Buffer; end: number } | null {
  if (offset + frameHeaderBytes > endBytes) return null;
  const view = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  const length = view.readUInt32LE(offset);
  const end = offset + frameHeaderBytes + length;
  if (length === 0 || end > endBytes) return null;
  const payload = view.subarray(offset + frameHeaderBytes, end);
  if (crc32(payload) !== view.readUInt32LE(offset + 4)) return null;
  return { payload, end };
}

/** Where frames from `start` to `end` could not be read from any copy. */
export interface FrameDamage {
  offsetBytes: number;
}

/**
 * Reads the frames filling [start, end) from whichever copy holds each one whole (copies may be null: missing):
 * the payloads in order, or the offset of the first frame no copy holds whole.
 */
export function readFramesFromCopies(copies: ReadonlyArray<Uint8Array | null>, start: number, end: number): { payloads: Buffer[] } | { damage: FrameDamage } {
  const payloads: Buffer[] = [];
  let offset = start;
  while (offset < end) {
    let frame: { payload: Buffer; end: number } | null = null;
    for (const copy of copies) {
      if (copy === null) continue;
      frame = frameAt(copy, offset, Math.min(end, copy.length));
      if (frame !== null) break;
    }
    if (frame === null) return { damage: { offsetBytes: offset } };
    payloads.push(frame.payload);
    offset = frame.end;
  }
  return { payloads };
}

const zeros = new Uint8Array(64 * 1024);

/** Whether bytes [start, end) of `bytes` are all zero (a missing part counts as zeros). */
export function isZero(bytes: Uint8Array, start: number, end = bytes.length): boolean {
  const stop = Math.min(end, bytes.length);
  for (let offset = start; offset < stop; offset += zeros.length) {
    const length = Math.min(zeros.length, stop - offset);
    if (Buffer.compare(bytes.subarray(offset, offset + length), zeros.subarray(0, length)) !== 0) return false;
  }
  return true;
}
