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
 * - a request alone (nothing else of its queue in flight or waiting in the ring, and no other
 *   queue of its worker thread waiting) is done inline: nothing could overlap it;
 * - with others there, a request that waits for the device goes to the pool: with O_DIRECT every
 *   one does, and so does a write the driver wants durable (writethrough: flushed on its own);
 *   done inline it would hold the queue behind one device round trip (measured: QD32 at 0.7x);
 * - with others there, a read on the page cache is tried inline with RWF_NOWAIT: what is cached
 *   is copied at once, only a miss goes on in the pool (a cold image does not stall the queue);
 * - a write on the page cache (writeback) is done inline: ext4 has no non-blocking buffered write
 *   (RWF_NOWAIT is EOPNOTSUPP there), and inline measured faster than the pool (docs/blk.md).
 * - spread (opt-in, BlkOptions.spread): a large read on the page cache (SPREAD_MIN_BYTES or
 *   more) with others of its queue waiting goes to the pool when the pool has nothing in flight,
 *   so its copy overlaps the next ones, done inline meanwhile, on the other core (a guest's 1 MiB
 *   read is three requests of ~341 KiB on average; one goes to the pool, the rest are copied
 *   inline). Small reads never: their copy is shorter than the hop. Writes never: the file system
 *   serializes buffered writes to one file (the inode lock), so they would not overlap. Off by
 *   default: in a guest on two cores shared with the guest's vCPU it measured 0.83-0.93x of
 *   copying all inline (docs/blk.md): the other core is not free, and the hop costs wake-ups.
 */

/** Reads of at least this many bytes are worth a hop to an idle pool (spread). */
export const SPREAD_MIN_BYTES = 64 * 1024;

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

  /** Large cached reads may go to an idle pool (spread, opt-in). */
  readonly #spread: boolean;

  /**
   * `backlog`: other requests of this queue, in flight or waiting in the ring, and the other
   * queues of its thread that have requests waiting (QueueContext.backlog). `spread`: large
   * cached reads may go to an idle pool (see above).
   */
  constructor(mode: IoMode, direct: boolean, backlog: (() => number) | undefined, spread = false) {
    this.mode = mode;
    this.#direct = direct;
    this.#backlog = backlog ?? (() => 0);
    this.#spread = spread;
  }

  /**
   * Where this read (or `write`) of `bytes` runs. `flushed`: the write is flushed on its own
   * before it completes (writethrough), so it waits for the device. `poolIdle`: the queue's pool
   * has no transfer in flight.
   */
  place(write: boolean, flushed = false, bytes = 0, poolIdle = false): Placement {
    if (this.mode === "sync") return Placement.Inline;
    if (this.mode === "async") return Placement.Pool;
    const waits = this.#direct || (write && flushed);
    if (!waits && write) return Placement.Inline;
    if (this.#backlog() === 0) return Placement.Inline;
    if (waits) return Placement.Pool;
    // Others are there and none is on the pool: they wait in the ring, and the next is done
    // inline while the pool copies this one.
    if (this.#spread && poolIdle && bytes >= SPREAD_MIN_BYTES) return Placement.Pool;
    return Placement.CacheFirst;
  }
}
