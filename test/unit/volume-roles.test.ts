// Volume roles (replication/roles.ts): what each role refuses and with which error, durability across a reload,
// entries of volumes that are gone dropped at load, and a damaged file refused clearly.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { VolumeRoles } from '../../src/replication/roles.ts';

test('roles: each refuses writes with its reason, survives a reload, and drops entries of volumes that are gone', async () => {
  const pool = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-roles-'));
  try {
    const roles = await VolumeRoles.load(pool, () => true);
    assert.equal(roles.epochOf('mine'), 1);
    assert.equal(roles.writeRefusal('mine', 'a write'), null);
    await roles.set('copy', { role: 'replica', owner: 'alpha', epoch: 3 });
    await roles.set('moved', { role: 'handing-off', epoch: 2, to: 'beta', toAddress: '127.0.0.1:1' });
    await roles.set('old', { role: 'fenced', epoch: 1, owner: 'gamma', ownerEpoch: 2, ownerAddress: null });
    await roles.set('taken', { role: 'owner', epoch: 4 });
    const code = (volume: string) => roles.writeRefusal(volume, 'a write')?.code ?? null;
    assert.deepEqual(['copy', 'moved', 'old', 'taken'].map(code), ['EPERM', 'ESHUTDOWN', 'EPERM', null]);
    assert.match(roles.writeRefusal('old', 'a write')!.message, /fenced: node gamma owns it now at epoch 2/);
    assert.deepEqual([roles.epochOf('taken'), roles.epochOf('moved'), roles.epochOf('copy')], [4, 2, 1]);
    assert.deepEqual(roles.readOnlyVolumes().sort(), ['copy', 'moved', 'old']);

    const reloaded = await VolumeRoles.load(pool, (volume) => volume !== 'old');
    assert.deepEqual(reloaded.replicaOf('copy'), { owner: 'alpha', epoch: 3 });
    assert.equal(reloaded.handingOff('moved')?.to, 'beta');
    assert.equal(reloaded.fenced('old'), null, 'the entry of a volume that is gone is dropped');
    const again = await VolumeRoles.load(pool, () => true);
    assert.equal(again.fenced('old'), null, 'and the drop was written');

    // A promoted owner's kept base: durable, released only by the previous owner it is kept for.
    await again.set('promoted', { role: 'owner', epoch: 5, keep: { uuid: 'u1', until: 'delta' } });
    assert.deepEqual((await VolumeRoles.load(pool, () => true)).keptBase('promoted'), { uuid: 'u1', until: 'delta' });
    await again.releaseBase('promoted', 'alpha');
    assert.deepEqual(again.keptBase('promoted'), { uuid: 'u1', until: 'delta' });
    await again.releaseBase('promoted', 'delta');
    assert.equal(again.keptBase('promoted'), null);
    assert.equal((await VolumeRoles.load(pool, () => true)).epochOf('promoted'), 5);
    // A replica that follows a new owner remembers its stale point (from the previous owner) across a reload.
    await again.set('follower', { role: 'replica', owner: 'beta', epoch: 2, stalePoint: 'u0' });
    assert.equal((await VolumeRoles.load(pool, () => true)).stalePoint('follower'), 'u0');
    assert.equal(again.stalePoint('copy'), null);

    fs.writeFileSync(path.join(pool, 'replication', 'roles.json'), JSON.stringify({ volumes: { copy: { role: 'replica', epoch: 1 } } }));
    await assert.rejects(VolumeRoles.load(pool, () => true), (error: unknown) => error instanceof ChunkdError && error.code === 'ECORRUPT' && /not a volume role/.test(error.message));
  } finally {
    fs.rmSync(pool, { recursive: true, force: true });
  }
});
