// TLS and the peer port, with real processes and real tools: `chunkd tls init` checked by `openssl verify` and
// used by nbdkit and nbdinfo (GnuTLS); two nodes (two pools, two loopback ports) that say hello; every way a
// peer is refused (no certificate, another CA, expired, a name not allowed) refused before any request is read
// and logged; stalls and garbage before and during TLS closed in bounded time; an oversized frame refused at
// its header.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { test } from 'vitest';
import { peerHandshakeTimeoutMs } from '../../src/core/limits.ts';
import { PeerClient } from '../../src/peer/client.ts';
import { loadCredentials, type TlsCredentials } from '../../src/peer/credentials.ts';
import { FrameKind, FrameReader, encodeFrame, encodeHelloRequest } from '../../src/peer/protocol.ts';
import { chunkdBin, haveTool, makeTempDir, mustRun, nodeBinary, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';

const chunkd = (...args: string[]) => runTool(nodeBinary, [chunkdBin, ...args]);

function peerPort(node: RunningNode): number {
  const match = /, peer 127\.0\.0\.1:(\d+)/.exec(node.readyLine);
  assert.ok(match, `no peer port in: ${node.readyLine}`);
  return Number(match[1]);
}

/** Issues a certificate from `caDirectory`'s CA valid only in the past, with `openssl ca` (any OpenSSL 3 has -startdate/-enddate). */
async function expiredSet(caDirectory: string, target: string, name: string, role: 'server' | 'client'): Promise<void> {
  const work = fs.mkdtempSync(path.join(target, '.ca-'));
  fs.writeFileSync(path.join(work, 'index.txt'), '');
  fs.writeFileSync(path.join(work, 'serial'), `${crypto.randomBytes(8).toString('hex')}\n`);
  fs.writeFileSync(path.join(work, 'ca.cnf'), [
    '[ca]', 'default_ca = cluster',
    '[cluster]', `database = ${work}/index.txt`, `new_certs_dir = ${work}`, `serial = ${work}/serial`,
    `certificate = ${caDirectory}/ca-cert.pem`, `private_key = ${caDirectory}/ca-key.pem`,
    'default_md = sha256', 'policy = any', 'unique_subject = no',
    '[any]', 'commonName = supplied', 'organizationName = optional',
    '[req]', 'distinguished_name = dn', 'prompt = no', '[dn]', `CN = ${name}`,
    '[leaf]', 'basicConstraints = critical, CA:FALSE', 'keyUsage = critical, digitalSignature, keyEncipherment',
    `extendedKeyUsage = ${role === 'server' ? 'serverAuth' : 'clientAuth'}`, 'subjectAltName = DNS:localhost, IP:127.0.0.1', '',
  ].join('\n'));
  await mustRun('openssl', ['req', '-new', '-config', path.join(work, 'ca.cnf'), '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', path.join(target, `${role}-key.pem`), '-subj', `/O=chunkd/CN=${name}`, '-out', path.join(work, 'req.csr')]);
  await mustRun('openssl', ['ca', '-batch', '-config', path.join(work, 'ca.cnf'), '-in', path.join(work, 'req.csr'), '-out', path.join(target, `${role}-cert.pem`),
    '-startdate', '20200101000000Z', '-enddate', '20210101000000Z', '-extensions', 'leaf', '-notext']);
  fs.rmSync(work, { recursive: true });
}

/** Credentials assembled by hand, to present what a misconfigured or hostile peer would. */
function credentialsFrom(caFile: string, certFile: string | null, keyFile: string | null): TlsCredentials {
  return {
    directory: path.dirname(caFile),
    name: 'test',
    validTo: new Date(),
    ca: fs.readFileSync(caFile),
    cert: certFile === null ? (undefined as unknown as Buffer) : fs.readFileSync(certFile),
    key: keyFile === null ? (undefined as unknown as Buffer) : fs.readFileSync(keyFile),
  };
}

/** Waits until `socket` closes; returns how long that took and the bytes it received. */
function closed(socket: net.Socket): Promise<{ ms: number; received: Buffer }> {
  const started = performance.now();
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  socket.on('error', () => {});
  return new Promise((resolve) => socket.once('close', () => resolve({ ms: performance.now() - started, received: Buffer.concat(chunks) })));
}

test('tls init: the qemu layout, keys 0600, openssl verify, an existing CA refused, --add, and real use by nbdkit and nbdinfo', async () => {
  const scratch = makeTempDir('tls');
  try {
    const dir = path.join(scratch, 'tls');
    const made = await chunkd('tls', 'init', dir, '--node', 'alpha', '--node', 'beta', '--client', 'admin', '--san', '10.1.2.3', '--san', 'DNS:alpha.example');
    assert.equal(made.code, 0, made.stderr);
    assert.match(made.stdout, /created CA/);
    const sets = { '.': ['server', 'client'], alpha: ['server', 'client'], beta: ['server', 'client'], admin: ['client'] } as const;
    for (const [name, roles] of Object.entries(sets)) {
      const where = path.join(dir, name);
      assert.ok(fs.existsSync(path.join(where, 'ca-cert.pem')), `${name}: ca-cert.pem`);
      for (const role of roles) {
        assert.equal(fs.statSync(path.join(where, `${role}-key.pem`)).mode & 0o777, 0o600, `${name}: ${role}-key.pem is 0600`);
        const verified = await mustRun('openssl', ['verify', '-CAfile', path.join(dir, 'ca-cert.pem'), '-purpose', role === 'server' ? 'sslserver' : 'sslclient', path.join(where, `${role}-cert.pem`)]);
        assert.match(verified, /: OK/);
      }
      if (!roles.includes('server' as never)) assert.ok(!fs.existsSync(path.join(where, 'server-cert.pem')), 'a client gets no server pair');
    }
    assert.equal(fs.statSync(path.join(dir, 'ca-key.pem')).mode & 0o777, 0o600);
    // The top level is alpha's set; names and SANs as asked.
    assert.ok(fs.readFileSync(path.join(dir, 'server-cert.pem')).equals(fs.readFileSync(path.join(dir, 'alpha', 'server-cert.pem'))));
    const beta = new crypto.X509Certificate(fs.readFileSync(path.join(dir, 'beta', 'server-cert.pem')));
    assert.match(beta.subject, /CN=beta/);
    assert.equal(beta.subjectAltName, 'DNS:beta, DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, IP Address:10.1.2.3, DNS:alpha.example');
    assert.equal(loadCredentials(path.join(dir, 'admin'), 'client').name, 'admin');

    // An existing CA is not overwritten unless asked; --add issues from it; --force replaces it and its sets.
    const caBefore = fs.readFileSync(path.join(dir, 'ca-cert.pem'));
    const again = await chunkd('tls', 'init', dir, '--node', 'gamma');
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already holds a CA .*--add.*--force/);
    assert.ok(fs.readFileSync(path.join(dir, 'ca-cert.pem')).equals(caBefore));
    assert.equal((await chunkd('tls', 'init', dir, '--add', '--node', 'gamma')).code, 0);
    assert.match(await mustRun('openssl', ['verify', '-CAfile', path.join(dir, 'ca-cert.pem'), path.join(dir, 'gamma', 'server-cert.pem')]), /OK/);
    assert.match((await chunkd('tls', 'init', dir, '--add', '--node', 'gamma')).stderr, /gamma exists already/);
    assert.match((await chunkd('tls', 'init', path.join(scratch, 'bad'), '--node', '../x')).stderr, /invalid node name/);
    assert.ok(!fs.existsSync(path.join(scratch, 'bad')) || fs.readdirSync(path.join(scratch, 'bad')).length === 0, 'nothing left behind by a refused init');
    const forced = path.join(scratch, 'forced');
    assert.equal((await chunkd('tls', 'init', forced, '--node', 'one')).code, 0);
    assert.equal((await chunkd('tls', 'init', forced, '--force', '--node', 'two')).code, 0);
    assert.deepEqual(fs.readdirSync(forced).filter((name) => !name.endsWith('.pem')), ['two'], 'the old CA\'s sets are gone');

    // Real use: the directories are what nbdkit (server, verifying its client) and libnbd (client) read.
    if (haveTool('nbdkit') && haveTool('nbdinfo')) {
      const socket = path.join(scratch, 'nbdkit.sock');
      const pidFile = path.join(scratch, 'nbdkit.pid');
      await mustRun('nbdkit', ['-U', socket, '-P', pidFile, '--tls=require', `--tls-certificates=${path.join(dir, 'alpha')}`, '--tls-verify-peer', 'memory', '1M']);
      try {
        const info = await mustRun('nbdinfo', [`nbds+unix:///?socket=${socket}&tls-certificates=${path.join(dir, 'beta')}`]);
        assert.match(info, /with TLS/);
        assert.match(info, /export-size: 1048576/);
        // A client from another CA is refused by nbdkit too.
        const other = (await runTool('nbdinfo', [`nbds+unix:///?socket=${socket}&tls-certificates=${path.join(forced, 'two')}`])).code;
        assert.notEqual(other, 0);
      } finally {
        process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGTERM');
      }
    } else {
      console.log('# nbdkit or nbdinfo missing: real-use check skipped');
    }
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('two nodes say hello over mutual TLS; peer status shows name, version and pool id, which survive a restart', async () => {
  const scratch = makeTempDir('peer');
  const dir = path.join(scratch, 'tls');
  assert.equal((await chunkd('tls', 'init', dir, '--node', 'a,b')).code, 0);
  let a = await startNode(path.join(scratch, 'pool-a'), ['--peer-listen', '127.0.0.1:0', '--tls-dir', path.join(dir, 'a')]);
  const b = await startNode(path.join(scratch, 'pool-b'), ['--peer-listen', '127.0.0.1:0', '--tls-dir', path.join(dir, 'b')]);
  try {
    const poolA = fs.readFileSync(path.join(a.pool, 'pool-id'), 'utf8').trim();
    const poolB = fs.readFileSync(path.join(b.pool, 'pool-id'), 'utf8').trim();
    assert.match(poolA, /^[0-9a-f-]{36}$/);
    assert.notEqual(poolA, poolB);
    const fromB = await chunkd('peer', 'status', `127.0.0.1:${peerPort(a)}`, '--tls-dir', path.join(dir, 'b'));
    assert.equal(fromB.code, 0, fromB.stderr);
    assert.equal(fromB.stdout, `peer a at 127.0.0.1:${peerPort(a)}: chunkd 0.1.0, protocol version 1, pool ${poolA} (connected as b)\n`);
    const fromA = JSON.parse((await chunkd('peer', 'status', `127.0.0.1:${peerPort(b)}`, '--tls-dir', path.join(dir, 'a'), '--json', '--expect', 'b')).stdout);
    assert.deepEqual([fromA.name, fromA.version, fromA.poolId, fromA.client], ['b', 1, poolB, 'a']);
    assert.match((await chunkd('peer', 'status', `127.0.0.1:${peerPort(b)}`, '--tls-dir', path.join(dir, 'a'), '--expect', 'c')).stderr, /the peer is b, not c/);
    assert.match(a.stderr(), /peer b connected from 127\.0\.0\.1:\d+ \(protocol version 1\)/);
    const status = JSON.parse((await a.cli('status', '--json')).stdout);
    assert.equal(status.pool.id, poolA);
    assert.deepEqual([status.peer.name, status.peer.requestsTotal], ['a', 1]);

    // The pool keeps its identity across a restart.
    assert.equal(await a.stop(), 0);
    a = await startNode(a.pool, ['--peer-listen', '127.0.0.1:0', '--tls-dir', path.join(dir, 'a')]);
    assert.match((await chunkd('peer', 'status', `127.0.0.1:${peerPort(a)}`, '--tls-dir', path.join(dir, 'b'))).stdout, new RegExp(`pool ${poolA}`));
  } finally {
    await a.stop();
    await b.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('a peer without a certificate, from another CA, expired, or not allowed is refused before any request, and logged', async () => {
  const scratch = makeTempDir('peer-refuse');
  const dir = path.join(scratch, 'tls');
  const other = path.join(scratch, 'other');
  assert.equal((await chunkd('tls', 'init', dir, '--node', 'a,b', '--client', 'admin')).code, 0);
  assert.equal((await chunkd('tls', 'init', other, '--node', 'b')).code, 0);
  const expired = path.join(scratch, 'expired');
  fs.mkdirSync(expired);
  fs.copyFileSync(path.join(dir, 'ca-cert.pem'), path.join(expired, 'ca-cert.pem'));
  await expiredSet(dir, expired, 'b', 'client');
  await expiredSet(dir, expired, 'a', 'server');
  const node = await startNode(path.join(scratch, 'pool'), ['--peer-listen', '127.0.0.1:0', '--tls-dir', path.join(dir, 'a'), '--peer-allow', 'b']);
  try {
    const port = peerPort(node);
    const ca = path.join(dir, 'ca-cert.pem');
    const attempt = (credentials: TlsCredentials) => PeerClient.connect({ host: '127.0.0.1', port, credentials }).then(
      (client) => {
        client.close();
        return 'connected';
      },
      (error: Error) => error.message,
    );
    // No client certificate: OpenSSL refuses in the handshake (TLS 1.3: "certificate required" alert).
    assert.match(await attempt(credentialsFrom(ca, null, null)), /requires a client certificate/);
    // A certificate from another CA for the allowed name, and an expired one from the right CA.
    assert.match(await attempt(credentialsFrom(ca, path.join(other, 'b', 'client-cert.pem'), path.join(other, 'b', 'client-key.pem'))), /refused this client's certificate/);
    assert.match(await attempt(credentialsFrom(ca, path.join(expired, 'client-cert.pem'), path.join(expired, 'client-key.pem'))), /refused this client's certificate/);
    // A valid certificate for a name --peer-allow does not list: an error frame, then the end.
    assert.match(await attempt(loadCredentials(path.join(dir, 'admin'), 'client')), /refused: peer admin is not allowed on node a/);
    // The CLI says it in one line and exits non-zero.
    const refused = await chunkd('peer', 'status', `127.0.0.1:${port}`, '--tls-dir', path.join(other, 'b'));
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /^chunkd: the peer at 127\.0\.0\.1:\d+ presented a certificate this cluster's CA did not issue/);
    const missing = await chunkd('peer', 'status', `127.0.0.1:${port}`, '--tls-dir', path.join(scratch, 'nowhere'));
    assert.match(missing.stderr, /nowhere\/ca-cert\.pem is missing/);
    assert.equal(await attempt(loadCredentials(path.join(dir, 'b'), 'client')), 'connected', 'the allowed peer still gets in');

    const log = node.stderr();
    assert.match(log, /refused: the peer presented no certificate/);
    assert.match(log, /refused: its certificate failed verification: not issued by this cluster's CA/);
    assert.match(log, /refused: its certificate failed verification: expired \(CERT_HAS_EXPIRED\)/);
    assert.match(log, /refused: peer admin is not in --peer-allow/);
    // Not one request was read from a refused connection: only the last, allowed hello was served.
    const status = JSON.parse((await node.cli('status', '--json')).stdout);
    assert.equal(status.peer.requestsTotal, 1);
    assert.ok(status.peer.refusedTotal >= 5, `refused ${status.peer.refusedTotal}`);

    // A node does not start with an expired certificate, or with a file missing, and says which file.
    const pool2 = path.join(scratch, 'pool2');
    const expiredStart = await chunkd('serve', '--pool', pool2, '--listen', 'none', '--peer-listen', '127.0.0.1:0', '--tls-dir', expired);
    assert.equal(expiredStart.code, 1);
    assert.match(expiredStart.stderr, /expired\/server-cert\.pem expired on 2021-01-01/);
    fs.rmSync(path.join(expired, 'server-key.pem'));
    assert.match((await chunkd('serve', '--pool', pool2, '--listen', 'none', '--peer-listen', '127.0.0.1:0', '--tls-dir', expired)).stderr, /expired\/server-key\.pem is missing/);
    assert.match((await chunkd('serve', '--pool', pool2, '--peer-listen', '127.0.0.1:0')).stderr, /--peer-listen needs --tls-dir/);
  } finally {
    await node.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('stalls and garbage before or during TLS, and oversized or early frames after it, cost bounded time and memory', async () => {
  const scratch = makeTempDir('peer-stall');
  const dir = path.join(scratch, 'tls');
  assert.equal((await chunkd('tls', 'init', dir, '--node', 'a,b')).code, 0);
  const node = await startNode(path.join(scratch, 'pool'), ['--peer-listen', '127.0.0.1:0', '--tls-dir', path.join(dir, 'a')]);
  try {
    const port = peerPort(node);
    const b = loadCredentials(path.join(dir, 'b'), 'client');
    // The deadline's connections close once it has passed (never before: their timers start after this side's), and
    // within a bound roomy enough for a loaded machine's late timers; the refused ones close before any deadline
    // could have fired.
    const lateMs = 20_000;
    // 1. TCP connected, nothing sent. 2. Half a TLS ClientHello, then silence. 3. A byte every 2 s (an idle
    // timer would never fire). 4. TLS done with a valid certificate, then no hello.
    const silent = net.connect(port, '127.0.0.1');
    const half = net.connect(port, '127.0.0.1', () => half.write(Buffer.from('160301020001', 'hex')));
    const trickle = net.connect(port, '127.0.0.1');
    const trickleBytes = Buffer.from('16030102000100', 'hex');
    let trickled = 0;
    const trickleTimer = setInterval(() => trickle.write(trickleBytes.subarray(trickled % trickleBytes.length, (trickled++ % trickleBytes.length) + 1)), 2_000);
    const noHello = tls.connect({ host: '127.0.0.1', port, ca: b.ca, cert: b.cert, key: b.key, checkServerIdentity: () => undefined });
    // 5. A megabyte of garbage instead of TLS: refused at once.
    const garbage = net.connect(port, '127.0.0.1', () => garbage.write(crypto.randomBytes(1024 * 1024)));
    // 6. After TLS and hello, a frame header that claims 4 GiB: refused at the header, nothing buffered.
    const huge = tls.connect({ host: '127.0.0.1', port, ca: b.ca, cert: b.cert, key: b.key, checkServerIdentity: () => undefined }, () => {
      huge.write(Buffer.concat(encodeHelloRequest(1)));
      const header = Buffer.concat(encodeFrame(FrameKind.request, 77, 3, Buffer.alloc(0)));
      header.writeUInt32BE(0xffffffff, 12);
      huge.write(header);
    });
    // 7. A request before hello: refused with an error frame.
    const early = tls.connect({ host: '127.0.0.1', port, ca: b.ca, cert: b.cert, key: b.key, checkServerIdentity: () => undefined }, () => {
      early.write(Buffer.concat(encodeFrame(FrameKind.request, 5, 1, Buffer.from('{}'))));
    });
    const [silentDone, halfDone, trickleDone, noHelloDone, garbageDone, hugeDone, earlyDone] = await Promise.all([silent, half, trickle, noHello, garbage, huge, early].map(closed));
    clearInterval(trickleTimer);
    for (const [label, done] of [['silent', silentDone], ['half a ClientHello', halfDone], ['trickle', trickleDone], ['TLS without hello', noHelloDone]] as const) {
      assert.ok(done!.ms >= peerHandshakeTimeoutMs - 1_000 && done!.ms < peerHandshakeTimeoutMs + lateMs, `${label}: closed after ${Math.round(done!.ms)} ms`);
    }
    assert.ok(garbageDone!.ms < peerHandshakeTimeoutMs - 1_000, `garbage: closed after ${garbageDone!.ms} ms`);
    const errorsOf = (received: Buffer): string[] => {
      const reader = new FrameReader();
      reader.push(received);
      const messages: string[] = [];
      for (let frame = reader.next(); frame !== null; frame = reader.next()) if (frame.kind === FrameKind.error) messages.push(frame.payload.toString());
      return messages;
    };
    assert.ok(hugeDone!.ms < peerHandshakeTimeoutMs - 1_000, `huge frame: closed after ${hugeDone!.ms} ms`);
    assert.match(errorsOf(hugeDone!.received).join('\n'), /4294967295 bytes, more than the 65536 allowed/);
    assert.match(errorsOf(earlyDone!.received).join('\n'), /the first request must be hello/);
    const log = node.stderr();
    assert.equal(log.match(/no TLS handshake and hello within 10000 ms/g)?.length, 4, log);
    assert.doesNotMatch(log, /during the TLS handshake/, 'a connection the deadline ended is logged once');
    assert.match(log, /refused: not TLS/);
    assert.match(log, /protocol error, closing: frame of verb 77 carries 4294967295 bytes/);
    // The node is unharmed: a real peer still gets its answer.
    assert.equal((await chunkd('peer', 'status', `127.0.0.1:${port}`, '--tls-dir', path.join(dir, 'b'))).code, 0);
  } finally {
    await node.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});

test('the management API on TCP (--api-listen) takes only client certificates from the CA; the unix socket stays', async () => {
  const scratch = makeTempDir('api-tls');
  const dir = path.join(scratch, 'tls');
  const other = path.join(scratch, 'other');
  assert.equal((await chunkd('tls', 'init', dir, '--node', 'a', '--client', 'admin')).code, 0);
  assert.equal((await chunkd('tls', 'init', other, '--client', 'admin')).code, 0);
  const node = await startNode(path.join(scratch, 'pool'), ['--api-listen', '127.0.0.1:0', '--tls-dir', path.join(dir, 'a')]);
  try {
    const match = /, api \S+ (127\.0\.0\.1:\d+)/.exec(node.readyLine);
    assert.ok(match, node.readyLine);
    const api = match[1]!;
    const created = await chunkd('volume', 'create', 'v1', '--size', '1GiB', '--api', api, '--tls-dir', path.join(dir, 'admin'));
    assert.equal(created.code, 0, created.stderr);
    const status = JSON.parse((await chunkd('status', '--json', '--api', api, '--tls-dir', path.join(dir, 'admin'))).stdout);
    assert.equal(status.api.tls, api);
    assert.deepEqual(status.volumes.map((v: { name: string }) => v.name), ['v1']);
    // The unix socket serves as before.
    assert.match((await node.cli('volume', 'list')).stdout, /v1/);
    // No --tls-dir, another CA's client, no client certificate at all: refused, in one line.
    assert.match((await chunkd('status', '--api', api)).stderr, /^chunkd: --api 127\.0\.0\.1:\d+ is the API on TCP, which is mutual TLS only: pass --tls-dir DIR/);
    const foreign = await chunkd('status', '--api', api, '--tls-dir', path.join(other, 'admin'));
    assert.equal(foreign.code, 1);
    assert.match(foreign.stderr, /^chunkd: the node's API at 127\.0\.0\.1:\d+ presented a certificate this cluster's CA did not issue/);
    const noCertificate = await runTool('curl', ['-sS', '--cacert', path.join(dir, 'ca-cert.pem'), '--resolve', `a:${api.split(':')[1]}:127.0.0.1`, `https://a:${api.split(':')[1]}/v1/status`]);
    assert.notEqual(noCertificate.code, 0, 'curl without a client certificate is refused');
    const otherCaCertificate = await runTool('curl', ['-sS', '--cacert', path.join(dir, 'ca-cert.pem'), '--cert', path.join(other, 'admin', 'client-cert.pem'), '--key', path.join(other, 'admin', 'client-key.pem'), `https://localhost:${api.split(':')[1]}/v1/volumes`]);
    assert.ok(otherCaCertificate.code !== 0 && !otherCaCertificate.stdout.includes('v1'), 'a client certificate from another CA is refused');
    const withCertificate = await runTool('curl', ['-sS', '--cacert', path.join(dir, 'ca-cert.pem'), '--cert', path.join(dir, 'admin', 'client-cert.pem'), '--key', path.join(dir, 'admin', 'client-key.pem'), `https://localhost:${api.split(':')[1]}/v1/volumes`]);
    assert.equal(withCertificate.code, 0, withCertificate.stderr);
    assert.match(withCertificate.stdout, /"name":"v1"/);
    assert.match(node.stderr(), /api connection from 127\.0\.0\.1:\d+ refused: the peer presented no certificate/);
    assert.match(node.stderr(), /api connection from 127\.0\.0\.1:\d+ refused: its certificate failed verification: not issued by this cluster's CA/);
    assert.match((await chunkd('serve', '--pool', path.join(scratch, 'p2'), '--api-listen', '127.0.0.1:0')).stderr, /--api-listen needs --tls-dir/);
  } finally {
    await node.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
});
