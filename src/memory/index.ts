/**
 * src/memory: guest memory and every kind of dirty tracking.
 * GuestMemory/GuestMemoryRegion (memfd, file, hugetlbfs, anonymous), AtomicBitmap,
 * SharedDirtyLog (vhost-user log, replaceable), DirtyRing (KVM), DiscardMap (virtio-mem),
 * WriteProtectDirtySource (uffd WP_ASYNC + PAGEMAP_SCAN), and the DirtySource interface
 * with DirtyTracker that syncs any mix of them into one bitmap per round.
 */
export {
  AtomicBitmap,
  type SharedBitmap,
  takeBits,
} from "./atomic-bitmap.js";
export {
  DirtyRing,
  type DirtyRingSlot,
  DirtyRingSource,
  type DirtyRingStats,
  type DirtyRingVm,
  KVM_DIRTY_GFN_F_DIRTY,
  KVM_DIRTY_GFN_F_RESET,
  KVM_DIRTY_GFN_SIZE,
} from "./dirty-ring.js";
export type {
  DirtySink,
  DirtySource,
  DirtySyncOptions,
} from "./dirty-source.js";
export {
  DirtyBitmap,
  DirtyTracker,
  RegionBitmapSource,
  type SyncReport,
} from "./dirty-tracker.js";
export {
  type DiscardListener,
  DiscardMap,
  type SharedDiscardMap,
} from "./discard-map.js";
export {
  GuestMemoryError,
  type GuestMemoryErrorCode,
} from "./errors.js";
export {
  type GpaLike,
  GuestAddress,
  hex,
  MAX_GUEST_ADDRESS,
  toGpa,
  toLength,
} from "./guest-address.js";
export {
  GuestMemory,
  type SharedGuestMemory,
} from "./guest-memory.js";
export {
  type BackingKind,
  GuestMemoryRegion,
  type RegionBacking,
  type RegionOptions,
  type SharedRegion,
} from "./region.js";
export {
  DirtyLogArea,
  DirtyLogWriter,
  type DirtyLogWriterHandle,
  logSizeFor,
  SharedDirtyLog,
  type SharedLogArea,
  SharedLogDirtySource,
  VHOST_LOG_PAGE,
} from "./shared-dirty-log.js";
export {
  PAGE_IS_FILE,
  PAGE_IS_PRESENT,
  PAGE_IS_WPALLOWED,
  PAGE_IS_WRITTEN,
  PAGEMAP_SCAN,
  PM_SCAN_CHECK_WPASYNC,
  PM_SCAN_WP_MATCHING,
  WriteProtectDirtySource,
  writeProtectTrackingUnavailable,
} from "./wp-dirty.js";
