/**
 * Virtio feature bits (virtio 1.x, "Reserved Feature Bits" and the ring sections), as bit
 * numbers. A negotiated feature set is a 64-bit `bigint`; `hasFeature(features, bit)` tests
 * one. Device-type bits (blk, net, ...) live with their device; vhost's own bits (VHOST_F_LOG_ALL,
 * VHOST_USER_F_PROTOCOL_FEATURES) live with the vhost-user protocol.
 */

/** The device sends a used-buffer notification when the avail ring runs empty (legacy). */
export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
/** No assumption about how a request is split into descriptors (legacy; implied by VERSION_1). */
export const VIRTIO_F_ANY_LAYOUT = 27;
/** Descriptors with VIRTQ_DESC_F_INDIRECT (a table of descriptors in guest memory). */
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
/** The used_event / avail_event fields suppress notifications by index. */
export const VIRTIO_RING_F_EVENT_IDX = 29;
/** Compliance with virtio 1.0 or later (little-endian rings, modern layout). */
export const VIRTIO_F_VERSION_1 = 32;
/** The device accesses memory through a platform IOMMU (addresses are not guest-physical). */
export const VIRTIO_F_ACCESS_PLATFORM = 33;
/** Packed virtqueue layout (PackedQueue, PackedQueueDriver). */
export const VIRTIO_F_RING_PACKED = 34;
/** Buffers are used in the order they were made available. */
export const VIRTIO_F_IN_ORDER = 35;
/** Memory accesses are ordered as the platform requires for real hardware. */
export const VIRTIO_F_ORDER_PLATFORM = 36;
/** Single-root I/O virtualization. */
export const VIRTIO_F_SR_IOV = 37;
/** The driver passes extra data (beyond the queue index) in its notifications. */
export const VIRTIO_F_NOTIFICATION_DATA = 38;
/** The driver uses config data instead of the queue index in notifications. */
export const VIRTIO_F_NOTIF_CONFIG_DATA = 39;
/** Individual virtqueues can be reset. */
export const VIRTIO_F_RING_RESET = 40;
/** The device has an administration virtqueue. */
export const VIRTIO_F_ADMIN_VQ = 41;

/** The mask of one feature bit. */
export function featureBit(bit: number): bigint {
  return 1n << BigInt(bit);
}

/** A feature set with every listed bit set. */
export function features(...bits: readonly number[]): bigint {
  let f = 0n;
  for (const b of bits) f |= featureBit(b);
  return f;
}

export function hasFeature(set: bigint, bit: number): boolean {
  return (set & featureBit(bit)) !== 0n;
}
