/**
 * Bulk memory primitives in C, one call per batch (the `dirty` benchmark shows why: a per-page
 * loop in JS pays call and view overhead on every page). Shapes as in the addon; see
 * docs/native.md.
 */
import { native, type View } from "./native.js";

/**
 * Copies `count` pages of `pageSize` bytes from `src` to `dst`; an index list gives each page's
 * number (null: consecutive from 0). Every index is checked against its view (RangeError-free:
 * an out-of-range index throws a TypeError before that page is copied).
 */
export function copyPages(
  dst: View,
  dstIndex: Uint32Array | null,
  src: View,
  srcIndex: Uint32Array | null,
  count: number,
  pageSize: number,
): void {
  native.copyPages(dst, dstIndex, src, srcIndex, count, pageSize);
}

/**
 * Atomically takes every set bit from `startWord` on (exchange with 0 per 32-bit word) and writes
 * the bit numbers to `out`; stops before a word that might not fit. Returns [found, nextWord];
 * nextWord equal to the word count means the scan is complete.
 */
export function scanClear(bitmap: Uint32Array, out: Uint32Array, startWord: number): [found: number, nextWord: number] {
  return native.scanClear(bitmap, out, startWord);
}

/**
 * Copies every byte of `src` to the start of `dst` (overlap allowed) with one libc memmove.
 * Use it for every large copy into or out of guest memory: TypedArray.set on a
 * SharedArrayBuffer (every guest mapping) copies with relaxed atomics word by word, at about
 * half of memcpy's speed. A TypeError when `dst` is shorter than `src` (nothing copied).
 */
export function memcpy(dst: View, src: View): void {
  native.memcpy(dst, src);
}

/**
 * Below this many bytes a TypedArray.set is cheaper than the native call (the copy is shorter
 * than the call's fixed cost); copyBytes picks the right one.
 */
export const NATIVE_COPY_MIN = 1024;

/** dst.set(src, at), through memcpy when the copy is long enough to pay for the call. */
export function copyBytes(dst: Uint8Array, src: Uint8Array, at = 0): void {
  if (src.length < NATIVE_COPY_MIN) dst.set(src, at);
  else if (at < 0 || at + src.length > dst.length)
    throw new RangeError(`a copy of ${src.length} bytes at ${at} into ${dst.length}`);
  else native.memcpy(at === 0 ? dst : dst.subarray(at), src);
}

/** True when every byte of `view` is zero. */
export function isZero(view: View): boolean {
  return native.isZero(view);
}

/** XXH64 (seed 0) of `count` pages (index list or consecutive), two u32 words (low, high) per page in `out`. */
export function hashPages(
  src: View,
  srcIndex: Uint32Array | null,
  count: number,
  pageSize: number,
  out: Uint32Array,
): void {
  native.hashPages(src, srcIndex, count, pageSize, out);
}
