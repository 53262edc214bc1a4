// The wait for a client's next request, polled for a few microseconds before the thread sleeps.
//
// Why: at queue depth 1 a client sends its next request a few tens of microseconds after it reads a reply. A
// thread that sleeps in epoll meanwhile lets its virtual CPU halt, and the request must then wake it: on this
// project's VMs (guest halt-polling off, /sys/module/haltpoll/parameters/guest_halt_poll_ns = 0) that wake-up,
// and the cold caches after it, cost a QD1 request over half its speed when nothing else keeps the CPUs busy
// (BENCHMARKS.md, issue 19, "Queue depth 1 on an idle machine"). So after a connection's small replies are written
// (a large READ's reply is not followed by a poll), when no request is in flight on this thread, the connection
// polls its socket (recv with MSG_PEEK | MSG_DONTWAIT: the peek reads nothing) for up to `serve --poll-us`
// microseconds, and reads the request it sees (below). The poll holds the thread's event loop, so it is short,
// bounded, and skipped where it does not pay:
//
// - a poll that times out (the client is slow, or done) makes the connection skip its next 1, then 2, 4, ... up to
//   idlePollBackoffMax waits; a poll that sees the request ends the back-off;
// - one connection's polls per turn of the event loop, whatever the number of connections that replied in it, and
//   at most turnPollsMax of them (one, then one after each request the connection read when a poll saw it coming);
// - only for a client that had one request in flight at a time since the last wait (queue depth 1): one with
//   more sends its next requests as their replies reach it, and a poll would take a CPU its threads need;
// - only a connection in transmission, over a plain socket (a TLS socket's bytes need decrypting anyway), with
//   nothing in flight on its thread (NBD requests; the node does not poll on a main thread that also serves NBD
//   threads' device calls, node.ts).
//
// A poll that sees the request come is followed by its read, here (receiveNow, into where the receiver says), and
// the request is answered in the same callback; only what the poll cannot take this way (the end of the stream,
// an error, bytes while others wait) is left to the event loop's own read.
//
// The cost: a poll that sees the request spun through the client's turnaround (tens of microseconds at QD1) where
// the thread would have slept, which is CPU time the node's figures count; `serve --poll-us 0` turns it off.
//
// IdlePollPolicy is the decision alone (pure); the probe is pollReadable.
import { errnoValue, koffi, libcFunction } from '../core/libc.ts';

/** Idle waits skipped after consecutive polls that timed out, at most. */
export const idlePollBackoffMax = 64;

/** recv(2) into the caller's memory (koffi passes a Buffer's or typed array's own bytes: nothing copied back). */
const recvFn = libcFunction('long recv(int fd, void *buf, size_t length, int flags)');
const MSG_PEEK = 0x02;
const MSG_DONTWAIT = 0x40;
const peekByte = new Uint8Array(1);

function retryable(errno: number): boolean {
  return errno === errnoValue('EAGAIN') || errno === errnoValue('EINTR');
}

/** Polls, with their outcome: what `chunkd_nbd_idle_poll_*` reports. */
export interface IdlePollCounters {
  hits: number;
  misses: number;
  /** Time spent polling, hits and misses. */
  microseconds: number;
}

export function emptyIdlePollCounters(): IdlePollCounters {
  return { hits: 0, misses: 0, microseconds: 0 };
}

/** Adds `from` into `sum` (the node's total over its NBD servers and threads). */
export function addIdlePollCounters(sum: IdlePollCounters, from: IdlePollCounters): IdlePollCounters {
  sum.hits += from.hits;
  sum.misses += from.misses;
  sum.microseconds += from.microseconds;
  return sum;
}

/** Whether the next idle wait of one connection is polled, from how its last polls ended. */
export class IdlePollPolicy {
  /** Idle waits still to skip. */
  #skip = 0;
  /** Waits to skip after the next poll that times out. */
  #backoff = 1;

  /** Whether to poll this wait (each call is one idle wait). */
  shouldPoll(): boolean {
    if (this.#skip === 0) return true;
    this.#skip -= 1;
    return false;
  }

  /** The poll saw the request. */
  hit(): void {
    this.#backoff = 1;
  }

  /** The poll timed out. */
  missed(): void {
    this.#skip = this.#backoff;
    this.#backoff = Math.min(this.#backoff * 2, idlePollBackoffMax);
  }
}

/** Polls one connection may make in one turn of the event loop (each but the first after a request it read). */
export const turnPollsMax = 16;

/**
 * This thread's state, over all its connections: requests in flight (a poll waits only while there are none); the
 * turn of the event loop the last poll ran in (-1: none yet), the connection that polled in it, and how often;
 * and the reads receiveNow made (for tests: how many requests were read by an idle wait, not by the event loop).
 */
export const threadPolls = { requestsInFlight: 0, polledInTurn: -1, turnOwner: null as object | null, turnPolls: 0, readsNow: 0 };

/**
 * Claims a poll for connection `owner` in this turn: false when another connection polled in it already, or this
 * one turnPollsMax times. A connection that reads and answers the requests its polls see (connection.ts) polls
 * again after each reply, in the same turn; the bound is how long it may hold the event loop. The turn is libuv's
 * loop count (each thread has its own loop): a setImmediate to mark the turn's end cost a check-phase callback
 * per poll.
 */
export function claimTurnPoll(owner: object): boolean {
  const turn = performance.nodeTiming.uvMetricsInfo.loopCount;
  if (threadPolls.polledInTurn !== turn) {
    threadPolls.polledInTurn = turn;
    threadPolls.turnOwner = owner;
    threadPolls.turnPolls = 1;
    return true;
  }
  if (threadPolls.turnOwner !== owner || threadPolls.turnPolls >= turnPollsMax) return false;
  threadPolls.turnPolls += 1;
  return true;
}

/**
 * Polls descriptor `fd` for readable bytes (or its end) for up to `pollUs` microseconds; true once something is
 * there, false when the time ran out. Counted in `counters`.
 */
export function pollReadable(fd: number, pollUs: number, counters: IdlePollCounters): boolean {
  const recv = recvFn();
  const start = performance.now();
  const until = start + pollUs / 1000;
  let seen = false;
  let now = start;
  while (now < until) {
    // >= 0: bytes (1) or the end (0). -1 and EAGAIN (or EINTR): nothing yet. Any other error ends the poll as
    // something to read would: recv hands a pending socket error (ECONNRESET) to its caller and clears it, so the
    // event loop's own read must come at once to see what is left.
    if ((recv(fd, peekByte, 1, MSG_PEEK | MSG_DONTWAIT) as number) >= 0 || !retryable(koffi().errno())) {
      seen = true;
      break;
    }
    now = performance.now();
  }
  counters.microseconds += (performance.now() - start) * 1000;
  if (seen) counters.hits += 1;
  else counters.misses += 1;
  return seen;
}

/**
 * Reads what descriptor `fd` holds now into `target`, without waiting: the bytes read, or 0 when none were taken
 * (nothing there, the end of the stream, or an error, each left for the event loop's own read to find).
 */
export function receiveNow(fd: number, target: Buffer): number {
  const count = recvFn()(fd, target, target.length, MSG_DONTWAIT) as number;
  if (count <= 0) return 0;
  threadPolls.readsNow += 1;
  return count;
}
