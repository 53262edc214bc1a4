// failover.ts's AbsenceClock: how long an owner has been seen unregistered without a break, which a failover waits
// a whole TTL for (etcd before 3.4.28/3.5.11 can revoke a lease early: etcd-io/etcd#15247).
import assert from 'node:assert/strict';
import { test } from 'vitest';
import { AbsenceClock } from '../../src/cluster/failover.ts';

test('an owner counts as gone from the first beat that saw it unregistered, and starts again when it is seen back or the beats stall', () => {
  const clock = new AbsenceClock(2_000);
  assert.deepEqual(clock.observe([], 0), new Map());
  assert.deepEqual(clock.observe(['alpha'], 1_000), new Map([['alpha', 0]]));
  assert.deepEqual(clock.observe(['alpha', 'beta'], 2_000), new Map([['alpha', 1_000], ['beta', 0]]));
  assert.deepEqual(clock.observe(['alpha', 'beta'], 4_000), new Map([['alpha', 3_000], ['beta', 2_000]]));
  // alpha registered again: its count is over; gone again, it starts from zero.
  assert.deepEqual(clock.observe(['beta'], 5_000), new Map([['beta', 3_000]]));
  assert.deepEqual(clock.observe(['alpha', 'beta'], 6_000), new Map([['alpha', 0], ['beta', 4_000]]));
  // No observation for longer than the gap (this node's beats stalled): nothing is known in between.
  assert.deepEqual(clock.observe(['alpha', 'beta'], 8_001), new Map([['alpha', 0], ['beta', 0]]));
  assert.deepEqual(clock.observe(['alpha', 'beta'], 9_000), new Map([['alpha', 999], ['beta', 999]]));
});
