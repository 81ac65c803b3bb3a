import { scanClear } from "../sys/bulk.js";

/** Everything needed to open the same bitmap in another thread (posted without a copy). */
export interface SharedBitmap {
  buffer: SharedArrayBuffer;
  bytes: number;
  pageSize: number;
}

const SCAN_CHUNK = 64 * 1024;

/**
 * A page-granular dirty bitmap in shared memory: bit i covers bytes
 * [i*pageSize, (i+1)*pageSize) of the range it tracks. Marks are Atomics.or on 32-bit
 * words, so any number of threads (or processes, when the buffer is a shared mapping) mark
 * concurrently, and snapshotAndClear() takes each word with an atomic exchange: a mark is
 * either in this snapshot or still in the bitmap for the next one, never lost.
 */
export class AtomicBitmap {
  readonly buffer: SharedArrayBuffer;
  readonly words: Uint32Array;
  readonly pageSize: number;
  /** Bytes of the tracked range. */
  readonly bytes: number;
  readonly pages: number;

  constructor(bytes: number, pageSize = 4096, buffer?: SharedArrayBuffer) {
    if (!Number.isSafeInteger(bytes) || bytes < 0) throw new RangeError(`bad bitmap size ${bytes}`);
    if (pageSize <= 0 || (pageSize & (pageSize - 1)) !== 0)
      throw new RangeError(`page size ${pageSize} is not a power of two`);
    this.pageSize = pageSize;
    this.bytes = bytes;
    this.pages = Math.ceil(bytes / pageSize);
    const words = Math.max(1, Math.ceil(this.pages / 32));
    if (buffer && buffer.byteLength < words * 4) throw new RangeError("bitmap buffer too small");
    this.buffer = buffer ?? new SharedArrayBuffer(words * 4);
    this.words = new Uint32Array(this.buffer, 0, words);
  }

  static fromShared(s: SharedBitmap): AtomicBitmap {
    return new AtomicBitmap(s.bytes, s.pageSize, s.buffer);
  }

  toShared(): SharedBitmap {
    return { buffer: this.buffer, bytes: this.bytes, pageSize: this.pageSize };
  }

  markPage(page: number): void {
    if (page >= 0 && page < this.pages) Atomics.or(this.words, page >>> 5, 1 << (page & 31));
  }

  /** Marks every page touched by bytes [offset, offset+length); clipped to the tracked range. */
  markRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.pageSize);
    const last = Math.min(Math.floor((offset + length - 1) / this.pageSize), this.pages - 1);
    if (first < 0 || first > last) return;
    if (first === last) {
      Atomics.or(this.words, first >>> 5, 1 << (first & 31));
      return;
    }
    let p = first;
    while (p <= last) {
      const w = p >>> 5;
      const bit = p & 31;
      const n = Math.min(32 - bit, last - p + 1);
      const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit;
      Atomics.or(this.words, w, mask);
      p += n;
    }
  }

  isDirty(page: number): boolean {
    if (page < 0 || page >= this.pages) return false;
    return (Atomics.load(this.words, page >>> 5) & (1 << (page & 31))) !== 0;
  }

  /** Pages dirty right now (a racy count while writers run; exact when they are stopped). */
  count(): number {
    let n = 0;
    const w = this.words;
    for (let i = 0; i < w.length; i++) {
      let v = w[i] as number;
      if (v === 0) continue;
      v = v - ((v >>> 1) & 0x55555555);
      v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
      n += (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
    }
    return n;
  }

  /** The dirty pages in ascending order, without clearing them. */
  *dirtyPages(): IterableIterator<number> {
    const w = this.words;
    for (let i = 0; i < w.length; i++) {
      let v = Atomics.load(w, i);
      while (v !== 0) {
        const b = 31 - Math.clz32(v & -v);
        const page = i * 32 + b;
        if (page < this.pages) yield page;
        v &= v - 1;
      }
    }
  }

  /**
   * Takes the dirty pages and clears them, atomically per word: a mark that lands during the
   * scan is either returned now or left for the next call. Ascending page order.
   */
  snapshotAndClear(): Uint32Array {
    return takeBits(this.words, this.pages);
  }

  /** OR `pages` (page indices) into this bitmap. */
  markPages(pages: ArrayLike<number>): void {
    for (let i = 0; i < pages.length; i++) this.markPage(pages[i] as number);
  }

  clear(): void {
    for (let i = 0; i < this.words.length; i++) Atomics.store(this.words, i, 0);
  }

  /** Marks every page. */
  setAll(): void {
    this.markRange(0, this.bytes);
  }
}

// One scratch buffer per thread: scanClear writes bit numbers into it and only what was found
// is copied out, so a sparse scan allocates almost nothing.
const scratch = new Uint32Array(SCAN_CHUNK);

/**
 * Takes (atomic exchange) every set bit of `words` below `limit` and returns the bit numbers in
 * ascending order. A bit set concurrently is either returned or left for the next call.
 */
export function takeBits(words: Uint32Array, limit: number): Uint32Array {
  let parts: Uint32Array[] | null = null;
  let single: Uint32Array | null = null;
  let total = 0;
  let word = 0;
  while (word < words.length) {
    const [found, next] = scanClear(words, scratch, word);
    if (found > 0) {
      const part = scratch.slice(0, found);
      if (single === null && parts === null) single = part;
      else {
        parts ??= [single as Uint32Array];
        parts.push(part);
      }
      total += found;
    }
    word = next;
  }
  let all = parts ? concat(parts, total) : (single ?? new Uint32Array(0));
  // Bits past the limit can only be set by a foreign writer of the raw words; drop them.
  let end = all.length;
  while (end > 0 && (all[end - 1] as number) >= limit) end--;
  if (end < all.length) all = all.subarray(0, end);
  return all;
}

function concat(parts: Uint32Array[], total: number): Uint32Array {
  const out = new Uint32Array(total);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
