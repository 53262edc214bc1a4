// What the pool does when the disk fails a call (src/testing/test-files.ts injects the failure at a chosen call):
// a failed fdatasync of data or journal, or a failed journal write, makes the pool refuse writes from then on
// (EIO to writers), while reads go on and status and /metrics say why; a full file system at a journal commit
// fails that commit only, shows in status, and the next commit succeeds (under writes at queue depth 32, it is met
// by each FLUSH, not by a commit and a log line per write, and every acknowledged write survives a power cut); a
// disk read error during a scrub is a damaged extent, not an aborted scrub, and one in a copy of the checkpoint or
// a journal is damage read from the other copy; a full file system at a checkpoint is ENOSPC too, retried until
// space is back (a power cut meanwhile loses nothing acknowledged; on a paged pool a FLUSH whose records reached the
// journal succeeds), a paged pool's checkpoint at close that meets
// it leaves the journal to the next open, and a journal whose reserve ahead does not fit still takes commits; a failed chunk write fails that write only (also on the chunk
// writer's thread). And, directly: an overwrite lands in a new physical chunk (redirect-on-write), never over the
// chunk the metadata names. And a checkpoint asked for (POST /v1/checkpoint) is written now and counted, and its
// failed write is a failure like the journal's. And status gives the chunk files' span beside the data allocated.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test, vi } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { makeRandom } from '../../src/core/random.ts';
import { SharedBufferPool } from '../../src/core/shared-buffers.ts';
import { renderMetrics } from '../../src/node/metrics.ts';
import type { NodeStatus } from '../../src/node/node.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { Pool, type PoolOptions } from '../../src/store/pool.ts';
import { ChunkWriter } from '../../src/store/chunk-writer.ts';
import { WorkerChunkIo } from '../../src/store/worker-io.ts';
import type { AllocateMode, OpenMode } from '../../src/store/file-layer.ts';
import { fsckPool } from '../../src/store/fsck.ts';
import { closeDescriptorsUnder, PowerLossFiles } from '../../src/testing/power-loss.ts';
import { TestFiles, type FaultRule } from '../../src/testing/test-files.ts';

const MiB = 1024 * 1024;

async function withPool(files: FileLayer, run: (pool: Pool, directory: string) => Promise<void>, options: Partial<PoolOptions> & { workers?: boolean } = {}): Promise<void> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
  const buffers = new SharedBufferPool();
  const pool = await Pool.open({
    directory,
    files,
    ...options,
    makeIo: options.workers ? (chunkFiles) => new WorkerChunkIo(chunkFiles, { workerCount: 2, buffers, log: () => {} }) : undefined,
  });
  try {
    await run(pool, directory);
  } finally {
    await pool.close();
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

/** The /metrics text for a pool status (the rest of the node's status zeroed). */
async function metricsOf(pool: Pool): Promise<string> {
  const status = {
    pool: await pool.status(),
    volumes: [],
    nbd: { listen: [], threads: 0, connectionsOpen: 0, connectionsTotal: 0, requestsTotal: 0, requestErrorsTotal: 0, idlePoll: { hits: 0, misses: 0, microseconds: 0 } },
    io: pool.ioStatus(),
    peer: null,
    replication: { replicas: [], replicaVolumes: [], fenced: [], syncReplicas: [] },
    eventLoopUtilization: 0,
    eventLoopDelayMaxSeconds: 0,
    eventLoopLongestPause: { delaySeconds: 0.11, gapSeconds: 0.12, onCpuSeconds: 0.03, runQueueSeconds: 0.07, elsewhereSeconds: 0.02, gcSeconds: 0.01, majorGcSeconds: 0, otherThreadsCpuSeconds: 0.09, endedAtMs: 0 },
  } as unknown as NodeStatus;
  return renderMetrics(status);
}

const isEio = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'EIO';

test('a checkpoint asked for (POST /v1/checkpoint) starts a generation now: the journal empties, status and metrics count it, a restart reads it back', async () => {
  await withPool(realFiles, async (pool, directory) => {
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    await volume.write(0, Buffer.alloc(8192, 7));
    const before = await pool.status();
    assert.equal(before.checkpointsTotal, 0, 'the checkpoint written at open is not counted');
    assert.equal(before.lastCheckpoint, null);
    assert.ok(before.journalBytes > 0, 'the volume\'s creation is in the journal');
    const report = await pool.checkpoint();
    assert.equal(report.generation, before.generation + 1);
    assert.ok(report.bytes > 0 && report.seconds >= report.encodeSeconds && report.encodeSeconds >= 0);
    const after = await pool.status();
    assert.equal(after.generation, report.generation);
    assert.equal(after.journalBytes, 0, 'the unflushed write went into the checkpoint, not the journal');
    assert.equal(after.checkpointsTotal, 1);
    assert.deepEqual(after.lastCheckpoint, report);
    assert.equal(after.checkpointEncodeSecondsMax, report.encodeSeconds);
    assert.equal(fs.statSync(path.join(directory, 'checkpoint.0')).size, report.bytes);
    const metrics = await metricsOf(pool);
    assert.match(metrics, /^chunkd_checkpoints_total 1$/m);
    assert.match(metrics, new RegExp(`^chunkd_checkpoint_bytes ${report.bytes}$`, 'm'));
    assert.match(metrics, /^chunkd_event_loop_delay_max_seconds 0$/m);
    assert.match(metrics, /^chunkd_event_loop_longest_pause_seconds\{part="gap"\} 0.12\nchunkd_event_loop_longest_pause_seconds\{part="on_cpu"\} 0.03\nchunkd_event_loop_longest_pause_seconds\{part="run_queue"\} 0.07\nchunkd_event_loop_longest_pause_seconds\{part="elsewhere"\} 0.02\nchunkd_event_loop_longest_pause_seconds\{part="gc"\} 0.01\nchunkd_event_loop_longest_pause_seconds\{part="gc_full"\} 0\nchunkd_event_loop_longest_pause_seconds\{part="other_threads_cpu"\} 0.09$/m);
    await volume.close();
    await pool.close();
    const reopened = await Pool.open({ directory });
    const back = Buffer.alloc(8192);
    const again = reopened.openVolume('v');
    await again.read(0, back);
    assert.ok(back.every((byte) => byte === 7), 'the write the checkpoint took survives the restart');
    await again.close();
    await reopened.close();
  });
});

test('a failed write of an asked-for checkpoint makes the pool refuse writes, like a failed journal write', async () => {
  const files = new TestFiles([{ op: 'write', path: 'checkpoint', nth: 1, code: 'EIO', armed: false }]);
  await withPool(files, async (pool) => {
    await pool.createVolume('v', 4 * MiB);
    files.arm(0);
    await assert.rejects(pool.checkpoint(), isEio);
    assert.equal(files.fired(0), 1);
    assert.match((await pool.status()).failure ?? '', /starting a new metadata checkpoint failed/);
    await assert.rejects(pool.checkpoint(), isEio, 'a later checkpoint is refused too');
  });
});

for (const [what, rule, reason] of [
  ['fdatasync of chunk data', { op: 'fdatasync', path: '.chunk' }, /syncing chunk files failed/],
  ['fdatasync of the journal', { op: 'fdatasync', path: 'journal-' }, /writing the metadata journal failed/],
  ['write to the journal', { op: 'write', path: 'journal-' }, /writing the metadata journal failed/],
] as const) {
  test(`a failed ${what} makes the pool refuse writes until a restart; reads go on; status and metrics say why`, async () => {
    const files = new TestFiles([{ ...rule, nth: 1, code: 'EIO', armed: false } as FaultRule]);
    await withPool(files, async (pool, directory) => {
      await pool.createVolume('v', 4 * MiB);
      const volume = pool.openVolume('v');
      await volume.write(0, Buffer.alloc(8192, 1));
      await volume.flush();
      files.arm(0);
      await volume.write(MiB, Buffer.alloc(8192, 2));
      await assert.rejects(volume.flush(), isEio, 'the flush that met the failure');
      assert.equal(files.fired(0), 1);
      await assert.rejects(volume.write(2 * MiB, Buffer.alloc(4096, 3)), isEio, 'a later write');
      await assert.rejects(volume.trim(0, 4096), isEio, 'a later trim');
      await assert.rejects(volume.flush(), isEio, 'a later flush');
      await assert.rejects(pool.createSnapshot('v', 's'), isEio, 'a snapshot');
      const read = Buffer.alloc(8192);
      await volume.read(0, read);
      assert.ok(read.every((byte) => byte === 1), 'reads are still served');
      const status = await pool.status();
      assert.match(status.failure ?? '', reason);
      assert.match(status.failure ?? '', /refuses writes until the node restarts/);
      assert.ok(status.commitFailuresTotal >= 1);
      const metrics = await metricsOf(pool);
      assert.match(metrics, /^chunkd_pool_failed 1$/m);
      assert.match(metrics, /^chunkd_pool_commit_failures_total [1-9]/m);
      await volume.close();
      await pool.close();
      // A restart reads back what is durable: the flushed write.
      const reopened = await Pool.open({ directory });
      const again = reopened.openVolume('v');
      const back = Buffer.alloc(8192);
      await again.read(0, back);
      assert.ok(back.every((byte) => byte === 1), 'the flushed write survives the restart');
      assert.equal((await reopened.status()).failure, null, 'a restart clears the failure');
      await again.close();
      await reopened.close();
    });
  });
}

test('a full file system at a background commit fails that commit only: status shows it, the next commit succeeds', async () => {
  const files = new TestFiles([{ op: 'write', path: 'journal-', nth: 1, sticky: true, code: 'ENOSPC', armed: false }]);
  await withPool(
    files,
    async (pool) => {
      await pool.createVolume('v', 4 * MiB);
      const volume = pool.openVolume('v');
      files.arm(0);
      await volume.write(0, Buffer.alloc(4096, 5));
      for (const deadline = Date.now() + 30_000; Date.now() < deadline && (await pool.status()).commitError === null;) await new Promise((resolve) => setTimeout(resolve, 20));
      assert.ok(files.fired(0) >= 1, 'the background commit met ENOSPC');
      const failed = await pool.status();
      assert.match(failed.commitError ?? '', /metadata commit failed: .*no space left/);
      assert.equal(failed.failure, null, 'not a sticky failure');
      assert.ok(failed.commitFailuresTotal >= 1);
      await assert.rejects(volume.flush(), (error) => error instanceof ChunkdError && error.code === 'ENOSPC', 'a flush meanwhile gets ENOSPC');
      // Space again: the next commit succeeds, with the writes the failed ones carried.
      files.disarm(0);
      await volume.write(4096, Buffer.alloc(4096, 6));
      await volume.flush();
      const recovered = await pool.status();
      assert.deepEqual([recovered.commitError, recovered.failure], [null, null]);
      const read = Buffer.alloc(8192);
      await volume.read(0, read);
      assert.ok(read.subarray(0, 4096).every((byte) => byte === 5) && read.subarray(4096).every((byte) => byte === 6));
      await volume.close();
    },
    { backgroundCommitIntervalMs: 20 },
  );
});

for (const metadata of ['memory', 'paged'] as const) {
  test(`a commit that meets a full file system while the pool's files hold free chunks punches them out and commits again at once: the FLUSH succeeds (${metadata} metadata)`, async () => {
    // An overwrite's free chunk keeps its space for the next write (not punched): after overwrites the files can
    // hold the file system's room while much of them is free. The journal's next write fails once with ENOSPC.
    const files = new TestFiles([{ op: 'write', path: 'journal-', nth: 1, code: 'ENOSPC', armed: false }]);
    const lines: string[] = [];
    await withPool(
      files,
      async (pool, directory) => {
        await pool.createVolume('v', 4 * MiB);
        const volume = pool.openVolume('v');
        await volume.write(0, Buffer.alloc(MiB, 1));
        await volume.flush();
        await volume.write(0, Buffer.alloc(MiB, 2));
        await volume.flush();
        await volume.flush(); // the second's frees are reusable once the commit that recorded them is durable
        const chunkFile = path.join(directory, 'chunks', '00000000.chunk');
        const allocatedBefore = fs.statSync(chunkFile).blocks * 512;
        assert.ok(allocatedBefore >= 2 * MiB, `the first MiB's chunks are free and still allocated: ${allocatedBefore}`);
        files.arm(0);
        await volume.write(MiB, Buffer.alloc(4096, 3));
        await volume.flush();
        assert.equal(files.fired(0), 1, 'the first try met ENOSPC');
        const status = await pool.status();
        assert.deepEqual([status.commitError, status.failure], [null, null], 'the commit tried again succeeded');
        assert.ok(status.commitFailuresTotal >= 1);
        const allocatedAfter = fs.statSync(chunkFile).blocks * 512;
        assert.ok(allocatedBefore - allocatedAfter >= MiB - 4096, `the free chunks' space given back: ${allocatedBefore} -> ${allocatedAfter}`);
        assert.ok(status.freeChunksGivenBackBytesTotal >= MiB - 4096, `status counts it: ${status.freeChunksGivenBackBytesTotal}`);
        assert.match(await metricsOf(pool), /^chunkd_pool_free_chunks_given_back_bytes_total [1-9]/m);
        assert.equal(lines.filter((line) => line.includes('punched out of the pool\'s files to give it room')).length, 1, lines.join('\n'));
        const read = Buffer.alloc(MiB + 4096);
        await volume.read(0, read);
        assert.ok(read.subarray(0, MiB).every((byte) => byte === 2) && read.subarray(MiB).every((byte) => byte === 3));
        await volume.close();
      },
      { metadata, log: (line) => lines.push(line) },
    );
  });
}

for (const workers of [false, true]) {
  test(`a disk read error during a scrub is a damaged extent, not an aborted scrub (${workers ? 'worker' : 'inline'} I/O)`, async () => {
    // Chunk 300 of file 0 (a 1 MiB write at 1 MiB lands at chunks 256..511 of a fresh pool) fails every read.
    const files = new TestFiles([{ op: 'read', path: '.chunk', nth: 1, sticky: true, code: 'EIO', atBytes: 300 * 4096, armed: false }]);
    await withPool(
      files,
      async (pool) => {
        await pool.createVolume('v', 4 * MiB);
        const volume = pool.openVolume('v');
        await volume.write(0, Buffer.alloc(MiB, 7));
        await volume.write(MiB, Buffer.alloc(MiB, 8));
        await volume.flush();
        files.arm(0);
        const report = await pool.scrub('v');
        assert.ok(files.fired(0) > 0);
        assert.equal(report.checkedBytes, 2 * MiB);
        assert.equal(report.badChunks, 1, JSON.stringify(report));
        assert.deepEqual(report.badExtents, [{ export: 'v', offsetBytes: MiB + 44 * 4096, lengthBytes: 4096 }]);
        // A client read of that block fails with EIO; the rest of the volume reads.
        await assert.rejects(volume.read(MiB + 44 * 4096, Buffer.alloc(4096)), isEio);
        const rest = Buffer.alloc(MiB);
        await volume.read(0, rest);
        assert.ok(rest.every((byte) => byte === 7));
        await volume.close();
      },
      { workers },
    );
  });
}

test('a failed chunk write on a worker fails that write with EIO, and the next one succeeds', async () => {
  const files = new TestFiles([{ op: 'write', path: '.chunk', nth: 1, code: 'EIO', armed: false }]);
  await withPool(
    files,
    async (pool) => {
      await pool.createVolume('v', 4 * MiB);
      const volume = pool.openVolume('v');
      files.arm(0);
      await assert.rejects(volume.write(0, Buffer.alloc(MiB, 1)), isEio);
      await volume.write(0, Buffer.alloc(MiB, 2));
      await volume.flush();
      const read = Buffer.alloc(MiB);
      await volume.read(0, read);
      assert.ok(read.every((byte) => byte === 2));
      assert.equal((await pool.status()).failure, null);
      await volume.close();
    },
    { workers: true },
  );
});

for (const metadata of ['memory', 'paged'] as const) {
  test(`status and /metrics give the chunk files' span beside the data allocated: an overwrite's old chunks stay in the files, free, and the next write reuses them (${metadata} metadata)`, async () => {
    await withPool(
      realFiles,
      async (pool) => {
        await pool.createVolume('v', 4 * MiB);
        const volume = pool.openVolume('v');
        const spans = async (): Promise<[number, number]> => {
          const status = await pool.status();
          return [status.allocatedBytes, status.chunkFilesBytes];
        };
        await volume.write(0, Buffer.alloc(MiB, 1));
        await volume.flush();
        assert.deepEqual(await spans(), [MiB, MiB], 'one MiB written: the files span it');
        await volume.write(0, Buffer.alloc(MiB, 2));
        await volume.flush();
        await volume.flush();
        assert.deepEqual(await spans(), [MiB, 2 * MiB], 'overwritten: the old chunks stay in the files, free');
        assert.match(await metricsOf(pool), new RegExp(`^chunkd_pool_chunk_files_bytes ${2 * MiB}$`, 'm'));
        await volume.write(0, Buffer.alloc(MiB, 3));
        await volume.flush();
        await volume.flush();
        // Into the first MiB's chunks; the second's, freed now, reach the high-water mark, which the in-memory
        // allocator lowers (the span back to 1 MiB) and the paged one keeps.
        const [allocated, span] = await spans();
        assert.ok(allocated === MiB && span >= MiB && span <= 2 * MiB, `overwritten again: into the free chunks, the span does not grow: ${allocated}, ${span}`);
        await volume.close();
      },
      { metadata },
    );
  });
}

test('an overwrite goes to a new physical chunk; the old one keeps its bytes until the new mapping is committed', async () => {
  // A layer that notes where each chunk write lands.
  const writes: Array<{ file: string; positionBytes: number; lengthBytes: number }> = [];
  const paths = new Map<number, string>();
  const recording: FileLayer = {
    ...realFiles,
    open: async (file, mode) => {
      const fd = await realFiles.open(file, mode);
      paths.set(fd, file);
      return fd;
    },
    write: (fd, data, positionBytes) => {
      if (paths.get(fd)?.endsWith('.chunk')) writes.push({ file: paths.get(fd)!, positionBytes, lengthBytes: data.length });
      return realFiles.write(fd, data, positionBytes);
    },
  };
  await withPool(recording, async (pool) => {
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    await volume.write(8192, Buffer.alloc(4096, 0xaa));
    await volume.flush();
    const [first] = writes.splice(0);
    await volume.write(8192, Buffer.alloc(4096, 0xbb));
    const [second] = writes.splice(0);
    assert.ok(first !== undefined && second !== undefined);
    assert.notEqual(second.positionBytes, first.positionBytes, 'the overwrite was written somewhere else');
    const old = Buffer.alloc(4096);
    const fd = fs.openSync(first.file, 'r');
    fs.readSync(fd, old, 0, 4096, first.positionBytes);
    fs.closeSync(fd);
    assert.ok(old.every((byte) => byte === 0xaa), 'the chunk the committed metadata names still holds its bytes');
    const read = Buffer.alloc(4096);
    await volume.read(8192, read);
    assert.ok(read.every((byte) => byte === 0xbb));
    await volume.close();
  });
});

test.each(['memory', 'paged'] as const)('removing a snapshot punches out what it alone held; with recycle (a replication prune) nothing is punched; both count its chunks free (%s metadata)', async (metadata) => {
  const punches: Array<{ positionBytes: number; lengthBytes: number }> = [];
  const recording: FileLayer = {
    ...realFiles,
    allocate: (fd, mode, offsetBytes, lengthBytes) => {
      if (mode === 'punch') punches.push({ positionBytes: offsetBytes, lengthBytes });
      return realFiles.allocate(fd, mode, offsetBytes, lengthBytes);
    },
  };
  await withPool(recording, async (pool) => {
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    // Scattered 4 KiB blocks, each overwritten after the snapshot: the snapshot alone holds the old chunks.
    const blocks = [3, 40, 77, 300, 511, 900];
    const round = async (byte: number): Promise<void> => {
      for (const block of blocks) await volume.write(block * 4096, Buffer.alloc(4096, byte));
      await volume.flush();
    };
    await round(1);
    for (const [snapshot, recycle, byte] of [['kept', false, 2], ['recycled', true, 3]] as const) {
      await pool.createSnapshot('v', snapshot);
      await round(byte);
      const before = (await pool.status()).allocatedBytes;
      punches.length = 0;
      await pool.removeSnapshot('v', snapshot, { recycle });
      // Over pages a removal's frees may wait for the commit after its own (catalog-backend.ts): one more.
      await pool.checkpoint();
      assert.equal((await pool.status()).allocatedBytes, before - blocks.length * 4096, `${snapshot}: the pool counts the snapshot's chunks free`);
      assert.equal(punches.reduce((sum, punch) => sum + punch.lengthBytes, 0), recycle ? 0 : blocks.length * 4096, `${snapshot}: punched`);
    }
    await round(4);
    for (const block of blocks) {
      const back = Buffer.alloc(4096);
      await volume.read(block * 4096, back);
      assert.ok(back.every((value) => value === 4));
    }
    await volume.close();
  }, { metadata });
});

/** A power-loss layer whose journal writes, once `hold` is set, never reach the disk (a commit stuck before it is durable). */
class JournalHeld extends PowerLossFiles {
  readonly #journals = new Set<number>();
  hold = false;
  /** Resolves at the first journal write held. */
  readonly reached: Promise<void>;
  #reach = (): void => {};

  constructor(root: string) {
    super(root);
    this.reached = new Promise((resolve) => (this.#reach = resolve));
  }

  override async open(file: string, mode: OpenMode): Promise<number> {
    const fd = await super.open(file, mode);
    if (path.basename(file).startsWith('journal')) this.#journals.add(fd);
    return fd;
  }

  override write(fd: number, data: Uint8Array, positionBytes: number): Promise<void> {
    if (!this.hold || !this.#journals.has(fd)) return super.write(fd, data, positionBytes);
    this.#reach();
    return new Promise(() => {});
  }
}

test.each(['memory', 'paged'] as const)('a recycled removal frees nothing before its commit is durable: writes meanwhile, then a power cut, and the snapshot still reads its bytes (%s metadata)', async (metadata) => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-recycle-cut-'));
  try {
    const files = new JournalHeld(directory);
    const pool = await Pool.open({ directory, files, metadata });
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    const blocks = [3, 40, 77, 300, 511, 900];
    const round = async (at: readonly number[], byte: number): Promise<void> => {
      for (const block of at) await volume.write(block * 4096, Buffer.alloc(4096, byte));
      await volume.flush();
    };
    await round(blocks, 1);
    await pool.createSnapshot('v', 's');
    await round(blocks, 2); // the snapshot alone holds the chunks of 1s
    files.hold = true;
    pool.removeSnapshot('v', 's', { recycle: true }).catch(() => {});
    await files.reached;
    // Writes while the removal's commit is not durable: they must not be given the chunks it frees.
    for (const block of blocks) await volume.write((block + 1) * 4096, Buffer.alloc(4096, 3));
    await pool.abandon();
    await files.cut(() => 0.3); // every unsynced sector lands: the writes' data did, the removal's record never left
    const reopened = await Pool.open({ directory, metadata });
    try {
      assert.deepEqual(reopened.listSnapshots('v').map((snapshot) => snapshot.name), ['s'], 'the removal was not durable');
      const device = reopened.openSnapshot('v', 's');
      try {
        for (const block of blocks) {
          const back = Buffer.alloc(4096);
          await device.read(block * 4096, back);
          assert.ok(back.every((value) => value === 1), `v@s block ${block} reads its 1s`);
        }
      } finally {
        await device.close();
      }
    } finally {
      await reopened.close();
    }
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

/** A power cut (`seed` picks which unsynced writes land), then volume v of the reopened pool to `check`, a 4 KiB block at a time. */
async function readAfterPowerCut(files: PowerLossFiles, directory: string, seed: number, check: (readBlock: (block: number) => Promise<Buffer>) => Promise<void>): Promise<void> {
  await files.cut(makeRandom(seed));
  const reopened = await Pool.open({ directory });
  try {
    const volume = reopened.openVolume('v');
    try {
      await check(async (block) => {
        const bytes = Buffer.alloc(4096);
        await volume.read(block * 4096, bytes);
        return bytes;
      });
    } finally {
      await volume.close();
    }
  } finally {
    await reopened.close();
  }
}

for (const metadata of ['memory', 'paged'] as const) {
  test(`a full file system under writes at queue depth 32 (${metadata} metadata): ENOSPC to each write, FLUSH and FUA write, not a commit nor a log line per write; once space is back a flush commits, and a power cut keeps every acknowledged write`, async () => {
    const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
    // A full disk: the journal can neither grow nor be written, new chunk data cannot be written.
    const rules: FaultRule[] = [
      { op: 'write', path: 'journal-', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
      { op: 'allocate', path: 'journal-', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
      { op: 'write', path: '.chunk', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
    ];
    const files = new PowerLossFiles(directory, { rules });
    const lines: string[] = [];
    const isFull = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ENOSPC';
    const block = (value: number): Buffer => Buffer.alloc(4096, value);
    const pool = await Pool.open({ directory, files, metadata, log: (line) => lines.push(line) });
    try {
      await pool.createVolume('v', 16 * MiB);
      const volume = pool.openVolume('v');
      for (let i = 0; i < 64; i++) await volume.write(i * 4096, block(1));
      await volume.flush();
      // Overwrites, acknowledged but not flushed: their old chunks are freed and wait for a commit (what a write
      // that meets ENOSPC asks a commit for).
      for (let i = 0; i < 64; i++) await volume.write(i * 4096, block(2));
      for (let index = 0; index < rules.length; index++) files.inner.arm(index);
      const failuresBefore = (await pool.status()).commitFailuresTotal;
      let writes = 0;
      let flushes = 0;
      for (let round = 0; round < 100; round++) {
        const batch = Array.from({ length: 32 }, (_, k) => volume.write((64 + ((round * 32 + k) % 1024)) * 4096, block(3)));
        for (const result of await Promise.allSettled(batch)) assert.ok(result.status === 'rejected' && isFull(result.reason), `a write on a full disk: ${JSON.stringify(result)}`);
        writes += batch.length;
        if (round % 10 === 9) {
          await assert.rejects(volume.flush(), isFull, 'a FLUSH on a full disk');
          await assert.rejects(volume.write(4096, block(4), { fua: true }), isFull, 'a FUA write on a full disk');
          flushes += 2;
        }
      }
      const failed = await pool.status();
      assert.match(failed.commitError ?? '', /no space left/);
      assert.equal(failed.failure, null, 'not a sticky failure');
      // A commit for each FLUSH (and one a second for the writes that ask for freed chunks), not one per write.
      const commits = failed.commitFailuresTotal - failuresBefore;
      assert.ok(commits >= 1 && commits <= flushes + 10, `${commits} commits failed for ${writes} writes and ${flushes} flushes`);
      const logged = lines.filter((line) => line.includes('metadata commit failed'));
      assert.equal(logged.length, 1, `logged once, not per commit: ${logged.length} lines`);
      // Space again: the next flush commits the acknowledged overwrites; the log says so.
      for (let index = 0; index < rules.length; index++) files.inner.disarm(index);
      await volume.write(200 * 4096, block(5));
      await volume.flush();
      assert.deepEqual([(await pool.status()).commitError, (await pool.status()).failure], [null, null]);
      assert.ok(lines.some((line) => /metadata commits succeed again, after \d+ failed on a full file system/.test(line)), lines.join('\n'));
    } finally {
      files.inner.freeze();
      await pool.abandon();
    }
    try {
      await readAfterPowerCut(files, directory, 7, async (readBlock) => {
        for (let i = 0; i < 64; i++) assert.ok((await readBlock(i)).equals(block(2)), `block ${i}: the acknowledged overwrite, flushed once space was back`);
        assert.ok((await readBlock(200)).equals(block(5)));
        assert.ok((await readBlock(100)).equals(block(0)), 'a write that got ENOSPC left nothing');
      });
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  });
}

for (const metadata of ['memory', 'paged'] as const) {
  test(`free chunks punched out because a commit met a full file system, new writes onto them, then a power cut (${metadata} metadata): every flushed write reads back`, async () => {
    const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
    const files = new PowerLossFiles(directory, { rules: [{ op: 'write', path: 'journal-', nth: 1, code: 'ENOSPC', armed: false }] });
    const lines: string[] = [];
    const block = (value: number): Buffer => Buffer.alloc(4096, value);
    const pool = await Pool.open({ directory, files, metadata, log: (line) => lines.push(line) });
    try {
      await pool.createVolume('v', 4 * MiB);
      const volume = pool.openVolume('v');
      for (let i = 0; i < 256; i++) await volume.write(i * 4096, block(1));
      await volume.flush();
      for (let i = 0; i < 256; i++) await volume.write(i * 4096, block(2));
      await volume.flush();
      await volume.flush(); // the overwritten chunks are free and reusable, their space still in the file
      files.inner.arm(0);
      await volume.write(256 * 4096, block(3));
      await volume.flush();
      assert.equal(files.inner.fired(0), 1, 'the first try met ENOSPC');
      assert.ok(lines.some((line) => line.includes('punched out of the pool\'s files to give it room')), lines.join('\n'));
      // Writes that reuse the punched chunks, flushed; the power is cut after.
      for (let i = 0; i < 128; i++) await volume.write(i * 4096, block(4));
      await volume.flush();
    } finally {
      files.inner.freeze();
      await pool.abandon();
    }
    try {
      await readAfterPowerCut(files, directory, 11, async (readBlock) => {
        for (let i = 0; i < 256; i++) assert.ok((await readBlock(i)).equals(block(i < 128 ? 4 : 2)), `block ${i}`);
        assert.ok((await readBlock(256)).equals(block(3)), 'the write whose FLUSH was committed again');
      });
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  });
}

test('a paged pool whose page file is full at a checkpoint: a FLUSH still succeeds (its records are durable in the journal), an asked-for checkpoint gets ENOSPC and status says so; space back, the checkpoint is written; a power cut keeps every flushed write', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
  // The page file (and its growth) is full; the journal, already reserved ahead, still takes appends.
  const rules: FaultRule[] = [
    { op: 'write', path: 'metadata', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
    { op: 'allocate', path: 'metadata', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
  ];
  const files = new PowerLossFiles(directory, { rules });
  const arm = (on: boolean): void => rules.forEach((_, index) => (on ? files.inner.arm(index) : files.inner.disarm(index)));
  const isFull = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ENOSPC';
  const block = (value: number): Buffer => Buffer.alloc(4096, value);
  const pool = await Pool.open({ directory, files, metadata: 'paged', log: () => {} });
  try {
    await pool.createVolume('v', 16 * MiB);
    const volume = pool.openVolume('v');
    for (let i = 0; i < 64; i++) await volume.write(i * 4096, block(1));
    await volume.flush();
    arm(true);
    await assert.rejects(pool.checkpoint(), isFull, 'a checkpoint asked for on a full file system');
    assert.ok(files.inner.fired(0) + files.inner.fired(1) >= 1, 'the page file met ENOSPC');
    // Every commit from now on tries the owed checkpoint again, and meets ENOSPC: its FLUSH succeeds all the same.
    for (let i = 0; i < 64; i++) await volume.write(i * 4096, block(2));
    await volume.flush();
    await volume.write(64 * 4096, block(2), { fua: true });
    const full = await pool.status();
    assert.match(full.commitError ?? '', /metadata checkpoint failed \(the commits are durable in the journal\): .*no space left/);
    assert.equal(full.failure, null, 'not a sticky failure');
    // Space back: the checkpoint is written, the error cleared.
    arm(false);
    const before = (await pool.status()).checkpointsTotal;
    await pool.checkpoint();
    const back = await pool.status();
    assert.deepEqual([back.commitError, back.failure, back.checkpointsTotal], [null, null, before + 1]);
    // Full again, flushed writes in the journal only; then the power is cut.
    arm(true);
    await assert.rejects(pool.checkpoint(), isFull);
    for (let i = 0; i < 32; i++) await volume.write(i * 4096, block(3));
    await volume.flush();
    assert.match((await pool.status()).commitError ?? '', /metadata checkpoint failed/);
  } finally {
    files.inner.freeze();
    await pool.abandon();
  }
  try {
    await readAfterPowerCut(files, directory, 11, async (readBlock) => {
      for (let i = 0; i < 32; i++) assert.ok((await readBlock(i)).equals(block(3)), `block ${i}: flushed while the page file was full`);
      for (let i = 32; i < 65; i++) assert.ok((await readBlock(i)).equals(block(2)), `block ${i}`);
    });
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('a small write from the NBD payload slab meets a failed pwrite on the chunk writer thread: that write gets EIO and is never recorded, the next succeeds, and after a power cut the flushed one reads back', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
  const files = new PowerLossFiles(directory, { rules: [{ op: 'write', path: '.chunk', nth: 1, code: 'EIO', armed: false }] });
  const buffers = new SharedBufferPool();
  const taken = vi.spyOn(ChunkWriter.prototype, 'write');
  const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
  const pool = await Pool.open({ directory, files, makeIo: (chunkFiles) => new WorkerChunkIo(chunkFiles, { workerCount: 1, buffers, log: () => {} }) });
  try {
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    // As the NBD server hands them over: the payload in the shared slab, which the writer thread writes from.
    const payload = buffers.acquire(4096);
    files.inner.arm(0);
    payload.fill(1);
    await nextTurn();
    await assert.rejects(volume.write(0, payload), isEio);
    assert.equal(files.inner.fired(0), 1);
    assert.ok(taken.mock.results.some((result) => result.value !== null), 'the writer thread took the write that failed');
    const read = Buffer.alloc(4096);
    await volume.read(0, read);
    assert.ok(read.every((byte) => byte === 0), 'the failed write is not recorded: the block reads as before');
    payload.fill(2);
    await nextTurn();
    await volume.write(0, payload);
    await volume.flush();
    assert.equal((await pool.status()).failure, null, 'a failed chunk write is not a sticky failure');
    assert.ok(taken.mock.results.filter((result) => result.value !== null).length >= 2);
    await volume.close();
  } finally {
    taken.mockRestore();
    files.inner.freeze();
    await pool.abandon();
  }
  await files.cut(makeRandom(3));
  const reopened = await Pool.open({ directory });
  try {
    const read = Buffer.alloc(4096);
    const again = reopened.openVolume('v');
    await again.read(0, read);
    assert.ok(read.every((byte) => byte === 2), 'the flushed write survives the power cut');
    await again.close();
  } finally {
    await reopened.close();
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

for (const [metadata, copy, atBytes] of [['memory', 'checkpoint.0', undefined], ['memory', 'journal-', 100], ['paged', 'journal-', 100]] as const) {
  test(`a disk read error (EIO) in one copy of ${copy === 'checkpoint.0' ? 'the checkpoint' : 'a journal'} (${metadata} metadata): the open reads the other copy, fsck calls it repairable, nothing is lost`, async () => {
    const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
    try {
      // A flushed write, then a crash: the journal holds it (a clean close of a paged pool would checkpoint it).
      const first = new TestFiles();
      const pool = await Pool.open({ directory, files: first, metadata });
      await pool.createVolume('v', 4 * MiB);
      const volume = pool.openVolume('v');
      await volume.write(0, Buffer.alloc(4096, 7));
      await volume.flush();
      first.freeze();
      await pool.abandon();
      closeDescriptorsUnder(directory);
      const name = fs.readdirSync(directory).find((entry) => entry.startsWith(copy) && entry.endsWith('.0'))!;
      // A bad sector in the first copy (or the whole of it unreadable): every read there fails with EIO.
      const files = new TestFiles([{ op: 'read', path: name, nth: 1, sticky: true, code: 'EIO', atBytes }]);
      const report = await fsckPool(directory, files);
      assert.ok(!report.clean && report.repairable, report.errors.join('; '));
      assert.ok(report.errors.some((line) => line.includes(`${name} is damaged at byte`) && line.includes('read from the other copy')), report.errors.join('; '));
      const reopened = await Pool.open({ directory, files });
      const again = reopened.openVolume('v');
      const read = Buffer.alloc(4096);
      await again.read(0, read);
      assert.ok(read.every((byte) => byte === 7), 'the flushed write reads back');
      await again.close();
      await reopened.close();
      assert.ok(files.fired(0) > 0, 'the bad sector was met');
      assert.ok((await fsckPool(directory)).clean, 'the open wrote the metadata whole again');
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  });
}

for (const metadata of ['memory', 'paged'] as const) {
  test(`a full file system when the journal reaches its checkpoint size (${metadata} metadata): ENOSPC, not a sticky EIO; once space is back the checkpoint is written and writes go on, and a power cut keeps every acknowledged write`, async () => {
    const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
    // A full disk for the metadata: neither the journal nor a checkpoint (its copies, or the pages and root of the
    // paged metadata) can be written. Chunk data still can (overwrites reuse the chunks their commits free).
    const rules: FaultRule[] = [
      { op: 'write', path: 'journal-', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
      { op: 'allocate', path: 'journal-', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
      { op: 'write', path: 'checkpoint', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
      { op: 'write', path: 'metadata.', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
    ];
    const files = new PowerLossFiles(directory, { rules });
    const isFull = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ENOSPC';
    const block = (value: number): Buffer => Buffer.alloc(4096, value);
    const blocks = 64;
    const pool = await Pool.open({ directory, files, metadata, journalCheckpointBytes: 16 * 1024, log: () => {} });
    const expected = new Map<number, number>();
    try {
      await pool.createVolume('v', 16 * MiB);
      const volume = pool.openVolume('v');
      for (let i = 0; i < blocks; i++) await volume.write(i * 4096, block(1));
      await volume.flush();
      for (let i = 0; i < blocks; i++) expected.set(i, 1);
      const checkpointsBefore = (await pool.status()).checkpointsTotal;
      for (let index = 0; index < rules.length; index++) files.inner.arm(index);
      // Overwrites while full: their records queue past the checkpoint size (37 bytes each, 16 KiB), and every
      // FLUSH meets the full disk, the one that would start the new generation too.
      for (let round = 0; round < 8; round++) {
        for (let i = 0; i < blocks; i++) {
          await volume.write(i * 4096, block(10 + round)).catch((error: unknown) => assert.ok(isFull(error), `a write on a full disk: ${String(error)}`));
        }
        await assert.rejects(volume.flush(), isFull, `a FLUSH on a full disk (round ${round})`);
      }
      const full = await pool.status();
      assert.ok(rules.some((_, index) => index >= 2 && files.inner.fired(index) >= 1), 'a checkpoint met the full disk');
      assert.equal(full.failure, null, 'a full disk is not a sticky failure');
      assert.match(full.commitError ?? '', /no space left/);
      assert.equal(full.checkpointsTotal, checkpointsBefore);
      // Space again: the next flush writes the checkpoint, and writes go on.
      for (let index = 0; index < rules.length; index++) files.inner.disarm(index);
      for (let i = 0; i < blocks; i++) await volume.write(i * 4096, block(30));
      await volume.flush();
      for (let i = 0; i < blocks; i++) expected.set(i, 30);
      const after = await pool.status();
      assert.deepEqual([after.failure, after.commitError], [null, null]);
      assert.ok(after.checkpointsTotal > checkpointsBefore, 'the checkpoint was written once space was back');
      for (let i = 0; i < blocks; i += 2) await volume.write(i * 4096, block(31));
      await volume.flush();
      for (let i = 0; i < blocks; i += 2) expected.set(i, 31);
      await pool.checkpoint();
      for (let i = 1; i < blocks; i += 2) await volume.write(i * 4096, block(32));
      await volume.flush();
      for (let i = 1; i < blocks; i += 2) expected.set(i, 32);
    } finally {
      files.inner.freeze();
      await pool.abandon();
    }
    try {
      await readAfterPowerCut(files, directory, 11, async (readBlock) => {
        for (const [i, value] of expected) {
          const read = await readBlock(i);
          assert.ok(read.equals(block(value)), `block ${i}: the acknowledged ${value}s, read ${read[0]}`);
        }
      });
      assert.deepEqual((await fsckPool(directory)).errors, [], 'fsck finds no damage');
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  });
}

for (const metadata of ['memory', 'paged'] as const) {
  test(`checkpoints that fail on a full file system with one metadata copy written, then a power cut (${metadata} metadata): the pool opens with every acknowledged write, fsck finds no damage`, async () => {
    const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
    // Only the second copy is out of space: each try writes the first copy of its checkpoint (or the pages and
    // root of the paged metadata) whole, then fails.
    const rules: FaultRule[] = [
      { op: 'write', path: 'journal-', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
      { op: 'write', path: 'checkpoint.1', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
      { op: 'write', path: 'metadata.1', nth: 1, sticky: true, code: 'ENOSPC', armed: false },
    ];
    const block = (value: number): Buffer => Buffer.alloc(4096, value);
    const blocks = 64;
    for (const seed of [3, 4]) {
      fs.rmSync(directory, { recursive: true, force: true });
      const files = new PowerLossFiles(directory, { rules: rules.map((rule) => ({ ...rule })) });
      const pool = await Pool.open({ directory, files, metadata, journalCheckpointBytes: 16 * 1024, log: () => {} });
      try {
        await pool.createVolume('v', 16 * MiB);
        const volume = pool.openVolume('v');
        for (let i = 0; i < blocks; i++) await volume.write(i * 4096, block(1));
        await volume.flush();
        for (let index = 0; index < rules.length; index++) files.inner.arm(index);
        for (let round = 0; round < 10; round++) {
          for (let i = 0; i < blocks; i++) await volume.write(i * 4096, block(10 + round)).catch(() => {});
          await volume.flush().catch(() => {});
        }
        assert.equal((await pool.status()).failure, null);
        assert.ok(files.inner.fired(1) + files.inner.fired(2) >= 2, 'checkpoints failed on the second copy');
      } finally {
        files.inner.freeze();
        await pool.abandon();
      }
      await readAfterPowerCut(files, directory, seed, async (readBlock) => {
        for (let i = 0; i < blocks; i++) {
          const read = await readBlock(i);
          // The 1s were acknowledged; an overwrite never was, but its chunk was synced before any checkpoint named it.
          assert.ok(read[0] === 1 || (read[0]! >= 10 && read[0]! < 20), `block ${i} (seed ${seed}) reads ${read[0]}`);
          assert.ok(read.every((value) => value === read[0]), `block ${i} (seed ${seed}) is one write's bytes`);
        }
      });
      assert.deepEqual((await fsckPool(directory)).errors, [], `fsck (seed ${seed})`);
    }
    fs.rmSync(directory, { recursive: true, force: true });
  });
}

/** A file system with a little space left: a journal's reserve ahead (4 MiB) does not fit, a commit's few bytes do. */
class LittleSpaceLeft extends TestFiles {
  refused = 0;
  override allocate(fd: number, mode: AllocateMode, offsetBytes: number, lengthBytes: number): Promise<void> {
    if (lengthBytes <= 64 * 1024) return super.allocate(fd, mode, offsetBytes, lengthBytes);
    this.refused += 1;
    return Promise.reject(Object.assign(new Error('ENOSPC: fallocate (a test)'), { code: 'ENOSPC' }));
  }
}

test('a journal whose reserve ahead does not fit on the file system still takes commits that do', async () => {
  const files = new LittleSpaceLeft();
  await withPool(files, async (pool) => {
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    await volume.write(0, Buffer.alloc(8192, 1));
    await volume.flush();
    assert.ok(files.refused >= 2, 'the reserve ahead was refused');
    assert.deepEqual([(await pool.status()).commitError, (await pool.status()).failure], [null, null]);
  });
});

test('a paged pool whose checkpoint at close meets a full file system closes once every commit is in the journal; the next open replays it', async () => {
  const files = new TestFiles([{ op: 'write', path: 'metadata.', nth: 1, sticky: true, code: 'ENOSPC', armed: false }]);
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-faults-'));
  const lines: string[] = [];
  try {
    const pool = await Pool.open({ directory, files, metadata: 'paged', log: (line) => lines.push(line) });
    await pool.createVolume('v', 4 * MiB);
    const volume = pool.openVolume('v');
    await volume.write(0, Buffer.alloc(8192, 1));
    await volume.flush();
    await volume.write(MiB, Buffer.alloc(8192, 2)); // not flushed: the close commits it
    await volume.close();
    files.arm(0);
    await pool.close();
    assert.ok(files.fired(0) >= 1, 'the checkpoint at close met the full file system');
    assert.ok(lines.some((line) => /the checkpoint at close met a full file system/.test(line)), lines.join('\n'));
    const reopened = await Pool.open({ directory });
    try {
      const again = reopened.openVolume('v');
      const back = Buffer.alloc(8192);
      await again.read(0, back);
      assert.ok(back.every((byte) => byte === 1));
      await again.read(MiB, back);
      assert.ok(back.every((byte) => byte === 2), 'the write the close committed');
      await again.close();
    } finally {
      await reopened.close();
    }
    assert.deepEqual((await fsckPool(directory)).errors, []);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
