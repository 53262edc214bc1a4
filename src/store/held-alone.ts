// What each snapshot holds alone (`snapshot list`'s `uniqueBytes`), remembered between lists (issue 15: with 100
// snapshots over paged metadata, counting them all took 2.5 s at 1 GiB written at random, 68 s at 4 GiB). A
// snapshot's map never changes; its count (the chunks it names that no other map names) changes only when another
// map that names one of its chunks stops or starts naming it. The pool's catalog tells this memo every record it
// applies (or queues, in the order it applies them), and the memo forgets the counts each record may change.
// Pure: no I/O, no catalog; O(1) per record.
//
// Which counts a record may change:
//   - A write, trim or removal of live volume V (map, unmap, remove) drops chunks V named. Every chunk V names that
//     some snapshot also names is named by V's *anchor*: the newest of the snapshots taken of V since its map was
//     last replaced, or, if none, the snapshot its map was replaced by (the origin of a clone, the target of a
//     rollback). Why: V only ever adds fresh chunks; a chunk V named when the anchor was taken is in the anchor;
//     one V wrote since is fresh, named only by V and maps made from V since, and no snapshot of V is newer. So
//     only the anchor's count may change, while it exists. A volume created empty with no snapshot since has no
//     anchor: nothing else names its chunks. Once the anchor is removed, a chunk of V may be named by any map of
//     V's family (a clone of the removed anchor and that clone's snapshots), so the whole family is forgotten.
//   - A clone of S, a rollback to S: S's chunks gain a holder (S only); a rollback also drops V's map, as above.
//   - A snapshot taken of V: its chunks are V's, which no snapshot held alone; no count but its own changes.
//   - A snapshot removed: its chunks lose a holder, any of which may then be another map's alone: the family;
//     but in a linear family (below) only the removed snapshot's nearest remaining older and newer snapshots.
//   - A resize changes no map (a shrink records the unmap of the end first).
// A family is the volumes and snapshots linked by clones: chunks are shared only within one. After an open the
// memo knows no anchor and no clone link: every volume then is of one family, its anchor unknown (a write forgets
// that family's counts), until a snapshot or rollback of the volume makes its anchor known again. The catalog
// records neither a volume's clone origin nor its rollbacks (a clone record names its origin, but the checkpoint
// keeps only the volumes and snapshots), so nothing read at an open tells more.
//
// A linear family: one volume created empty since the open (`create`, so its whole history is known), no clone
// ever made of any of its snapshots, no rollback of it. Its maps are the volume and its snapshots, each snapshot a
// copy of the volume at one time, in the order of their `snapshot` records. A chunk enters the volume's map once
// (a write maps fresh chunks) and leaves it once (never to come back: only a rollback or clone brings an old chunk
// back into a map), so the snapshots that name it are those taken over one stretch of time, consecutive in that
// order, and the volume too if it names it still (then the stretch runs to the newest). Removing snapshots keeps
// the rest consecutive. So a chunk that removed snapshot R shared with exactly one other map is named by R's
// nearest remaining older or newer snapshot, or by the volume when R was the newest (a volume's count is not
// shown); only those two counts may change. The volume's anchor is its newest snapshot (or none), so when R was
// the anchor, the next older one is the anchor from then on. A rollback breaks the stretch (the chunks of the
// snapshot rolled back to come back into the volume, and into the snapshots taken after it, while the snapshots
// between do not name them), a clone adds maps outside the order: either makes the family not linear for good.
//
// A count is remembered only if nothing that may change it was recorded while it was taken (`token`, `remember`):
// a walk over paged metadata goes on beside writes, and the records queued before it must be applied first.
import type { CatalogView } from './catalog-backend.ts';
import type { MetaRecord } from './metadata.ts';

/** The family of everything that was in the pool at its open (volume ids, the other families' labels, start at 1). */
const openedFamily = 0;

/** A live volume's anchor: a snapshot id, none (nothing else names its chunks), or unknown (after an open). */
type Anchor = number | 'none' | 'unknown';

interface SnapshotEntry {
  family: number;
  /** Moved on by each record that may change this snapshot's count alone. */
  generation: number;
  /** The count and the generations it was taken at. */
  memo: { chunks: number; generation: number; familyGeneration: number } | null;
  /** In a linear family: the volume's nearest remaining older and newer snapshots (null: none). */
  older: number | null;
  newer: number | null;
}

const newEntry = (family: number): SnapshotEntry => ({ family, generation: 0, memo: null, older: null, newer: null });

/** What a count is remembered against (`token`): the snapshot's generation and its family's when the walk began. */
export interface HeldAloneToken {
  readonly snapshotId: number;
  readonly generation: number;
  readonly familyGeneration: number;
}

export class HeldAloneMemo {
  readonly #volumes = new Map<number, { family: number; anchor: Anchor }>();
  readonly #snapshots = new Map<number, SnapshotEntry>();
  /** Moved on by each record that may change any count of the family. */
  readonly #familyGenerations = new Map<number, number>();
  /** The linear families (see above), by label: the volume's id. */
  readonly #linearFamilies = new Set<number>();
  /** Counts answered from the memo, and counts taken by a walk, since the open. */
  hits = 0;
  walks = 0;

  /** The memo at an open: nothing remembered, every volume and snapshot of one family, no anchor known. */
  constructor(tables: CatalogView) {
    for (const volume of tables.volumes.values()) this.#volumes.set(volume.id, { family: openedFamily, anchor: 'unknown' });
    for (const snapshot of tables.snapshots.values()) this.#snapshots.set(snapshot.id, newEntry(openedFamily));
  }

  /** Told of each record as the catalog applies (or queues) it, in that order; after it was accepted. */
  observe(record: MetaRecord): void {
    switch (record.type) {
      case 'create':
        this.#volumes.set(record.volumeId, { family: record.volumeId, anchor: 'none' });
        this.#linearFamilies.add(record.volumeId);
        return;
      case 'clone': {
        const origin = this.#snapshots.get(record.snapshotId);
        this.#forgetSnapshot(record.snapshotId);
        if (origin !== undefined) this.#linearFamilies.delete(origin.family);
        this.#volumes.set(record.volumeId, { family: origin?.family ?? openedFamily, anchor: record.snapshotId });
        return;
      }
      case 'map':
      case 'unmap':
        this.#dropped(record.volumeId);
        return;
      case 'remove':
        this.#dropped(record.volumeId);
        // A volume is removed without snapshots: if its family is linear, nothing of it is left.
        this.#linearFamilies.delete(this.#volume(record.volumeId).family);
        this.#volumes.delete(record.volumeId);
        return;
      case 'resize':
        return;
      case 'snapshot': {
        const volume = this.#volume(record.volumeId);
        const entry = newEntry(volume.family);
        if (this.#linearFamilies.has(volume.family) && typeof volume.anchor === 'number') {
          entry.older = volume.anchor;
          this.#snapshots.get(volume.anchor)!.newer = record.snapshotId;
        }
        this.#snapshots.set(record.snapshotId, entry);
        volume.anchor = record.snapshotId;
        return;
      }
      case 'snapshot-remove': {
        const snapshot = this.#snapshots.get(record.snapshotId);
        this.#snapshots.delete(record.snapshotId);
        if (snapshot !== undefined && this.#linearFamilies.has(snapshot.family)) this.#removedFromLinear(record.snapshotId, snapshot);
        else this.#forgetFamily(snapshot?.family ?? openedFamily);
        return;
      }
      case 'rollback': {
        this.#linearFamilies.delete(this.#volume(record.volumeId).family);
        this.#dropped(record.volumeId);
        this.#forgetSnapshot(record.snapshotId);
        this.#volume(record.volumeId).anchor = record.snapshotId;
        return;
      }
    }
  }

  /** The count remembered for the snapshot, if nothing recorded since it was taken may have changed it. */
  remembered(snapshotId: number): number | undefined {
    const snapshot = this.#snapshots.get(snapshotId);
    const memo = snapshot?.memo;
    if (memo == null || memo.generation !== snapshot!.generation || memo.familyGeneration !== this.#familyGeneration(snapshot!.family)) return undefined;
    this.hits += 1;
    return memo.chunks;
  }

  /** Taken before the walk that counts the snapshot (and before the wait for the records queued before it). */
  token(snapshotId: number): HeldAloneToken {
    const snapshot = this.#snapshots.get(snapshotId);
    return { snapshotId, generation: snapshot?.generation ?? -1, familyGeneration: snapshot === undefined ? -1 : this.#familyGeneration(snapshot.family) };
  }

  /**
   * Remembers a walk's count against its token's generations: if a record since the token may have changed it,
   * they are behind already, and `remembered` never answers with it.
   */
  remember(token: HeldAloneToken, chunks: number): void {
    this.walks += 1;
    const snapshot = this.#snapshots.get(token.snapshotId);
    if (snapshot !== undefined) snapshot.memo = { chunks, generation: token.generation, familyGeneration: token.familyGeneration };
  }

  /** Volume `volumeId`'s map dropped chunks: its anchor's count may change (its family's, with no anchor known). */
  #dropped(volumeId: number): void {
    const volume = this.#volume(volumeId);
    const anchor = volume.anchor;
    if (anchor === 'none') return;
    if (anchor !== 'unknown' && this.#snapshots.has(anchor)) this.#forgetSnapshot(anchor);
    else this.#forgetFamily(volume.family);
  }

  /** Snapshot `snapshotId` of a linear family's volume removed: its nearest older and newer snapshots' counts may change. */
  #removedFromLinear(snapshotId: number, snapshot: SnapshotEntry): void {
    const { older, newer } = snapshot;
    if (older !== null) {
      this.#snapshots.get(older)!.newer = newer;
      this.#forgetSnapshot(older);
    }
    if (newer !== null) {
      this.#snapshots.get(newer)!.older = older;
      this.#forgetSnapshot(newer);
    }
    const volume = this.#volume(snapshot.family);
    if (volume.anchor === snapshotId) volume.anchor = older ?? 'none';
  }

  #forgetSnapshot(snapshotId: number): void {
    const snapshot = this.#snapshots.get(snapshotId);
    if (snapshot !== undefined) snapshot.generation += 1;
  }

  #forgetFamily(family: number): void {
    this.#familyGenerations.set(family, this.#familyGeneration(family) + 1);
  }

  #familyGeneration(family: number): number {
    return this.#familyGenerations.get(family) ?? 0;
  }

  /** A volume the memo did not see made (it cannot happen: the catalog tells every record) is of the open's family, anchor unknown. */
  #volume(volumeId: number): { family: number; anchor: Anchor } {
    let volume = this.#volumes.get(volumeId);
    if (volume === undefined) {
      volume = { family: openedFamily, anchor: 'unknown' };
      this.#volumes.set(volumeId, volume);
    }
    return volume;
  }
}
