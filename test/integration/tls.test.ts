// NBD over TLS against a real node, with real clients: nbdinfo, qemu-io, qemu-img, nbdcopy and fio over nbds:// and
// nbds+unix://, with credentials made by openssl in the qemu/libnbd layout. One node requires TLS (FORCEDTLS); a
// second offers it and verifies client certificates. A plaintext client, a client certificate from another CA,
// and handshakes that stall or send garbage before or during TLS are refused or cut, and the node serves on.
// CHUNKD_TEST_NBD_THREADS runs the TCP cases on NBD protocol threads, as for every integration test.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, test } from 'vitest';
import { chunkdBin, makeTempDir, mustRun, nodeBinary, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';
import { issue, makeCa, makeTlsDir } from '../helpers/tls-certs.ts';

const MiB = 1024 * 1024;
const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_ABORT = 2;
const NBD_OPT_LIST = 3;
const NBD_OPT_STARTTLS = 5;
const NBD_OPT_INFO = 6;
const NBD_OPT_GO = 7;
const NBD_REP_ACK = 1;
const NBD_REP_ERR_INVALID = 2 ** 31 + 3;
const NBD_REP_ERR_TLS_REQD = 2 ** 31 + 5;

let scratch: string;
/** Credentials of CA 1: the server's, and a client's that the server accepts. */
let creds: string;
/** ca-cert.pem of CA 1 (to check the server) with a client certificate from CA 2. */
let wrongCaCreds: string;
/** ca-cert.pem of CA 1 only: no client certificate. */
let noClientCreds: string;
/** A HOME whose ~/.pki/libnbd is `creds`: fio's nbd engine cannot pass tls-certificates in its URI. */
let home: string;
/** --tls require. */
let forced: RunningNode;
/** --tls on --tls-verify-peer. */
let verifying: RunningNode;

beforeAll(async () => {
  scratch = makeTempDir('tls');
  creds = path.join(scratch, 'creds');
  const ca = makeTlsDir(creds);
  wrongCaCreds = path.join(scratch, 'wrong-ca');
  issue(makeCa(path.join(scratch, 'ca2'), 'another CA'), wrongCaCreds, 'client');
  fs.copyFileSync(ca.certPath, path.join(wrongCaCreds, 'ca-cert.pem'));
  noClientCreds = path.join(scratch, 'no-client');
  fs.mkdirSync(noClientCreds);
  fs.copyFileSync(ca.certPath, path.join(noClientCreds, 'ca-cert.pem'));
  home = path.join(scratch, 'home');
  fs.mkdirSync(path.join(home, '.pki'), { recursive: true });
  fs.symlinkSync(creds, path.join(home, '.pki', 'libnbd'));
  forced = await startNode(path.join(scratch, 'forced'), ['--default-volume', 'default:256MiB', '--tls', 'require', '--tls-dir', creds]);
  verifying = await startNode(path.join(scratch, 'verifying'), ['--default-volume', 'default:64MiB', '--tls', 'on', '--tls-dir', creds, '--tls-verify-peer']);
});

afterAll(async () => {
  for (const node of [forced, verifying]) {
    if (node === undefined) continue;
    assert.equal(await node.stop(), 0, 'the node exits 0 on SIGTERM');
    const fsck = await node.cli('fsck', '--pool', node.pool);
    assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
  }
  fs.rmSync(scratch, { recursive: true, force: true });
});

function tcpUri(node: RunningNode, exportName = 'default', certificates: string | null = creds): string {
  return `nbds://127.0.0.1:${node.tcpPort}/${exportName}${certificates === null ? '' : `?tls-certificates=${certificates}`}`;
}

function unixUri(node: RunningNode, exportName = 'default', certificates = creds): string {
  return `nbds+unix:///${exportName}?socket=${node.nbdSocket}&tls-certificates=${certificates}`;
}

/** qemu's arguments for an export over TLS: the credentials object, then the image options. */
function qemuTls(node: RunningNode, transport: 'tcp' | 'unix', certificates = creds): string[] {
  // Over a unix socket there is no host name to check the server's certificate against: qemu wants one named.
  const server = transport === 'tcp' ? `host=127.0.0.1,port=${node.tcpPort}` : `server.type=unix,server.path=${node.nbdSocket},tls-hostname=localhost`;
  return ['--object', `tls-creds-x509,id=tls0,dir=${certificates},endpoint=client`, '--image-opts', `driver=nbd,${server},export=default,tls-creds=tls0`];
}

/** The node answers a TLS client, and its data written before is there. */
async function stillServing(node: RunningNode): Promise<void> {
  const info = JSON.parse(await mustRun('nbdinfo', ['--json', tcpUri(node)]));
  assert.ok(info.exports[0]['export-size'] > 0);
}

test('nbdinfo over nbds:// and nbds+unix://: TLS negotiated, the export as without TLS', async () => {
  for (const uri of [tcpUri(forced), unixUri(forced)]) {
    const info = JSON.parse(await mustRun('nbdinfo', ['--json', uri]));
    assert.equal(info.TLS, true, uri);
    assert.equal(info.protocol, 'newstyle-fixed');
    const exported = info.exports[0];
    assert.equal(exported['export-size'], 256 * MiB);
    assert.equal(exported['can_multi_conn'], true);
    assert.equal(exported['block_size_maximum'], 32 * MiB);
    assert.ok((exported.contexts as string[]).includes('base:allocation'), 'structured replies and meta contexts negotiated inside TLS');
  }
  const list = JSON.parse(await mustRun('nbdinfo', ['--list', '--json', `nbds://127.0.0.1:${forced.tcpPort}?tls-certificates=${creds}`]));
  assert.deepEqual((list.exports as Array<{ 'export-name': string }>).map((entry) => entry['export-name']), ['default']);
});

test('qemu-io and qemu-img with tls-creds-x509, over TCP and the unix socket, large requests included', async () => {
  await mustRun('qemu-io', [...qemuTls(forced, 'tcp'), '-c', 'write -P 0x5a 1M 2M', '-c', 'write -P 0x11 8M 32M', '-c', 'write -P 0x22 41M 512']);
  const verify = await mustRun('qemu-io', [...qemuTls(forced, 'unix'), '-c', 'read -P 0x5a 1M 2M', '-c', 'read -P 0x11 8M 32M', '-c', 'read -P 0x22 41M 512', '-c', 'read -P 0 0 1M']);
  assert.doesNotMatch(verify, /Pattern verification failed/);
  const info = await mustRun('qemu-img', ['info', '--output=json', ...qemuTls(forced, 'tcp')]);
  assert.equal(JSON.parse(info)['virtual-size'], 256 * MiB);
  const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', ...qemuTls(forced, 'tcp')])) as Array<{ start: number; length: number; data: boolean }>;
  assert.ok(map.some((extent) => extent.data && extent.start <= 8 * MiB && extent.start + extent.length >= 40 * MiB), 'block status over TLS');
});

test('nbdcopy round trip over TLS: the checksums match', async () => {
  const source = path.join(scratch, 'source.img');
  const back = path.join(scratch, 'back.img');
  fs.writeFileSync(source, crypto.randomBytes(48 * MiB));
  await runTool('qemu-io', [...qemuTls(forced, 'tcp'), '-c', 'write -z 0 256M']);
  await mustRun('nbdcopy', [source, tcpUri(forced)], { timeoutMs: 120_000 });
  await mustRun('nbdcopy', [unixUri(forced), back], { timeoutMs: 120_000 });
  const digest = (file: string, bytes: number): string => crypto.createHash('sha256').update(fs.readFileSync(file).subarray(0, bytes)).digest('hex');
  assert.equal(digest(back, 48 * MiB), digest(source, 48 * MiB));
  assert.ok(fs.readFileSync(back).subarray(48 * MiB).equals(Buffer.alloc(208 * MiB)), 'the rest reads as zeroes');
  fs.rmSync(source);
  fs.rmSync(back);
});

test('fio over TLS: two connections, random writes and reads verified with crc32c at iodepth 32', async () => {
  const output = await mustRun('fio', ['--ioengine=nbd', `--uri=${tcpUri(forced, 'default', null)}`, '--name=tls', '--rw=randrw', '--bs=4k', '--iodepth=32', '--numjobs=2',
    '--size=32M', '--offset=64M', '--offset_increment=32M', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--group_reporting', '--verify_state_save=0'],
  { timeoutMs: 300_000, env: { ...process.env, HOME: home } });
  assert.match(output, /err= 0/);
  assert.doesNotMatch(output, /verify: bad/);
});

/** Reads exact byte counts from a socket, plain or TLS. */
class Wire {
  readonly socket: net.Socket;
  #buffer = Buffer.alloc(0);
  #closed = false;
  #wake: (() => void) | null = null;

  constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.#buffer = Buffer.concat([this.#buffer, chunk]);
      this.#wake?.();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.#closed = true;
      this.#wake?.();
    });
  }

  static async connect(target: number | string): Promise<Wire> {
    const socket = typeof target === 'number' ? net.connect(target, '127.0.0.1') : net.connect(target);
    await new Promise((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new Wire(socket);
  }

  async take(count: number, timeoutMs = 20_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buffer.length < count) {
      if (this.#closed) throw new Error(`closed after ${this.#buffer.length} of ${count} bytes`);
      if (Date.now() > deadline) throw new Error(`timed out after ${this.#buffer.length} of ${count} bytes`);
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        setTimeout(resolve, 50);
      });
      this.#wake = null;
    }
    const taken = this.#buffer.subarray(0, count);
    this.#buffer = this.#buffer.subarray(count);
    return taken;
  }

  /**
   * Whether the server closes the connection within `timeoutMs` (the tests give 15 s: room for a loaded machine, yet
   * well short of the node's 30 s handshake timeout, so a close is the server refusing, not its deadline).
   */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#closed && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    return this.#closed;
  }

  /** The greeting, then the client flags (FIXED_NEWSTYLE | NO_ZEROES). */
  async start(): Promise<void> {
    const greeting = await this.take(18);
    assert.equal(greeting.toString('latin1', 0, 16), 'NBDMAGICIHAVEOPT');
    this.socket.write(Buffer.from([0, 0, 0, 3]));
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.alloc(16);
    header.write('IHAVEOPT', 0, 'latin1');
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([header, data]));
  }

  /** The next option reply: its option, type and data. */
  async reply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = await this.take(20);
    assert.equal(header.readBigUInt64BE(0), 0x3e889045565a9n, 'option reply magic');
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: await this.take(header.readUInt32BE(16)) };
  }
}

function goData(exportName: string): Buffer {
  const name = Buffer.from(exportName);
  const data = Buffer.alloc(4 + name.length + 2);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  return data;
}

test('--tls require: a plaintext client gets NBD_REP_ERR_TLS_REQD for every option but STARTTLS and ABORT, and the node serves on', async () => {
  const refused = await runTool('nbdinfo', [`nbd://127.0.0.1:${forced.tcpPort}/default`]);
  assert.notEqual(refused.code, 0, 'nbdinfo without TLS fails');
  for (const target of [forced.tcpPort, forced.nbdSocket]) {
    const wire = await Wire.connect(target);
    await wire.start();
    for (const [option, data] of [[NBD_OPT_LIST, Buffer.alloc(0)], [NBD_OPT_INFO, goData('default')], [NBD_OPT_GO, goData('default')]] as const) {
      wire.sendOption(option, data);
      const reply = await wire.reply();
      assert.deepEqual([reply.option, reply.type], [option, NBD_REP_ERR_TLS_REQD]);
    }
    wire.sendOption(NBD_OPT_ABORT);
    assert.deepEqual((await wire.reply()).type, NBD_REP_ACK);
    assert.ok(await wire.closedWithin(15_000));
  }
  // NBD_OPT_EXPORT_NAME cannot be answered with an error: before TLS it closes the connection.
  const wire = await Wire.connect(forced.tcpPort);
  await wire.start();
  wire.sendOption(NBD_OPT_EXPORT_NAME, Buffer.from('default'));
  assert.ok(await wire.closedWithin(15_000), 'EXPORT_NAME before TLS closes the connection');
  await stillServing(forced);
});

/** STARTTLS on a raw connection, then TLS over it with CA 1 (and a client certificate when asked). */
async function startTls(target: number | string, clientCertificate: string | null): Promise<{ wire: Wire; secure: tls.TLSSocket }> {
  const wire = await Wire.connect(target);
  await wire.start();
  wire.sendOption(NBD_OPT_STARTTLS);
  assert.deepEqual((await wire.reply()).type, NBD_REP_ACK);
  wire.socket.removeAllListeners('data');
  const secure = tls.connect({
    socket: wire.socket,
    ca: fs.readFileSync(path.join(creds, 'ca-cert.pem')),
    servername: 'localhost',
    ...(clientCertificate === null ? {} : { cert: fs.readFileSync(path.join(clientCertificate, 'client-cert.pem')), key: fs.readFileSync(path.join(clientCertificate, 'client-key.pem')) }),
  });
  await new Promise((resolve, reject) => {
    secure.once('secureConnect', resolve);
    secure.once('error', reject);
  });
  assert.equal(secure.getProtocol(), 'TLSv1.3');
  return { wire: new Wire(secure), secure };
}

test('inside TLS the options start again: STARTTLS a second time is NBD_REP_ERR_INVALID, GO serves', async () => {
  const { wire, secure } = await startTls(forced.tcpPort, null);
  wire.sendOption(NBD_OPT_STARTTLS);
  assert.deepEqual((await wire.reply()).type, NBD_REP_ERR_INVALID);
  wire.sendOption(NBD_OPT_GO, goData('default'));
  let reply = await wire.reply();
  while (reply.type !== NBD_REP_ACK) reply = await wire.reply();
  // A READ of 4 KiB at 250 MiB, never written: a simple reply (no structured replies negotiated inside TLS).
  const request = Buffer.alloc(28);
  request.writeUInt32BE(0x25609513, 0);
  request.writeBigUInt64BE(7n, 8);
  request.writeBigUInt64BE(BigInt(250 * MiB), 16);
  request.writeUInt32BE(4096, 24);
  secure.write(request);
  const header = await wire.take(16);
  assert.equal(header.readUInt32BE(0), 0x67446698);
  assert.equal(header.readUInt32BE(4), 0, 'no error');
  assert.ok((await wire.take(4096)).equals(Buffer.alloc(4096)));
  secure.destroy();
});

test('--tls on --tls-verify-peer: a client certificate from CA 1 is served, one from another CA or none is refused', async () => {
  // SELECTIVETLS: without TLS the export is served too.
  const plain = JSON.parse(await mustRun('nbdinfo', ['--json', `nbd://127.0.0.1:${verifying.tcpPort}/default`]));
  assert.equal(plain.TLS, false);
  for (const uri of [tcpUri(verifying), unixUri(verifying)]) assert.equal(JSON.parse(await mustRun('nbdinfo', ['--json', uri])).TLS, true, uri);
  await mustRun('qemu-io', [...qemuTls(verifying, 'tcp'), '-c', 'write -P 0x33 0 64k', '-c', 'read -P 0x33 0 64k']);
  for (const certificates of [wrongCaCreds, noClientCreds]) {
    const refused = await runTool('nbdinfo', [tcpUri(verifying, 'default', certificates)]);
    assert.notEqual(refused.code, 0, `nbdinfo with ${path.basename(certificates)} is refused`);
    const qemu = await runTool('qemu-io', [...qemuTls(verifying, 'tcp', certificates), '-c', 'read 0 4k']);
    assert.notEqual(qemu.code, 0, `qemu-io with ${path.basename(certificates)} is refused`);
  }
  await assert.rejects(async () => {
    const { wire } = await startTls(verifying.tcpPort, wrongCaCreds);
    wire.sendOption(NBD_OPT_LIST);
    await wire.reply();
  }, 'a raw TLS client with a certificate from another CA gets nothing');
  // libnbd and qemu (GnuTLS) send no certificate the server's CA list does not name; Node's client sends its own.
  assert.match(verifying.stderr(), /TLS handshake failed: .*peer did not return a certificate/);
  assert.match(verifying.stderr(), /client certificate refused: client certificate "[^"]*" is not signed by a CA in ca-cert\.pem/);
  await stillServingWithCertificate(verifying);
});

async function stillServingWithCertificate(node: RunningNode): Promise<void> {
  const verify = await mustRun('qemu-io', [...qemuTls(node, 'tcp'), '-c', 'read -P 0x33 0 64k']);
  assert.doesNotMatch(verify, /Pattern verification failed/);
}

/** Resident memory of a node, KiB. */
async function rssKiB(node: RunningNode): Promise<number> {
  return Number((await runTool('ps', ['-o', 'rss=', '-p', String(node.process.pid)])).stdout.trim());
}

// Stalls are cut at the handshake timeout (30 s here): test/unit/nbd-tls.test.ts shows it with a short one.
test('handshakes that send garbage before or during TLS are closed at once; stalled ones cost bounded memory; the node serves on', async () => {
  const before = await rssKiB(forced);
  const held: Wire[] = [];
  for (let index = 0; index < 40; index += 1) {
    const target = index % 2 === 0 ? forced.tcpPort : forced.nbdSocket;
    // Garbage instead of options: closed at once.
    const garbage = await Wire.connect(target);
    await garbage.start();
    garbage.socket.write(crypto.randomBytes(4096));
    // Garbage instead of a TLS ClientHello, after the ACK: the TLS handshake fails and the connection closes.
    const tlsGarbage = await Wire.connect(target);
    await tlsGarbage.start();
    tlsGarbage.sendOption(NBD_OPT_STARTTLS);
    assert.equal((await tlsGarbage.reply()).type, NBD_REP_ACK);
    tlsGarbage.socket.write(crypto.randomBytes(16 * 1024));
    // STARTTLS, then silence; half a ClientHello, then silence; no client flags at all: held until the timeout.
    const silent = await Wire.connect(target);
    await silent.start();
    silent.sendOption(NBD_OPT_STARTTLS);
    assert.equal((await silent.reply()).type, NBD_REP_ACK);
    const half = await Wire.connect(target);
    await half.start();
    half.sendOption(NBD_OPT_STARTTLS);
    assert.equal((await half.reply()).type, NBD_REP_ACK);
    half.socket.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]));
    held.push(silent, half, await Wire.connect(target));
    assert.ok(await garbage.closedWithin(15_000), 'garbage before TLS closes the connection');
    assert.ok(await tlsGarbage.closedWithin(15_000), 'garbage during TLS closes the connection');
  }
  await stillServing(forced);
  const grownKiB = (await rssKiB(forced)) - before;
  assert.ok(grownKiB < 64 * 1024, `120 stalled handshakes and 80 refused ones grew the node by ${grownKiB} KiB`);
  const status = JSON.parse((await forced.cli('status', '--json')).stdout);
  assert.equal(status.nbd.tls.mode, 'require', 'status says NBD requires TLS');
  assert.match((await forced.cli('status')).stdout, /\(TLS require\)/);
  assert.ok(status.nbd.connectionsOpen <= held.length, `only the stalled connections stay open (${status.nbd.connectionsOpen})`);
  for (const wire of held) wire.socket.destroy();
});

test('a node whose credentials are missing or broken refuses to start, naming the file', async () => {
  const empty = path.join(scratch, 'empty-creds');
  fs.mkdirSync(empty);
  const serve = (directory: string): Promise<{ code: number; stderr: string }> => runTool(nodeBinary, [chunkdBin, 'serve', '--pool', path.join(scratch, 'refused-pool'),
    '--listen', '127.0.0.1:0', '--api', path.join(scratch, 'refused.sock'), '--tls', 'require', '--tls-dir', directory], { timeoutMs: 30_000 });
  const missing = await serve(empty);
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, new RegExp(`${path.join(empty, 'server-cert.pem')} is missing`));
  fs.copyFileSync(path.join(creds, 'server-cert.pem'), path.join(empty, 'server-cert.pem'));
  fs.writeFileSync(path.join(empty, 'server-key.pem'), 'not a key');
  const broken = await serve(empty);
  assert.notEqual(broken.code, 0);
  assert.match(broken.stderr, /server-key\.pem is not a private key/);
  assert.equal(broken.stderr.trim().split('\n').length, 1, `one line: ${broken.stderr}`);
  assert.ok(!fs.existsSync(path.join(scratch, 'refused-pool')), 'no pool is made before the credentials are read');
});
