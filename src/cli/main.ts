// The chunkd command: parses arguments, then either runs a node (serve), checks a pool offline (fsck), or talks
// to a running node's API. Success exits 0; failure prints one clear line on stderr and exits 1, or 2 when the
// command line itself is wrong (cli/errors.ts). Every command's help and options are in cli/help.ts.
import { parseArgs } from 'node:util';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { softwareVersion } from '../core/version.ts';
import { validateName } from '../core/names.ts';
import { formatSize, parseDuration, parseSize } from '../core/units.ts';
import type { RepairReport } from '../store/repair.ts';
import type { DiffReport } from '../api/server.ts';
import type { CountedSnapshotInfo, SnapshotInfo, VolumeInfo } from '../store/pool.ts';
import type { ClusterVolume } from '../cluster/listing.ts';
import { commandHelp, commands, commandWords, findCommand, generalHelp, unknownVerb } from './help.ts';
import { parsing, printError, reportError, UsageError, wantsJson } from './errors.ts';
import type * as ApiClient from './api-client.ts';
import { needs } from '../core/lazy-import.ts';
import { describeLoopPause } from '../node/loop-pauses.ts';

// A command's own module is imported when that command runs (core/lazy-import.ts), so that a start loads what
// the command needs and no more: `chunkd help` or `chunkd volume list` loads neither the node, the store, etcd's
// client nor TLS.

/** The API's client, loaded by the commands that call the API: its node:http and node:https are most of what `chunkd help` or `--version` would load. */
const callApi: typeof ApiClient.callApi = async (...args) => (await import('./api-client.ts')).callApi(...args);

/** Runs the command line; returns the exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    return await run(argv);
  } catch (error) {
    return reportError(error, wantsJson(argv));
  }
}

async function run(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === '--version') {
    process.stdout.write(`chunkd ${softwareVersion}\n`);
    return 0;
  }
  if (command === undefined) {
    process.stderr.write(`${generalHelp()}\n`);
    return 2;
  }
  if (command === 'help' || command === '--help' || command === '-h') return help(rest);
  // --help or -h anywhere before "--" is the command's help, and nothing else runs: no side effects.
  const end = argv.indexOf('--');
  const options = end < 0 ? argv : argv.slice(0, end);
  if (options.includes('--help') || options.includes('-h')) return help(commandWords(argv));
  if (command !== 'serve' && command !== 'peer' && command !== 'tls') takeTlsDirectory(rest);
  switch (command) {
    case 'serve':
      return (await needs('serve', () => import('./serve.ts'))).serve(rest);
    case 'volume':
      return volumeCommand(rest);
    case 'snapshot':
      return snapshotCommand(rest);
    case 'clone':
      return cloneCommand(rest);
    case 'status':
      return statusCommand(rest);
    case 'send':
      return (await needs('send', () => import('./stream.ts'))).sendCommand(rest, apiPath);
    case 'receive':
      return (await needs('receive', () => import('./stream.ts'))).receiveCommand(rest, apiPath);
    case 'attach':
      return (await needs('attach', () => import('./attach.ts'))).attachCommand(rest, apiPath);
    case 'detach':
      return (await needs('detach', () => import('./attach.ts'))).detachCommand(rest, apiPath);
    case 'scrub':
      return (await needs('scrub', () => import('./scrub.ts'))).scrubCommand(rest, apiPath);
    case 'fsck':
      return fsckCommand(rest);
    case 'pool':
      return poolCommand(rest);
    case 'tls':
      return (await needs('tls', () => import('./tls.ts'))).tlsCommand(rest);
    case 'peer':
      return (await needs('peer', () => import('./peer.ts'))).peerCommand(rest);
    case 'replica':
      return (await needs('replica', () => import('./replica.ts'))).replicaCommand(rest, apiPath);
    case 'cluster':
      return (await needs('cluster', () => import('./cluster.ts'))).clusterCommand(rest, apiPath);
    case 'bench':
      return (await needs('bench', () => import('./bench.ts'))).benchCommand(rest);
    case 'iostat':
      return (await needs('iostat', () => import('./iostat.ts'))).iostatCommand(rest, apiPath);
    case 'completion': {
      const { positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands.completion.options }));
      if (positionals.length !== 1 || positionals[0] !== 'bash') throw new UsageError('completion takes one shell: chunkd completion bash');
      process.stdout.write((await needs('completion', () => import('./completion.ts'))).bashCompletion());
      return 0;
    }
    default:
      throw new UsageError(`unknown command "${command}" (chunkd help lists them)`);
  }
}

/** chunkd help [COMMAND ...]: the list of commands, or one command's (or group's) help, on stdout. */
async function help(argv: string[]): Promise<number> {
  // "chunkd help --help" is the help of help.
  const words = argv.length > 0 && commandWords(argv).length === 0 ? ['help'] : commandWords(argv);
  if (words.length === 0) {
    process.stdout.write(`${generalHelp()}\n`);
    return 0;
  }
  const found = findCommand(words);
  if (found === null) throw new UsageError(`no command "${words.join(' ')}" (chunkd help lists them)`);
  process.stdout.write(`${commandHelp(found.key)}\n`);
  // bench's options are the benchmark suite's: it lists them itself.
  if (found.key === 'bench') return (await needs('bench', () => import('./bench.ts'))).benchHelp();
  return 0;
}

/**
 * Takes --tls-dir DIR out of a command's arguments into $CHUNKD_TLS_DIR, where the API client finds the client
 * pair for an API on TCP (--api HOST:PORT); every command that talks to a node takes it that way.
 */
function takeTlsDirectory(argv: string[]): void {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--') return;
    if (argv[i] === '--tls-dir' && i + 1 < argv.length) {
      process.env.CHUNKD_TLS_DIR = argv[i + 1];
      argv.splice(i, 2);
      i -= 1;
    } else if (argv[i]!.startsWith('--tls-dir=')) {
      process.env.CHUNKD_TLS_DIR = argv[i]!.slice('--tls-dir='.length);
      argv.splice(i, 1);
      i -= 1;
    }
  }
}

function apiPath(option: string | undefined): string {
  return option ?? process.env.CHUNKD_API ?? path.join('data', 'chunkd.sock');
}

function print(json: boolean | undefined, value: unknown, text: () => string): void {
  process.stdout.write(json ? `${JSON.stringify(value, null, 2)}\n` : `${text()}\n`);
}

/** ", longest pause 102 ms (18 on CPU, 80 waiting for a CPU, 4 elsewhere; 12 in collections)", or nothing from a node that does not say. */
function describePause(pause: Parameters<typeof describeLoopPause>[0] | null | undefined): string {
  return pause === null || pause === undefined ? '' : `, longest pause ${describeLoopPause(pause)}`;
}

function describeVolume(volume: VolumeInfo): string {
  const snapshots = volume.snapshots.length > 0 ? `\t${volume.snapshots.length} snapshots` : '';
  return `${volume.name}\tsize ${formatSize(volume.sizeBytes)} (${volume.sizeBytes} bytes)\tallocated ${formatSize(volume.allocatedBytes)} (${volume.allocatedBytes} bytes)${snapshots}`;
}

async function volumeCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  const nameOf = (positionals: string[]): string => {
    if (positionals.length !== 1) throw new UsageError(`volume ${verb} takes one volume name`);
    return validateName(positionals[0]);
  };
  const sizeOf = (text: string | undefined): number => {
    if (text === undefined) throw new UsageError(`volume ${verb} needs --size SIZE`);
    return parseSize(text);
  };
  switch (verb) {
    case 'create': {
      const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['volume create'].options }));
      const [name, sizeBytes, replicas, syncTimeoutMs] = parsing(() => {
        const count = values.replicas === undefined ? 0 : Number(values.replicas);
        if (values.replicas !== undefined && (!/^\d+$/.test(values.replicas) || count > 8)) throw new UsageError(`invalid --replicas "${values.replicas}": a whole number from 0 to 8`);
        if (values.sync === true && count === 0) throw new UsageError('--sync needs --replicas N (1 or more): the replicas it makes synchronous');
        if (values['sync-timeout'] !== undefined && values.sync !== true) throw new UsageError('--sync-timeout goes with --sync');
        return [nameOf(positionals), sizeOf(values.size), count, values['sync-timeout'] === undefined ? undefined : parseDuration(values['sync-timeout'], '--sync-timeout')] as const;
      });
      const sync = values.sync === true ? { sync: true, ...(syncTimeoutMs === undefined ? {} : { syncTimeoutMs }) } : {};
      const volume = (await callApi(apiPath(values.api), 'POST', '/v1/volumes', { name, sizeBytes, ...(replicas > 0 ? { replicas } : {}), ...sync, ...(values.node === undefined ? {} : { node: values.node }) })) as VolumeInfo & { replicas?: string[]; owner?: string };
      print(values.json, volume, () => `created volume ${volume.name} of ${formatSize(volume.sizeBytes)}${volume.owner === undefined ? '' : ` on node ${volume.owner}`}${volume.replicas === undefined ? '' : `, ${values.sync === true ? 'synchronous replicas (in sync)' : 'replicas'} on ${volume.replicas.join(', ')}`}`);
      return 0;
    }
    case 'list': {
      const { values } = parsing(() => parseArgs({ args: rest, options: commands['volume list'].options }));
      const { volumes, cluster, clusterError } = (await callApi(apiPath(values.api), 'GET', '/v1/volumes')) as { volumes: VolumeInfo[]; cluster?: ClusterVolume[]; clusterError?: string };
      if (clusterError !== undefined) process.stderr.write(`chunkd: the cluster's volumes are not available (${clusterError}); this node's own:\n`);
      if (cluster !== undefined) {
        const { renderClusterVolumes } = await needs('volume list', () => import('./cluster.ts'));
        print(values.json, cluster, () => renderClusterVolumes(cluster));
      } else print(values.json, volumes, () => (volumes.length === 0 ? 'no volumes' : volumes.map(describeVolume).join('\n')));
      return 0;
    }
    case 'info': {
      const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['volume info'].options }));
      const name = parsing(() => nameOf(positionals));
      const volume = (await callApi(apiPath(values.api), 'GET', `/v1/volumes/${encodeURIComponent(name)}`)) as VolumeInfo;
      print(values.json, volume, () => describeVolume(volume));
      return 0;
    }
    case 'resize': {
      const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['volume resize'].options }));
      const [name, sizeBytes] = parsing(() => [nameOf(positionals), sizeOf(values.size)] as const);
      const volume = (await callApi(apiPath(values.api), 'PATCH', `/v1/volumes/${encodeURIComponent(name)}`, { sizeBytes, force: values.force === true })) as VolumeInfo;
      print(values.json, volume, () => `volume ${volume.name} is now ${formatSize(volume.sizeBytes)}`);
      return 0;
    }
    case 'set': {
      const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['volume set'].options }));
      const [name, sync, syncTimeoutMs] = parsing(() => {
        if (values.sync === undefined) throw new UsageError(`volume set needs --sync on|off (the one setting it changes)\nusage: chunkd ${commands['volume set'].usage[0]}`);
        if (values.sync !== 'on' && values.sync !== 'off') throw new UsageError(`invalid --sync "${values.sync}": on or off`);
        if (values['sync-timeout'] !== undefined && values.sync !== 'on') throw new UsageError('--sync-timeout goes with --sync on');
        return [nameOf(positionals), values.sync === 'on', values['sync-timeout'] === undefined ? undefined : parseDuration(values['sync-timeout'], '--sync-timeout')] as const;
      });
      const result = (await callApi(apiPath(values.api), 'PATCH', `/v1/volumes/${encodeURIComponent(name)}`, { sync, ...(syncTimeoutMs === undefined ? {} : { syncTimeoutMs }) })) as { volume: string; sync: boolean; replicas: Array<{ peer: string; peerName: string | null }> };
      const peers = result.replicas.map((replica) => (replica.peerName === null ? replica.peer : `${replica.peerName} (${replica.peer})`)).join(', ');
      print(values.json, result, () => `volume ${name}: its replicas are ${sync ? 'synchronous (in sync)' : 'asynchronous'}: ${peers}`);
      return 0;
    }
    case 'rm': {
      const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['volume rm'].options }));
      const name = parsing(() => nameOf(positionals));
      await callApi(apiPath(values.api), 'DELETE', `/v1/volumes/${encodeURIComponent(name)}`);
      print(values.json, { removed: name }, () => `removed volume ${name}`);
      return 0;
    }
    case 'handoff': {
      const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['volume handoff'].options }));
      const name = parsing(() => nameOf(positionals));
      if (values.to === undefined) throw new UsageError(`volume handoff needs --to HOST:PORT (the new owner's --peer-listen)\nusage: chunkd ${commands['volume handoff'].usage[0]}`);
      const result = (await callApi(apiPath(values.api), 'POST', `/v1/volumes/${encodeURIComponent(name)}/handoff`, { to: values.to })) as { to: string; epoch: number; pauseSeconds: number; increments: number; finalBytes: number; disconnected: number };
      print(values.json, result, () => `handed ${name} to ${result.to} (epoch ${result.epoch}) after ${result.increments} increment(s); writes paused ${result.pauseSeconds.toFixed(3)} s for a final ${formatSize(result.finalBytes)}; ${result.disconnected} NBD client(s) disconnected: reconnect them to ${result.to}; this node keeps a read-only replica`);
      return 0;
    }
    case 'move': {
      const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['volume move'].options }));
      if (values.cancel === true) {
        const name = parsing(() => {
          if (values.to !== undefined) throw new UsageError('volume move --cancel takes no --to: it stops the move in progress, wherever it goes');
          return nameOf(positionals);
        });
        const result = (await callApi(apiPath(values.api), 'POST', `/v1/volumes/${encodeURIComponent(name)}/move`, { cancel: true })) as { cancelled: boolean; owner: string; epoch: number };
        print(values.json, result, () => (result.cancelled ? `move of ${name} cancelled: it stays on ${result.owner} (epoch ${result.epoch})` : `too late to cancel: ${name} is owned by ${result.owner} now (epoch ${result.epoch})`));
        return 0;
      }
      const [name, to] = parsing(() => {
        if (values.to === undefined) throw new UsageError(`volume move needs --to NODE (a node of the cluster)\nusage: chunkd ${commands['volume move'].usage[0]}`);
        return [nameOf(positionals), validateName(values.to, 'node')] as const;
      });
      const result = (await callApi(apiPath(values.api), 'POST', `/v1/volumes/${encodeURIComponent(name)}/move`, { to })) as { from: string; to: string; epoch: number; moved: boolean };
      print(values.json, result, () => (result.moved ? `moved ${name} from ${result.from} to ${result.to} (epoch ${result.epoch}); ${result.from} keeps a read-only replica` : `${name} is already owned by ${result.to} (epoch ${result.epoch})`));
      return 0;
    }
    default:
      throw unknownVerb('volume', verb);
  }
}

async function snapshotCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (verb !== 'create' && verb !== 'list' && verb !== 'rm' && verb !== 'rollback' && verb !== 'diff') throw unknownVerb('snapshot', verb);
  const key = `snapshot ${verb}` as const;
  const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands[key].options }));
  const socket = apiPath(values.api);
  const names = (min: number, max: number): string[] =>
    parsing(() => {
      if (positionals.length < min || positionals.length > max) throw new UsageError(`usage: chunkd ${commands[key].usage[0]}`);
      return positionals.map((name, i) => validateName(name, i === 0 ? 'volume' : 'snapshot'));
    });
  const route = (volume: string, snapshot?: string): string =>
    `/v1/volumes/${encodeURIComponent(volume)}/snapshots${snapshot === undefined ? '' : `/${encodeURIComponent(snapshot)}`}`;
  switch (verb) {
    case 'create': {
      const [volume, snapshot] = names(2, 2);
      const info = (await callApi(socket, 'POST', route(volume!), { name: snapshot })) as SnapshotInfo;
      print(values.json, info, () => `created snapshot ${info.volume}@${info.name}`);
      return 0;
    }
    case 'list': {
      const [volume] = names(1, 1);
      const { snapshots } = (await callApi(socket, 'GET', route(volume!))) as { snapshots: CountedSnapshotInfo[] };
      print(values.json, snapshots, () =>
        snapshots.length === 0 ? `volume ${volume} has no snapshots` : snapshots.map((s) => `${s.name}\t${s.createdAt}\tholds alone ${formatSize(s.uniqueBytes)} (${s.uniqueBytes} bytes)`).join('\n'));
      return 0;
    }
    case 'rm': {
      const [volume, snapshot] = names(2, 2);
      await callApi(socket, 'DELETE', route(volume!, snapshot));
      print(values.json, { removed: `${volume}@${snapshot}` }, () => `removed snapshot ${volume}@${snapshot}`);
      return 0;
    }
    case 'rollback': {
      const [volume, snapshot] = names(2, 2);
      const info = (await callApi(socket, 'POST', `${route(volume!, snapshot)}/rollback`)) as VolumeInfo;
      print(values.json, info, () => `volume ${volume} rolled back to ${snapshot}`);
      return 0;
    }
    case 'diff': {
      const [volume, from, to] = names(2, 3);
      const query = to === undefined ? '' : `?to=${encodeURIComponent(to)}`;
      const report = (await callApi(socket, 'GET', `${route(volume!, from)}/diff${query}`)) as DiffReport;
      print(values.json, report, () =>
        [
          `${volume}@${from} -> ${to === undefined ? `${volume} (live)` : `${volume}@${to}`}: ${report.extents.length} extents, ${formatSize(report.changedBytes)} (${report.changedBytes} bytes) differ`,
          ...report.extents.map((e) => `  offset ${e.offsetBytes} length ${e.lengthBytes}`),
        ].join('\n'));
      return 0;
    }
  }
}

async function cloneCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parsing(() => parseArgs({ args: argv, allowPositionals: true, options: commands.clone.options }));
  const [volume, snapshot, newName] = parsing(() => {
    const source = positionals[0]?.split('@') ?? [];
    if (positionals.length !== 2 || source.length !== 2) throw new UsageError(`usage: chunkd ${commands.clone.usage[0]}`);
    return [validateName(source[0]), validateName(source[1], 'snapshot'), validateName(positionals[1])];
  });
  const info = (await callApi(apiPath(values.api), 'POST', '/v1/clones', { source: `${volume}@${snapshot}`, name: newName })) as VolumeInfo;
  print(values.json, info, () => `created volume ${info.name} from ${volume}@${snapshot}`);
  return 0;
}

async function statusCommand(argv: string[]): Promise<number> {
  const { values } = parsing(() => parseArgs({ args: argv, options: commands.status.options }));
  const status = (await callApi(apiPath(values.api), 'GET', '/v1/status')) as {
    pid: number;
    version?: string;
    uptimeSeconds: number;
    metricsListen?: string | null;
    pool: { directory: string; allocatedBytes: number; chunkFilesBytes?: number; fileSystem: { freeBytes: number }; failure: string | null; commitError: string | null; metadataRepairsTotal: number };
    volumes: VolumeInfo[];
    nbd: { listen: string[]; tls?: { mode: string; verifyPeer: boolean }; connectionsOpen: number; requestsTotal: number };
    io: { engine: string; workers: Array<{ id: number; inFlight: number }>; queued: number; workerRestarts: number };
    fuse?: { mountpoint: string; openFiles: number } | null;
    attachments?: Array<{ volume: string; mountpoint: string; fsType: string; via: string; state: string; loopDevice: string | null; error: string | null; dockerIds: string[] }>;
    eventLoopUtilization: number;
    eventLoopLongestPause?: Parameters<typeof describeLoopPause>[0] | null;
    replication?: {
      replicas: Array<{ volume: string; peer: string; peerName: string | null; state: string; lagSeconds: number | null; lastError: { message: string } | null }>;
      replicaVolumes: Array<{ volume: string; owner: string; epoch: number }>;
      fenced: Array<{ volume: string; owner: string; ownerEpoch: number; epoch: number }>;
    };
  };
  const replication = status.replication ?? { replicas: [], replicaVolumes: [], fenced: [] };
  print(values.json, status, () =>
    [
      `chunkd ${status.version ?? '(unknown version)'}, node pid ${status.pid}, up ${status.uptimeSeconds} s${status.metricsListen ? `, metrics on http://${status.metricsListen}/metrics` : ''}`,
      `pool ${status.pool.directory}: ${formatSize(status.pool.allocatedBytes)} allocated${status.pool.chunkFilesBytes === undefined ? '' : ` in ${formatSize(status.pool.chunkFilesBytes)} of chunk files`}, ${formatSize(status.pool.fileSystem.freeBytes)} free on its file system${status.pool.failure ? `, FAILED: ${status.pool.failure}` : ''}`,
      ...(status.pool.failure === null && status.pool.commitError ? [`  last commit failed: ${status.pool.commitError}`] : []),
      ...(status.pool.metadataRepairsTotal > 0 ? [`  ${status.pool.metadataRepairsTotal} damaged metadata copies repaired at start (see the log)`] : []),
      `nbd ${status.nbd.listen.join(', ') || '(not listening)'}${status.nbd.tls === undefined || status.nbd.tls.mode === 'off' ? '' : ` (TLS ${status.nbd.tls.mode}${status.nbd.tls.verifyPeer ? ', client certificates verified' : ''})`}: ${status.nbd.connectionsOpen} connections, ${status.nbd.requestsTotal} requests served`,
      `event loop utilisation ${(status.eventLoopUtilization * 100).toFixed(1)}%${describePause(status.eventLoopLongestPause)}`,
      status.io.engine === 'inline'
        ? 'chunk I/O on the main thread (--workers 0)'
        : `chunk I/O on ${status.io.workers.length} worker threads, ${status.io.queued} requests queued, ${status.io.workerRestarts} restarted: ` +
          status.io.workers.map((worker) => `worker ${worker.id} ${worker.inFlight} in flight`).join(', '),
      `volumes: ${status.volumes.length}`,
      ...status.volumes.map((volume) => `  ${describeVolume(volume)}`),
      ...replication.fenced.map((f) => `FENCED: ${f.volume} is owned by ${f.owner} at epoch ${f.ownerEpoch} (this node's was ${f.epoch}); writes refused: chunkd replica demote ${f.volume}`),
      ...replication.replicaVolumes.map((r) => `replica: ${r.volume} of ${r.owner} (epoch ${r.epoch}), read-only`),
      ...replication.replicas.map((r) => `replicating ${r.volume} to ${r.peerName ?? r.peer}: ${r.state}${r.lagSeconds === null ? '' : `, lag ${r.lagSeconds.toFixed(1)} s`}${r.lastError === null ? '' : `, last error: ${r.lastError.message}`}`),
      ...(status.fuse ? [`fuse ${status.fuse.mountpoint}: ${status.fuse.openFiles} files open`] : []),
      `attachments: ${status.attachments?.length ?? 0}`,
      ...(status.attachments ?? []).map(
        (a) => `  ${a.volume}\t${a.mountpoint}\t${a.fsType} on ${a.loopDevice ?? '-'} via ${a.via}\t${a.state}${a.dockerIds.length > 0 ? `\t${a.dockerIds.length} container(s)` : ''}${a.error ? `\t${a.error}` : ''}`,
      ),
    ].join('\n'),
  );
  return 0;
}

/** chunkd pool upgrade --metadata paged [--pool DIR]: offline, format 3 to format 4 (pool-upgrade.ts). */
async function poolCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  if (verb !== 'upgrade') throw unknownVerb('pool', verb);
  const { values } = parsing(() => parseArgs({ args: rest, options: commands['pool upgrade'].options }));
  if (values.metadata !== 'paged') throw new UsageError(`pool upgrade needs --metadata paged (the only upgrade there is)${values.metadata === undefined ? '' : `, not ${JSON.stringify(values.metadata)}`}`);
  const { upgradePool } = await needs('pool upgrade', () => import('../store/pool-upgrade.ts'));
  const report = await upgradePool(values.pool ?? commands['pool upgrade'].options.pool.fallback);
  print(values.json, report, () =>
    [
      `pool ${report.directory}: upgraded from format ${report.fromFormat} to ${report.toFormat} (paged metadata) in ${report.seconds.toFixed(1)} s`,
      `  ${report.volumeCount} volumes, ${report.snapshotCount} snapshots, ${report.records} records applied, ${formatSize(report.metadataBytes)} in each of the two copies of the metadata pages`,
      ...report.repairs.map((line) => `  read from the good copy: ${line}`),
    ].join('\n'),
  );
  return 0;
}

/**
 * Exit 0: clean; 1: damage found; 2: the check could not run (not a pool, held by a node, unreadable).
 * With --repair: 0 when the pool is clean afterwards and nothing was lost, 1 when something was lost (listed), or
 * when damage was found that it does not repair (a page of paged metadata damaged in both copies: listed, nothing
 * changed).
 */
async function fsckCommand(argv: string[]): Promise<number> {
  const { values } = parsing(() => parseArgs({ args: argv, options: commands.fsck.options }));
  const directory = values.pool ?? commands.fsck.options.pool.fallback;
  const { fsckPool } = await needs('fsck', () => import('../store/fsck.ts'));
  const repairPool = values.repair ? (await needs('fsck --repair', () => import('../store/repair.ts'))).repairPool : null;
  let repair: RepairReport | null = null;
  let report;
  try {
    if (repairPool !== null) repair = await repairPool(directory);
    report = await fsckPool(directory);
  } catch (error) {
    if (!(error instanceof ChunkdError)) throw error;
    printError(error.code, `fsck could not run: ${error.message}`, values.json === true);
    return 2;
  }
  if (repair !== null && repair.unrepairable.length > 0) {
    print(values.json, { repair, after: report }, () =>
      [
        `pool ${repair.directory}: NOT repaired: damage fsck --repair cannot repair on paged metadata; nothing was changed`,
        ...repair.unrepairable.map((line) => `  damage: ${line}`),
        ...report.warnings.map((line) => `  warning: ${line}`),
      ].join('\n'),
    );
    return 1;
  }
  if (repair !== null) {
    print(values.json, { repair, after: report }, () =>
      [
        `pool ${repair.directory}: ${repair.lossless ? 'repaired, nothing lost' : 'repaired by salvage; LOST:'}`,
        ...repair.lostExtents.map((extent) => `  lost: ${extent.export} bytes ${extent.offsetBytes}-${extent.offsetBytes + extent.lengthBytes - 1} (${formatSize(extent.lengthBytes)}): ${extent.why}`),
        ...repair.lostChanges.map((line) => `  lost: ${line}`),
        ...repair.actions.map((line) => `  did: ${line}`),
        `  now: ${report.clean ? 'clean' : `still damaged: ${report.errors.join('; ')}`}`,
      ].join('\n'),
    );
    return repair.lossless && report.clean ? 0 : 1;
  }
  print(values.json, report, () =>
    [
      `pool ${report.directory}: ${report.clean ? 'clean' : report.repairable ? 'DAMAGED (repairable, nothing lost)' : 'DAMAGED'}`,
      ...(report.loaded ? [`  ${report.volumeCount} volumes, ${formatSize(report.mappedBytes)} mapped, generation ${report.generation}, ${report.replayedRecords} journal records`] : []),
      ...report.errors.map((line) => `  damage: ${line}`),
      ...(report.repairable ? ['  run chunkd fsck --repair to repair it (a start also writes damaged copies it reads whole again)'] : []),
      ...report.warnings.map((line) => `  warning: ${line}`),
    ].join('\n'),
  );
  return report.clean ? 0 : 1;
}
