// Seeded model test of snapshots and clones: random writes, trims, zero writes, snapshots, clones, rollbacks,
// snapshot and volume removals across several volumes, checked against a naive model (a byte array per volume,
// snapshots as full copies) after every step and after reopening the pool. SEED= replays a run.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { Pool } from '../../src/store/pool.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const volumeBytes = 512 * 1024;

interface ModelVolume {
  data: Buffer;
  snapshots: Map<string, Buffer>;
}

test('snapshots and clones match a full-copy model across random operations and reopens', async () => {
  const seed = testSeed('snapshot model');
  const random = makeRandom(seed);
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-snapmodel-'));
  let pool = await Pool.open({ directory });
  const model = new Map<string, ModelVolume>();
  let nameCounter = 0;

  /** Checks the named volumes (all when none are named) and their snapshots against the model. */
  const check = async (label: string, only?: string[]): Promise<void> => {
    assert.deepEqual(pool.listVolumes().map((v) => v.name), [...model.keys()].sort(), `${label}: volumes (seed ${seed})`);
    for (const [name, expected] of model) {
      if (only !== undefined && !only.includes(name)) continue;
      const volume = pool.openVolume(name);
      const actual = Buffer.alloc(volumeBytes);
      await volume.read(0, actual);
      await volume.close();
      assert.ok(actual.equals(expected.data), `${label}: volume ${name} differs at byte ${actual.findIndex((b, i) => b !== expected.data[i])} (seed ${seed})`);
      assert.deepEqual(pool.listSnapshots(name).map((s) => s.name).sort(), [...expected.snapshots.keys()].sort());
      for (const [snapshotName, snapshotData] of expected.snapshots) {
        const device = pool.openSnapshot(name, snapshotName);
        const read = Buffer.alloc(volumeBytes);
        await device.read(0, read);
        await device.close();
        assert.ok(read.equals(snapshotData), `${label}: snapshot ${name}@${snapshotName} differs (seed ${seed})`);
      }
    }
  };

  const pick = <T>(items: T[]): T | undefined => items[randomInt(random, items.length)];

  for (let step = 0; step < 400; step++) {
    const names = [...model.keys()];
    const name = pick(names);
    const op = randomInt(random, 100);
    if (name === undefined || op < 4) {
      const fresh = `v${nameCounter++}`;
      await pool.createVolume(fresh, volumeBytes);
      model.set(fresh, { data: Buffer.alloc(volumeBytes), snapshots: new Map() });
      continue;
    }
    const entry = model.get(name)!;
    const snapshotNames = [...entry.snapshots.keys()];
    if (op < 50) {
      const align = [1, 512, 4096][randomInt(random, 3)]!;
      const offset = Math.floor(randomInt(random, volumeBytes) / align) * align;
      const length = Math.min(volumeBytes - offset, 1 + randomInt(random, 40_000));
      const volume = pool.openVolume(name);
      const kind = randomInt(random, 4);
      if (kind < 2) {
        const data = Buffer.alloc(length, 1 + randomInt(random, 255));
        // The step number marks the write where it fits (a write may be a single byte).
        if (length >= 2) data.writeUInt16LE(step, 0);
        await volume.write(offset, data);
        data.copy(entry.data, offset);
      } else if (kind === 2) {
        await volume.trim(offset, length);
        entry.data.fill(0, offset, offset + length);
      } else {
        await volume.writeZeroes(offset, length, { noHole: random() < 0.5 });
        entry.data.fill(0, offset, offset + length);
      }
      await volume.close();
    } else if (op < 65) {
      const snapshotName = `s${step}`;
      await pool.createSnapshot(name, snapshotName);
      entry.snapshots.set(snapshotName, Buffer.from(entry.data));
    } else if (op < 73) {
      const snapshotName = pick(snapshotNames);
      if (snapshotName === undefined) continue;
      const fresh = `c${nameCounter++}`;
      await pool.cloneSnapshot(name, snapshotName, fresh);
      model.set(fresh, { data: Buffer.from(entry.snapshots.get(snapshotName)!), snapshots: new Map() });
    } else if (op < 80) {
      const snapshotName = pick(snapshotNames);
      if (snapshotName === undefined) continue;
      await pool.rollbackVolume(name, snapshotName);
      entry.data = Buffer.from(entry.snapshots.get(snapshotName)!);
    } else if (op < 90) {
      const snapshotName = pick(snapshotNames);
      if (snapshotName === undefined) continue;
      await pool.removeSnapshot(name, snapshotName);
      entry.snapshots.delete(snapshotName);
    } else if (op < 94) {
      if (entry.snapshots.size > 0) {
        await assert.rejects(pool.removeVolume(name), /has \d+ snapshot/);
        continue;
      }
      await pool.removeVolume(name);
      model.delete(name);
    } else if (op < 97) {
      const volume = pool.openVolume(name);
      await volume.flush();
      await volume.close();
    } else {
      await pool.close();
      const report = await fsckPool(directory);
      assert.ok(report.clean, `fsck after step ${step}: ${report.errors.join('; ')} (seed ${seed})`);
      pool = await Pool.open({ directory });
    }
    // Every step checks the volume it touched; every 20th step checks everything.
    await check(`step ${step}`, step % 20 === 0 ? undefined : [...model.keys()].filter((n) => n === name || !names.includes(n)));
  }
  await pool.close();
  pool = await Pool.open({ directory });
  await check('after the final reopen');
  // Removing everything gives every chunk back.
  for (const [name, entry] of model) for (const snapshotName of entry.snapshots.keys()) await pool.removeSnapshot(name, snapshotName);
  for (const name of model.keys()) await pool.removeVolume(name);
  assert.equal((await pool.status()).allocatedBytes, 0, `every chunk is free once nothing holds it (seed ${seed})`);
  await pool.close();
  assert.ok((await fsckPool(directory)).clean);
  fs.rmSync(directory, { recursive: true, force: true });
});
