// Small JSON state files of replication (<pool>/receive/VOL.json, <pool>/replication/*.json), each written whole
// and durably: a temporary file, fdatasync, rename, and a sync of the directory (file-layer.ts's replaceFile), so
// that after a crash a state file is the old one or the new one, never a mix. They sit beside the pool's
// metadata, not in it (the pool's own format is unchanged), and each says in its reader what a stale one means.
import fs from 'node:fs';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { readWholeFile, realFiles, replaceFile } from '../store/file-layer.ts';

/** The parsed JSON of `file`, or null when there is none; a file that is not JSON is ECORRUPT naming it. */
export async function readStateFile(file: string): Promise<unknown> {
  const bytes = await readWholeFile(realFiles, file);
  if (bytes === null) return null;
  try {
    return JSON.parse(bytes.toString('utf8')) as unknown;
  } catch {
    throw ChunkdError.corrupt(`${file} is not JSON`);
  }
}

/** The write of each state file in progress: writes of one file go one at a time, in the order asked. */
const writing = new Map<string, Promise<void>>();

/**
 * Writes `value` (as it is now) to `file` durably, making its directory (0700) first if needed. Two writes of one
 * file at once would share its temporary file (replaceFile's FILE.tmp) and could rename a mix of both into place,
 * or fail the second rename: so writes of one file are queued, and the last one asked is the one that stays.
 */
export function writeStateFile(file: string, value: unknown): Promise<void> {
  const bytes = Buffer.from(`${JSON.stringify(value)}\n`);
  const next = (writing.get(file) ?? Promise.resolve()).catch(() => {}).then(() => writeNow(file, bytes));
  writing.set(file, next);
  const forget = (): void => {
    if (writing.get(file) === next) writing.delete(file);
  };
  next.then(forget, forget);
  return next;
}

async function writeNow(file: string, bytes: Buffer): Promise<void> {
  const directory = path.dirname(file);
  if (!fs.existsSync(directory)) {
    fs.mkdirSync(directory, { mode: 0o700 });
    await realFiles.syncDirectory(path.dirname(directory));
  }
  await replaceFile(realFiles, file, bytes);
  await realFiles.syncDirectory(directory);
}

/** Removes `file` durably (nothing if absent). */
export async function removeStateFile(file: string): Promise<void> {
  if (!fs.existsSync(file)) return;
  fs.rmSync(file, { force: true });
  await realFiles.syncDirectory(path.dirname(file));
}
