// Damage on disk for the tests of reads that must catch it: blocks whose bytes name them, so that a test finds a
// block in a pool's chunk files without knowing the layout, and one byte flipped under one.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';

const blockBytes = 4096;

/** A 4 KiB block whose bytes say `label` and `index`, found nowhere else on disk. */
export function namedBlock(label: string, index: number): Buffer {
  return Buffer.from(`chunkd ${label} block ${String(index).padStart(4, '0')};`.padEnd(64, '.').repeat(blockBytes / 64));
}

/** Flips one byte inside the only copy of `block` in `pool`'s chunk files; returns the file and offset changed. */
export function flipByteUnder(pool: string, block: Buffer): { file: string; offset: number } {
  const chunks = path.join(pool, 'chunks');
  for (const name of fs.readdirSync(chunks)) {
    const file = path.join(chunks, name);
    const bytes = fs.readFileSync(file);
    const at = bytes.indexOf(block);
    if (at < 0) continue;
    assert.equal(bytes.indexOf(block, at + 1), -1, 'the block is on disk once');
    const fd = fs.openSync(file, 'r+');
    try {
      const one = Buffer.alloc(1);
      fs.readSync(fd, one, 0, 1, at + 100);
      one[0]! ^= 0x01;
      fs.writeSync(fd, one, 0, 1, at + 100);
    } finally {
      fs.closeSync(fd);
    }
    return { file, offset: at + 100 };
  }
  throw new Error(`the block is not in ${chunks}`);
}
