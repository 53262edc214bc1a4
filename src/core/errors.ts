// One error class with stable string codes (as hypercore-errors and undici do). Each code maps one-to-one onto
// an errno, so the NBD server and the FUSE front end answer the same failure the same way.
// A bug (failed assertion) is not a ChunkdError and is never caught: it stops the node (fail-stop.ts, the one
// error policy of every front end and thread).

export const errorCodes = {
  EINVAL: { errno: 22, nbd: 22 }, // bad argument, out-of-range request
  ENOSPC: { errno: 28, nbd: 28 }, // pool file system full, or a write past the end of an export
  EPERM: { errno: 1, nbd: 1 }, // write to a read-only export
  EIO: { errno: 5, nbd: 5 }, // the disk failed, or a checksum did not match
  ENOMEM: { errno: 12, nbd: 12 }, // a limit on memory in flight was hit
  EOVERFLOW: { errno: 75, nbd: 75 }, // a structured read would not fit the client's buffers
  ENOTSUP: { errno: 95, nbd: 95 }, // asked for something this node does not do (e.g. FAST_ZERO that is not fast)
  ESHUTDOWN: { errno: 108, nbd: 108 }, // the node is stopping
  ENOENT: { errno: 2, nbd: 22 }, // no such volume or snapshot
  EEXIST: { errno: 17, nbd: 22 }, // the name is taken
  EBUSY: { errno: 16, nbd: 22 }, // in use (exported, attached, pool locked by another node)
  EBADNAME: { errno: 22, nbd: 22 }, // a volume or snapshot name that DESIGN.md's rule refuses
  EPROTO: { errno: 71, nbd: 22 }, // the peer broke the protocol: the connection is closed
  ECORRUPT: { errno: 5, nbd: 5 }, // metadata on disk failed its checks
} as const;

export type ErrorCode = keyof typeof errorCodes;

export class ChunkdError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ChunkdError';
    this.code = code;
  }

  get errno(): number {
    return errorCodes[this.code].errno;
  }

  get nbdError(): number {
    return errorCodes[this.code].nbd;
  }

  static invalid(message: string): ChunkdError {
    return new ChunkdError('EINVAL', message);
  }

  static notFound(message: string): ChunkdError {
    return new ChunkdError('ENOENT', message);
  }

  static exists(message: string): ChunkdError {
    return new ChunkdError('EEXIST', message);
  }

  static busy(message: string): ChunkdError {
    return new ChunkdError('EBUSY', message);
  }

  static readOnly(message: string): ChunkdError {
    return new ChunkdError('EPERM', message);
  }

  static noSpace(message: string): ChunkdError {
    return new ChunkdError('ENOSPC', message);
  }

  static io(message: string, cause?: unknown): ChunkdError {
    return new ChunkdError('EIO', message, { cause });
  }

  static protocol(message: string): ChunkdError {
    return new ChunkdError('EPROTO', message);
  }

  static corrupt(message: string): ChunkdError {
    return new ChunkdError('ECORRUPT', message);
  }

  static badName(message: string): ChunkdError {
    return new ChunkdError('EBADNAME', message);
  }
}

/**
 * A read that found stored bytes not matching their checksum (EIO to clients). Its own class so that a layer that
 * holds another copy (a synchronous replica) can repair the block rather than fail the read; nothing else differs.
 */
export class DamagedDataError extends ChunkdError {
  constructor(message: string) {
    super('EIO', message);
  }
}

/** Whether `error` is an error from the system (an errno code: EIO, ENOSPC, ECONNRESET), not one of Node's own (ERR_*). */
export function isSystemError(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException | null)?.code;
  return error instanceof Error && typeof code === 'string' && /^E[A-Z]+$/.test(code);
}

/**
 * Whether `error` says the file system is full (ENOSPC, or EDQUOT, a quota: a ChunkdError made of either says
 * ENOSPC). Such a failed metadata write is retried, not a reason to refuse writes until a restart (commit-engine.ts).
 */
export function isNoSpace(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException | null)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

/** Turns an error from the file system into a ChunkdError; anything else is a bug and is rethrown. */
export function fromSystemError(error: unknown, what: string): ChunkdError {
  if (error instanceof ChunkdError) return error;
  if (!isSystemError(error)) throw error;
  const code = (error as NodeJS.ErrnoException).code!;
  if (code === 'ENOSPC' || code === 'EDQUOT') return new ChunkdError('ENOSPC', `${what}: no space left on the pool's file system`, { cause: error });
  return new ChunkdError('EIO', `${what}: ${code}`, { cause: error });
}
