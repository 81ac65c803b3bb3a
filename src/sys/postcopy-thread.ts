/**
 * The postcopy fault path's native threads (native/src/postcopy.cc), typed. They run without the
 * JS event loop: a thread reports through an eventfd (`onEvent` runs from this thread's loop)
 * and its state is read with status(). Bitmaps handed over must live in SharedArrayBuffers
 * (the thread reads and sets bits with atomics while JS does the same through Atomics).
 *
 * - FaultThread (destination): reads every userfaultfd given to it, asks for missing pages on
 *   the preempt socket, places what comes back on it (UFFDIO_COPY) and wakes the waiters.
 * - RequestServer (source): reads page requests on the preempt socket and answers each from
 *   the guest mapping.
 */
import { SysError, sys } from "./errors.js";
import { EventFd } from "./eventfd.js";
import { native, type View } from "./native.js";
import type { Watch } from "./poller.js";

/** 0: serving; 1: the preempt channel ended (PREEMPT_END read or written); 2: failed. */
export type PostcopyThreadState = 0 | 1 | 2;

export interface PostcopyThreadStatus {
  state: PostcopyThreadState;
  /** When failed: a MigrationError code (CORRUPT, BAD_RECORD, BAD_PAGE, CONNECTION_LOST) and why. */
  code: string;
  message: string;
}

export interface FaultThreadRegion {
  guestBase: number;
  size: number;
  /** Pages present (one bit per page, LSB first), over a SharedArrayBuffer. */
  present: Uint8Array;
  /** Pages a thread of another fault domain waits on, over a SharedArrayBuffer. */
  waiting: Uint8Array;
  /** DiscardMap state bytes (1 = plugged), or null. */
  discard: Uint8Array | null;
  blockSize: number;
  /**
   * A page not resident reads as zeros (memfd or anonymous memory with no swap; the server
   * rechecks for swap itself): sent as a zero page without reading it. `memory` must start on a
   * page boundary.
   */
  absentIsZero?: boolean;
}

export interface FaultThreadStats {
  faults: number;
  remoteFaults: number;
  discardFaults: number;
  fullPages: number;
  zeroPages: number;
  preemptPages: number;
  wakes: number;
}

function shared(v: Uint8Array, what: string): void {
  if (!(v.buffer instanceof SharedArrayBuffer)) throw new TypeError(`${what} must be over a SharedArrayBuffer`);
}

/** One eventfd the thread rings and its watch in this thread's loop. */
class Doorbell {
  readonly efd = new EventFd();
  readonly watch: Watch;
  constructor(cb: () => void) {
    this.watch = this.efd.onSignal(cb);
  }
  close(): void {
    this.watch.close();
    this.efd.close();
  }
}

function status(r: [number, string, string]): PostcopyThreadStatus {
  return { state: r[0] as PostcopyThreadState, code: r[1], message: r[2] };
}

export class FaultThread {
  #id: number | null;
  readonly #bell: Doorbell;
  readonly #stats = new Float64Array(7);
  readonly #keep: FaultThreadRegion[];

  /**
   * `sock`: the preempt connection (a dup is taken: the caller may close its own);
   * `streamOffset`: its stream offset so far (errors name record offsets).
   */
  constructor(sock: number, regions: FaultThreadRegion[], streamOffset: number, onEvent: () => void) {
    for (const r of regions) {
      shared(r.present, "present bitmap");
      shared(r.waiting, "waiting bitmap");
    }
    this.#keep = regions;
    this.#bell = new Doorbell(onEvent);
    const layout = new Float64Array(regions.flatMap((r) => [r.guestBase, r.size]));
    try {
      this.#id = sys(() => native.faultThreadCreate(sock, this.#bell.efd.fd.fd, layout, streamOffset));
    } catch (e) {
      this.#bell.close();
      throw e;
    }
    try {
      regions.forEach((r, i) => {
        native.faultThreadRegion(this.#id as number, i, r.present, r.waiting, r.discard, r.blockSize);
      });
    } catch (e) {
      this.stop();
      throw e;
    }
  }

  #handle(): number {
    if (this.#id === null) throw new SysError("faultThread", 9, "the fault thread was stopped");
    return this.#id;
  }

  /** A userfaultfd to serve (the first one: ours, through which pages are placed). Stays the caller's. */
  addDomain(uffd: number, ranges: { guestBase: number; size: number; hostStart: bigint }[]): void {
    const flat = new Float64Array(ranges.flatMap((r) => [r.guestBase, r.size, Number(r.hostStart)]));
    native.faultThreadAddDomain(this.#handle(), uffd, flat);
  }

  start(): void {
    native.faultThreadStart(this.#handle());
  }

  status(): PostcopyThreadStatus {
    return status(native.faultThreadStatus(this.#handle(), this.#stats));
  }

  stats(): FaultThreadStats {
    if (this.#id !== null) native.faultThreadStatus(this.#id, this.#stats);
    const s = this.#stats;
    return {
      faults: s[0] as number,
      remoteFaults: s[1] as number,
      discardFaults: s[2] as number,
      fullPages: s[3] as number,
      zeroPages: s[4] as number,
      preemptPages: s[5] as number,
      wakes: s[6] as number,
    };
  }

  /** Domain `k`'s counters (in the order added), as FaultDomainStats; once stopped, as of the join. */
  domainStats(k: number): { faults: number; missing: number; wakes: number } {
    let out: Float64Array = new Float64Array(3);
    if (this.#id !== null) native.faultThreadDomainStats(this.#id, k, out);
    else out = this.#finalDomains.subarray(k * 3, k * 3 + 3);
    return { faults: out[0] ?? 0, missing: out[1] ?? 0, wakes: out[2] ?? 0 };
  }

  #finalDomains: Float64Array = new Float64Array(0);
  #lastLatencies: Float64Array = new Float64Array(0);

  /** Fault latencies (µs: fault read -> page placed) recorded since the last call. */
  takeLatencies(): Float64Array {
    if (this.#id !== null) return native.faultThreadTakeLatencies(this.#id);
    const last = this.#lastLatencies;
    this.#lastLatencies = new Float64Array(0);
    return last;
  }

  /**
   * Joins the thread and frees it (idempotent). Returns the pages still asked for, as
   * region * 2^32 + page. The counters as of the join stay readable (stats, domainStats).
   */
  stop(): number[] {
    const id = this.#id;
    if (id === null) return [];
    this.#id = null;
    const [left, domains, stats, latencies] = native.faultThreadStop(id);
    this.#lastLatencies = latencies;
    this.#stats.set(stats.subarray(0, this.#stats.length));
    this.#finalDomains = domains;
    const pending = [...left];
    this.#bell.close();
    this.#keep.length = 0;
    return pending;
  }
}

export interface RequestServerRegion {
  /** The region's memory (a view over its mapping). */
  memory: View;
  /** Pages sent (one bit per page), over a SharedArrayBuffer: set here for each page served. */
  sent: Uint8Array;
  discard: Uint8Array | null;
  blockSize: number;
  /**
   * A page not resident reads as zeros (memfd or anonymous memory with no swap; the server
   * rechecks for swap itself): sent as a zero page without reading it. `memory` must start on a
   * page boundary.
   */
  absentIsZero?: boolean;
}

export interface RequestServerStats {
  requests: number;
  pagesQueued: number;
  duplicates: number;
  resentAhead: number;
  refused: number;
  absentZeros: number;
}

export class RequestServer {
  #id: number | null;
  readonly #bell: Doorbell;
  readonly #stats = new Float64Array(6);
  readonly #keep: RequestServerRegion[];

  constructor(sock: number, regions: RequestServerRegion[], streamOffset: number, onEvent: () => void) {
    for (const r of regions) shared(r.sent, "sent bitmap");
    this.#keep = regions;
    this.#bell = new Doorbell(onEvent);
    try {
      this.#id = sys(() => native.requestServerCreate(sock, this.#bell.efd.fd.fd, streamOffset));
    } catch (e) {
      this.#bell.close();
      throw e;
    }
    try {
      for (const r of regions)
        native.requestServerRegion(this.#id, r.memory, r.sent, r.discard, r.blockSize, r.absentIsZero ?? false);
      native.requestServerStart(this.#id);
    } catch (e) {
      this.stop();
      throw e;
    }
  }

  #handle(): number {
    if (this.#id === null) throw new SysError("requestServer", 9, "the request server was stopped");
    return this.#id;
  }

  /** A page asked for on another connection: served on this one, once. */
  queue(region: number, page: number): void {
    native.requestServerQueue(this.#handle(), region, page);
  }

  /** After what is queued, PREEMPT_END; status().state becomes 1 once it is written. */
  finish(): void {
    native.requestServerFinish(this.#handle());
  }

  status(): PostcopyThreadStatus {
    return status(native.requestServerStatus(this.#handle(), this.#stats));
  }

  stats(): RequestServerStats {
    if (this.#id !== null) native.requestServerStatus(this.#id, this.#stats);
    const s = this.#stats;
    return {
      requests: s[0] as number,
      pagesQueued: s[1] as number,
      duplicates: s[2] as number,
      resentAhead: s[3] as number,
      refused: s[4] as number,
      absentZeros: s[5] as number,
    };
  }

  /** Joins the thread and frees it (idempotent); closes its socket. */
  stop(): void {
    const id = this.#id;
    if (id === null) return;
    native.requestServerStatus(id, this.#stats);
    this.#id = null;
    native.requestServerStop(id);
    this.#bell.close();
    this.#keep.length = 0;
  }
}
