import type { AtomicBitmap } from "./atomic-bitmap.js";
import { GuestMemoryError } from "./errors.js";

export interface DiscardListener {
  /** Blocks [offset, offset+length) became plugged: their memory may now be populated. */
  onPopulate?(offset: number, length: number): void;
  /** Blocks [offset, offset+length) were discarded: their content is gone and must not be sent. */
  onDiscard?(offset: number, length: number): void;
}

export interface SharedDiscardMap {
  buffer: SharedArrayBuffer;
  size: number;
  blockSize: number;
}

/**
 * Which blocks of a region are plugged (backed, guest-visible) and which are discarded
 * (unplugged, with no content), the way virtio-mem and QEMU's RamDiscardManager see a region.
 * A discarded block is never sent, never populated, and a postcopy fault on it gets a zero page.
 * State lives in a SharedArrayBuffer (one byte per block) so other threads can test it.
 */
export class DiscardMap {
  readonly size: number;
  readonly blockSize: number;
  readonly blocks: number;
  readonly #state: Uint8Array; // 1 = plugged
  readonly #buffer: SharedArrayBuffer;
  readonly #listeners = new Set<DiscardListener>();

  constructor(size: number, blockSize = 2 * 1024 * 1024, initiallyPlugged = true, buffer?: SharedArrayBuffer) {
    if (blockSize <= 0 || (blockSize & (blockSize - 1)) !== 0)
      throw new RangeError(`block size ${blockSize} is not a power of two`);
    if (size % blockSize !== 0)
      throw new RangeError(`region size ${size} is not a multiple of the block size ${blockSize}`);
    this.size = size;
    this.blockSize = blockSize;
    this.blocks = size / blockSize;
    this.#buffer = buffer ?? new SharedArrayBuffer(this.blocks);
    this.#state = new Uint8Array(this.#buffer, 0, this.blocks);
    if (!buffer && initiallyPlugged) this.#state.fill(1);
  }

  static fromShared(s: SharedDiscardMap): DiscardMap {
    return new DiscardMap(s.size, s.blockSize, false, s.buffer);
  }

  toShared(): SharedDiscardMap {
    return { buffer: this.#buffer, size: this.size, blockSize: this.blockSize };
  }

  subscribe(listener: DiscardListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  isDiscarded(offset: number): boolean {
    const b = Math.floor(offset / this.blockSize);
    return b >= 0 && b < this.blocks && this.#state[b] === 0;
  }

  isPlugged(offset: number): boolean {
    const b = Math.floor(offset / this.blockSize);
    return b >= 0 && b < this.blocks && this.#state[b] === 1;
  }

  /** Plugs the blocks of [offset, offset+length) (must be block aligned). */
  populate(offset: number, length: number): void {
    this.#set(offset, length, 1);
  }

  /** Discards the blocks of [offset, offset+length) (must be block aligned). */
  discard(offset: number, length: number): void {
    this.#set(offset, length, 0);
  }

  #set(offset: number, length: number, value: 0 | 1): void {
    if (offset % this.blockSize !== 0 || length % this.blockSize !== 0 || offset < 0 || offset + length > this.size) {
      throw new GuestMemoryError(
        "BAD_REGION",
        `discard range [${offset}, +${length}) is not block aligned (${this.blockSize}) or outside the region (${this.size})`,
        BigInt(offset),
        BigInt(length),
      );
    }
    // Report maximal runs that actually changed, in order.
    let runStart = -1;
    const flush = (end: number) => {
      if (runStart < 0) return;
      const off = runStart * this.blockSize;
      const len = (end - runStart) * this.blockSize;
      for (const l of this.#listeners) (value ? l.onPopulate : l.onDiscard)?.call(l, off, len);
      runStart = -1;
    };
    const first = offset / this.blockSize;
    const last = first + length / this.blockSize;
    for (let b = first; b < last; b++) {
      if (this.#state[b] === value) {
        flush(b);
        continue;
      }
      this.#state[b] = value;
      if (runStart < 0) runStart = b;
    }
    flush(last);
  }

  /** Maximal runs of blocks in one state, as [offset, length]. */
  *ranges(plugged: boolean): IterableIterator<[number, number]> {
    const want = plugged ? 1 : 0;
    let b = 0;
    while (b < this.blocks) {
      if (this.#state[b] !== want) {
        b++;
        continue;
      }
      const start = b;
      while (b < this.blocks && this.#state[b] === want) b++;
      yield [start * this.blockSize, (b - start) * this.blockSize];
    }
  }

  get pluggedBytes(): number {
    let n = 0;
    for (let b = 0; b < this.blocks; b++) n += this.#state[b] as number;
    return n * this.blockSize;
  }

  /** Pages (of `pageSize`, counted from the region start) that are not inside a discarded block. */
  filterPages(pages: Uint32Array, pageSize: number): Uint32Array {
    const per = this.blockSize / pageSize;
    let o = 0;
    const out = new Uint32Array(pages.length);
    for (let i = 0; i < pages.length; i++) {
      const p = pages[i] as number;
      if (this.#state[Math.floor(p / per)] === 1) out[o++] = p;
    }
    return out.subarray(0, o);
  }

  /** Clears every bit of `bitmap` (tracking this region) that lies in a discarded block. */
  clearDiscarded(bitmap: AtomicBitmap): void {
    for (const [off, len] of this.ranges(false)) {
      const first = off / bitmap.pageSize;
      const n = len / bitmap.pageSize;
      clearBits(bitmap.words, first, n);
    }
  }

  /** The block states as bytes (1 = plugged), for the migration stream. */
  toBytes(): Uint8Array {
    return this.#state.slice();
  }

  /** Applies states received from a peer (listeners are told of every change). */
  applyBytes(states: Uint8Array): void {
    if (states.length !== this.blocks)
      throw new RangeError(`discard map of ${states.length} blocks for a region of ${this.blocks}`);
    for (let b = 0; b < this.blocks; b++) {
      const v = states[b];
      if (v !== 0 && v !== 1) throw new RangeError(`bad block state ${v} at block ${b}`);
      if (v !== this.#state[b]) this.#set(b * this.blockSize, this.blockSize, v);
    }
  }
}

function clearBits(words: Uint32Array, first: number, n: number): void {
  let p = first;
  const end = first + n;
  while (p < end) {
    const w = p >>> 5;
    const bit = p & 31;
    const k = Math.min(32 - bit, end - p);
    const mask = k === 32 ? 0xffffffff : ((1 << k) - 1) << bit;
    Atomics.and(words, w, ~mask);
    p += k;
  }
}
