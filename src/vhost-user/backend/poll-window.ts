/**
 * How long a queue worker polls the avail ring before it sleeps on the kick eventfd, adapted the
 * way QEMU's event loop adapts poll-max-ns (util/aio-posix.c, adjust_polling_time): after each
 * sleep, the time the worker spent blocked says whether a longer window would have caught the
 * kick. Blocked within the window: nothing to change. Blocked longer than the window but within
 * the maximum: a window twice as long would have come closer, so it doubles. Blocked past the
 * maximum (the driver went idle): the window halves. An idle queue so polls for next to nothing,
 * and a busy one as long as its driver takes to come back, up to the maximum.
 */
export class PollWindow {
  /** Longest window, µs (0: no polling). */
  readonly maxUs: number;
  #us: number;

  constructor(maxUs: number) {
    this.maxUs = Number.isFinite(maxUs) && maxUs > 0 ? maxUs : 0;
    this.#us = this.maxUs > 0 ? Math.min(8, this.maxUs) : 0;
  }

  /** The current window, µs. */
  get us(): number {
    return this.#us;
  }

  /** The worker was woken `blockedUs` after it went to sleep. */
  afterSleep(blockedUs: number): void {
    if (this.maxUs === 0 || !(blockedUs > this.#us)) return;
    if (blockedUs > this.maxUs) this.#us = Math.max(1, this.#us / 2);
    else this.#us = Math.min(this.maxUs, this.#us * 2);
  }
}
