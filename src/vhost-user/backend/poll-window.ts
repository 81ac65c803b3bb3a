/**
 * How long a queue worker polls the avail ring before it sleeps on the kick eventfd, adapted the
 * way QEMU's event loop adapts poll-max-ns (util/aio-posix.c, adjust_polling_time): after each
 * sleep, the time from the end of the batch (when polling began) to the kick says whether a
 * longer window would have caught it. Within the window: nothing to change (the kick raced the
 * re-arm). Past the window but within the maximum: a window twice as long comes closer, so it
 * doubles. Past the maximum: the window halves. The poll time counts (as in QEMU), so a window
 * at the maximum whose poll failed always halves: the window stays long only while polling
 * catches the driver. When the driver goes idle, or cannot run because the host's CPUs are busy
 * (then polling only takes a CPU from it), the window shrinks to next to nothing.
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

  /** A kick woke the worker `gapUs` after it began polling (the poll and the sleep after it). */
  afterSleep(gapUs: number): void {
    if (this.maxUs === 0 || !(gapUs > this.#us)) return;
    if (gapUs > this.maxUs) this.#us = Math.max(1, this.#us / 2);
    else this.#us = Math.min(this.maxUs, this.#us * 2);
  }
}
