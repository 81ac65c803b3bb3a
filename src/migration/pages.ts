/**
 * Bulk page copies between guest memory and record buffers: one native.copyPages call per
 * window and record instead of a view and a TypedArray.set per page (the per-page path cost
 * about as much as the whole network stack at 1 GiB). Index lists live in a reused scratch
 * buffer, so a record costs no allocation here.
 */
import type { GuestMemoryRegion } from "../memory/region.js";
import { WINDOW_SIZE } from "../sys/mapping.js";
import { native } from "../sys/native.js";

const PAGE = 4096;
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
    if (toGuest) native.copyPages(windowView(region, w), list, slots, null, n, PAGE);
    else native.copyPages(slots, null, windowView(region, w), list, n, PAGE);
    k += n;
  }
}
