/**
 * Block I/O straight between a file and guest memory (native/src/blkio.cc), without a typed-array
 * view per buffer: a request's buffers are (window, offset, length) triples in a Uint32Array,
 * over a GuestIoTable of mapping windows. The addon checks every triple against the window's
 * real length before the kernel sees it (a triple outside: -EFAULT, nothing transferred), and
 * the table keeps the mappings of its windows mapped for as long as it or a transfer in flight
 * needs them (the lifetime rule of docs/native.md holds whatever JS does meanwhile).
 *
 * Two ways to run a transfer: guestIoRaw() in the calling thread, or GuestIoPool.transfer() on
 * a pool of native threads of the caller's own, whose completions come back through an eventfd
 * watched in the calling thread's event loop (no hop through libuv's shared thread pool, no
 * per-buffer marshalling). Both return bytes moved or -errno; a read past the end of the file
 * fills the rest with zeros, a write that moves nothing is -EIO.
 */
import { SysError, sys } from "./errors.js";
import { native } from "./native.js";
import { READABLE, Watch } from "./poller.js";

/** Most triples one transfer takes (IOV_MAX). */
export const GUEST_IO_MAX_SEGMENTS = 1024;
/** What the addon answers for a triple outside its window. */
export const EFAULT = 14;
const ESHUTDOWN = 108;
const EINPROGRESS = 115;

/** Windows (SharedArrayBuffers over mappings made by Mapping) that transfers address by index. */
export class GuestIoTable {
  /** @internal The addon's handle; the table lives until it is collected. */
  readonly handle: object;
  readonly length: number;

  /** Throws a TypeError when a window is not a SharedArrayBuffer over a live mapping. */
  constructor(windows: readonly SharedArrayBuffer[]) {
    this.handle = native.guestIoTable(windows);
    this.length = windows.length;
  }
}

/**
 * One transfer in the calling thread: `count` triples [window, offset, length] of `segments`,
 * in order, from (`write`: to) the file at `position`. Bytes moved, or -errno (-EFAULT: a triple
 * outside its window, nothing done).
 */
export function guestIoRaw(
  table: GuestIoTable,
  fd: number,
  write: boolean,
  position: number,
  segments: Uint32Array,
  count: number,
): number {
  return native.guestIoRun(table.handle, fd, write, position, segments, count);
}

/** guestIoRaw, throwing a SysError for a failure. */
export function guestIo(
  table: GuestIoTable,
  fd: number,
  write: boolean,
  position: number,
  segments: Uint32Array,
  count: number,
): number {
  const r = guestIoRaw(table, fd, write, position, segments, count);
  if (r < 0) throw guestIoError(r, write);
  return r;
}

/** The typed error for a transfer's -errno. */
export function guestIoError(result: number, write: boolean): SysError {
  const call = write ? "pwritev" : "preadv";
  return new SysError(call, -result, -result === EFAULT ? "a segment lies outside its guest-memory window" : undefined);
}

/**
 * A pool of `threads` native threads for transfers of the thread that made it (its event loop
 * gets the completions). The segments are copied at submission: the caller may reuse its array
 * at once. Completion order is whatever the threads make it. close() lets the threads finish
 * every transfer already submitted and settles their promises: none is lost.
 */
export class GuestIoPool implements Disposable {
  readonly threads: number;
  readonly #handle: object;
  #watch: Watch | null;
  readonly #resolvers: (((result: number) => void) | undefined)[] = [];
  readonly #freeTags: number[] = [];
  readonly #out = new Float64Array(128);
  #inFlight = 0;
  #closed = false;

  constructor(threads: number) {
    if (!Number.isInteger(threads) || threads < 1 || threads > 64)
      throw new RangeError(`pool threads ${threads}: 1..64`);
    this.threads = threads;
    const [handle, efd] = sys(() => native.guestIoPool(threads));
    this.#handle = handle;
    this.#watch = new Watch(efd, READABLE, () => this.#harvest());
    // Only transfers in flight keep the thread's event loop alive.
    this.#watch.ref(false);
  }

  /** Transfers submitted and not yet settled. */
  get inFlight(): number {
    return this.#inFlight;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * guestIoRaw on a pool thread: resolves with bytes moved or -errno (never rejects). A
   * submission the addon refuses (-EFAULT: a triple outside its window; the pool closed) gives
   * that value at once and nothing is transferred. `tryCache`: first do what the page cache
   * holds in this thread (RWF_NOWAIT), and hand only the rest (a miss) to the pool; a transfer
   * that needed no thread comes back as a plain number.
   */
  transfer(
    table: GuestIoTable,
    fd: number,
    write: boolean,
    position: number,
    segments: Uint32Array,
    count: number,
    tryCache = false,
  ): number | Promise<number> {
    if (this.#closed) return -ESHUTDOWN;
    const tag = this.#freeTags.length > 0 ? (this.#freeTags.pop() as number) : this.#resolvers.length;
    const flags = (write ? 1 : 0) | (tryCache ? 2 : 0);
    const r = native.guestIoSubmit(this.#handle, table.handle, fd, flags, position, segments, count, tag);
    if (r !== -EINPROGRESS) {
      if (tag === this.#resolvers.length) this.#resolvers.push(undefined);
      this.#freeTags.push(tag);
      return r;
    }
    if (this.#inFlight++ === 0) this.#watch?.ref(true);
    return new Promise<number>((resolve) => {
      this.#resolvers[tag] = resolve;
    });
  }

  #harvest(): void {
    const out = this.#out;
    for (;;) {
      const n = native.guestIoHarvest(this.#handle, out);
      for (let k = 0; k < n; k++) {
        const tag = out[2 * k] as number;
        const resolve = this.#resolvers[tag];
        this.#resolvers[tag] = undefined;
        this.#freeTags.push(tag);
        this.#inFlight--;
        resolve?.(out[2 * k + 1] as number);
      }
      if (n < out.length / 2) break;
    }
    if (this.#inFlight === 0) this.#watch?.ref(false);
  }

  /**
   * Waits (blocking this thread) until the pool's threads have finished every submitted
   * transfer, joins them and settles every promise. Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    // The watch goes before the eventfd the addon closes.
    this.#watch?.close();
    this.#watch = null;
    native.guestIoPoolClose(this.#handle);
    this.#harvest();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
