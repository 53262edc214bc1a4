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

/** Writes `value` to `file` durably, making its directory (0700) first if needed. */
export async function writeStateFile(file: string, value: unknown): Promise<void> {
  const directory = path.dirname(file);
  if (!fs.existsSync(directory)) {
    fs.mkdirSync(directory, { mode: 0o700 });
    await realFiles.syncDirectory(path.dirname(directory));
  }
  await replaceFile(realFiles, file, Buffer.from(`${JSON.stringify(value)}\n`));
  await realFiles.syncDirectory(directory);
}

/** Removes `file` durably (nothing if absent). */
export async function removeStateFile(file: string): Promise<void> {
  if (!fs.existsSync(file)) return;
  fs.rmSync(file, { force: true });
  await realFiles.syncDirectory(path.dirname(file));
}
