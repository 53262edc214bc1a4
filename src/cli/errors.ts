// How the command line fails: exit 2 for a usage error (the command line itself is wrong: an unknown command or
// option, a missing or malformed argument), exit 1 for an operational one (it ran and failed: no node answers,
// the node refused, the disk failed). One line on stderr; under --json, one JSON object on stderr with a stable
// code: the ChunkdError code (the same the API answers with), EUSAGE for a malformed command line, or a system
// error's own code (ECONNRESET, ...).
import { ChunkdError, isSystemError } from '../core/errors.ts';

/** A command line that cannot run as written; `code` is EUSAGE, or the code of the check that refused an argument (EINVAL, EBADNAME). */
export class UsageError extends Error {
  readonly code: string;

  constructor(message: string, code = 'EUSAGE') {
    super(message);
    this.name = 'UsageError';
    this.code = code;
  }
}

/** Runs the parsing of a command's arguments: what refuses an argument there (a bad name, size, address) is a usage error. */
export function parsing<T>(parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    throw asUsageError(error);
  }
}

/** The usage error `error` stands for when it came from parsing arguments; anything else unchanged. */
export function asUsageError(error: unknown): unknown {
  if (error instanceof ChunkdError && (error.code === 'EINVAL' || error.code === 'EBADNAME')) return new UsageError(error.message, error.code);
  return parseArgsError(error) ?? error;
}

/** parseArgs's own errors (an unknown option, a missing value) are usage errors wherever they come from. */
function parseArgsError(error: unknown): UsageError | null {
  const code = (error as NodeJS.ErrnoException | null)?.code;
  if (typeof code !== 'string' || !code.startsWith('ERR_PARSE_ARGS')) return null;
  return new UsageError(`${(error as Error).message.replace(/\. To specify a positional argument.*$/s, '')} (see --help)`);
}

/** Whether argv asks for JSON (--json before any --): errors then come out as JSON too, even when parsing failed. */
export function wantsJson(argv: readonly string[]): boolean {
  const end = argv.indexOf('--');
  return (end < 0 ? argv : argv.slice(0, end)).includes('--json');
}

/** Writes one error line (text, or JSON under `json`) to stderr. */
export function printError(code: string, message: string, json: boolean): void {
  process.stderr.write(json ? `${JSON.stringify({ error: { code, message } })}\n` : `chunkd: ${message}\n`);
}

/**
 * Reports a failure of the command line and returns its exit code (2 usage, 1 operational); anything that is not
 * one of our errors or a system error is a bug, rethrown.
 */
export function reportError(error: unknown, json: boolean): number {
  const usage = error instanceof UsageError ? error : parseArgsError(error);
  if (usage !== null) {
    printError(usage.code, usage.message, json);
    return 2;
  }
  if (error instanceof ChunkdError) {
    printError(error.code, error.message, json);
    return 1;
  }
  if (isSystemError(error)) {
    const system = error as NodeJS.ErrnoException;
    printError(system.code!, system.message, json);
    return 1;
  }
  throw error;
}
