// Running an external program to completion and collecting its output: the node's attach and detach (losetup,
// blkid, mount), the benchmarks (fio, qemu-img) and the tests (real NBD clients, the chunkd CLI) all do it here.
// A non-zero exit is an answer, not an error; the caller decides what it means.
import { execFile } from 'node:child_process';

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface ToolOptions {
  /** Killed (SIGTERM) past this; default 120 s. */
  timeoutMs?: number;
  /** Output past this on stdout or stderr kills it; default 64 MiB. */
  outputBytesMax?: number;
  cwd?: string;
  /** Default: this process's environment. */
  env?: NodeJS.ProcessEnv;
  /** Written to its stdin, which is then closed. */
  input?: string;
}

/** What runTool rejects with: the program could not run (`code` ENOENT...), was killed, or said too much; with its output so far. */
export type ToolFailure = NodeJS.ErrnoException & { stdout: string; stderr: string };

/** Runs a program to completion: its exit code and output; rejects (ToolFailure) only when it did not exit by itself. */
export function runTool(command: string, args: string[], options: ToolOptions = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      command,
      args,
      { maxBuffer: options.outputBytesMax ?? 64 * 1024 * 1024, timeout: options.timeoutMs ?? 120_000, cwd: options.cwd, env: options.env ?? process.env },
      (error, stdout, stderr) => {
        if (error !== null && typeof error.code !== 'number') return reject(Object.assign(error, { stdout: stdout.toString(), stderr: stderr.toString() }));
        resolve({ code: error === null ? 0 : (error.code as number), stdout: stdout.toString(), stderr: stderr.toString() });
      },
    );
    if (options.input !== undefined) child.stdin!.end(options.input);
  });
}
