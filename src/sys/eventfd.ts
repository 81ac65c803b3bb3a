import { check, EAGAIN, sys } from "./errors.js";
import { Fd } from "./fd.js";
import { native } from "./native.js";
import { READABLE, Watch } from "./poller.js";

export const EFD_SEMAPHORE = 1;
export const EFD_NONBLOCK = 0o4000;

/**
 * eventfd: the doorbell that works across threads and processes (Atomics.wait does not wake
 * across processes). Always non-blocking; wait with onSignal() in the event loop.
 */
export class EventFd implements Disposable {
  readonly fd: Fd;
  readonly #buf = new BigUint64Array(1);

  constructor(fd?: Fd, options: { semaphore?: boolean; initial?: number } = {}) {
    this.fd =
      fd ??
      new Fd(sys(() => native.eventfd(options.initial ?? 0, EFD_NONBLOCK | (options.semaphore ? EFD_SEMAPHORE : 0))));
  }

  /** Adds `value` to the counter (wakes a waiter). */
  signal(value = 1n): void {
    this.#buf[0] = value;
    const n = native.write(this.fd.fd, this.#buf);
    // EAGAIN means the counter is saturated: the waiter has not drained it, a wake is pending anyway.
    if (n < 0 && -n !== EAGAIN) check(n, "write", "eventfd");
  }

  /** Takes the counter (0n when nothing was signalled). */
  drain(): bigint {
    const n = native.read(this.fd.fd, this.#buf);
    if (n < 0) {
      if (-n === EAGAIN) return 0n;
      check(n, "read", "eventfd");
    }
    return this.#buf[0] as bigint;
  }

  /** Calls `cb(count)` from the event loop each time the counter becomes non-zero. */
  onSignal(cb: (count: bigint) => void): Watch {
    return new Watch(this.fd.fd, READABLE, () => {
      const v = this.drain();
      if (v > 0n) cb(v);
    });
  }

  close(): void {
    this.fd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
