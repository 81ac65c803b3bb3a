/**
 * Packed virtqueue layout (virtio 1.1+, "Packed Virtqueues", VIRTIO_F_RING_PACKED). Little-endian.
 *
 *   struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }          16 bytes, ring 16-aligned
 *   struct pvirtq_event_suppress { le16 off_wrap; le16 flags; }               4 bytes, 4-aligned
 *
 * One descriptor ring of `size` entries, written by both sides, and two event suppression
 * structures: the driver area (written by the driver: when the device should send used-buffer
 * notifications) and the device area (written by the device: when the driver should kick).
 * vhost-user's SET_VRING_ADDR names them "descriptor", "available" (driver area) and "used"
 * (device area).
 *
 * A descriptor is available when its AVAIL flag equals the driver's wrap counter and its USED
 * flag does not; used when both equal the device's wrap counter. Each side keeps a wrap counter
 * that starts at 1 and flips every time its index passes the end of the ring.
 */
import type { GuestMemory } from "../memory/guest-memory.js";
import { checkRingAreas } from "./bounds.js";
import { VirtqueueError } from "./errors.js";
import { MAX_QUEUE_SIZE, VIRTQ_DESC_SIZE } from "./ring.js";

export const PACKED_DESC_OFF_ADDR = 0;
export const PACKED_DESC_OFF_LEN = 8;
export const PACKED_DESC_OFF_ID = 12;
export const PACKED_DESC_OFF_FLAGS = 14;

/** Descriptor flag: available (set to the driver's wrap counter when it makes it available). */
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
/** Descriptor flag: used (set, with AVAIL, to the device's wrap counter when it returns it). */
export const VIRTQ_DESC_F_USED = 1 << 15;

/** Event suppression flags (the low 2 bits of pvirtq_event_suppress.flags). */
export const RING_EVENT_FLAGS_ENABLE = 0;
export const RING_EVENT_FLAGS_DISABLE = 1;
/** Notify once the ring passes off_wrap (needs VIRTIO_RING_F_EVENT_IDX). */
export const RING_EVENT_FLAGS_DESC = 2;

export const EVENT_OFF_OFF_WRAP = 0;
export const EVENT_OFF_FLAGS = 2;
export const EVENT_SUPPRESS_SIZE = 4;

export const PACKED_DESC_ALIGN = 16;
export const PACKED_EVENT_ALIGN = 4;

export function packedRingSize(size: number): number {
  return VIRTQ_DESC_SIZE * size;
}

/** Flags that make a descriptor available under the driver's wrap counter `wrap`. */
export function availFlags(wrap: boolean): number {
  return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
}

/** Flags of a used descriptor under the device's wrap counter `wrap`. */
export function usedFlags(wrap: boolean): number {
  return wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0;
}

/** True when `flags` say "available" for a device whose avail wrap counter is `wrap`. */
export function isAvailable(flags: number, wrap: boolean): boolean {
  const a = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
  const u = (flags & VIRTQ_DESC_F_USED) !== 0;
  return a === wrap && u !== wrap;
}

/** True when `flags` say "used" for a driver whose used wrap counter is `wrap`. */
export function isUsed(flags: number, wrap: boolean): boolean {
  const a = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
  const u = (flags & VIRTQ_DESC_F_USED) !== 0;
  return a === wrap && u === wrap;
}

/** A ring position: index in [0, size) and the wrap counter at it. */
export interface RingPosition {
  idx: number;
  wrap: boolean;
}

/** Slots from `from` to `to` going forward (0 .. 2*size-1; at most `size` for a sane pair). */
export function slotsBetween(from: RingPosition, to: RingPosition, size: number): number {
  const a = from.idx + (from.wrap ? 0 : size);
  const b = to.idx + (to.wrap ? 0 : size);
  return (b - a + 2 * size) % (2 * size);
}

/**
 * vhost-user's vring base for a packed ring (SET_VRING_BASE / GET_VRING_BASE "num"): bits 0-14
 * the next descriptor the back-end processes, bit 15 the driver's (avail) wrap counter, bits
 * 16-30 where the back-end puts the next used descriptor, bit 31 the device's (used) wrap counter.
 */
export interface PackedVringBase {
  availIdx: number;
  availWrap: boolean;
  usedIdx: number;
  usedWrap: boolean;
}

export function encodePackedVringBase(b: PackedVringBase): number {
  return (
    ((b.availIdx & 0x7fff) | (b.availWrap ? 0x8000 : 0) | ((b.usedIdx & 0x7fff) << 16) | (b.usedWrap ? 1 << 31 : 0)) >>>
    0
  );
}

export function decodePackedVringBase(num: number): PackedVringBase {
  return {
    availIdx: num & 0x7fff,
    availWrap: (num & 0x8000) !== 0,
    usedIdx: (num >>> 16) & 0x7fff,
    usedWrap: (num & 0x8000_0000) !== 0,
  };
}

/**
 * Whether the peer asked for a notification, for a side that just moved its index forward by
 * `added` slots to `newIdx` (wrap counter `wrap`): the peer's off_wrap names a position of
 * this or the previous lap; one of the previous lap counts `size` less (as Linux and QEMU do).
 */
export function packedNeedEvent(offWrap: number, wrap: boolean, newIdx: number, added: number, size: number): boolean {
  let event = offWrap & 0x7fff;
  if (((offWrap & 0x8000) !== 0) !== wrap) event -= size;
  const old = newIdx - added;
  return ((newIdx - event - 1) & 0xffff) < ((newIdx - old) & 0xffff);
}

export interface PackedQueueLayout {
  size: number;
  descRing: number;
  driverArea: number;
  deviceArea: number;
  /** First byte after the device area. */
  end: number;
}

/** A compact layout from `base`: descriptor ring, driver area, device area. */
export function packedQueueLayout(base: number, size: number): PackedQueueLayout {
  const descRing = Math.ceil(base / PACKED_DESC_ALIGN) * PACKED_DESC_ALIGN;
  const driverArea = descRing + packedRingSize(size);
  const deviceArea = driverArea + EVENT_SUPPRESS_SIZE;
  return { size, descRing, driverArea, deviceArea, end: deviceArea + EVENT_SUPPRESS_SIZE };
}

/**
 * Setup checks of a packed queue: a size in [1, 32768] (not necessarily a power of two), each
 * area aligned and inside guest memory; the descriptor ring and the device area (which the
 * device writes) in writable memory.
 */
export function checkPackedQueueLayout(
  memory: GuestMemory,
  size: number,
  descRing: number,
  driverArea: number,
  deviceArea: number,
): void {
  if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE) {
    throw new VirtqueueError("BAD_QUEUE_SIZE", `queue size ${size} is not in [1, 32768]`, {
      value: size,
      limit: MAX_QUEUE_SIZE,
    });
  }
  const areas = [
    ["descriptor ring", descRing, PACKED_DESC_ALIGN, packedRingSize(size), true],
    ["driver area", driverArea, PACKED_EVENT_ALIGN, EVENT_SUPPRESS_SIZE, false],
    ["device area", deviceArea, PACKED_EVENT_ALIGN, EVENT_SUPPRESS_SIZE, true],
  ] as const;
  checkRingAreas(memory, areas);
}
