// Per-volume ordering of requests by chunk range: the store's promise that a read sent after a write's reply
// sees it, and that overlapping writes land in the order they were submitted. Writes (and trims) hold their
// range exclusively, reads share it. Grants are first come, first served among overlapping requests, so a stream
// of reads cannot starve a write. Requests in flight are few (bounded per connection), so a list is enough.

interface Holder {
  start: number;
  end: number;
  exclusive: boolean;
  granted: boolean;
  grant: (() => void) | null;
}

export type Release = () => void;

export class RangeLock {
  readonly #holders: Holder[] = [];

  /** Locks chunks [start, end); resolves to a release function once no earlier overlapping request conflicts. */
  acquire(start: number, end: number, exclusive: boolean): Release | Promise<Release> {
    const holder: Holder = { start, end, exclusive, granted: false, grant: null };
    const blocked = this.#conflicts(holder, this.#holders.length);
    this.#holders.push(holder);
    const release = (): void => this.#release(holder);
    if (!blocked) {
      holder.granted = true;
      return release;
    }
    return new Promise<Release>((resolve) => {
      holder.grant = () => resolve(release);
    });
  }

  /** Requests holding or waiting for a range. */
  get size(): number {
    return this.#holders.length;
  }

  #conflicts(holder: Holder, before: number): boolean {
    for (let i = 0; i < before; i++) {
      const other = this.#holders[i]!;
      if ((holder.exclusive || other.exclusive) && other.start < holder.end && holder.start < other.end) return true;
    }
    return false;
  }

  #release(holder: Holder): void {
    const index = this.#holders.indexOf(holder);
    if (index < 0) return;
    this.#holders.splice(index, 1);
    for (let i = 0; i < this.#holders.length; i++) {
      const waiting = this.#holders[i]!;
      if (waiting.granted || this.#conflicts(waiting, i)) continue;
      waiting.granted = true;
      waiting.grant!();
      waiting.grant = null;
    }
  }
}
