// The cluster soak's checks (bench/soak-checks.ts) on made-up histories: each kind of violation is found, and a
// history without one passes, so that `npm run soak:cluster` passing means something.
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { blockBytes, blockContent, checkBlocks, checkOwnership, parseBlock, type Ack, type FoundBlock } from '../../bench/soak-checks.ts';

let nextSeq = 1;
/** An acknowledgement of a write to `index` by `node` at epochs [lo, hi], sent at `at` and answered 5 ms later. */
function ack(node: string, lo: number, at: number, options: { hi?: number; index?: number; wall?: number } = {}): Ack {
  const seq = nextSeq++;
  return { seq, index: options.index ?? seq, node, lo, hi: options.hi ?? lo, writer: 'main', sentAt: at, ackAt: at + 5, ackWall: options.wall ?? 1_000 + at + 5 };
}

test('blocks: a write reads back as itself; zeroes as nothing; a flipped byte or a foreign block as damage', () => {
  const data = blockContent(77, 12);
  assert.equal(data.length, blockBytes);
  assert.deepEqual(parseBlock(data), { kind: 'write', seq: 77, index: 12 });
  assert.deepEqual(parseBlock(Buffer.alloc(blockBytes)), { kind: 'zero' });
  const flipped = Buffer.from(data);
  flipped[100]! ^= 1;
  assert.deepEqual(parseBlock(flipped), { kind: 'damaged', why: 'checksum mismatch' });
  assert.deepEqual(parseBlock(Buffer.alloc(blockBytes, 1)), { kind: 'damaged', why: 'no magic' });
});

test('ownership: a clean history passes; two nodes at one epoch, a node at an epoch etcd gave another, and a stale owner are found', () => {
  const owners = new Map([[1, 'alpha'], [2, 'beta']]);
  const clean = [ack('alpha', 1, 0), ack('alpha', 1, 10), ack('beta', 1, 20, { hi: 2 }), ack('beta', 2, 30)];
  assert.deepEqual(checkOwnership(clean, owners), []);

  const twoOwners = [ack('alpha', 2, 0), ack('beta', 2, 10)];
  const found = checkOwnership(twoOwners, new Map());
  assert.equal(found.length, 1);
  assert.match(found[0]!, /^epoch 2: writes acknowledged by alpha \(write \d+\) and beta \(write \d+\)$/);

  assert.match(checkOwnership([ack('gamma', 2, 0)], owners).join('\n'), /acknowledged by gamma at epoch 2, which etcd gave beta/);

  // alpha answers at epoch 1 a write sent after beta's epoch-2 acknowledgement: a stale owner.
  const stale = checkOwnership([ack('beta', 2, 0), ack('alpha', 1, 10)], owners);
  assert.equal(stale.length, 1);
  assert.match(stale[0]!, /write \d+ \(main\) acknowledged by alpha at epoch 1 or below, sent after writes had been acknowledged at epoch 2 \(write \d+, main, by beta, answered 5.0 ms before it was sent\)/);
  // The same two overlapping in time are not a certain inversion (alpha may have decided first).
  assert.deepEqual(checkOwnership([ack('beta', 2, 10), ack('alpha', 1, 8)], owners), []);
});

test('data: a replicated write must be there or overwritten by a later one; unreplicated writes may be lost; damage and foreign writes are found', () => {
  // Block 1: written at seq a (replicated: alpha's point at epoch 1 is later), then seq b (after the point).
  const a = ack('alpha', 1, 0, { index: 1, wall: 100 });
  const b = ack('alpha', 1, 10, { index: 1, wall: 300 });
  const issued = new Map([[a.seq, 1], [b.seq, 1]]);
  const points = new Map([['alpha/1', 200]]);
  const holding = (seq: number | null): Map<number, FoundBlock> => new Map([[1, seq === null ? { kind: 'zero' } : { kind: 'write', seq, index: 1 }]]);

  const newest = checkBlocks(holding(b.seq), [a, b], points, issued, 'beta');
  assert.deepEqual(newest, { violations: [], protectedWrites: 1, lostUnreplicated: 0, written: 1 });
  // The unreplicated write lost in a failover: allowed, and counted.
  const older = checkBlocks(holding(a.seq), [a, b], points, issued, 'beta');
  assert.deepEqual([older.violations, older.lostUnreplicated], [[], 1]);
  // The replicated one lost: a violation.
  const lost = checkBlocks(holding(null), [a, b], points, issued, 'beta');
  assert.equal(lost.violations.length, 1);
  assert.match(lost.violations[0]!, new RegExp(`block 1 on beta: write ${a.seq}, acknowledged by alpha at epoch 1 and replicated .* is lost: zeroes there`));
  // A point of another owner or epoch covers nothing of alpha's at epoch 1.
  assert.deepEqual(checkBlocks(holding(null), [a, b], new Map([['alpha/2', 500], ['beta/1', 500]]), issued, 'beta').violations, []);
  // A write whose epoch is only bracketed is not counted as replicated.
  const bracketed = ack('alpha', 1, 20, { index: 2, hi: 2, wall: 100 });
  assert.equal(checkBlocks(new Map([[2, { kind: 'zero' }]]), [bracketed], points, new Map([[bracketed.seq, 2]]), 'beta').protectedWrites, 0);

  assert.match(checkBlocks(new Map([[1, { kind: 'damaged', why: 'checksum mismatch' }]]), [], points, issued, 'beta').violations[0]!, /block 1 on beta: checksum mismatch/);
  assert.match(checkBlocks(new Map([[5, { kind: 'write', seq: a.seq, index: 1 }]]), [], points, issued, 'beta').violations[0]!, /block 5 on beta holds write \d+, which was issued to block 1/);
});
