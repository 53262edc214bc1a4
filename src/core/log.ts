// The node's log: one line per event on stderr (events, never one per request). Each line has a level; serve's
// --log-level drops the ones below it, --log-format json writes one JSON object per line for a log shipper, and
// under journald (cli/service-manager.ts) no timestamp of our own is written, since journald stamps each line.
// Hand-written rather than pino: the node logs rare events, each written synchronously so that the last lines
// before a crash are out (pino's sync destination does the same), in two fixed formats; this is the whole of it.

export const logLevels = ['debug', 'info', 'warn', 'error'] as const;
export type LogLevel = (typeof logLevels)[number];

/** Writes one event; `level` defaults to info. */
export type Log = (line: string, level?: LogLevel) => void;

export interface LogSettings {
  level: LogLevel;
  format: 'text' | 'json';
  /** Whether each line carries its own timestamp (not under journald, which stamps it). */
  stamped: boolean;
}

/** The line written for one event, or null when its level is below the setting (pure). */
export function formatLogLine(settings: LogSettings, message: string, level: LogLevel, now: Date): string | null {
  if (logLevels.indexOf(level) < logLevels.indexOf(settings.level)) return null;
  if (settings.format === 'json') return `${JSON.stringify({ ...(settings.stamped ? { time: now.toISOString() } : {}), level, msg: message })}\n`;
  const tag = level === 'info' ? '' : `${level}: `;
  return `${settings.stamped ? `${now.toISOString()} ` : ''}chunkd: ${tag}${message}\n`;
}

/** A Log that writes to `write` (stderr's, by default) as `settings` say. */
export function makeLog(settings: LogSettings, write: (text: string) => void = (text) => void process.stderr.write(text)): Log {
  return (message, level = 'info') => {
    const line = formatLogLine(settings, message, level, new Date());
    if (line !== null) write(line);
  };
}

/** What --log-level and --log-format take, checked (null when the text is not one). */
export function parseLogLevel(text: string): LogLevel | null {
  return (logLevels as readonly string[]).includes(text) ? (text as LogLevel) : null;
}
