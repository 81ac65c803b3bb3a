/**
 * Where a blk queue worker does a request's read or write: inline in the worker thread, or on
 * libuv's thread pool (several of the queue's requests in flight at once).
 *
 * Inline is the cheapest way to do one request (no hop to another thread and back, ~20 µs on
 * these machines), and a request that hits the page cache costs little more than the copy; but
 * while the worker does it, the requests behind it wait. The pool overlaps them, at the price of
 * the hop. "adaptive" takes the pool only when overlap is there to win: another request of the
 * queue is already waiting in the ring (a guest's large sequential I/O arrives as several
 * requests at once), and the request is worth the hop (with O_DIRECT every request waits for the
 * device; on the page cache only large ones, where the copy costs more than the hop). The last
 * request of a batch is done inline, so the worker works in parallel with the pool too. A request
 * alone in the ring (queue depth 1) never pays for the hop.
 */

/** sync: always inline; async: always the pool; adaptive: see above. */
export type IoMode = "sync" | "async" | "adaptive";

/** Smallest request that goes to the pool when the image is on the page cache. */
export const CACHED_OFFLOAD_MIN = 64 * 1024;

export class IoPolicy {
  readonly mode: IoMode;
  readonly #direct: boolean;
  readonly #backlog: () => number;

  /** `backlog`: requests of this queue waiting in the ring behind the current one. */
  constructor(mode: IoMode, direct: boolean, backlog: (() => number) | undefined) {
    this.mode = mode;
    this.#direct = direct;
    this.#backlog = backlog ?? (() => 0);
  }

  /** True: hand this request of `bytes` to the pool; false: do it inline. */
  offload(bytes: number): boolean {
    if (this.mode === "sync") return false;
    if (this.mode === "async") return true;
    if (!this.#direct && bytes < CACHED_OFFLOAD_MIN) return false;
    return this.#backlog() > 0;
  }
}
