// Seeded model test of the store: random writes, trims, zero writes (with and without NO_HOLE) and flushes on
// several volumes, checked against byte arrays after every step and again after the pool is closed and reopened.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Pool } from '../../src/store/pool.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const volumeBytes = 2 * 1024 * 1024;

test('store matches a byte-array model across random operations and a reopen', async () => {
  const seed = testSeed('store model');
  const random = makeRandom(seed);
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-model-'));
  let pool = await Pool.open({ directory });
  const names = ['a', 'b', 'c'];
  const models = new Map<string, Buffer>();
  for (const name of names) {
    await pool.createVolume(name, volumeBytes);
    models.set(name, Buffer.alloc(volumeBytes));
  }
  let volumes = new Map(names.map((name) => [name, pool.openVolume(name)]));

  const check = async (label: string): Promise<void> => {
    for (const name of names) {
      const actual = Buffer.alloc(volumeBytes);
      await volumes.get(name)!.read(0, actual);
      if (!actual.equals(models.get(name)!)) {
        const first = actual.findIndex((byte, i) => byte !== models.get(name)![i]);
        assert.fail(`${label}: volume ${name} differs from the model at byte ${first} (seed ${seed})`);
      }
    }
  };

  for (let step = 0; step < 400; step++) {
    const name = names[randomInt(random, names.length)]!;
    const volume = volumes.get(name)!;
    const model = models.get(name)!;
    // Offsets at byte, sector and chunk granularity, so partial chunks are exercised.
    const align = [1, 512, 4096][randomInt(random, 3)]!;
    const offset = Math.floor(randomInt(random, volumeBytes) / align) * align;
    const length = Math.min(volumeBytes - offset, 1 + randomInt(random, 200_000));
    const op = randomInt(random, 10);
    if (op < 5) {
      const data = Buffer.alloc(length, 1 + randomInt(random, 255));
      data.writeUInt32LE(step, 0);
      await volume.write(offset, data, { fua: random() < 0.1 });
      data.copy(model, offset);
    } else if (op < 7) {
      await volume.trim(offset, length);
      model.fill(0, offset, offset + length);
    } else if (op < 9) {
      await volume.writeZeroes(offset, length, { noHole: random() < 0.5 });
      model.fill(0, offset, offset + length);
    } else {
      await volume.flush();
    }
    if (step % 40 === 0) await check(`step ${step}`);
    if (step === 200) {
      // Reopen mid-way: the metadata replays from checkpoint and journal.
      for (const v of volumes.values()) await v.close();
      await pool.close();
      pool = await Pool.open({ directory });
      volumes = new Map(names.map((n) => [n, pool.openVolume(n)]));
      await check('after reopen');
    }
  }
  await check('end');
  const allocated = names.reduce((sum, name) => sum + pool.volumeInfo(name).allocatedBytes, 0);
  for (const v of volumes.values()) await v.close();
  await pool.close();
  pool = await Pool.open({ directory });
  volumes = new Map(names.map((n) => [n, pool.openVolume(n)]));
  await check('after final reopen');
  assert.equal(names.reduce((sum, name) => sum + pool.volumeInfo(name).allocatedBytes, 0), allocated);
  for (const v of volumes.values()) await v.close();
  await pool.close();
  fs.rmSync(directory, { recursive: true, force: true });
});
