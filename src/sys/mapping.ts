import { copyBytes } from "./bulk.js";
import { sys } from "./errors.js";
import type { Fd } from "./fd.js";
import { native } from "./native.js";

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_POPULATE = 0x8000;
export const MAP_HUGETLB = 0x40000;

export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;
export const MADV_POPULATE_WRITE = 23;

/** Largest window a single typed array covers; a power of two so window math is shifts. */
export const WINDOW_SHIFT = 30;
export const WINDOW_SIZE = 2 ** WINDOW_SHIFT;

export interface MapOptions {
  /** Byte offset into the file (page aligned). */
  offset?: number | bigint;
  /** MAP_PRIVATE instead of MAP_SHARED: writes stay in this process (copy-on-write). */
  private?: boolean;
  populate?: boolean;
  hugetlb?: boolean;
  noreserve?: boolean;
}

/**
 * An mmap()ed range, readable and writable from JS as SharedArrayBuffers ("windows" of at
 * most 1 GiB each, because typed arrays stop at 4 GiB), with no copy. The windows can be
 * posted to worker threads, which then share the very same pages.
 *
 * Lifetime rule (see docs/native.md): close() releases the file or memfd pages at once by
 * overlaying the range with private anonymous memory. No JS access can ever reach an unmapped
 * page or another mapping: a view that outlived close() reads zeros and writes to scratch, and
 * the address range itself is munmapped only after the garbage collector has dropped the last
 * view in every thread.
 */
export class Mapping implements Disposable {
  readonly windows: readonly SharedArrayBuffer[];
  readonly length: number;
  #closed = false;
  #address: bigint | undefined;

  private constructor(windows: SharedArrayBuffer[], length: number) {
    this.windows = windows;
    this.length = length;
  }

  /** Maps `length` bytes of `fd` (shared unless `private`). Always readable and writable. */
  static map(fd: Fd | null, length: number, options: MapOptions = {}): Mapping {
    if (!Number.isSafeInteger(length) || length <= 0) throw new RangeError(`bad mapping length ${length}`);
    let flags = options.private || fd === null ? MAP_PRIVATE : MAP_SHARED;
    if (fd === null) flags |= MAP_ANONYMOUS;
    if (options.populate) flags |= MAP_POPULATE;
    if (options.hugetlb) flags |= MAP_HUGETLB;
    if (options.noreserve) flags |= MAP_NORESERVE;
    const offset = options.offset ?? 0;
    const windows = sys(
      () => native.mmap(fd ? fd.fd : -1, length, offset, PROT_READ | PROT_WRITE, flags, WINDOW_SIZE),
      `length ${length}, offset ${offset}`,
    );
    return new Mapping(windows, length);
  }

  static anonymous(length: number, options: Omit<MapOptions, "offset" | "private"> = {}): Mapping {
    return Mapping.map(null, length, options);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Host virtual address of the first byte (for KVM memslots, uffd ranges, vhost-user replies). */
  get address(): bigint {
    this.#assertOpen();
    if (this.#address === undefined) this.#address = native.addressOf(this.windows[0] as SharedArrayBuffer);
    return this.#address;
  }

  /**
   * A Uint8Array over [offset, offset+length) when it lies inside one window; otherwise null
   * (callers then go through read/write, which cross windows).
   */
  bytes(offset: number, length: number): Uint8Array | null {
    this.#assertRange(offset, length);
    const w = Math.floor(offset / WINDOW_SIZE);
    const off = offset - w * WINDOW_SIZE;
    if (off + length > WINDOW_SIZE) return null;
    return new Uint8Array(this.windows[w] as SharedArrayBuffer, off, length);
  }

  read(offset: number, into: Uint8Array): void {
    this.#assertRange(offset, into.length);
    let done = 0;
    while (done < into.length) {
      const pos = offset + done;
      const w = Math.floor(pos / WINDOW_SIZE);
      const off = pos - w * WINDOW_SIZE;
      const n = Math.min(into.length - done, WINDOW_SIZE - off);
      copyBytes(into, new Uint8Array(this.windows[w] as SharedArrayBuffer, off, n), done);
      done += n;
    }
  }

  write(offset: number, data: Uint8Array): void {
    this.#assertRange(offset, data.length);
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const w = Math.floor(pos / WINDOW_SIZE);
      const off = pos - w * WINDOW_SIZE;
      const n = Math.min(data.length - done, WINDOW_SIZE - off);
      copyBytes(new Uint8Array(this.windows[w] as SharedArrayBuffer, off, n), data.subarray(done, done + n));
      done += n;
    }
  }

  /** madvise over a page-aligned sub-range. */
  advise(offset: number, length: number, advice: number): void {
    this.#forEachWindow(offset, length, (sab, off, n) =>
      sys(() => native.madvise(new Uint8Array(sab, off, n), advice), `advice ${advice}`),
    );
  }

  /** One byte per page, bit 0 set when the page is resident (mincore). */
  residency(offset: number, length: number): Uint8Array {
    const pages = Math.ceil(length / 4096);
    const out = new Uint8Array(pages);
    let page = 0;
    this.#forEachWindow(offset, length, (sab, off, n) => {
      const part = new Uint8Array(out.buffer, page, Math.ceil(n / 4096));
      sys(() => native.mincore(new Uint8Array(sab, off, n), part));
      page += part.length;
    });
    return out;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    native.retire(this.windows[0] as SharedArrayBuffer);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #forEachWindow(offset: number, length: number, fn: (sab: SharedArrayBuffer, off: number, n: number) => void): void {
    this.#assertRange(offset, length);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const w = Math.floor(pos / WINDOW_SIZE);
      const off = pos - w * WINDOW_SIZE;
      const n = Math.min(length - done, WINDOW_SIZE - off);
      fn(this.windows[w] as SharedArrayBuffer, off, n);
      done += n;
    }
  }

  #assertOpen(): void {
    if (this.#closed) throw new Error("mapping used after close");
  }

  #assertRange(offset: number, length: number): void {
    this.#assertOpen();
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0 ||
      offset + length > this.length
    ) {
      throw new RangeError(`range [${offset}, +${length}) outside mapping of ${this.length} bytes`);
    }
  }
}

/** Number of mappings the addon still holds (munmapped once V8 drops every window). */
export function liveMappings(): number {
  return native.liveMappings();
}

/** Host virtual address of a view's first byte (for structs that carry a user pointer: KVM, uffd). */
export function addressOf(view: ArrayBufferView | ArrayBuffer | SharedArrayBuffer): bigint {
  return native.addressOf(view);
}
