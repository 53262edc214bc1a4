// The pure parts of replicas over the peer port: the rate limiter's schedule, the byte feed between peer frames
// and the stream receiver (backpressure, end, a dropped link), the replication verbs' payload checks (anything
// malformed is EPROTO), and the CLI's durations and rates.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { ChunkdError } from '../../src/core/errors.ts';
import { formatDuration, parseDuration, parseRate } from '../../src/core/units.ts';
import { ByteFeed } from '../../src/replication/byte-feed.ts';
import { parsePrune, parseReceiveOpen, parseReceiveResult, parseReplicaInfo } from '../../src/replication/peer-messages.ts';
import { RateLimiter } from '../../src/replication/rate-limit.ts';
import { readStateFile, writeStateFile } from '../../src/replication/state-file.ts';

test('the rate limiter keeps any stretch at or under its rate, with a small burst, and does not bank idle time', () => {
  const limiter = new RateLimiter(1000, 50); // 1000 bytes/s: 1 byte per ms
  let now = 0;
  let sent = 0;
  // A sender that sends 100 bytes whenever it is allowed, for 10 simulated seconds.
  for (;;) {
    now += limiter.reserve(100, now);
    if (now >= 10_000) break;
    sent += 100;
  }
  assert.ok(sent <= 10_000 + 100 + 50, `sent ${sent} bytes in 10 s at 1000 bytes/s`);
  assert.ok(sent >= 10_000 - 100, `sent ${sent}: the limit is reached, not undershot`);
  // After a long idle stretch only the burst is free, not the whole idle time.
  now += 60_000;
  assert.equal(limiter.reserve(50, now), 0);
  assert.equal(limiter.reserve(1000, now), 0, 'a piece goes at once; the wait it causes falls on the next');
  assert.equal(limiter.reserve(1, now), 1000, 'then the sender waits the time those 1000 bytes take');
});

test('a sender that pays after it sends waits for the bytes it sent: 8 pieces of 125 bytes at 1000 bytes/s take 950 ms (the burst is 50)', () => {
  const limiter = new RateLimiter(1000, 50);
  let now = 0;
  for (let piece = 0; piece < 8; piece++) now += limiter.settle(125, now);
  assert.equal(now, 950);
  // After an idle stretch, again only the burst is free.
  now += 60_000;
  assert.equal(limiter.settle(50, now), 0);
  assert.equal(limiter.settle(100, now), 100);
});

test('the byte feed: a push resolves once its bytes are taken, end ends the iteration, fail reaches the consumer', async () => {
  const feed = new ByteFeed();
  const iterator = feed[Symbol.asyncIterator]();
  let taken = false;
  const push = feed.push(Buffer.from('one')).then(() => (taken = true));
  const first = await iterator.next();
  assert.equal(first.value?.toString(), 'one');
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(taken, false, 'not acknowledged until the consumer asks for the next piece');
  const second = iterator.next();
  await push;
  assert.equal(taken, true);
  feed.end();
  assert.equal((await second).done, true);
  await assert.rejects(feed.push(Buffer.from('late')), /after the stream was ended/);

  const dropped = new ByteFeed();
  const reader = dropped[Symbol.asyncIterator]();
  const waiting = reader.next();
  dropped.fail(ChunkdError.io('the link dropped'));
  await assert.rejects(waiting, /the link dropped/);

  // The consumer done early (a refused stream): what is queued and what comes later get its outcome.
  const refused = new ByteFeed();
  const queued = refused.push(Buffer.from('x'));
  refused.close(ChunkdError.protocol('wrong base'));
  await assert.rejects(queued, /wrong base/);
  await assert.rejects(refused.push(Buffer.from('y')), /wrong base/);
});

test('replication verbs: malformed payloads are EPROTO; sound ones parse', () => {
  const json = (value: unknown) => Buffer.from(JSON.stringify(value));
  const eproto = (fn: () => unknown) => assert.throws(fn, (error: unknown) => error instanceof ChunkdError && error.code === 'EPROTO');
  assert.deepEqual(parseReceiveOpen(json({ volume: 'vol', epoch: 3 })), { volume: 'vol', epoch: 3 });
  assert.deepEqual(parseReceiveOpen(json({ volume: 'vol', epoch: 3, replace: true })), { volume: 'vol', epoch: 3, replace: true });
  eproto(() => parseReceiveOpen(json({ volume: 'vol', epoch: 3, replace: 'yes' })));
  eproto(() => parseReceiveOpen(json({ volume: '../etc', epoch: 1 })));
  eproto(() => parseReceiveOpen(json({ volume: 'vol', epoch: 0 })));
  eproto(() => parseReceiveOpen(json({ volume: 'vol', epoch: 1.5 })));
  eproto(() => parseReceiveOpen(Buffer.from([0xff, 0xfe])));
  eproto(() => parsePrune(json({ volume: 'vol', keep: ['not-a-uuid'] })));
  eproto(() => parsePrune(json({ volume: 'vol', keep: new Array(2000).fill('0'.repeat(32)) })));
  const uuid = 'a'.repeat(32);
  const info = { volume: 'vol', exists: true, replicaOf: { owner: 'alpha', epoch: 1 }, ownedEpoch: null, snapshots: [{ uuid, name: 'repl-1' }], receive: { base: null, target: uuid, offsetBytes: 4096 } };
  assert.deepEqual(parseReplicaInfo(json(info)), info);
  eproto(() => parseReplicaInfo(json({ ...info, replicaOf: { owner: 'bad name', epoch: 1 } })));
  eproto(() => parseReplicaInfo(json({ ...info, receive: { base: null, target: uuid, offsetBytes: -1 } })));
  eproto(() => parseReplicaInfo(json({ ...info, ownedEpoch: 0 })));
  eproto(() => parseReplicaInfo(json({ ...info, snapshots: [{ uuid, name: '.hidden' }] })));
  eproto(() => parseReceiveResult(json({ volume: 'vol', snapshot: 's', uuid, full: true, resumedFromBytes: 0, streamBytes: 'many', dataBytes: 0 })));
});

test('durations and rates for replica add', () => {
  assert.equal(parseDuration('30s'), 30_000);
  assert.equal(parseDuration('500ms'), 500);
  assert.equal(parseDuration('5m'), 300_000);
  assert.equal(parseDuration('1h'), 3_600_000);
  assert.equal(parseDuration('2'), 2000);
  assert.throws(() => parseDuration('0s'), /more than zero/);
  assert.throws(() => parseDuration('soon'), /invalid duration "soon"/);
  assert.equal(parseRate('200MiB/s'), 200 * 1024 * 1024);
  assert.equal(parseRate('4096'), 4096);
  assert.throws(() => parseRate('fast/s'), /invalid size/);
  assert.equal(formatDuration(750), '750ms');
  assert.equal(formatDuration(30_000), '30s');
  assert.equal(formatDuration(5_400_000), '1h30m');
});

test('state files: many writes of one file at once leave the last one asked, whole, and no temporary file', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'chunkd-state-'));
  try {
    const file = path.join(directory, 'replication', 'links.json');
    await Promise.all(Array.from({ length: 40 }, (_, i) => writeStateFile(file, { write: i, padding: 'x'.repeat(i * 100) })));
    assert.deepEqual(await readStateFile(file), { write: 39, padding: 'x'.repeat(3900) });
    assert.deepEqual(fs.readdirSync(path.dirname(file)), ['links.json']);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});
