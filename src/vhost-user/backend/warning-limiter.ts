/**
 * A token bucket for warnings a peer can trigger at will (one per malformed chain, one per
 * failed request): a burst goes through, then about one a second, and the next warning let
 * through says how many were dropped. A guest submitting malformed chains as fast as it can
 * thus fills neither the log nor the worker's message queue to the control plane.
 */
export interface WarningLimiterOptions {
  /** Warnings let through back to back (default 10). */
  burst?: number;
  /** Warnings per second after the burst (default 1). */
  perSecond?: number;
  /** Milliseconds, monotonic (default performance.now). */
  now?: () => number;
}

export class WarningLimiter {
  readonly burst: number;
  readonly perSecond: number;
  readonly #now: () => number;
  #tokens: number;
  #last: number;
  #suppressed = 0;
  /** Warnings dropped so far, in total. */
  suppressedTotal = 0;

  constructor(o: WarningLimiterOptions = {}) {
    this.burst = o.burst ?? 10;
    this.perSecond = o.perSecond ?? 1;
    this.#now = o.now ?? (() => performance.now());
    this.#tokens = this.burst;
    this.#last = this.#now();
  }

  /** The message to emit (with a note of what was dropped before it), or null to drop it. */
  admit(message: string): string | null {
    const t = this.#now();
    this.#tokens = Math.min(this.burst, this.#tokens + ((t - this.#last) / 1000) * this.perSecond);
    this.#last = t;
    if (this.#tokens < 1) {
      this.#suppressed++;
      this.suppressedTotal++;
      return null;
    }
    this.#tokens -= 1;
    if (this.#suppressed === 0) return message;
    const n = this.#suppressed;
    this.#suppressed = 0;
    return `${message} (${n} similar warning${n === 1 ? "" : "s"} suppressed before this one)`;
  }
}
