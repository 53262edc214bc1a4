// Helpers for replication tests: the CLI as a child process, a pipe the test holds between `chunkd send` and
// `chunkd receive` (counting and cutting the stream), and a hash of an export's content read by nbdcopy.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chunkdBin, nodeBinary, type RunningNode } from './node-process.ts';

/** sha256 of an export's whole content, read by nbdcopy. */
export async function exportHash(node: RunningNode, exportName: string): Promise<string> {
  const child = spawn('nbdcopy', [node.uri(exportName), '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const hash = createHash('sha256');
  child.stdout.on('data', (chunk: Buffer) => hash.update(chunk));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  assert.equal(code, 0, `nbdcopy ${exportName}`);
  return hash.digest('hex');
}

/** Stops a node (it must exit 0) and checks its pool with fsck (it must be clean): the end of every replication test. */
export async function stopAndCheck(node: RunningNode): Promise<void> {
  assert.equal(await node.stop(), 0, node.stderr());
  const fsck = await node.cli('fsck', '--pool', node.pool);
  assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
}

/** Runs the chunkd CLI against `node` and insists on exit 0; returns its stdout. */
export async function ok(node: RunningNode, ...args: string[]): Promise<string> {
  const result = await node.cli(...args);
  assert.equal(result.code, 0, `chunkd ${args.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

/** Sends `sendArgs` from `source` into `receiveArgs` on `target` through a Pipe; returns both ends' results. */
export async function transfer(source: RunningNode, target: RunningNode, sendArgs: string[], receiveArgs: string[]): Promise<{ bytes: number; send: { code: number | null; stderr: string }; receive: { code: number | null; stderr: string; stdout: string } }> {
  const send = cliProcess(source, ['send', ...sendArgs]);
  const receive = cliProcess(target, ['receive', ...receiveArgs]);
  const pipe = new Pipe(send.child, receive.child);
  const [sent, received] = await Promise.all([send.exit, receive.exit]);
  return { bytes: pipe.bytes, send: sent, receive: received };
}

export function cliProcess(node: RunningNode, args: string[]): { child: ChildProcess; exit: Promise<{ code: number | null; stderr: string; stdout: string }> } {
  const child = spawn(nodeBinary, [chunkdBin, ...args, '--api', node.apiSocket], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exit = new Promise<{ code: number | null; stderr: string; stdout: string }>((resolve) => child.on('close', (code) => resolve({ code, stderr, stdout })));
  child.stdout!.on('data', (chunk: Buffer) => {
    // A sender's stdout is the stream, which the caller pipes: every other command's is kept.
    if (args[0] !== 'send') stdout += chunk.toString();
  });
  return { child, exit };
}

/**
 * A pipe the test holds between `chunkd send` and `chunkd receive`: forwards the sender's bytes (with
 * backpressure), counts them, and stops forwarding once `limitBytes` went through.
 */
export class Pipe {
  bytes = 0;
  limitBytes: number;
  readonly #sender: ChildProcess;
  readonly #receiver: ChildProcess;
  #reached: (() => void) | null = null;
  #senderGone = false;

  constructor(sender: ChildProcess, receiver: ChildProcess, limitBytes = Infinity) {
    this.#sender = sender;
    this.#receiver = receiver;
    this.limitBytes = limitBytes;
    const input = sender.stdout!;
    const output = receiver.stdin!;
    output.on('error', () => {});
    // A receiver that exits closes the pipe: the sender then meets EPIPE, as in a shell.
    receiver.on('exit', () => input.destroy());
    // A sender that is gone (killed at the limit) may have left bytes in the paused pipe: they are dropped, so
    // that its stdout ends and its 'close' comes (a paused stream with data never ends).
    sender.on('exit', () => {
      this.#senderGone = true;
      input.resume();
    });
    input.on('data', (chunk: Buffer) => {
      const room = this.limitBytes - this.bytes;
      const part = chunk.length <= room ? chunk : chunk.subarray(0, Math.max(0, room));
      this.bytes += part.length;
      if (part.length > 0 && !output.write(part)) {
        input.pause();
        output.once('drain', () => (this.bytes < this.limitBytes || this.#senderGone) && input.resume());
      }
      if (this.bytes >= this.limitBytes && !this.#senderGone) {
        input.pause();
        this.#reached?.();
      }
    });
    input.on('end', () => output.end());
  }

  /** Resolves once `limitBytes` went through. */
  reached(): Promise<void> {
    if (this.bytes >= this.limitBytes) return Promise.resolve();
    return new Promise((resolve) => (this.#reached = resolve));
  }

  /** Closes the receiver's input, as a pipe does when the sender dies. */
  endInput(): void {
    this.#receiver.stdin!.end();
  }

  get sender(): ChildProcess {
    return this.#sender;
  }
}

