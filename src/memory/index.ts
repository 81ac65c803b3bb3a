/**
 * src/memory: guest memory and every kind of dirty tracking.
 * GuestMemory/GuestMemoryRegion (memfd, file, hugetlbfs, anonymous), AtomicBitmap,
 * SharedDirtyLog (vhost-user log, replaceable), DirtyRing (KVM), DiscardMap (virtio-mem),
 * WriteProtectDirtySource (uffd WP_ASYNC + PAGEMAP_SCAN), and the DirtySource interface
 * with DirtyTracker that syncs any mix of them into one bitmap per round.
 */
export * from "./atomic-bitmap.js";
export * from "./dirty-ring.js";
export * from "./dirty-source.js";
export * from "./dirty-tracker.js";
export * from "./discard-map.js";
export * from "./errors.js";
export * from "./guest-address.js";
export * from "./guest-memory.js";
export * from "./region.js";
export * from "./shared-dirty-log.js";
export * from "./wp-dirty.js";
