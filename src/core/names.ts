// Names of volumes and snapshots (and of nodes and clients in TLS certificates): 1-64 characters of A-Za-z0-9_.-, not starting with "." or "-".
// Every name is checked here before it reaches a path, an export or the catalog.
import { ChunkdError } from './errors.ts';

/** What a name names: the same rule serves volumes, snapshots, and the node and client names of TLS certificates. */
export type NameKind = 'volume' | 'snapshot' | 'node' | 'client';

const namePattern = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;

/** Returns an error describing why `name` is not a valid volume or snapshot name, or null if it is. */
export function checkName(name: unknown, kind: NameKind = 'volume'): ChunkdError | null {
  if (typeof name !== 'string' || !namePattern.test(name)) {
    const shown = typeof name === 'string' ? JSON.stringify(name.length > 80 ? `${name.slice(0, 80)}...` : name) : String(name);
    return ChunkdError.badName(`invalid ${kind} name ${shown}: use 1-64 characters of A-Za-z0-9_.- not starting with "." or "-"`);
  }
  return null;
}

export function validateName(name: unknown, kind: NameKind = 'volume'): string {
  const error = checkName(name, kind);
  if (error) throw error;
  return name as string;
}
