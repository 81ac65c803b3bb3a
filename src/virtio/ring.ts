/**
 * Split virtqueue layout (virtio 1.x, "Split Virtqueues"). Everything is little-endian.
 *
 *   struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; }      16 bytes, table 16-aligned
 *   struct virtq_avail { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }          2-aligned
 *   struct virtq_used  { le16 flags; le16 idx; virtq_used_elem ring[size]; le16 avail_event; } 4-aligned
 *   struct virtq_used_elem { le32 id; le32 len; }
 *
 * Both sides of the queue (SplitQueue, SplitQueueDriver) take their offsets from here.
 */

/** "Queue Size ... the maximum is 32768." It is always a power of two for split queues. */
export const MAX_QUEUE_SIZE = 32768;

export const VIRTQ_DESC_SIZE = 16;
export const VIRTQ_DESC_OFF_ADDR = 0;
export const VIRTQ_DESC_OFF_LEN = 8;
export const VIRTQ_DESC_OFF_FLAGS = 12;
export const VIRTQ_DESC_OFF_NEXT = 14;

/** The buffer continues via the `next` field. */
export const VIRTQ_DESC_F_NEXT = 1;
/** The buffer is device write-only (otherwise device read-only). */
export const VIRTQ_DESC_F_WRITE = 2;
/** The buffer holds a table of descriptors (VIRTIO_RING_F_INDIRECT_DESC). */
export const VIRTQ_DESC_F_INDIRECT = 4;

/** Driver → device: "do not interrupt me" (ignored by the device under EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** Device → driver: "do not notify (kick) me" (ignored by the driver under EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

export const VIRTQ_DESC_ALIGN = 16;
export const VIRTQ_AVAIL_ALIGN = 2;
export const VIRTQ_USED_ALIGN = 4;

export const VIRTQ_AVAIL_OFF_FLAGS = 0;
export const VIRTQ_AVAIL_OFF_IDX = 2;
export const VIRTQ_AVAIL_OFF_RING = 4;
export const VIRTQ_USED_OFF_FLAGS = 0;
export const VIRTQ_USED_OFF_IDX = 2;
export const VIRTQ_USED_OFF_RING = 4;
export const VIRTQ_USED_ELEM_SIZE = 8;

export function descTableSize(size: number): number {
  return VIRTQ_DESC_SIZE * size;
}

/** Bytes of the avail ring including used_event (present whether or not EVENT_IDX is negotiated). */
export function availRingSize(size: number): number {
  return 6 + 2 * size;
}

/** Bytes of the used ring including avail_event. */
export function usedRingSize(size: number): number {
  return 6 + VIRTQ_USED_ELEM_SIZE * size;
}

/** Offset of used_event inside the avail ring. */
export function usedEventOffset(size: number): number {
  return VIRTQ_AVAIL_OFF_RING + 2 * size;
}

/** Offset of avail_event inside the used ring. */
export function availEventOffset(size: number): number {
  return VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * size;
}

/**
 * The spec's vring_need_event(): true when `eventIdx` lies in the window (old, new] of indices
 * just published, i.e. the peer asked to be notified once the index passed `eventIdx`.
 * All arithmetic is modulo 2^16.
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

export function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** Where the three areas go when one contiguous block holds them (as the legacy layout does). */
export interface SplitQueueLayout {
  size: number;
  descTable: number;
  availRing: number;
  usedRing: number;
  /** First byte after the used ring. */
  end: number;
}

/**
 * A compact layout starting at `base`: descriptor table, avail ring, then the used ring at the
 * next multiple of `usedAlign` (4 is the minimum; the legacy interface used 4096).
 */
export function splitQueueLayout(base: number, size: number, usedAlign = VIRTQ_USED_ALIGN): SplitQueueLayout {
  const descTable = base;
  const availRing = descTable + descTableSize(size);
  const afterAvail = availRing + availRingSize(size);
  const usedRing = Math.ceil(afterAvail / usedAlign) * usedAlign;
  return { size, descTable, availRing, usedRing, end: usedRing + usedRingSize(size) };
}
