import type { GuestMemory } from "../memory/guest-memory.js";
import { checkSplitQueueLayout, inGuestMemory, toAddress } from "./bounds.js";
import { VirtqueueError } from "./errors.js";
import { hasFeature, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "./features.js";
import {
  availEventOffset,
  availRingSize,
  descTableSize,
  type SplitQueueLayout,
  splitQueueLayout,
  usedEventOffset,
  usedRingSize,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_AVAIL_OFF_FLAGS,
  VIRTQ_AVAIL_OFF_IDX,
  VIRTQ_AVAIL_OFF_RING,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_DESC_SIZE,
  VIRTQ_USED_ELEM_SIZE,
  VIRTQ_USED_F_NO_NOTIFY,
  VIRTQ_USED_OFF_FLAGS,
  VIRTQ_USED_OFF_IDX,
  VIRTQ_USED_OFF_RING,
  vringNeedEvent,
} from "./ring.js";

/** One buffer in guest memory. */

/** Where a driver keeps its indirect tables: `entries` descriptors per slot, one table per slot. */
export interface IndirectTables {
  address: number;
  entries: number;
}

/**
 * A driver's indirect tables (one per slot of a queue of `size`) checked: 1..65536 entries each,
 * all of them inside writable guest memory, or BAD_ARGUMENT. Null when there are none.
 */
export function checkIndirectTables(
  memory: GuestMemory,
  size: number,
  ind: IndirectTables | undefined,
): IndirectTables | null {
  if (!ind) return null;
  const bytes = size * ind.entries * VIRTQ_DESC_SIZE;
  if (!(ind.entries >= 1 && ind.entries <= 65536) || !inGuestMemory(memory, ind.address, bytes, true)) {
    throw new VirtqueueError("BAD_ARGUMENT", `indirect tables [0x${ind.address.toString(16)}, +${bytes}) unusable`, {
      address: BigInt(ind.address),
      length: bytes,
    });
  }
  return ind;
}

export interface Segment {
  addr: number;
  len: number;
}

/** A chain the device returned: its head, and how many bytes it wrote. */
export interface UsedElement {
  head: number;
  len: number;
}

export interface SplitQueueDriverConfig {
  size: number;
  descTable: number;
  availRing: number;
  usedRing: number;
  features?: bigint;
  /**
   * Guest memory for indirect tables: `size` tables of `entries` descriptors each, the one for
   * head h at address + h * entries * 16. Needed only to add({ indirect: true }).
   */
  indirectTables?: IndirectTables;
}

/**
 * The driver side of a split virtqueue: what a guest's virtio driver does, for tests and for
 * a frontend in Node that drives a vhost-user backend. Keeps its own copy of the descriptor
 * links, so nothing the device writes can corrupt the free list; checks every used element the
 * device returns.
 */
export class SplitQueueDriver {
  readonly memory: GuestMemory;
  readonly size: number;
  readonly descTable: number;
  readonly availRing: number;
  readonly usedRing: number;
  readonly eventIdx: boolean;
  readonly indirectDesc: boolean;
  readonly #indirect: IndirectTables | null;

  /** Next free descriptor, and each descriptor's link (free list, and chains in flight). */
  readonly #next: Uint16Array;
  #freeHead = 0;
  #numFree: number;
  /** Descriptors a head holds in the table (0: not in flight). */
  readonly #held: Uint16Array;

  #availIdx = 0;
  #publishedAvail = 0;
  #lastUsed = 0;
  #usedIdx = 0;
  #interrupts = true;

  constructor(memory: GuestMemory, config: SplitQueueDriverConfig) {
    this.memory = memory;
    this.size = config.size;
    this.descTable = toAddress(config.descTable, "descriptor table");
    this.availRing = toAddress(config.availRing, "avail ring");
    this.usedRing = toAddress(config.usedRing, "used ring");
    checkSplitQueueLayout(memory, this.size, this.descTable, this.availRing, this.usedRing);
    const features = config.features ?? 0n;
    this.eventIdx = hasFeature(features, VIRTIO_RING_F_EVENT_IDX);
    this.indirectDesc = hasFeature(features, VIRTIO_RING_F_INDIRECT_DESC);
    const ind = checkIndirectTables(memory, this.size, config.indirectTables);
    this.#indirect = ind;
    this.#next = new Uint16Array(this.size);
    for (let i = 0; i < this.size; i++) this.#next[i] = (i + 1) & 0xffff;
    this.#numFree = this.size;
    this.#held = new Uint16Array(this.size);
    memory.fill(this.descTable, descTableSize(this.size));
    memory.fill(this.availRing, availRingSize(this.size));
    memory.fill(this.usedRing, usedRingSize(this.size));
  }

  /** A driver whose rings sit one after the other from `base` (see splitQueueLayout). */
  static at(
    memory: GuestMemory,
    base: number,
    size: number,
    options: { features?: bigint; indirectTables?: IndirectTables } = {},
  ): SplitQueueDriver {
    const l = splitQueueLayout(base, size);
    return new SplitQueueDriver(memory, { ...options, ...l });
  }

  get layout(): SplitQueueLayout {
    return {
      size: this.size,
      descTable: this.descTable,
      availRing: this.availRing,
      usedRing: this.usedRing,
      end: this.usedRing + usedRingSize(this.size),
    };
  }

  get numFree(): number {
    return this.#numFree;
  }

  /** The driver's avail idx (including entries added but not yet published). */
  get availIdx(): number {
    return this.#availIdx;
  }

  /** Index of the next used element the driver will read. */
  get lastUsed(): number {
    return this.#lastUsed;
  }

  /** Chains made available and not yet returned. */
  get inFlight(): number {
    let n = 0;
    for (const h of this.#held) if (h) n++;
    return n;
  }

  /**
   * Adds a chain: the readable buffers, then the writable ones; with `indirect`, as one
   * descriptor pointing to a table. Returns the head. Not visible to the device until publish().
   */
  add(readable: readonly Segment[], writable: readonly Segment[], options: { indirect?: boolean } = {}): number {
    const n = readable.length + writable.length;
    if (n === 0) throw new VirtqueueError("BAD_ARGUMENT", "a chain needs at least one buffer");
    if (options.indirect) {
      const ind = this.#indirect;
      if (!this.indirectDesc || !ind) {
        throw new VirtqueueError("BAD_ARGUMENT", "indirect add without INDIRECT_DESC and indirectTables");
      }
      if (n > ind.entries) {
        throw new VirtqueueError("NO_SPACE", `${n} buffers do not fit an indirect table of ${ind.entries}`, {
          value: n,
          limit: ind.entries,
        });
      }
      const head = this.#take(1);
      const table = ind.address + head * ind.entries * VIRTQ_DESC_SIZE;
      for (let i = 0; i < n; i++) {
        const s = (i < readable.length ? readable[i] : writable[i - readable.length]) as Segment;
        const flags = (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0) | (i >= readable.length ? VIRTQ_DESC_F_WRITE : 0);
        this.writeDescriptor(i, s.addr, s.len, flags, i + 1, table);
      }
      this.writeDescriptor(head, table, n * VIRTQ_DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0);
      this.#held[head] = 1;
      this.offerHead(head);
      return head;
    }
    if (n > this.#numFree) {
      throw new VirtqueueError("NO_SPACE", `${n} descriptors needed, ${this.#numFree} free`, {
        value: n,
        limit: this.#numFree,
      });
    }
    const head = this.#take(n);
    let idx = head;
    for (let i = 0; i < n; i++) {
      const s = (i < readable.length ? readable[i] : writable[i - readable.length]) as Segment;
      const flags = (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0) | (i >= readable.length ? VIRTQ_DESC_F_WRITE : 0);
      const next = this.#next[idx] as number;
      this.writeDescriptor(idx, s.addr, s.len, flags, i < n - 1 ? next : 0);
      idx = next;
    }
    this.#held[head] = n;
    this.offerHead(head);
    return head;
  }

  /** Unlinks `n` descriptors from the free list (they stay linked to each other); the first. */
  #take(n: number): number {
    if (n > this.#numFree) {
      throw new VirtqueueError("NO_SPACE", `${n} descriptors needed, ${this.#numFree} free`, {
        value: n,
        limit: this.#numFree,
      });
    }
    const head = this.#freeHead;
    let idx = head;
    for (let i = 0; i < n; i++) idx = this.#next[idx] as number;
    this.#freeHead = idx;
    this.#numFree -= n;
    return head;
  }

  /** Raw descriptor write (tests use it to build what a hostile driver would). */
  writeDescriptor(
    index: number,
    addr: number | bigint,
    len: number,
    flags: number,
    next: number,
    table = this.descTable,
  ): void {
    const d = table + VIRTQ_DESC_SIZE * index;
    const a = BigInt(addr);
    this.memory.writeU32(d, Number(a & 0xffffffffn));
    this.memory.writeU32(d + 4, Number((a >> 32n) & 0xffffffffn));
    this.memory.writeU32(d + 8, len >>> 0);
    this.memory.writeU16(d + 12, flags & 0xffff);
    this.memory.writeU16(d + 14, next & 0xffff);
  }

  /** Raw: puts `head` in the next avail ring slot (unpublished). No free-list bookkeeping. */
  offerHead(head: number): void {
    const slot = this.#availIdx & (this.size - 1);
    this.memory.writeU16(this.availRing + VIRTQ_AVAIL_OFF_RING + 2 * slot, head & 0xffff);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
  }

  /**
   * Moves every index to `idx` (avail idx and used idx in guest memory too), as after a
   * migration or a vhost-user SET_VRING_BASE. Only with nothing in flight.
   */
  startAt(idx: number): void {
    if (this.inFlight !== 0) throw new VirtqueueError("BAD_ARGUMENT", "startAt() with chains in flight");
    const v = idx & 0xffff;
    this.#availIdx = this.#publishedAvail = this.#lastUsed = this.#usedIdx = v;
    this.memory.atomicStoreU16(this.availRing + VIRTQ_AVAIL_OFF_IDX, v);
    this.memory.atomicStoreU16(this.usedRing + VIRTQ_USED_OFF_IDX, v);
    if (this.eventIdx) this.setUsedEvent(v);
  }

  /** Raw: sets the avail idx the next publish() stores (a hostile driver can jump it). */
  setAvailIdx(v: number): void {
    this.#availIdx = v & 0xffff;
  }

  /**
   * Makes everything added so far visible (one atomic store of avail idx, after the ring
   * entries and descriptors) and says whether the device wants a notification (kick):
   * vring_need_event(avail_event, new, old) under EVENT_IDX, else unless VIRTQ_USED_F_NO_NOTIFY.
   */
  publish(): boolean {
    const old = this.#publishedAvail;
    const now = this.#availIdx;
    this.memory.atomicStoreU16(this.availRing + VIRTQ_AVAIL_OFF_IDX, now);
    this.#publishedAvail = now;
    if (old === now) return false;
    if (this.eventIdx) {
      const availEvent = this.memory.atomicLoadU16(this.usedRing + availEventOffset(this.size));
      return vringNeedEvent(availEvent, now, old);
    }
    return (this.memory.atomicLoadU16(this.usedRing + VIRTQ_USED_OFF_FLAGS) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** True when the device has returned chains that getUsed() has not collected yet. */
  hasUsed(): boolean {
    return this.memory.atomicLoadU16(this.usedRing + VIRTQ_USED_OFF_IDX) !== this.#lastUsed;
  }

  /**
   * Collects the next used element, or null. Throws BAD_USED_ELEMENT when the device returns
   * an id that is not a chain in flight, or moves used idx more than `size` ahead (the element
   * is consumed; nothing is freed).
   */
  getUsed(): UsedElement | null {
    if (this.#usedIdx === this.#lastUsed) {
      const idx = this.memory.atomicLoadU16(this.usedRing + VIRTQ_USED_OFF_IDX);
      const pending = (idx - this.#lastUsed) & 0xffff;
      if (pending > this.size) {
        throw new VirtqueueError("BAD_USED_ELEMENT", `used idx ${idx} is ${pending} past ${this.#lastUsed}`, {
          value: idx,
          limit: this.size,
        });
      }
      this.#usedIdx = idx;
      if (pending === 0) return null;
    }
    const e = this.usedRing + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * (this.#lastUsed & (this.size - 1));
    const id = this.memory.readU32(e);
    const len = this.memory.readU32(e + 4);
    this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    if (this.eventIdx && this.#interrupts) {
      this.memory.atomicStoreU16(this.availRing + usedEventOffset(this.size), this.#lastUsed);
    }
    const held = id < this.size ? (this.#held[id] as number) : 0;
    if (held === 0) {
      throw new VirtqueueError("BAD_USED_ELEMENT", `device returned id ${id}, which is not in flight`, {
        head: id,
        value: id,
      });
    }
    let last = id;
    for (let i = 1; i < held; i++) last = this.#next[last] as number;
    this.#next[last] = this.#freeHead;
    this.#freeHead = id;
    this.#numFree += held;
    this.#held[id] = 0;
    return { head: id, len };
  }

  /**
   * Asks for used-buffer notifications again (used_event = lastUsed under EVENT_IDX, else clears
   * VIRTQ_AVAIL_F_NO_INTERRUPT). True when used elements are already waiting: collect them
   * rather than wait for a notification that may have been suppressed.
   */
  enableInterrupts(): boolean {
    this.#interrupts = true;
    if (this.eventIdx) this.memory.atomicStoreU16(this.availRing + usedEventOffset(this.size), this.#lastUsed);
    else this.memory.atomicStoreU16(this.availRing + VIRTQ_AVAIL_OFF_FLAGS, 0);
    return this.hasUsed();
  }

  /** Asks the device not to notify (VIRTQ_AVAIL_F_NO_INTERRUPT; under EVENT_IDX, used_event stops moving). */
  disableInterrupts(): void {
    this.#interrupts = false;
    if (!this.eventIdx) this.memory.atomicStoreU16(this.availRing + VIRTQ_AVAIL_OFF_FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT);
  }

  /** Under EVENT_IDX: notify me once used idx passes `idx` (virtqueue_enable_cb_delayed). */
  setUsedEvent(idx: number): void {
    this.memory.atomicStoreU16(this.availRing + usedEventOffset(this.size), idx & 0xffff);
  }
}
