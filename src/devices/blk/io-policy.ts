/**
 * Where a blk queue worker does a request's read or write: inline in the worker thread, on the
 * queue's own pool of native threads (several of the queue's requests in flight at once), or
 * inline for what the page cache holds and on the pool only for what would block.
 *
 * Inline is the cheapest way to do one request: a hop to a thread and back costs a futex wake, an
 * eventfd write and an event-loop wake-up, each a system call, and on these machines (a PVM guest)
 * every system call and wake-up is expensive. A request that hits the page cache costs little more
 * than its copy, and that copy costs the same CPU in any thread: on two cores shared with the
 * driver, CPU per request is throughput. So "adaptive":
 * - a request alone (nothing else of its queue in flight or waiting in the ring) is done inline:
 *   at queue depth 1 nothing could overlap it;
 * - with others there, a request that waits for the device goes to the pool: with O_DIRECT every
 *   one does, and so does a write the driver wants durable (writethrough: flushed on its own);
 *   done inline it would hold the queue behind one device round trip (measured: QD32 at 0.7x);
 * - with others there, a read on the page cache is tried inline with RWF_NOWAIT: what is cached
 *   is copied at once, only a miss goes on in the pool (a cold image does not stall the queue);
 * - a write on the page cache (writeback) is done inline: ext4 has no non-blocking buffered write
 *   (RWF_NOWAIT is EOPNOTSUPP there), and inline measured faster than the pool (docs/blk.md).
 */

/** sync: always inline; async: always the pool; adaptive: see above. */
export type IoMode = "sync" | "async" | "adaptive";

/** Where one read or write runs. */
export enum Placement {
  /** In the worker thread, blocking. */
  Inline = 0,
  /** In the worker thread as far as the page cache holds it (RWF_NOWAIT), the rest on the pool. */
  CacheFirst = 1,
  /** On the queue's pool. */
  Pool = 2,
}

export class IoPolicy {
  readonly mode: IoMode;
  readonly #direct: boolean;
  readonly #backlog: () => number;

  /** `backlog`: other requests of this queue, in flight or waiting in the ring. */
  constructor(mode: IoMode, direct: boolean, backlog: (() => number) | undefined) {
    this.mode = mode;
    this.#direct = direct;
    this.#backlog = backlog ?? (() => 0);
  }

  /**
   * Where this read (or `write`) runs. `flushed`: the write is flushed on its own before it
   * completes (writethrough), so it waits for the device.
   */
  place(write: boolean, flushed = false): Placement {
    if (this.mode === "sync") return Placement.Inline;
    if (this.mode === "async") return Placement.Pool;
    const waits = this.#direct || (write && flushed);
    if (!waits && write) return Placement.Inline;
    if (this.#backlog() === 0) return Placement.Inline;
    return waits ? Placement.Pool : Placement.CacheFirst;
  }
}
