// Placement of a new volume's replicas, the pure part: distinct live nodes other than the owner, each with a peer
// port to be reached at, the most free space first (ties: the first name, so every node would choose the same).
import { ChunkdError } from '../core/errors.ts';
import type { NodeRecord } from './records.ts';

export function chooseReplicaNodes(nodes: NodeRecord[], owner: string, count: number): Array<{ name: string; peer: string }> {
  const eligible = nodes
    .filter((node) => node.name !== owner && node.peer !== null && node.health === 'ok')
    .sort((a, b) => b.freeBytes - a.freeBytes || a.name.localeCompare(b.name));
  if (eligible.length < count) {
    throw ChunkdError.noSpace(`--replicas ${count} needs ${count} live, healthy node(s) with a peer port besides ${owner}; the cluster has ${eligible.length}${eligible.length > 0 ? ` (${eligible.map((node) => node.name).join(', ')})` : ''}`);
  }
  return eligible.slice(0, count).map((node) => ({ name: node.name, peer: node.peer! }));
}
