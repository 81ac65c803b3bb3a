/**
 * vmshift: live migration of VM memory and vhost-user devices, in TypeScript on Node.js.
 *
 * This entry point is the curated API: guest memory and dirty tracking, the vhost-user back-end
 * framework and front-end, the vhost-user-blk device, migration source and destination, snapshot,
 * with their option and error types. Everything else of a layer is on that layer's subpath:
 * `vmshift/memory`, `vmshift/virtio`, `vmshift/vhost-user`, `vmshift/devices`,
 * `vmshift/migration`, `vmshift/kvm`, `vmshift/sys`.
 *
 * Importing costs nothing native: the addon loads on the first call that needs it (and throws
 * NativeLoadError there when it cannot load on this machine).
 */
export {
  type BlkDevice,
  type BlkOptions,
  BlockImage,
  blkDevice,
  type ImageOptions,
} from "./devices/index.js";
export {
  AtomicBitmap,
  type DirtySource,
  type DirtySyncOptions,
  DirtyTracker,
  GuestMemory,
  GuestMemoryError,
  type GuestMemoryErrorCode,
  GuestMemoryRegion,
  type RegionOptions,
  SharedDirtyLog,
  type SyncReport,
} from "./memory/index.js";
export {
  connectEndpoint,
  type DestinationOptions,
  type Endpoint,
  MigrationDestination,
  MigrationError,
  type MigrationErrorCode,
  MigrationListener,
  type MigrationResult,
  MigrationSource,
  parseEndpoint,
  type RestoreOptions,
  type RestoreResult,
  type RunOptions,
  restoreSnapshot,
  type SnapshotOptions,
  type SnapshotResult,
  type SourceOptions,
  saveSnapshot,
} from "./migration/index.js";
export { type MapOptions, Mapping, NativeLoadError, SysError } from "./sys/index.js";
export { VERSION } from "./version.js";
export {
  type DaemonOptions,
  FrontendError,
  type FrontendErrorCode,
  type FrontendOptions,
  type MemTableOptions,
  VhostUserDaemon,
  type VhostUserDevice,
  VhostUserError,
  type VhostUserErrorCode,
  VhostUserFrontend,
} from "./vhost-user/index.js";
