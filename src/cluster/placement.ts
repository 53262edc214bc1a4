// Placement of a new volume, the pure part: its owner, then its replicas.
//
// The owner: a live, healthy node, the one with the most free space in its pool (the free space each node
// publishes in its etcd record, refreshed at its renewals). Reports taken at different moments differ by a
// little (and nodes whose pools share a file system report nearly the same), so free space within
// ownerTieBytes() of the most counts as a tie; a tie goes to the node asked (nothing to forward), else to the
// first name, so that every node would choose the same. Another node qualifies only when it has a peer port
// and the node asked can reach peer ports (its client certificate), since the create is forwarded there.
//
// Replicas: distinct live nodes other than the owner, each with a peer port to be reached at, the most free space
// first (ties: the first name), so they are the ones after the owner in the same order.
import { ChunkdError } from '../core/errors.ts';
import type { NodeRecord } from './records.ts';

const GiB = 1024 ** 3;

/** How close to the most free space counts as as much: 1 GiB, or 2% of the most free, whichever is larger. */
export function ownerTieBytes(mostFreeBytes: number): number {
  return Math.max(GiB, Math.floor(mostFreeBytes / 50));
}

/** The owner of a new volume asked for on node `asked` (see above); `forward`: whether `asked` can reach other nodes' peer ports. */
export function chooseOwner(nodes: NodeRecord[], asked: string, forward: boolean): NodeRecord {
  const eligible = nodes.filter((node) => node.health === 'ok' && (node.name === asked || (forward && node.peer !== null)));
  if (eligible.length === 0) throw ChunkdError.noSpace(`no live, healthy node can own a new volume (node ${asked} is not registered as healthy${forward ? '' : ', and it cannot forward to another: it has no client certificate'})`);
  const mostFree = Math.max(...eligible.map((node) => node.freeBytes));
  const tied = eligible.filter((node) => mostFree - node.freeBytes <= ownerTieBytes(mostFree)).sort((a, b) => a.name.localeCompare(b.name));
  return tied.find((node) => node.name === asked) ?? tied[0]!;
}

export function chooseReplicaNodes(nodes: NodeRecord[], owner: string, count: number): Array<{ name: string; peer: string }> {
  const eligible = nodes
    .filter((node) => node.name !== owner && node.peer !== null && node.health === 'ok')
    .sort((a, b) => b.freeBytes - a.freeBytes || a.name.localeCompare(b.name));
  if (eligible.length < count) {
    throw ChunkdError.noSpace(`--replicas ${count} needs ${count} live, healthy node(s) with a peer port besides ${owner}; the cluster has ${eligible.length}${eligible.length > 0 ? ` (${eligible.map((node) => node.name).join(', ')})` : ''}`);
  }
  return eligible.slice(0, count).map((node) => ({ name: node.name, peer: node.peer! }));
}
