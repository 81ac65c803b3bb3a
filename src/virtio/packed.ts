import type { GuestMemory } from "../memory/guest-memory.js";
import { toAddress } from "./bounds.js";
import { BrokenState } from "./broken.js";
import type { DescriptorChain } from "./chain.js";
import { ChainBuilder, viewOf } from "./chain-builder.js";
import { VirtqueueError } from "./errors.js";
import { hasFeature, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "./features.js";
import {
  checkPackedQueueLayout,
  EVENT_OFF_FLAGS,
  EVENT_OFF_OFF_WRAP,
  EVENT_SUPPRESS_SIZE,
  encodePackedVringBase,
  isAvailable,
  PACKED_DESC_OFF_FLAGS,
  PACKED_DESC_OFF_ID,
  PACKED_DESC_OFF_LEN,
  type PackedVringBase,
  packedNeedEvent,
  packedRingSize,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  usedFlags,
} from "./packed-ring.js";
import type { DirtyMarker } from "./queue.js";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE } from "./ring.js";
import type { DeviceVirtqueue } from "./virtqueue.js";

export interface PackedQueueConfig {
  /** Queue size in [1, 32768] (packed rings need not be a power of two). */
  size: number;
  /** Guest-physical addresses of the descriptor ring and the two event suppression areas. */
  descRing: number | bigint;
  driverArea: number | bigint;
  deviceArea: number | bigint;
  /** Negotiated features (INDIRECT_DESC and EVENT_IDX matter here). */
  features?: bigint;
  /** Where to resume (vhost-user SET_VRING_BASE, migration). Default: slot 0, wrap counters 1. */
  nextAvail?: number;
  availWrap?: boolean;
  nextUsed?: number;
  usedWrap?: boolean;
  /** Most buffers one chain may have, indirect ones included. Default: the queue size. */
  maxChainLength?: number;
  markDirty?: DirtyMarker | null;
  /** Address at which device-area writes are logged (vhost-user log_guest_addr). Default: deviceArea. */
  deviceLogAddress?: number | bigint;
}

/** A descriptor as the driver wrote it in the ring (or as the inflight region kept it). */
export interface RawPackedDescriptor {
  addr: bigint;
  len: number;
  id: number;
  flags: number;
}

/**
 * The device side of a packed virtqueue (virtio 1.1+ "Packed Virtqueues") over guest memory the
 * driver writes concurrently. Same contract as SplitQueue (see README.md, "Hostile input"):
 *  - chain-level errors (bad address, indirect table, order, length): the chain's ring slots
 *    are consumed up to its last descriptor (the one without NEXT), popChain() throws with
 *    `details.head` = its buffer id and `details.slots`, so the device can return it with
 *    addUsed(id, 0, slots) and the two sides stay in step;
 *  - ring-level errors (ring memory gone; a chain with no end inside the slots the driver
 *    owns): the queue is broken (`broken`), every later call throws QUEUE_BROKEN.
 *
 * Chains may complete in any order: each addUsed() writes one used descriptor at the device's
 * used position and moves it by the chain's slot count. The device never takes more slots than
 * `size` minus those still in flight, so a driver that flips flags early cannot make it
 * overwrite a slot it has not returned yet.
 *
 * Ordering: a descriptor's flags are read with an atomic load before the rest of it (the
 * driver writes the head's flags last); a used descriptor's id and len are written before its
 * flags are stored atomically; notification decisions read the peer's event suppression area
 * with atomic loads after that store.
 */
export class PackedQueue implements DeviceVirtqueue {
  readonly packed = true;
  #memory: GuestMemory;
  readonly size: number;
  readonly descRing: number;
  readonly driverArea: number;
  readonly deviceArea: number;
  readonly features: bigint;
  readonly eventIdx: boolean;
  readonly indirectDesc: boolean;
  readonly maxChainLength: number;

  #nextAvail = 0;
  #availWrap = true;
  #nextUsed = 0;
  #usedWrap = true;
  /** Ring slots popped and not yet returned. */
  #inFlightSlots = 0;
  /** Slots the used position moved since the last needsNotification(). */
  #usedSinceSignal = 0;
  /** What the device area's flags hold (-1: unknown, write it). */
  #deviceFlags = -1;
  readonly #state = new BrokenState();
  #markDirty: DirtyMarker | null;
  #deviceLogAddress: number;
  readonly #builder: ChainBuilder;
  #ringView: DataView | null = null;

  /**
   * The ring descriptors of the last chain popped (or refused), valid until the next pop: what
   * vhost-user inflight tracking keeps for packed rings. @internal
   */
  readonly raw: { lo: Uint32Array; hi: Uint32Array; len: Uint32Array; id: Uint16Array; flags: Uint16Array };
  #rawCount = 0;

  constructor(memory: GuestMemory, config: PackedQueueConfig) {
    const size = config.size;
    this.descRing = toAddress(config.descRing, "descriptor ring");
    this.driverArea = toAddress(config.driverArea, "driver area");
    this.deviceArea = toAddress(config.deviceArea, "device area");
    checkPackedQueueLayout(memory, size, this.descRing, this.driverArea, this.deviceArea);
    this.size = size;
    this.features = config.features ?? 0n;
    this.eventIdx = hasFeature(this.features, VIRTIO_RING_F_EVENT_IDX);
    this.indirectDesc = hasFeature(this.features, VIRTIO_RING_F_INDIRECT_DESC);
    const maxChain = config.maxChainLength ?? size;
    this.#builder = new ChainBuilder(memory, maxChain, this.indirectDesc);
    this.maxChainLength = maxChain;
    this.#memory = memory;
    this.#ringView = viewOf(memory, this.descRing, packedRingSize(size));
    this.#markDirty = config.markDirty ?? null;
    this.#deviceLogAddress =
      config.deviceLogAddress === undefined ? this.deviceArea : toAddress(config.deviceLogAddress, "device area log");
    this.raw = {
      lo: new Uint32Array(size),
      hi: new Uint32Array(size),
      len: new Uint32Array(size),
      id: new Uint16Array(size),
      flags: new Uint16Array(size),
    };
    this.setPosition({
      availIdx: config.nextAvail ?? 0,
      availWrap: config.availWrap ?? true,
      usedIdx: config.nextUsed ?? config.nextAvail ?? 0,
      usedWrap: config.usedWrap ?? config.availWrap ?? true,
    });
  }

  get memory(): GuestMemory {
    return this.#memory;
  }

  setMemory(memory: GuestMemory): void {
    checkPackedQueueLayout(memory, this.size, this.descRing, this.driverArea, this.deviceArea);
    this.#memory = memory;
    this.#builder.memory = memory;
    this.#ringView = viewOf(memory, this.descRing, packedRingSize(this.size));
  }

  get broken(): VirtqueueError | null {
    return this.#state.error;
  }

  get nextAvail(): number {
    return this.#nextAvail;
  }

  get availWrap(): boolean {
    return this.#availWrap;
  }

  get nextUsed(): number {
    return this.#nextUsed;
  }

  get usedWrap(): boolean {
    return this.#usedWrap;
  }

  get inFlightSlots(): number {
    return this.#inFlightSlots;
  }

  /** Both positions, as vhost-user's GET_VRING_BASE reports them. */
  get position(): PackedVringBase {
    return { availIdx: this.#nextAvail, availWrap: this.#availWrap, usedIdx: this.#nextUsed, usedWrap: this.#usedWrap };
  }

  /** The vring base as vhost-user encodes it for packed rings. */
  get vringBase(): number {
    return encodePackedVringBase(this.position);
  }

  /**
   * Moves both positions (SET_VRING_BASE, inflight recovery). The slots between them count as in
   * flight; more than `size` of them is refused.
   */
  setPosition(p: PackedVringBase): void {
    const size = this.size;
    if (!(p.availIdx >= 0 && p.availIdx < size && p.usedIdx >= 0 && p.usedIdx < size)) {
      throw new VirtqueueError("BAD_ARGUMENT", `ring position ${p.availIdx}/${p.usedIdx} outside a ring of ${size}`, {
        value: Math.max(p.availIdx, p.usedIdx),
        limit: size,
      });
    }
    const a = p.availIdx + (p.availWrap ? 0 : size);
    const u = p.usedIdx + (p.usedWrap ? 0 : size);
    const inFlight = (a - u + 2 * size) % (2 * size);
    if (inFlight > size) {
      throw new VirtqueueError("BAD_ARGUMENT", `avail position is ${inFlight} slots past the used one`, {
        value: inFlight,
        limit: size,
      });
    }
    this.#nextAvail = p.availIdx;
    this.#availWrap = p.availWrap;
    this.#nextUsed = p.usedIdx;
    this.#usedWrap = p.usedWrap;
    this.#inFlightSlots = inFlight;
    this.#usedSinceSignal = 0;
  }

  setDirtyLog(marker: DirtyMarker | null, deviceLogAddress: number | bigint = this.deviceArea): void {
    this.#deviceLogAddress = toAddress(deviceLogAddress, "device area log");
    this.#markDirty = marker;
  }

  /** @internal ChainOwner */
  markBufferWrite(gpa: number, len: number): void {
    this.#markDirty?.(gpa, len);
  }

  #flagsAt(slot: number): number {
    return this.#memory.atomicLoadU16(this.descRing + VIRTQ_DESC_SIZE * slot + PACKED_DESC_OFF_FLAGS);
  }

  /** 1 when the driver has made the next chain available (and the device has room for it), else 0. */
  availableCount(): number {
    this.#state.check();
    if (this.#inFlightSlots >= this.size) return 0;
    try {
      return isAvailable(this.#flagsAt(this.#nextAvail), this.#availWrap) ? 1 : 0;
    } catch (e) {
      return this.#state.ringAccess(e);
    }
  }

  /**
   * Takes the next available chain, or null. Throws VirtqueueError for a malformed chain (its
   * slots are consumed; `details.head`/`details.slots` let the device return it) or a broken ring.
   */
  popChain(): DescriptorChain | null {
    this.#state.check();
    const room = this.size - this.#inFlightSlots;
    if (room <= 0) return null;
    try {
      const headFlags = this.#flagsAt(this.#nextAvail);
      if (!isAvailable(headFlags, this.#availWrap)) return null;
      // Pass 1: copy the chain's ring descriptors out (the driver may rewrite them) and find
      // where it ends. The head's flags are the ones loaded atomically above.
      const raw = this.raw;
      const view = this.#ringView;
      const mem = this.#memory;
      let slot = this.#nextAvail;
      let wrap = this.#availWrap;
      let n = 0;
      for (;;) {
        if (n === room) {
          this.#rawCount = 0;
          throw this.#state.break(
            new VirtqueueError(
              "RING_OVERRUN",
              `chain at slot ${this.#nextAvail} has no end within the ${room} slots the driver owns`,
              { index: this.#nextAvail, value: n, limit: room },
            ),
          );
        }
        const o = VIRTQ_DESC_SIZE * slot;
        if (view) {
          raw.lo[n] = view.getUint32(o, true);
          raw.hi[n] = view.getUint32(o + 4, true);
          raw.len[n] = view.getUint32(o + PACKED_DESC_OFF_LEN, true);
          raw.id[n] = view.getUint16(o + PACKED_DESC_OFF_ID, true);
          raw.flags[n] = n === 0 ? headFlags : view.getUint16(o + PACKED_DESC_OFF_FLAGS, true);
        } else {
          const d = this.descRing + o;
          raw.lo[n] = mem.readU32(d);
          raw.hi[n] = mem.readU32(d + 4);
          raw.len[n] = mem.readU32(d + PACKED_DESC_OFF_LEN);
          raw.id[n] = mem.readU16(d + PACKED_DESC_OFF_ID);
          raw.flags[n] = n === 0 ? headFlags : mem.readU16(d + PACKED_DESC_OFF_FLAGS);
        }
        const flags = raw.flags[n] as number;
        n++;
        if (++slot === this.size) {
          slot = 0;
          wrap = !wrap;
        }
        if (!(flags & VIRTQ_DESC_F_NEXT)) break;
      }
      // Consumed before it is checked: a bad chain must not stall the queue.
      this.#rawCount = n;
      this.#nextAvail = slot;
      this.#availWrap = wrap;
      this.#inFlightSlots += n;
      return this.#build(n);
    } catch (e) {
      if (e instanceof VirtqueueError) throw e;
      return this.#state.ringAccess(e);
    }
  }

  /** Pass 2: the buffers of raw[0, n), checked by the shared ChainBuilder. */
  #build(n: number): DescriptorChain {
    const raw = this.raw;
    const id = raw.id[n - 1] as number;
    const b = this.#builder;
    b.begin(id);
    let indirect = false;
    try {
      for (let k = 0; k < n; k++) {
        const flags = raw.flags[k] as number;
        const lo = raw.lo[k] as number;
        const hi = raw.hi[k] as number;
        const len = raw.len[k] as number;
        if (flags & VIRTQ_DESC_F_INDIRECT) {
          const t = b.indirect(k, false, lo, hi, len, flags, (flags & VIRTQ_DESC_F_NEXT) !== 0);
          indirect = true;
          const tv = viewOf(this.#memory, t.address, t.entries * VIRTQ_DESC_SIZE);
          for (let i = 0; i < t.entries; i++) {
            const o = VIRTQ_DESC_SIZE * i;
            let ilo: number;
            let ihi: number;
            let ilen: number;
            let iflags: number;
            if (tv) {
              ilo = tv.getUint32(o, true);
              ihi = tv.getUint32(o + 4, true);
              ilen = tv.getUint32(o + PACKED_DESC_OFF_LEN, true);
              iflags = tv.getUint16(o + PACKED_DESC_OFF_FLAGS, true);
            } else {
              const d = t.address + o;
              ilo = this.#memory.readU32(d);
              ihi = this.#memory.readU32(d + 4);
              ilen = this.#memory.readU32(d + PACKED_DESC_OFF_LEN);
              iflags = this.#memory.readU16(d + PACKED_DESC_OFF_FLAGS);
            }
            // "VIRTQ_DESC_F_WRITE is the only valid flag for descriptors in the indirect table":
            // the others (NEXT, INDIRECT included) are ignored, and the table's length ends it.
            b.buffer(i, true, ilo, ihi, ilen, iflags & VIRTQ_DESC_F_WRITE);
          }
          continue;
        }
        b.buffer(k, false, lo, hi, len, flags);
      }
    } catch (e) {
      if (!(e instanceof VirtqueueError)) throw e;
      throw new VirtqueueError(e.code, e.message, { ...e.details, head: id, slots: n }, { cause: e.cause });
    }
    return b.finish(this, indirect, n);
  }

  /**
   * The chain made of `descs` (ring descriptors a previous back-end popped, kept in the inflight
   * region), checked like popChain() but without touching the ring or the positions.
   */
  chainFrom(descs: readonly RawPackedDescriptor[]): DescriptorChain {
    this.#state.check();
    const n = descs.length;
    if (n < 1 || n > this.size) {
      throw new VirtqueueError("CHAIN_TOO_LONG", `a chain of ${n} ring descriptors`, { value: n, limit: this.size });
    }
    const raw = this.raw;
    for (let k = 0; k < n; k++) {
      const d = descs[k] as RawPackedDescriptor;
      raw.lo[k] = Number(d.addr & 0xffffffffn);
      raw.hi[k] = Number((d.addr >> 32n) & 0xffffffffn);
      raw.len[k] = d.len >>> 0;
      raw.id[k] = d.id & 0xffff;
      raw.flags[k] = (d.flags & 0xffff & ~VIRTQ_DESC_F_NEXT) | (k < n - 1 ? VIRTQ_DESC_F_NEXT : 0);
    }
    this.#rawCount = n;
    try {
      return this.#build(n);
    } catch (e) {
      if (e instanceof VirtqueueError) throw e;
      return this.#state.ringAccess(e);
    }
  }

  /** Ring descriptors of the last chain popped (or refused). */
  get rawCount(): number {
    return this.#rawCount;
  }

  /** Where the used position will be after `slots` more slots. */
  usedPositionAfter(slots: number): { idx: number; wrap: boolean } {
    let idx = this.#nextUsed + slots;
    let wrap = this.#usedWrap;
    if (idx >= this.size) {
      idx -= this.size;
      wrap = !wrap;
    }
    return { idx, wrap };
  }

  /**
   * Returns a chain: one used descriptor (buffer `id`, `len` bytes written) at the used
   * position, which then moves `slots` (the chain's DescriptorChain.slots) forward.
   */
  addUsed(id: number, len: number, slots = 1): void {
    this.#state.check();
    if (!(Number.isInteger(id) && id >= 0 && id <= 0xffff)) {
      throw new VirtqueueError("BAD_USED_HEAD", `buffer id ${id} is not a u16`, { value: id, limit: 0xffff });
    }
    if (!(Number.isInteger(len) && len >= 0 && len <= 0xffffffff)) {
      throw new VirtqueueError("BAD_ARGUMENT", `used length ${len} is not a u32`, { head: id, value: len });
    }
    if (!(Number.isInteger(slots) && slots >= 1 && slots <= this.#inFlightSlots)) {
      throw new VirtqueueError("BAD_ARGUMENT", `returning ${slots} slots with ${this.#inFlightSlots} in flight`, {
        head: id,
        value: slots,
        limit: this.#inFlightSlots,
      });
    }
    const off = VIRTQ_DESC_SIZE * this.#nextUsed;
    const d = this.descRing + off;
    try {
      this.#memory.writeU32(d + PACKED_DESC_OFF_LEN, len);
      this.#memory.writeU16(d + PACKED_DESC_OFF_ID, id);
      // The flags last, atomically: the driver reads them first.
      this.#memory.atomicStoreU16(d + PACKED_DESC_OFF_FLAGS, usedFlags(this.#usedWrap));
    } catch (e) {
      this.#state.ringAccess(e);
    }
    this.#markDirty?.(d, VIRTQ_DESC_SIZE);
    const p = this.usedPositionAfter(slots);
    this.#nextUsed = p.idx;
    this.#usedWrap = p.wrap;
    this.#inFlightSlots -= slots;
    this.#usedSinceSignal += slots;
  }

  /** Whether the driver wants a used-buffer notification for what was returned since the last call. */
  needsNotification(): boolean {
    this.#state.check();
    const added = this.#usedSinceSignal;
    this.#usedSinceSignal = 0;
    if (added === 0) return false;
    try {
      const flags = this.#memory.atomicLoadU16(this.driverArea + EVENT_OFF_FLAGS) & 3;
      if (flags === RING_EVENT_FLAGS_DISABLE) return false;
      if (flags !== RING_EVENT_FLAGS_DESC || !this.eventIdx) return true;
      if (added >= this.size) return true;
      const offWrap = this.#memory.atomicLoadU16(this.driverArea + EVENT_OFF_OFF_WRAP);
      return packedNeedEvent(offWrap, this.#usedWrap, this.#nextUsed, added, this.size);
    } catch (e) {
      return this.#state.ringAccess(e);
    }
  }

  #writeDeviceArea(flags: number, offWrap: number | null): void {
    const mem = this.#memory;
    if (offWrap !== null) mem.atomicStoreU16(this.deviceArea + EVENT_OFF_OFF_WRAP, offWrap);
    if (flags !== this.#deviceFlags || offWrap !== null) {
      mem.atomicStoreU16(this.deviceArea + EVENT_OFF_FLAGS, flags);
      this.#deviceFlags = flags;
    }
    this.#markDirty?.(this.#deviceLogAddress, EVENT_SUPPRESS_SIZE);
  }

  /**
   * Asks the driver to kick on the next chain (under EVENT_IDX: once it makes the slot at the
   * avail position available; otherwise any), then looks again: true means a chain arrived
   * meanwhile, so keep processing instead of waiting.
   */
  enableNotification(): boolean {
    this.#state.check();
    try {
      if (this.eventIdx) {
        this.#writeDeviceArea(RING_EVENT_FLAGS_DESC, this.#nextAvail | (this.#availWrap ? 0x8000 : 0));
      } else this.#writeDeviceArea(RING_EVENT_FLAGS_ENABLE, null);
      if (this.#inFlightSlots >= this.size) return false;
      return isAvailable(this.#flagsAt(this.#nextAvail), this.#availWrap);
    } catch (e) {
      if (e instanceof VirtqueueError) throw e;
      return this.#state.ringAccess(e);
    }
  }

  /** Tells the driver not to kick (RING_EVENT_FLAGS_DISABLE, with or without EVENT_IDX). */
  disableNotification(): void {
    this.#state.check();
    if (this.#deviceFlags === RING_EVENT_FLAGS_DISABLE) return;
    try {
      this.#writeDeviceArea(RING_EVENT_FLAGS_DISABLE, null);
    } catch (e) {
      this.#state.ringAccess(e);
    }
  }
}
