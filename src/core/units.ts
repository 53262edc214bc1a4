// Sizes on the command line take binary units: 512, 4KiB, 64MiB, 10GiB, 1TiB (K/M/G/T mean the same).
import { ChunkdError } from './errors.ts';

const multipliers: Record<string, number> = {
  '': 1, B: 1,
  K: 2 ** 10, KB: 2 ** 10, KIB: 2 ** 10,
  M: 2 ** 20, MB: 2 ** 20, MIB: 2 ** 20,
  G: 2 ** 30, GB: 2 ** 30, GIB: 2 ** 30,
  T: 2 ** 40, TB: 2 ** 40, TIB: 2 ** 40,
  P: 2 ** 50, PB: 2 ** 50, PIB: 2 ** 50,
};

/** Parses a size such as "10GiB" into bytes; refuses fractions of a byte and sizes past 2^53. */
export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$/.exec(text);
  const multiplier = match ? multipliers[match[2]!.toUpperCase()] : undefined;
  if (!match || multiplier === undefined) {
    throw ChunkdError.invalid(`invalid size "${text}": use a number with an optional unit (512, 4KiB, 64MiB, 10GiB, 1TiB)`);
  }
  const bytes = Number(match[1]) * multiplier;
  if (!Number.isSafeInteger(bytes)) throw ChunkdError.invalid(`invalid size "${text}": not a whole number of bytes below 2^53`);
  return bytes;
}

/** Formats bytes with the largest binary unit that keeps the number at or above 1. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const text = Number.isInteger(value) ? String(value) : value.toFixed(value < 10 ? 2 : 1);
  return `${text} ${units[unit]}`;
}

const durationUnits: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses a duration such as "30s", "500ms", "5m" or "1h" into milliseconds (a bare number is seconds). */
export function parseDuration(text: string, option = 'duration'): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(text);
  if (!match) throw ChunkdError.invalid(`invalid ${option} "${text}": use a number with a unit (500ms, 30s, 5m, 1h)`);
  const ms = Math.round(Number(match[1]) * durationUnits[match[2] ?? 's']!);
  if (!Number.isSafeInteger(ms) || ms <= 0) throw ChunkdError.invalid(`invalid ${option} "${text}": more than zero, please`);
  return ms;
}

/** Parses a rate such as "200MiB/s" (or a bare size, per second) into bytes per second. */
export function parseRate(text: string, option = 'rate'): number {
  const bytes = parseSize(text.replace(/\/s\s*$/, ''));
  if (bytes <= 0) throw ChunkdError.invalid(`invalid ${option} "${text}": more than zero bytes per second, e.g. 200MiB/s`);
  return bytes;
}

/** Formats milliseconds as people read them: 750ms, 30s, 5m, 1h30m. */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${Number((ms / 1000).toFixed(ms < 10_000 ? 1 : 0))}s`;
  const minutes = Math.round(ms / 60_000);
  return minutes < 60 ? `${minutes}m` : `${Math.floor(minutes / 60)}h${minutes % 60 === 0 ? '' : `${minutes % 60}m`}`;
}
