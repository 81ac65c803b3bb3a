/**
 * Bulk page copies between guest memory and record buffers: one native.copyPages call per
 * window and record instead of a view and a TypedArray.set per page (the per-page path cost
 * about as much as the whole network stack at 1 GiB). Index lists live in a reused scratch
 * buffer, so a record costs no allocation here.
 */
import type { GuestMemoryRegion } from "../memory/region.js";
import { copyPages } from "../sys/bulk.js";
import { pwrite } from "../sys/fd.js";
import { WINDOW_SIZE } from "../sys/mapping.js";
import { PAGE } from "./page-set.js";

const PAGES_PER_WINDOW = WINDOW_SIZE / PAGE;

let scratch = new Uint32Array(1024);
function indexScratch(n: number): Uint32Array {
  if (scratch.length < n) scratch = new Uint32Array(Math.max(n, scratch.length * 2));
  return scratch;
}

const windowViews = new WeakMap<SharedArrayBuffer, Uint8Array>();
function windowView(region: GuestMemoryRegion, w: number): Uint8Array {
  const sab = region.windows[w];
  if (!sab) throw new RangeError(`window ${w} of a region of ${region.size} bytes`);
  let v = windowViews.get(sab);
  if (!v) {
    v = new Uint8Array(sab);
    windowViews.set(sab, v);
  }
  return v;
}

/**
 * Copies `count` pages of `region` (indices in `pages`, in order) to consecutive 4 KiB slots
 * of `dst` (gather), or the other way round (scatter) when `toGuest` is true.
 */
export function copyRegionPages(
  region: GuestMemoryRegion,
  pages: ArrayLike<number>,
  count: number,
  buf: Uint8Array,
  toGuest: boolean,
): void {
  const idx = indexScratch(count);
  let k = 0;
  while (k < count) {
    const w = Math.floor((pages[k] as number) / PAGES_PER_WINDOW);
    const base = w * PAGES_PER_WINDOW;
    let n = 0;
    // A run of pages in the same window: one native call.
    while (k + n < count && Math.floor((pages[k + n] as number) / PAGES_PER_WINDOW) === w) {
      idx[n] = (pages[k + n] as number) - base;
      n++;
    }
    const slots = buf.subarray(k * PAGE, (k + n) * PAGE);
    const list = idx.subarray(0, n);
    if (toGuest) copyPages(windowView(region, w), list, slots, null, n, PAGE);
    else copyPages(slots, null, windowView(region, w), list, n, PAGE);
    k += n;
  }
}

/** Runs of at least this many consecutive pages are written with one pwrite (see below). */
const PWRITE_MIN_PAGES = 8;

/**
 * Scatters `count` pages from consecutive 4 KiB slots of `buf` into guest memory, like
 * copyRegionPages(..., true). For a memfd region (always mapped shared: every mapping sees
 * the page cache, so writing through the fd is the same as writing through the mapping), runs
 * of consecutive pages go in with one pwrite each: the kernel allocates the shmem pages and
 * copies into them without a page fault per page and without zeroing them first, about twice
 * as fast on fresh memory (1 MiB runs here: 3.3 GB/s against 1.65 GB/s through the mapping).
 * Short runs, mostly pages already present, are cheaper as a bulk copy.
 */
export function writeRegionPages(region: GuestMemoryRegion, pages: Uint32Array, count: number, buf: Uint8Array): void {
  const fd = region.backing.kind === "memfd" && !region.readonly ? region.backing.fd : null;
  if (!fd) {
    copyRegionPages(region, pages, count, buf, true);
    return;
  }
  let short = 0;
  let k = 0;
  while (k < count) {
    const first = pages[k] as number;
    let n = 1;
    while (k + n < count && pages[k + n] === first + n) n++;
    if (n < PWRITE_MIN_PAGES) {
      k += n;
      continue;
    }
    if (short < k)
      copyRegionPages(region, pages.subarray(short), k - short, buf.subarray(short * PAGE, k * PAGE), true);
    let done = 0;
    const data = buf.subarray(k * PAGE, (k + n) * PAGE);
    while (done < data.length) done += pwrite(fd, data.subarray(done), region.backing.offset + first * PAGE + done);
    k += n;
    short = k;
  }
  if (short < count)
    copyRegionPages(region, pages.subarray(short), count - short, buf.subarray(short * PAGE, count * PAGE), true);
}
