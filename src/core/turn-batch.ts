// Collect in this turn of the event loop, hand over together at its end: a hand-off to another thread (a
// postMessage, a worker task) costs more than a small request itself, so a busy turn pays it once for all its
// requests instead of once per request. setImmediate runs after the turn's I/O callbacks, so every request a
// socket read brought in joins the same batch.

export class TurnBatch<T> {
  #items: T[] = [];
  readonly #flush: (items: T[]) => void;

  /** `flush` receives each turn's items, in the order they were added (never an empty batch). */
  constructor(flush: (items: T[]) => void) {
    this.#flush = flush;
  }

  /** Adds an item to this turn's batch; the first item of a turn schedules the flush. */
  add(item: T): void {
    if (this.#items.length === 0) setImmediate(this.#run);
    this.#items.push(item);
  }

  readonly #run = (): void => {
    const items = this.#items;
    this.#items = [];
    this.#flush(items);
  };
}
