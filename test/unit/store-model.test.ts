// Model test of the store, with shrinking (fast-check's model-based commands): random sequences of writes, trims,
// zero writes (with and without NO_HOLE), flushes and reopens on several volumes, each checked against byte
// arrays, and the bytes allocated checked to survive a reopen. A failing sequence is shrunk to a shortest one
// that still fails (fewer commands, smaller lengths, simpler offsets), and fast-check prints its seed and path:
// SEED=<seed> replays the run (FC_PATH=<path> replays the shrunk case directly). STORE_MODEL_RUNS sets how many
// sequences run (default 25).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import fc from 'fast-check';
import type { Volume } from '../../src/store/volume.ts';
import { Pool } from '../../src/store/pool.ts';
import { modelRunOptions, testSeed } from '../helpers/random.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const volumeBytes = 2 * 1024 * 1024;
const names = ['a', 'b', 'c'] as const;
type Name = (typeof names)[number];

interface Model {
  bytes: Record<Name, Buffer>;
}

interface Real {
  directory: string;
  pool: Pool;
  volumes: Map<Name, Volume>;
  step: number;
}

/** Reads the whole volume and fails at the first byte that differs from the model. */
async function check(real: Real, model: Model, label: string, only: readonly Name[] = names): Promise<void> {
  for (const name of only) {
    const actual = Buffer.alloc(volumeBytes);
    await real.volumes.get(name)!.read(0, actual);
    if (!actual.equals(model.bytes[name])) {
      const first = actual.findIndex((byte, i) => byte !== model.bytes[name][i]);
      assert.fail(`${label}: volume ${name} differs from the model at byte ${first}`);
    }
  }
}

async function reopen(real: Real): Promise<void> {
  for (const volume of real.volumes.values()) await volume.close();
  await real.pool.close();
  real.pool = await Pool.open({ directory: real.directory, ...testPoolOptions() });
  real.volumes = new Map(names.map((name) => [name, real.pool.openVolume(name)]));
}

/** A range of a volume at byte, sector or chunk alignment, so partial chunks come up. */
const range = fc
  .record({ align: fc.constantFrom(1, 512, 4096), at: fc.nat({ max: volumeBytes - 1 }), length: fc.integer({ min: 1, max: 200_000 }) })
  .map(({ align, at, length }) => {
    const offset = Math.floor(at / align) * align;
    return { offset, length: Math.min(volumeBytes - offset, length) };
  });

/** One step of a sequence: what fast-check runs, shows and shrinks. */
function command(label: string, run: (model: Model, real: Real) => Promise<void>): fc.AsyncCommand<Model, Real> {
  return { check: () => true, run, toString: () => label };
}

function write(name: Name, offset: number, length: number, fill: number, fua: boolean): fc.AsyncCommand<Model, Real> {
  const label = `write ${name} ${offset}+${length}${fua ? ' fua' : ''}`;
  return command(label, async (model, real) => {
    const data = Buffer.alloc(length, fill);
    data.writeUIntLE(real.step++ % 2 ** 24, 0, Math.min(3, length));
    await real.volumes.get(name)!.write(offset, data, { fua });
    data.copy(model.bytes[name], offset);
    await check(real, model, `after ${label}`, [name]);
  });
}

function zero(name: Name, offset: number, length: number, how: 'trim' | 'zero' | 'zero-no-hole'): fc.AsyncCommand<Model, Real> {
  const label = `${how} ${name} ${offset}+${length}`;
  return command(label, async (model, real) => {
    const volume = real.volumes.get(name)!;
    if (how === 'trim') await volume.trim(offset, length);
    else await volume.writeZeroes(offset, length, { noHole: how === 'zero-no-hole' });
    model.bytes[name].fill(0, offset, offset + length);
    await check(real, model, `after ${label}`, [name]);
  });
}

const flush = (name: Name): fc.AsyncCommand<Model, Real> => command(`flush ${name}`, async (_model, real) => real.volumes.get(name)!.flush());

/** Close and reopen the pool: the metadata replays from checkpoint and journal; nothing moves, nothing is lost. */
const reopenAndCheck = async (model: Model, real: Real): Promise<void> => {
  const allocated = names.map((name) => real.pool.volumeInfo(name).allocatedBytes);
  await reopen(real);
  await check(real, model, 'after a reopen');
  assert.deepEqual(names.map((name) => real.pool.volumeInfo(name).allocatedBytes), allocated, 'bytes allocated survive a reopen');
};

const name = fc.constantFrom(...names);
const commands = fc.commands(
  [
    fc.tuple(name, range, fc.integer({ min: 1, max: 255 }), fc.boolean()).map(([n, r, fill, fua]) => write(n, r.offset, r.length, fill, fua)),
    fc.tuple(name, range, fc.constantFrom('trim', 'zero', 'zero-no-hole') as fc.Arbitrary<'trim' | 'zero' | 'zero-no-hole'>).map(([n, r, how]) => zero(n, r.offset, r.length, how)),
    name.map((n) => flush(n)),
    fc.constant(command('reopen', reopenAndCheck)),
  ],
  { maxCommands: 60, size: 'max' },
);

test('store matches a byte-array model across random operations and reopens (shrunk on failure)', { timeout: 600_000 }, async () => {
  const seed = testSeed('store model');
  await fc.assert(
    fc.asyncProperty(commands, async (sequence) => {
      const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-model-'));
      const pool = await Pool.open({ directory, ...testPoolOptions() });
      const real: Real = { directory, pool, volumes: new Map(), step: 1 };
      try {
        const model: Model = { bytes: { a: Buffer.alloc(volumeBytes), b: Buffer.alloc(volumeBytes), c: Buffer.alloc(volumeBytes) } };
        for (const volume of names) await pool.createVolume(volume, volumeBytes);
        real.volumes = new Map(names.map((volume) => [volume, pool.openVolume(volume)]));
        await fc.asyncModelRun(() => ({ model, real }), sequence);
        await reopenAndCheck(model, real);
      } finally {
        // A failing sequence too: shrinking runs many, each on its own pool.
        for (const volume of real.volumes.values()) await volume.close();
        await real.pool.close().catch(() => {});
        fs.rmSync(directory, { recursive: true, force: true });
      }
    }),
    modelRunOptions(seed, 'STORE_MODEL_RUNS', 25),
  );
});
