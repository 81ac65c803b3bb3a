/**
 * Where a blk queue worker does a request's read or write: inline in the worker thread, or on
 * libuv's thread pool (several of the queue's requests in flight at once).
 *
 * Inline is the cheapest way to do one request (no hop to another thread and back, ~20 µs on
 * these machines), and a request that hits the page cache costs little more than the copy; but
 * while the worker does it, the requests behind it wait. The pool overlaps them, at the price of
 * the hop. "adaptive" takes the pool only when overlap is there to win: another request of the
 * queue is in flight or already waiting in the ring (a guest's large sequential I/O arrives as
 * several requests at once), and the request may block or is worth the hop: with O_DIRECT every
 * request waits for the device, and so does a write the driver wants durable (writethrough: it is
 * flushed on its own); on the page cache a request only costs its copy, so only large ones (64
 * KiB and more) go. A request alone (queue depth 1) never pays for the hop. Measured (docs/blk.md):
 * with O_DIRECT, doing even the last request of a batch inline serialises the queue behind one
 * device round trip (QD32 at 0.7x of the pool's rate), so anything in flight sends it to the pool;
 * 4 KiB QD32 writes on the page cache in writeback mode ran 1.1-1.4x faster inline than through
 * the pool (an earlier measurement that sent them to the pool had every write flushed).
 */

/** sync: always inline; async: always the pool; adaptive: see above. */
export type IoMode = "sync" | "async" | "adaptive";

/** Smallest read or write that goes to the pool when the image is on the page cache. */
export const CACHED_OFFLOAD_MIN = 64 * 1024;

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
   * True: hand this read (or `write`) of `bytes` to the pool; false: do it inline. `flushed`: the
   * write is flushed on its own before it completes (writethrough), so it waits for the device.
   */
  offload(bytes: number, write: boolean, flushed = false): boolean {
    if (this.mode === "sync") return false;
    if (this.mode === "async") return true;
    if (!this.#direct && !(write && flushed) && bytes < CACHED_OFFLOAD_MIN) return false;
    return this.#backlog() > 0;
  }
}
