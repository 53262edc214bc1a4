// serve's options as given (command line, else environment), and the V8 flags a node starts with. bin/chunkd.js
// asks for the flags before the node's modules load, and starts itself again with them (process.execve): V8 sizes
// its heap once, at the process's start. So this module stays light: no store, no node.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ChunkdError } from '../core/errors.ts';
import { parseSize } from '../core/units.ts';
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
 * The old generation's limit, MiB, of a node on paged metadata with a page cache of `cacheBytes`: what is live
 * there is bounded by the cache (the decoded nodes it counts, the dirty nodes of two checkpoints' intervals: at
 * most about three times the cache, paged-metadata.md "The metadata's memory"), plus a base of about 25 MiB; the
 * limit leaves four times the cache and 512 MiB above that, so that what the cache does not bound (a diff's
 * extents, requests in flight) has room, and reaching it is never the point.
 */
export function oldSpaceMiB(cacheBytes: number): number {
  return 512 + 4 * Math.ceil(cacheBytes / 2 ** 20);
}

/**
 * The V8 flags `chunkd serve` runs with, those in `given` (the process's own flags and NODE_OPTIONS, as one
 * string) left out: the operator's choice stands.
 * - `--max-semi-space-size=8`: a young generation of 16 MiB, where Node 24 sizes it from the heap limit (128 MiB
 *   on a machine of 23 GiB), and a node that writes keeps it full (BENCHMARKS.md, issue 15, "The young generation
 *   bounded, and what the RSS is").
 * - `--max-old-space-size` from the metadata cache (oldSpaceMiB), on a pool of paged metadata only (its marker
 *   says so, or there is none yet and --metadata paged makes one): V8 lets its old generation grow past what is
 *   live by a factor it derives from this limit (up to 4 with the default of several GiB, 1.3 to 2 below 2 GiB),
 *   so a lower limit keeps the collector's slack, and the RSS, near what is live. A pool on in-memory metadata
 *   holds all of it in the heap, in proportion to the data: it keeps V8's default.
 * A command line or pool that cannot be read gives no old-space flag (serve then says what is wrong).
 */
export function serveV8Flags(argv: string[], env: NodeJS.ProcessEnv, given: string): string[] {
  const flags: string[] = [];
  const isGiven = (name: string): boolean => new RegExp(`(^|\\s)--${name.replaceAll('-', '[-_]')}\\b`).test(given);
  if (!isGiven('max-semi-space-size')) flags.push(`--max-semi-space-size=${youngSemiSpaceMiB}`);
  if (!isGiven('max-old-space-size') && !isGiven('max-heap-size')) {
    const cacheBytes = pagedCacheBytes(argv, env);
    if (cacheBytes !== null) flags.push(`--max-old-space-size=${oldSpaceMiB(cacheBytes)}`);
  }
  return flags;
}

/** The metadata cache of the node these arguments start when its pool is (or is made) paged, else null. */
function pagedCacheBytes(argv: string[], env: NodeJS.ProcessEnv): number | null {
  try {
    const { values } = serveValues(argv, env);
    const marker = path.join(values.pool ?? serveOptions.pool.fallback, 'chunkd-pool.json');
    const paged = fs.existsSync(marker) ? (JSON.parse(fs.readFileSync(marker, 'utf8')) as { metadata?: unknown }).metadata === 'paged' : values.metadata === 'paged';
    return paged ? parseSize(values['metadata-cache'] ?? serveOptions['metadata-cache'].fallback) : null;
  } catch {
    return null;
  }
}
