/**
 * The source's page sending, apart from the control flow around it: one precopy round (the
 * pages a dirty sync left in the bitmap), the postcopy background pass, and the plug state of
 * regions whose blocks were (un)plugged meanwhile (virtio-mem).
 *
 * What it decides per page:
 * - discarded: never read, never sent (the sync leaves discarded blocks out; a block discarded
 *   after the sync is filtered out of each batch before it is read);
 * - zero: sent as a flag only (a scan of the page, or, where residencyImpliesZero holds, a page
 *   that is not resident counts as zero without reading it);
 * - otherwise its bytes are gathered into the record in one native copy per window.
 *
 * Records are built in buffers from a small pool that the socket gives back once a write went
 * out: a fresh 1 MiB buffer per record faults its memory in page by page, which cost more than
 * the copy into it (profiled: the gather ran at a third of memcpy speed on fresh buffers).
 */
import type { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { isZero } from "../sys/bulk.js";
import type { RecordWriter } from "./channel.js";
import { residencyImpliesZero } from "./digest.js";
import { DIRTY_HEAT_CELLS } from "./events.js";
import { encodeDiscard, encodePages, PAGES_PER_RECORD, pagesPayloadSize, RECORD_OVERHEAD } from "./format.js";
import { PAGE } from "./page-set.js";
import { copyRegionPages } from "./pages.js";

/** A region as the sender sees it. */
export interface SendRegion {
  region: GuestMemoryRegion;
  pages: number;
  discard: DiscardMap | undefined;
}

/** What the sender asks of the return path: stop on its failure; the postcopy sent-set. */
export interface SendGuard {
  /** Throws the migration's failure, if it failed meanwhile. */
  check(): void;
}

export interface SentSet extends SendGuard {
  markSent(region: number, page: number): void;
  wasSent(region: number, page: number): boolean;
}

/** The dirty pages of a region, taken (cleared) as they are read. */
export interface DirtyPages {
  take(region: number): Uint32Array;
}

/**
 * Buffers of one size, handed out for records and given back when the socket has written them.
 * take() never blocks: with none free it allocates. acquire() waits instead while `limit`
 * buffers are out, until one comes back.
 *
 * Why acquire() waits: over a plain socket that takes every write at once (loopback), node:net
 * completes each write synchronously and runs its callback on the next tick, and next ticks run
 * only once the promise jobs run dry. The precopy loop awaits only settled promises, so no
 * buffer ever came back while it ran: every record took a fresh 1 MiB buffer (profiled, 1 GiB
 * loopback: 680 buffers for 680 records, ~100k extra page faults and the garbage collector
 * freeing them, the source's largest cost after the kernel's). Waiting on a pending promise
 * lets the ticks run, and the buffers come back at once.
 */
export class RecordBufferPool {
  readonly size: number;
  readonly #keep: number;
  readonly #limit: number;
  readonly #free: Buffer[] = [];
  readonly #waiters: (() => void)[] = [];
  /** Buffers handed out and not given back. */
  #out = 0;
  /** Buffers allocated because none was free (for tests and stats). */
  allocated = 0;

  constructor(size: number, keep = 16, limit = 8) {
    this.size = size;
    this.#keep = keep;
    this.#limit = limit;
  }

  take(): Buffer {
    this.#out++;
    const b = this.#free.pop();
    if (b) return b;
    this.allocated++;
    // Slow: outside Node's shared 8 KiB pool, a buffer of its own that is reused for ever.
    return Buffer.allocUnsafeSlow(this.size);
  }

  /** A buffer, once fewer than `limit` are out (the socket gives them back as it writes). */
  async acquire(): Promise<Buffer> {
    while (this.#free.length === 0 && this.#out >= this.#limit) await new Promise<void>((r) => this.#waiters.push(r));
    return this.take();
  }

  give(b: Buffer): void {
    this.#out = Math.max(0, this.#out - 1);
    if (b.length === this.size && this.#free.length < this.#keep && !this.#free.includes(b)) this.#free.push(b);
    this.#waiters.shift()?.();
  }

  get free(): number {
    return this.#free.length;
  }
}

/** A whole PAGES record of PAGES_PER_RECORD full pages fits one pool buffer. */
export const RECORD_BUFFER_SIZE = RECORD_OVERHEAD + pagesPayloadSize(PAGES_PER_RECORD, PAGES_PER_RECORD, PAGE);

export class PageSender {
  readonly #regions: readonly SendRegion[];
  readonly #pool = new RecordBufferPool(RECORD_BUFFER_SIZE);
  /** Full and zero pages sent so far, over every round and the background pass. */
  pages = 0;
  zero = 0;
  /** Regions whose plug state changed since it was last sent. */
  readonly #plugChanged = new Set<number>();
  /** Counts (un)plug events; a batch is filtered again only when one came after the sync. */
  #plugEpoch = 0;
  #plugEpochAtSync = 0;

  constructor(regions: readonly SendRegion[]) {
    this.#regions = regions;
  }

  get pool(): RecordBufferPool {
    return this.#pool;
  }

  /** Follows every region's discard map; returns the unsubscribe calls. */
  watchPlugState(): (() => void)[] {
    const out: (() => void)[] = [];
    for (const [index, ri] of this.#regions.entries())
      if (ri.discard) {
        const changed = () => {
          this.#plugChanged.add(index);
          this.#plugEpoch++;
        };
        out.push(ri.discard.subscribe({ onDiscard: changed, onPopulate: changed }));
      }
    return out;
  }

  /** Call right before a dirty sync: (un)plug events up to here are in its bitmap. */
  syncing(): void {
    this.#plugEpochAtSync = this.#plugEpoch;
  }

  /** The plug state of every region whose blocks were (un)plugged since it was last sent. */
  sendPlugChanges(writer: RecordWriter): void {
    for (const i of this.#plugChanged) {
      const d = (this.#regions[i] as SendRegion).discard;
      if (d) writer.writeNow(encodeDiscard({ region: i, blockSize: d.blockSize, states: d.toBytes() }));
    }
    this.#plugChanged.clear();
  }

  /** The bytes of page `p` of region `i` (a view into guest memory). */
  pageView(i: number, p: number): Uint8Array {
    return (this.#regions[i] as SendRegion).region.bytes(p * PAGE, PAGE) as Uint8Array;
  }

  /** One PAGES record of `batch` (ascending pages of region i), written to `writer`. */
  async #send(writer: RecordWriter, i: number, batch: ArrayLike<number>, byResidency: boolean): Promise<number> {
    const region = (this.#regions[i] as SendRegion).region;
    const buf = await this.#pool.acquire();
    const rec = encodePages(
      i,
      batch,
      PAGE,
      (p) => this.pageView(i, p),
      this.#zeroTest(i, batch, byResidency),
      (full, count, into) => copyRegionPages(region, full, count, into, false),
      buf,
    );
    this.pages += batch.length;
    this.zero += rec.zero;
    await writer.write(rec.record, () => this.#pool.give(buf));
    return rec.zero;
  }

  /**
   * Sends every page dirty in `dirty` now (taking it): one precopy round, or the final pass
   * after the writers stopped. `heat` (DIRTY_HEAT_CELLS cells over all memory) counts where.
   */
  async sendDirty(
    dirty: DirtyPages,
    writer: RecordWriter,
    guard: SendGuard,
    heat?: number[],
  ): Promise<{ pages: number; zero: number }> {
    let pages = 0;
    let zero = 0;
    let base = 0;
    const cellPages = this.#regions.reduce((n, r) => n + r.pages, 0) / DIRTY_HEAT_CELLS;
    for (let i = 0; i < this.#regions.length; i++) {
      const ri = this.#regions[i] as SendRegion;
      const taken = dirty.take(i);
      if (heat)
        for (let k = 0; k < taken.length; k++) {
          const c = Math.min(DIRTY_HEAT_CELLS - 1, Math.floor((base + (taken[k] as number)) / cellPages));
          heat[c] = (heat[c] as number) + 1;
        }
      base += ri.pages;
      // Taken after the sync: a page that is not resident now and written later is dirty again.
      const byResidency = residencyImpliesZero(ri.region);
      for (let s = 0; s < taken.length; s += PAGES_PER_RECORD) {
        guard.check();
        if (this.#plugChanged.size > 0) this.sendPlugChanges(writer);
        // The sync left out discarded blocks; only a block discarded since needs a second look.
        const batch =
          ri.discard && this.#plugEpoch !== this.#plugEpochAtSync
            ? ri.discard.filterPages(taken.subarray(s, s + PAGES_PER_RECORD), PAGE)
            : taken.subarray(s, s + PAGES_PER_RECORD);
        if (batch.length === 0) continue;
        zero += await this.#send(writer, i, batch, byResidency);
        pages += batch.length;
      }
    }
    return { pages, zero };
  }

  /**
   * Postcopy background: every page of `todo` not sent yet (a requested page went ahead),
   * marking each as sent. `yieldEachRecord` (a preempt channel serves requests): return to the
   * event loop after every record, so page requests are read between them.
   */
  async sendBackground(
    todo: Uint32Array[],
    writer: RecordWriter,
    sent: SentSet,
    yieldEachRecord: boolean,
  ): Promise<void> {
    const BATCH = yieldEachRecord ? 16 : 64;
    const batch: number[] = [];
    for (let i = 0; i < todo.length; i++) {
      const pages = todo[i] as Uint32Array;
      const flush = async () => {
        if (batch.length === 0) return;
        for (const p of batch) sent.markSent(i, p);
        // The background pass reads every page, no residency shortcut. Sending never-written
        // pages unread (one mincore per batch) made the bench's postcopy 10 % shorter but the
        // guest's longest stall 3-5x longer (4-12 ms -> 24-43 ms, four runs each): the pass
        // then outruns the destination's placing, and a fault waits behind that work.
        await this.#send(writer, i, batch, false);
        batch.length = 0;
        // A write under the high-water mark resolves at once: without this the loop would not
        // return to the event loop (and read page requests) until the socket backs up.
        if (yieldEachRecord) await new Promise((r) => setImmediate(r));
      };
      for (let k = 0; k < pages.length; k++) {
        sent.check();
        const p = pages[k] as number;
        if (sent.wasSent(i, p)) continue;
        batch.push(p);
        if (batch.length === BATCH) await flush();
      }
      await flush();
    }
  }

  /**
   * The zero test for a batch of pages. Where residencyImpliesZero holds, a page
   * that is not resident is zero without reading it: reading would fault a fresh zero page in
   * (the never-written part of a new memfd costs more to scan than all the data sent).
   */
  #zeroTest(i: number, batch: ArrayLike<number>, byResidency: boolean): (p: number) => boolean {
    const view = (p: number) => isZero(this.pageView(i, p));
    const mapping = (this.#regions[i] as SendRegion).region.mapping;
    if (!byResidency || !mapping || batch.length === 0) return view;
    // Usually ascending, but a background list need not be: the span of the batch, either way.
    let first = batch[0] as number;
    let last = first;
    for (let k = 1; k < batch.length; k++) {
      const p = batch[k] as number;
      if (p < first) first = p;
      else if (p > last) last = p;
    }
    const span = last - first + 1;
    if (span > 65536) return view;
    const resident = mapping.residency(first * PAGE, span * PAGE);
    return (p) => ((resident[p - first] as number) & 1) === 0 || view(p);
  }
}
