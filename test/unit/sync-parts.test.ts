// The pure parts of synchronous replicas: the syncWrite codec (round trips, and a seeded fuzz in which only our
// own EPROTO may come out), the region sets of the dirty map, and the activity log's rule, checked against a
// model: a region leaves the log only when every write to it finished before a flush that has completed started.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { ActivityLog, RegionSet, regionsOf } from '../../src/replication/dirty-map.ts';
import { differingRuns, regionBatches } from '../../src/replication/sync-replicas.ts';
import { encodeSyncSumsReply, encodeSyncWrite, isFencedRefusal, parseSyncControl, parseSyncSums, parseSyncSumsReply, parseSyncFlush, parseSyncOpen, parseSyncOpenReply, parseSyncRead, parseSyncWrite, SyncOp, syncReadBytesMax, type SyncWriteRequest } from '../../src/replication/sync-messages.ts';
import { makeRandom, randomInt, testSeed } from '../helpers/random.ts';

function roundTrip(request: SyncWriteRequest): SyncWriteRequest {
  return parseSyncWrite(Buffer.concat(encodeSyncWrite(request)));
}

test('syncWrite: every op round-trips with its flags, epoch, range and data', () => {
  const data = Buffer.from('some bytes to replicate');
  const write = { op: SyncOp.write, fua: true, noHole: false, volume: 'vol-1', epoch: 7, session: 0xfffffffe, offsetBytes: 2 ** 40 + 4096, lengthBytes: data.length, data };
  const back = roundTrip(write);
  assert.deepEqual({ ...back, data: null }, { ...write, data: null });
  assert.deepEqual(back.data, data);
  const trim = { op: SyncOp.trim, fua: false, noHole: false, volume: 'v', epoch: 1, session: 1, offsetBytes: 0, lengthBytes: 3 * 2 ** 30, data: null };
  assert.deepEqual(roundTrip(trim), trim);
  const zeroes = { op: SyncOp.zeroes, fua: true, noHole: true, volume: 'v', epoch: 0xffffffff, session: 2, offsetBytes: 512, lengthBytes: 4096, data: null };
  assert.deepEqual(roundTrip(zeroes), zeroes);
});

test('syncWrite: malformed payloads are refused with EPROTO, and a seeded fuzz lets nothing else out', () => {
  const valid = Buffer.concat(encodeSyncWrite({ op: SyncOp.write, fua: false, noHole: false, volume: 'vol', epoch: 3, session: 5, offsetBytes: 4096, lengthBytes: 8, data: Buffer.alloc(8, 1) }));
  const refused = (payload: Buffer, pattern: RegExp): void => {
    assert.throws(() => parseSyncWrite(payload), (error: unknown) => error instanceof ChunkdError && error.code === 'EPROTO' && pattern.test(error.message));
  };
  refused(valid.subarray(0, 10), /shorter than its header/);
  refused(valid.subarray(0, valid.length - 1), /a write of 8 bytes carries 7/);
  const badOp = Buffer.from(valid);
  badOp[0] = 9;
  refused(badOp, /unknown op 9/);
  const badFlags = Buffer.from(valid);
  badFlags[1] = 2;
  refused(badFlags, /NO_HOLE is for write zeroes only/);
  const noEpoch = Buffer.from(valid);
  noEpoch.writeUInt32BE(0, 4);
  refused(noEpoch, /epoch/);
  const badName = Buffer.from(valid);
  badName[28] = '/'.charCodeAt(0);
  refused(badName, /valid volume name/);
  const trimWithData = Buffer.concat([...encodeSyncWrite({ op: SyncOp.trim, fua: false, noHole: false, volume: 'vol', epoch: 1, session: 5, offsetBytes: 0, lengthBytes: 8, data: null }), Buffer.alloc(1)]);
  refused(trimWithData, /carries no data/);

  const seed = testSeed('syncWrite fuzz');
  const random = makeRandom(seed);
  for (let round = 0; round < 5000; round++) {
    const payload = Buffer.from(valid.subarray(0, randomInt(random, valid.length + 1)));
    for (let flips = randomInt(random, 4); flips >= 0; flips--) if (payload.length > 0) payload[randomInt(random, payload.length)] = randomInt(random, 256);
    try {
      parseSyncWrite(payload);
    } catch (error) {
      assert.ok(error instanceof ChunkdError && error.code === 'EPROTO', `seed ${seed} round ${round}: ${String(error)}`);
    }
  }
});

test('syncOpen and syncFlush payloads are checked; a fence is told apart from other refusals', () => {
  assert.deepEqual(parseSyncOpen(Buffer.from('{"volume":"vol","epoch":2,"sizeBytes":4096}')), { volume: 'vol', epoch: 2, sizeBytes: 4096 });
  assert.throws(() => parseSyncOpen(Buffer.from('{"volume":"vol","epoch":2}')), /syncOpen needs sizeBytes/);
  assert.throws(() => parseSyncFlush(Buffer.from('{"volume":"vol","epoch":0,"session":1}')), /syncFlush needs an epoch/);
  assert.deepEqual(parseSyncFlush(Buffer.from('{"volume":"vol","epoch":1,"session":9}')), { volume: 'vol', epoch: 1, session: 9 });
  assert.throws(() => parseSyncFlush(Buffer.from('{"volume":"vol","epoch":1}')), /syncFlush needs a session/);
  const read = (fields: object): Buffer => Buffer.from(JSON.stringify({ volume: 'vol', epoch: 1, session: 9, ...fields }));
  assert.deepEqual(parseSyncRead(read({ offsetBytes: 8192, lengthBytes: 4096 })), { volume: 'vol', epoch: 1, session: 9, offsetBytes: 8192, lengthBytes: 4096 });
  assert.throws(() => parseSyncRead(read({ offsetBytes: 0, lengthBytes: syncReadBytesMax + 1 })), /syncRead needs lengthBytes, 1 to 65536/);
  assert.throws(() => parseSyncRead(read({ offsetBytes: 0, lengthBytes: 0 })), /syncRead needs lengthBytes/);
  assert.throws(() => parseSyncRead(read({ offsetBytes: -1, lengthBytes: 4096 })), /syncRead needs offsetBytes/);
  assert.throws(() => parseSyncRead(read({ offsetBytes: 0, lengthBytes: 4096, session: undefined })), /syncRead needs a session/);
  assert.equal(parseSyncOpenReply(Buffer.from('{"session":3}')), 3);
  assert.equal(isFencedRefusal(ChunkdError.readOnly('fenced: alpha writes vol at ownership epoch 1, but ...')), true);
  // The client's own EPERM for a connection closed without an answer is not a fence: the replica is only away.
  assert.equal(isFencedRefusal(ChunkdError.readOnly('the peer at 127.0.0.1:1 closed the connection without an answer')), false);
  assert.equal(isFencedRefusal(ChunkdError.io('fenced: not EPERM')), false);
});

test('region sets: runs round-trip, runs outside the volume are refused as corrupt, extents scale to regions', () => {
  assert.deepEqual(regionsOf(0, 1, 65536), [0, 1]);
  assert.deepEqual(regionsOf(65535, 2, 65536), [0, 2]);
  assert.deepEqual(regionsOf(131072, 65536, 65536), [2, 3]);
  const set = new RegionSet();
  assert.equal(set.addRange(3, 6), true);
  assert.equal(set.addRange(4, 5), false);
  set.addRange(9, 10);
  assert.deepEqual(set.toRuns(), [[3, 3], [9, 1]]);
  assert.deepEqual(RegionSet.fromRuns(set.toRuns(), 10, 'test').sorted(), [3, 4, 5, 9]);
  assert.throws(() => RegionSet.fromRuns([[9, 2]], 10, 'sync.json'), /sync\.json: \[9,2\] is not a run of regions inside the volume/);
  assert.throws(() => RegionSet.fromRuns({}, 10, 'sync.json'), /not a list of runs/);
  // Activity-log extents as dirty-map regions: 4 each here, the last one cut at the volume's end.
  const extents = new RegionSet();
  extents.addRange(0, 1);
  extents.addRange(2, 3);
  assert.deepEqual(extents.scaled(4, 10).sorted(), [0, 1, 2, 3, 8, 9]);
  // A shrink: regions past the end go, in memory and from runs a crash left before the state file followed.
  assert.equal(set.truncate(5), true);
  assert.deepEqual(set.sorted(), [3, 4]);
  assert.equal(set.truncate(5), false);
  assert.deepEqual(RegionSet.fromRuns([[3, 3], [9, 1]], 100, 'test', 5).sorted(), [3, 4]);
});

test('syncControl payloads: each action with what it needs, anything else refused', () => {
  const target = { volume: 'vol', epoch: 2, session: 7 };
  const uuid = 'ab'.repeat(16);
  const parse = (value: object) => parseSyncControl(Buffer.from(JSON.stringify({ ...target, ...value })));
  assert.deepEqual(parse({ action: 'snapshot', name: 's1', uuid }), { ...target, action: 'snapshot', name: 's1', uuid });
  assert.deepEqual(parse({ action: 'rollback', name: 's1', uuid }), { ...target, action: 'rollback', name: 's1', uuid });
  assert.deepEqual(parse({ action: 'resize', sizeBytes: 8192 }), { ...target, action: 'resize', sizeBytes: 8192 });
  assert.throws(() => parse({ action: 'resize' }), /syncControl resize needs sizeBytes/);
  assert.throws(() => parse({ action: 'snapshot', name: '../x', uuid }), /needs a valid snapshot name/);
  assert.throws(() => parse({ action: 'remove-snapshot', name: 's1', uuid: 'AB'.repeat(16) }), /needs the snapshot's id/);
  assert.throws(() => parse({ action: 'clone', name: 's1', uuid }), /unknown action "clone"/);
  assert.throws(() => parseSyncControl(Buffer.from(JSON.stringify({ volume: 'vol', epoch: 2, action: 'resize', sizeBytes: 1 }))), /syncControl needs a session/);
});

test('activity log: a region leaves only when a completed flush started after its last write finished, and one more passed', () => {
  const log = new ActivityLog();
  assert.equal(log.begin(1, 2), true, 'a new region: the state file first');
  assert.equal(log.begin(2, 3), true);
  assert.equal(log.begin(2, 3), false, 'a second write to an active region');
  log.end(2, 3);
  log.end(2, 3);
  const early = log.flushStarted();
  log.end(1, 2);
  log.flushDone(early);
  assert.deepEqual(log.active.sorted(), [1, 2], 'region 1 was in flight when the flush started, region 2 was written in the interval before it');
  const second = log.flushStarted();
  log.flushDone(second);
  assert.deepEqual(log.active.sorted(), [1], 'region 2 was cold for a whole interval');
  const third = log.flushStarted();
  log.flushDone(third);
  assert.deepEqual(log.active.sorted(), []);
});

test('activity log against a model: no region leaves while a write to it may be on one side only (seeded)', () => {
  const seed = testSeed('activity log model');
  const random = makeRandom(seed);
  const regions = 8;
  for (let round = 0; round < 200; round++) {
    const log = new ActivityLog();
    let clock = 0;
    /** Per region: writes in flight, and when the last one finished. */
    const inFlight = new Array<number>(regions).fill(0);
    const finishedAt = new Array<number>(regions).fill(-1);
    const writes: Array<[number, number]> = [];
    const flushes: Array<{ generation: number; startedAt: number }> = [];
    let coveredBefore = -1;
    for (let step = 0; step < 100; step++) {
      clock += 1;
      const choice = randomInt(random, 4);
      if (choice === 0) {
        const first = randomInt(random, regions);
        const end = first + 1 + randomInt(random, regions - first);
        log.begin(first, end);
        for (let region = first; region < end; region++) inFlight[region]! += 1;
        writes.push([first, end]);
      } else if (choice === 1 && writes.length > 0) {
        const [first, end] = writes.splice(randomInt(random, writes.length), 1)[0]!;
        log.end(first, end);
        for (let region = first; region < end; region++) {
          inFlight[region]! -= 1;
          finishedAt[region] = clock;
        }
      } else if (choice === 2) {
        flushes.push({ generation: log.flushStarted(), startedAt: clock });
      } else if (flushes.length > 0) {
        const flush = flushes.splice(randomInt(random, flushes.length), 1)[0]!;
        log.flushDone(flush.generation);
        coveredBefore = Math.max(coveredBefore, flush.startedAt);
      }
      for (let region = 0; region < regions; region++) {
        const written = inFlight[region]! > 0 || finishedAt[region]! >= 0;
        if (!written || log.active.has(region)) continue;
        assert.equal(inFlight[region], 0, `seed ${seed} round ${round}: region ${region} left the log with a write in flight`);
        assert.ok(finishedAt[region]! < coveredBefore, `seed ${seed} round ${round}: region ${region} left the log before a flush covered its write`);
      }
    }
  }
});

test('syncSums: the request is checked, the checksums round-trip, and the chunks that differ come out as runs', () => {
  const target = { volume: 'vol', epoch: 1, session: 2 };
  assert.deepEqual(parseSyncSums(Buffer.from(JSON.stringify({ ...target, firstChunk: 1024, chunkCount: 1024 }))), { ...target, firstChunk: 1024, chunkCount: 1024 });
  assert.throws(() => parseSyncSums(Buffer.from(JSON.stringify({ ...target, firstChunk: 0, chunkCount: 1025 }))), /syncSums needs chunkCount, from 1 to 1024/);
  assert.throws(() => parseSyncSums(Buffer.from(JSON.stringify({ ...target, firstChunk: -1, chunkCount: 1 }))), /syncSums needs firstChunk/);
  const sums = Uint32Array.from([0, 1, 0xffffffff, 0x12345678]);
  const reply = Buffer.from(JSON.stringify(encodeSyncSumsReply(sums)));
  assert.deepEqual(parseSyncSumsReply(reply, 4), sums);
  assert.throws(() => parseSyncSumsReply(reply, 5), /syncSums reply: 5 checksums expected/);
  assert.deepEqual(differingRuns(Uint32Array.from([1, 2, 3, 4, 5]), Uint32Array.from([1, 0, 0, 4, 0])), [[1, 3], [4, 5]]);
  assert.deepEqual(differingRuns(sums, sums), []);
});

test('regionBatches: a resync steps over runs of adjacent regions, capped in length and cut at extent boundaries', () => {
  assert.deepEqual(regionBatches([], 4, 8), []);
  assert.deepEqual(regionBatches([0, 1, 2, 3, 4, 5, 9, 10, 12], 4, 64), [[0, 4], [4, 6], [9, 11], [12, 13]]);
  // 6, 7 | 8, 9 cross an extent of 8 regions: two steps, each within one syncSums reply.
  assert.deepEqual(regionBatches([6, 7, 8, 9], 4, 8), [[6, 8], [8, 10]]);
  const all = Array.from({ length: 100 }, (_, index) => index);
  const batches = regionBatches(all, 16, 64);
  assert.deepEqual(batches.flatMap(([first, end]) => Array.from({ length: end - first }, (_, index) => first + index)), all);
  assert.ok(batches.every(([first, end]) => end - first <= 16 && Math.floor(first / 64) === Math.floor((end - 1) / 64)));
  assert.throws(() => regionBatches([3, 2], 4, 8));
});
