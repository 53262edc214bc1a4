// The cluster soak's checks (bench/soak-cluster.ts), pure: the blocks its writers write, and what the
// acknowledgements, etcd's records and the blocks read back at the end must satisfy. Each check returns the
// violations it found, one line each (test/unit/soak-checks.test.ts makes each of them fail).
import { blockChecksum } from '../src/store/checksum.ts';

export const blockBytes = 4096;
const magic = 0x534f414b; // "SOAK"

/** Block `index`'s content for write `seq`: magic, seq, index, filler from seq, CRC-32 of the rest at the end. */
export function blockContent(seq: number, index: number): Buffer {
  const data = Buffer.alloc(blockBytes, (seq * 131 + 7) & 0xff);
  data.writeUInt32LE(magic, 0);
  data.writeUInt32LE(seq, 4);
  data.writeUInt32LE(index, 8);
  data.writeUInt32LE(blockChecksum(data.subarray(0, blockBytes - 4)), blockBytes - 4);
  return data;
}

export type FoundBlock = { kind: 'zero' } | { kind: 'write'; seq: number; index: number } | { kind: 'damaged'; why: string };

/** What a block read back holds: nothing (zeroes), write `seq` (whole, for block `index`), or damage. */
export function parseBlock(data: Buffer): FoundBlock {
  if (data.every((byte) => byte === 0)) return { kind: 'zero' };
  if (data.readUInt32LE(0) !== magic) return { kind: 'damaged', why: 'no magic' };
  if (data.readUInt32LE(blockBytes - 4) !== blockChecksum(data.subarray(0, blockBytes - 4))) return { kind: 'damaged', why: 'checksum mismatch' };
  return { kind: 'write', seq: data.readUInt32LE(4), index: data.readUInt32LE(8) };
}

/** One write acknowledgement, as the soak's writers record it. */
export interface Ack {
  seq: number;
  /** The block written. */
  index: number;
  node: string;
  /** The node's epoch of the volume in its roles file before the write was sent and after its reply: the ack's epoch lies between. */
  lo: number;
  hi: number;
  writer: string;
  /** performance.now() when sent and when the reply came. */
  sentAt: number;
  ackAt: number;
  /** Date.now() when the reply came (compared with points' repl-<ms>, the owner's Date.now() on the same machine). */
  ackWall: number;
}

/**
 * Ownership: (1) no two nodes acknowledged writes at one pinned epoch (lo = hi), (2) none acknowledged at a pinned
 * epoch that etcd recorded for another node (`epochOwners`: epoch -> owner, as polled), (3) no stale owner: a write
 * sent after another was acknowledged at epoch E (at least its lo) is not acknowledged at an epoch surely below E
 * (its hi < E).
 */
export function checkOwnership(acks: readonly Ack[], epochOwners: ReadonlyMap<number, string>): string[] {
  const violations: string[] = [];
  const owners = new Map<number, Map<string, Ack>>();
  for (const ack of acks) {
    if (ack.lo !== ack.hi) continue;
    const byNode = owners.get(ack.lo) ?? new Map<string, Ack>();
    if (!byNode.has(ack.node)) byNode.set(ack.node, ack);
    owners.set(ack.lo, byNode);
    const recorded = epochOwners.get(ack.lo);
    if (recorded !== undefined && recorded !== ack.node) violations.push(`write ${ack.seq} acknowledged by ${ack.node} at epoch ${ack.lo}, which etcd gave ${recorded}`);
  }
  for (const [epoch, byNode] of owners) {
    if (byNode.size > 1) violations.push(`epoch ${epoch}: writes acknowledged by ${[...byNode.values()].map((ack) => `${ack.node} (write ${ack.seq})`).join(' and ')}`);
  }
  const byAck = [...acks].sort((a, b) => a.ackAt - b.ackAt);
  // The acknowledgement with the highest lo among the first i + 1 answered.
  const highest: Ack[] = [];
  for (const ack of byAck) highest.push(highest.length > 0 && highest.at(-1)!.lo >= ack.lo ? highest.at(-1)! : ack);
  for (const ack of acks) {
    let low = 0;
    let high = byAck.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (byAck[middle]!.ackAt < ack.sentAt) low = middle + 1;
      else high = middle;
    }
    const before = low === 0 ? null : highest[low - 1]!;
    if (before !== null && ack.hi < before.lo) {
      violations.push(`write ${ack.seq} (${ack.writer}) acknowledged by ${ack.node} at epoch ${ack.hi} or below, sent after writes had been acknowledged at epoch ${before.lo} (write ${before.seq}, ${before.writer}, by ${before.node}, answered ${(ack.sentAt - before.ackAt).toFixed(1)} ms before it was sent)`);
    }
  }
  return violations;
}

export interface DataCheck {
  violations: string[];
  /** Acknowledgements covered by a replicated point: they must survive. */
  protectedWrites: number;
  /** Acknowledged writes that are not there (the block holds an older write or none): lost with an owner, unreplicated. */
  lostUnreplicated: number;
  /** Blocks that hold a write. */
  written: number;
}

/**
 * Data: `blocks` (index -> what the final owner's copy holds) against the acknowledgements and the points replicas
 * confirmed (`points`: "NODE/EPOCH" -> the newest pointMs of a replica following NODE at EPOCH). A write acknowledged
 * by NODE at pinned epoch EPOCH before such a point is in it; each block must hold that write or a later one issued
 * to it (`issued`: seq -> block), whole.
 */
export function checkBlocks(blocks: ReadonlyMap<number, FoundBlock>, acks: readonly Ack[], points: ReadonlyMap<string, number>, issued: ReadonlyMap<number, number>, where: string): DataCheck {
  const violations: string[] = [];
  const latestProtected = new Map<number, Ack>();
  const acknowledged = new Map<number, number[]>();
  let protectedWrites = 0;
  for (const ack of acks) {
    const seqs = acknowledged.get(ack.index) ?? [];
    seqs.push(ack.seq);
    acknowledged.set(ack.index, seqs);
    if (ack.lo !== ack.hi || (points.get(`${ack.node}/${ack.lo}`) ?? 0) <= ack.ackWall) continue;
    protectedWrites += 1;
    if ((latestProtected.get(ack.index)?.seq ?? 0) < ack.seq) latestProtected.set(ack.index, ack);
  }
  let written = 0;
  let lostUnreplicated = 0;
  for (const [index, found] of blocks) {
    if (found.kind === 'damaged') {
      violations.push(`block ${index} on ${where}: ${found.why}`);
      continue;
    }
    const seq = found.kind === 'zero' ? 0 : found.seq;
    if (found.kind === 'write') {
      written += 1;
      if (found.index !== index || issued.get(seq) !== index) violations.push(`block ${index} on ${where} holds write ${seq}, which was issued to block ${issued.get(seq)}`);
    }
    lostUnreplicated += (acknowledged.get(index) ?? []).filter((acked) => acked > seq).length;
    const needed = latestProtected.get(index);
    if (needed !== undefined && seq < needed.seq) {
      violations.push(`block ${index} on ${where}: write ${needed.seq}, acknowledged by ${needed.node} at epoch ${needed.lo} and replicated (a point at ${points.get(`${needed.node}/${needed.lo}`)} > ${needed.ackWall}), is lost: ${seq === 0 ? 'zeroes' : `write ${seq}`} there`);
    }
  }
  return { violations, protectedWrites, lostUnreplicated, written };
}
