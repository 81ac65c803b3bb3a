/**
 * Pages of one region as a bitmap: one bit per page, LSB first in each byte, the layout the
 * stream's bitmaps use (POSTCOPY_ADVISE, RECEIVED, PAGE_CRCS), so `bytes` goes on the wire as is.
 * The one page-bitmap helper of the migration code (it replaced copies in five files).
 */

/** The migration page size: every page number in the stream counts 4 KiB pages. */
export const PAGE = 4096;

export class PageSet {
  /** The bitmap itself (ceil(pages / 8) bytes); shared, not copied, by `wrap`. */
  readonly bytes: Uint8Array;

  /** An empty set over `pages` pages, or (`bytes`) one viewing an existing bitmap, see `wrap`. */
  constructor(
    readonly pages: number,
    bytes?: Uint8Array,
  ) {
    if (!Number.isInteger(pages) || pages < 0) throw new RangeError(`page count ${pages}`);
    const len = Math.ceil(pages / 8);
    if (bytes && bytes.length !== len) throw new RangeError(`bitmap of ${bytes.length} bytes for ${pages} pages`);
    this.bytes = bytes ?? new Uint8Array(len);
  }

  /** A set over `pages` pages viewing `bytes` (a decoded bitmap); the length must match. */
  static wrap(bytes: Uint8Array, pages: number): PageSet {
    return new PageSet(pages, bytes);
  }

  /** A set over `total` pages holding the first `count` numbers of `list` (default: all). */
  static of(list: ArrayLike<number>, total: number, count = list.length): PageSet {
    const s = new PageSet(total);
    for (let k = 0; k < count; k++) s.set(list[k] as number);
    return s;
  }

  #check(p: number): void {
    if (!(p >= 0 && p < this.pages && Number.isInteger(p)))
      throw new RangeError(`page ${p} outside a set of ${this.pages}`);
  }

  has(p: number): boolean {
    this.#check(p);
    return (((this.bytes[p >>> 3] as number) >>> (p & 7)) & 1) === 1;
  }

  set(p: number): void {
    this.#check(p);
    this.bytes[p >>> 3] = (this.bytes[p >>> 3] as number) | (1 << (p & 7));
  }

  clear(p: number): void {
    this.#check(p);
    this.bytes[p >>> 3] = (this.bytes[p >>> 3] as number) & ~(1 << (p & 7));
  }

  /** Adds every page of `other` (same size). */
  addAll(other: PageSet): void {
    if (other.pages !== this.pages) throw new RangeError(`a set of ${other.pages} pages into one of ${this.pages}`);
    for (let i = 0; i < this.bytes.length; i++) this.bytes[i] = (this.bytes[i] as number) | (other.bytes[i] as number);
  }

  /** How many pages are in the set. */
  count(): number {
    let n = 0;
    for (let i = 0; i < this.bytes.length; i++) {
      let v = this.bytes[i] as number;
      while (v) {
        v &= v - 1;
        n++;
      }
    }
    return n;
  }

  /** The pages in the set, ascending. */
  *[Symbol.iterator](): IterableIterator<number> {
    for (let i = 0; i < this.bytes.length; i++) {
      let v = this.bytes[i] as number;
      while (v) {
        const b = 31 - Math.clz32(v & -v);
        yield i * 8 + b;
        v &= v - 1;
      }
    }
  }
}

/**
 * A PageSet over a SharedArrayBuffer that another thread updates at the same time (the native
 * postcopy fault thread): set, clear and addAll are atomic per byte, so neither side's bits are
 * lost to the other's read-modify-write.
 */
export class SharedPageSet extends PageSet {
  constructor(pages: number) {
    super(pages, new Uint8Array(new SharedArrayBuffer(Math.max(1, Math.ceil(pages / 8))), 0, Math.ceil(pages / 8)));
  }

  #checkShared(p: number): void {
    if (!(p >= 0 && p < this.pages && Number.isInteger(p)))
      throw new RangeError(`page ${p} outside a set of ${this.pages}`);
  }

  override set(p: number): void {
    this.#checkShared(p);
    Atomics.or(this.bytes, p >>> 3, 1 << (p & 7));
  }

  override clear(p: number): void {
    this.#checkShared(p);
    Atomics.and(this.bytes, p >>> 3, ~(1 << (p & 7)) & 0xff);
  }

  override addAll(other: PageSet): void {
    if (other.pages !== this.pages) throw new RangeError(`a set of ${other.pages} pages into one of ${this.pages}`);
    for (let i = 0; i < this.bytes.length; i++) if (other.bytes[i]) Atomics.or(this.bytes, i, other.bytes[i] as number);
  }
}
