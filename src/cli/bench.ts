// `chunkd bench`: the benchmark suite is a development tool in bench/ (with its own dev dependencies), not part
// of the product, so the product never imports it: this runs it as its own process, as `npm run bench` does.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { ChunkdError } from '../core/errors.ts';
import { ownModule } from '../core/source-files.ts';

// bench/ is not compiled into a package, so this is the checkout's suite or nothing.
const suitePath = ownModule('bench', 'suite');

/** Prints the benchmark suite's own list of options (it keeps them beside its parser), or where to find it. */
export async function benchHelp(): Promise<number> {
  if (!fs.existsSync(suitePath)) {
    process.stdout.write(`(the benchmark suite is not in this installation; in a checkout: npm run bench -- --help)\n`);
    return 0;
  }
  process.stdout.write('\n');
  return benchCommand(['--help']);
}

/** Runs bench/suite.ts with `argv` and returns its exit code. */
export async function benchCommand(argv: string[]): Promise<number> {
  if (!fs.existsSync(suitePath)) throw ChunkdError.invalid(`the benchmark suite is not in this installation (no ${suitePath}); run it from a checkout: npm run bench`);
  const child = spawn(process.execPath, [suitePath, ...argv], { stdio: 'inherit' });
  // The suite cleans up on SIGINT and SIGTERM (bench/processes.ts). A terminal's ^C reaches it directly, and a
  // second SIGINT would cut its cleanup short, so this process only outlives it; a SIGTERM sent to this process
  // alone is passed on.
  const ignore = (): void => {};
  const passOn = (): void => void child.kill('SIGTERM');
  process.on('SIGINT', ignore);
  process.on('SIGTERM', passOn);
  try {
    return await new Promise<number>((resolve, reject) => {
      child.once('error', (error) => reject(ChunkdError.io(`the benchmark suite could not start: ${error.message}`, error)));
      child.once('exit', (code, signal) => resolve(code ?? 128 + (signal === null ? 0 : os.constants.signals[signal])));
    });
  } finally {
    process.off('SIGINT', ignore);
    process.off('SIGTERM', passOn);
  }
}
