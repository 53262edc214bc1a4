// The node's helper threads run below its event loop's priority. The main thread serves every request; the
// threads beside it (libuv's pool, the chunk I/O workers, the chunk writer, the page writer) work for it, and on a
// machine whose CPUs are short the scheduler otherwise shares a CPU between them and the event loop as equals, so
// the loop waits while they run (BENCHMARKS.md, issue 15, "The node's helper threads below the event loop"). On
// Linux a nice value is a thread's own (setpriority on a thread id; a new thread takes its creator's), and raising
// one needs no privilege. The helpers' value is the event loop's plus 10, whatever the node was started at. The NBD
// protocol threads serve requests as the main thread does, and V8's helpers are the collector's, which the main
// thread waits for in its pauses: both stay at the process's priority.
import fs from 'node:fs';
import os from 'node:os';

/** How far below the event loop the helper threads run, in nice values (the sum at most 19). */
export const helperNiceBelow = 10;

/**
 * The nice value for the helper threads of a node whose event loop is the calling thread: its own plus
 * `helperNiceBelow`, at most 19. A node started at nice 0 (as usual) gives them 10; one started lower (`nice -n -5`,
 * systemd's `Nice=-5`) or higher keeps them as far below its event loop, never above it (as an absolute value
 * would, for a node started at 15).
 */
export function helperThreadNice(): number {
  return Math.min(19, threadNice() + helperNiceBelow);
}

/** The calling thread's nice value (Linux: this thread's own), 0 where the system does not say. */
function threadNice(): number {
  try {
    return os.getPriority();
  } catch {
    return 0;
  }
}

/** libuv's name for the threads of its pool (the file system's calls, DNS, zlib, crypto's slow calls). */
const libuvPoolThreadName = 'libuv-worker';

/**
 * Sets the calling thread's nice value (Linux: this thread only). False where the system refuses (another
 * system's rule, or a lower value than the thread's without privilege): the thread runs as it was.
 */
export function setThisThreadNice(nice: number): boolean {
  try {
    os.setPriority(nice);
    return true;
  } catch {
    return false;
  }
}

/**
 * Sets the nice value of every thread of libuv's pool in this process (created together at its first job, shared
 * by the process's worker threads): the count set, 0 where none exists yet or the system has no /proc.
 */
export function setLibuvPoolNice(nice: number): number {
  let count = 0;
  for (const thread of processThreads()) {
    if (thread.name !== libuvPoolThreadName) continue;
    try {
      os.setPriority(thread.id, nice);
      count += 1;
    } catch {
      // Gone since the listing, or refused: it runs as it was.
    }
  }
  return count;
}

export interface ThreadInfo {
  id: number;
  /** Its name as the kernel has it (15 bytes at most): a worker thread's is its Worker's `name`. */
  name: string;
  nice: number;
}

/** The threads of a process (this one by default), from /proc; none where there is no /proc. */
export function processThreads(pid: number | 'self' = 'self'): ThreadInfo[] {
  const directory = `/proc/${pid}/task`;
  let ids: string[];
  try {
    ids = fs.readdirSync(directory);
  } catch {
    return [];
  }
  const threads: ThreadInfo[] = [];
  for (const id of ids) {
    try {
      // stat's second field is the name in parentheses (which may itself hold spaces or parentheses): the fields
      // after the last ')' start at the third, so nice, the 19th, is the 17th of them.
      const stat = fs.readFileSync(`${directory}/${id}/stat`, 'latin1');
      const close = stat.lastIndexOf(')');
      const name = stat.slice(stat.indexOf('(') + 1, close);
      const nice = Number(stat.slice(close + 2).split(' ')[16]);
      threads.push({ id: Number(id), name, nice });
    } catch {
      // Ended since the listing.
    }
  }
  return threads;
}
