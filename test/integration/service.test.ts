// chunkd as a systemd service (issue 18): the unit in packaging/ passes systemd-analyze verify; the node says
// READY=1 to the service manager's NOTIFY_SOCKET only once it serves, and STOPPING=1 when it stops (received
// here on a real unix datagram socket, as systemd would, from the real systemd-notify); under journald its log
// lines carry no timestamp of their own.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, test } from 'vitest';
import { chunkdBin, makeTempDir, mustRun, nodeBinary, repoRoot, runTool, startNode } from '../helpers/node-process.ts';

const work = makeTempDir('service');
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

test('packaging/chunkd.service passes systemd-analyze verify', async () => {
  // verify insists that ExecStart's program exists: here it is this checkout's chunkd, not /usr/local/bin's.
  const unit = fs.readFileSync(path.join(repoRoot, 'packaging', 'chunkd.service'), 'utf8');
  assert.match(unit, /^Type=notify$/m);
  assert.match(unit, /^ExecStart=\/usr\/local\/bin\/chunkd serve /m);
  assert.doesNotMatch(unit, /^(ProtectSystem|PrivateTmp|PrivateDevices|ProtectHome|DevicePolicy|DeviceAllow)=/m, 'an option that would hide the node\'s mounts or devices');
  const copy = path.join(work, 'chunkd.service');
  fs.writeFileSync(copy, unit.replace('/usr/local/bin/chunkd', chunkdBin));
  const output = await mustRun('systemd-analyze', ['verify', copy]);
  assert.equal(output.trim(), '');
});

/** A unix datagram socket like systemd's notify socket (Node.js has none: python3 listens), printing what arrives. */
function notifySocket(socketPath: string): { messages: string[]; stop: () => void; listening: Promise<void> } {
  const script = [
    'import socket, sys',
    's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
    `s.bind(${JSON.stringify(socketPath)})`,
    'print("listening", flush=True)',
    'while True:',
    '    print(s.recv(4096).decode().replace("\\n", " "), flush=True)',
  ].join('\n');
  const child = spawn('python3', ['-c', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const messages: string[] = [];
  let buffered = '';
  let heard: () => void;
  const listening = new Promise<void>((resolve) => (heard = resolve));
  child.stdout.on('data', (chunk: Buffer) => {
    buffered += chunk.toString();
    const lines = buffered.split('\n');
    buffered = lines.pop()!;
    // systemd-notify follows each message with BARRIER=1 (and a pipe it waits on until systemd has read it).
    for (const line of lines) line === 'listening' ? heard() : line.trim() !== 'BARRIER=1' && messages.push(line.trim());
  });
  return { messages, stop: () => void child.kill(), listening };
}

async function until(check: () => boolean, what: string): Promise<void> {
  for (let waited = 0; !check(); waited += 50) {
    if (waited > 20_000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test('serve tells the service manager READY=1 once it serves and STOPPING=1 when it stops; no timestamps under journald', async () => {
  const socketPath = path.join(work, 'notify.sock');
  const listener = notifySocket(socketPath);
  try {
    await listener.listening;
    const logFile = path.join(work, 'stderr.log');
    const stderr = fs.openSync(logFile, 'w');
    const stat = fs.fstatSync(stderr);
    const pool = path.join(work, 'pool');
    const child = spawn(nodeBinary, [chunkdBin, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--api', path.join(pool, 'api.sock'), '--default-volume', 'vol:4MiB'], {
      stdio: ['ignore', 'pipe', stderr],
      env: { ...process.env, NOTIFY_SOCKET: socketPath, JOURNAL_STREAM: `${stat.dev}:${stat.ino}` },
    });
    fs.closeSync(stderr);
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
    afterAll(() => void child.kill('SIGKILL'));
    let stdout = '';
    child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    // systemd-notify --pid also names the node's process as the service's main one (the launcher may be another).
    await until(() => listener.messages.length > 0, 'READY=1');
    // READY=1 comes after the node serves: its ready line is out.
    assert.match(stdout, /^chunkd ready: /);
    assert.deepEqual(listener.messages, [`MAINPID=${child.pid} READY=1`]);
    child.kill('SIGTERM');
    assert.equal(await exited, 0);
    assert.deepEqual(listener.messages, [`MAINPID=${child.pid} READY=1`, `MAINPID=${child.pid} STOPPING=1`]);
    const lines = fs.readFileSync(logFile, 'utf8').trim().split('\n');
    assert.ok(lines.includes('chunkd: created volume vol'), lines.join('\n'));
    assert.ok(lines.every((line) => line.startsWith('chunkd: ')), `a timestamp under journald:\n${lines.join('\n')}`);
  } finally {
    listener.stop();
  }
});

test('serve --log-format json --log-level warn: one JSON object per line, nothing below warn; a bad level is a usage error', async () => {
  const node = await startNode(path.join(work, 'pool-log'), ['--log-format', 'json', '--default-volume', 'vol:4MiB', '--verify-reads', 'off'], {
    launcher: { command: nodeBinary, prefix: [chunkdBin], env: { ...process.env, CHUNKD_LOG_LEVEL: 'warn' } },
  });
  assert.equal(await node.stop(), 0);
  const lines = node.stderr().trim().split('\n').map((line) => JSON.parse(line) as { time: string; level: string; msg: string });
  // --verify-reads off is a warning; "created volume vol", "stopping" and "stopped" are info, so left out.
  assert.deepEqual(lines.map(({ level, msg }) => ({ level, msg })), [{ level: 'warn', msg: '--verify-reads off: reads are NOT checked against their checksums (for measuring what checking costs only)' }]);
  assert.ok(!Number.isNaN(Date.parse(lines[0]!.time)));
  const bad = await runTool(nodeBinary, [chunkdBin, 'serve', '--pool', path.join(work, 'pool-bad'), '--log-level', 'loud']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /invalid --log-level "loud": debug, info, warn, error/);
});
