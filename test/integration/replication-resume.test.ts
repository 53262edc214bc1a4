// kill -9 of the sender, then of the receiving node, in the middle of a replication stream between two nodes: the
// receive resumes from its token and completes, and what was made durable before is not sent again.
// (It once hung, in the harness: a killed sender's stdout, paused at the pipe's limit with bytes still in it,
// never ended, so its exit never came. The pipe now drains a gone sender; test/helpers/stream-pipe.ts.)
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, test } from 'vitest';
import { haveTool, makeTempDir, mustRun, runTool, startNode, type RunningNode } from '../helpers/node-process.ts';
import { Pipe, cliProcess, exportHash, ok, stopAndCheck, transfer } from '../helpers/stream-pipe.ts';

const MiB = 1024 * 1024;
let scratch: string;
let source: RunningNode;
let target: RunningNode;

beforeAll(async () => {
  scratch = makeTempDir('replication-resume');
  source = await startNode(path.join(scratch, 'a'));
  target = await startNode(path.join(scratch, 'b'));
});

afterAll(async () => {
  await stopAndCheck(source);
  await stopAndCheck(target);
  fs.rmSync(scratch, { recursive: true, force: true });
});


test('kill -9 of the sender, then of the receiving node, mid-stream: the receive resumes with its token, nothing arrived is sent again', { skip: !haveTool('nbdcopy'), timeout: 120_000 }, async () => {
  await ok(source, 'volume', 'create', 'big', '--size', '128MiB');
  await mustRun('qemu-io', ['-f', 'raw', source.qemuUri('big'), '-c', 'write -P 0x44 0 100M']);
  await ok(source, 'snapshot', 'create', 'big', 'b1');
  const fullBytes = 100 * MiB;
  const statePath = path.join(target.pool, 'receive', 'big.json');

  // 1. The sender is killed after 40 MiB; the pipe closes; the receive keeps what arrived.
  let send = cliProcess(source, ['send', 'big@b1']);
  let receive = cliProcess(target, ['receive', 'big']);
  let pipe = new Pipe(send.child, receive.child, 40 * MiB);
  await pipe.reached();
  send.child.kill('SIGKILL');
  await send.exit;
  pipe.endInput();
  const first = await receive.exit;
  assert.equal(first.code, 1);
  assert.match(first.stderr, /interrupted: the stream ended after \d+ bytes, before its end record/);
  const token1 = (await ok(target, 'receive', '--resume-token', 'big')).trim();
  const offset1 = JSON.parse(fs.readFileSync(statePath, 'utf8')).offsetBytes as number;
  assert.ok(offset1 > 32 * MiB && offset1 <= 40 * MiB, `kept ${offset1} bytes`);
  // Meanwhile clients cannot open the volume.
  assert.notEqual((await runTool('nbdinfo', [target.uri('big')])).code, 0);

  // 2. Resumed; the receiving node is killed once it has made more durable, while the pipe holds the rest.
  send = cliProcess(source, ['send', '--resume', token1]);
  receive = cliProcess(target, ['receive', 'big']);
  pipe = new Pipe(send.child, receive.child, 36 * MiB);
  await pipe.reached();
  const session2Bytes = pipe.bytes;
  for (const deadline = Date.now() + 60_000; Date.now() < deadline && (JSON.parse(fs.readFileSync(statePath, 'utf8')).offsetBytes as number) <= offset1;) await new Promise((r) => setTimeout(r, 50));
  await target.kill();
  send.child.kill('SIGKILL');
  receive.child.kill('SIGKILL');
  await Promise.all([send.exit, receive.exit]);
  target = await startNode(target.pool);
  const token2 = (await ok(target, 'receive', '--resume-token', 'big')).trim();
  const offset2 = JSON.parse(fs.readFileSync(statePath, 'utf8')).offsetBytes as number;
  assert.ok(offset2 > offset1, `the second part made ${offset2} durable, the first ${offset1}`);

  // 3. Resumed again, to the end.
  const last = await transfer(source, target, ['--resume', token2], ['big']);
  assert.equal(last.send.code, 0, last.send.stderr);
  assert.equal(last.receive.code, 0, last.receive.stderr);
  assert.match(last.receive.stdout, /received big@b1 .*resumed at volume byte/);
  // The last part carried only what was not durable yet: from offset2 on.
  assert.ok(last.bytes < fullBytes - offset2 + 64 * 1024 && last.bytes > fullBytes - offset2, `last part ${last.bytes} bytes from offset ${offset2}`);
  console.log(`# resume: full stream ~${fullBytes} bytes; part 1 ${40 * MiB} forwarded (${offset1} kept), part 2 ${session2Bytes} forwarded (${offset2} kept), part 3 ${last.bytes}`);
  assert.equal(fs.existsSync(statePath), false);
  assert.equal(await exportHash(target, 'big@b1'), await exportHash(source, 'big@b1'));
  // The volume is a normal volume again.
  await mustRun('qemu-io', ['-f', 'raw', target.qemuUri('big'), '-c', 'write -P 1 0 4k']);
});

