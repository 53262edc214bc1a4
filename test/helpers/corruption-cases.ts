// The metadata-corruption test's cases (test/unit/metadata-corruption.test.ts), run on a worker thread: each case
// restores a pool directory's metadata files, flips one byte in the named copies, asks fsck, then starts the pool
// and reads every volume and snapshot; the outcome is repaired, harmless or refused, never a silent loss.
// Under npm test's coverage the cases are mostly CPU on the test's own thread; on two worker threads (which the
// coverage does not instrument) they take both CPUs. Each worker runs its cases in its own copies of the pool's
// directory, several at once (a case also waits for its files: fallocate, fdatasync, unlink).
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { ChunkdError } from '../../src/core/errors.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { Pool } from '../../src/store/pool.ts';

export const metadataName = /^(checkpoint\.\d|journal-\d+\.\d)$/;

/** Every volume's and snapshot's bytes. `into`: buffers to read into, kept by name between calls. */
export async function contents(pool: Pool, into?: Map<string, Buffer>): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const volume of pool.listVolumes()) {
    for (const name of [volume.name, ...volume.snapshots.map((s) => `${volume.name}@${s}`)]) {
      const at = name.indexOf('@');
      const device = at < 0 ? pool.openVolume(name) : pool.openSnapshot(name.slice(0, at), name.slice(at + 1));
      let bytes = into?.get(name);
      if (bytes?.length !== device.sizeBytes) {
        bytes = Buffer.alloc(device.sizeBytes);
        into?.set(name, bytes);
      }
      bytes.fill(0xee);
      await device.read(0, bytes);
      await device.close();
      out.set(name, bytes);
    }
  }
  return out;
}

/** A hash of every file in the pool directory, by name. */
export function fingerprint(directory: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string, prefix: string): void => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      if (entry.isDirectory()) walk(path.join(dir, entry.name), `${prefix}${entry.name}/`);
      else if (entry.isFile() && entry.name !== 'lock') out.set(`${prefix}${entry.name}`, crypto.createHash('sha1').update(fs.readFileSync(path.join(dir, entry.name))).digest('hex'));
    }
  };
  walk(directory, '');
  return out;
}

export type Outcome = 'repaired' | 'harmless' | 'refused';
export interface CorruptionCase {
  targets: string[];
  offset: number;
}
export interface CasesJob {
  directories: string[];
  originals: Array<[string, Uint8Array]>;
  expected: Array<[string, Uint8Array]>;
  cases: CorruptionCase[];
}
export interface CasesResult {
  outcomes: Array<{ targets: string[]; outcome: Outcome }>;
  failure: string | null;
}

/** Runs `job.cases`, as many at once as it has directories, each in one of them. */
export async function runCases(job: CasesJob): Promise<CasesResult> {
  const originals = new Map(job.originals.map(([name, bytes]) => [name, Buffer.from(bytes)]));
  const expected = new Map(job.expected.map(([name, bytes]) => [name, Buffer.from(bytes)]));
  const restore = async (into: string): Promise<void> => {
    // (Unlinking a journal frees its 4 MiB reserve: on libuv's threads, not this one.)
    await Promise.all(fs.readdirSync(into).filter((name) => metadataName.test(name) || name.endsWith('.tmp')).map((name) => fs.promises.unlink(path.join(into, name))));
    for (const [name, bytes] of originals) fs.writeFileSync(path.join(into, name), bytes);
  };
  const tryCase = async (into: string, readBuffers: Map<string, Buffer>, { targets, offset }: CorruptionCase): Promise<Outcome> => {
    await restore(into);
    for (const name of targets) {
      const bytes = Buffer.from(originals.get(name)!);
      bytes[offset]! ^= 0x5a;
      fs.writeFileSync(path.join(into, name), bytes);
    }
    const label = `${targets.join(' and ')} byte ${offset}`;
    const report = await fsckPool(into);
    const before = fingerprint(into);
    let outcome: Outcome;
    try {
      const pool = await Pool.open({ directory: into });
      const found = await contents(pool, readBuffers);
      await pool.close();
      assert.deepEqual([...found.keys()].sort(), [...expected.keys()].sort(), `${label}: a start served other volumes (silent loss)`);
      for (const [name, bytes] of expected) assert.ok(found.get(name)!.equals(bytes), `${label}: ${name} reads differently after a start (silent loss)`);
      outcome = report.clean ? 'harmless' : 'repaired';
    } catch (error) {
      if (!(error instanceof ChunkdError) || error.code !== 'ECORRUPT') throw error;
      assert.equal(report.clean, false, `${label}: fsck called clean a pool that does not start (${error.message})`);
      assert.deepEqual(fingerprint(into), before, `${label}: a refused start changed the pool's files`);
      outcome = 'refused';
    }
    if (targets.length === 1) assert.notEqual(outcome, 'refused', `${label}: one damaged byte in one copy must be repaired from the other`);
    return outcome;
  };
  const outcomes: CasesResult['outcomes'] = [];
  let next = 0;
  let failure: string | null = null;
  await Promise.all(job.directories.map(async (into) => {
    const readBuffers = new Map<string, Buffer>();
    while (failure === null && next < job.cases.length) {
      const one = job.cases[next++]!;
      await tryCase(into, readBuffers, one).then(
        (outcome) => outcomes.push({ targets: one.targets, outcome }),
        (error: unknown) => { failure ??= error instanceof Error ? (error.stack ?? error.message) : String(error); },
      );
    }
  }));
  return { outcomes, failure };
}

if (parentPort !== null && (workerData as { corruptionCases?: CasesJob } | undefined)?.corruptionCases !== undefined) {
  const port = parentPort;
  port.postMessage(await runCases((workerData as { corruptionCases: CasesJob }).corruptionCases));
}
