// Media damage to the metadata: a small pool is left as a kill -9 leaves it (a checkpoint with volumes,
// snapshots and a clone, a journal of several commits after it), then one byte of a metadata file is flipped,
// offset after offset, and each case is checked: fsck's verdict, then a start. Every case must be one of
//  - repaired: the pool opens and every volume and snapshot reads exactly as before (fsck called it damage),
//  - harmless: the same, and fsck called it clean (a byte in the journal's unused space),
//  - refused: the start fails with ECORRUPT and leaves every file as it was, and fsck called it damage;
// never a start that serves different data, and never fsck calling clean a pool that will not start.
// One byte in one copy is always repaired. The same byte in both copies is refused (or repaired, where the two
// copies still hold every frame between them).
// Every byte of journal-<gen>.0's commits and of checkpoint.0 is tried, and every CORRUPTION_STRIDE-th byte of
// the other copies and of both copies at once (default 8; 1 tries them all, and 512 bytes past the journal's
// last commit instead of 64: npm run soak does).
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { recoverJournal } from '../../src/store/journal-format.ts';
import { Pool } from '../../src/store/pool.ts';
import { repairPool } from '../../src/store/repair.ts';
import { closeDescriptorsUnder } from '../../src/testing/power-loss.ts';
import { contents, fingerprint, metadataName, type CasesJob, type CasesResult, type CorruptionCase } from '../helpers/corruption-cases.ts';
import { TestFiles } from '../../src/testing/test-files.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const stride = Number(process.env.CORRUPTION_STRIDE ?? 8);
const pastEndBytes = stride === 1 ? 512 : 64;

/** A pool as a kill -9 leaves it: checkpoint with data, then a journal of several commits. */
async function buildPool(directory: string): Promise<void> {
  const fill = (bytes: number, seed: number): Buffer => {
    const out = Buffer.alloc(bytes);
    for (let i = 0; i < bytes; i += 32) crypto.createHash('sha256').update(`${seed}:${i}`).digest().copy(out, i);
    return out;
  };
  let pool = await Pool.open({ directory });
  await pool.createVolume('a', MiB);
  await pool.createVolume('b', MiB);
  const a = pool.openVolume('a');
  await a.write(0, fill(256 * KiB, 1));
  await pool.createSnapshot('a', 's1');
  await a.write(128 * KiB, fill(256 * KiB, 2));
  await a.close();
  const b = pool.openVolume('b');
  await b.write(0, fill(64 * KiB, 3));
  await b.close();
  await pool.cloneSnapshot('a', 's1', 'c');
  await pool.close();
  // The second life: its checkpoint holds the above; its journal gets the below, in several commits.
  const files = new TestFiles();
  pool = await Pool.open({ directory, files });
  const a2 = pool.openVolume('a');
  await a2.write(512 * KiB, fill(88 * KiB, 4));
  await a2.flush();
  const b2 = pool.openVolume('b');
  await b2.trim(0, 16 * KiB);
  await b2.flush();
  await pool.createSnapshot('c', 's2');
  const c2 = pool.openVolume('c');
  await c2.write(4 * KiB, fill(8 * KiB, 5));
  await c2.flush();
  await a2.writeZeroes(0, 4 * KiB, { noHole: true });
  await a2.write(900 * KiB, fill(4 * KiB, 6), { fua: true });
  // kill -9: nothing more is written, descriptors (and the lock) go.
  files.freeze();
  await pool.abandon();
  closeDescriptorsUnder(directory);
}

test(`metadata corruption: every byte of a journal and a checkpoint copy flipped in turn (others every ${stride}): repaired with nothing lost, or refused with the pool untouched`, { timeout: 1_800_000 }, async () => {
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const directory = fs.mkdtempSync(path.join(base, 'chunkd-corruption-'));
  try {
    await buildPool(directory);
    const originals = new Map(fs.readdirSync(directory).filter((name) => metadataName.test(name)).map((name) => [name, fs.readFileSync(path.join(directory, name))]));
    const journalName = [...originals.keys()].find((name) => name.startsWith('journal-') && name.endsWith('.0'))!;
    const generation = Number(/^journal-(\d+)/.exec(journalName)![1]);
    const journal1 = journalName.replace(/\.0$/, '.1');
    const journalBytes = recoverJournal([originals.get(journalName)!, originals.get(journal1)!], generation).endBytes;
    assert.ok(journalBytes > 0, 'the journal holds commits');
    // The journal's reserved space past its commits is zeros to the end: keep 1 KiB of it (each case rewrites and
    // hashes these files; 4 MiB of zeros would only make that slower).
    for (const name of [journalName, journal1]) originals.set(name, originals.get(name)!.subarray(0, journalBytes + KiB));

    // What the pool holds, read once through a start on an undamaged copy of its files.
    const reference = await Pool.open({ directory });
    const expected = await contents(reference);
    await reference.close();
    assert.deepEqual([...expected.keys()].sort(), ['a', 'a@s1', 'b', 'c', 'c@s2']);

    const checkpointBytes = originals.get('checkpoint.0')!.length;
    const cases: CorruptionCase[] = [];
    const every = (targets: string[], end: number, step: number): void => {
      for (let offset = 0; offset < end; offset += step) cases.push({ targets, offset });
    };
    every([journalName], journalBytes + pastEndBytes, 1);
    every(['checkpoint.0'], checkpointBytes, 1);
    every([journal1], journalBytes + pastEndBytes, stride);
    every(['checkpoint.1'], checkpointBytes, stride);
    every([journalName, journal1], journalBytes, stride);
    every(['checkpoint.0', 'checkpoint.1'], checkpointBytes, stride);
    // The cases on two worker threads (test/helpers/corruption-cases.ts), each with two copies of the pool's
    // directory: under npm test's coverage they were mostly CPU on this thread (94 s here; 60 to 40 s at
    // CORRUPTION_STRIDE=64 without coverage from running them several at a time).
    const workers = 2;
    const copiesEach = 2;
    for (let copy = 1; copy < workers * copiesEach; copy++) fs.cpSync(directory, `${directory}-${copy}`, { recursive: true });
    const results = await Promise.all(Array.from({ length: workers }, (_, w) => {
      const job: CasesJob = {
        directories: Array.from({ length: copiesEach }, (_, c) => (w * copiesEach + c === 0 ? directory : `${directory}-${w * copiesEach + c}`)),
        originals: [...originals],
        expected: [...expected],
        cases: cases.filter((_, index) => index % workers === w),
      };
      return new Promise<CasesResult>((resolve, reject) => {
        const worker = new Worker(new URL('../helpers/corruption-cases.ts', import.meta.url), { workerData: { corruptionCases: job } });
        worker.once('message', (result: CasesResult) => resolve(result));
        worker.once('error', reject);
        worker.once('exit', (code) => reject(new Error(`a cases worker exited (${code}) without its result`)));
      });
    }));
    for (const result of results) if (result.failure !== null) throw new Error(result.failure);
    const counts = { repaired: 0, harmless: 0, refused: 0 };
    const byTarget = new Map<string, { repaired: number; harmless: number; refused: number }>();
    for (const { targets, outcome } of results.flatMap((result) => result.outcomes)) {
      counts[outcome] += 1;
      const key = targets.length === 1 ? targets[0]!.replace(/^journal-\d+/, 'journal') : 'both copies';
      const entry = byTarget.get(key) ?? { repaired: 0, harmless: 0, refused: 0 };
      entry[outcome] += 1;
      byTarget.set(key, entry);
    }
    const total = counts.repaired + counts.harmless + counts.refused;
    console.log(`# metadata corruption: ${total} flipped bytes (journal ${journalBytes} bytes of commits, checkpoint ${checkpointBytes} bytes): ` +
      `${counts.repaired} repaired, ${counts.harmless} harmless, ${counts.refused} refused untouched, 0 silent losses`);
    for (const [key, entry] of byTarget) console.log(`#   ${key}: ${JSON.stringify(entry)}`);
    assert.equal(total, cases.length);
    assert.ok(counts.repaired > 0 && counts.refused > 0);
  } finally {
    for (const copy of [directory, `${directory}-1`, `${directory}-2`, `${directory}-3`]) fs.rmSync(copy, { recursive: true, force: true });
  }
});

test('fsck --repair: damage in both copies is salvaged, and every byte that differs afterwards is in what it reports lost', { timeout: 300_000 }, async () => {
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const directory = fs.mkdtempSync(path.join(base, 'chunkd-repair-'));
  try {
    await buildPool(directory);
    const originals = new Map(fs.readdirSync(directory).filter((name) => metadataName.test(name)).map((name) => [name, fs.readFileSync(path.join(directory, name))]));
    const chunkOriginals = new Map(fs.readdirSync(path.join(directory, 'chunks')).map((name) => [name, fs.readFileSync(path.join(directory, 'chunks', name))]));
    const restore = (): void => {
      for (const name of fs.readdirSync(directory)) {
        if (metadataName.test(name) || name.endsWith('.tmp') || name.startsWith('damaged-')) fs.rmSync(path.join(directory, name), { recursive: true });
      }
      for (const [name, bytes] of originals) fs.writeFileSync(path.join(directory, name), bytes);
      for (const [name, bytes] of chunkOriginals) fs.writeFileSync(path.join(directory, 'chunks', name), bytes);
    };
    const reference = await Pool.open({ directory });
    const expected = await contents(reference);
    await reference.close();
    restore();
    const journalName = [...originals.keys()].find((name) => name.startsWith('journal-') && name.endsWith('.0'))!;
    const journal = originals.get(journalName)!;
    // The commits' offsets: a header's frame length says where the next one starts.
    const commitStarts: number[] = [];
    for (let at = 0; at + 24 <= journal.length && journal.readUInt32LE(at) !== 0; at += Math.ceil((24 + journal.readUInt32LE(at + 16)) / 8) * 8) commitStarts.push(at);
    assert.ok(commitStarts.length >= 5, `the journal holds ${commitStarts.length} commits`);
    const cases = [
      ...commitStarts.map((start, i) => ({ label: `journal commit ${i + 1}`, files: [journalName, journalName.replace(/\.0$/, '.1')], offset: start + 30 })),
      { label: 'checkpoint page', files: ['checkpoint.0', 'checkpoint.1'], offset: 400 },
      { label: 'checkpoint header', files: ['checkpoint.0', 'checkpoint.1'], offset: 20 },
    ];
    for (const { label, files: targets, offset } of cases) {
      restore();
      for (const name of targets) {
        const bytes = Buffer.from(originals.get(name)!);
        bytes[offset]! ^= 0x5a;
        fs.writeFileSync(path.join(directory, name), bytes);
      }
      assert.equal((await fsckPool(directory)).clean, false, `${label}: fsck finds the damage`);
      await assert.rejects(Pool.open({ directory }), (error) => error instanceof ChunkdError && error.code === 'ECORRUPT', `${label}: a start refuses the damaged pool`);
      const repair = await repairPool(directory);
      assert.equal(repair.lossless, false, label);
      assert.ok(repair.setAside !== null && fs.readdirSync(repair.setAside).some((name) => targets.includes(name)), `${label}: the damaged files are set aside`);
      const after = await fsckPool(directory);
      assert.ok(after.clean, `${label}: fsck after the repair: ${after.errors.join('; ')}`);
      const pool = await Pool.open({ directory });
      const found = await contents(pool);
      await pool.close();
      // Every export that is gone is named among the lost changes; every byte that differs lies in a lost extent.
      for (const [name, bytes] of expected) {
        const now = found.get(name);
        if (now === undefined) {
          assert.ok(repair.lostChanges.some((line) => line.includes(name.replace(/^.*@/, '@')) || line.includes(name) || /not even their names|unknown/.test(line)), `${label}: ${name} is gone but not reported lost: ${JSON.stringify(repair)}`);
          continue;
        }
        const lost = repair.lostExtents.filter((extent) => extent.export === name);
        for (let block = 0; block < bytes.length; block += 4096) {
          if (now.subarray(block, block + 4096).equals(bytes.subarray(block, block + 4096))) continue;
          assert.ok(
            lost.some((extent) => extent.offsetBytes <= block && block < extent.offsetBytes + extent.lengthBytes),
            `${label}: ${name} differs at byte ${block} outside every reported lost extent: ${JSON.stringify(repair.lostExtents)}`,
          );
        }
      }
      console.log(`# repair of ${label}: ${repair.lostExtents.length} lost extent(s), ${repair.lostChanges.length} lost change(s)`);
    }
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
