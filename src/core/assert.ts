// Assertions state what the code behind a validator relies on. A failure is a bug: it throws AssertionError,
// which no layer catches (TigerBeetle's style; validation at the edge returns ChunkdError instead).
import { AssertionError } from 'node:assert';

export function assert(condition: unknown, message = 'assertion failed'): asserts condition {
  if (!condition) throw new AssertionError({ message });
}

export function unreachable(value: never): never {
  throw new AssertionError({ message: `unreachable: ${String(value)}` });
}
