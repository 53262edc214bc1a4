// Waiting for several I/O operations that share a caller's buffer or a commit's outcome.

/**
 * Waits for every operation, then fails with the first failure: none is still running (and so none still uses
 * the caller's buffer) when this returns or throws, unlike Promise.all.
 */
export async function settleAll(operations: ReadonlyArray<Promise<unknown>>): Promise<void> {
  const results = await Promise.allSettled(operations);
  const failed = results.find((result) => result.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
}
