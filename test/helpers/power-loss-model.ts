// Seeded power-loss model runs over the real store (Pool, Volume; inline or worker-thread chunk I/O), with the
// pool's files behind src/testing/power-loss.ts. One run is a few lives of a pool: open it (a crash may come
// during the open's recovery too), check it against the model, run random operations (writes, FUA writes, trims,
// zero writes, flushes, snapshots, clones, rollbacks, removals, with checkpoint rotations every few commits),
// and cut the power at a random file-system call; what the disk then holds is the mix of durable and lost or torn
// writes power-loss.ts computes. The next life checks, and a last open with the real file system checks again.
//
// The model, per 4 KiB block of each volume: the write that a completed flush, FUA write or control operation
// made durable, and the writes issued since (acknowledged or in flight). After a power cut each block must hold
// exactly one of them, byte for byte (a block's content names its write and is derived from it, so a torn or
// mixed block cannot pass), and what it holds becomes durable. A control operation in flight at the cut may or
// may not have happened; every other acknowledged one has. Before each open, fsck must find no damage.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SharedBufferPool } from '../../src/core/shared-buffers.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { Pool, type PoolOptions } from '../../src/store/pool.ts';
import type { Volume } from '../../src/store/volume.ts';
import { WorkerChunkIo } from '../../src/store/worker-io.ts';
import { PowerLossFiles, type PowerCut } from '../../src/testing/power-loss.ts';
import { makeRandom, randomInt } from './random.ts';
import { testPoolOptions } from '../../src/testing/test-metadata.ts';

const blockBytes = 4096;
const volumeBlocks = 256; // 1 MiB volumes: blocks are overwritten often
const volumeBytes = volumeBlocks * blockBytes;
/** Tiny, so that checkpoint rotations (and crashes in them) come every few commits. */
const journalCheckpointBytes = 8 * 1024;

export type Layout = 'inline' | 'workers';

export interface RunStats {
  lives: number;
  /** Power cuts that hit while the pool was running (or opening), not after its operations were done. */
  cutsMidway: number;
  cuts: number;
  operations: number;
  acknowledgedWrites: number;
  flushes: number;
  checkedBlocks: number;
  sectorsDropped: number;
  sectorsKept: number;
}

interface Block {
  durable: number;
  pending: number[];
  current: number;
}

interface ModelVolume {
  blocks: Block[];
  snapshots: Map<string, Int32Array>;
}

/** A control operation in flight when the power went: it may or may not have happened. */
type InFlight =
  | { kind: 'create'; volume: string }
  | { kind: 'remove'; volume: string }
  | { kind: 'snapshot'; volume: string; snapshot: string; content: Int32Array }
  | { kind: 'snapshot-remove'; volume: string; snapshot: string }
  | { kind: 'clone'; volume: string; content: Int32Array }
  | { kind: 'rollback'; volume: string; snapshot: string }
  | null;

/** The bytes write `writeId` puts in block `block` (0: zeros). Derived, so a block names and proves its write. */
export function blockContent(writeId: number, block: number): Buffer {
  const out = Buffer.alloc(blockBytes);
  if (writeId === 0) return out;
  out.writeUInt32LE(writeId, 0);
  out.writeUInt32LE(block, 4);
  let x = (Math.imul(writeId, 0x9e3779b1) ^ Math.imul(block + 1, 0x85ebca6b)) >>> 0 || 1;
  for (let offset = 8; offset < blockBytes; offset += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeUInt32LE(x >>> 0, offset);
  }
  return out;
}

const zeroBlock = Buffer.alloc(blockBytes);

/** Which write a block's bytes are (0: zeros), or -1 when they are no write's whole content (torn, mixed, damaged). */
function writeOf(bytes: Buffer, block: number): number {
  if (bytes.equals(zeroBlock)) return 0;
  const writeId = bytes.readUInt32LE(0);
  return bytes.equals(blockContent(writeId, block)) ? writeId : -1;
}

/** One seeded run; throws an assertion naming the seed when the store loses or mixes anything. */
export async function runPowerLossSeed(seed: number, layout: Layout, lives = 3): Promise<RunStats> {
  return runPowerLoss(makeRandom(seed), layout, `SEED=${seed}`, lives);
}

/**
 * The same run with every choice drawn from `random` (a seeded generator, or a recorded tape of draws that
 * fast-check shrinks: power-loss.test.ts); `replay` says in failure messages how to run it again.
 */
export async function runPowerLoss(random: () => number, layout: Layout, replay: string, lives = 3): Promise<RunStats> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), `chunkd-powerloss-${layout}-`));
  const stats: RunStats = { lives: 0, cutsMidway: 0, cuts: 0, operations: 0, acknowledgedWrites: 0, flushes: 0, checkedBlocks: 0, sectorsDropped: 0, sectorsKept: 0 };
  const model = new Map<string, ModelVolume>();
  let inFlight: InFlight = null;
  let nextWrite = 1;
  let nextName = 0;
  const where = (what: string): string => `${what} (layout ${layout}, ${replay})`;

  const newVolume = (): ModelVolume => ({ blocks: Array.from({ length: volumeBlocks }, () => ({ durable: 0, pending: [], current: 0 })), snapshots: new Map() });
  const makeDurable = (): void => {
    for (const volume of model.values()) for (const block of volume.blocks) {
      block.durable = block.current;
      block.pending = [];
    }
  };
  const contentOf = (volume: ModelVolume): Int32Array => Int32Array.from(volume.blocks, (block) => block.current);

  /** Opens the pool; the I/O workers it starts are kept here, so that a power cut during the open can stop them. */
  let workers: WorkerChunkIo | null = null;
  /** The workers layout's shared buffers: writes are made from them, as the NBD server makes them (chunk-writer.ts takes the small ones). */
  let buffers: SharedBufferPool | null = null;
  const openPool = (files: FileLayer): Promise<Pool> => {
    const options: PoolOptions = { directory, files, journalCheckpointBytes, ...testPoolOptions() };
    if (layout === 'workers') {
      buffers = new SharedBufferPool();
      const shared = buffers;
      options.makeIo = (chunkFiles) => (workers = new WorkerChunkIo(chunkFiles, { workerCount: 2, buffers: shared, log: () => {} }));
    }
    return Pool.open(options);
  };

  const readAll = async (pool: Pool, volume: string, snapshot?: string): Promise<Buffer> => {
    const device = snapshot === undefined ? pool.openVolume(volume) : pool.openSnapshot(volume, snapshot);
    const bytes = Buffer.alloc(volumeBytes);
    try {
      await device.read(0, bytes);
    } finally {
      await device.close();
    }
    return bytes;
  };

  /** Whether `bytes` is exactly `content`, block by block. */
  const matches = (bytes: Buffer, content: Int32Array): boolean => content.every((writeId, block) => writeOf(bytes.subarray(block * blockBytes, (block + 1) * blockBytes), block) === writeId);

  /** Checks the reopened pool against the model, settles the operation that was in flight, and makes what was read durable. */
  const verify = async (pool: Pool, label: string): Promise<void> => {
    const settled = inFlight;
    inFlight = null;
    const exists = (volume: string): boolean => pool.hasVolume(volume);
    const snapshotExists = (volume: string, snapshot: string): boolean => exists(volume) && pool.listSnapshots(volume).some((s) => s.name === snapshot);
    if (settled?.kind === 'create' && exists(settled.volume)) model.set(settled.volume, newVolume());
    if (settled?.kind === 'remove' && !exists(settled.volume)) model.delete(settled.volume);
    if (settled?.kind === 'snapshot' && snapshotExists(settled.volume, settled.snapshot)) model.get(settled.volume)!.snapshots.set(settled.snapshot, settled.content);
    if (settled?.kind === 'snapshot-remove' && !snapshotExists(settled.volume, settled.snapshot)) model.get(settled.volume)!.snapshots.delete(settled.snapshot);
    if (settled?.kind === 'clone' && exists(settled.volume)) {
      const clone = newVolume();
      settled.content.forEach((writeId, block) => Object.assign(clone.blocks[block]!, { durable: writeId, current: writeId }));
      model.set(settled.volume, clone);
    }
    assert.deepEqual(pool.listVolumes().map((v) => v.name), [...model.keys()].sort(), where(`${label}: the volumes`));
    for (const [name, volume] of model) {
      assert.deepEqual(pool.listSnapshots(name).map((s) => s.name).sort(), [...volume.snapshots.keys()].sort(), where(`${label}: snapshots of ${name}`));
      for (const [snapshot, content] of volume.snapshots) {
        assert.ok(matches(await readAll(pool, name, snapshot), content), where(`${label}: snapshot ${name}@${snapshot} differs from what it held when taken`));
        stats.checkedBlocks += volumeBlocks;
      }
      const bytes = await readAll(pool, name);
      if (settled?.kind === 'rollback' && settled.volume === name) {
        const target = volume.snapshots.get(settled.snapshot)!;
        if (matches(bytes, target)) {
          target.forEach((writeId, block) => Object.assign(volume.blocks[block]!, { durable: writeId, pending: [], current: writeId }));
          continue;
        }
      }
      for (let block = 0; block < volumeBlocks; block++) {
        const state = volume.blocks[block]!;
        const found = writeOf(bytes.subarray(block * blockBytes, (block + 1) * blockBytes), block);
        assert.ok(found >= 0, where(`${label}: volume ${name} block ${block} holds bytes of no single write (torn, mixed or damaged)`));
        assert.ok(
          found === state.durable || state.pending.includes(found),
          where(`${label}: volume ${name} block ${block} holds write ${found}; durable was ${state.durable}, since then ${JSON.stringify(state.pending)}`),
        );
        Object.assign(state, { durable: found, pending: [], current: found });
      }
      stats.checkedBlocks += volumeBlocks;
    }
  };

  /** `shared`: a volume handle several writes of one turn use (its small writes of a turn are written as one run); else one of its own. */
  const writeBlocks = async (pool: Pool, name: string, first: number, count: number, fua: boolean, shared?: Volume): Promise<void> => {
    const writeId = nextWrite++;
    const volume = model.get(name)!;
    if (first + count > volumeBlocks) count = volumeBlocks - first;
    const blocks = Buffer.concat(Array.from({ length: count }, (_, i) => blockContent(writeId, first + i)));
    const slab = buffers;
    const data = slab === null ? blocks : slab.acquire(blocks.length);
    if (data !== blocks) blocks.copy(data);
    for (let i = 0; i < count; i++) volume.blocks[first + i]!.pending.push(writeId);
    const device = shared ?? pool.openVolume(name);
    try {
      await device.write(first * blockBytes, data, { fua });
    } finally {
      if (slab !== null) slab.release(data);
    }
    if (shared === undefined) void device.close();
    for (let i = 0; i < count; i++) volume.blocks[first + i]!.current = writeId;
    stats.acknowledgedWrites += 1;
    if (fua) makeDurable();
  };

  try {
    for (let life = 0; life < lives; life++) {
      stats.lives += 1;
      if (fs.existsSync(path.join(directory, 'chunkd-pool.json'))) {
        const report = await fsckPool(directory).catch((error: Error) => assert.fail(where(`life ${life}: fsck could not run: ${error.message}`)));
        assert.ok(report.clean, where(`life ${life}: fsck after the power cut: ${report.errors.join('; ')}`));
      }
      const operationCount = 10 + randomInt(random, 50);
      const files = new PowerLossFiles(directory, { crashAtChange: 1 + randomInt(random, operationCount * 8) });
      const frozen = (): boolean => files.inner.frozen;
      const crashed = files.inner.untilFrozen().then(() => 'crashed' as const);
      let pool: Pool | null = null;
      const live = async (): Promise<void> => {
        pool = await openPool(files);
        await verify(pool, `life ${life}`);
        while (model.size < 3) await runOperation(pool, 'create');
        for (let step = 0; step < operationCount && !frozen(); step++) {
          await runOperation(pool);
          stats.operations += 1;
        }
      };
      try {
        await Promise.race([
          live().catch((error: unknown) => {
            // Calls refused by the power cut (a synchronous open or write in flight) fail; anything else is a finding.
            if (!frozen()) throw error;
          }),
          crashed,
        ]);
      } finally {
        if (frozen()) stats.cutsMidway += 1;
        files.inner.freeze();
        await (pool as Pool | null)?.abandon();
        await (workers as WorkerChunkIo | null)?.close({ force: true });
        workers = null;
        const cut: PowerCut = await files.cut(random);
        stats.cuts += 1;
        stats.sectorsDropped += cut.sectorsDropped;
        stats.sectorsKept += cut.sectorsKept;
      }
    }
    // The last look, with the real file system: everything checks, and fsck stays clean after a clean close.
    const report = await fsckPool(directory);
    assert.ok(report.clean, where(`fsck after the last power cut: ${report.errors.join('; ')}`));
    const pool = await openPool(realFiles);
    await verify(pool, 'final open');
    await pool.close();
    const closed = await fsckPool(directory);
    assert.ok(closed.clean, where(`fsck after a clean close: ${closed.errors.join('; ')}`));
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
  return stats;

  /** One random operation; the model changes only for what was acknowledged. */
  async function runOperation(pool: Pool, only?: 'create'): Promise<void> {
    const names = [...model.keys()];
    const name = names[randomInt(random, names.length)]!;
    const volume = model.get(name)!;
    const op = only === 'create' ? 99 : randomInt(random, 100);
    const first = randomInt(random, volumeBlocks);
    const count = 1 + randomInt(random, Math.min(16, volumeBlocks - first));
    if (op < 40) {
      await writeBlocks(pool, name, first, count, random() < 0.1);
    } else if (op < 48) {
      // Several writes at once, to disjoint ranges: one commit carries them all; those to one volume go through one
      // handle in one turn, so that it writes them as one run (Volume's turn batch).
      const writes = Array.from({ length: 2 + randomInt(random, 3) }, (_, i) => ({ name: names[(i + randomInt(random, names.length)) % names.length]!, first: i * 48 + randomInt(random, 32), count: 1 + randomInt(random, 16) }));
      const handles = new Map([...new Set(writes.map((w) => w.name))].map((name) => [name, pool.openVolume(name)]));
      try {
        await Promise.all(writes.map((w) => writeBlocks(pool, w.name, w.first, w.count, false, handles.get(w.name))));
      } finally {
        for (const handle of handles.values()) void handle.close();
      }
    } else if (op < 58) {
      const zero = random() < 0.5;
      for (let i = 0; i < count; i++) volume.blocks[first + i]!.pending.push(0);
      const device = pool.openVolume(name);
      if (zero) await device.writeZeroes(first * blockBytes, count * blockBytes, { noHole: random() < 0.5 });
      else await device.trim(first * blockBytes, count * blockBytes);
      void device.close();
      for (let i = 0; i < count; i++) volume.blocks[first + i]!.current = 0;
    } else if (op < 72) {
      const device = pool.openVolume(name);
      await device.flush();
      void device.close();
      stats.flushes += 1;
      makeDurable();
    } else if (op < 80) {
      if (volume.snapshots.size >= 3) return;
      const snapshot = `s${nextName++}`;
      inFlight = { kind: 'snapshot', volume: name, snapshot, content: contentOf(volume) };
      await pool.createSnapshot(name, snapshot);
      volume.snapshots.set(snapshot, (inFlight as { content: Int32Array }).content);
      inFlight = null;
      makeDurable();
    } else if (op < 85) {
      const snapshot = [...volume.snapshots.keys()][0];
      if (snapshot === undefined) return;
      inFlight = { kind: 'snapshot-remove', volume: name, snapshot };
      // Half of them as a replication prune removes its point: what it alone held is recycled by the next writes.
      await pool.removeSnapshot(name, snapshot, { recycle: random() < 0.5 });
      volume.snapshots.delete(snapshot);
      inFlight = null;
      makeDurable();
    } else if (op < 90) {
      const [snapshot, content] = [...volume.snapshots][0] ?? [];
      if (snapshot === undefined || model.size >= 6) return;
      const clone = `v${nextName++}`;
      inFlight = { kind: 'clone', volume: clone, content: content! };
      await pool.cloneSnapshot(name, snapshot, clone);
      model.set(clone, newVolume());
      content!.forEach((writeId, block) => Object.assign(model.get(clone)!.blocks[block]!, { current: writeId }));
      inFlight = null;
      makeDurable();
    } else if (op < 94) {
      const [snapshot, content] = [...volume.snapshots][randomInt(random, volume.snapshots.size)] ?? [];
      if (snapshot === undefined) return;
      inFlight = { kind: 'rollback', volume: name, snapshot };
      await pool.rollbackVolume(name, snapshot);
      content!.forEach((writeId, block) => Object.assign(volume.blocks[block]!, { current: writeId }));
      inFlight = null;
      makeDurable();
    } else if (op < 97) {
      if (volume.snapshots.size > 0 || model.size <= 1) return;
      inFlight = { kind: 'remove', volume: name };
      await pool.removeVolume(name);
      model.delete(name);
      inFlight = null;
      makeDurable();
    } else {
      if (model.size >= 6) return;
      const fresh = `v${nextName++}`;
      inFlight = { kind: 'create', volume: fresh };
      await pool.createVolume(fresh, volumeBytes);
      model.set(fresh, newVolume());
      inFlight = null;
      makeDurable();
    }
  }
}
