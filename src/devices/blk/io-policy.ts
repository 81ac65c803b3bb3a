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
 * request waits for the device; on the page cache a write may wait too (dirty-page throttling,
 * the journal: 4 KiB QD32 writes done one after the other ran at 0.3-0.5x of QSD's pool on this
 * shared machine), a read only costs its copy, so only large reads go. A request alone (queue
 * depth 1) never pays for the hop. Measured (docs/blk.md): with
 * O_DIRECT, doing even the last request of a batch inline serialises the queue behind one device
 * round trip (QD32 at 0.7x of the pool's rate), so anything in flight sends it to the pool.
 */

/** sync: always inline; async: always the pool; adaptive: see above. */
export type IoMode = "sync" | "async" | "adaptive";

/** Smallest read that goes to the pool when the image is on the page cache. */
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

  /** True: hand this read (or `write`) of `bytes` to the pool; false: do it inline. */
  offload(bytes: number, write: boolean): boolean {
    if (this.mode === "sync") return false;
    if (this.mode === "async") return true;
    if (!this.#direct && !write && bytes < CACHED_OFFLOAD_MIN) return false;
    return this.#backlog() > 0;
  }
}
