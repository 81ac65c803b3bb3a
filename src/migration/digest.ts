/**
 * Region digests (stream version 2): SHA-256 over the XXH64 (seed 0) of every 4 KiB page of
 * the region's plugged blocks, in address order, each hash as 8 bytes little-endian.
 *
 * Per-page hashes let the destination know its digest without reading its memory again: it
 * hashes each page as it arrives (`PageHashes`), so at switchover the digest of exactly the
 * memory it resumes with is one SHA-256 over 2 MiB per GiB. The source instead hashes its
 * frozen memory itself (`regionDigest`), never a value cached at send time, so a write that
 * dirty tracking missed still shows up as a mismatch.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import type { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { hashPages } from "../sys/bulk.js";
import { WINDOW_SIZE } from "../sys/mapping.js";
import { PAGE, type PageSet } from "./page-set.js";

const PAGES_PER_WINDOW = WINDOW_SIZE / PAGE;

/**
 * XXH64 of an all-zero 4 KiB page (0xac869b6f32d8bbdb), as the two u32 words hashPages writes.
 * A constant rather than computed at import, so importing the package loads no native code
 * (test/sys/bulk.test.ts checks it against hashPages).
 */
export const ZERO_PAGE_HASH: readonly [number, number] = [0x32d8bbdb, 0xac869b6f];

/** One 64-bit hash per page of a region (two u32 words), all starting as the zero page's. */
export class PageHashes {
  readonly table: Uint32Array;
  #scratch = new Uint32Array(512);

  constructor(readonly pages: number) {
    this.table = new Uint32Array(pages * 2);
    const [lo, hi] = ZERO_PAGE_HASH;
    for (let p = 0; p < pages; p++) {
      this.table[2 * p] = lo;
      this.table[2 * p + 1] = hi;
    }
  }

  setZero(p: number): void {
    this.table[2 * p] = ZERO_PAGE_HASH[0];
    this.table[2 * p + 1] = ZERO_PAGE_HASH[1];
  }

  /** Hashes `count` consecutive 4 KiB pages of `data`, the contents of pages `pages[0..count)`. */
  setFromData(pages: ArrayLike<number>, count: number, data: Uint8Array): void {
    if (this.#scratch.length < count * 2) this.#scratch = new Uint32Array(count * 2);
    const h = this.#scratch;
    hashPages(data, null, count, PAGE, h);
    for (let k = 0; k < count; k++) {
      const p = pages[k] as number;
      this.table[2 * p] = h[2 * k] as number;
      this.table[2 * p + 1] = h[2 * k + 1] as number;
    }
  }

  /** Takes the hashes of pages `pages[0..count)`, computed elsewhere (two u32 words per page, in order). */
  setFromHashes(pages: ArrayLike<number>, count: number, h: Uint32Array): void {
    for (let k = 0; k < count; k++) {
      const p = pages[k] as number;
      this.table[2 * p] = h[2 * k] as number;
      this.table[2 * p + 1] = h[2 * k + 1] as number;
    }
  }

  digest(discard?: DiscardMap): Uint8Array {
    return digestOfTable(this.table, this.pages, discard);
  }
}

function digestOfTable(table: Uint32Array, pages: number, discard?: DiscardMap): Uint8Array {
  const h = createHash("sha256");
  const bytes = new Uint8Array(table.buffer, table.byteOffset, table.byteLength);
  const ranges: Iterable<[number, number]> = discard ? discard.ranges(true) : [[0, pages * PAGE]];
  // Little-endian hosts only (x86-64, aarch64): the table's memory is already the wire order.
  for (const [off, len] of ranges) h.update(bytes.subarray((off / PAGE) * 8, ((off + len) / PAGE) * 8));
  return new Uint8Array(h.digest());
}

/**
 * Whether a page that mincore reports not resident is zero by construction: in a memfd or
 * anonymous mapping a page is either in memory, in swap, or was never populated (or punched
 * out) and reads as zeros. With no swap configured the middle case cannot exist, so
 * "not resident" means "zero". Files (page cache over a disk) and hugetlbfs are always read.
 * Checked again at every use: swap can be enabled at any time.
 */
export function residencyImpliesZero(region: GuestMemoryRegion): boolean {
  const k = region.backing.kind;
  if ((k !== "memfd" && k !== "anonymous") || !region.mapping) return false;
  try {
    // The header line only: no swap area.
    return readFileSync("/proc/swaps", "latin1").trim().split("\n").length <= 1;
  } catch {
    return false;
  }
}

/**
 * The digest of a region's memory as it is now (writers stopped). Every page is hashed from
 * the mapping except the ones known to be zero: with `written`, pages whose bit is clear
 * (destination: fresh memory never written here); otherwise pages that are not resident where
 * `residencyImpliesZero` holds (source: reading them would fault new zero pages in).
 */
export function regionDigest(region: GuestMemoryRegion, discard?: DiscardMap, written?: PageSet): Uint8Array {
  const pages = region.size / PAGE;
  const table = new Uint32Array(pages * 2);
  const resident = !written && residencyImpliesZero(region) ? region.mapping?.residency(0, region.size) : undefined;
  const must = (p: number): boolean =>
    written ? written.has(p) : resident ? ((resident[p] as number) & 1) === 1 : true;
  const ranges: Iterable<[number, number]> = discard ? discard.ranges(true) : [[0, region.size]];
  const idx = new Uint32Array(Math.min(PAGES_PER_WINDOW, 65536));
  const [zlo, zhi] = ZERO_PAGE_HASH;
  for (const [off, len] of ranges) {
    let p = off / PAGE;
    const end = (off + len) / PAGE;
    while (p < end) {
      // One batch never crosses a window: hashPages gets that window's view and indices in it.
      const w = Math.floor(p / PAGES_PER_WINDOW);
      const base = w * PAGES_PER_WINDOW;
      const stop = Math.min(end, base + PAGES_PER_WINDOW, p + idx.length);
      let n = 0;
      for (; p < stop; p++) {
        if (must(p)) idx[n++] = p - base;
        else {
          table[2 * p] = zlo;
          table[2 * p + 1] = zhi;
        }
      }
      if (n === 0) continue;
      const out = new Uint32Array(n * 2);
      hashPages(new Uint8Array(region.windows[w] as SharedArrayBuffer), idx, n, PAGE, out);
      for (let k = 0; k < n; k++) {
        const pg = (idx[k] as number) + base;
        table[2 * pg] = out[2 * k] as number;
        table[2 * pg + 1] = out[2 * k + 1] as number;
      }
    }
  }
  return digestOfTable(table, pages, discard);
}

export function hex(b: Uint8Array): string {
  return Buffer.from(b).toString("hex");
}
