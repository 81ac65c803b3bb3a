/**
 * src/virtio: split and packed virtqueues, both sides. SplitQueue is the device side (what a vhost-user
 * backend runs), SplitQueueDriver the driver side (tests, and a frontend in Node). Layout and
 * flags in ring.ts, feature bits in features.ts, typed errors in errors.ts. See README.md.
 */

export { inGuestMemory } from "./bounds.js";
export {
  type ChainOwner,
  type Descriptor,
  DescriptorChain,
} from "./chain.js";
export {
  type Segment,
  SplitQueueDriver,
  type SplitQueueDriverConfig,
  type UsedElement,
} from "./driver.js";
export {
  VirtqueueError,
  type VirtqueueErrorCode,
  type VirtqueueErrorDetails,
} from "./errors.js";
export {
  featureBit,
  features,
  hasFeature,
  VIRTIO_F_ACCESS_PLATFORM,
  VIRTIO_F_ADMIN_VQ,
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_NOTIF_CONFIG_DATA,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_ORDER_PLATFORM,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_SR_IOV,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "./features.js";
export {
  PackedQueue,
  type PackedQueueConfig,
  type RawPackedDescriptor,
} from "./packed.js";
export {
  type PackedDriverLayout,
  PackedQueueDriver,
  type PackedQueueDriverConfig,
} from "./packed-driver.js";
export {
  availFlags,
  checkPackedQueueLayout,
  decodePackedVringBase,
  EVENT_OFF_FLAGS,
  EVENT_OFF_OFF_WRAP,
  EVENT_SUPPRESS_SIZE,
  encodePackedVringBase,
  isAvailable,
  isUsed,
  PACKED_DESC_ALIGN,
  PACKED_DESC_OFF_ADDR,
  PACKED_DESC_OFF_FLAGS,
  PACKED_DESC_OFF_ID,
  PACKED_DESC_OFF_LEN,
  PACKED_EVENT_ALIGN,
  type PackedQueueLayout,
  type PackedVringBase,
  packedNeedEvent,
  packedQueueLayout,
  packedRingSize,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  type RingPosition,
  slotsBetween,
  usedFlags,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_USED,
} from "./packed-ring.js";
export {
  type DirtyMarker,
  SplitQueue,
  type SplitQueueConfig,
} from "./queue.js";
export {
  availEventOffset,
  availRingSize,
  descTableSize,
  isPowerOfTwo,
  MAX_QUEUE_SIZE,
  type SplitQueueLayout,
  splitQueueLayout,
  usedEventOffset,
  usedRingSize,
  VIRTQ_AVAIL_ALIGN,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_AVAIL_OFF_FLAGS,
  VIRTQ_AVAIL_OFF_IDX,
  VIRTQ_AVAIL_OFF_RING,
  VIRTQ_DESC_ALIGN,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_DESC_OFF_ADDR,
  VIRTQ_DESC_OFF_FLAGS,
  VIRTQ_DESC_OFF_LEN,
  VIRTQ_DESC_OFF_NEXT,
  VIRTQ_DESC_SIZE,
  VIRTQ_USED_ALIGN,
  VIRTQ_USED_ELEM_SIZE,
  VIRTQ_USED_F_NO_NOTIFY,
  VIRTQ_USED_OFF_FLAGS,
  VIRTQ_USED_OFF_IDX,
  VIRTQ_USED_OFF_RING,
  vringNeedEvent,
} from "./ring.js";
export {
  VIRTIO_CONFIG_S_ACKNOWLEDGE,
  VIRTIO_CONFIG_S_DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FAILED,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET,
} from "./status.js";
export type { DeviceVirtqueue } from "./virtqueue.js";
