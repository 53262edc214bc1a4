// Modules that only some runs need are imported when needed: each chunkd command is a process of its own, and
// `chunkd help` or `chunkd volume list` need neither the node nor the store, etcd's client, TLS or a progress bar,
// nor does a node outside a cluster need etcd's client. An installation that lacks one of those modules then
// fails where it is needed, with one line that names what is missing, instead of every command failing at start.
import { ChunkdError } from './errors.ts';

/** Imports what `what` needs; a module or package that is not installed is a ChunkdError (ENOENT) that says so. */
export async function needs<T>(what: string, load: () => Promise<T>): Promise<T> {
  try {
    return await load();
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ERR_MODULE_NOT_FOUND') throw error;
    throw new ChunkdError('ENOENT', `${what} cannot run, this installation of chunkd is incomplete: ${(error as Error).message} (reinstall it, or run npm ci in a checkout)`, { cause: error });
  }
}
