// A file layer for tests (the faulty twin of file-layer.ts's real one), after TigerBeetle's simulated storage and
// SQLite's test VFS. It passes every call to the real file system, except that:
//  - a rule can fail a chosen call (EIO, ENOSPC, ...) on files whose path holds a given string, at the nth such
//    call, or at the nth and every one after it (sticky);
//  - a crash point freezes it: from the nth call that changes a file or a directory on, no call reaches the file
//    system any more (asynchronous calls never settle, synchronous ones throw), so that power-loss.ts can compute
//    what the disk holds at that instant.
// Counters, the frozen flag and the calls in flight live in shared memory, so a chunk I/O worker rebuilds the same
// layer from its spec (fileLayerFromSpec) and the rules count calls from every thread together.
import fs from 'node:fs';
import os from 'node:os';
import { realFiles, type AllocateMode, type FileLayer, type FileLayerSpec, type OpenMode } from '../store/file-layer.ts';

export type FaultOp = 'open' | 'read' | 'write' | 'fdatasync' | 'allocate' | 'rename' | 'unlink' | 'syncDirectory';

export interface FaultRule {
  op: FaultOp;
  /** Calls on files whose path contains this string (for rename, the source path; '' matches every file). */
  path: string;
  /** The nth matching call fails (1: the first). */
  nth: number;
  /** Every matching call from the nth on fails. */
  sticky?: boolean;
  code: string;
  /** False: the rule neither counts nor fails until `arm` (say, once the pool has opened). Default true. */
  armed?: boolean;
  /** Only reads and writes whose byte range holds this file offset (a bad sector). */
  atBytes?: number;
}

const slotFrozen = 0;
const slotInFlight = 1;
const slotChangeCount = 2;
const slotCrashAt = 3;
const slotRules = 4;
/** Per rule, three slots from slotRules on: matching calls counted, times fired, armed (1) or not (0). */

/** A call that will never settle: the machine lost power while it ran. */
const never = <T>(): Promise<T> => new Promise<T>(() => {});

export class TestFiles implements FileLayer {
  readonly rules: readonly FaultRule[];
  readonly #control: Int32Array;
  readonly #paths = new Map<number, string>();

  constructor(rules: readonly FaultRule[] = [], options: { crashAtChange?: number; control?: SharedArrayBuffer } = {}) {
    this.rules = rules;
    const fresh = options.control === undefined;
    this.#control = new Int32Array(options.control ?? new SharedArrayBuffer(4 * (slotRules + 3 * rules.length)));
    if (options.crashAtChange !== undefined) Atomics.store(this.#control, slotCrashAt, options.crashAtChange);
    if (fresh) rules.forEach((rule, index) => Atomics.store(this.#control, slotRules + 2 * rules.length + index, rule.armed === false ? 0 : 1));
  }

  static fromSpec(spec: Extract<FileLayerSpec, { kind: 'test' }>): TestFiles {
    return new TestFiles(spec.rules as FaultRule[], { control: spec.control });
  }

  get workerSpec(): FileLayerSpec {
    return { kind: 'test', control: this.#control.buffer as SharedArrayBuffer, rules: [...this.rules] };
  }

  /** Whether a crash point was reached (by any thread). */
  get frozen(): boolean {
    return Atomics.load(this.#control, slotFrozen) === 1;
  }

  /** Stops every call from now on, as a power loss does. */
  freeze(): void {
    Atomics.store(this.#control, slotFrozen, 1);
  }

  /** Calls that change files or directories so far, from every thread (to choose crash points). */
  get changeCount(): number {
    return Atomics.load(this.#control, slotChangeCount);
  }

  /** Calls running in the real file system now, from every thread. */
  get inFlight(): number {
    return Atomics.load(this.#control, slotInFlight);
  }

  /** Starts rule `index` counting (in every thread). */
  arm(index: number): void {
    Atomics.store(this.#control, slotRules + 2 * this.rules.length + index, 1);
  }

  /** Stops rule `index` (in every thread). */
  disarm(index: number): void {
    Atomics.store(this.#control, slotRules + 2 * this.rules.length + index, 0);
  }

  /** How many times rule `index` fired. */
  fired(index: number): number {
    return Atomics.load(this.#control, slotRules + this.rules.length + index);
  }

  /** Resolves once a crash point froze the layer (in this thread or a worker). */
  async untilFrozen(pollMs = 2): Promise<void> {
    while (!this.frozen) await new Promise((resolve) => setTimeout(resolve, pollMs));
  }

  /** Resolves when no thread runs a real call any more (after freeze, nothing new starts). */
  async quiesce(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.inFlight > 0) {
      if (Date.now() > deadline) throw new Error(`test files: ${this.inFlight} calls still in flight after ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }

  /**
   * The path a descriptor was opened with (through this layer), for rules and for power-loss.ts; for one another
   * thread opened (the chunk writer's thread is handed descriptors, not paths), the path the kernel has for it.
   */
  pathOf(fd: number): string {
    const known = this.#paths.get(fd);
    if (known !== undefined) return known;
    try {
      return fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      return `fd ${fd}`;
    }
  }

  /** Descriptors this layer opened and has not closed. */
  openDescriptors(): number[] {
    return [...this.#paths.keys()];
  }

  // ---- the layer ----

  open(path: string, mode: OpenMode): Promise<number> {
    return this.#async(mode === 'create' || mode === 'truncate', 'open', path, async () => {
      const fd = await realFiles.open(path, mode);
      this.#paths.set(fd, path);
      return fd;
    });
  }

  openSync(path: string, mode: OpenMode): number {
    return this.#sync(mode === 'create' || mode === 'truncate', 'open', path, () => {
      const fd = realFiles.openSync(path, mode);
      this.#paths.set(fd, path);
      return fd;
    });
  }

  close(fd: number): void {
    this.#paths.delete(fd);
    if (this.frozen) return; // power-loss.ts closes what is left
    realFiles.close(fd);
  }

  read(fd: number, target: Uint8Array, positionBytes: number): Promise<number> {
    return this.#async(false, 'read', this.pathOf(fd), () => realFiles.read(fd, target, positionBytes), [positionBytes, target.length]);
  }

  readCached(fd: number, target: Uint8Array, positionBytes: number): number {
    // A failing read is failed by read(); a frozen layer reads nothing.
    const armedRead = this.rules.some((rule, index) => rule.op === 'read' && this.pathOf(fd).includes(rule.path) && Atomics.load(this.#control, slotRules + 2 * this.rules.length + index) === 1);
    if (this.frozen || armedRead) return -1;
    return realFiles.readCached(fd, target, positionBytes);
  }

  write(fd: number, data: Uint8Array, positionBytes: number): Promise<void> {
    return this.#async(true, 'write', this.pathOf(fd), () => realFiles.write(fd, data, positionBytes), [positionBytes, data.length]);
  }

  /** Part by part, each a write of its own to the rules and crash points, as separate writes were before pwritev. */
  async writev(fd: number, parts: readonly Uint8Array[], positionBytes: number): Promise<void> {
    let position = positionBytes;
    for (const part of parts) {
      await this.write(fd, part, position);
      position += part.length;
    }
  }

  writeSync(fd: number, data: Uint8Array, positionBytes: number): void {
    return this.#sync(true, 'write', this.pathOf(fd), () => realFiles.writeSync(fd, data, positionBytes), [positionBytes, data.length]);
  }

  fdatasync(fd: number): Promise<void> {
    return this.#async(true, 'fdatasync', this.pathOf(fd), () => realFiles.fdatasync(fd));
  }

  allocate(fd: number, mode: AllocateMode, offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.#async(true, 'allocate', this.pathOf(fd), () => realFiles.allocate(fd, mode, offsetBytes, lengthBytes));
  }

  rename(fromPath: string, toPath: string): Promise<void> {
    return this.#async(true, 'rename', fromPath, () => realFiles.rename(fromPath, toPath));
  }

  unlink(path: string): Promise<void> {
    return this.#async(true, 'unlink', path, () => realFiles.unlink(path));
  }

  syncDirectory(path: string): Promise<void> {
    return this.#async(true, 'syncDirectory', path, () => realFiles.syncDirectory(path));
  }

  // ---- faults and crash points ----

  /** Counts the call; returns the error it must fail with, 'frozen' when it must not run, or null. */
  #check(changes: boolean, op: FaultOp, path: string, range?: [number, number]): Error | 'frozen' | null {
    if (this.frozen) return 'frozen';
    if (changes) {
      const count = Atomics.add(this.#control, slotChangeCount, 1) + 1;
      const crashAt = Atomics.load(this.#control, slotCrashAt);
      if (crashAt > 0 && count >= crashAt) {
        this.freeze();
        return 'frozen';
      }
    }
    for (let index = 0; index < this.rules.length; index++) {
      const rule = this.rules[index]!;
      if (rule.op !== op || !path.includes(rule.path) || Atomics.load(this.#control, slotRules + 2 * this.rules.length + index) === 0) continue;
      if (rule.atBytes !== undefined && (range === undefined || rule.atBytes < range[0] || rule.atBytes >= range[0] + range[1])) continue;
      const count = Atomics.add(this.#control, slotRules + index, 1) + 1;
      if (count === rule.nth || (rule.sticky === true && count > rule.nth)) {
        Atomics.add(this.#control, slotRules + this.rules.length + index, 1);
        return injected(op, path, rule.code);
      }
    }
    return null;
  }

  #async<T>(changes: boolean, op: FaultOp, path: string, call: () => Promise<T>, range?: [number, number]): Promise<T> {
    const verdict = this.#check(changes, op, path, range);
    if (verdict === 'frozen') return never();
    if (verdict !== null) return Promise.reject(verdict);
    Atomics.add(this.#control, slotInFlight, 1);
    let running: Promise<T>;
    try {
      running = call();
    } catch (error) {
      Atomics.sub(this.#control, slotInFlight, 1);
      return Promise.reject(error);
    }
    return running.finally(() => Atomics.sub(this.#control, slotInFlight, 1));
  }

  #sync<T>(changes: boolean, op: FaultOp, path: string, call: () => T, range?: [number, number]): T {
    const verdict = this.#check(changes, op, path, range);
    if (verdict === 'frozen') throw injected(op, path, 'EIO', 'the simulated machine lost power');
    if (verdict !== null) throw verdict;
    Atomics.add(this.#control, slotInFlight, 1);
    try {
      return call();
    } finally {
      Atomics.sub(this.#control, slotInFlight, 1);
    }
  }
}

function injected(op: FaultOp, path: string, code: string, why = 'injected by a test'): NodeJS.ErrnoException {
  const errno = (os.constants.errno as Record<string, number>)[code] ?? 5;
  return Object.assign(new Error(`${code}: ${op} ${path} (${why})`), { code, errno: -errno, syscall: op });
}
