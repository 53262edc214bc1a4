// The upgrade of a pool of format 3 (metadata in memory) to format 4 (paged metadata), pool-upgrade.ts: a pool
// with volumes, snapshots, a clone, a rollback, trims, a resize and removed volumes and snapshots reads back the
// same, byte for byte and listing for listing, with its chunk files untouched, fsck clean, and no more metadata
// pages than the same history run on paged metadata from the start; a second upgrade, an upgrade of a pool a node
// holds, and a node asked for paged metadata on a pool of format 3 are refused with a clear line; a power cut at
// any point of the upgrade leaves a pool that opens, of format 3 or 4, with the same contents.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'vitest';
import { main } from '../../src/cli/main.ts';
import { ChunkdError } from '../../src/core/errors.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { firstDataPage } from '../../src/store/page-file.ts';
import { PagedCatalog } from '../../src/store/paged-catalog.ts';
import { Pool, type PoolOptions } from '../../src/store/pool.ts';
import { chunksDirectory, markerPath } from '../../src/store/pool-layout.ts';
import { upgradePool } from '../../src/store/pool-upgrade.ts';
import { PowerLossFiles } from '../../src/testing/power-loss.ts';
import { makeRandom, randomInt } from '../helpers/random.ts';
import { inScratch } from '../helpers/scratch.ts';

const MiB = 1024 * 1024;
const fixture = path.resolve(import.meta.dirname, '..', 'fixtures', 'pool-v3-before-snapshot-ids.tar.gz');

/**
 * The same history whatever the metadata (sizes in `unit`s, writes in proportion): random 4 KiB writes, a run of
 * a unit, trims, snapshots, a rollback to an older snapshot with writes after it, a clone with its own snapshot, a resize, a removed volume and snapshot.
 */
async function makeHistory(pool: Pool, unit = MiB): Promise<void> {
  const random = makeRandom(1515);
  const writeRandom = async (name: string, count: number): Promise<void> => {
    const volume = pool.openVolume(name);
    const blocks = pool.volumeInfo(name).sizeBytes / 4096;
    for (let i = 0; i < count * (unit / MiB); i++) {
      const block = Buffer.alloc(4096, randomInt(random, 256));
      block.writeUInt32LE(i, 0);
      await volume.write(randomInt(random, blocks) * 4096, block);
    }
    await volume.close();
  };
  await pool.createVolume('a', 16 * unit);
  await writeRandom('a', 600);
  let a = pool.openVolume('a');
  await a.write(2 * unit, Buffer.alloc(unit, 7));
  await a.close();
  await pool.createSnapshot('a', 's1');
  await writeRandom('a', 200);
  a = pool.openVolume('a');
  await a.trim(8 * unit, 2 * unit);
  await a.close();
  await pool.createSnapshot('a', 's2');
  await writeRandom('a', 150);
  await pool.createSnapshot('a', 'gone');
  await pool.rollbackVolume('a', 's1');
  await pool.removeSnapshot('a', 'gone');
  await writeRandom('a', 100);
  await pool.createSnapshot('a', 's3');
  await writeRandom('a', 40);
  await pool.cloneSnapshot('a', 's2', 'c');
  await writeRandom('c', 100);
  await pool.createSnapshot('c', 't1');
  await writeRandom('c', 20);
  await pool.resizeVolume('c', 24 * unit);
  const c = pool.openVolume('c');
  await c.write(20 * unit, Buffer.alloc(unit / 16, 9));
  await c.close();
  await pool.createVolume('b', 8 * unit);
  const b = pool.openVolume('b');
  for (let i = 0; i < 8; i++) await b.write(i * unit, Buffer.alloc(unit, i + 1));
  await b.close();
  await pool.createSnapshot('b', 'old');
  await pool.createSnapshot('b', 'new');
  await pool.removeSnapshot('b', 'new');
  await pool.createVolume('x', 4 * unit);
  await writeRandom('x', 10);
  await pool.removeVolume('x');
}

/** Every export's content hash, by export name. */
async function contents(pool: Pool): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const hash = async (name: string, device: { read(offset: number, target: Buffer): Promise<void>; close(): Promise<void> }, sizeBytes: number): Promise<void> => {
    const digest = createHash('sha256');
    const buffer = Buffer.alloc(MiB);
    for (let offset = 0; offset < sizeBytes; offset += MiB) {
      const piece = buffer.subarray(0, Math.min(MiB, sizeBytes - offset));
      await device.read(offset, piece);
      digest.update(piece);
    }
    await device.close();
    out[name] = digest.digest('hex');
  };
  for (const volume of pool.listVolumes()) {
    await hash(volume.name, pool.openVolume(volume.name), volume.sizeBytes);
    for (const snapshot of pool.listSnapshots(volume.name)) await hash(`${volume.name}@${snapshot.name}`, pool.openSnapshot(volume.name, snapshot.name), snapshot.sizeBytes);
  }
  return out;
}

/** `volume list` and `snapshot list` as the pool gives them, with what each snapshot holds alone. */
async function listings(pool: Pool): Promise<unknown> {
  return Promise.all(pool.listVolumes().map(async (volume) => ({ ...volume, snapshots: await pool.countedSnapshots(volume.name) })));
}

/** Metadata pages in use (not free) in a paged pool's page file. */
async function pagesInUse(directory: string): Promise<number> {
  const catalog = await PagedCatalog.open((await import('../../src/store/file-layer.ts')).realFiles, directory, { cacheBytes: 4 * MiB });
  try {
    const state = catalog.space.pages.state();
    return state.nextPage - firstDataPage - state.free.length;
  } finally {
    await catalog.close();
  }
}

function chunkFiles(directory: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of fs.readdirSync(chunksDirectory(directory)).sort()) out[name] = createHash('sha256').update(fs.readFileSync(path.join(chunksDirectory(directory), name))).digest('hex');
  return out;
}

async function withPool<T>(options: PoolOptions, run: (pool: Pool) => Promise<T>): Promise<T> {
  const pool = await Pool.open(options);
  try {
    return await run(pool);
  } finally {
    await pool.close();
  }
}

test('an upgraded pool reads back the same, lists the same, keeps its chunk files, shares as paged metadata does, and fsck is clean', async () => {
  await inScratch('upgrade', async (scratch) => {
    const old = path.join(scratch, 'old');
    const native = path.join(scratch, 'native');
    const before = await withPool({ directory: old }, async (pool) => {
      await makeHistory(pool);
      return { contents: await contents(pool), listings: await listings(pool) };
    });
    await withPool({ directory: native, metadata: 'paged' }, (pool) => makeHistory(pool));
    const createdAt = (JSON.parse(fs.readFileSync(markerPath(old), 'utf8')) as { createdAt: string }).createdAt;
    const chunksBefore = chunkFiles(old);

    const report = await upgradePool(old);
    assert.deepEqual([report.fromFormat, report.toFormat, report.volumeCount, report.snapshotCount], [3, 4, 3, 5]);
    assert.deepEqual(chunkFiles(old), chunksBefore, 'the chunk files are not touched');
    const marker = JSON.parse(fs.readFileSync(markerPath(old), 'utf8')) as { formatVersion: number; metadata: string; createdAt: string };
    assert.deepEqual([marker.formatVersion, marker.metadata, marker.createdAt], [4, 'paged', createdAt]);
    assert.deepEqual(fs.readdirSync(old).filter((name) => /^(checkpoint|journal-|upgrade)/.test(name)), [], 'no checkpoint, journal or building directory left');
    const fsck = await fsckPool(old);
    assert.ok(fsck.clean, fsck.errors.join('; '));
    assert.deepEqual([fsck.volumeCount, fsck.snapshotCount], [3, 5]);

    // Sharing: no more pages than the same history on paged metadata from the start (each map shares with its
    // parent all but the leaves where they differ), within 5 % (the two fill their leaves by different histories:
    // 52 against 54 here; built without sharing, 62).
    const pages = { upgraded: await pagesInUse(old), native: await pagesInUse(native) };
    assert.ok(pages.upgraded <= pages.native * 1.05, `upgraded ${pages.upgraded} pages, paged from the start ${pages.native}`);

    const lines: string[] = [];
    await withPool({ directory: old, log: (line) => lines.push(line) }, async (pool) => {
      assert.equal((await pool.status()).formatVersion, 4);
      assert.deepEqual(lines.filter((line) => line.includes('replayed')), [], 'nothing to replay: the root covers the old journal');
      assert.deepEqual(await listings(pool), before.listings);
      assert.deepEqual(await contents(pool), before.contents);
      // It goes on as a paged pool: new ids past the old ones (x and a@gone were removed), writes, snapshots.
      await pool.createVolume('y', 4 * MiB);
      const snapshot = await pool.createSnapshot('a', 's4');
      const volume = pool.openVolume('a');
      await volume.write(0, Buffer.alloc(4096, 0xee));
      await volume.close();
      assert.notDeepEqual(await contents(pool), before.contents);
      assert.equal(snapshot.name, 's4');
    });
    const upgraded = await PagedCatalog.open((await import('../../src/store/file-layer.ts')).realFiles, old, { cacheBytes: 4 * MiB });
    try {
      assert.equal(upgraded.tables.byName.get('y')!.id, 5, 'volume ids 1 to 4 were taken (x, the last, removed)');
      assert.equal([...upgraded.tables.snapshots.values()].find((s) => s.name === 's4')!.id, 8, 'snapshot ids 1 to 7 were taken (b@new, the last, removed)');
    } finally {
      await upgraded.close();
    }
    const after = await fsckPool(old);
    assert.ok(after.clean, after.errors.join('; '));
  });
});

test('a pool made before snapshot ids keeps its derived ids through the upgrade', async () => {
  await inScratch('upgrade', async (scratch) => {
    const directory = path.join(scratch, 'pool');
    fs.mkdirSync(directory);
    execFileSync('tar', ['-xzf', fixture, '-C', directory]);
    const before = await withPool({ directory }, async (pool) => ({ contents: await contents(pool), listings: await listings(pool) }));
    await upgradePool(directory);
    const after = await withPool({ directory }, async (pool) => ({ contents: await contents(pool), listings: await listings(pool) }));
    assert.deepEqual(after, before);
  });
});

test('refused clearly: a second upgrade, an upgrade of a pool a node holds, paged metadata asked of a pool of format 3', async () => {
  await inScratch('upgrade', async (scratch) => {
    const directory = path.join(scratch, 'pool');
    const pool = await Pool.open({ directory });
    await pool.createVolume('v', 4 * MiB);
    await assert.rejects(upgradePool(directory), (error: ChunkdError) => error.code === 'EBUSY' && /in use by another chunkd process \(pid \d+\).*the upgrade is offline; stop the node first/.test(error.message));
    await pool.close();
    await assert.rejects(
      Pool.open({ directory, metadata: 'paged' }),
      (error: ChunkdError) => error.code === 'EINVAL' && error.message.includes(`has its metadata in memory (format 3), not paged: upgrade it first, with no node on it, by chunkd pool upgrade --pool ${directory} --metadata paged`),
    );
    // The command line: a usage error without --metadata paged, then the upgrade, then a second one refused.
    assert.equal(await main(['pool', 'upgrade', '--pool', directory]), 2);
    assert.equal(await main(['pool', 'upgrade', '--pool', directory, '--metadata', 'memory']), 2);
    assert.equal(await main(['pool', 'upgrade', '--pool', directory, '--metadata', 'paged', '--json']), 0);
    await assert.rejects(upgradePool(directory), (error: ChunkdError) => error.code === 'EINVAL' && /has paged metadata \(format 4\) already: nothing to upgrade/.test(error.message));
    assert.equal(await main(['pool', 'upgrade', '--pool', directory, '--metadata', 'paged']), 1);
    await withPool({ directory, metadata: 'paged' }, async (opened) => {
      assert.deepEqual(opened.listVolumes().map((v) => v.name), ['v']);
      const volume = opened.openVolume('v');
      await volume.write(0, Buffer.alloc(4096, 1));
      await volume.close();
    });
    // Page files lost (as a switch not preceded by their renames' sync could leave): refused, not an empty pool.
    for (const copy of [0, 1]) fs.rmSync(path.join(directory, `metadata.${copy}`));
    await assert.rejects(Pool.open({ directory }), (error: ChunkdError) => error.code === 'ECORRUPT' && /metadata\.0 and metadata\.1 are both missing, but chunks\/ holds data/.test(error.message));
  });
});

test('a pool of format 3 whose two checkpoints are lost while chunks/ holds data is refused, not opened empty (the check the paged open shares)', async () => {
  await inScratch('upgrade', async (scratch) => {
    const directory = path.join(scratch, 'pool');
    const pool = await Pool.open({ directory });
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    await volume.write(0, Buffer.alloc(4096, 1));
    await volume.close();
    await pool.close();
    for (const copy of [0, 1]) fs.rmSync(path.join(directory, `checkpoint.${copy}`));
    await assert.rejects(Pool.open({ directory }), (error: ChunkdError) => error.code === 'ECORRUPT' && /checkpoint\.0 and checkpoint\.1 are both missing, but chunks\/ holds data/.test(error.message));
  });
});

test('a power cut at any point of the upgrade leaves a pool that opens, of format 3 or 4, with the same contents', async () => {
  await inScratch('upgrade', async (scratch) => {
    const template = path.join(scratch, 'template');
    const expected = await withPool({ directory: template }, async (pool) => {
      await makeHistory(pool, MiB / 8);
      return { contents: await contents(pool), listings: await listings(pool) };
    });
    // How many changes a whole upgrade makes.
    const counted = path.join(scratch, 'counted');
    fs.cpSync(template, counted, { recursive: true });
    const counting = new PowerLossFiles(counted);
    await upgradePool(counted, { files: counting });
    const changes = counting.inner.changeCount;
    const random = makeRandom(6);
    const formats = new Set<number>();
    // Two points of the building, then from the end: the page files renamed in (12, 11), the directory synced (10),
    // the new marker written (9 to 7), renamed over the old one (6: the switch), the directory synced (5), the
    // journals and the checkpoint removed (4 to 1), the last sync (0). Where renames are not yet synced (before 10
    // and 5), two cuts: each keeps or drops each of them at random.
    const cuts = [1, Math.floor(changes / 2), ...[10, 10, 7, 5, 5, 3, 0].map((back) => changes - back)];
    for (const crashAt of cuts) {
      const directory = path.join(scratch, `cut-${crashAt}`);
      fs.cpSync(template, directory, { recursive: true });
      const files = new PowerLossFiles(directory, { crashAtChange: crashAt });
      // A synchronous call refused by the cut (an open, a write) fails the upgrade: that too is the crash.
      const upgrading = upgradePool(directory, { files }).then(
        () => 'done' as const,
        (error: unknown) => {
          if (!files.inner.frozen) throw error;
          return 'crashed' as const;
        },
      );
      const outcome = await Promise.race([upgrading, files.inner.untilFrozen().then(() => 'crashed' as const)]);
      files.inner.freeze();
      await files.cut(random);
      const where = `power cut at change ${crashAt} of ${changes} (${outcome})`;
      // fsck first: clean whichever format, what the upgrade left a warning.
      const fsck = await fsckPool(directory);
      assert.ok(fsck.clean, `${where}: ${fsck.errors.join('; ')}`);
      const left = fs.readdirSync(directory).filter((name) => /^upgrade\.tmp$|^metadata\.|^checkpoint\./.test(name)).length > 0 && fsck.warnings.some((line) => line.includes('pool upgrade'));
      const lines: string[] = [];
      const seen = await withPool({ directory, log: (line) => lines.push(line) }, async (pool) => {
        formats.add((await pool.status()).formatVersion);
        return { contents: await contents(pool), listings: await listings(pool), format: (await pool.status()).formatVersion };
      }).catch((error: Error) => assert.fail(`${where}: the pool does not open: ${error.message}`));
      assert.deepEqual({ contents: seen.contents, listings: seen.listings }, expected, where);
      const leftover = fs.readdirSync(directory).filter((name) => (seen.format === 4 ? /^checkpoint|^upgrade/ : /^metadata\.|^upgrade/).test(name));
      assert.deepEqual(leftover, [], `${where}: the open removes what the upgrade left (${lines.join('; ')})`);
      if (lines.some((line) => line.includes('left by a pool upgrade cut short'))) assert.ok(left, `${where}: fsck warned of what the open removed (${fsck.warnings.join('; ')})`);
      fs.rmSync(directory, { recursive: true, force: true });
    }
    assert.deepEqual([...formats].sort(), [3, 4], 'cuts before and after the switch');
  });
});
