import type { GuestMemory } from "../memory/guest-memory.js";
import { checkSplitQueueLayout, toAddress } from "./bounds.js";
import { BrokenState } from "./broken.js";
import type { DescriptorChain } from "./chain.js";
import { ChainBuilder, chainError, viewOf } from "./chain-builder.js";
import { VirtqueueError } from "./errors.js";
import {
  hasFeature,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "./features.js";
import {
  availEventOffset,
  availRingSize,
  descTableSize,
  usedEventOffset,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_AVAIL_OFF_FLAGS,
  VIRTQ_AVAIL_OFF_IDX,
  VIRTQ_AVAIL_OFF_RING,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_SIZE,
  VIRTQ_USED_ELEM_SIZE,
  VIRTQ_USED_F_NO_NOTIFY,
  VIRTQ_USED_OFF_FLAGS,
  VIRTQ_USED_OFF_IDX,
  VIRTQ_USED_OFF_RING,
  vringNeedEvent,
} from "./ring.js";
import type { DeviceVirtqueue } from "./virtqueue.js";

/** Reports a device write to guest memory: `len` bytes at guest-physical (or log) address `gpa`. */
export type DirtyMarker = (gpa: number, len: number) => void;

export interface SplitQueueConfig {
  /** Queue size: a power of two, at most 32768. */
  size: number;
  /** Guest-physical addresses of the three areas. */
  descTable: number | bigint;
  availRing: number | bigint;
  usedRing: number | bigint;
  /** Negotiated features (INDIRECT_DESC, EVENT_IDX and NOTIFY_ON_EMPTY matter here). */
  features?: bigint;
  /** Where to resume (vhost-user SET_VRING_BASE, or migration). Default 0. */
  nextAvail?: number;
  nextUsed?: number;
  /** Most buffers one chain may have, indirect ones included. Default: the queue size. */
  maxChainLength?: number;
  /** Called for every guest write the device makes (see setDirtyLog). */
  markDirty?: DirtyMarker | null;
  /** Address at which used-ring writes are logged (vhost-user log_guest_addr). Default: usedRing. */
  usedLogAddress?: number | bigint;
}

/**
 * The device side of a split virtqueue (virtio 1.x "Split Virtqueues") over guest memory that
 * the driver (another process) writes concurrently.
 *
 * Everything read from the rings and descriptor tables is checked before it is used; a bad
 * value becomes a VirtqueueError, never an access outside guest memory. What happens then:
 *  - chain-level errors (a bad descriptor, loop, indirect table, address, head index): the
 *    chain's avail entry is consumed (nextAvail moves past it) and popChain() throws; the
 *    chain is not completed. The queue stays usable: the next popChain() returns the next chain.
 *    The error carries `details.head`, so a device may still return the head with
 *    addUsed(head, 0) when it is < size.
 *  - ring-level errors (avail idx more than `size` ahead of nextAvail, ring memory gone): the
 *    queue can no longer tell which entries are real. It is marked broken (`broken`), and
 *    every later pop/add throws QUEUE_BROKEN. This is the spec's "device needs reset" case:
 *    the device should set VIRTIO_CONFIG_S_NEEDS_RESET (or the vhost-user equivalent) and
 *    wait for the driver to reset it; a new SplitQueue (or setup()) clears it.
 *
 * Ordering: avail idx is read with an atomic (seq-cst) load before the ring entry and the
 * descriptors it covers; used elements are written before the used idx is published with an
 * atomic store; notification decisions read used_event / avail flags with atomic loads after
 * that store (the full barrier vring_need_event needs).
 *
 * Notification suppression follows the usual device loop:
 *
 *   for (;;) {
 *     q.disableNotification();
 *     for (let c = q.popChain(); c; c = q.popChain()) { ...; q.addUsed(c.head, c.written); }
 *     if (q.needsNotification()) signalGuest();
 *     if (!q.enableNotification()) break; // nothing new: wait for the next kick
 *   }
 */
export class SplitQueue implements DeviceVirtqueue {
  readonly packed = false;
  #memory: GuestMemory;
  readonly size: number;
  readonly descTable: number;
  readonly availRing: number;
  readonly usedRing: number;
  readonly features: bigint;
  readonly eventIdx: boolean;
  readonly indirectDesc: boolean;
  readonly notifyOnEmpty: boolean;
  readonly maxChainLength: number;

  #nextAvail = 0;
  #nextUsed = 0;
  /** Last avail idx read from the ring (a shadow, so popping does not reload it every time). */
  #availIdx = 0;
  /** nextUsed at the last needsNotification() and how many were added since. */
  #signalledUsed = 0;
  #addedSinceSignal = 0;
  readonly #state = new BrokenState();

  #markDirty: DirtyMarker | null;
  #usedLogAddress: number;

  // Walk scratch, reused for every chain: a visited mark per table entry (generation stamps,
  // so it never needs clearing) and the buffers found so far.
  readonly #seen: Uint32Array;
  #generation = 0;
  readonly #builder: ChainBuilder;
  /**
   * Read-only views of the descriptor table and avail ring when each lies in one region window
   * (the usual case): descriptor reads are then plain DataView loads, no lookup, no garbage.
   * Writes always go through GuestMemory, which also marks the region's own dirty bitmap.
   */
  #descView: DataView | null = null;
  #availView: DataView | null = null;

  constructor(memory: GuestMemory, config: SplitQueueConfig) {
    const size = config.size;
    this.descTable = toAddress(config.descTable, "descriptor table");
    this.availRing = toAddress(config.availRing, "avail ring");
    this.usedRing = toAddress(config.usedRing, "used ring");
    checkSplitQueueLayout(memory, size, this.descTable, this.availRing, this.usedRing);
    this.size = size;
    this.features = config.features ?? 0n;
    this.eventIdx = hasFeature(this.features, VIRTIO_RING_F_EVENT_IDX);
    this.indirectDesc = hasFeature(this.features, VIRTIO_RING_F_INDIRECT_DESC);
    this.notifyOnEmpty = hasFeature(this.features, VIRTIO_F_NOTIFY_ON_EMPTY);
    const maxChain = config.maxChainLength ?? size;
    this.#builder = new ChainBuilder(memory, maxChain, this.indirectDesc);
    this.maxChainLength = maxChain;
    this.#memory = memory;
    this.#cacheViews();
    this.#markDirty = config.markDirty ?? null;
    this.#usedLogAddress =
      config.usedLogAddress === undefined ? this.usedRing : toAddress(config.usedLogAddress, "used ring log");
    this.#seen = new Uint32Array(Math.max(size, maxChain));
    this.nextAvail = config.nextAvail ?? 0;
    this.nextUsed = config.nextUsed ?? 0;
  }

  #cacheViews(): void {
    this.#descView = viewOf(this.#memory, this.descTable, descTableSize(this.size));
    this.#availView = viewOf(this.#memory, this.availRing, availRingSize(this.size));
  }

  get memory(): GuestMemory {
    return this.#memory;
  }

  /**
   * Switches to a new memory table (vhost-user SET_MEM_TABLE) after checking that the rings
   * are still inside it; on failure the old memory stays.
   */
  setMemory(memory: GuestMemory): void {
    checkSplitQueueLayout(memory, this.size, this.descTable, this.availRing, this.usedRing);
    this.#memory = memory;
    this.#builder.memory = memory;
    this.#cacheViews();
  }

  /** The error that broke the queue, or null while it works. */
  get broken(): VirtqueueError | null {
    return this.#state.error;
  }

  /** Index (mod 2^16) of the next avail ring entry the device will take: vhost-user's vring base. */
  get nextAvail(): number {
    return this.#nextAvail;
  }

  set nextAvail(v: number) {
    this.#nextAvail = v & 0xffff;
    this.#availIdx = this.#nextAvail;
  }

  /** Index (mod 2^16) the next used element gets; also the used idx once published. */
  get nextUsed(): number {
    return this.#nextUsed;
  }

  set nextUsed(v: number) {
    this.#nextUsed = v & 0xffff;
    this.#signalledUsed = this.#nextUsed;
    this.#addedSinceSignal = 0;
  }

  /**
   * Sets (or clears, with null) where device writes are reported (vhost-user SET_LOG_BASE /
   * VHOST_F_LOG_ALL). Used-ring writes are reported at `usedLogAddress` + their offset in the
   * used ring (vhost-user's log_guest_addr); buffer writes at their guest-physical address.
   */
  setDirtyLog(marker: DirtyMarker | null, usedLogAddress: number | bigint = this.usedRing): void {
    this.#usedLogAddress = toAddress(usedLogAddress, "used ring log");
    this.#markDirty = marker;
  }

  /** @internal ChainOwner: a buffer write by a DescriptorChain. */
  markBufferWrite(gpa: number, len: number): void {
    this.#markDirty?.(gpa, len);
  }

  #markUsed(offset: number, len: number): void {
    this.#markDirty?.(this.#usedLogAddress + offset, len);
  }

  /** Reads the driver's avail idx (atomic load). */
  readAvailIdx(): number {
    return this.#memory.atomicLoadU16(this.availRing + VIRTQ_AVAIL_OFF_IDX);
  }

  /** Reads the used idx as published in guest memory (atomic load). */
  readUsedIdx(): number {
    return this.#memory.atomicLoadU16(this.usedRing + VIRTQ_USED_OFF_IDX);
  }

  /** Reloads avail idx and checks that it moved by at most `size` past nextAvail. */
  #reloadAvailIdx(): number {
    const idx = this.readAvailIdx();
    const pending = (idx - this.#nextAvail) & 0xffff;
    if (pending > this.size) {
      throw this.#state.break(
        new VirtqueueError(
          "AVAIL_IDX_JUMP",
          `avail idx ${idx} is ${pending} entries past nextAvail ${this.#nextAvail} (queue size ${this.size})`,
          { value: idx, limit: this.size },
        ),
      );
    }
    this.#availIdx = idx;
    return pending;
  }

  /** Number of chains the driver has made available and the device has not popped yet. */
  availableCount(): number {
    this.#state.check();
    try {
      return this.#reloadAvailIdx();
    } catch (e) {
      if (e instanceof VirtqueueError) throw e;
      return this.#state.ringAccess(e);
    }
  }

  /**
   * Takes the next available chain, or null when there is none. Throws VirtqueueError for a
   * malformed chain (consumed; the queue goes on) or a broken ring (see the class comment).
   */
  popChain(): DescriptorChain | null {
    this.#state.check();
    try {
      if (this.#availIdx === this.#nextAvail && this.#reloadAvailIdx() === 0) return null;
      const slot = this.#nextAvail & (this.size - 1);
      const av = this.#availView;
      const off = VIRTQ_AVAIL_OFF_RING + 2 * slot;
      const head = av ? av.getUint16(off, true) : this.#memory.readU16(this.availRing + off);
      // Consumed before it is parsed: a bad chain must not stall the queue.
      this.#nextAvail = (this.#nextAvail + 1) & 0xffff;
      if (head >= this.size) {
        throw new VirtqueueError(
          "HEAD_OUT_OF_RANGE",
          `avail ring entry ${slot} names head ${head} >= size ${this.size}`,
          {
            head,
            value: head,
            limit: this.size,
          },
        );
      }
      return this.#walk(head);
    } catch (e) {
      if (e instanceof VirtqueueError) throw e;
      return this.#state.ringAccess(e);
    }
  }

  /**
   * The chain starting at descriptor `head`, walked and validated like popChain() but without
   * touching the avail ring: for resubmitting requests that were in flight when a back-end
   * restarted (vhost-user inflight tracking).
   */
  chainAt(head: number): DescriptorChain {
    this.#state.check();
    if (!(Number.isInteger(head) && head >= 0 && head < this.size)) {
      throw new VirtqueueError("HEAD_OUT_OF_RANGE", `head ${head} >= size ${this.size}`, {
        head,
        value: head,
        limit: this.size,
      });
    }
    try {
      return this.#walk(head);
    } catch (e) {
      if (e instanceof VirtqueueError) throw e;
      return this.#state.ringAccess(e);
    }
  }

  /** Puts the last popped chain back (nextAvail - 1), e.g. when the device ran out of resources. */
  undoPop(): void {
    this.#nextAvail = (this.#nextAvail - 1) & 0xffff;
  }

  #nextGeneration(): number {
    this.#generation = (this.#generation + 1) >>> 0;
    if (this.#generation === 0) {
      this.#seen.fill(0);
      this.#generation = 1;
    }
    return this.#generation;
  }

  #walk(head: number): DescriptorChain {
    const mem = this.#memory;
    const seen = this.#seen;
    const b = this.#builder;
    let table = this.descTable;
    let tableSize = this.size;
    let view = this.#descView;
    let inIndirect = false;
    let gen = this.#nextGeneration();
    let index = head;
    b.begin(head);

    for (;;) {
      if (index >= tableSize) {
        throw chainError(
          head,
          index,
          inIndirect,
          "NEXT_OUT_OF_RANGE",
          `next index ${index} >= table size ${tableSize}`,
          {
            value: index,
            limit: tableSize,
          },
        );
      }
      if (seen[index] === gen)
        throw chainError(head, index, inIndirect, "DESCRIPTOR_LOOP", `descriptor ${index} visited twice`);
      seen[index] = gen;
      let lo: number;
      let hi: number;
      let len: number;
      let flags: number;
      let next: number;
      if (view) {
        const o = VIRTQ_DESC_SIZE * index;
        lo = view.getUint32(o, true);
        hi = view.getUint32(o + 4, true);
        len = view.getUint32(o + 8, true);
        flags = view.getUint16(o + 12, true);
        next = view.getUint16(o + 14, true);
      } else {
        const d = table + VIRTQ_DESC_SIZE * index;
        lo = mem.readU32(d);
        hi = mem.readU32(d + 4);
        len = mem.readU32(d + 8);
        flags = mem.readU16(d + 12);
        next = mem.readU16(d + 14);
      }

      if (flags & VIRTQ_DESC_F_INDIRECT) {
        const t = b.indirect(index, inIndirect, lo, hi, len, flags, (flags & VIRTQ_DESC_F_NEXT) !== 0);
        table = t.address;
        tableSize = t.entries;
        view = viewOf(mem, t.address, t.entries * VIRTQ_DESC_SIZE);
        inIndirect = true;
        gen = this.#nextGeneration();
        index = 0;
        continue;
      }
      b.buffer(index, inIndirect, lo, hi, len, flags);
      if (!(flags & VIRTQ_DESC_F_NEXT)) break;
      index = next;
    }
    return b.finish(this, inIndirect);
  }

  /** Writes a used element without publishing it (see publishUsed). */
  pushUsed(head: number, len: number): void {
    this.#state.check();
    if (!(Number.isInteger(head) && head >= 0 && head < this.size)) {
      throw new VirtqueueError("BAD_USED_HEAD", `used head ${head} is not a descriptor index < ${this.size}`, {
        value: head,
        limit: this.size,
      });
    }
    if (!(Number.isInteger(len) && len >= 0 && len <= 0xffffffff)) {
      throw new VirtqueueError("BAD_ARGUMENT", `used length ${len} is not a u32`, { head, value: len });
    }
    const off = VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * (this.#nextUsed & (this.size - 1));
    try {
      this.#memory.writeU32(this.usedRing + off, head);
      this.#memory.writeU32(this.usedRing + off + 4, len);
    } catch (e) {
      this.#state.ringAccess(e);
    }
    this.#markUsed(off, VIRTQ_USED_ELEM_SIZE);
    this.#nextUsed = (this.#nextUsed + 1) & 0xffff;
    this.#addedSinceSignal++;
  }

  /** Publishes every pushed element: one atomic store of used idx, after the elements. */
  publishUsed(): void {
    this.#state.check();
    try {
      this.#memory.atomicStoreU16(this.usedRing + VIRTQ_USED_OFF_IDX, this.#nextUsed);
    } catch (e) {
      this.#state.ringAccess(e);
    }
    this.#markUsed(VIRTQ_USED_OFF_IDX, 2);
  }

  /**
   * Returns a chain to the driver: `len` is the number of bytes written into its writable part.
   * (`_slots` is for packed rings; a split ring returns a head.)
   */
  addUsed(head: number, len: number, _slots = 1): void {
    this.pushUsed(head, len);
    this.publishUsed();
  }

  /**
   * Whether the driver wants a used-buffer notification for what was published since the last
   * call: vring_need_event(used_event, new, old) under EVENT_IDX, otherwise unless the driver
   * set VIRTQ_AVAIL_F_NO_INTERRUPT (overridden by NOTIFY_ON_EMPTY when the avail ring is empty).
   * False when nothing was added since the last call.
   */
  needsNotification(): boolean {
    this.#state.check();
    const added = this.#addedSinceSignal;
    const old = this.#signalledUsed;
    const now = this.#nextUsed;
    this.#signalledUsed = now;
    this.#addedSinceSignal = 0;
    if (added === 0) return false;
    try {
      if (this.eventIdx) {
        // Past 2^16 additions the window test wraps; notify to be safe.
        if (added >= 0x10000) return true;
        const usedEvent = this.#memory.atomicLoadU16(this.availRing + usedEventOffset(this.size));
        return vringNeedEvent(usedEvent, now, old);
      }
      const flags = this.#memory.atomicLoadU16(this.availRing + VIRTQ_AVAIL_OFF_FLAGS);
      if ((flags & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0) return true;
      return this.notifyOnEmpty && this.readAvailIdx() === this.#nextAvail;
    } catch (e) {
      return this.#state.ringAccess(e);
    }
  }

  /**
   * Asks the driver for a notification on the next buffer it makes available (avail_event =
   * nextAvail under EVENT_IDX, otherwise clears VIRTQ_USED_F_NO_NOTIFY), then re-reads avail
   * idx: true means buffers arrived meanwhile, so keep processing instead of waiting.
   */
  enableNotification(): boolean {
    this.#state.check();
    try {
      if (this.eventIdx) {
        const off = availEventOffset(this.size);
        this.#memory.atomicStoreU16(this.usedRing + off, this.#nextAvail);
        this.#markUsed(off, 2);
      } else {
        this.#memory.atomicStoreU16(this.usedRing + VIRTQ_USED_OFF_FLAGS, 0);
        this.#markUsed(VIRTQ_USED_OFF_FLAGS, 2);
      }
      // The store above and this load are both seq-cst: the driver either sees our request or
      // we see its new idx.
      return this.#reloadAvailIdx() !== 0;
    } catch (e) {
      if (e instanceof VirtqueueError) throw e;
      return this.#state.ringAccess(e);
    }
  }

  /**
   * Tells the driver it need not notify. Without EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY;
   * with it there is nothing to write: avail_event stays where enableNotification() left it,
   * and the driver stops notifying once it has passed it.
   */
  disableNotification(): void {
    this.#state.check();
    if (this.eventIdx) return;
    try {
      this.#memory.atomicStoreU16(this.usedRing + VIRTQ_USED_OFF_FLAGS, VIRTQ_USED_F_NO_NOTIFY);
    } catch (e) {
      this.#state.ringAccess(e);
    }
    this.#markUsed(VIRTQ_USED_OFF_FLAGS, 2);
  }
}
