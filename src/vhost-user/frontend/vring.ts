/**
 * The frontend's side of one vring: where it lives in guest memory, and the kick/call/err
 * eventfds. The call eventfd is watched in the event loop; waiters are woken on each call.
 */
import { EventFd } from "../../sys/eventfd.js";
import type { Watch } from "../../sys/poller.js";
import { VhostUserError } from "../protocol/errors.js";

/**
 * Guest-physical addresses of a ring's three parts. For a packed ring (`packed: true`), as in
 * SET_VRING_ADDR: descTable is the descriptor ring, availRing the driver area, usedRing the
 * device area.
 */
export interface VringLayout {
  /** Queue size (a power of two, at most 32768). */
  size: number;
  descTable: number;
  availRing: number;
  usedRing: number;
  packed?: boolean;
}

interface CallWaiter {
  since: number;
  resolve: (count: number) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class FrontendVring {
  readonly index: number;
  layout: VringLayout | null = null;
  /** Between SET_VRING_KICK and GET_VRING_BASE (the spec's "started"). */
  started = false;
  enabled = false;
  kickFd: EventFd | null = null;
  callFd: EventFd | null = null;
  errFd: EventFd | null = null;
  #callWatch: Watch | null = null;
  #errWatch: Watch | null = null;
  #calls = 0;
  #errors = 0;
  #waiters: CallWaiter[] = [];
  #listeners = new Set<(count: number) => void>();

  constructor(index: number) {
    this.index = index;
  }

  /** Call notifications seen so far. */
  get calls(): number {
    return this.#calls;
  }

  /** Error notifications (SET_VRING_ERR eventfd) seen so far. */
  get errors(): number {
    return this.#errors;
  }

  /** A fresh call eventfd, watched from now on (the old one, if any, is closed). */
  newCallFd(): EventFd {
    this.#closeCall();
    const fd = new EventFd();
    this.callFd = fd;
    this.#callWatch = fd.onSignal(() => this.#onCall());
    // An idle frontend must not keep the process alive; waiters hold their own timers.
    this.#callWatch.ref(false);
    return fd;
  }

  newErrFd(): EventFd {
    this.#errWatch?.close();
    this.#errWatch = null;
    this.errFd?.close();
    const fd = new EventFd();
    this.errFd = fd;
    this.#errWatch = fd.onSignal(() => {
      this.#errors++;
    });
    this.#errWatch.ref(false);
    return fd;
  }

  newKickFd(): EventFd {
    this.kickFd?.close();
    this.kickFd = new EventFd();
    return this.kickFd;
  }

  onCall(listener: (count: number) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #onCall(): void {
    this.#calls++;
    const n = this.#calls;
    for (const w of this.#waiters.splice(0)) {
      if (n > w.since) {
        clearTimeout(w.timer);
        w.resolve(n);
      } else this.#waiters.push(w);
    }
    for (const l of this.#listeners) l(n);
  }

  /** Resolves with the call count once it exceeds `since`; rejects with a TIMEOUT VhostUserError. */
  waitCall(since: number, timeoutMs: number, label: string): Promise<number> {
    if (this.#calls > since) return Promise.resolve(this.#calls);
    if (!this.callFd) {
      return Promise.reject(
        new VhostUserError("CLOSED", `vring ${this.index} has no call eventfd (${label})`, {
          request: "SET_VRING_CALL",
        }),
      );
    }
    return new Promise((resolve, reject) => {
      const w: CallWaiter = {
        since,
        resolve,
        reject,
        timer: setTimeout(() => {
          const i = this.#waiters.indexOf(w);
          if (i >= 0) this.#waiters.splice(i, 1);
          reject(
            new VhostUserError(
              "TIMEOUT",
              `no call notification on vring ${this.index} within ${timeoutMs} ms (${label})`,
              {
                request: "SET_VRING_CALL",
                value: timeoutMs,
              },
            ),
          );
        }, timeoutMs),
      };
      this.#waiters.push(w);
    });
  }

  /** Fails every waiter (the connection went away). */
  fail(error: Error): void {
    for (const w of this.#waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(error);
    }
  }

  #closeCall(): void {
    this.#callWatch?.close();
    this.#callWatch = null;
    this.callFd?.close();
    this.callFd = null;
  }

  close(error: Error): void {
    this.fail(error);
    this.#listeners.clear();
    this.#closeCall();
    this.#errWatch?.close();
    this.#errWatch = null;
    this.errFd?.close();
    this.errFd = null;
    this.kickFd?.close();
    this.kickFd = null;
    this.started = false;
  }
}
