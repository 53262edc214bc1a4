// Every transmission request is validated here, once, before it reaches a device (nbdkit's validate_request):
// the device behind it asserts instead of checking again. The answer is an NBD error number, 0 when valid.
import { rangeRequestBytesMax, requestBytesMax } from '../core/limits.ts';
import type { NbdRequest } from './protocol.ts';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM,
} from './protocol.ts';

const knownFlags = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;

export interface ValidationContext {
  sizeBytes: number;
  readOnly: boolean;
  structuredReplies: boolean;
  /** Nonzero when base:allocation was selected. */
  metaContextId: number;
}

/**
 * Returns 0 if `request` may go to the device, else the NBD error to answer. NBD_CMD_DISC is not a request
 * this function sees. Zero-length READ, WRITE, TRIM, WRITE_ZEROES and CACHE inside the export are valid (and
 * done as no-ops by the caller); a zero-length BLOCK_STATUS is not, since its reply needs a nonzero extent.
 */
export function validateRequest(request: NbdRequest, context: ValidationContext): number {
  const { type, flags, offsetBytes, lengthBytes } = request;
  const isWrite = type === NBD_CMD_WRITE || type === NBD_CMD_TRIM || type === NBD_CMD_WRITE_ZEROES;
  switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
      break;
    default:
      return NBD_EINVAL; // unknown command (spec: SHOULD return EINVAL)
  }

  // Flags: unknown ones, and known ones on a command they do not apply to, are EINVAL (spec).
  // FUA is accepted on every command (spec: the server MUST accept it, even by ignoring it).
  if ((flags & ~knownFlags) !== 0) return NBD_EINVAL;
  if ((flags & (NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) !== 0 && type !== NBD_CMD_WRITE_ZEROES) return NBD_EINVAL;
  if ((flags & NBD_CMD_FLAG_DF) !== 0 && (type !== NBD_CMD_READ || !context.structuredReplies)) return NBD_EINVAL;
  if ((flags & NBD_CMD_FLAG_REQ_ONE) !== 0 && type !== NBD_CMD_BLOCK_STATUS) return NBD_EINVAL;

  if (isWrite && context.readOnly) return NBD_EPERM;

  if (type === NBD_CMD_FLUSH) return offsetBytes === 0 && lengthBytes === 0 ? 0 : NBD_EINVAL;

  // Offsets above 2^53 decode as Infinity and fail here. The sum is exact below 2^53, and any export is far
  // smaller (limits.volumeSizeMaxBytes), so rounding above it cannot make a bad range pass.
  if (offsetBytes + lengthBytes > context.sizeBytes) {
    // Spec: a write past the end is ENOSPC; a read, trim or status past it is EINVAL.
    return type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
  }

  switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
      // Larger than the NBD_INFO_BLOCK_SIZE maximum we advertise: EINVAL (spec), the connection goes on.
      return lengthBytes > requestBytesMax ? NBD_EINVAL : 0;
    case NBD_CMD_BLOCK_STATUS:
      if (!context.structuredReplies || context.metaContextId === 0) return NBD_EINVAL;
      return lengthBytes === 0 ? NBD_EINVAL : 0;
    default:
      // TRIM and WRITE_ZEROES longer than rangeRequestBytesMax are split by the caller; CACHE touches nothing.
      return 0;
  }
}

/** Splits a TRIM or WRITE_ZEROES range into pieces no longer than limits.rangeRequestBytesMax. */
export function splitRange(offsetBytes: number, lengthBytes: number): Array<{ offsetBytes: number; lengthBytes: number }> {
  const pieces: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  let at = offsetBytes;
  let remaining = lengthBytes;
  while (remaining > 0) {
    const step = Math.min(remaining, rangeRequestBytesMax);
    pieces.push({ offsetBytes: at, lengthBytes: step });
    at += step;
    remaining -= step;
  }
  return pieces;
}
