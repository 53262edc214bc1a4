// What `chunkd serve` does for a service manager (systemd, packaging/chunkd.service):
// - readiness: with Type=notify, systemd sets NOTIFY_SOCKET and waits for READY=1 before it starts what comes
//   after the node (Docker, whose plugin socket must be there). Node.js cannot send on a unix datagram socket,
//   so systemd's own systemd-notify sends it, credited to this process (--pid; the unit has NotifyAccess=all).
// - logs: under journald (JOURNAL_STREAM names the stream stderr still is), every line is stamped already, so
//   the node writes none of its own timestamps there.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import type { Log } from '../core/log.ts';

/** Sends `state` (READY=1, STOPPING=1) to the service manager if one asked for it; a failure is logged, not fatal. */
export function notifyServiceManager(state: string, log: Log): Promise<void> {
  if (!process.env.NOTIFY_SOCKET) return Promise.resolve();
  return new Promise((resolve) => {
    execFile('systemd-notify', [`--pid=${process.pid}`, state], { timeout: 10_000 }, (error, _stdout, stderr) => {
      if (error !== null) log(`could not tell the service manager ${state} (NOTIFY_SOCKET=${process.env.NOTIFY_SOCKET}): ${stderr.toString().trim() || error.message}`, 'warn');
      resolve();
    });
  });
}

/** Whether stderr is the journal stream systemd connected (so journald stamps each line itself). */
export function stderrIsJournal(): boolean {
  const stream = process.env.JOURNAL_STREAM;
  if (!stream) return false;
  try {
    const stat = fs.fstatSync(2);
    return stream === `${stat.dev}:${stat.ino}`;
  } catch {
    return false;
  }
}
