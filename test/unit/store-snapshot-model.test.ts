// Model test of snapshots and clones, with shrinking (fast-check's model-based commands, as store-model.test.ts):
// random sequences of writes, trims, zero writes, snapshots, clones, rollbacks, snapshot and volume removals and
// reopens (with fsck) across several volumes, checked against a naive model (a byte array per volume, snapshots
// as full copies) after every step and after a final reopen; then removing everything must give every chunk back.
// A failing sequence is shrunk to a shortest one that still fails, and fast-check prints its seed and path:
// SEED=<seed> replays the run (FC_PATH=<path> replays the shrunk case directly). SNAPSHOT_MODEL_RUNS sets how many
// sequences run (default 8).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import fc from 'fast-check';
import { Pool } from '../../src/store/pool.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { modelRunOptions, testSeed } from '../helpers/random.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const volumeBytes = 512 * 1024;

interface ModelVolume {
  data: Buffer;
  snapshots: Map<string, Buffer>;
}

interface Model {
  volumes: Map<string, ModelVolume>;
}

interface Real {
  directory: string;
  pool: Pool;
  /** Numbers new volume, clone and snapshot names, and marks each write. */
  step: number;
}

/** Checks the named volumes (all when none are named) and their snapshots against the model. */
async function check(real: Real, model: Model, label: string, only?: string[]): Promise<void> {
  const { pool } = real;
  assert.deepEqual(pool.listVolumes().map((v) => v.name), [...model.volumes.keys()].sort(), `${label}: volumes`);
  for (const [name, expected] of model.volumes) {
    if (only !== undefined && !only.includes(name)) continue;
    const volume = pool.openVolume(name);
    const actual = Buffer.alloc(volumeBytes);
    await volume.read(0, actual);
    await volume.close();
    assert.ok(actual.equals(expected.data), `${label}: volume ${name} differs at byte ${actual.findIndex((b, i) => b !== expected.data[i])}`);
    assert.deepEqual(pool.listSnapshots(name).map((s) => s.name).sort(), [...expected.snapshots.keys()].sort(), `${label}: snapshots of ${name}`);
    for (const [snapshotName, snapshotData] of expected.snapshots) {
      const device = pool.openSnapshot(name, snapshotName);
      const read = Buffer.alloc(volumeBytes);
      await device.read(0, read);
      await device.close();
      assert.ok(read.equals(snapshotData), `${label}: snapshot ${name}@${snapshotName} differs`);
    }
  }
}

/** The volume (and one of its snapshots) a command's numbers pick in the model as it is when the command runs. */
function pickVolume(model: Model, index: number): [string, ModelVolume] {
  const entries = [...model.volumes];
  return entries[index % entries.length]!;
}
function pickSnapshot(volume: ModelVolume, index: number): string | undefined {
  const names = [...volume.snapshots.keys()];
  return names.length === 0 ? undefined : names[index % names.length];
}

type Command = fc.AsyncCommand<Model, Real>;

/** A command on the volume picked by `index` (and its snapshot picked by `snapshotIndex`, when it needs one). */
function onVolume(label: string, index: number, needsSnapshot: number | null, run: (model: Model, real: Real, name: string, entry: ModelVolume, snapshot: string) => Promise<string[]>): Command {
  let shown = label;
  return {
    check: (model) => model.volumes.size > 0 && (needsSnapshot === null || pickVolume(model, index)[1].snapshots.size > 0),
    run: async (model, real) => {
      const [name, entry] = pickVolume(model, index);
      const snapshot = needsSnapshot === null ? '' : pickSnapshot(entry, needsSnapshot)!;
      shown = `${label} ${name}${snapshot === '' ? '' : `@${snapshot}`}`;
      const touched = await run(model, real, name, entry, snapshot);
      await check(real, model, `after ${shown}`, touched);
    },
    toString: () => shown,
  };
}

const createVolume: Command = {
  check: (model) => model.volumes.size < 6,
  run: async (model, real) => {
    const fresh = `v${real.step++}`;
    await real.pool.createVolume(fresh, volumeBytes);
    model.volumes.set(fresh, { data: Buffer.alloc(volumeBytes), snapshots: new Map() });
    await check(real, model, `after create ${fresh}`, [fresh]);
  },
  toString: () => 'create volume',
};

/** A range of a volume at byte, sector or chunk alignment, so partial chunks come up. */
const range = fc
  .record({ align: fc.constantFrom(1, 512, 4096), at: fc.nat({ max: volumeBytes - 1 }), length: fc.integer({ min: 1, max: 40_000 }) })
  .map(({ align, at, length }) => {
    const offset = Math.floor(at / align) * align;
    return { offset, length: Math.min(volumeBytes - offset, length) };
  });

type Change = 'write' | 'trim' | 'zero' | 'zero-no-hole';

function change(index: number, how: Change, offset: number, length: number, fill: number): Command {
  return onVolume(`${how} ${offset}+${length}`, index, null, async (_model, real, name, entry) => {
    const volume = real.pool.openVolume(name);
    try {
      if (how === 'write') {
        const data = Buffer.alloc(length, fill);
        // The step number marks the write where it fits (a write may be a single byte).
        data.writeUIntLE(real.step++ % 2 ** 24, 0, Math.min(3, length));
        await volume.write(offset, data);
        data.copy(entry.data, offset);
      } else {
        if (how === 'trim') await volume.trim(offset, length);
        else await volume.writeZeroes(offset, length, { noHole: how === 'zero-no-hole' });
        entry.data.fill(0, offset, offset + length);
      }
    } finally {
      await volume.close();
    }
    return [name];
  });
}

const snapshot = (index: number): Command =>
  onVolume('snapshot', index, null, async (_model, real, name, entry) => {
    const snapshotName = `s${real.step++}`;
    await real.pool.createSnapshot(name, snapshotName);
    entry.snapshots.set(snapshotName, Buffer.from(entry.data));
    return [name];
  });

const clone = (index: number, snapshotIndex: number): Command =>
  onVolume('clone', index, snapshotIndex, async (model, real, name, entry, snapshotName) => {
    const fresh = `c${real.step++}`;
    await real.pool.cloneSnapshot(name, snapshotName, fresh);
    model.volumes.set(fresh, { data: Buffer.from(entry.snapshots.get(snapshotName)!), snapshots: new Map() });
    return [name, fresh];
  });

const rollback = (index: number, snapshotIndex: number): Command =>
  onVolume('rollback', index, snapshotIndex, async (_model, real, name, entry, snapshotName) => {
    await real.pool.rollbackVolume(name, snapshotName);
    entry.data = Buffer.from(entry.snapshots.get(snapshotName)!);
    return [name];
  });

const removeSnapshot = (index: number, snapshotIndex: number): Command =>
  onVolume('remove snapshot', index, snapshotIndex, async (_model, real, name, entry, snapshotName) => {
    await real.pool.removeSnapshot(name, snapshotName);
    entry.snapshots.delete(snapshotName);
    return [name];
  });

/** A volume with snapshots is refused; one without goes, and its clones' data must not care. */
const removeVolume = (index: number): Command =>
  onVolume('remove volume', index, null, async (model, real, name, entry) => {
    if (entry.snapshots.size > 0) {
      await assert.rejects(real.pool.removeVolume(name), /has \d+ snapshot/);
      return [name];
    }
    await real.pool.removeVolume(name);
    model.volumes.delete(name);
    return [...model.volumes.keys()];
  });

const flush = (index: number): Command =>
  onVolume('flush', index, null, async (_model, real, name) => {
    const volume = real.pool.openVolume(name);
    await volume.flush();
    await volume.close();
    return [name];
  });

/** Close, fsck, reopen: everything as it was. */
async function reopen(model: Model, real: Real): Promise<void> {
  await real.pool.close();
  const report = await fsckPool(real.directory);
  assert.ok(report.clean, `fsck: ${report.errors.join('; ')}`);
  real.pool = await Pool.open({ directory: real.directory, ...testPoolOptions() });
  await check(real, model, 'after a reopen');
}
const reopenCommand: Command = { check: () => true, run: reopen, toString: () => 'reopen' };

const volumeIndex = fc.nat({ max: 7 });
const snapshotIndex = fc.nat({ max: 15 });
const commands = fc.commands(
  [
    fc.constant(createVolume),
    fc.tuple(volumeIndex, fc.constantFrom<Change>('write', 'write', 'trim', 'zero', 'zero-no-hole'), range, fc.integer({ min: 1, max: 255 }))
      .map(([v, how, r, fill]) => change(v, how, r.offset, r.length, fill)),
    volumeIndex.map(snapshot),
    fc.tuple(volumeIndex, snapshotIndex).map(([v, s]) => clone(v, s)),
    fc.tuple(volumeIndex, snapshotIndex).map(([v, s]) => rollback(v, s)),
    fc.tuple(volumeIndex, snapshotIndex).map(([v, s]) => removeSnapshot(v, s)),
    volumeIndex.map(removeVolume),
    volumeIndex.map(flush),
    fc.constant(reopenCommand),
  ],
  { maxCommands: 60, size: 'max' },
);

test('snapshots and clones match a full-copy model across random operations and reopens (shrunk on failure)', { timeout: 600_000 }, async () => {
  const seed = testSeed('snapshot model');
  await fc.assert(
    fc.asyncProperty(commands, async (sequence) => {
      const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-snapmodel-'));
      const real: Real = { directory, pool: await Pool.open({ directory, ...testPoolOptions() }), step: 1 };
      try {
        const model: Model = { volumes: new Map() };
        await createVolume.run(model, real);
        await fc.asyncModelRun(() => ({ model, real }), sequence);
        await reopen(model, real);
        // Removing everything gives every chunk back.
        for (const [name, entry] of model.volumes) for (const snapshotName of entry.snapshots.keys()) await real.pool.removeSnapshot(name, snapshotName);
        for (const name of model.volumes.keys()) await real.pool.removeVolume(name);
        assert.equal((await real.pool.status()).allocatedBytes, 0, 'every chunk is free once nothing holds it');
        await real.pool.close();
        const report = await fsckPool(directory);
        assert.ok(report.clean, `fsck at the end: ${report.errors.join('; ')}`);
      } finally {
        // A failing sequence too: shrinking runs many, each on its own pool.
        await real.pool.close().catch(() => {});
        fs.rmSync(directory, { recursive: true, force: true });
      }
    }),
    modelRunOptions(seed, 'SNAPSHOT_MODEL_RUNS', 8),
  );
});
