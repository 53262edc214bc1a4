// etcd-hosts.ts's HostCooldown, the etcd client's per-member fault handling: a member whose call timed out (paused,
// partitioned) is passed over while another member is not, so that calls (the lease keepalive among them) go to the
// members that answer instead of a third of them waiting for their deadline; never all members passed over.
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { EtcdError, GRPCDeadlineExceededError, GRPCUnavailableError } from 'etcd3';
import { test } from 'vitest';
import { HostCooldown, HostCoolingDown } from '../../src/cluster/etcd-hosts.ts';

const hosts = ['http://a:2379', 'http://b:2379', 'http://c:2379'];

/** What etcd3's withConnection does: each member in turn until one is called through; returns the member called. */
async function call(cooldown: HostCooldown, order: string[], outcome: (host: string) => unknown): Promise<string> {
  for (const host of order) {
    let calledThrough = false;
    try {
      await cooldown.policy(host).execute(async () => {
        calledThrough = true;
        const result = outcome(host);
        if (result instanceof Error) throw result;
        return result;
      });
      return host;
    } catch (error) {
      if (calledThrough) return host;
      assert.ok(error instanceof HostCoolingDown, `only a member cooling down is passed over (${String(error)})`);
    }
  }
  throw new Error('every member passed over');
}

test('a member that timed out is passed over for the cooldown while another answers; answered, it is taken again', async () => {
  let now = 0;
  const cooldown = new HostCooldown(hosts, 5_000, () => now);
  const paused = (host: string) => (host === hosts[0] ? new GRPCDeadlineExceededError('4 DEADLINE_EXCEEDED: Deadline exceeded') : { ok: true });
  assert.equal(await call(cooldown, hosts, paused), hosts[0]);
  // From now on, calls go to the others, whatever the order the client tries them in.
  for (let round = 0; round < 5; round += 1) {
    now += 900;
    assert.notEqual(await call(cooldown, [hosts[0]!, hosts[2]!, hosts[1]!], paused), hosts[0]);
  }
  // The cooldown over (5 s after the failure), the member is tried again: still paused, it cools down again.
  now = 5_001;
  assert.equal(await call(cooldown, hosts, paused), hosts[0]);
  now = 6_000;
  assert.equal(await call(cooldown, hosts, paused), hosts[1]);
  // Back: tried at the end of its cooldown, it answers, and is taken at once after that.
  now = 10_002;
  assert.equal(await call(cooldown, hosts, () => ({ ok: true })), hosts[0]);
  assert.equal(cooldown.passesOver(hosts[0]!), false);
});

test('with every member cooling down, every call goes through (etcd down or too loaded to answer in time): none refused here', async () => {
  let now = 0;
  const cooldown = new HostCooldown(hosts, 5_000, () => now);
  for (const host of hosts) await call(cooldown, [host], () => new GRPCUnavailableError('14 UNAVAILABLE: No connection established'));
  now = 100;
  for (const host of hosts) assert.equal(cooldown.passesOver(host), false, host);
  assert.equal(await call(cooldown, hosts, () => ({ ok: true })), hosts[0]);
  // The one that answered is taken; the two still cooling are passed over.
  assert.equal(await call(cooldown, [hosts[1]!, hosts[2]!, hosts[0]!], () => ({ ok: true })), hosts[0]);
});

test("etcd's own answers (a failed request) do not cool a member down; an opened stream is no answer, its failure cools", async () => {
  const now = 0;
  const cooldown = new HostCooldown(hosts, 5_000, () => now);
  await call(cooldown, [hosts[0]!], () => new EtcdError('etcdserver: requested lease not found'));
  assert.equal(cooldown.passesOver(hosts[0]!), false);
  // A keepalive stream: opening it succeeds, its deadline comes later through the same policy (etcd3's markFailed).
  await call(cooldown, [hosts[1]!], () => new GRPCDeadlineExceededError('4 DEADLINE_EXCEEDED'));
  assert.equal(cooldown.passesOver(hosts[1]!), true);
  assert.equal(await call(cooldown, [hosts[1]!, hosts[0]!], () => new PassThrough()), hosts[0]);
  cooldown.failed(hosts[0]!, new GRPCDeadlineExceededError('4 DEADLINE_EXCEEDED'));
  // Two of three cooling: the third is taken; a stream opened on a cooling member (all were) does not clear it.
  cooldown.failed(hosts[2]!, new GRPCDeadlineExceededError('4 DEADLINE_EXCEEDED'));
  assert.equal(await call(cooldown, [hosts[1]!], () => new PassThrough()), hosts[1]);
  assert.equal(cooldown.passesOver(hosts[1]!), false, 'all three cooling: none passed over');
  cooldown.answered(hosts[2]!);
  assert.equal(cooldown.passesOver(hosts[1]!), true, 'the stream opened did not count as an answer');
});
