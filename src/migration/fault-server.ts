/**
 * The destination's postcopy fault path: watches every userfaultfd that guards guest memory
 * (our own, and the ones device back-ends registered over their own mappings: fault domains),
 * asks the source for each missing page once, places what arrives (requested or background)
 * exactly once with UFFDIO_COPY / ZEROPAGE, and wakes the threads that wait on it.
 *
 * Guest memory is registered with userfaultfd (MISSING); the thread that runs this never
 * touches guest memory itself (the threads that may fault are the guest's workers, never this
 * one). A page already placed is never overwritten (EEXIST: just wake).
 *
 * A fault domain maps the same shared memory (memfd, hugetlbfs) at other addresses, usually in
 * another process. A page is placed once, through our own userfaultfd into our mapping: that
 * fills the shared page cache, so the other mappings see it without a fault (a MISSING fault
 * is raised only for a page absent from the page cache). Threads of another domain that are
 * already waiting sleep on that domain's userfaultfd, so they are woken there (UFFDIO_WAKE at
 * its address), as QEMU does for vhost-user back-ends. A UFFDIO_COPY through the other
 * userfaultfd would only find the page there (EEXIST) after allocating and copying one, and
 * fails with ENOENT while the back-end has not registered that range yet.
 *
 * No sockets here: a fault becomes a call of `request(region, page)`, a page comes in through
 * `placePages`. So the whole path runs against a fake fault source in tests.
 */
import type { GuestMemory } from "../memory/guest-memory.js";
import {
  UFFD_EVENT_PAGEFAULT,
  UFFDIO_REGISTER_MODE_MISSING,
  type UffdMessage,
  Userfaultfd,
} from "../sys/userfaultfd.js";
import { asMigrationError, MigrationError } from "./errors.js";
import { type FaultStats, latencyHistogram, percentile } from "./events.js";
import type { PagesRecord } from "./format.js";
import { PAGE } from "./page-set.js";
import type { ReceivedMemory, ReceivedRegion } from "./received-memory.js";

/** One guest-physical range mapped at a host address under some userfaultfd. */
export interface FaultRange {
  guestBase: number;
  size: number;
  hostStart: bigint;
}

/** Live counters of one fault domain added with addFaultDomain(). */
export interface FaultDomainStats {
  /** Fault messages read from this domain's userfaultfd. */
  readonly faults: number;
  /** Of those, pages that had not arrived yet (a PAGE_REQUEST went out or was in flight). */
  readonly missing: number;
  /** UFFDIO_WAKEs sent to this domain: to a thread waiting on a page once it arrived, or at once when it was already there. */
  readonly wakes: number;
}

/**
 * What the fault path needs of a userfaultfd: `Userfaultfd` is one; tests inject faults through
 * a fake one.
 */
export interface FaultFd {
  copy(dst: bigint, src: ArrayBufferView): boolean;
  copyRun(dst: bigint, src: ArrayBufferView): number;
  zeropage(start: bigint, len: number): boolean;
  zeropageRun(start: bigint, len: number): number;
  wake(start: bigint, len: number): void;
  onMessages(cb: (messages: UffdMessage[]) => void): { close(): void };
  unregister(start: bigint, len: number): void;
  close(): void;
}

interface FaultDomain {
  uffd: FaultFd;
  ranges: FaultRange[];
  /** Owned: registered and closed here. */
  owned: boolean;
  watch: { close(): void } | null;
  stats: { faults: number; missing: number; wakes: number };
  /**
   * Pages (guest-physical) this domain reported a fault on that were not there yet: its threads
   * wait on them. Only these need a wake when the page is placed through another domain; a
   * fault still unread at that moment finds the page present when it is read, and is woken then.
   */
  waiting: Set<number>;
}

export interface FaultServerOptions {
  memory: GuestMemory;
  received: ReceivedMemory;
  /** Asks the source for one page (PAGE_REQUEST); called once per page until it is placed. */
  request(region: number, page: number): void;
  /** Latency figures every 250 ms while faults are served. */
  onStats?(stats: FaultStats): void;
}

export class FaultServer {
  readonly #o: FaultServerOptions;
  readonly #regions: readonly ReceivedRegion[];
  readonly #domains: FaultDomain[] = [];
  /** Requested pages not placed yet (region * 2^32 + page) → when the request went out. */
  readonly #pending = new Map<number, number>();
  readonly #latencies: number[] = [];
  #faults = 0;
  #remoteFaults = 0;
  #discardFaults = 0;
  #lastStats = 0;
  #running = false;
  /** Postcopy is over (every fault domain released): no domain may join any more. */
  #ended = false;
  /** The first failure of a fault handler (it runs from the event loop: nobody to throw to). */
  failure: MigrationError | null = null;
  /** Full and zero pages placed (by requests and the background stream alike). */
  pages = 0;
  zero = 0;
  /** Pages that arrived on the preempt channel. */
  preemptPages = 0;

  constructor(options: FaultServerOptions) {
    this.#o = options;
    this.#regions = options.received.regions;
  }

  get running(): boolean {
    return this.#running;
  }

  /** Pages requested and not placed yet, as [region, page]: recovery asks for them again. */
  *pending(): IterableIterator<[region: number, page: number]> {
    for (const key of this.#pending.keys()) yield [Math.floor(key / 2 ** 32), key % 2 ** 32];
  }

  /** See MigrationDestination.addFaultDomain. */
  addDomain(uffd: FaultFd, ranges: FaultRange[]): FaultDomainStats {
    if (this.#ended)
      throw new MigrationError("UNSUPPORTED", "addFaultDomain after postcopy ended: nobody would serve its faults");
    for (const r of ranges)
      if (!this.#o.memory.regions.some((g) => r.guestBase >= g.guestBase && r.guestBase + r.size <= g.end))
        throw new MigrationError(
          "REGION_MISMATCH",
          `fault domain range [0x${r.guestBase.toString(16)}, +0x${r.size.toString(16)}) is not inside one region of guest memory`,
        );
    const d: FaultDomain = {
      uffd,
      ranges,
      owned: false,
      watch: null,
      stats: { faults: 0, missing: 0, wakes: 0 },
      waiting: new Set(),
    };
    this.#domains.push(d);
    if (this.#running) this.#watch(d);
    return d.stats;
  }

  /**
   * Registers all guest memory with a userfaultfd of our own (or `own`, already registered,
   * owned from here on: tests) and starts serving faults on every domain.
   */
  start(own?: { uffd: FaultFd; ranges: FaultRange[] }): void {
    let uffd: FaultFd;
    let ranges: FaultRange[];
    if (own) ({ uffd, ranges } = own);
    else {
      const u = Userfaultfd.create();
      ranges = [];
      try {
        for (const st of this.#regions) {
          const hostStart = st.region.hostAddress;
          u.register(hostStart, st.region.size, UFFDIO_REGISTER_MODE_MISSING);
          ranges.push({ guestBase: st.region.guestBase, size: st.region.size, hostStart });
        }
      } catch (e) {
        u.close();
        throw new MigrationError("UNSUPPORTED", `userfaultfd registration failed: ${(e as Error).message}`);
      }
      uffd = u;
    }
    this.#domains.unshift({
      uffd,
      ranges,
      owned: true,
      watch: null,
      stats: { faults: 0, missing: 0, wakes: 0 },
      waiting: new Set(),
    });
    this.#running = true;
    for (const d of this.#domains) this.#watch(d);
  }

  /** Stops serving; unregisters and closes our own userfaultfd (the others stay their owners'). */
  stop(): void {
    this.#ended = true;
    this.#running = false;
    for (const d of this.#domains) {
      d.watch?.close();
      d.watch = null;
    }
    for (const d of this.#domains.splice(0)) {
      if (!d.owned) continue;
      for (const r of d.ranges) {
        try {
          d.uffd.unregister(r.hostStart, r.size);
        } catch {
          // closing the uffd below drops the registration anyway
        }
      }
      d.uffd.close();
    }
  }

  /** Places the pages of a validated PAGES record (`st`: its region), each at most once. */
  placePages(st: ReceivedRegion, rec: PagesRecord): void {
    const ri = this.#regions.indexOf(st);
    // Only our own userfaultfd: runs of consecutive pages go in one UFFDIO_COPY / ZEROPAGE.
    if (this.#domains.length === 1) this.#placeRuns(st, ri, rec, this.#domains[0] as FaultDomain);
    else
      for (let k = 0; k < rec.pages.length; k++) {
        const p = rec.pages[k] as number;
        const at = rec.dataOffsets[k] as number;
        if (st.present.has(p)) continue;
        this.#install(st.region.guestBase + p * PAGE, at < 0 ? null : rec.data.subarray(at, at + PAGE));
        this.#placed(st, ri, p, at < 0);
      }
    this.#maybeEmit();
  }

  stats(): FaultStats {
    const s = [...this.#latencies].sort((a, b) => a - b);
    return {
      faults: this.#faults,
      remoteFaults: this.#remoteFaults,
      discardFaults: this.#discardFaults,
      latencyMedianUs: percentile(s, 50),
      latencyP99Us: percentile(s, 99),
      preemptPages: this.preemptPages,
      latencyHistogram: latencyHistogram(s),
    };
  }

  /** Bookkeeping for a page just placed: present, counters, the latency of a request for it. */
  #placed(st: ReceivedRegion, ri: number, p: number, zero: boolean): void {
    st.present.set(p);
    if (zero) this.zero++;
    else this.pages++;
    const key = ri * 2 ** 32 + p;
    const t = this.#pending.get(key);
    if (t !== undefined) {
      this.#pending.delete(key);
      this.#latencies.push((performance.now() - t) * 1000);
    }
  }

  #placeRuns(st: ReceivedRegion, ri: number, rec: PagesRecord, d: FaultDomain): void {
    const pages = rec.pages;
    const offs = rec.dataOffsets;
    const n = pages.length;
    const base = hostOf(d, st.region.guestBase) as bigint;
    let k = 0;
    while (k < n) {
      const p = pages[k] as number;
      const at = offs[k] as number;
      if (st.present.has(p)) {
        k++;
        continue;
      }
      // A run: consecutive pages, all zero or all full with their data back to back.
      const zero = at < 0;
      let e = k + 1;
      while (e < n) {
        const q = pages[e] as number;
        const qa = offs[e] as number;
        if (q !== p + (e - k) || st.present.has(q) || (zero ? qa >= 0 : qa !== at + (e - k) * PAGE)) break;
        e++;
      }
      const len = (e - k) * PAGE;
      const host = base + BigInt(p * PAGE);
      let off = 0;
      while (off < len) {
        const done = zero
          ? d.uffd.zeropageRun(host + BigInt(off), len - off)
          : d.uffd.copyRun(host + BigInt(off), rec.data.subarray(at + off, at + len));
        if (done > 0) {
          off += done;
          continue;
        }
        // Already there (a fault raced us, or placed before): never overwritten, only woken.
        d.uffd.wake(host + BigInt(off), PAGE);
        off += PAGE;
      }
      for (let j = k; j < e; j++) {
        const pj = p + (j - k);
        d.waiting.delete(st.region.guestBase + pj * PAGE);
        this.#placed(st, ri, pj, zero);
      }
      k = e;
    }
  }

  /**
   * Places one page (null: a zero page) through the first domain that maps it (our own, which
   * covers all guest memory) and wakes the other domains' threads waiting on it: the memory is
   * shared, so one placement is seen through every mapping.
   */
  #install(gpa: number, data: Uint8Array | null): void {
    let placed = false;
    for (const d of this.#domains) {
      const waited = d.waiting.delete(gpa);
      const host = hostOf(d, gpa);
      if (host === null) continue;
      if (!placed) {
        placed = true;
        // UFFDIO_COPY / ZEROPAGE wake this domain's waiters themselves; EEXIST does not.
        if (data ? d.uffd.copy(host, data) : d.uffd.zeropage(host, PAGE)) continue;
        d.uffd.wake(host, PAGE);
        continue;
      }
      if (!waited) continue;
      d.uffd.wake(host, PAGE);
      d.stats.wakes++;
    }
  }

  #watch(d: FaultDomain): void {
    d.watch = d.uffd.onMessages((msgs) => {
      for (const m of msgs) {
        if (m.event !== UFFD_EVENT_PAGEFAULT) continue;
        try {
          this.#onFault(d, m.address & ~4095n);
        } catch (e) {
          this.failure ??= asMigrationError(e);
        }
      }
    });
  }

  #onFault(d: FaultDomain, addr: bigint): void {
    const gpa = gpaOf(d, addr);
    const mem = this.#o.memory;
    const region = gpa === null ? undefined : mem.findRegion(gpa);
    // A thread faulted where no page will ever come from: it would wait for ever. That is a
    // fault domain whose ranges miss part of what it registered; fail loudly instead.
    if (gpa === null || !region)
      throw new MigrationError(
        "BAD_PAGE",
        `fault at 0x${addr.toString(16)} outside the guest memory this fault domain was given`,
        undefined,
        { address: `0x${addr.toString(16)}` },
      );
    const ri = mem.regions.indexOf(region);
    const st = this.#regions[ri] as ReceivedRegion;
    const off = gpa - region.guestBase;
    const p = Math.floor(off / PAGE);
    this.#faults++;
    d.stats.faults++;
    if (st.present.has(p)) {
      d.uffd.wake(addr, PAGE);
      d.stats.wakes++;
      return;
    }
    d.waiting.add(region.guestBase + p * PAGE);
    if (st.discard?.isDiscarded(off)) {
      // A discarded block has no content anywhere: a zero page, at once, without asking.
      this.#discardFaults++;
      this.#install(region.guestBase + p * PAGE, null);
      return;
    }
    d.stats.missing++;
    const key = ri * 2 ** 32 + p;
    if (this.#pending.has(key)) return;
    this.#pending.set(key, performance.now());
    this.#remoteFaults++;
    this.#o.request(ri, p);
  }

  #maybeEmit(): void {
    const now = performance.now();
    if (now - this.#lastStats < 250 || this.#latencies.length === 0) return;
    this.#lastStats = now;
    this.#o.onStats?.(this.stats());
  }
}

function hostOf(d: FaultDomain, gpa: number): bigint | null {
  for (const r of d.ranges)
    if (gpa >= r.guestBase && gpa < r.guestBase + r.size) return r.hostStart + BigInt(gpa - r.guestBase);
  return null;
}

function gpaOf(d: FaultDomain, addr: bigint): number | null {
  for (const r of d.ranges)
    if (addr >= r.hostStart && addr < r.hostStart + BigInt(r.size)) return r.guestBase + Number(addr - r.hostStart);
  return null;
}
