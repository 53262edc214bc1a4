// Handoff between two real nodes (separate pools, loopback peer ports, mutual TLS): under a client writing through
// NBD (qemu-io, every batch of writes followed by a flush), every write acknowledged before the freeze and flushed
// is on the new owner, the old owner's clients are refused with the shutdown error and it keeps a read-only
// replica; and a crash of either node at each step of the handoff (CHUNKD_TEST_CRASH_AT), then recovery: exactly
// one writable owner, nothing acknowledged lost.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { haveTool, makeTempDir, mustRun, runTool, stablePort, startNode, type RunningNode } from '../helpers/node-process.ts';
import type { ToolFailure } from '../../src/core/run-tool.ts';
import { exportHash, ok, stopAndCheck } from '../helpers/stream-pipe.ts';
import { TestNbdClient } from '../helpers/nbd-client.ts';

const skip = !haveTool('qemu-io') || !haveTool('nbdcopy') || !haveTool('openssl');
const KiB = 1024;
let scratch: string;
let tlsDir: string;
const ports: Record<string, number> = {};
const nodes: Record<string, RunningNode> = {};

const address = (name: string): string => `127.0.0.1:${ports[name]}`;

async function start(name: string, crashAt?: string, extraArgs: string[] = []): Promise<RunningNode> {
  if (crashAt === undefined) delete process.env.CHUNKD_TEST_CRASH_AT;
  else process.env.CHUNKD_TEST_CRASH_AT = crashAt;
  try {
    nodes[name] = await startNode(path.join(scratch, name), ['--peer-listen', address(name), '--tls-dir', path.join(tlsDir, name), ...extraArgs]);
  } finally {
    delete process.env.CHUNKD_TEST_CRASH_AT;
  }
  return nodes[name]!;
}

/** Waits for a node killed by its crash hook; returns whether it died of SIGKILL. */
function died(node: RunningNode): Promise<boolean> {
  if (node.process.exitCode !== null || node.process.signalCode !== null) return Promise.resolve(node.process.signalCode === 'SIGKILL');
  return new Promise((resolve) => node.process.once('exit', (_code, signal) => resolve(signal === 'SIGKILL')));
}

interface Roles {
  replicaVolumes: Array<{ volume: string; owner: string; epoch: number }>;
  fenced: unknown[];
}

async function roles(node: RunningNode): Promise<Roles> {
  return JSON.parse(await ok(node, 'status', '--json')).replication;
}

/** Whether a client can write `volume` on `node` (qemu-io opens it read-write and writes a block). */
async function writable(node: RunningNode, volume: string): Promise<boolean> {
  return (await runTool('qemu-io', ['-f', 'raw', node.qemuUri(volume), '-c', 'write -P 0x7e 8M 4k'])).code === 0;
}

beforeAll(async () => {
  if (skip) return;
  scratch = makeTempDir('handoff');
  tlsDir = path.join(scratch, 'tls');
  await mustRun(process.execPath, [path.resolve(import.meta.dirname, '../../bin/chunkd.js'), 'tls', 'init', tlsDir, '--node', 'alpha', '--node', 'beta']);
  for (const name of ['alpha', 'beta']) ports[name] = await stablePort();
  await start('alpha');
  await start('beta');
});

afterAll(async () => {
  if (skip) return;
  for (const node of Object.values(nodes)) await stopAndCheck(node);
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('handoff under a writing client: every flushed write is on the new owner; the old owner refuses writes and keeps a replica', { skip }, async () => {
  const alpha = nodes.alpha!;
  const beta = nodes.beta!;
  await ok(alpha, 'volume', 'create', 'ho', '--size', '64MiB');
  // A client writing 64 KiB blocks, each to its own offset with its own pattern, 16 writes then a flush per
  // qemu-io run, until the handoff stops it. A block counts as acknowledged when its run's flush succeeded.
  let stop = false;
  const acknowledged: number[] = [];
  let refusals = '';
  const writer = (async () => {
    for (let batch = 0; !stop && batch < 48; batch++) {
      const blocks = Array.from({ length: 16 }, (_, i) => batch * 16 + i);
      const commands = blocks.flatMap((block) => ['-c', `write -P ${1 + (block % 250)} ${block * 64 * KiB} 64k`]);
      const run = await runTool('qemu-io', ['-f', 'raw', alpha.qemuUri('ho'), ...commands, '-c', 'flush']);
      const flushed = run.code === 0 && !/error|failed/i.test(run.stdout + run.stderr);
      if (flushed) acknowledged.push(...blocks);
      else {
        refusals += run.stdout + run.stderr;
        break;
      }
    }
  })();
  // Let the client write a while, then hand off while it writes.
  while (acknowledged.length < 64) await new Promise((resolve) => setTimeout(resolve, 50));
  const result = JSON.parse(await ok(alpha, 'volume', 'handoff', 'ho', '--to', address('beta'), '--json'));
  stop = true;
  await writer;
  console.log(`# handoff under load: ${result.increments} increment(s), writes paused ${result.pauseSeconds.toFixed(3)} s, final increment ${result.finalBytes} bytes, ${acknowledged.length} blocks acknowledged`);
  assert.equal(result.to, 'beta');
  assert.equal(result.epoch, 2);
  // Bounded loosely: about a second here under load; a loaded CI machine gets room.
  assert.ok(result.pauseSeconds < 10, `pause ${result.pauseSeconds} s`);
  // Every acknowledged block is on beta, which takes writes now.
  for (let i = 0; i < acknowledged.length; i += 64) {
    const chunk = acknowledged.slice(i, i + 64);
    await mustRun('qemu-io', ['-f', 'raw', '-r', beta.qemuUri('ho'), ...chunk.flatMap((block) => ['-c', `read -P ${1 + (block % 250)} ${block * 64 * KiB} 64k`])]);
  }
  assert.equal(await writable(beta, 'ho'), true);
  // alpha: a read-only replica of beta's, at epoch 2.
  assert.equal(await writable(alpha, 'ho'), false);
  assert.deepEqual((await roles(alpha)).replicaVolumes.map((r) => [r.volume, r.owner, r.epoch]), [['ho', 'beta', 2]]);
  assert.deepEqual((await roles(beta)).replicaVolumes, []);
  // beta replicates back to alpha (it was told alpha's address).
  await ok(beta, 'replica', 'sync', 'ho', '--peer', address('alpha'));
  const [link] = JSON.parse(await ok(beta, 'replica', 'status', 'ho', '--json')).replicas;
  assert.equal(await exportHash(alpha, 'ho'), await exportHash(beta, `ho@${link.lastReplicated.snapshot}`));
});

test('handoff under fio with verify=crc32c: fio reconnects to the new owner and verifies every write it saw acknowledged', { skip: skip || !haveTool('fio') }, async () => {
  const alpha = nodes.alpha!;
  const beta = nodes.beta!;
  await ok(alpha, 'volume', 'create', 'fio', '--size', '256MiB');
  const work = path.join(scratch, 'fio');
  fs.mkdirSync(work);
  // Sequential 64 KiB writes at QD32, paced so the handoff lands mid-run (16 s of writes: a handoff at load 15 took
  // 7 increments and fio at 24 MiB/s had finished before its freeze); fio saves how far it got when the
  // writes start failing (verify_state_save), and the verify pass reads back exactly that.
  const job = ['--name=handoff', '--ioengine=nbd', '--rw=write', '--bs=64k', '--iodepth=32', '--size=256M', '--verify=crc32c'];
  // When the old owner closes the connection between two of fio's writes, fio's nbd engine may poll the dead
  // handle without end ("nothing to poll for in state DEAD", one line each time: seen once in about 10 runs).
  // Its output is then cut at 4 MiB, which ends it (it saves its verify state as it exits), and the run counts
  // as the closed-between-writes case below.
  const writing = runTool('fio', [...job, `--uri=${alpha.uri('fio')}`, '--do_verify=0', '--rate=16m'], { cwd: work, outputBytesMax: 4 * 1024 * 1024 }).catch((error: ToolFailure) => {
    if (error.code !== 'ERR_CHILD_PROCESS_STDIO_MAXBUFFER' || !/nothing to poll for in state DEAD/.test(error.stderr)) throw error;
    return { code: 1, stdout: error.stdout, stderr: error.stderr.slice(-64 * 1024) };
  });
  await new Promise((resolve) => setTimeout(resolve, 3000));
  const result = JSON.parse(await ok(alpha, 'volume', 'handoff', 'fio', '--to', address('beta'), '--json'));
  const wrote = await writing;
  console.log(`# handoff under fio: ${result.increments} increment(s), writes paused ${result.pauseSeconds.toFixed(3)} s, final increment ${result.finalBytes} bytes`);
  assert.notEqual(wrote.code, 0, 'fio saw its writes refused by the old owner');
  // Writes refused at the freeze (the protocol's shutdown error) were never acknowledged, nor were those fio still
  // had queued when the old owner disconnected it (ENOTCONN: it counts them as issued in its verify state too).
  const refused = new Set([...(wrote.stdout + wrote.stderr).matchAll(/io_u error on file .*?: (?:Cannot send after transport endpoint shutdown|Operation not permitted|Transport endpoint is not connected): write offset=(\d+)/g)].map((m) => Number(m[1])));
  // fio paces its writes (--rate), so the freeze can find none in flight: then it sees no refusal, only the
  // connection closed (its next submit fails on the dead handle), and no write may then fail the verify pass.
  const closedBetweenWrites = /nothing to poll for in state DEAD/.test(wrote.stdout + wrote.stderr);
  assert.ok(refused.size > 0 || closedBetweenWrites, `fio reports the refused writes, or the connection closed between writes: ${(wrote.stdout + wrote.stderr).slice(-2000)}`);
  const verified = await runTool('fio', [...job, `--uri=${beta.uri('fio')}`, '--verify_only', '--verify_state_load=1'], { cwd: work });
  const bad = [...(verified.stdout + verified.stderr).matchAll(/bad magic header .*? at file .*? offset (\d+), length/g)].map((m) => Number(m[1]));
  // fio's saved state counts the refused writes as issued, so its verify pass reads those blocks too: each
  // block that fails must be one whose write was refused; every acknowledged one must verify.
  const unexpected = bad.filter((offset) => !refused.has(offset));
  assert.deepEqual(unexpected, [], `verify failures at offsets fio saw acknowledged: ${(verified.stdout + verified.stderr).slice(-3000)}`);
  assert.ok(bad.length <= refused.size);
  const readBytes = /READ: bw=.*?io=([\d.]+)MiB/.exec(verified.stdout);
  assert.ok(readBytes !== null && Number(readBytes[1]) > 32, `the verify pass read back what was written: ${verified.stdout.slice(-1500)}`);
});

// Each step, which node's hook kills it, and what recovery must give: the handoff rolled back (alpha still owns
// the volume) or completed (beta owns it); either way run again, the handoff then completes.
const steps = [
  { step: 'handoff:after-freeze', crashes: 'alpha' },
  { step: 'handoff:after-final', crashes: 'alpha' },
  { step: 'handoff:before-take', crashes: 'beta' },
  { step: 'handoff:after-take', crashes: 'beta' },
  { step: 'handoff:after-taken', crashes: 'alpha' },
] as const;

for (const { step, crashes } of steps) {
  test(`a crash of ${crashes} at ${step}: recovery leaves one writable owner and nothing acknowledged lost`, { skip }, async () => {
    const volume = `crash-${step.split(':')[1]}`;
    await ok(nodes.alpha!, 'volume', 'create', volume, '--size', '16MiB');
    await mustRun('qemu-io', ['-f', 'raw', nodes.alpha!.qemuUri(volume), '-c', 'write -P 0x5c 0 2M', '-c', 'flush']);
    // The crashing node restarts with its hook armed; the other stays up.
    await nodes[crashes]!.stop();
    const armed = await start(crashes, step);
    const attempt = spawn(process.execPath, [path.resolve(import.meta.dirname, '../../bin/chunkd.js'), 'volume', 'handoff', volume, '--to', address('beta'), '--api', nodes.alpha!.apiSocket], { stdio: 'ignore' });
    const attempted = new Promise<number | null>((resolve) => attempt.on('close', resolve));
    assert.equal(await died(armed), true, `${crashes} was killed at ${step}`);
    assert.notEqual(await attempted, 0, 'the interrupted handoff reports a failure');
    await start(crashes);
    // Give alpha's start-up resolution (when alpha crashed) its turn; then the state must be one owner.
    const alphaReplica = (await roles(nodes.alpha!)).replicaVolumes.some((r) => r.volume === volume);
    const betaReplica = (await roles(nodes.beta!)).replicaVolumes.some((r) => r.volume === volume);
    const alphaWrites = await writable(nodes.alpha!, volume);
    const betaWrites = await writable(nodes.beta!, volume);
    const logs = `\n--- alpha\n${nodes.alpha!.stderr()}\n--- beta\n${nodes.beta!.stderr()}`;
    assert.ok(!(alphaWrites && betaWrites), `${step}: never two writable owners${logs}`);
    if (step === 'handoff:after-taken') {
      // beta took it and alpha learned so at start: alpha is its replica.
      assert.deepEqual([alphaReplica, alphaWrites, betaWrites], [true, false, true], `${step}: completed${logs}`);
    } else if (crashes === 'alpha') {
      // beta never took it: alpha rolled the handoff back at start and takes writes again.
      assert.deepEqual([alphaWrites, betaWrites, betaReplica], [true, false, true], `${step}: rolled back${logs}`);
    } else {
      // alpha is frozen until the handoff is run again; beta took it (after-take) or not (before-take).
      assert.equal(alphaWrites, false, `${step}: alpha frozen${logs}`);
      assert.equal(betaWrites, step === 'handoff:after-take', `${step}: beta owns it only if it recorded so${logs}`);
    }
    // Run again: it completes (or learns it had).
    if (!alphaReplica) await ok(nodes.alpha!, 'volume', 'handoff', volume, '--to', address('beta'));
    assert.equal(await writable(nodes.alpha!, volume), false);
    assert.equal(await writable(nodes.beta!, volume), true);
    await mustRun('qemu-io', ['-f', 'raw', '-r', nodes.beta!.qemuUri(volume), '-c', 'read -P 0x5c 0 2M']);
  });
}

test('handoff ends the clients of NBD threads too: a TCP connection served by a protocol thread is disconnected', { skip }, async () => {
  // alpha again, with two NBD threads: its TCP connections are theirs (the unix socket stays the main thread's).
  await nodes.alpha!.stop();
  const alpha = await start('alpha', undefined, ['--nbd-threads', '2']);
  await ok(alpha, 'volume', 'create', 'threaded', '--size', '16MiB');
  const clients = await Promise.all([TestNbdClient.connect(alpha.tcpPort, 'threaded'), TestNbdClient.connect(alpha.tcpPort, 'threaded'), TestNbdClient.connect(alpha.nbdSocket, 'threaded')]);
  for (const [i, client] of clients.entries()) await client.write(i * 4096, Buffer.alloc(4096, 0x31 + i));
  await clients[0]!.flush();
  const closed = clients.map((client) => new Promise<void>((resolve) => client.socket.once('close', () => resolve())));
  const result = JSON.parse(await ok(alpha, 'volume', 'handoff', 'threaded', '--to', address('beta'), '--json'));
  assert.equal(result.disconnected, 3, 'two connections on NBD threads and one on the main thread');
  await Promise.all(closed);
  await mustRun('qemu-io', ['-f', 'raw', '-r', nodes.beta!.qemuUri('threaded'), '-c', 'read -P 0x31 0 4k', '-c', 'read -P 0x32 4k 4k', '-c', 'read -P 0x33 8k 4k']);
});
