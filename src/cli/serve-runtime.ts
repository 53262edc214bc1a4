// serve's options as given (command line, else environment), and the V8 flags a node starts with. bin/chunkd.js
// asks for the flags before the node's modules load, and starts itself again with them (process.execve): V8 sizes
// its heap once, at the process's start. So this module stays light: no store, no node.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ChunkdError } from '../core/errors.ts';
import { commands, environmentName, type OptionSpec } from './help.ts';

const serveOptions = commands.serve.options;

/**
 * The values of serve's options: the command line's, else the environment's (CHUNKD_POOL for --pool, ...; an
 * empty variable is unset); and which came from the environment.
 */
export function serveValues(argv: string[], env: NodeJS.ProcessEnv): { values: ServeValues; fromEnvironment: Set<string> } {
  const { values } = parseArgs({ args: argv, options: serveOptions });
  const merged: Record<string, string | boolean | string[] | undefined> = { ...values };
  const fromEnvironment = new Set<string>();
  for (const [name, option] of Object.entries(serveOptions) as Array<[string, OptionSpec]>) {
    const text = env[environmentName(name)];
    if (merged[name] !== undefined || text === undefined || text === '') continue;
    fromEnvironment.add(name);
    if (option.type === 'boolean') {
      if (!/^(1|true|yes|on|0|false|no|off)$/i.test(text)) throw ChunkdError.invalid(`invalid ${environmentName(name)}="${text}": 1, true, yes or on, or 0, false, no or off`);
      merged[name] = /^(1|true|yes|on)$/i.test(text);
    } else merged[name] = option.multiple === true ? text.split(',') : text;
  }
  return { values: merged as ServeValues, fromEnvironment };
}

export type ServeValues = ReturnType<typeof parseArgs<{ options: typeof serveOptions }>>['values'];

/** A node's semi-spaces, MiB (see serveV8Flags). */
export const youngSemiSpaceMiB = 8;

/**
 * The old generation's growing factor of a node on paged metadata, in percent above what is live after a full
 * collection (see serveV8Flags).
 */
export const oldGrowingPercent = 150;

/**
 * The V8 flags `chunkd serve` runs with, those in `given` (the process's own flags and NODE_OPTIONS, as one
 * string) left out: the operator's choice stands.
 * - `--max-semi-space-size=8`: a young generation of 16 MiB, where Node 24 sizes it from the heap limit (128 MiB
 *   on a machine of 23 GiB), and a node that writes keeps it full (BENCHMARKS.md, issue 15, "The young generation
 *   bounded, and what the RSS is").
 * - `--heap-growing-percent=150`, on a pool of paged metadata only (its marker says so, or there is none yet and
 *   --metadata paged makes one): V8 starts its next full collection once the old generation has grown to this
 *   factor (2.5) times what the last one left live, where it would choose up to 4 times (with a heap limit of 2 GiB
 *   and more; 1.3 to 2 below). What is live on paged metadata is small (the cache's decoded nodes, the dirty ones,
 *   some 25 MiB of the node's own), and the RSS follows the old generation's peak, which V8 keeps resident after
 *   collecting it; the buffers whose memory malloc holds are freed with their objects, by the same collections.
 *   Measured (BENCHMARKS.md, issue 15, "The old generation's growth bounded"): a factor of 1.3 to 1.4 (as
 *   `--max-old-space-size=256` to `576` set) cut the RSS further but cost 30 to 40 % more CPU per write at 4 GiB;
 *   2.5 about none. A factor, not a limit: nothing here can make V8 give up with an out-of-memory error (what is
 *   live is not bounded by the cache everywhere: a diff's extents, the dirty nodes of checkpoints that fall
 *   behind the writes on a loaded machine, measured at 200 MiB with a 16 MiB cache). A pool on in-memory metadata
 *   holds its whole catalog in the heap: more full collections of a large heap would cost much, so it keeps V8's
 *   default.
 * Node refuses V8's `--heap-growing-percent` in NODE_OPTIONS: the operator gives it on node's command line
 * (`node --heap-growing-percent=0 bin/chunkd.js serve`: 0 is V8's own choice), and it stands.
 */
export function serveV8Flags(argv: string[], env: NodeJS.ProcessEnv, given: string): string[] {
  const flags: string[] = [];
  const isGiven = (name: string): boolean => new RegExp(`(^|\\s)--${name.replaceAll('-', '[-_]')}\\b`).test(given);
  if (!isGiven('max-semi-space-size')) flags.push(`--max-semi-space-size=${youngSemiSpaceMiB}`);
  if (!isGiven('heap-growing-percent') && pagedPool(argv, env)) flags.push(`--heap-growing-percent=${oldGrowingPercent}`);
  return flags;
}

/** Whether the node these arguments start opens (or makes) a pool of paged metadata; false where they cannot be read. */
function pagedPool(argv: string[], env: NodeJS.ProcessEnv): boolean {
  try {
    const { values } = serveValues(argv, env);
    const marker = path.join(values.pool ?? serveOptions.pool.fallback, 'chunkd-pool.json');
    return fs.existsSync(marker) ? (JSON.parse(fs.readFileSync(marker, 'utf8')) as { metadata?: unknown }).metadata === 'paged' : values.metadata === 'paged';
  } catch {
    return false;
  }
}
