// NBD protocol threads: so that protocol work does not all sit on one event loop, each of N worker threads runs
// its own listener on the node's TCP port (reusePort: the kernel spreads new connections among them), its own
// connections, codec and socket I/O. The pool's metadata stays with the main thread, the one writer of maps,
// allocator and journal, so every durability and ordering promise of DESIGN.md holds as it does for connections
// served by the main thread: each device call is a message to the main thread (batched per event-loop turn),
// and its bytes stay in shared memory that the chunk I/O workers read and write in place (remote-device.ts).
// The main thread's share of a request is then the metadata step alone (map lookup, range lock, record),
// no socket, no parsing, no copying. A thread ends only when the node stops it: one that ends while the node
// serves had a bug (it fail-stopped, or an error escaped it), and the node stops too (core/fail-stop.ts).
import { addHistogram } from '../core/latency-histogram.ts';
import { emptyProtocolStageTimes } from '../store/stage-times.ts';
import { MessageChannel, Worker } from 'node:worker_threads';
import type { DeviceProvider } from '../core/block-device.ts';
import { ChunkdError } from '../core/errors.ts';
import { failStop } from '../core/fail-stop.ts';
import type { NbdServerStats } from '../nbd/server.ts';
import type { TlsServerConfig } from '../nbd/tls.ts';
import { DeviceHost } from './device-host.ts';
import { addIdlePollCounters, emptyIdlePollCounters } from '../nbd/idle-poll.ts';
import { ownModule } from '../core/source-files.ts';
import type { Log, LogLevel } from '../core/log.ts';

const threadModule = ownModule('workers', 'nbd-thread');
const threadStartTimeoutMs = 30_000;

interface ProtocolThread {
  worker: Worker;
  host: DeviceHost;
  stats: NbdServerStats;
  stopping: boolean;
}

export class NbdThreads {
  readonly #provider: DeviceProvider;
  readonly #log: Log;
  readonly #host: string;
  /** Credentials as PEM text: each thread makes its own SecureContext from them. */
  readonly #tls: TlsServerConfig | null;
  /** serve --poll-us, for each thread's server. */
  readonly #pollUs: number;
  #port = 0;
  #address = '';
  readonly #threads: ProtocolThread[] = [];
  #nextRequestId = 1;
  #stopping = false;

  private constructor(provider: DeviceProvider, host: string, log: Log, tls: TlsServerConfig | null, pollUs: number) {
    this.#provider = provider;
    this.#tls = tls;
    this.#pollUs = pollUs;
    this.#host = host;
    this.#log = log;
  }

  /** Starts `count` threads listening on host:port (port 0: the first picks one and the others share it). */
  static async start(options: { count: number; host: string; port: number; provider: DeviceProvider; log: Log; tls?: TlsServerConfig | null; pollUs?: number }): Promise<NbdThreads> {
    const threads = new NbdThreads(options.provider, options.host, options.log, options.tls ?? null, options.pollUs ?? 0);
    threads.#port = options.port;
    try {
      for (let index = 0; index < options.count; index++) await threads.#startThread(index);
    } catch (error) {
      await threads.stop();
      throw error;
    }
    return threads;
  }

  /** The TCP address the threads listen on. */
  addresses(): string[] {
    return this.#address === '' ? [] : [this.#address];
  }

  get threadCount(): number {
    return this.#threads.length;
  }

  /** Counters summed over the threads (each asked now). */
  async stats(): Promise<NbdServerStats> {
    await Promise.all(this.#threads.map((thread) => this.#refreshStats(thread)));
    const sum: NbdServerStats = { connectionsOpen: 0, connectionsTotal: 0, requestsTotal: 0, requestErrorsTotal: 0, stages: emptyProtocolStageTimes(), idlePoll: emptyIdlePollCounters() };
    for (const thread of this.#threads) {
      sum.connectionsOpen += thread.stats.connectionsOpen;
      sum.connectionsTotal += thread.stats.connectionsTotal;
      sum.requestsTotal += thread.stats.requestsTotal;
      sum.requestErrorsTotal += thread.stats.requestErrorsTotal;
      addHistogram(sum.stages.receive, thread.stats.stages.receive);
      addHistogram(sum.stages.reply, thread.stats.stages.reply);
      addIdlePollCounters(sum.idlePoll, thread.stats.idlePoll);
    }
    return sum;
  }

  /** Ends every thread's connections to `exportName` as NbdServer.disconnectExport does; how many there were. */
  async disconnectExport(exportName: string): Promise<number> {
    const counts = await Promise.all(
      this.#threads.map((thread) => this.#ask<{ count: number }>(thread, 'disconnected', { type: 'disconnect', exportName }, null)),
    );
    return counts.reduce((sum, answer) => sum + (answer?.count ?? 0), 0);
  }

  /** Stops accepting, lets each thread finish its connections as NbdServer.close does, then ends the threads. */
  async stop(): Promise<void> {
    this.#stopping = true;
    await Promise.all(
      this.#threads.map(async (thread) => {
        thread.stopping = true;
        const stopped = new Promise<void>((resolve) => {
          thread.worker.on('message', (message: { type: string }) => message.type === 'stopped' && resolve());
          thread.worker.once('exit', () => resolve());
        });
        thread.worker.postMessage({ type: 'stop' });
        await stopped;
        await thread.worker.terminate();
        await thread.host.closeAll();
      }),
    );
    this.#threads.length = 0;
  }

  async #startThread(index: number): Promise<void> {
    const channel = new MessageChannel();
    const host = new DeviceHost(this.#provider, channel.port1);
    const worker = new Worker(threadModule, {
      name: 'chunkd-nbd',
      workerData: { port: channel.port2, host: this.#host, listenPort: this.#port, index, tls: this.#tls, pollUs: this.#pollUs },
      transferList: [channel.port2],
    });
    const thread: ProtocolThread = { worker, host, stats: { connectionsOpen: 0, connectionsTotal: 0, requestsTotal: 0, requestErrorsTotal: 0, stages: emptyProtocolStageTimes(), idlePoll: emptyIdlePollCounters() }, stopping: false };
    const ready = new Promise<string[]>((resolve, reject) => {
      const timer = setTimeout(() => reject(ChunkdError.io(`NBD thread ${index} did not start in ${threadStartTimeoutMs / 1000} s`)), threadStartTimeoutMs);
      worker.on('message', (message: { type: string; line?: string; level?: LogLevel; addresses?: string[] }) => {
        if (message.type === 'log') this.#log(message.line!, message.level);
        if (message.type === 'ready') {
          clearTimeout(timer);
          resolve(message.addresses!);
        }
      });
      worker.once('error', (error) => {
        clearTimeout(timer);
        reject(ChunkdError.io(`NBD thread ${index} failed to start: ${error.message}`, error));
      });
      worker.once('exit', (code) => {
        clearTimeout(timer);
        reject(ChunkdError.io(`NBD thread ${index} exited (code ${code}) before it served`));
      });
    });
    worker.on('error', (error) => this.#log(`NBD thread ${index} failed: ${error.stack ?? error.message}`, 'error'));
    worker.on('exit', (code) => this.#onExit(thread, index, code));
    const addresses = await ready;
    this.#threads.push(thread);
    if (this.#address === '') {
      this.#address = addresses[0]!;
      this.#port = Number(this.#address.slice(this.#address.lastIndexOf(':') + 1));
    }
  }

  /** A thread that ends while serving had a bug: its connections are gone and the state it shared is suspect. */
  #onExit(thread: ProtocolThread, index: number, code: number): void {
    const at = this.#threads.indexOf(thread);
    if (at >= 0 && !thread.stopping && !this.#stopping) {
      this.#threads.splice(at, 1);
      failStop(new Error(`NBD thread ${index} ended (exit code ${code}) while the node served`), `NBD thread ${index}`);
    }
    void thread.host.closeAll(); // settles every close, never rejects
  }

  async #refreshStats(thread: ProtocolThread): Promise<void> {
    const answer = await this.#ask<{ stats: NbdServerStats }>(thread, 'stats', { type: 'stats' }, 1000);
    if (answer !== null) thread.stats = answer.stats;
  }

  /**
   * Sends `request` to a thread with a fresh id and resolves with its answer of type `answerType` (same id); null
   * when the thread ends first or, with `timeoutMs`, when none came in time.
   */
  #ask<T>(thread: ProtocolThread, answerType: string, request: Record<string, unknown>, timeoutMs: number | null): Promise<T | null> {
    const id = this.#nextRequestId++;
    return new Promise<T | null>((resolve) => {
      const done = (answer: T | null): void => {
        thread.worker.off('message', onMessage);
        thread.worker.off('exit', onExit);
        resolve(answer);
      };
      const onMessage = (message: { type: string; id?: number }): void => {
        if (message.type === answerType && message.id === id) done(message as T);
      };
      const onExit = (): void => done(null);
      thread.worker.on('message', onMessage);
      thread.worker.once('exit', onExit);
      thread.worker.postMessage({ ...request, id });
      if (timeoutMs !== null) setTimeout(() => done(null), timeoutMs).unref();
    });
  }
}
