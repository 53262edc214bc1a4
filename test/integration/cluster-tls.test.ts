// etcd over TLS (issue 16): a real etcd serving https:// and asking every client for a certificate of the cluster's
// CA (--client-cert-auth). A node given https:// endpoints and its --tls-dir checks etcd's certificate against
// ca-cert.pem and presents its client-cert.pem: it registers and records its volumes as over http://. A node whose
// certificates come from another CA is refused at start with a clear line, and leaves nothing in etcd; https://
// without --tls-dir, and http:// mixed with https://, are usage errors.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { haveEtcd, startEtcd, type EtcdCluster } from '../../src/testing/etcd-process.ts';
import { chunkdBin, haveTool, makeTempDir, mustRun, runTool, startNode } from '../helpers/node-process.ts';
import { ok, stopAndCheck } from '../helpers/stream-pipe.ts';

const skip = !haveEtcd() || !haveTool('openssl');
let scratch: string;
let tlsDir: string;
let etcd: EtcdCluster;

beforeAll(async () => {
  if (skip) return;
  scratch = makeTempDir('cluster-tls');
  tlsDir = path.join(scratch, 'tls');
  await mustRun(process.execPath, [chunkdBin, 'tls', 'init', tlsDir, '--node', 'etcd', '--node', 'alpha']);
  await mustRun(process.execPath, [chunkdBin, 'tls', 'init', path.join(scratch, 'other-ca'), '--node', 'alpha']);
  etcd = await startEtcd(1, { tlsDirectory: path.join(tlsDir, 'etcd') });
});

afterAll(async () => {
  if (skip) return;
  await etcd.stop();
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('a node joins an etcd on https:// with its --tls-dir; a certificate of another CA is refused at start', { skip, timeout: 120_000 }, async () => {
  assert.match(etcd.endpoints, /^https:\/\/127\.0\.0\.1:\d+$/);
  const serve = (pool: string, ...args: string[]) =>
    runTool(process.execPath, [chunkdBin, 'serve', '--pool', path.join(scratch, pool), '--listen', 'none', '--api', path.join(scratch, `${pool}.sock`), ...args], { timeoutMs: 30_000 });

  const noDir = await serve('refused', '--etcd', etcd.endpoints, '--node-name', 'alpha');
  assert.equal(noDir.code, 2, noDir.stderr);
  assert.match(noDir.stderr, /--etcd https:\/\/127\.0\.0\.1:\d+ needs --tls-dir DIR: etcd's certificate is checked against DIR\/ca-cert\.pem/);
  const mixed = await serve('refused', '--etcd', `${etcd.endpoints},http://127.0.0.1:2379`, '--node-name', 'alpha', '--tls-dir', path.join(tlsDir, 'alpha'));
  assert.equal(mixed.code, 2, mixed.stderr);
  assert.match(mixed.stderr, /all http:\/\/ or all https:\/\/, not both/);

  const stranger = await serve('stranger', '--etcd', etcd.endpoints, '--node-name', 'alpha', '--tls-dir', path.join(scratch, 'other-ca', 'alpha'));
  assert.equal(stranger.code, 1, stranger.stderr);
  assert.match(stranger.stderr, /etcd at https:\/\/127\.0\.0\.1:\d+ is unreachable/);

  const alpha = await startNode(path.join(scratch, 'alpha'), ['--etcd', etcd.endpoints, '--node-name', 'alpha', '--tls-dir', path.join(tlsDir, 'alpha'), '--lease-ttl', '3s', '--default-volume', 'vol:16MiB']);
  try {
    const status = JSON.parse(await ok(alpha, 'cluster', 'status', '--json')) as { nodes: Array<{ name: string; alive: boolean }>; volumes: Array<{ name: string; owner: string; epoch: number }> };
    assert.deepEqual(status.nodes.map((node) => [node.name, node.alive]), [['alpha', true]], 'only alpha registered: the stranger left nothing');
    assert.deepEqual(status.volumes.map((volume) => [volume.name, volume.owner]), [['vol', 'alpha']]);
  } finally {
    await stopAndCheck(alpha);
  }
});
