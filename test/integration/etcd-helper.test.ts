// The test helper's etcd (src/testing/etcd-process.ts): one member and three start on loopback and take a write;
// a member killed and restarted keeps its data; stop() removes every data directory.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'vitest';
import { Etcd3 } from 'etcd3';
import { haveEtcd, startEtcd } from '../../src/testing/etcd-process.ts';

const skip = !haveEtcd();

test('one member: a write survives kill -9 and restart; stop removes the data', { skip }, async () => {
  const etcd = await startEtcd(1);
  const client = new Etcd3({ hosts: etcd.endpoints });
  try {
    await client.put('/test/key').value('v1');
    await etcd.members[0]!.kill();
    await etcd.members[0]!.restart();
    assert.equal(await client.get('/test/key').string(), 'v1');
  } finally {
    client.close();
    await etcd.stop();
  }
  assert.equal(fs.existsSync(etcd.members[0]!.dataDirectory), false);
});

test('three members: a write through one is read through another, and one member down leaves a quorum', { skip }, async () => {
  const etcd = await startEtcd(3);
  const first = new Etcd3({ hosts: etcd.members[0]!.clientUrl });
  const third = new Etcd3({ hosts: etcd.members[2]!.clientUrl });
  try {
    await first.put('/test/key').value('v3');
    assert.equal(await third.get('/test/key').string(), 'v3');
    await etcd.members[1]!.kill();
    await first.put('/test/key').value('v4');
    assert.equal(await third.get('/test/key').string(), 'v4');
  } finally {
    first.close();
    third.close();
    await etcd.stop();
  }
});
