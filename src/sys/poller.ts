import { sys } from "./errors.js";
import { type NativeWatch, native } from "./native.js";

export const READABLE = 1;
export const WRITABLE = 2;
export const DISCONNECT = 4;

export type ReadyCallback = (events: number, error: number) => void;

/**
 * Readiness of one fd in the calling thread's libuv loop (main thread or worker): the
 * callback runs from the loop, never by busy polling and never blocking the thread.
 * The fd must stay open until close(); close the watch before the fd.
 */
export class Watch implements Disposable {
  #handle: NativeWatch | null;

  constructor(fd: number, events: number, callback: ReadyCallback) {
    // libuv reports errors (e.g. EBADF) as a negative status instead of events.
    this.#handle = sys(() => native.watch(fd, events, (status, ev) => callback(ev, status < 0 ? -status : 0)));
  }

  get active(): boolean {
    return this.#handle !== null;
  }

  update(events: number): void {
    this.#handle?.update(events);
  }

  /** An unref'd watch does not keep the thread's event loop alive. */
  ref(on: boolean): void {
    this.#handle?.ref(on);
  }

  close(): void {
    const h = this.#handle;
    this.#handle = null;
    h?.stop();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Resolves once `fd` is readable (or rejects on a poll error, or on abort). */
export function waitReadable(fd: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      w.close();
      reject(signal?.reason);
    };
    const w = new Watch(fd, READABLE, (_events, error) => {
      w.close();
      signal?.removeEventListener("abort", onAbort);
      if (error) reject(new Error(`poll error ${error} on fd ${fd}`));
      else resolve();
    });
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
