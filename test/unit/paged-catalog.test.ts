// The paged catalog (src/store/paged-catalog.ts) against today's in-memory Catalog (metadata.ts's applyRecord):
// random record streams (creates, clones, snapshots, maps with sums, unmaps, rollbacks, removals, resizes, and
// records that must be refused) applied to both, with checkpoints and reopens from the root through a cache of
// four pages and nodes of four entries, give the same volumes and snapshots, the same runs and sums, the same
// diffs, the same chunks referenced (as sets: counts are per leaf, paged-map.test.ts says why) and the same free
// space, every page counted as the trees name it and every page below the mark named once or free; after
// removing everything, every page and chunk is free. Power loss at random points of checkpoints: the root read
// back is the last acknowledged or the one in flight, whole. Passes whose counts span several pages of counts,
// all cold after a reopen. And an open that reads as many pages for a large catalog as for a small one.
// fast-check shrinks a failing sequence; SEED=<n> replays one (FC_PATH=<path> the shrunk case);
// PAGED_CATALOG_RUNS and PAGED_CATALOG_POWER_LOSS_RUNS set the runs.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'vitest';
import fc from 'fast-check';
import { ChunkdError } from '../../src/core/errors.ts';
import { chunkSizeBytes } from '../../src/core/limits.ts';
import { ChunkRefcounts } from '../../src/store/chunk-refcounts.ts';
import { realFiles, type FileLayer } from '../../src/store/file-layer.ts';
import { diffMaps } from '../../src/store/map-diff.ts';
import { applyRecord, emptyCatalog, type Catalog, type MetaRecord } from '../../src/store/metadata.ts';
import { firstDataPage, pageBytes } from '../../src/store/page-file.ts';
import { PagedCatalog, type MapTarget } from '../../src/store/paged-catalog.ts';
import { countsPerPage } from '../../src/store/space-map.ts';
import { closeDescriptorsUnder, PowerLossFiles } from '../../src/testing/power-loss.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

const volumeChunks = 48;
const lookChunks = volumeChunks + 8;
const options = { cacheBytes: 4 * pageBytes, leafCapacity: 4, interiorCapacity: 4 };
const scratch = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-pcatalog-'));
const isCorrupt = (error: unknown): boolean => error instanceof ChunkdError && error.code === 'ECORRUPT';

/** Both sides: today's catalog with its reference counts, and the paged one. */
interface Pair {
  model: Catalog;
  modelRefs: ChunkRefcounts;
  paged: PagedCatalog;
  directory: string;
  files: FileLayer;
  /** Counter for the sums of chunks written (a chunk written again gets a new sum). */
  writes: number;
}

/** Applies a record to both; both refuse it (ECORRUPT) or neither does. Returns whether it was refused. */
async function apply(pair: Pair, record: MetaRecord, label: string): Promise<boolean> {
  let modelError: unknown;
  try {
    applyRecord(pair.model, record, pair.modelRefs);
  } catch (error) {
    modelError = error;
  }
  let pagedError: unknown;
  try {
    // A live write's way: at once when it can (in place, nothing queued), else queued.
    if (!pair.paged.applyNow(record)) await pair.paged.apply(record);
  } catch (error) {
    pagedError = error;
  }
  assert.equal(pagedError === undefined, modelError === undefined, `${label}: refused by one side only (${String(modelError ?? pagedError)})`);
  if (modelError !== undefined) assert.ok(isCorrupt(modelError) && isCorrupt(pagedError), `${label}: ${String(modelError)} / ${String(pagedError)}`);
  return modelError !== undefined;
}

/**
 * Map records applied to the paged side in one `applyMaps` (as a replay applies a journal's writes) and one by one
 * to the model, which stops at the first it refuses; both refuse or neither does. Returns the records not applied.
 */
async function applyBatch(pair: Pair, records: MetaRecord[], label: string): Promise<MetaRecord[]> {
  let modelError: unknown;
  let applied = 0;
  try {
    for (const record of records) {
      applyRecord(pair.model, record, pair.modelRefs);
      applied += 1;
    }
  } catch (error) {
    modelError = error;
  }
  let pagedError: unknown;
  try {
    await pair.paged.applyMaps(records as Array<Extract<MetaRecord, { type: 'map' }>>);
  } catch (error) {
    pagedError = error;
  }
  assert.equal(pagedError === undefined, modelError === undefined, `${label}: refused by one side only (${String(modelError ?? pagedError)})`);
  if (modelError !== undefined) assert.ok(isCorrupt(modelError) && isCorrupt(pagedError), `${label}: ${String(modelError)} / ${String(pagedError)}`);
  return records.slice(applied);
}

/** A map record of fresh chunks from the paged side's allocator, with sums. */
async function mapRecord(pair: Pair, volumeId: number, virtualChunk: number, chunkCount: number): Promise<MetaRecord> {
  const physicalChunk = await pair.paged.chunks.allocate(chunkCount);
  const sums = Uint32Array.from({ length: chunkCount }, (_, i) => (Math.imul(physicalChunk + i + 1, 2654435761) ^ (pair.writes * 40503)) >>> 0);
  pair.writes += 1;
  return { type: 'map', volumeId, virtualChunk, physicalChunk, chunkCount, sums };
}

async function checkpoint(pair: Pair, generation: number): Promise<void> {
  const mark = pair.paged.chunks.deferredMark();
  await pair.paged.checkpoint(generation);
  // Here the checkpoint is what makes frees durable (step 4b: the journal commit).
  pair.paged.chunks.releaseTaken(pair.paged.chunks.takeDeferred(mark));
}

interface Facts {
  volumes: unknown[];
  snapshots: unknown[];
  next: number[];
  runs: Map<string, unknown>;
}

/** What the model says a lookup must give: listings and the runs (with sums) of every map. */
function modelFacts(model: Catalog, chunks = lookChunks): Facts {
  const volumes = [...model.volumes.values()].sort((a, b) => a.id - b.id).map((v) => ({ id: v.id, name: v.name, sizeBytes: v.sizeBytes, mappedCount: v.map.mappedCount }));
  const snapshots = [...model.snapshots.values()]
    .sort((a, b) => a.id - b.id)
    .map((s) => ({ id: s.id, uuid: s.uuid, volumeId: s.volumeId, name: s.name, sizeBytes: s.sizeBytes, createdAtMs: s.createdAtMs, mappedCount: s.map.mappedCount }));
  const runs = new Map<string, unknown>();
  const runsOf = (map: Catalog['volumes'] extends Map<number, infer V> ? (V extends { map: infer M } ? M : never) : never): unknown =>
    map.runs(0, chunks).map((run) => ({ ...run, sums: run.physicalChunk < 0 ? [] : Array.from({ length: run.chunkCount }, (_, i) => model.sums.get(run.physicalChunk + i)) }));
  for (const volume of model.volumes.values()) runs.set(`volume ${volume.id}`, runsOf(volume.map));
  for (const snapshot of model.snapshots.values()) runs.set(`snapshot ${snapshot.id}`, runsOf(snapshot.map));
  return { volumes, snapshots, next: [model.nextVolumeId, model.nextSnapshotId], runs };
}

async function pagedFacts(paged: PagedCatalog, chunks = lookChunks): Promise<Facts> {
  const runs = new Map<string, unknown>();
  for (const volume of paged.volumes()) runs.set(`volume ${volume.id}`, await paged.runs({ volumeId: volume.id }, 0, chunks));
  for (const snapshot of paged.snapshots()) runs.set(`snapshot ${snapshot.id}`, await paged.runs({ snapshotId: snapshot.id }, 0, chunks));
  return { volumes: paged.volumes(), snapshots: paged.snapshots(), next: [paged.nextVolumeId, paged.nextSnapshotId], runs };
}

/** Listings, runs with sums, allocated bytes and diffs equal. */
async function checkLookups(pair: Pair, label: string, chunks = lookChunks): Promise<void> {
  const expected = modelFacts(pair.model, chunks);
  const got = await pagedFacts(pair.paged, chunks);
  assert.deepEqual(got.volumes, expected.volumes, `${label}: volumes`);
  assert.deepEqual(got.snapshots, expected.snapshots, `${label}: snapshots`);
  assert.deepEqual(got.next, expected.next, `${label}: next ids`);
  for (const [key, runs] of expected.runs) assert.deepEqual(got.runs.get(key), runs, `${label}: runs of ${key}`);
  for (const volume of pair.model.volumes.values()) {
    const cached = pair.paged.runsCached({ volumeId: volume.id }, 0, chunks);
    if (cached !== undefined) assert.deepEqual(cached, expected.runs.get(`volume ${volume.id}`), `${label}: cached runs of volume ${volume.id}`);
  }
  for (const volume of pair.model.volumes.values()) assert.equal(pair.paged.allocatedBytes(volume.id), volume.map.mappedCount * chunkSizeBytes, `${label}: allocated bytes of volume ${volume.id}`);
  // Diffs: each snapshot against its volume and against the snapshot taken before it.
  for (const volume of pair.model.volumes.values()) {
    const snapshots = [...volume.snapshots.values()].sort((a, b) => a.id - b.id);
    for (const [i, snapshot] of snapshots.entries()) {
      const against: Array<[MapTarget, Catalog['snapshots'] extends Map<number, infer S> ? S | typeof volume : never]> = [[{ volumeId: volume.id }, volume]];
      if (i > 0) against.push([{ snapshotId: snapshots[i - 1]!.id }, snapshots[i - 1]!]);
      for (const [target, other] of against) {
        assert.deepEqual(await pair.paged.diff({ snapshotId: snapshot.id }, target, chunks), diffMaps(snapshot.map, other.map, chunks), `${label}: diff of snapshot ${snapshot.id} and ${JSON.stringify(target)}`);
      }
    }
  }
}

/**
 * After a checkpoint (deferred frees released): the chunks referenced and the free space as the model's counts
 * say; every page's count the number of maps and interior pages naming it; every page below the mark named once
 * (a tree, the space maps, the table) or free.
 */
async function checkSpace(pair: Pair, label: string): Promise<void> {
  const { paged, modelRefs } = pair;
  const held = new Set<number>();
  for (const run of modelRefs.usedRuns()) for (let c = run.physicalChunk; c < run.physicalChunk + run.chunkCount; c++) held.add(c);
  const highWater = await paged.chunks.settledHighWater();
  assert.equal(highWater, held.size === 0 ? 0 : Math.max(...held) + 1, `${label}: chunk high-water mark`);
  const pin = await paged.chunks.counts.load(Array.from({ length: highWater }, (_, c) => c));
  try {
    for (let c = 0; c < highWater; c++) assert.equal(paged.chunks.get(c) > 0, held.has(c), `${label}: chunk ${c} referenced`);
  } finally {
    pin.release();
  }
  assert.equal(paged.chunks.usedCount, held.size, `${label}: chunks in use`);
  const free: number[] = [];
  for (const extent of await paged.chunks.freeExtents()) for (let c = extent.start; c < extent.start + extent.count; c++) free.push(c);
  assert.deepEqual(free, Array.from({ length: highWater }, (_, c) => c).filter((c) => !held.has(c)), `${label}: free chunks`);

  // Pages: walk every tree from the roots of the table.
  const space = paged.space;
  const expectedCounts = new Map<number, number>();
  const roots = [...paged.volumes().map((v) => ({ volumeId: v.id })), ...paged.snapshots().map((s) => ({ snapshotId: s.id }))];
  const rootPages = roots.map((target) => paged.rootPage(target)).filter((page) => page !== 0);
  const stack = [...rootPages];
  for (const page of rootPages) expectedCounts.set(page, (expectedCounts.get(page) ?? 0) + 1);
  const visited = new Set<number>();
  while (stack.length > 0) {
    const page = stack.pop()!;
    if (visited.has(page)) continue;
    visited.add(page);
    const node = await paged.mapNode(page);
    if (node.kind === 'interior') {
      for (const child of node.children) {
        expectedCounts.set(child, (expectedCounts.get(child) ?? 0) + 1);
        stack.push(child);
      }
    }
  }
  const state = space.pages.state();
  const pagePin = await space.pageRefs.load(Array.from({ length: state.nextPage }, (_, p) => p));
  try {
    for (let page = firstDataPage; page < state.nextPage; page++) assert.equal(space.pageRefs.get(page), expectedCounts.get(page) ?? 0, `${label}: count of page ${page}`);
  } finally {
    pagePin.release();
  }
  const named = [...visited, ...space.ownedPages(), ...paged.tablePages, ...state.free];
  assert.equal(new Set(named).size, named.length, `${label}: a page named twice`);
  assert.equal(space.pages.waitingCount, 0, `${label}: pages waiting after a checkpoint`);
  assert.deepEqual([...named].sort((a, b) => a - b), Array.from({ length: state.nextPage - firstDataPage }, (_, i) => firstDataPage + i), `${label}: every page named once or free`);
}

// The model test.

type Command =
  | { kind: 'create'; size: number }
  | { kind: 'clone'; snapshot: number }
  | { kind: 'snapshot'; volume: number }
  | { kind: 'map'; volume: number; v: number; n: number }
  | { kind: 'maps'; volume: number; writes: Array<{ v: number; n: number }> }
  | { kind: 'unmap'; volume: number; v: number; n: number }
  | { kind: 'rollback'; volume: number; snapshot: number }
  | { kind: 'remove'; volume: number }
  | { kind: 'snapshot-remove'; snapshot: number }
  | { kind: 'resize'; volume: number; size: number }
  | { kind: 'checkpoint'; reopen: boolean };

const pick = fc.nat({ max: 7 });
const commandArbitrary: fc.Arbitrary<Command> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('create' as const), size: fc.integer({ min: 1, max: volumeChunks }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('clone' as const), snapshot: pick }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('snapshot' as const), volume: pick }) },
  { weight: 8, arbitrary: fc.record({ kind: fc.constant('map' as const), volume: pick, v: fc.nat({ max: volumeChunks - 1 }), n: fc.integer({ min: 1, max: 12 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('maps' as const), volume: pick, writes: fc.array(fc.record({ v: fc.nat({ max: volumeChunks - 1 }), n: fc.integer({ min: 1, max: 4 }) }), { minLength: 2, maxLength: 12 }) }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('unmap' as const), volume: pick, v: fc.nat({ max: volumeChunks - 1 }), n: fc.integer({ min: 1, max: 30 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('rollback' as const), volume: pick, snapshot: pick }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('remove' as const), volume: pick }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('snapshot-remove' as const), snapshot: pick }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('resize' as const), volume: pick, size: fc.integer({ min: 1, max: volumeChunks }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('checkpoint' as const), reopen: fc.boolean() }) },
);

/** The record a command stands for in the model's state (null: nothing to apply it to). */
async function recordOf(pair: Pair, command: Command, step: number): Promise<MetaRecord | null> {
  const volumes = [...pair.model.volumes.values()].sort((a, b) => a.id - b.id);
  const snapshots = [...pair.model.snapshots.values()].sort((a, b) => a.id - b.id);
  const volume = 'volume' in command && volumes.length > 0 ? volumes[command.volume % volumes.length]! : undefined;
  const snapshot = 'snapshot' in command && snapshots.length > 0 ? snapshots[command.snapshot % snapshots.length]! : undefined;
  switch (command.kind) {
    case 'create':
      return { type: 'create', volumeId: pair.model.nextVolumeId, name: `v${pair.model.nextVolumeId}`, sizeBytes: command.size * chunkSizeBytes };
    case 'clone':
      return snapshot === undefined ? null : { type: 'clone', volumeId: pair.model.nextVolumeId, name: `v${pair.model.nextVolumeId}`, snapshotId: snapshot.id };
    case 'snapshot':
      return volume === undefined ? null : { type: 'snapshot', volumeId: volume.id, snapshotId: pair.model.nextSnapshotId, name: `s${pair.model.nextSnapshotId}`, createdAtMs: 1_000 + step, uuid: step % 5 === 0 ? undefined : `${step.toString(16).padStart(8, '0')}${'a'.repeat(24)}` };
    case 'map': {
      if (volume === undefined) return null;
      const size = volume.sizeBytes / chunkSizeBytes;
      // Past the end now and then: both sides must refuse it.
      const v = command.v % (size + (step % 11 === 0 ? 4 : 0));
      return mapRecord(pair, volume.id, v, Math.max(1, Math.min(command.n, size - v)));
    }
    case 'maps':
      return null;
    case 'unmap':
      return volume === undefined ? null : { type: 'unmap', volumeId: volume.id, virtualChunk: command.v, chunkCount: command.n };
    case 'rollback': {
      if (volume === undefined || snapshot === undefined) return null;
      // Mostly one of its own snapshots; now and then another volume's, which both must refuse.
      const own = [...volume.snapshots.values()];
      const target = own.length > 0 && step % 7 !== 0 ? own[command.snapshot % own.length]! : snapshot;
      return { type: 'rollback', volumeId: volume.id, snapshotId: target.id };
    }
    case 'remove':
      return volume === undefined ? null : { type: 'remove', volumeId: volume.id };
    case 'snapshot-remove':
      return snapshot === undefined ? null : { type: 'snapshot-remove', snapshotId: snapshot.id };
    case 'resize':
      return volume === undefined ? null : { type: 'resize', volumeId: volume.id, sizeBytes: command.size * chunkSizeBytes };
    case 'checkpoint':
      return null;
  }
}

async function openPair(directory: string, files: FileLayer): Promise<Pair> {
  const model = emptyCatalog();
  return { model, modelRefs: new ChunkRefcounts(() => {}), paged: await PagedCatalog.open(files, directory, options), directory, files, writes: 0 };
}

test('the paged catalog matches applyRecord over random records, checkpoints and reopens through a four-page cache (shrunk on failure)', async () => {
  const seed = testSeed('paged catalog model');
  const seen = { records: 0, refused: 0, reopens: 0, snapshotsMax: 0, pagesMax: 0 };
  await fc.assert(
    fc.asyncProperty(fc.array(commandArbitrary, { minLength: 1, maxLength: 100, size: 'max' }), async (commands) => {
      const directory = scratch();
      const pair = await openPair(directory, realFiles);
      let generation = 0;
      try {
        await apply(pair, { type: 'create', volumeId: 1, name: 'v1', sizeBytes: volumeChunks * chunkSizeBytes }, 'first volume');
        for (const [step, command] of commands.entries()) {
          const label = `step ${step} (${JSON.stringify(command)})`;
          if (command.kind === 'checkpoint') {
            await checkpoint(pair, ++generation);
            await checkSpace(pair, label);
            if (command.reopen) {
              await pair.paged.close();
              pair.paged = await PagedCatalog.open(realFiles, directory, options);
              assert.equal(pair.paged.journalGeneration, generation, `${label}: generation covered`);
              seen.reopens += 1;
              await checkSpace(pair, `${label}, reopened`);
            }
          } else if (command.kind === 'maps') {
            const volumes = [...pair.model.volumes.values()].sort((a, b) => a.id - b.id);
            if (volumes.length === 0) continue;
            const volume = volumes[command.volume % volumes.length]!;
            const size = volume.sizeBytes / chunkSizeBytes;
            // Overlapping writes, and now and then one past the end in the middle: both sides stop there.
            const records: MetaRecord[] = [];
            for (const [i, write] of command.writes.entries()) {
              const v = write.v % (size + (step % 5 === 0 && i === 1 ? 4 : 0));
              records.push(await mapRecord(pair, volume.id, v, Math.max(1, Math.min(write.n, size - v))));
            }
            const left = await applyBatch(pair, records, `${label}: ${records.length} map records`);
            if (left.length > 0) seen.refused += 1;
            for (const record of left) if (record.type === 'map') pair.paged.chunks.release(record.physicalChunk, record.chunkCount);
            seen.records += records.length;
          } else {
            const record = await recordOf(pair, command, step);
            if (record === null) continue;
            if (await apply(pair, record, `${label}: ${JSON.stringify({ ...record, sums: undefined })}`)) {
              seen.refused += 1;
              // A write whose record is refused gives its chunks back (chunk-store.ts does on a failed write).
              if (record.type === 'map') pair.paged.chunks.release(record.physicalChunk, record.chunkCount);
            }
            seen.records += 1;
          }
          seen.snapshotsMax = Math.max(seen.snapshotsMax, pair.model.snapshots.size);
          seen.pagesMax = Math.max(seen.pagesMax, pair.paged.space.pages.state().nextPage);
          await checkLookups(pair, label);
        }
        // Remove everything: every chunk and page comes back.
        for (const snapshot of [...pair.model.snapshots.values()]) await apply(pair, { type: 'snapshot-remove', snapshotId: snapshot.id }, 'removing snapshots');
        for (const volume of [...pair.model.volumes.values()]) await apply(pair, { type: 'remove', volumeId: volume.id }, 'removing volumes');
        await checkpoint(pair, ++generation);
        await checkSpace(pair, 'all removed');
        assert.equal(pair.paged.chunks.usedCount, 0);
        const state = pair.paged.space.pages.state();
        assert.equal(state.free.length + pair.paged.space.ownedPages().length + pair.paged.tablePages.length, state.nextPage - firstDataPage, 'every page free but the space maps\' and the table\'s');
      } finally {
        await pair.paged.close();
        fs.rmSync(directory, { recursive: true, force: true });
      }
    }),
    { seed, numRuns: Number(process.env.PAGED_CATALOG_RUNS ?? 60), ...(process.env.FC_PATH ? { path: process.env.FC_PATH } : {}), interruptAfterTimeLimit: 60_000, markInterruptAsFailure: true },
  );
  console.log(`# ${JSON.stringify(seen)}`);
  assert.ok(seen.reopens > 10 && seen.refused > 10 && seen.snapshotsMax >= 5 && seen.pagesMax > 60, JSON.stringify(seen));
});

test('power loss at random points of checkpoints leaves the last acknowledged root or the one in flight, whole', async () => {
  const seed = testSeed('paged catalog power loss');
  const random = makeRandom(seed);
  const runs = Number(process.env.PAGED_CATALOG_POWER_LOSS_RUNS ?? 30);
  const outcomes = { committed: 0, inFlight: 0 };
  /** A few random records, to both sides. */
  const change = async (pair: Pair, step: number): Promise<void> => {
    const kinds: Command['kind'][] = ['map', 'map', 'map', 'map', 'unmap', 'snapshot', 'clone', 'snapshot-remove', 'rollback', 'create', 'resize'];
    for (let i = 0; i < 8; i++) {
      const kind = kinds[randomInt(random, kinds.length)]!;
      const command = { kind, volume: randomInt(random, 8), snapshot: randomInt(random, 8), v: randomInt(random, volumeChunks), n: 1 + randomInt(random, 12), size: 1 + randomInt(random, volumeChunks) } as Command;
      const record = await recordOf(pair, command, step * 10 + i);
      if (record !== null && (await apply(pair, record, `record ${step}.${i}`)) && record.type === 'map') pair.paged.chunks.release(record.physicalChunk, record.chunkCount);
    }
  };
  for (let run = 0; run < runs; run++) {
    const directory = scratch();
    try {
      const facts: Facts[] = [];
      const before = await openPair(directory, realFiles);
      await apply(before, { type: 'create', volumeId: 1, name: 'v1', sizeBytes: volumeChunks * chunkSizeBytes }, 'create');
      for (let generation = 1; generation <= 2; generation++) {
        await change(before, generation);
        await checkpoint(before, generation);
        facts[generation] = modelFacts(before.model);
      }
      await before.paged.close();

      // The same model goes on over the power-loss layer.
      const files = new PowerLossFiles(directory, { crashAtChange: 1 + randomInt(random, 150) });
      const crashed = files.inner.untilFrozen().then(() => 'crashed' as const);
      let acknowledged = 2;
      const pair: Pair = { ...before, files, paged: undefined as unknown as PagedCatalog };
      const work = (async () => {
        pair.paged = await PagedCatalog.open(files, directory, options);
        for (let generation = 3; ; generation++) {
          await change(pair, generation);
          facts[generation] = modelFacts(pair.model);
          await checkpoint(pair, generation);
          acknowledged = generation;
        }
      })();
      work.catch(() => {});
      await Promise.race([crashed, work]);
      await files.cut(random);
      closeDescriptorsUnder(directory);
      if (process.env.PAGED_CATALOG_DEBUG) console.log(`# run ${run}: acknowledged ${acknowledged}, changes ${files.inner.changeCount}`);

      const after = await PagedCatalog.open(realFiles, directory, options);
      try {
        const generation = after.journalGeneration;
        assert.ok(generation === acknowledged || generation === acknowledged + 1, `run ${run}: root of generation ${generation} after ${acknowledged} acknowledged (SEED=${seed})`);
        if (generation === acknowledged) outcomes.committed += 1;
        else outcomes.inFlight += 1;
        const expected = facts[generation]!;
        const got = await pagedFacts(after);
        assert.deepEqual(got.volumes, expected.volumes, `run ${run}: volumes (SEED=${seed})`);
        assert.deepEqual(got.snapshots, expected.snapshots, `run ${run}: snapshots (SEED=${seed})`);
        assert.deepEqual(got.next, expected.next, `run ${run}: next ids (SEED=${seed})`);
        for (const [key, runsExpected] of expected.runs) assert.deepEqual(got.runs.get(key), runsExpected, `run ${run}: runs of ${key} (SEED=${seed})`);
        // Whole: the space maps agree with the trees (chunks the maps name are the ones counted).
        const named = new Set<number>();
        for (const runsOfMap of got.runs.values()) for (const r of runsOfMap as Array<{ physicalChunk: number; chunkCount: number }>) if (r.physicalChunk >= 0) for (let c = r.physicalChunk; c < r.physicalChunk + r.chunkCount; c++) named.add(c);
        const highWater = await after.chunks.settledHighWater();
        const pin = await after.chunks.counts.load(Array.from({ length: highWater }, (_, c) => c));
        try {
          for (let c = 0; c < highWater; c++) assert.equal(after.chunks.get(c) > 0, named.has(c), `run ${run}: chunk ${c} counted (SEED=${seed})`);
        } finally {
          pin.release();
        }
        assert.equal(after.chunks.usedCount, named.size, `run ${run}: chunks in use (SEED=${seed})`);
      } finally {
        await after.close();
      }
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  }
  console.log(`# ${runs} crashes: the last acknowledged root ${outcomes.committed} times, the one in flight ${outcomes.inFlight} times`);
  assert.ok(outcomes.committed > 0, JSON.stringify(outcomes));
});

test('passes whose chunks and pages span several pages of counts, evicted between checkpoints, load them all', async () => {
  const directory = scratch();
  const pair = await openPair(directory, realFiles);
  const chunks = 3 * countsPerPage + 100;
  const label = (what: string): string => `large: ${what}`;
  try {
    await apply(pair, { type: 'create', volumeId: 1, name: 'v1', sizeBytes: chunks * chunkSizeBytes }, label('create'));
    // Leaves of four entries: about chunks / 3 leaves, more map pages than one page of counts holds.
    for (let v = 0; v < chunks; v += 500) await apply(pair, await mapRecord(pair, 1, v, Math.min(500, chunks - v)), label(`map ${v}`));
    await apply(pair, { type: 'snapshot', volumeId: 1, snapshotId: 1, name: 's1', createdAtMs: 1, uuid: 'b'.repeat(32) }, label('snapshot'));
    await checkpoint(pair, 1);
    // Reopened: nothing of counts in memory.
    await pair.paged.close();
    pair.paged = await PagedCatalog.open(realFiles, directory, options);
    // Runs across the boundaries of pages of counts (of chunks freed and of chunks copied with shared leaves).
    for (const v of [countsPerPage - 50, 2 * countsPerPage - 30, 3 * countsPerPage - 10, 17, 5000]) await apply(pair, await mapRecord(pair, 1, v, 100), label(`overwrite ${v}`));
    await apply(pair, { type: 'unmap', volumeId: 1, virtualChunk: countsPerPage - 200, chunkCount: 400 }, label('unmap'));
    await checkpoint(pair, 2);
    await checkLookups(pair, label('after checkpoint'), chunks);
    await checkSpace(pair, label('after checkpoint'));
    assert.ok(pair.paged.space.pages.state().nextPage > countsPerPage && (await pair.paged.chunks.settledHighWater()) > 2 * countsPerPage, 'counts on several pages');
    await apply(pair, { type: 'rollback', volumeId: 1, snapshotId: 1 }, label('rollback'));
    await apply(pair, { type: 'snapshot-remove', snapshotId: 1 }, label('snapshot-remove'));
    await apply(pair, { type: 'remove', volumeId: 1 }, label('remove'));
    await checkpoint(pair, 3);
    await checkSpace(pair, label('all removed'));
    assert.equal(pair.paged.chunks.usedCount, 0);
  } finally {
    await pair.paged.close();
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('opening reads the root, the table and the space maps\' summaries: as many pages for a large catalog as for a small one', async () => {
  /** Pages read by an open of a catalog holding `chunks` chunks mapped in one volume and a snapshot of it. */
  const readsAtOpen = async (chunks: number): Promise<number> => {
    const directory = scratch();
    try {
      const pair = await openPair(directory, realFiles);
      await apply(pair, { type: 'create', volumeId: 1, name: 'v1', sizeBytes: chunks * chunkSizeBytes }, 'create');
      for (let v = 0; v < chunks; v += 500) await apply(pair, await mapRecord(pair, 1, v, Math.min(500, chunks - v)), `map ${v}`);
      await apply(pair, { type: 'snapshot', volumeId: 1, snapshotId: 1, name: 's1', createdAtMs: 1, uuid: 'c'.repeat(32) }, 'snapshot');
      await checkpoint(pair, 1);
      await pair.paged.close();
      let reads = 0;
      const counting: FileLayer = Object.assign(Object.create(realFiles) as FileLayer, {
        read: (fd: number, target: Uint8Array, position: number) => {
          reads += 1;
          return realFiles.read(fd, target, position);
        },
        // Every page read through read(), counted (none from the OS page cache in one call).
        readCached: () => -1,
      });
      const paged = await PagedCatalog.open(counting, directory, options);
      const atOpen = reads;
      assert.equal(paged.volumes()[0]!.mappedCount, chunks);
      assert.equal((await paged.runs({ snapshotId: 1 }, 0, chunks)).length, 1, 'the snapshot reads back whole');
      assert.ok(reads > atOpen + chunks / 8, 'its pages are read when looked up, not at open');
      await paged.close();
      return atOpen;
    } finally {
      fs.rmSync(directory, { recursive: true, force: true });
    }
  };
  const small = await readsAtOpen(10);
  const large = await readsAtOpen(4000);
  console.log(`# reads at open: ${small} for 10 chunks, ${large} for 4,000 chunks (about 1,500 map pages)`);
  assert.ok(large <= small + 2, `reads at open: ${small} for 10 chunks, ${large} for 4,000`);
});
