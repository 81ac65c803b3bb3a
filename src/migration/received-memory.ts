/**
 * What the destination holds of the guest's memory, apart from the memory itself: per region,
 * the pages received (written in precopy or placed in postcopy), their hashes (precopy with
 * verification) and the discard map. Bookkeeping only: no syscalls, no sockets, so every rule
 * is unit-testable; MigrationDestination does the copies, UFFDIO calls and madvise it decides.
 */
import { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { PageHashes, regionDigest } from "./digest.js";
import { MigrationError } from "./errors.js";
import { PAGE, type PageSet, SharedPageSet } from "./page-set.js";

export interface ReceivedRegion {
  readonly region: GuestMemoryRegion;
  readonly pages: number;
  discard: DiscardMap | undefined;
  /** Pages present here (written in precopy or placed in postcopy). */
  readonly present: PageSet;
  /** Precopy with verification: the hash of every page as written here (zero where never written). */
  hashes: PageHashes | null;
}

export class ReceivedMemory {
  readonly regions: readonly ReceivedRegion[];

  constructor(regions: readonly GuestMemoryRegion[], discard?: ReadonlyMap<GuestMemoryRegion, DiscardMap>) {
    this.regions = regions.map((region) => ({
      region,
      pages: region.size / PAGE,
      discard: discard?.get(region),
      present: new SharedPageSet(region.size / PAGE),
      hashes: null,
    }));
  }

  get(i: number): ReceivedRegion | undefined {
    return this.regions[i];
  }

  /** From now on every page written keeps its hash (precopy with verification). */
  startHashing(): void {
    for (const st of this.regions) st.hashes = new PageHashes(st.pages);
  }

  /** Per region, the digest of the hashes kept (all zero bytes where none were kept). */
  hashDigests(): Uint8Array[] {
    return this.regions.map((st) => st.hashes?.digest(st.discard) ?? new Uint8Array(32));
  }

  /** Per region, the digest of its memory as it is now; pages never received are hashed as zero without reading them. */
  memoryDigest(i: number): Uint8Array {
    const st = this.regions[i] as ReceivedRegion;
    return regionDigest(st.region, st.discard, st.present);
  }

  /**
   * Checks every page number of a PAGES record against region `i` before any is applied:
   * BAD_PAGE for an unknown region, a page outside it, or a page in a discarded block.
   */
  checkPages(i: number, pages: ArrayLike<number>, offset?: number): ReceivedRegion {
    const st = this.regions[i];
    if (!st) throw new MigrationError("BAD_PAGE", `pages for region ${i}`, offset, { region: i });
    for (let k = 0; k < pages.length; k++) {
      const p = pages[k] as number;
      if (p >= st.pages)
        throw new MigrationError("BAD_PAGE", `page ${p} outside region ${i} (${st.pages} pages)`, offset, {
          region: i,
          page: p,
        });
      if (st.discard?.isDiscarded(p * PAGE))
        throw new MigrationError("BAD_PAGE", `page ${p} of region ${i} is in a discarded block`, offset, {
          region: i,
          page: p,
        });
    }
    return st;
  }

  /** A page written with content (the caller copies it and hashes it with the record's data). */
  received(st: ReceivedRegion, p: number): void {
    st.present.set(p);
  }

  /**
   * A zero page arrived: its hash is the zero page's. Returns true when the page was received
   * before (its memory must then be cleared; fresh memory is zero already and stays unpopulated).
   */
  receivedZero(st: ReceivedRegion, p: number): boolean {
    st.hashes?.setZero(p);
    return st.present.has(p);
  }

  /**
   * A discard map for region `st` (validated by the caller: whole pages, a power of two, one
   * state per block). The first map is taken as is; a later one drops every block that was
   * plugged and is discarded now: its pages count as never received (zero hash). Returns
   * those blocks, for the caller to free. REGION_MISMATCH when the block size changes.
   */
  applyDiscard(st: ReceivedRegion, blockSize: number, states: Uint8Array, offset?: number): number[] {
    const fresh = !st.discard;
    if (!st.discard) st.discard = new DiscardMap(st.region.size, blockSize, true);
    const map = st.discard;
    if (map.blockSize !== blockSize)
      throw new MigrationError(
        "REGION_MISMATCH",
        `discard block size ${blockSize}, destination ${map.blockSize}`,
        offset,
        { region: this.regions.indexOf(st) },
      );
    const dropped: number[] = [];
    if (!fresh) {
      const per = blockSize / PAGE;
      for (let b = 0; b < states.length; b++) {
        if (states[b] !== 0 || !map.isPlugged(b * blockSize)) continue;
        dropped.push(b);
        for (let p = b * per; p < (b + 1) * per; p++) {
          st.present.clear(p);
          st.hashes?.setZero(p);
        }
      }
    }
    map.applyBytes(states);
    return dropped;
  }

  /**
   * POSTCOPY_ADVISE: pages in `advised` that are present here are dropped (they changed at the
   * source since they were sent). Returns the runs [first, end) of pages dropped, for the
   * caller to free.
   */
  dropAdvised(st: ReceivedRegion, advised: PageSet): [first: number, end: number][] {
    if (advised.pages !== st.pages) throw new RangeError(`advice of ${advised.pages} pages for ${st.pages}`);
    const runs: [number, number][] = [];
    let run = -1;
    for (let p = 0; p < st.pages; p++) {
      if (advised.has(p) && st.present.has(p)) {
        st.present.clear(p);
        if (run < 0) run = p;
      } else if (run >= 0) {
        runs.push([run, p]);
        run = -1;
      }
    }
    if (run >= 0) runs.push([run, st.pages]);
    return runs;
  }
}
