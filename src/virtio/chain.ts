import type { GuestMemory } from "../memory/guest-memory.js";
import { VIRTQ_DESC_F_WRITE } from "./ring.js";

/** What a chain needs from its queue: the memory, and where to report the bytes it writes. */
export interface ChainOwner {
  readonly memory: GuestMemory;
  /** Reports a device write into guest memory (for the dirty log). */
  markBufferWrite(gpa: number, len: number): void;
}

/** One buffer of a chain, as the driver described it (a copy: the guest cannot change it later). */
export interface Descriptor {
  addr: number;
  len: number;
  /** VIRTQ_DESC_F_* as the driver wrote them (NEXT, WRITE). */
  flags: number;
  writable: boolean;
}

const FIELDS = 3;

/**
 * A descriptor chain popped from the avail ring: its buffers, already validated (every buffer
 * lies inside guest memory, writable ones inside writable memory, readable ones first) and
 * copied out of the descriptor table, so a driver that rewrites the table after making the
 * chain available cannot change what the device acts on. Indirect tables are flattened: the
 * chain lists the buffers of the table, not the descriptor that pointed to it.
 *
 * Buffers [0, readableCount) are device-readable, [readableCount, count) device-writable.
 */
export class DescriptorChain {
  /** Head descriptor index (split) or buffer id (packed): what addUsed() takes back. */
  readonly head: number;
  /** Number of buffers. */
  readonly count: number;
  readonly readableCount: number;
  /** Bytes in the readable part and in the writable part. */
  readonly readableLength: number;
  readonly writableLength: number;
  /** True when (some of) the buffers came from an indirect table. */
  readonly indirect: boolean;
  /**
   * Descriptor-ring slots the chain took (packed rings: the device skips that many when it
   * returns the chain, and addUsed() needs it). Always 1 for a split ring (the head).
   */
  readonly slots: number;
  /** End of the furthest byte written through writeWritable(): the used length to report. */
  written = 0;
  // [addr, len, flags] per buffer; addresses are below 2^53 (checked), so doubles are exact.
  // A plain array, not a typed one: it lives in V8's heap, so a chain costs a young-generation
  // allocation. A Float64Array this size (72 bytes for three buffers) gets a backing store of its
  // own outside the heap: a malloc, a free on another thread and a sweep per request, which was
  // a third of a queue worker's CPU time at queue depth 32.
  readonly #d: readonly number[];
  readonly #owner: ChainOwner;
  /** Writable buffer (counted from the first writable one) where markWritten() last found one. */
  #markCursor = 0;

  /** @internal Built by ChainBuilder (SplitQueue.popChain(), PackedQueue.popChain()). */
  constructor(
    owner: ChainOwner,
    head: number,
    descriptors: readonly number[],
    readableCount: number,
    readableLength: number,
    writableLength: number,
    indirect: boolean,
    slots = 1,
  ) {
    this.#owner = owner;
    this.head = head;
    this.#d = descriptors;
    this.count = descriptors.length / FIELDS;
    this.readableCount = readableCount;
    this.readableLength = readableLength;
    this.writableLength = writableLength;
    this.indirect = indirect;
    this.slots = slots;
  }

  get writableCount(): number {
    return this.count - this.readableCount;
  }

  addr(i: number): number {
    return this.#d[i * FIELDS] ?? Number.NaN;
  }

  len(i: number): number {
    return this.#d[i * FIELDS + 1] ?? 0;
  }

  flags(i: number): number {
    return this.#d[i * FIELDS + 2] ?? 0;
  }

  isWritable(i: number): boolean {
    return (this.flags(i) & VIRTQ_DESC_F_WRITE) !== 0;
  }

  descriptor(i: number): Descriptor {
    if (!(i >= 0 && i < this.count)) throw new RangeError(`descriptor ${i} of a chain of ${this.count}`);
    const flags = this.flags(i);
    return { addr: this.addr(i), len: this.len(i), flags, writable: (flags & VIRTQ_DESC_F_WRITE) !== 0 };
  }

  *[Symbol.iterator](): IterableIterator<Descriptor> {
    for (let i = 0; i < this.count; i++) yield this.descriptor(i);
  }

  *readable(): IterableIterator<Descriptor> {
    for (let i = 0; i < this.readableCount; i++) yield this.descriptor(i);
  }

  *writable(): IterableIterator<Descriptor> {
    for (let i = this.readableCount; i < this.count; i++) yield this.descriptor(i);
  }

  /** The whole readable part, concatenated (a copy). */
  readReadable(): Uint8Array {
    const out = new Uint8Array(this.readableLength);
    this.readReadableInto(out, 0);
    return out;
  }

  /**
   * Copies readable bytes starting `offset` bytes into the readable part into `into`; returns
   * how many were copied (less than into.length when the readable part ends first).
   */
  readReadableInto(into: Uint8Array, offset = 0): number {
    const mem = this.#owner.memory;
    let skip = offset;
    let done = 0;
    for (let i = 0; i < this.readableCount && done < into.length; i++) {
      const len = this.len(i);
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const n = Math.min(len - skip, into.length - done);
      mem.read(this.addr(i) + skip, into.subarray(done, done + n));
      done += n;
      skip = 0;
    }
    return done;
  }

  /**
   * Reports `len` bytes at `gpa` that the device wrote into one of this chain's writable
   * buffers some other way than writeWritable (a pread straight into a guest-memory view), so
   * the dirty log stays exact. The range must lie inside a single writable buffer.
   */
  markWritten(gpa: number, len: number): void {
    // Callers report buffers in order: look where the last one was found first (a request of
    // 126 segments is then 126 lookups, not 126²/2).
    const first = this.readableCount;
    const n = this.count - first;
    for (let k = 0; k < n; k++) {
      const j = (this.#markCursor + k) % n;
      const i = first + j;
      const a = this.addr(i);
      if (gpa >= a && gpa + len <= a + this.len(i)) {
        if (len > 0) this.#owner.markBufferWrite(gpa, len);
        this.#markCursor = j;
        return;
      }
    }
    throw new RangeError(`[0x${gpa.toString(16)}, +${len}) is not inside a writable buffer of chain ${this.head}`);
  }

  /**
   * Writes `data` into the writable part, starting `offset` bytes into it; returns how many
   * bytes fit. Every byte written is reported to the queue's dirty marker, per buffer.
   */
  writeWritable(data: Uint8Array, offset = 0): number {
    const mem = this.#owner.memory;
    let skip = offset;
    let done = 0;
    for (let i = this.readableCount; i < this.count && done < data.length; i++) {
      const len = this.len(i);
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const n = Math.min(len - skip, data.length - done);
      const gpa = this.addr(i) + skip;
      mem.write(gpa, data.subarray(done, done + n));
      this.#owner.markBufferWrite(gpa, n);
      done += n;
      skip = 0;
    }
    if (done > 0 && offset + done > this.written) this.written = offset + done;
    return done;
  }
}
