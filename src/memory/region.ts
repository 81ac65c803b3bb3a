import { copyBytes } from "../sys/bulk.js";
import type { Fd } from "../sys/fd.js";
import { Mapping, WINDOW_SHIFT, WINDOW_SIZE } from "../sys/mapping.js";
import { createMemfd, fileSize, O_CREAT, O_RDONLY, O_RDWR, openFile, truncate } from "../sys/memfd.js";
import { AtomicBitmap, type SharedBitmap } from "./atomic-bitmap.js";
import { GuestMemoryError } from "./errors.js";
import { hex, toGpa } from "./guest-address.js";

export type BackingKind = "memfd" | "file" | "hugetlbfs" | "anonymous" | "external";

/** What another process needs to map the same memory: the fd and the offset into it. */
export interface RegionBacking {
  kind: BackingKind;
  /** null for anonymous memory (not shareable) and for regions opened in a worker. */
  fd: Fd | null;
  /** Offset of the region's first byte in the fd (need not be page aligned: see `start`). */
  offset: number;
  path?: string;
}

/** A region as posted to a worker thread: the same pages, no ownership. */
export interface SharedRegion {
  guestBase: number;
  size: number;
  pageSize: number;
  windows: readonly SharedArrayBuffer[];
  /** Offset of the region's first byte in windows[0] (0 unless mapped from an unaligned offset). */
  start?: number;
  readonly: boolean;
  dirty: SharedBitmap | null;
}

/** mmap(2) offsets are multiples of the system page. */
const MAP_PAGE = 4096;
/**
 * A region may start inside its first mapped page (a vhost-user front-end may send an
 * mmap_offset that is not page aligned), but only at a multiple of 8: the 16- and 32-bit
 * atomic views used for ring indices index their window in elements, so a guest-aligned
 * address must stay aligned in the window.
 */
export const REGION_START_ALIGN = 8;

export interface RegionOptions {
  /** Tracking granularity and the page size of the backing (huge pages for hugetlbfs). */
  pageSize?: number;
  /** Writes through GuestMemory never reach this region (a read-only ROM or image). */
  readonly?: boolean;
}

/**
 * One contiguous range of guest-physical memory, mapped once into this process. Owns its
 * mapping and fd (close() releases both) unless it was opened from a SharedRegion.
 */
export class GuestMemoryRegion implements Disposable {
  readonly guestBase: number;
  readonly size: number;
  readonly pageSize: number;
  readonly backing: RegionBacking;
  readonly readonly: boolean;
  /**
   * The mapping's windows. The region's byte `o` is at position `start + o` of the mapping
   * (windows[0] begins on a page boundary; `start` is the sub-page offset of the region).
   */
  readonly windows: readonly SharedArrayBuffer[];
  /** Offset of the region's first byte in its mapping (0 unless mapped from an unaligned fd offset). */
  readonly start: number;
  /** Set by enableDirtyTracking(): every write through GuestMemory marks it. */
  dirty: AtomicBitmap | null = null;
  readonly #mapping: Mapping | null;
  readonly #u8: Uint8Array[];
  readonly #dv: DataView[];
  readonly #u16: Uint16Array[];
  readonly #u32: Uint32Array[];
  #closed = false;

  private constructor(
    guestBase: number,
    size: number,
    backing: RegionBacking,
    windows: readonly SharedArrayBuffer[],
    mapping: Mapping | null,
    options: RegionOptions,
    start = 0,
  ) {
    this.guestBase = guestBase;
    this.size = size;
    this.backing = backing;
    this.windows = windows;
    this.start = start;
    this.#mapping = mapping;
    this.pageSize = options.pageSize ?? 4096;
    this.readonly = options.readonly ?? false;
    this.#u8 = windows.map((w) => new Uint8Array(w));
    this.#dv = windows.map((w) => new DataView(w));
    this.#u16 = windows.map((w) => new Uint16Array(w, 0, w.byteLength >>> 1));
    this.#u32 = windows.map((w) => new Uint32Array(w, 0, w.byteLength >>> 2));
  }

  static #checkLayout(guestBase: number, size: number, pageSize: number): void {
    if (!Number.isSafeInteger(size) || size <= 0 || size % pageSize !== 0) {
      throw new GuestMemoryError(
        "BAD_REGION",
        `region size ${size} is not a positive multiple of the page size ${pageSize}`,
      );
    }
    if (guestBase % pageSize !== 0 || !Number.isSafeInteger(guestBase + size)) {
      throw new GuestMemoryError(
        "BAD_REGION",
        `region base ${hex(guestBase)} is not page aligned or the region ends past 2^53`,
        BigInt(guestBase),
      );
    }
  }

  /**
   * Maps `size` bytes of `fd` at `offset`; takes ownership of `fd`. An `offset` that is not
   * page aligned (it must be a multiple of REGION_START_ALIGN) is mapped from the page below,
   * and the region starts `offset % 4096` bytes into the mapping. The mapping's last page may
   * run past the end of the file: only the pages the region's bytes lie in are ever touched,
   * and each of those holds at least one byte of the file, so none of them faults with SIGBUS.
   */
  static fromFd(
    fd: Fd,
    guestBase: number | bigint,
    size: number,
    offset = 0,
    kind: BackingKind = "external",
    options: RegionOptions & { path?: string; private?: boolean } = {},
  ): GuestMemoryRegion {
    const base = toGpa(guestBase);
    try {
      GuestMemoryRegion.#checkLayout(base, size, options.pageSize ?? 4096);
      if (!Number.isSafeInteger(offset) || offset < 0 || offset % REGION_START_ALIGN !== 0) {
        throw new GuestMemoryError(
          "BAD_REGION",
          `region offset ${offset} in its file is not a multiple of ${REGION_START_ALIGN}`,
          BigInt(offset),
        );
      }
      const start = offset % MAP_PAGE;
      const length = Math.ceil((start + size) / MAP_PAGE) * MAP_PAGE;
      const mapping = Mapping.map(fd, length, { offset: offset - start, private: options.private ?? false });
      const backing: RegionBacking = { kind, fd, offset, ...(options.path ? { path: options.path } : {}) };
      return new GuestMemoryRegion(base, size, backing, mapping.windows, mapping, options, start);
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  /**
   * Memory backed by a new memfd (shareable with other processes by fd). Its size is sealed
   * (sealSize): a process we hand the fd to cannot shrink it under our mapping.
   */
  static memfd(
    guestBase: number | bigint,
    size: number,
    options: RegionOptions & { name?: string } = {},
  ): GuestMemoryRegion {
    const fd = createMemfd(options.name ?? "vmshift-guest", size, { sealSize: true });
    return GuestMemoryRegion.fromFd(fd, guestBase, size, 0, "memfd", options);
  }

  /**
   * Memory backed by a file (created owner-only, 0600, and sized if missing). Read-only
   * regions are mapped private, so nothing written in this process can ever reach the file.
   */
  static file(
    path: string,
    guestBase: number | bigint,
    size: number,
    options: RegionOptions & { offset?: number } = {},
  ): GuestMemoryRegion {
    const fd = openFile(path, options.readonly ? O_RDONLY : O_RDWR | O_CREAT, 0o600);
    const offset = options.offset ?? 0;
    try {
      if (!options.readonly && fileSize(fd) < offset + size) truncate(fd, offset + size);
    } catch (e) {
      fd.close();
      throw e;
    }
    return GuestMemoryRegion.fromFd(fd, guestBase, size, offset, "file", {
      ...options,
      path,
      private: options.readonly ?? false,
    });
  }

  /** Memory backed by a file on a hugetlbfs mount; `pageSize` is the mount's huge page size. */
  static hugetlbfs(
    path: string,
    guestBase: number | bigint,
    size: number,
    pageSize = 2 * 1024 * 1024,
  ): GuestMemoryRegion {
    // Checked before the file is sized: hugetlbfs refuses a size that is not whole huge pages
    // with a bare EINVAL.
    GuestMemoryRegion.#checkLayout(toGpa(guestBase), size, pageSize);
    const fd = openFile(path, O_RDWR | O_CREAT, 0o600);
    try {
      truncate(fd, size);
    } catch (e) {
      fd.close();
      throw e;
    }
    return GuestMemoryRegion.fromFd(fd, guestBase, size, 0, "hugetlbfs", { pageSize, path });
  }

  /** Private anonymous memory: fast, but no other process can map it. */
  static anonymous(guestBase: number | bigint, size: number, options: RegionOptions = {}): GuestMemoryRegion {
    const base = toGpa(guestBase);
    GuestMemoryRegion.#checkLayout(base, size, options.pageSize ?? 4096);
    const mapping = Mapping.anonymous(size, { noreserve: true });
    return new GuestMemoryRegion(
      base,
      size,
      { kind: "anonymous", fd: null, offset: 0 },
      mapping.windows,
      mapping,
      options,
    );
  }

  /** Opens a region posted from another thread: same pages, not owned here. */
  static fromShared(s: SharedRegion): GuestMemoryRegion {
    const r = new GuestMemoryRegion(
      s.guestBase,
      s.size,
      { kind: "external", fd: null, offset: 0 },
      s.windows,
      null,
      { pageSize: s.pageSize, readonly: s.readonly },
      s.start ?? 0,
    );
    if (s.dirty) r.dirty = AtomicBitmap.fromShared(s.dirty);
    return r;
  }

  toShared(): SharedRegion {
    return {
      guestBase: this.guestBase,
      size: this.size,
      pageSize: this.pageSize,
      windows: this.windows,
      ...(this.start ? { start: this.start } : {}),
      readonly: this.readonly,
      dirty: this.dirty ? this.dirty.toShared() : null,
    };
  }

  get end(): number {
    return this.guestBase + this.size;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** The owning Mapping (null for a region opened from a SharedRegion). */
  get mapping(): Mapping | null {
    return this.#mapping;
  }

  /** Host virtual address of the region's first byte in this process. */
  get hostAddress(): bigint {
    if (!this.#mapping) throw new GuestMemoryError("BAD_REGION", "a shared region view has no owned mapping");
    return this.#mapping.address + BigInt(this.start);
  }

  contains(gpa: number): boolean {
    return gpa >= this.guestBase && gpa < this.guestBase + this.size;
  }

  enableDirtyTracking(pageSize = 4096): AtomicBitmap {
    this.dirty ??= new AtomicBitmap(this.size, pageSize);
    return this.dirty;
  }

  /** A view of [offset, offset+length) of the region when it lies in one window, else null. */
  bytes(offset: number, length: number): Uint8Array | null {
    const pos = offset + this.start;
    const w = pos >>> 0 === pos ? pos >>> WINDOW_SHIFT : Math.floor(pos / WINDOW_SIZE);
    const off = pos - w * WINDOW_SIZE;
    if (off + length > WINDOW_SIZE) return null;
    const u8 = this.#u8[w];
    if (!u8) return null;
    return u8.subarray(off, off + length);
  }

  /** Copies bytes out of the region; the caller has bounds-checked. */
  readInto(offset: number, into: Uint8Array): void {
    let done = 0;
    while (done < into.length) {
      const pos = this.start + offset + done;
      const w = Math.floor(pos / WINDOW_SIZE);
      const off = pos - w * WINDOW_SIZE;
      const n = Math.min(into.length - done, WINDOW_SIZE - off);
      copyBytes(into, (this.#u8[w] as Uint8Array).subarray(off, off + n), done);
      done += n;
    }
  }

  /** Copies bytes into the region and marks them dirty; the caller has bounds-checked. */
  writeFrom(offset: number, data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      const pos = this.start + offset + done;
      const w = Math.floor(pos / WINDOW_SIZE);
      const off = pos - w * WINDOW_SIZE;
      const n = Math.min(data.length - done, WINDOW_SIZE - off);
      copyBytes(this.#u8[w] as Uint8Array, data.subarray(done, done + n), off);
      done += n;
    }
    this.dirty?.markRange(offset, data.length);
  }

  fill(offset: number, length: number, value: number): void {
    let done = 0;
    while (done < length) {
      const pos = this.start + offset + done;
      const w = Math.floor(pos / WINDOW_SIZE);
      const off = pos - w * WINDOW_SIZE;
      const n = Math.min(length - done, WINDOW_SIZE - off);
      (this.#u8[w] as Uint8Array).fill(value, off, off + n);
      done += n;
    }
    this.dirty?.markRange(offset, length);
  }

  /** DataView of the window holding `offset`, and the offset inside it (for scalar access). */
  dataView(offset: number): [DataView, number] {
    const pos = offset + this.start;
    const w = Math.floor(pos / WINDOW_SIZE);
    return [this.#dv[w] as DataView, pos - w * WINDOW_SIZE];
  }

  /** Aligned 16/32-bit atomic views (for ring indices shared with another process). */
  u16(offset: number): [Uint16Array, number] {
    const pos = offset + this.start;
    const w = Math.floor(pos / WINDOW_SIZE);
    return [this.#u16[w] as Uint16Array, (pos - w * WINDOW_SIZE) >>> 1];
  }

  u32(offset: number): [Uint32Array, number] {
    const pos = offset + this.start;
    const w = Math.floor(pos / WINDOW_SIZE);
    return [this.#u32[w] as Uint32Array, (pos - w * WINDOW_SIZE) >>> 2];
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#mapping?.close();
    this.backing.fd?.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
