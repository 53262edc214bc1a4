// chunkd cluster status [--json]: the cluster as etcd has it, asked through any node in it (serve --etcd).
import { parseArgs } from 'node:util';
import type { ClusterStatus } from '../cluster/cluster.ts';
import type { ClusterVolume } from '../cluster/listing.ts';
import { formatSize } from '../core/units.ts';
import { callApi } from './api-client.ts';
import { parsing, UsageError } from './errors.ts';
import { commands, unknownVerb } from './help.ts';

export async function clusterCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const [verb, ...rest] = argv;
  if (verb !== 'status') throw unknownVerb('cluster', verb);
  const { values, positionals } = parsing(() => parseArgs({ args: rest, allowPositionals: true, options: commands['cluster status'].options }));
  if (positionals.length > 0) throw new UsageError(`usage: chunkd ${commands['cluster status'].usage[0]}`);
  const status = (await callApi(apiPath(values.api), 'GET', '/v1/cluster')) as ClusterStatus;
  process.stdout.write(values.json ? `${JSON.stringify(status, null, 2)}\n` : renderClusterStatus(status));
  return 0;
}

/** The text form: one line per node, then one per volume. */
export function renderClusterStatus(status: ClusterStatus): string {
  const lines = [`cluster: ${status.nodes.filter((node) => node.alive).length} of ${status.nodes.length} nodes alive, ${status.volumes.length} volumes (asked node ${status.self}, lease TTL ${status.lease.ttlMs / 1000} s${status.lease.live ? '' : ', its lease is NOT live'})`];
  lines.push('NODE\tHEALTH\tPEER\tCAPACITY\tFREE\tVERSION\tVOLUMES');
  for (const node of status.nodes) {
    const health = node.alive ? node.health : 'down (no live lease)';
    const size = (bytes: number): string => (node.alive ? formatSize(bytes) : '-');
    lines.push(`${node.name}\t${health}\t${node.peer ?? '-'}\t${size(node.capacityBytes)}\t${size(node.freeBytes)}\t${node.version || '-'}\t${node.volumes.length > 0 ? node.volumes.join(',') : '-'}`);
  }
  if (status.volumes.length > 0) {
    lines.push('', 'VOLUME\tSIZE\tOWNER\tEPOCH\tREPLICAS');
    for (const volume of status.volumes) {
      const replicas = volume.replicas.map((node) => (volume.inSync === null ? node : `${node} (${volume.inSync.includes(node) ? 'in sync' : 'out of sync'})`));
      lines.push(`${volume.name}${volume.sync ? ' (sync)' : ''}\t${formatSize(volume.sizeBytes)}\t${volume.owner}\t${volume.epoch}\t${replicas.length > 0 ? replicas.join(',') : '-'}${volume.waiting === null ? '' : `\tWAITING: ${volume.waiting}`}`);
    }
  }
  return `${lines.join('\n')}\n`;
}

/**
 * `chunkd volume list` on a clustered node: one line per volume of the cluster; each replica as NODE@POINT (AGE)
 * when live (it follows this owner and epoch), NODE (not live) otherwise; a move in progress at the end.
 */
export function renderClusterVolumes(volumes: ClusterVolume[]): string {
  if (volumes.length === 0) return 'no volumes in the cluster';
  const lines = ['VOLUME\tSIZE\tOWNER\tEPOCH\tREPLICAS'];
  for (const volume of volumes) {
    const replicas = volume.replicas.map((replica) => {
      // A synchronous replica has no points: whether the owner records it in sync says what it holds.
      const state = volume.inSync === null ? `@${replica.point ?? '-'} (${((replica.pointAgeMs ?? 0) / 1000).toFixed(1)} s old)` : ` (${volume.inSync.includes(replica.node) ? 'in sync' : 'out of sync'})`;
      return replica.live ? `${replica.node}${state}` : `${replica.node} (not live)`;
    });
    const move = volume.move === null ? '' : `\tmoving to ${volume.move.to}`;
    lines.push(`${volume.name}${volume.sync ? ' (sync)' : ''}\t${formatSize(volume.sizeBytes)}\t${volume.owner}${volume.ownerAlive ? '' : ' (down)'}\t${volume.epoch}\t${replicas.length > 0 ? replicas.join(', ') : '-'}${move}${volume.waiting === null ? '' : `\tWAITING: ${volume.waiting}`}`);
  }
  return lines.join('\n');
}
