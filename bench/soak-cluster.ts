// npm run soak:cluster -- [--minutes N] [--seed S] [--ttl 3s] [--rate 100] [--keep]: the cluster on etcd under
// chaos (issue 16). Three etcd members and three chunkd nodes on loopback (TLS peer ports, a short lease TTL), one
// volume with two asynchronous replicas (`volume create --replicas 2`), written all the time through NBD, while a
// seeded chaos loop kills (-9) and restarts a node, pauses (SIGSTOP) a node past its lease TTL then resumes it, or
// pauses or kills an etcd member then brings it back; one fault at a time, the cluster healed before the next.
//
// Design note.
//   Writers. The main writer writes 4 KiB blocks (FUA: each acknowledgement is durable) one after another, block
//   seq mod N of the main region, to whichever node etcd names as the volume's owner; a refusal, a closed
//   connection or no reply within 2 s makes it drop the connection and follow the owner again (the volume's record,
//   read by this process's own etcd client: what `volume list` shows). A probe per node writes every 0.2 s to its
//   own region through a connection to that node whatever its role, and waits for every reply however long (a
//   paused node's in-flight write is answered after SIGCONT): the writes a node that no longer owns the volume must
//   refuse. After a refusal a probe reconnects for its next write, 1 s later (a client connected to a fenced old
//   owner keeps it from rejoining as a replica: its rollback waits until the volume's export is closed). Every block carries a magic, its sequence number (one counter for all writers), its block number and a
//   CRC-32 of the rest, so what is read back at the end is checked exactly: which write it is, and that it is whole.
//   The epoch of an acknowledgement, without a race. Before each write is sent and after its reply arrives, the soak
//   reads the node's roles file (<pool>/replication/roles.json, replaced whole by rename): the volume's epoch there
//   (no entry: epoch 1, the creator's). A node's epoch of a volume only grows (owner E, fenced at E, replica of the
//   new owner's E' > E, promoted to E' + 1), the write gate acknowledges only at the in-memory epoch of roles.ts, and
//   that epoch is in the file before the node can confirm it in etcd (a promotion awaits the file), after which the
//   file changes only later than memory. So the epoch of the acknowledgement lies in [before, after]: pinned when
//   both reads agree (nearly always), an interval otherwise, and never a guess.
//   Checks (any failure is printed and the exit status is 1):
//     1. no two nodes acknowledged writes at the same pinned epoch, and no pinned epoch was acknowledged by a node
//        other than the owner etcd recorded at that epoch (the soak polls the record every 0.2 s);
//     2. no stale owner: a write sent after another write was acknowledged at epoch E was not acknowledged at an
//        epoch below E (interval bounds: only a certain inversion counts);
//     3. no acknowledged-and-replicated write lost: a write acknowledged by node X at pinned epoch E, before the
//        time of a point that a replica confirmed in etcd following X at E (replicas/VOL/NODE: point repl-<ms>, the
//        owner's clock when it took the snapshot, this machine's clock too), is in that snapshot; at the end the
//        final owner's copy of each block must hold that write or a later one to the block, whole;
//     4. liveness: after each fault the cluster heals within a bound (all nodes registered, the owner's writes
//        acknowledged again, a replica confirming a point of the current owner and epoch).
//   The owner is asked to replicate every --replicate-every (POST /v1/volumes/VOL/replicate) besides its links'
//   own 30 s cycles, so that points are recent. At the end the writers stop, a replica's point newer than the last
//   acknowledgement is waited for (30 s at most), and the final owner's copy of every block is read back.
//   Faults are sized around the failover's own wait (a replica takes over once it has seen the owner unregistered
//   for a whole TTL, src/cluster/failover.ts): a node paused TTL + 1 s to 3 TTL + 1 s, or down up to 2 TTL + 2 s,
//   fails over or comes back in time, both at random.
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { Etcd3 } from 'etcd3';
import { callApi } from '../src/cli/api-client.ts';
import { parseDuration } from '../src/core/units.ts';
import { nodesPrefix, parseReplicaRecord, parseVolumeRecord, replicasPrefix, volumeKey, type ReplicaRecord, type VolumeRecord } from '../src/cluster/records.ts';
import { clusterNodeArgs, rolesOf, waitFor } from '../src/testing/cluster-node.ts';
import { haveEtcd, startEtcd, type EtcdCluster } from '../src/testing/etcd-process.ts';
import { FLAG_FUA, NbdReplyError, TestNbdClient } from '../src/testing/nbd-client.ts';
import { chunkdBin, haveTool, makeTempDir, mustRun, stablePort, startNode, type RunningNode } from '../src/testing/node-process.ts';
import { makeRandom, randomInt } from '../src/testing/random.ts';
import { cleanup, cleanupOnSignals, onCleanup, sleep } from './processes.ts';
import { blockBytes as block, blockContent, checkBlocks, checkOwnership, parseBlock, type Ack, type FoundBlock } from './soak-checks.ts';

const usage = `usage: npm run soak:cluster -- [--minutes N] [--seed S] [--ttl 3s] [--rate 100] [--replicate-every 2s] [--faults LIST] [--keep]
  --minutes N          how long the chaos runs (default 5; fractions allowed)
  --seed S             the chaos loop's seed (default: random, printed)
  --ttl DURATION       the nodes' lease TTL (default 3s)
  --rate N             the main writer's writes per second at most (default 100)
  --replicate-every D  how often the owner is asked to replicate (default 2s)
  --faults LIST         only these faults, comma-separated: kill-node, pause-node, pause-etcd, kill-etcd (default all)
  --keep               keep the scratch directory (pools, etcd data) at the end (kept anyway on a failure, with
                       the nodes' logs and acks.json, every acknowledgement)`;

const names = ['alpha', 'beta', 'gamma'] as const;
const volume = 'vol';
const volumeBytes = 64 * 2 ** 20;
const mainBlocks = 12_288;
const probeBlocks = 1_024;
const writeTimeoutMs = 2_000;
const probeEveryMs = 200;

interface Options {
  minutes: number;
  seed: number;
  ttlMs: number;
  rate: number;
  replicateEveryMs: number;
  faults: string[];
  keep: boolean;
}

/** The faults the chaos loop draws from, each as often as it appears. */
const faultKinds = ['kill-node', 'kill-node', 'kill-node', 'pause-node', 'pause-node', 'pause-node', 'pause-etcd', 'kill-etcd'];

function parseFaults(text: string | undefined): string[] {
  if (text === undefined) return faultKinds;
  const chosen = text.split(',');
  const unknown = chosen.filter((kind) => !faultKinds.includes(kind));
  if (unknown.length > 0 || chosen.length === 0) throw new Error(`invalid --faults ${JSON.stringify(text)}: a list of ${[...new Set(faultKinds)].join(', ')}\n${usage}`);
  return faultKinds.filter((kind) => chosen.includes(kind));
}

function parseOptions(): Options {
  const { values } = parseArgs({
    options: { minutes: { type: 'string' }, seed: { type: 'string' }, ttl: { type: 'string' }, rate: { type: 'string' }, 'replicate-every': { type: 'string' }, faults: { type: 'string' }, keep: { type: 'boolean' }, help: { type: 'boolean' } },
  });
  if (values.help) {
    console.log(usage);
    process.exit(0);
  }
  const number = (text: string | undefined, fallback: number, what: string): number => {
    const value = text === undefined ? fallback : Number(text);
    if (!Number.isFinite(value) || value < 0) throw new Error(`invalid ${what} ${JSON.stringify(text)}\n${usage}`);
    return value;
  };
  return {
    minutes: number(values.minutes, 5, '--minutes'),
    seed: Math.floor(number(values.seed, Math.floor(Math.random() * 2 ** 32), '--seed')),
    ttlMs: parseDuration(values.ttl ?? '3s'),
    rate: Math.max(1, number(values.rate, 100, '--rate')),
    replicateEveryMs: parseDuration(values['replicate-every'] ?? '2s'),
    faults: parseFaults(values.faults),
    keep: values.keep ?? false,
  };
}

interface NodeSlot {
  name: string;
  pool: string;
  address: string;
  node: RunningNode;
  paused: boolean;
  down: boolean;
  /** The logs of its earlier processes (killed and restarted). */
  earlierLogs: string;
}

/** The epoch of `volume` in the node's roles file: its entry's, or 1 when it has none (the volume's creator). */
function epochInRoles(slot: NodeSlot): number {
  try {
    return rolesOf(slot.pool)[volume]?.epoch ?? 1;
  } catch {
    return 1;
  }
}

class Soak {
  readonly options: Options;
  readonly random: () => number;
  readonly scratch: string;
  readonly slots = new Map<string, NodeSlot>();
  etcd!: EtcdCluster;
  client!: Etcd3;
  readonly acks: Ack[] = [];
  /** Which block each issued write went to (seq -> block). */
  readonly issued = new Map<number, number>();
  #seq = 0;
  /** The monitor and the replicate calls run while `running`; the writers while `writing` (stopped first). */
  running = true;
  writing = true;
  readonly violations: string[] = [];
  readonly figures = { refused: 0, probeRefused: 0, reconnects: 0, abandoned: 0, replicateCalls: 0, replicateFailures: 0, crossPauseAcks: 0, monitorFailures: 0 };
  readonly actions: Array<{ kind: string; target: string; startedAt: number; endedAt: number; healedMs: number; owner: string; epoch: number }> = [];
  /** What etcd said last (polled): the volume's record, live nodes, replica records. */
  record: VolumeRecord | null = null;
  alive = new Set<string>();
  replicas: ReplicaRecord[] = [];
  /** Owner etcd recorded at each epoch, and when this process first saw that epoch (Date.now()). */
  readonly epochOwners = new Map<number, string>();
  readonly epochSeenAt = new Map<number, number>();
  /** The newest point confirmed by a replica following owner X at epoch E: "X/E" -> pointMs. */
  readonly points = new Map<string, number>();
  readonly pauses: Array<{ node: string; pausedAt: number; resumedAt: number; epochBefore: number; epochAfter: number }> = [];
  lastMainAck: Ack | null = null;
  /** Why replicate calls failed, and how often. */
  readonly replicateErrors = new Map<string, number>();
  maxPause = { ms: 0, after: '' };
  lastAction = 'start';

  constructor(options: Options) {
    this.options = options;
    this.random = makeRandom(options.seed);
    this.scratch = makeTempDir('soak-cluster');
  }

  nextSeq(index: number): number {
    const seq = ++this.#seq;
    this.issued.set(seq, index);
    return seq;
  }

  log(line: string): void {
    const seconds = ((performance.now() - this.startedAt) / 1000).toFixed(1).padStart(6);
    console.log(`[${seconds} s ${new Date().toISOString().slice(11, 23)}] ${line}`);
  }

  startedAt = performance.now();

  /** An ISO time of day for a performance.now() value (for matching the nodes' logs). */
  wallAt(at: number): string {
    return new Date(performance.timeOrigin + at).toISOString().slice(11, 23);
  }

  violation(text: string): void {
    this.violations.push(text);
    this.log(`VIOLATION: ${text}`);
  }

  async setUp(): Promise<void> {
    onCleanup('the scratch directory', () => {
      if (this.options.keep || this.violations.length > 0) console.log(`scratch directory kept: ${this.scratch}`);
      else fs.rmSync(this.scratch, { recursive: true, force: true });
    });
    const tlsDir = path.join(this.scratch, 'tls');
    await mustRun(process.execPath, [chunkdBin, 'tls', 'init', tlsDir, ...names.flatMap((name) => ['--node', name])]);
    this.etcd = await startEtcd(3);
    onCleanup('etcd', () => this.etcd.stop());
    this.client = new Etcd3({ hosts: this.etcd.endpoints.split(','), dialTimeout: 1_000 });
    onCleanup('the etcd client', () => this.client.close());
    for (const name of names) {
      const slot = { name, pool: path.join(this.scratch, name), address: `127.0.0.1:${await stablePort()}`, paused: false, down: false, earlierLogs: '' } as NodeSlot;
      this.slots.set(name, slot);
      await this.startSlot(slot);
    }
    onCleanup('the nodes', async () => {
      for (const slot of this.slots.values()) {
        slot.node.process.kill('SIGCONT');
        await slot.node.stop();
      }
    });
    const created = await this.slots.get('alpha')!.node.cli('volume', 'create', volume, '--size', `${volumeBytes / 2 ** 20}MiB`, '--replicas', '2');
    if (created.code !== 0) throw new Error(`volume create failed: ${created.stderr}`);
    this.log(`volume ${volume} (${volumeBytes / 2 ** 20} MiB) created on alpha with replicas on beta and gamma; lease TTL ${this.options.ttlMs} ms, seed ${this.options.seed}`);
  }

  async startSlot(slot: NodeSlot): Promise<void> {
    const args = clusterNodeArgs({ name: slot.name, etcd: this.etcd.endpoints, ttlMs: this.options.ttlMs, peer: { address: slot.address, tlsDir: path.join(this.scratch, 'tls', slot.name) } });
    slot.node = await startNode(slot.pool, args, { readyTimeoutMs: 60_000 });
    slot.down = false;
  }

  // ---- etcd, as this process sees it ----

  async poll(): Promise<void> {
    const options = { deadline: new Date(Date.now() + 1_000) };
    const [volumeKv, nodes, replicas] = await Promise.all([
      this.client.get(volumeKey(volume)).options(options).exec(),
      this.client.getAll().prefix(nodesPrefix).options(options).keys(),
      this.client.getAll().prefix(`${replicasPrefix}${volume}/`).options(options).exec(),
    ]);
    const kv = volumeKv.kvs[0];
    if (kv !== undefined) {
      const record = parseVolumeRecord(kv.key.toString(), kv.value);
      const known = this.epochOwners.get(record.epoch);
      if (known !== undefined && known !== record.owner) this.violation(`etcd recorded two owners at epoch ${record.epoch}: ${known} and ${record.owner}`);
      if (known === undefined) {
        this.epochOwners.set(record.epoch, record.owner);
        this.epochSeenAt.set(record.epoch, Date.now());
        if (record.epoch > 1) this.log(`etcd: ${record.owner} owns ${volume} at epoch ${record.epoch}`);
      }
      this.record = record;
    }
    this.alive = new Set(nodes.map((key) => key.slice(nodesPrefix.length)));
    this.replicas = replicas.kvs.map((replica) => parseReplicaRecord(replica.key.toString(), replica.value));
    for (const replica of this.replicas) {
      const key = `${replica.owner}/${replica.ownerEpoch}`;
      if ((this.points.get(key) ?? 0) < replica.pointMs) this.points.set(key, replica.pointMs);
    }
  }

  async monitor(): Promise<void> {
    while (this.running) {
      await this.poll().catch(() => (this.figures.monitorFailures += 1));
      await sleep(200);
    }
  }

  /** The owner etcd names now (read now, or the last one polled when etcd does not answer). */
  async owner(): Promise<string | null> {
    await this.poll().catch(() => (this.figures.monitorFailures += 1));
    return this.record?.owner ?? null;
  }

  // ---- writers ----

  /** One write through `client` to node `slot`, its epoch bracketed by the roles file; the Ack, or the error. */
  async writeOnce(slot: NodeSlot, client: TestNbdClient, writer: string, index: number, timeoutMs: number | null): Promise<Ack | Error> {
    const seq = this.nextSeq(index);
    const lo = epochInRoles(slot);
    const sentAt = performance.now();
    const reply = client.write(index * block, blockContent(seq, index), FLAG_FUA).then(() => null, (error: unknown) => error as Error);
    const result = timeoutMs === null ? await reply : await Promise.race([reply, sleep(timeoutMs).then(() => new Error('no reply'))]);
    if (result !== null) return result;
    const ack: Ack = { seq, index, node: slot.name, lo, hi: epochInRoles(slot), writer, sentAt, ackAt: performance.now(), ackWall: Date.now() };
    this.acks.push(ack);
    return ack;
  }

  async connect(slot: NodeSlot, timeoutMs: number): Promise<TestNbdClient | null> {
    const attempt = TestNbdClient.connect(slot.node.nbdSocket, volume).catch(() => null);
    const client = await Promise.race([attempt, sleep(timeoutMs).then(() => undefined)]);
    if (client === undefined) {
      void attempt.then((late) => late?.close());
      return null;
    }
    return client;
  }

  async mainWriter(): Promise<void> {
    let client: TestNbdClient | null = null;
    let slot: NodeSlot | null = null;
    const spacingMs = 1000 / this.options.rate;
    let position = 0;
    while (this.writing) {
      if (client === null || slot === null) {
        const owner = await this.owner();
        slot = owner === null ? null : (this.slots.get(owner) ?? null);
        client = slot === null || slot.down ? null : await this.connect(slot, writeTimeoutMs);
        if (client === null || slot === null) {
          await sleep(50);
          continue;
        }
        this.figures.reconnects += 1;
      }
      const started = performance.now();
      const index = position % mainBlocks;
      const result = await this.writeOnce(slot, client, 'main', index, writeTimeoutMs);
      if (result instanceof Error) {
        if (result instanceof NbdReplyError) this.figures.refused += 1;
        else if (result.message === 'no reply') this.figures.abandoned += 1;
        client.close();
        client = null;
        position += 1;
        continue;
      }
      position += 1;
      if (this.lastMainAck !== null) {
        const gap = result.ackAt - this.lastMainAck.ackAt;
        if (gap > this.maxPause.ms) this.maxPause = { ms: gap, after: this.lastAction };
      }
      this.lastMainAck = result;
      const left = spacingMs - (performance.now() - started);
      if (left > 0) await sleep(left);
    }
    client?.close();
  }

  /** Writes to node `slot` every probeEveryMs whatever its role, waiting for every reply however long. */
  async probe(slot: NodeSlot, region: number): Promise<void> {
    let client: TestNbdClient | null = null;
    let position = 0;
    while (this.writing) {
      if (client === null) {
        client = slot.down || slot.paused ? null : await TestNbdClient.connect(slot.node.nbdSocket, volume).catch(() => null);
        if (client === null) {
          await sleep(250);
          continue;
        }
      }
      const index = mainBlocks + region * probeBlocks + (position % probeBlocks);
      position += 1;
      const result = await this.writeOnce(slot, client, `probe-${slot.name}`, index, null);
      if (result instanceof NbdReplyError) this.figures.probeRefused += 1;
      if (result instanceof Error) {
        // Refused (not the owner) or cut: a client that stayed connected to a fenced old owner would keep it from
        // rejoining (its rollback waits for the export to close), so a probe reconnects for its next write.
        client.close();
        client = null;
        await sleep(1_000);
      }
      await sleep(probeEveryMs);
    }
    client?.close();
  }

  async replicateLoop(): Promise<void> {
    while (this.running) {
      await sleep(this.options.replicateEveryMs);
      const owner = this.record?.owner;
      const slot = owner === undefined ? undefined : this.slots.get(owner);
      if (slot === undefined || slot.down || slot.paused) continue;
      this.figures.replicateCalls += 1;
      // Every link runs its cycle; the call fails when one does (a replica that shares no snapshot with a new owner).
      const call = callApi(slot.node.apiSocket, 'POST', `/v1/volumes/${volume}/replicate`, {}).then(() => null, (error: unknown) => (error instanceof Error ? error.message : String(error)));
      const failure = await Promise.race([call, sleep(15_000).then(() => 'no answer in 15 s')]);
      if (failure !== null) {
        this.figures.replicateFailures += 1;
        const reason = failure.replace(/127\.0\.0\.1:\d+/g, 'PEER').replace(/\d{6,}/g, 'N');
        this.replicateErrors.set(reason, (this.replicateErrors.get(reason) ?? 0) + 1);
      }
    }
  }

  // ---- chaos ----

  /** Whether the cluster is whole again after the fault that ended at `since` (performance.now()). */
  healed(since: number): boolean {
    const record = this.record;
    if (record === null || names.some((name) => !this.alive.has(name))) return false;
    if (this.lastMainAck === null || this.lastMainAck.ackAt < since || this.lastMainAck.node !== record.owner) return false;
    const epochStart = this.epochSeenAt.get(record.epoch) ?? Number.POSITIVE_INFINITY;
    return this.replicas.some((replica) => replica.owner === record.owner && replica.ownerEpoch === record.epoch && replica.pointMs > epochStart);
  }

  async act(): Promise<void> {
    const { ttlMs } = this.options;
    const record = this.record!;
    const kinds = this.options.faults;
    const kind = kinds[randomInt(this.random, kinds.length)]!;
    const startedAt = performance.now();
    let target: string;
    if (kind === 'kill-node' || kind === 'pause-node') {
      // The owner more often than not: its faults are the failovers.
      target = this.random() < 0.6 ? record.owner : names[randomInt(this.random, names.length)]!;
      const slot = this.slots.get(target)!;
      if (kind === 'kill-node') {
        // Down for up to two TTLs and 2 s: a restart within about two TTLs keeps the volume (no failover, see below).
        const downMs = randomInt(this.random, 2 * ttlMs + 2_000);
        this.log(`kill -9 ${target}${target === record.owner ? ' (owner)' : ''}, restart after ${downMs} ms`);
        this.lastAction = `kill -9 ${target}`;
        slot.down = true;
        await slot.node.kill();
        slot.earlierLogs += `${slot.node.stderr()}--- killed (-9) by the soak at ${new Date().toISOString()}\n`;
        await sleep(downMs);
        await this.startSlot(slot);
      } else {
        // Past the TTL, by up to two more: a failover waits until the owner was seen gone for a whole TTL
        // (src/cluster/failover.ts), so a shorter pause ends with the owner back and keeping its volume.
        const pauseMs = ttlMs + 1_000 + randomInt(this.random, 2 * ttlMs);
        this.log(`SIGSTOP ${target}${target === record.owner ? ' (owner)' : ''} for ${pauseMs} ms`);
        this.lastAction = `SIGSTOP ${target}`;
        slot.paused = true;
        const pausedAt = performance.now();
        slot.node.process.kill('SIGSTOP');
        await sleep(pauseMs);
        const epochBefore = record.epoch;
        await this.poll().catch(() => {});
        slot.node.process.kill('SIGCONT');
        slot.paused = false;
        this.pauses.push({ node: target, pausedAt, resumedAt: performance.now(), epochBefore, epochAfter: this.record?.epoch ?? epochBefore });
      }
    } else {
      const member = this.etcd.members[randomInt(this.random, this.etcd.members.length)]!;
      target = member.name;
      if (kind === 'pause-etcd') {
        const pauseMs = 1_000 + randomInt(this.random, 2 * ttlMs);
        this.log(`SIGSTOP etcd member ${target} for ${pauseMs} ms`);
        this.lastAction = `SIGSTOP ${target}`;
        member.pause();
        await sleep(pauseMs);
        member.resume();
      } else {
        const downMs = 500 + randomInt(this.random, 2_500);
        this.log(`kill -9 etcd member ${target}, restart after ${downMs} ms`);
        this.lastAction = `kill -9 ${target}`;
        await member.kill();
        await sleep(downMs);
        await member.restart();
      }
    }
    const endedAt = performance.now();
    const healTimeoutMs = Math.max(60_000, 20 * ttlMs);
    try {
      await waitFor('the cluster to heal', () => this.healed(endedAt), healTimeoutMs);
    } catch {
      this.violation(`the cluster did not heal within ${healTimeoutMs / 1000} s after ${kind} ${target}: owner ${this.record?.owner} at epoch ${this.record?.epoch}, live nodes ${[...this.alive].join(',')}, replicas ${JSON.stringify(this.replicas.map((replica) => [replica.node, replica.owner, replica.ownerEpoch, replica.point]))}, last write acknowledged by ${this.lastMainAck?.node} ${Math.round(performance.now() - (this.lastMainAck?.ackAt ?? 0))} ms ago`);
      throw new Error('not healed');
    }
    const healedMs = performance.now() - endedAt;
    this.actions.push({ kind, target, startedAt, endedAt, healedMs, owner: this.record!.owner, epoch: this.record!.epoch });
    this.log(`healed ${Math.round(healedMs)} ms after the fault ended: ${this.record!.owner} owns ${volume} at epoch ${this.record!.epoch}`);
  }

  // ---- the checks ----

  checkOwnership(): void {
    for (const violation of checkOwnership(this.acks, this.epochOwners)) this.violation(violation);
    for (const pause of this.pauses) {
      if (pause.epochAfter === pause.epochBefore) continue;
      this.figures.crossPauseAcks += this.acks.filter((ack) => ack.node === pause.node && ack.sentAt < pause.pausedAt && ack.ackAt > pause.resumedAt).length;
    }
  }

  /** Reads the volume back from its final owner and checks every block against what was acknowledged and replicated. */
  async checkData(): Promise<{ blocks: number; written: number; protectedWrites: number; lostUnreplicated: number; owner: string }> {
    const owner = (await this.owner())!;
    const reader = await TestNbdClient.connect(this.slots.get(owner)!.node.nbdSocket, volume);
    const count = mainBlocks + names.length * probeBlocks;
    const blocks = new Map<number, FoundBlock>();
    const chunk = 256;
    for (let first = 0; first < count; first += chunk) {
      const data = await reader.read(first * block, chunk * block);
      for (let index = first; index < first + chunk; index += 1) blocks.set(index, parseBlock(data.subarray((index - first) * block, (index - first + 1) * block)));
    }
    await reader.disconnect();
    const checked = checkBlocks(blocks, this.acks, this.points, this.issued, owner);
    for (const violation of checked.violations) this.violation(violation);
    return { blocks: count, written: checked.written, protectedWrites: checked.protectedWrites, lostUnreplicated: checked.lostUnreplicated, owner };
  }
}

async function main(): Promise<void> {
  const options = parseOptions();
  for (const tool of ['etcd', 'openssl']) if (!(tool === 'etcd' ? haveEtcd() : haveTool(tool))) throw new Error(`${tool} is not installed (scripts/setup.sh installs it)`);
  cleanupOnSignals();
  const soak = new Soak(options);
  console.log(`soak:cluster: ${options.minutes} min, seed ${options.seed} (replay: npm run soak:cluster -- --minutes ${options.minutes} --seed ${options.seed}), run ${randomUUID().slice(0, 8)}`);
  let failure: unknown = null;
  try {
    await soak.setUp();
    await soak.poll();
    const services = [soak.monitor(), soak.replicateLoop()];
    const writers = [soak.mainWriter(), ...names.map((name, region) => soak.probe(soak.slots.get(name)!, region))];
    try {
      await waitFor('the first writes', () => soak.healed(0), 60_000);
      soak.startedAt = performance.now();
      const endAt = soak.startedAt + options.minutes * 60_000;
      while (performance.now() < endAt && soak.violations.length === 0) {
        await soak.act();
        await sleep(1_000 + randomInt(soak.random, 2_000));
      }
      await waitFor('the cluster to heal', () => soak.healed(0), 60_000);
    } finally {
      soak.writing = false;
      await Promise.race([Promise.all(writers), sleep(10_000)]);
    }
    try {
      // A point of the final owner's newer than the last write, so that every write counts as replicated: a
      // replica taken over with it would have them all (not waited for past 30 s: fewer writes are checked then).
      const lastAck = Math.max(...soak.acks.map((ack) => ack.ackWall));
      await waitFor('a last replicated point', () => soak.replicas.some((replica) => replica.owner === soak.record!.owner && replica.ownerEpoch === soak.record!.epoch && replica.pointMs > lastAck), 30_000).catch(() => soak.log('no replica confirmed a point after the last write within 30 s'));
    } finally {
      soak.running = false;
      await Promise.race([Promise.all(services), sleep(20_000)]);
    }
    soak.checkOwnership();
    const data = await soak.checkData();
    report(soak, data);
  } catch (error) {
    failure = error;
  }
  if (failure !== null || soak.violations.length > 0) {
    // Whole logs beside the pools (kept on failure); here only their last lines, without the refused probe writes.
    for (const slot of soak.slots.values()) {
      const text = slot.earlierLogs + (slot.node?.stderr() ?? '');
      fs.writeFileSync(path.join(soak.scratch, `${slot.name}.log`), text);
      fs.writeFileSync(path.join(soak.scratch, 'acks.json'), JSON.stringify(soak.acks.map((ack) => ({ ...ack, sentAt: soak.wallAt(ack.sentAt), ackAt: soak.wallAt(ack.ackAt) }))));
      const lines = text.split('\n').filter((line) => !/ WRITE offset \d+ length \d+: EPERM/.test(line) && !/peer \w+ connected from/.test(line));
      console.log(`--- ${slot.name} (${path.join(soak.scratch, `${slot.name}.log`)}; its last lines but refused writes and peer connections):\n${lines.slice(-40).join('\n')}`);
    }
  }
  await cleanup();
  if (failure !== null) {
    console.error(`soak:cluster FAILED: ${failure instanceof Error ? failure.message : String(failure)}`);
    process.exit(1);
  }
  if (soak.violations.length > 0) {
    console.error(`soak:cluster FAILED: ${soak.violations.length} violation(s):\n${soak.violations.map((line) => `  ${line}`).join('\n')}`);
    process.exit(1);
  }
  console.log('soak:cluster passed: no two owners at one epoch, no stale owner, no acknowledged-and-replicated write lost');
}

function report(soak: Soak, data: { blocks: number; written: number; protectedWrites: number; lostUnreplicated: number; owner: string }): void {
  const counts = new Map<string, number>();
  for (const action of soak.actions) counts.set(action.kind, (counts.get(action.kind) ?? 0) + 1);
  const heal = soak.actions.map((action) => action.healedMs).sort((a, b) => a - b);
  const main = soak.acks.filter((ack) => ack.writer === 'main');
  const pinned = soak.acks.filter((ack) => ack.lo === ack.hi).length;
  const epochs = [...soak.epochOwners].sort((a, b) => a[0] - b[0]);
  const rows: Array<[string, string]> = [
    ['minutes of chaos', ((performance.now() - soak.startedAt) / 60_000).toFixed(1)],
    ['seed', `${soak.options.seed}`],
    ['lease TTL', `${soak.options.ttlMs} ms`],
    ['faults', `${soak.actions.length} (${[...counts].map(([kind, count]) => `${kind} ${count}`).join(', ')})`],
    ['failovers (epochs after the first)', `${epochs.length - 1}: ${epochs.map(([epoch, owner]) => `${epoch}:${owner}`).join(' ')}`],
    ['heal time after a fault (median, max)', heal.length === 0 ? '-' : `${(heal[Math.floor(heal.length / 2)]! / 1000).toFixed(1)} s, ${(heal.at(-1)! / 1000).toFixed(1)} s`],
    ['writes acknowledged (main writer, probes)', `${soak.acks.length} (${main.length}, ${soak.acks.length - main.length})`],
    ['acknowledgements with a pinned epoch', `${pinned} (${soak.acks.length - pinned} bracketed across an epoch change)`],
    ['writes refused (main writer, probes)', `${soak.figures.refused}, ${soak.figures.probeRefused}`],
    ['main writer: reconnects, writes abandoned after 2 s', `${soak.figures.reconnects}, ${soak.figures.abandoned}`],
    ['max write pause (main writer)', `${(soak.maxPause.ms / 1000).toFixed(2)} s (after ${soak.maxPause.after})`],
    ['replicate calls (failed or slow)', `${soak.figures.replicateCalls} (${soak.figures.replicateFailures})`],
    ['acknowledged and replicated (checked)', `${data.protectedWrites}`],
    ['acknowledged, not replicated, lost in failovers', `${data.lostUnreplicated}`],
    ['in-flight writes answered after a pause that changed the owner', `${soak.figures.crossPauseAcks}`],
    ['blocks read back from the final owner', `${data.blocks} on ${data.owner} (${data.written} written)`],
    ['violations', `${soak.violations.length}`],
  ];
  console.log('\n| Figure | Value |\n|---|---|');
  for (const [name, value] of rows) console.log(`| ${name} | ${value} |`);
  for (const [reason, count] of soak.replicateErrors) console.log(`replicate calls failed ${count} time(s): ${reason}`);
}

await main();
