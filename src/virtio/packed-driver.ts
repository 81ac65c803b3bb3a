import type { GuestMemory } from "../memory/guest-memory.js";
import { toAddress } from "./bounds.js";
import { checkIndirectTables, type IndirectTables, type Segment, type UsedElement } from "./driver.js";
import { VirtqueueError } from "./errors.js";
import { hasFeature, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "./features.js";
import {
  availFlags,
  checkPackedQueueLayout,
  EVENT_OFF_FLAGS,
  EVENT_OFF_OFF_WRAP,
  EVENT_SUPPRESS_SIZE,
  isUsed,
  PACKED_DESC_OFF_FLAGS,
  PACKED_DESC_OFF_ID,
  PACKED_DESC_OFF_LEN,
  type PackedVringBase,
  packedNeedEvent,
  packedQueueLayout,
  packedRingSize,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  usedFlags,
} from "./packed-ring.js";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE } from "./ring.js";

export interface PackedQueueDriverConfig {
  size: number;
  descRing: number;
  driverArea: number;
  deviceArea: number;
  features?: bigint;
  /** Indirect tables: one of `entries` descriptors per buffer id, at address + id * entries * 16. */
  indirectTables?: IndirectTables;
}

/**
 * The layout in the names a vhost-user front-end uses (SET_VRING_ADDR: descriptor, available =
 * driver area, used = device area), so `frontend.startVring(i, driver.layout)` works for both
 * ring kinds.
 */
export interface PackedDriverLayout {
  size: number;
  descTable: number;
  availRing: number;
  usedRing: number;
  end: number;
  packed: true;
}

/**
 * The driver side of a packed virtqueue: what a guest's virtio driver does, for tests, the
 * front-end and the bench. Buffer ids are 0..size-1, one per chain in flight; the driver keeps
 * each id's slot count itself, so nothing the device writes can corrupt its bookkeeping, and
 * checks every used descriptor the device returns.
 */
export class PackedQueueDriver {
  readonly packed = true;
  readonly memory: GuestMemory;
  readonly size: number;
  readonly descRing: number;
  readonly driverArea: number;
  readonly deviceArea: number;
  readonly eventIdx: boolean;
  readonly indirectDesc: boolean;
  readonly #indirect: IndirectTables | null;

  #nextAvail = 0;
  #availWrap = true;
  #lastUsed = 0;
  #usedWrap = true;
  #numFree: number;
  #addedSinceKick = 0;
  #interrupts = true;
  /** Free buffer ids (a stack) and each id's ring slots while in flight (0: free). */
  readonly #freeIds: Uint16Array;
  #freeCount: number;
  readonly #slotsOf: Uint16Array;

  constructor(memory: GuestMemory, config: PackedQueueDriverConfig) {
    this.memory = memory;
    this.size = config.size;
    this.descRing = toAddress(config.descRing, "descriptor ring");
    this.driverArea = toAddress(config.driverArea, "driver area");
    this.deviceArea = toAddress(config.deviceArea, "device area");
    checkPackedQueueLayout(memory, this.size, this.descRing, this.driverArea, this.deviceArea);
    const features = config.features ?? 0n;
    this.eventIdx = hasFeature(features, VIRTIO_RING_F_EVENT_IDX);
    this.indirectDesc = hasFeature(features, VIRTIO_RING_F_INDIRECT_DESC);
    const ind = checkIndirectTables(memory, this.size, config.indirectTables);
    this.#indirect = ind;
    this.#numFree = this.size;
    this.#freeIds = new Uint16Array(this.size);
    for (let i = 0; i < this.size; i++) this.#freeIds[i] = this.size - 1 - i;
    this.#freeCount = this.size;
    this.#slotsOf = new Uint16Array(this.size);
    memory.fill(this.descRing, packedRingSize(this.size));
    memory.fill(this.driverArea, EVENT_SUPPRESS_SIZE);
    memory.fill(this.deviceArea, EVENT_SUPPRESS_SIZE);
  }

  /** A driver whose ring and areas sit one after the other from `base` (see packedQueueLayout). */
  static at(
    memory: GuestMemory,
    base: number,
    size: number,
    options: { features?: bigint; indirectTables?: IndirectTables } = {},
  ): PackedQueueDriver {
    const l = packedQueueLayout(base, size);
    return new PackedQueueDriver(memory, { ...options, ...l });
  }

  get layout(): PackedDriverLayout {
    return {
      size: this.size,
      descTable: this.descRing,
      availRing: this.driverArea,
      usedRing: this.deviceArea,
      end: this.deviceArea + EVENT_SUPPRESS_SIZE,
      packed: true,
    };
  }

  /** Free ring slots. */
  get numFree(): number {
    return this.#numFree;
  }

  get inFlight(): number {
    return this.size - this.#freeCount;
  }

  /** The avail and used positions (what a vhost-user front-end sends in SET_VRING_BASE). */
  get position(): PackedVringBase {
    return { availIdx: this.#nextAvail, availWrap: this.#availWrap, usedIdx: this.#lastUsed, usedWrap: this.#usedWrap };
  }

  /** Moves both positions (after GET_VRING_BASE, or a migration). Only with nothing in flight. */
  startAt(p: PackedVringBase): void {
    if (this.inFlight !== 0) throw new VirtqueueError("BAD_ARGUMENT", "startAt() with chains in flight");
    this.#nextAvail = p.availIdx % this.size;
    this.#availWrap = p.availWrap;
    this.#lastUsed = p.usedIdx % this.size;
    this.#usedWrap = p.usedWrap;
    // No stale descriptor may look available (to the device) or used (to us) at the new
    // positions: flags "used in the other lap" are neither, whatever the two wrap counters.
    const stale = usedFlags(!this.#usedWrap);
    this.memory.fill(this.descRing, packedRingSize(this.size));
    if (stale !== 0) {
      for (let s = 0; s < this.size; s++) {
        this.memory.writeU16(this.descRing + VIRTQ_DESC_SIZE * s + PACKED_DESC_OFF_FLAGS, stale);
      }
    }
    if (this.eventIdx && this.#interrupts) this.#writeDriverArea(RING_EVENT_FLAGS_DESC, this.#usedOffWrap());
  }

  #take(): number {
    if (this.#freeCount === 0) throw new VirtqueueError("NO_SPACE", "no free buffer id");
    this.#freeCount--;
    return this.#freeIds[this.#freeCount] as number;
  }

  /** Raw descriptor write at ring slot `slot` (tests use it to build what a hostile driver would). */
  writeDescriptor(
    slot: number,
    addr: number | bigint,
    len: number,
    id: number,
    flags: number,
    table = this.descRing,
  ): void {
    const d = table + VIRTQ_DESC_SIZE * slot;
    this.memory.writeU64(d, BigInt(addr));
    this.memory.writeU32(d + PACKED_DESC_OFF_LEN, len >>> 0);
    this.memory.writeU16(d + PACKED_DESC_OFF_ID, id & 0xffff);
    if (table === this.descRing) this.memory.atomicStoreU16(d + PACKED_DESC_OFF_FLAGS, flags & 0xffff);
    else this.memory.writeU16(d + PACKED_DESC_OFF_FLAGS, flags & 0xffff);
  }

  /** The flags that make a descriptor at `slots` past the avail position available. */
  availFlagsAt(slots: number): number {
    const wrap = this.#nextAvail + slots >= this.size ? !this.#availWrap : this.#availWrap;
    return availFlags(wrap);
  }

  /**
   * Makes a chain available: the readable buffers, then the writable ones; with `indirect`, as
   * one descriptor pointing to a table. The head's flags are written last (the device sees the
   * whole chain or none of it). Returns the buffer id.
   */
  add(readable: readonly Segment[], writable: readonly Segment[], options: { indirect?: boolean } = {}): number {
    const n = readable.length + writable.length;
    if (n === 0) throw new VirtqueueError("BAD_ARGUMENT", "a chain needs at least one buffer");
    const seg = (i: number) => (i < readable.length ? readable[i] : writable[i - readable.length]) as Segment;
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
      if (this.#numFree < 1) throw new VirtqueueError("NO_SPACE", "no free ring slot", { value: 1, limit: 0 });
      const id = this.#take();
      const table = ind.address + id * ind.entries * VIRTQ_DESC_SIZE;
      for (let i = 0; i < n; i++) {
        const s = seg(i);
        this.writeDescriptor(i, s.addr, s.len, 0, i >= readable.length ? VIRTQ_DESC_F_WRITE : 0, table);
      }
      this.#publishChain(id, [[table, n * VIRTQ_DESC_SIZE, VIRTQ_DESC_F_INDIRECT]]);
      return id;
    }
    if (n > this.#numFree) {
      throw new VirtqueueError("NO_SPACE", `${n} slots needed, ${this.#numFree} free`, {
        value: n,
        limit: this.#numFree,
      });
    }
    const id = this.#take();
    const descs: [number, number, number][] = [];
    for (let i = 0; i < n; i++) {
      const s = seg(i);
      descs.push([
        s.addr,
        s.len,
        (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0) | (i >= readable.length ? VIRTQ_DESC_F_WRITE : 0),
      ]);
    }
    this.#publishChain(id, descs);
    return id;
  }

  #publishChain(id: number, descs: readonly [number, number, number][]): void {
    const n = descs.length;
    // Every descriptor but the head first, then the head's flags: the chain appears at once.
    for (let k = n - 1; k >= 0; k--) {
      const [addr, len, flags] = descs[k] as [number, number, number];
      const slot = (this.#nextAvail + k) % this.size;
      this.writeDescriptor(slot, addr, len, id, flags | this.availFlagsAt(k));
    }
    this.#slotsOf[id] = n;
    this.#numFree -= n;
    this.#addedSinceKick += n;
    this.#nextAvail += n;
    if (this.#nextAvail >= this.size) {
      this.#nextAvail -= this.size;
      this.#availWrap = !this.#availWrap;
    }
  }

  /**
   * Whether the device wants a kick for what was added since the last call: not when it set
   * RING_EVENT_FLAGS_DISABLE; under EVENT_IDX with RING_EVENT_FLAGS_DESC, when the avail
   * position passed its off_wrap.
   */
  publish(): boolean {
    const added = this.#addedSinceKick;
    this.#addedSinceKick = 0;
    if (added === 0) return false;
    const flags = this.memory.atomicLoadU16(this.deviceArea + EVENT_OFF_FLAGS) & 3;
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    if (flags !== RING_EVENT_FLAGS_DESC || !this.eventIdx) return true;
    if (added >= this.size) return true;
    const offWrap = this.memory.atomicLoadU16(this.deviceArea + EVENT_OFF_OFF_WRAP);
    return packedNeedEvent(offWrap, this.#availWrap, this.#nextAvail, added, this.size);
  }

  hasUsed(): boolean {
    const f = this.memory.atomicLoadU16(this.descRing + VIRTQ_DESC_SIZE * this.#lastUsed + PACKED_DESC_OFF_FLAGS);
    return isUsed(f, this.#usedWrap);
  }

  /**
   * Collects the next used descriptor, or null. Throws BAD_USED_ELEMENT when the device returns
   * an id that is not in flight (the used slot is skipped; nothing is freed).
   */
  getUsed(): UsedElement | null {
    const d = this.descRing + VIRTQ_DESC_SIZE * this.#lastUsed;
    const f = this.memory.atomicLoadU16(d + PACKED_DESC_OFF_FLAGS);
    if (!isUsed(f, this.#usedWrap)) return null;
    const id = this.memory.readU16(d + PACKED_DESC_OFF_ID);
    const len = this.memory.readU32(d + PACKED_DESC_OFF_LEN);
    const slots = id < this.size ? (this.#slotsOf[id] as number) : 0;
    this.#advanceUsed(slots === 0 ? 1 : slots);
    if (slots === 0) {
      throw new VirtqueueError("BAD_USED_ELEMENT", `device returned id ${id}, which is not in flight`, {
        head: id,
        value: id,
      });
    }
    this.#slotsOf[id] = 0;
    this.#numFree += slots;
    this.#freeIds[this.#freeCount++] = id;
    if (this.eventIdx && this.#interrupts) {
      this.memory.atomicStoreU16(this.driverArea + EVENT_OFF_OFF_WRAP, this.#usedOffWrap());
    }
    return { head: id, len };
  }

  #advanceUsed(n: number): void {
    this.#lastUsed += n;
    if (this.#lastUsed >= this.size) {
      this.#lastUsed -= this.size;
      this.#usedWrap = !this.#usedWrap;
    }
  }

  #usedOffWrap(): number {
    return this.#lastUsed | (this.#usedWrap ? 0x8000 : 0);
  }

  #writeDriverArea(flags: number, offWrap: number | null): void {
    if (offWrap !== null) this.memory.atomicStoreU16(this.driverArea + EVENT_OFF_OFF_WRAP, offWrap);
    this.memory.atomicStoreU16(this.driverArea + EVENT_OFF_FLAGS, flags);
  }

  /**
   * Asks for used-buffer notifications again (under EVENT_IDX: from the next used slot on). True
   * when used descriptors already wait: collect them rather than wait.
   */
  enableInterrupts(): boolean {
    this.#interrupts = true;
    if (this.eventIdx) this.#writeDriverArea(RING_EVENT_FLAGS_DESC, this.#usedOffWrap());
    else this.#writeDriverArea(RING_EVENT_FLAGS_ENABLE, null);
    return this.hasUsed();
  }

  disableInterrupts(): void {
    this.#interrupts = false;
    this.#writeDriverArea(RING_EVENT_FLAGS_DISABLE, null);
  }
}
