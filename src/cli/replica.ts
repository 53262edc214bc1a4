// chunkd replica: read-only replicas of this node's volumes on other nodes (replication/replicator.ts), kept
// current over the peer port by incremental streams.
//   replica add VOL --peer HOST:PORT [--every 30s] [--max-rate 200MiB/s]
//   replica add VOL --peer HOST:PORT --sync [--sync-timeout 5s]   (replication/sync-replicas.ts)
//   replica list · replica status VOL · replica sync VOL [--peer HOST:PORT] · replica remove VOL --peer HOST:PORT
import { parseArgs } from 'node:util';
import { validateName } from '../core/names.ts';
import { formatDuration, formatSize, parseDuration, parseRate } from '../core/units.ts';
import type { CycleResult, ReplicaStatus } from '../replication/replicator.ts';
import type { SyncReplicaStatus } from '../replication/sync-replicas.ts';
import { callApi } from './api-client.ts';
import { parsing, UsageError } from './errors.ts';
import { commands, unknownVerb } from './help.ts';

const verbs = ['add', 'list', 'status', 'sync', 'remove', 'promote', 'demote'] as const;
type Verb = (typeof verbs)[number];

export async function replicaCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const [verb, ...rest] = argv;
  if (!verbs.includes(verb as Verb)) throw unknownVerb('replica', verb);
  const spec = commands[`replica ${verb as Verb}`];
  const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: spec.options })) as {
    values: { api?: string; json?: boolean; peer?: string; every?: string; 'max-rate'?: string; owner?: string; sync?: boolean; 'sync-timeout'?: string };
    positionals: string[];
  };
  const socket = apiPath(values.api);
  const usage = `usage: chunkd ${spec.usage[0]}`;
  const volume = (): string => parsing(() => {
    if (positionals.length !== 1) throw new UsageError(usage);
    return validateName(positionals[0]);
  });
  const route = (name: string, tail = 'replicas'): string => `/v1/volumes/${encodeURIComponent(name)}/${tail}`;
  const print = (value: unknown, text: () => string): void => {
    process.stdout.write(values.json === true ? `${JSON.stringify(value, null, 2)}\n` : `${text()}\n`);
  };
  switch (verb as Verb) {
    case 'add': {
      const name = volume();
      if (values.sync === true) {
        const body = parsing(() => {
          if (values.peer === undefined) throw new UsageError(`replica add needs --peer HOST:PORT (the other node's --peer-listen)\n${usage}`);
          if (values.every !== undefined) throw new UsageError(`--every is for asynchronous replicas, not with --sync\n${usage}`);
          return {
            peer: values.peer, sync: true, timeoutMs: values['sync-timeout'] === undefined ? undefined : parseDuration(values['sync-timeout'], '--sync-timeout'),
            maxRateBytesPerSecond: values['max-rate'] === undefined ? null : parseRate(values['max-rate'], '--max-rate'),
          };
        });
        const status = (await callApi(socket, 'POST', route(name), body)) as SyncReplicaStatus;
        const rate = status.maxRateBytesPerSecond === null || status.maxRateBytesPerSecond === undefined ? '' : `, resyncs at most ${formatSize(status.maxRateBytesPerSecond)}/s`;
        print(status, () => `replicating ${name} to ${status.peer} synchronously (timeout ${formatDuration(status.timeoutMs)}${rate}): it is in sync once its first resync completes (chunkd replica status ${name})`);
        return 0;
      }
      const body = parsing(() => {
        if (values['sync-timeout'] !== undefined) throw new UsageError(`--sync-timeout goes with --sync\n${usage}`);
        if (values.peer === undefined) throw new UsageError(`replica add needs --peer HOST:PORT (the other node's --peer-listen)\n${usage}`);
        return {
          peer: values.peer,
          everyMs: values.every === undefined ? undefined : parseDuration(values.every, '--every'),
          maxRateBytesPerSecond: values['max-rate'] === undefined ? null : parseRate(values['max-rate'], '--max-rate'),
        };
      });
      const status = (await callApi(socket, 'POST', route(name), body)) as ReplicaStatus;
      print(status, () => `replicating ${name} to ${status.peer} every ${formatDuration(status.everyMs)}${status.maxRateBytesPerSecond === null ? '' : ` at most ${formatSize(status.maxRateBytesPerSecond)}/s`}: the first copy starts now (chunkd replica status ${name})`);
      return 0;
    }
    case 'list': {
      if (positionals.length !== 0) throw new UsageError(usage);
      const { replicas } = (await callApi(socket, 'GET', '/v1/replicas')) as { replicas: Array<ReplicaStatus | SyncReplicaStatus> };
      print({ replicas }, () => (replicas.length === 0 ? 'no replicas' : replicas.map(describeReplica).join('\n')));
      return 0;
    }
    case 'status': {
      const { replicas } = (await callApi(socket, 'GET', route(volume()))) as { replicas: Array<ReplicaStatus | SyncReplicaStatus> };
      print({ replicas }, () => (replicas.length === 0 ? `${positionals[0]} has no replicas` : replicas.map(describeReplica).join('\n')));
      return 0;
    }
    case 'sync': {
      const name = volume();
      const { cycles } = (await callApi(socket, 'POST', route(name, 'replicate'), values.peer === undefined ? {} : { peer: values.peer })) as { cycles: CycleResult[] };
      print({ cycles }, () => cycles.map((cycle) => (cycle.outcome === 'current'
        ? `${name} on ${cycle.peer}: current at ${cycle.snapshot}`
        : `${name} on ${cycle.peer}: ${cycle.outcome} stream of ${cycle.snapshot}, ${formatSize(cycle.dataBytes)} of data, ${formatSize(cycle.streamBytes)} sent in ${cycle.seconds.toFixed(2)} s`)).join('\n'));
      return 0;
    }
    case 'remove': {
      const name = volume();
      if (values.peer === undefined) throw new UsageError(`replica remove needs --peer HOST:PORT\n${usage}`);
      const answer = await callApi(socket, 'DELETE', route(name), { peer: values.peer });
      print(answer, () => `stopped replicating ${name} to ${values.peer} (the replica there stays; remove it there if it is not wanted)`);
      return 0;
    }
    case 'promote': {
      const name = volume();
      const answer = (await callApi(socket, 'POST', route(name, 'promote'), {})) as { epoch: number; snapshot: string; previousOwner: string };
      print(answer, () => `${name} is this node's now, at epoch ${answer.epoch}, from ${answer.snapshot} (the last point from ${answer.previousOwner}); ${answer.previousOwner} is fenced when it comes back`);
      return 0;
    }
    case 'demote': {
      const name = volume();
      const answer = (await callApi(socket, 'POST', route(name, 'demote'), values.owner === undefined ? {} : { owner: values.owner })) as { owner: string; base: string; keptAs: string | null };
      print(answer, () => `${name} is a replica of ${answer.owner} now, from ${answer.base}${answer.keptAs === null ? '' : `; this node's writes after it are kept in ${name}@${answer.keptAs} (chunkd clone ${name}@${answer.keptAs} NEW to read them)`}; on ${answer.owner}: chunkd replica add ${name} --peer THIS-NODE:PORT`);
      return 0;
    }
  }
}

function describeReplica(r: ReplicaStatus | SyncReplicaStatus): string {
  if ('mode' in r) return describeSyncReplica(r);
  const last = r.lastReplicated === null ? 'nothing replicated yet' : `last ${r.lastReplicated.snapshot} (lag ${formatDuration((r.lagSeconds ?? 0) * 1000)})`;
  const stream = r.stream === null ? '' : `, sending ${r.stream.target}: ${formatSize(r.stream.sentBytes)} of ${formatSize(r.stream.totalBytes)}`;
  const rate = r.throughputBytesPerSecond === null ? '' : `, last stream ${formatSize(r.throughputBytesPerSecond)}/s`;
  const error = r.lastError === null ? '' : `\n  last error (${r.lastError.at}): ${r.lastError.message}`;
  return `${r.volume} -> ${r.peerName ?? '?'} at ${r.peer}: ${r.state}, ${last}, ${formatSize(r.bytesPending)} pending${stream}${rate}${error}`;
}

function describeSyncReplica(r: SyncReplicaStatus): string {
  const resync = r.resync === null ? '' : `, resyncing: ${formatSize(r.resync.copiedBytes)} of ${formatSize(r.resync.totalBytes)}`;
  const error = r.lastError === null ? '' : `\n  last error (${r.lastError.at}): ${r.lastError.message}`;
  const damaged = (r.damagedBlocks ?? []).length === 0 ? '' : `\n  damaged here, no in-sync copy to repair from: ${r.damagedBlocks.map((range) => `bytes ${range.offsetBytes}-${range.offsetBytes + range.lengthBytes - 1}${range.snapshot === null ? '' : ` of snapshot ${range.snapshot}`}`).join(', ')} (${r.damagedBlocksTotal} found in all)`;
  return `${r.volume} -> ${r.peerName ?? '?'} at ${r.peer}: synchronous, ${r.state}, ${formatSize(r.dirtyBytes)} dirty${resync}, ${formatSize(r.resyncBytesTotal)} resent in all (${formatSize(r.resyncEqualBytesTotal ?? 0)} found the same by checksum)${r.maxRateBytesPerSecond === null || r.maxRateBytesPerSecond === undefined ? '' : `, resyncs at most ${formatSize(r.maxRateBytesPerSecond)}/s`}, out of sync ${r.outOfSyncTotal} times${damaged}${error}`;
}
