import { GuestMemoryError } from "./errors.js";
import { type GpaLike, hex, toGpa, toLength } from "./guest-address.js";
import { GuestMemoryRegion, type SharedRegion } from "./region.js";

export interface SharedGuestMemory {
  regions: SharedRegion[];
}

/**
 * The guest-physical address space: non-overlapping regions, sorted by address. Every access
 * is bounds-checked; one that is not entirely backed by guest memory is a GuestMemoryError
 * naming the address and length, and nothing is read or written. Reads, writes and copies may
 * cross region (and window) boundaries.
 */
export class GuestMemory implements Disposable {
  readonly regions: readonly GuestMemoryRegion[];
  #last: GuestMemoryRegion | undefined;

  constructor(regions: readonly GuestMemoryRegion[]) {
    const sorted = [...regions].sort((a, b) => a.guestBase - b.guestBase);
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1] as GuestMemoryRegion;
      const cur = sorted[i] as GuestMemoryRegion;
      if (cur.guestBase < prev.end) {
        throw new GuestMemoryError(
          "OVERLAP",
          `region [${hex(cur.guestBase)}, ${hex(cur.end)}) overlaps [${hex(prev.guestBase)}, ${hex(prev.end)})`,
          BigInt(cur.guestBase),
          BigInt(cur.size),
        );
      }
    }
    this.regions = sorted;
  }

  static fromShared(s: SharedGuestMemory): GuestMemory {
    return new GuestMemory(s.regions.map((r) => GuestMemoryRegion.fromShared(r)));
  }

  /** For posting to a worker: the same pages, no ownership, no copy. */
  toShared(): SharedGuestMemory {
    return { regions: this.regions.map((r) => r.toShared()) };
  }

  /** Total bytes of guest memory. */
  get size(): number {
    let n = 0;
    for (const r of this.regions) n += r.size;
    return n;
  }

  /** The region containing `gpa`, or undefined. */
  findRegion(gpa: number): GuestMemoryRegion | undefined {
    const last = this.#last;
    if (last && gpa >= last.guestBase && gpa < last.guestBase + last.size) return last;
    const rs = this.regions;
    let lo = 0;
    let hi = rs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = rs[mid] as GuestMemoryRegion;
      if (gpa < r.guestBase) hi = mid - 1;
      else if (gpa >= r.guestBase + r.size) lo = mid + 1;
      else {
        this.#last = r;
        return r;
      }
    }
    return undefined;
  }

  /** True when every byte of [gpa, gpa+len) is guest memory. */
  isValidRange(gpa: GpaLike, len: number | bigint): boolean {
    try {
      this.checkRange(gpa, len);
      return true;
    } catch (e) {
      if (e instanceof GuestMemoryError) return false;
      throw e;
    }
  }

  /** Throws GuestMemoryError unless every byte of [gpa, gpa+len) is guest memory. */
  checkRange(gpa: GpaLike, len: number | bigint): void {
    const a = toGpa(gpa);
    const n = toLength(len, typeof gpa === "bigint" ? gpa : a);
    if (n === 0) return;
    let pos = a;
    const end = a + n;
    if (!Number.isSafeInteger(end)) throw this.#outOfRange(gpa, len);
    while (pos < end) {
      const r = this.findRegion(pos);
      if (!r) throw this.#outOfRange(gpa, len);
      pos = r.end;
    }
  }

  #outOfRange(gpa: GpaLike, len: number | bigint): GuestMemoryError {
    const a = typeof gpa === "bigint" ? gpa : BigInt(toGpa(gpa));
    return new GuestMemoryError("OUT_OF_RANGE", `[${hex(a)}, +${len}) is not guest memory`, a, BigInt(len));
  }

  /**
   * A zero-copy view of [gpa, gpa+len) when it lies inside one region and one window, else
   * null (then use read/write). Throws when the range is not guest memory.
   */
  slice(gpa: GpaLike, len: number): Uint8Array | null {
    const a = toGpa(gpa);
    const r = this.findRegion(a);
    if (!r || len < 0 || a + len > r.end) {
      this.checkRange(a, len);
      return null;
    }
    return r.bytes(a - r.guestBase, len);
  }

  read(gpa: GpaLike, into: Uint8Array): Uint8Array;
  read(gpa: GpaLike, len: number): Uint8Array;
  read(gpa: GpaLike, arg: Uint8Array | number): Uint8Array {
    const a = toGpa(gpa);
    const into = typeof arg === "number" ? new Uint8Array(toLength(arg, a)) : arg;
    this.checkRange(a, into.length);
    let done = 0;
    while (done < into.length) {
      const r = this.findRegion(a + done) as GuestMemoryRegion;
      const off = a + done - r.guestBase;
      const n = Math.min(into.length - done, r.size - off);
      r.readInto(off, into.subarray(done, done + n));
      done += n;
    }
    return into;
  }

  write(gpa: GpaLike, data: Uint8Array): void {
    const a = toGpa(gpa);
    this.checkRange(a, data.length);
    this.#checkWritable(a, data.length);
    let done = 0;
    while (done < data.length) {
      const r = this.findRegion(a + done) as GuestMemoryRegion;
      const off = a + done - r.guestBase;
      const n = Math.min(data.length - done, r.size - off);
      r.writeFrom(off, data.subarray(done, done + n));
      done += n;
    }
  }

  fill(gpa: GpaLike, len: number, value = 0): void {
    const a = toGpa(gpa);
    this.checkRange(a, len);
    this.#checkWritable(a, len);
    let done = 0;
    while (done < len) {
      const r = this.findRegion(a + done) as GuestMemoryRegion;
      const off = a + done - r.guestBase;
      const n = Math.min(len - done, r.size - off);
      r.fill(off, n, value);
      done += n;
    }
  }

  /** Copies len bytes from src to dst inside guest memory (overlap-safe). */
  copy(dst: GpaLike, src: GpaLike, len: number): void {
    const d = toGpa(dst);
    const s = toGpa(src);
    this.checkRange(s, len);
    this.checkRange(d, len);
    this.write(d, this.read(s, len));
  }

  #checkWritable(a: number, len: number): void {
    let pos = a;
    while (pos < a + len) {
      const r = this.findRegion(pos) as GuestMemoryRegion;
      if (r.readonly) {
        throw new GuestMemoryError(
          "OUT_OF_RANGE",
          `[${hex(a)}, +${len}) touches read-only region at ${hex(r.guestBase)}`,
          BigInt(a),
          BigInt(len),
        );
      }
      pos = r.end;
    }
  }

  // Scalars (little-endian, as virtio and x86 use). The fast path is one DataView access; a
  // scalar that straddles a region or window boundary takes the general, checked path.
  #fast(gpa: number, size: number): [DataView, number, GuestMemoryRegion, number] | null {
    const r = this.findRegion(gpa);
    if (!r || gpa + size > r.end) return null;
    const off = gpa - r.guestBase;
    const [dv, o] = r.dataView(off);
    if (o + size > dv.byteLength) return null;
    return [dv, o, r, off];
  }

  readU8(gpa: GpaLike): number {
    const a = toGpa(gpa);
    const f = this.#fast(a, 1);
    return f ? f[0].getUint8(f[1]) : (this.read(a, 1)[0] as number);
  }

  readU16(gpa: GpaLike): number {
    const a = toGpa(gpa);
    const f = this.#fast(a, 2);
    return f ? f[0].getUint16(f[1], true) : new DataView(this.read(a, 2).buffer).getUint16(0, true);
  }

  readU32(gpa: GpaLike): number {
    const a = toGpa(gpa);
    const f = this.#fast(a, 4);
    return f ? f[0].getUint32(f[1], true) : new DataView(this.read(a, 4).buffer).getUint32(0, true);
  }

  readU64(gpa: GpaLike): bigint {
    const a = toGpa(gpa);
    const f = this.#fast(a, 8);
    return f ? f[0].getBigUint64(f[1], true) : new DataView(this.read(a, 8).buffer).getBigUint64(0, true);
  }

  writeU8(gpa: GpaLike, v: number): void {
    this.write(gpa, Uint8Array.of(v));
  }

  writeU16(gpa: GpaLike, v: number): void {
    const a = toGpa(gpa);
    const f = this.#fast(a, 2);
    if (f && !f[2].readonly) {
      f[0].setUint16(f[1], v, true);
      f[2].dirty?.markRange(f[3], 2);
      return;
    }
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, v, true);
    this.write(a, b);
  }

  writeU32(gpa: GpaLike, v: number): void {
    const a = toGpa(gpa);
    const f = this.#fast(a, 4);
    if (f && !f[2].readonly) {
      f[0].setUint32(f[1], v, true);
      f[2].dirty?.markRange(f[3], 4);
      return;
    }
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v, true);
    this.write(a, b);
  }

  writeU64(gpa: GpaLike, v: bigint): void {
    const a = toGpa(gpa);
    const f = this.#fast(a, 8);
    if (f && !f[2].readonly) {
      f[0].setBigUint64(f[1], v, true);
      f[2].dirty?.markRange(f[3], 8);
      return;
    }
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, v, true);
    this.write(a, b);
  }

  #scalar(gpa: number, size: number): [GuestMemoryRegion, number] {
    const r = this.findRegion(gpa);
    if (!r || gpa + size > r.end) throw this.#outOfRange(gpa, size);
    return [r, gpa - r.guestBase];
  }

  /**
   * Atomic (sequentially consistent) 16-bit load/store, for ring indices that a peer in
   * another thread or process reads: the store publishes every write made before it.
   * The address must be 2-byte aligned.
   */
  atomicLoadU16(gpa: GpaLike): number {
    const a = toGpa(gpa);
    if (a & 1) throw new GuestMemoryError("OUT_OF_RANGE", `unaligned 16-bit atomic at ${hex(a)}`, BigInt(a), 2n);
    const [r, off] = this.#scalar(a, 2);
    const [u16, i] = r.u16(off);
    return Atomics.load(u16, i);
  }

  atomicStoreU16(gpa: GpaLike, v: number): void {
    const a = toGpa(gpa);
    if (a & 1) throw new GuestMemoryError("OUT_OF_RANGE", `unaligned 16-bit atomic at ${hex(a)}`, BigInt(a), 2n);
    const [r, off] = this.#scalar(a, 2);
    if (r.readonly) this.#checkWritable(a, 2);
    const [u16, i] = r.u16(off);
    Atomics.store(u16, i, v);
    r.dirty?.markRange(off, 2);
  }

  /** Closes every region (their mappings and fds). */
  close(): void {
    for (const r of this.regions) r.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
