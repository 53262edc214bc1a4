// Snapshot ids (issue 14): every snapshot has a unique 128-bit id kept in the journal and the checkpoint; a pool
// made before ids existed (test/fixtures/pool-v3-before-snapshot-ids.tar.gz, made by chunkd at bddb278: old1 in its
// checkpoint, old2 only in its journal) opens, its snapshots get derived ids that stay the same across reopens, and
// its data reads back.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { ChunkRefcounts } from '../../src/store/chunk-refcounts.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { applyRecord, decodeRecord, emptyCatalog, encodeRecords, isSnapshotUuid, legacySnapshotUuid } from '../../src/store/metadata.ts';
import { Pool } from '../../src/store/pool.ts';

const fixture = path.resolve(import.meta.dirname, '..', 'fixtures', 'pool-v3-before-snapshot-ids.tar.gz');

test('a snapshot record without an id gets a derived one, the same at every replay; one with an id keeps it', () => {
  const legacy = encodeRecords([{ type: 'snapshot', volumeId: 1, snapshotId: 3, name: 's', createdAtMs: 42 }]);
  const decoded = decodeRecord(legacy.subarray(8))!;
  assert.equal(decoded.type, 'snapshot');
  const uuids = [0, 1].map(() => {
    const catalog = emptyCatalog();
    const refs = new ChunkRefcounts(() => {});
    applyRecord(catalog, { type: 'create', volumeId: 1, name: 'v', sizeBytes: 4096 }, refs);
    applyRecord(catalog, decoded, refs);
    return catalog.snapshots.get(3)!.uuid;
  });
  assert.equal(uuids[0], uuids[1]);
  assert.equal(uuids[0], legacySnapshotUuid(1, 3, 42, 's'));
  assert.ok(isSnapshotUuid(uuids[0]));
  const withId = decodeRecord(encodeRecords([{ type: 'snapshot', volumeId: 1, snapshotId: 3, name: 's', createdAtMs: 42, uuid: 'ab'.repeat(16) }]).subarray(8));
  assert.equal(withId?.type === 'snapshot' && withId.uuid, 'ab'.repeat(16));
  assert.equal(decodeRecord(encodeRecords([{ type: 'snapshot', volumeId: 1, snapshotId: 3, name: 's', createdAtMs: 42, uuid: 'not-an-id' }]).subarray(8)), null);
});

test('new snapshots get distinct random ids that survive a reopen (journal, then checkpoint)', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-ids-'));
  try {
    let pool = await Pool.open({ directory });
    await pool.createVolume('v', 1 << 20);
    const a = await pool.createSnapshot('v', 'a');
    const b = await pool.createSnapshot('v', 'b');
    assert.ok(isSnapshotUuid(a.uuid) && isSnapshotUuid(b.uuid));
    assert.notEqual(a.uuid, b.uuid);
    assert.deepEqual(pool.findSnapshot(b.uuid), { volume: 'v', snapshot: 'b' });
    for (let i = 0; i < 2; i++) {
      await pool.close();
      pool = await Pool.open({ directory });
      assert.deepEqual(pool.listSnapshots('v').map((s) => [s.name, s.uuid]), [['a', a.uuid], ['b', b.uuid]]);
    }
    await pool.close();
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('a pool made before snapshot ids opens: derived ids, stable across reopens, data intact, fsck clean', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-oldpool-'));
  try {
    execFileSync('tar', ['-xzf', fixture, '-C', directory]);
    assert.equal((await fsckPool(directory)).clean, true);
    let pool = await Pool.open({ directory });
    const first = pool.listSnapshots('vol').map((s) => [s.name, s.uuid]);
    assert.deepEqual(first.map(([name]) => name), ['old1', 'old2']);
    assert.ok(first.every(([, uuid]) => isSnapshotUuid(uuid)));
    assert.notEqual(first[0]![1], first[1]![1]);
    const read = async (snapshot: string | null, offset: number): Promise<number> => {
      const device = snapshot === null ? pool.openVolume('vol') : pool.openSnapshot('vol', snapshot);
      const out = Buffer.alloc(4096);
      await device.read(offset, out);
      await device.close();
      assert.ok(out.every((byte) => byte === out[0]));
      return out[0]!;
    };
    assert.deepEqual([await read('old1', 0), await read('old1', 4096), await read('old2', 4096), await read('old2', 65536), await read(null, 65536)], [0xaa, 0xaa, 0xbb, 0, 0xcc]);
    const fresh = await pool.createSnapshot('vol', 'new1');
    for (let i = 0; i < 2; i++) {
      await pool.close();
      pool = await Pool.open({ directory });
      assert.deepEqual(pool.listSnapshots('vol').map((s) => [s.name, s.uuid]), [...first, ['new1', fresh.uuid]]);
    }
    await pool.close();
    assert.equal((await fsckPool(directory)).clean, true);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
