// The chunkd command: parses arguments, then either runs a node (serve), checks a pool offline (fsck), or talks
// to a running node's API. Success exits 0; failure prints one clear line on stderr and exits non-zero.
import { parseArgs, type ParseArgsConfig } from 'node:util';
import path from 'node:path';
import { ChunkdError } from '../core/errors.ts';
import { validateName } from '../core/names.ts';
import { formatSize, parseSize } from '../core/units.ts';
import { fsckPool } from '../store/fsck.ts';
import { repairPool, type RepairReport } from '../store/repair.ts';
import type { DiffReport } from '../api/server.ts';
import type { SnapshotInfo, VolumeInfo } from '../store/pool.ts';
import { callApi } from './api-client.ts';
import { scrubCommand } from './scrub.ts';
import { serve } from './serve.ts';
import { attachCommand, detachCommand } from './attach.ts';
import { benchCommand } from './bench.ts';
import { tlsCommand } from './tls.ts';
import { peerCommand } from './peer.ts';
import { replicaCommand } from './replica.ts';
import { receiveCommand, sendCommand } from './stream.ts';

const usage = `usage: chunkd <command> [options]

  serve [--pool DIR] [--listen HOST:PORT|none] [--socket PATH] [--api PATH] [--default-volume NAME:SIZE]
        [--fuse DIR] [--plugin-socket PATH] [--tls off|on|require --tls-dir DIR [--tls-verify-peer]]
        [--peer-listen HOST:PORT --tls-dir DIR [--peer-allow NAME,...]] [--api-listen HOST:PORT --tls-dir DIR]
                                     run a node in the foreground (pool ./data, NBD on 127.0.0.1:10809);
                                     --tls: NBD over TLS; --peer-listen: the node-to-node port, mutual TLS
                                     with DIR's CA only; one --tls-dir (a node's set from tls init) for all
  volume create NAME --size SIZE     create a thin volume (sizes: 512, 4KiB, 64MiB, 10GiB, 1TiB)
  volume list [--json]
  volume info NAME [--json]          declared size and bytes allocated
  volume resize NAME --size SIZE [--force]
                                     grow; shrinking discards data and needs --force
  volume rm NAME                     refused while exported or while it has snapshots
  snapshot create VOL SNAP           instant, crash-consistent, durable on return
  snapshot list VOL [--json]         with the bytes each snapshot alone holds
  snapshot rm VOL SNAP               space held only by it goes back; clones keep what they share
  snapshot rollback VOL SNAP         the volume becomes the snapshot again (not while exported)
  snapshot diff VOL FROM [TO] [--json]
                                     extents that differ (TO omitted: the live volume), from metadata only
  clone VOL@SNAP NEWVOL              a writable volume sharing the snapshot's data
  send VOL@SNAP [--from SNAP0] [--out FILE|-]
                                     a replication stream of the snapshot (incremental from SNAP0) to a file
                                     or stdout (a pipe: chunkd send ... | ssh host chunkd receive ...)
  send --resume TOKEN [--out FILE|-] the rest of an interrupted stream (TOKEN from receive --resume-token)
  receive VOL [--in FILE|-] [--json] applies a stream: a full one makes VOL; an incremental needs VOL at its
                                     base snapshot; the snapshot appears only once the stream checks out whole
  receive --resume-token VOL         prints the token that continues an interrupted receive into VOL
  receive --abort VOL                gives up an interrupted receive (VOL removed, or rolled back to the base)
  scrub VOL | --all [--json]         read every block of the volume(s) and snapshots and check its checksum;
                                     lists damaged extents, exits 1 if any
  attach VOL --mountpoint DIR [--fs ext4|xfs] [--format] [--via fuse|nbdfuse]
                                     loop device over the volume's file, mounted; a file system is made only on a
                                     volume never written, or with --format on one that holds data blkid does not
                                     recognise (destroying it); one blkid recognises is never reformatted
  detach VOL                         unmount, detach the loop device, flush (refused while in use)
  status [--json]                    the node's pool, volumes, connections, attachments
  fsck --pool DIR [--repair] [--json]
                                     offline check of a pool no node holds: exit 0 clean, 1 damage, 2 could
                                     not run; --repair rewrites damaged metadata from its good copy, or
                                     salvages what it can and lists exactly what was lost
  tls init DIR [--node NAME ...] [--client NAME ...] [--san SAN ...] [--days N] [--add|--force]
                                     a cluster CA and certificates in the qemu/libnbd/nbdkit layout: DIR/NAME/
                                     per node (server + client pair) or client; DIR itself holds the first node's
  peer status HOST:PORT --tls-dir DIR [--expect NAME] [--json]
                                     hello to a node's peer port with DIR's client pair: its name, version, pool
  replica add VOL --peer HOST:PORT [--every 30s] [--max-rate 200MiB/s]
                                     keep a read-only replica of VOL on another node (its --peer-listen),
                                     updated by incremental streams; list, status VOL, sync VOL, remove VOL --peer
  bench [--target DIR] [--profile NAME] [--quick] [--only ROWS] [--out DIR]
                                     chunkd against the raw disk and its peers (bench/README.md)

  The CLI finds the node through --api PATH, else $CHUNKD_API, else ./data/chunkd.sock; --api HOST:PORT reaches
  a node's API on TCP (serve --api-listen) with the client pair of --tls-dir DIR (or $CHUNKD_TLS_DIR).`;

/** Runs the command line; returns the exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    return await run(argv);
  } catch (error) {
    if (error instanceof ChunkdError) {
      process.stderr.write(`chunkd: ${error.message}\n`);
      return 1;
    }
    if ((error as NodeJS.ErrnoException).code?.startsWith('ERR_PARSE_ARGS')) {
      process.stderr.write(`chunkd: ${(error as Error).message}\n`);
      return 2;
    }
    throw error;
  }
}

const commonOptions = {
  api: { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies ParseArgsConfig['options'];

async function run(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(`${usage}\n`);
    return command === undefined ? 2 : 0;
  }
  if (command !== 'serve' && command !== 'peer' && command !== 'tls') takeTlsDirectory(rest);
  switch (command) {
    case 'serve':
      return serve(rest);
    case 'volume':
      return volumeCommand(rest);
    case 'snapshot':
      return snapshotCommand(rest);
    case 'clone':
      return cloneCommand(rest);
    case 'status':
      return statusCommand(rest);
    case 'send':
      return sendCommand(rest, apiPath);
    case 'receive':
      return receiveCommand(rest, apiPath);
    case 'attach':
      return attachCommand(rest, apiPath);
    case 'detach':
      return detachCommand(rest, apiPath);
    case 'scrub':
      return scrubCommand(rest, apiPath);
    case 'fsck':
      return fsckCommand(rest);
    case 'tls':
      return tlsCommand(rest);
    case 'peer':
      return peerCommand(rest);
    case 'replica':
      return replicaCommand(rest, apiPath);
    case 'bench':
      return benchCommand(rest);
    default:
      throw ChunkdError.invalid(`unknown command "${command}" (run chunkd --help)`);
  }
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

function describeVolume(volume: VolumeInfo): string {
  const snapshots = volume.snapshots.length > 0 ? `\t${volume.snapshots.length} snapshots` : '';
  return `${volume.name}\tsize ${formatSize(volume.sizeBytes)} (${volume.sizeBytes} bytes)\tallocated ${formatSize(volume.allocatedBytes)} (${volume.allocatedBytes} bytes)${snapshots}`;
}

async function volumeCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: { ...commonOptions, size: { type: 'string' }, force: { type: 'boolean' } },
  });
  const socket = apiPath(values.api);
  const name = (): string => {
    if (positionals.length !== 1) throw ChunkdError.invalid(`volume ${verb} takes one volume name`);
    return validateName(positionals[0]);
  };
  const size = (): number => {
    if (values.size === undefined) throw ChunkdError.invalid(`volume ${verb} needs --size SIZE`);
    return parseSize(values.size);
  };
  switch (verb) {
    case 'create': {
      const volumeName = name();
      const volume = (await callApi(socket, 'POST', '/v1/volumes', { name: volumeName, sizeBytes: size() })) as VolumeInfo;
      print(values.json, volume, () => `created volume ${volume.name} of ${formatSize(volume.sizeBytes)}`);
      return 0;
    }
    case 'list': {
      const { volumes } = (await callApi(socket, 'GET', '/v1/volumes')) as { volumes: VolumeInfo[] };
      print(values.json, volumes, () => (volumes.length === 0 ? 'no volumes' : volumes.map(describeVolume).join('\n')));
      return 0;
    }
    case 'info': {
      const volume = (await callApi(socket, 'GET', `/v1/volumes/${encodeURIComponent(name())}`)) as VolumeInfo;
      print(values.json, volume, () => describeVolume(volume));
      return 0;
    }
    case 'resize': {
      const volumeName = name();
      const volume = (await callApi(socket, 'PATCH', `/v1/volumes/${encodeURIComponent(volumeName)}`, { sizeBytes: size(), force: values.force === true })) as VolumeInfo;
      print(values.json, volume, () => `volume ${volume.name} is now ${formatSize(volume.sizeBytes)}`);
      return 0;
    }
    case 'rm': {
      const volumeName = name();
      await callApi(socket, 'DELETE', `/v1/volumes/${encodeURIComponent(volumeName)}`);
      print(values.json, { removed: volumeName }, () => `removed volume ${volumeName}`);
      return 0;
    }
    default:
      throw ChunkdError.invalid(`unknown volume command "${verb ?? ''}": use create, list, info, resize or rm`);
  }
}

async function snapshotCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  const { values, positionals } = parseArgs({ args: rest, allowPositionals: true, options: commonOptions });
  const socket = apiPath(values.api);
  const names = (min: number, max: number, usage: string): string[] => {
    if (positionals.length < min || positionals.length > max) throw ChunkdError.invalid(`usage: chunkd snapshot ${verb} ${usage}`);
    return positionals.map((name, i) => validateName(name, i === 0 ? 'volume' : 'snapshot'));
  };
  const route = (volume: string, snapshot?: string): string =>
    `/v1/volumes/${encodeURIComponent(volume)}/snapshots${snapshot === undefined ? '' : `/${encodeURIComponent(snapshot)}`}`;
  switch (verb) {
    case 'create': {
      const [volume, snapshot] = names(2, 2, 'VOL SNAP');
      const info = (await callApi(socket, 'POST', route(volume!), { name: snapshot })) as SnapshotInfo;
      print(values.json, info, () => `created snapshot ${info.volume}@${info.name}`);
      return 0;
    }
    case 'list': {
      const [volume] = names(1, 1, 'VOL');
      const { snapshots } = (await callApi(socket, 'GET', route(volume!))) as { snapshots: SnapshotInfo[] };
      print(values.json, snapshots, () =>
        snapshots.length === 0 ? `volume ${volume} has no snapshots` : snapshots.map((s) => `${s.name}\t${s.createdAt}\tholds alone ${formatSize(s.uniqueBytes)} (${s.uniqueBytes} bytes)`).join('\n'));
      return 0;
    }
    case 'rm': {
      const [volume, snapshot] = names(2, 2, 'VOL SNAP');
      await callApi(socket, 'DELETE', route(volume!, snapshot));
      print(values.json, { removed: `${volume}@${snapshot}` }, () => `removed snapshot ${volume}@${snapshot}`);
      return 0;
    }
    case 'rollback': {
      const [volume, snapshot] = names(2, 2, 'VOL SNAP');
      const info = (await callApi(socket, 'POST', `${route(volume!, snapshot)}/rollback`)) as VolumeInfo;
      print(values.json, info, () => `volume ${volume} rolled back to ${snapshot}`);
      return 0;
    }
    case 'diff': {
      const [volume, from, to] = names(2, 3, 'VOL FROM [TO]');
      const query = to === undefined ? '' : `?to=${encodeURIComponent(to)}`;
      const report = (await callApi(socket, 'GET', `${route(volume!, from)}/diff${query}`)) as DiffReport;
      print(values.json, report, () =>
        [
          `${volume}@${from} -> ${to === undefined ? `${volume} (live)` : `${volume}@${to}`}: ${report.extents.length} extents, ${formatSize(report.changedBytes)} (${report.changedBytes} bytes) differ`,
          ...report.extents.map((e) => `  offset ${e.offsetBytes} length ${e.lengthBytes}`),
        ].join('\n'));
      return 0;
    }
    default:
      throw ChunkdError.invalid(`unknown snapshot command "${verb ?? ''}": use create, list, rm, rollback or diff`);
  }
}

async function cloneCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: commonOptions });
  const source = positionals[0]?.split('@') ?? [];
  if (positionals.length !== 2 || source.length !== 2) throw ChunkdError.invalid('usage: chunkd clone VOL@SNAP NEWVOL');
  const [volume, snapshot] = [validateName(source[0]), validateName(source[1], 'snapshot')];
  const newName = validateName(positionals[1]);
  const info = (await callApi(apiPath(values.api), 'POST', '/v1/clones', { source: `${volume}@${snapshot}`, name: newName })) as VolumeInfo;
  print(values.json, info, () => `created volume ${info.name} from ${volume}@${snapshot}`);
  return 0;
}

async function statusCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: commonOptions });
  const status = (await callApi(apiPath(values.api), 'GET', '/v1/status')) as {
    pid: number;
    uptimeSeconds: number;
    pool: { directory: string; allocatedBytes: number; fileSystem: { freeBytes: number }; failure: string | null; commitError: string | null; metadataRepairsTotal: number };
    volumes: VolumeInfo[];
    nbd: { listen: string[]; connectionsOpen: number; requestsTotal: number };
    io: { engine: string; workers: Array<{ id: number; inFlight: number }>; queued: number; workerRestarts: number };
    fuse?: { mountpoint: string; openFiles: number } | null;
    attachments?: Array<{ volume: string; mountpoint: string; fsType: string; via: string; state: string; loopDevice: string | null; error: string | null; dockerIds: string[] }>;
    eventLoopUtilization: number;
    replication?: {
      replicas: Array<{ volume: string; peer: string; peerName: string | null; state: string; lagSeconds: number | null; lastError: { message: string } | null }>;
      replicaVolumes: Array<{ volume: string; owner: string; epoch: number }>;
      fenced: Array<{ volume: string; owner: string; ownerEpoch: number; epoch: number }>;
    };
  };
  const replication = status.replication ?? { replicas: [], replicaVolumes: [], fenced: [] };
  print(values.json, status, () =>
    [
      `node pid ${status.pid}, up ${status.uptimeSeconds} s`,
      `pool ${status.pool.directory}: ${formatSize(status.pool.allocatedBytes)} allocated, ${formatSize(status.pool.fileSystem.freeBytes)} free on its file system${status.pool.failure ? `, FAILED: ${status.pool.failure}` : ''}`,
      ...(status.pool.failure === null && status.pool.commitError ? [`  last commit failed: ${status.pool.commitError}`] : []),
      ...(status.pool.metadataRepairsTotal > 0 ? [`  ${status.pool.metadataRepairsTotal} damaged metadata copies repaired at start (see the log)`] : []),
      `nbd ${status.nbd.listen.join(', ') || '(not listening)'}: ${status.nbd.connectionsOpen} connections, ${status.nbd.requestsTotal} requests served`,
      `event loop utilisation ${(status.eventLoopUtilization * 100).toFixed(1)}%`,
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

/**
 * Exit 0: clean; 1: damage found; 2: the check could not run (not a pool, held by a node, unreadable).
 * With --repair: 0 when the pool is clean afterwards and nothing was lost, 1 when something was lost (listed).
 */
async function fsckCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { ...commonOptions, pool: { type: 'string' }, repair: { type: 'boolean' } } });
  const directory = values.pool ?? 'data';
  let repair: RepairReport | null = null;
  let report;
  try {
    if (values.repair) repair = await repairPool(directory);
    report = await fsckPool(directory);
  } catch (error) {
    if (!(error instanceof ChunkdError)) throw error;
    process.stderr.write(`chunkd: fsck could not run: ${error.message}\n`);
    return 2;
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
      ...(report.repairable ? ['  run chunkd fsck --repair (or start the node) to write the damaged copies whole again'] : []),
      ...report.warnings.map((line) => `  warning: ${line}`),
    ].join('\n'),
  );
  return report.clean ? 0 : 1;
}
