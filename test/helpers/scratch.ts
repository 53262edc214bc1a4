import fs from 'node:fs';
import { makeTempDir } from '../../src/testing/node-process.ts';

/** Runs `run` in a fresh directory (chunkd-LABEL-*), removed afterwards whatever it did. */
export async function inScratch(label: string, run: (directory: string) => Promise<void>): Promise<void> {
  const directory = makeTempDir(label);
  try {
    await run(directory);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
}
