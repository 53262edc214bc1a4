// Cleanup for tests that mount: whatever happened, nothing under a scratch directory stays mounted and no loop
// device keeps a file under it (a failed test must not leave the machine with mounts behind).
import fs from 'node:fs';
import path from 'node:path';
import { runTool } from '../../src/core/run-tool.ts';

function unescape(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

/** Mount points at or under `directory`, deepest first. */
export function mountsUnder(directory: string): string[] {
  const prefix = `${directory.replace(/\/$/, '')}/`;
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((line) => line !== '')
    .map((line) => unescape(line.split(' ')[4]!))
    .filter((mountPoint) => `${mountPoint}/`.startsWith(prefix))
    .sort((a, b) => b.length - a.length);
}

/** Loop devices whose backing file lies under `directory`. */
export function loopDevicesUnder(directory: string): string[] {
  const devices: string[] = [];
  for (const name of fs.readdirSync('/sys/block').filter((entry) => entry.startsWith('loop'))) {
    let backing: string;
    try {
      backing = fs.readFileSync(path.join('/sys/block', name, 'loop', 'backing_file'), 'utf8').trim();
    } catch {
      continue;
    }
    if (backing.startsWith(`${directory.replace(/\/$/, '')}/`)) devices.push(`/dev/${name}`);
  }
  return devices;
}

/** Unmounts (lazily) everything under `directory` and detaches loop devices over files there. */
export async function cleanupMounts(directory: string): Promise<void> {
  for (const mountPoint of mountsUnder(directory)) await runTool('umount', ['-l', mountPoint]);
  for (const device of loopDevicesUnder(directory)) await runTool('losetup', ['-d', device]);
}
