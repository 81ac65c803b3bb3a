/**
 * src/migration: live migration of guest memory between processes or hosts. MigrationSource
 * (precopy, postcopy, auto-converge) and MigrationDestination over a validated, versioned stream
 * (format.ts); endpoints (tcp:, unix:, fd:); background snapshot and restore; digests that prove
 * the destination equals the source. The stream's records and the page paths stay internal.
 */
export {
  type DestinationHooks,
  type DestinationOptions,
  type FaultDomainStats,
  type FaultRange,
  MigrationDestination,
} from "./destination.js";
export { hex, regionDigest, ZERO_PAGE_HASH } from "./digest.js";
export {
  asMigrationError,
  MigrationError,
  type MigrationErrorCode,
  withDeadline,
} from "./errors.js";
export {
  type FaultStats,
  type MigrationEventMap,
  MigrationEvents,
  type MigrationResult,
  type Phase,
  type PhaseEvent,
  percentile,
  type RegionDigest,
  type RoundStats,
} from "./events.js";
export { STREAM_MAGIC, STREAM_VERSION } from "./format.js";
export {
  EVENT_VERSION,
  type EventBase,
  type FaultReport,
  type MigrationEvent,
  type MigrationEventBody,
  type MigrationInfo,
  MigrationReport,
  type MigrationReportOptions,
  type MigrationStatus,
  type ResultReport,
  type RoundReport,
  statusOf,
} from "./report.js";
export {
  type Restore,
  type RestoreOptions,
  type RestoreResult,
  restoreSnapshot,
  type SnapshotHooks,
  type SnapshotOptions,
  type SnapshotResult,
  saveSnapshot,
  writeProtectSnapshotUnavailable,
} from "./snapshot.js";
export {
  type AutoConvergeOptions,
  type DeviceState,
  MigrationSource,
  type RunOptions,
  type SourceHooks,
  type SourceOptions,
} from "./source.js";
export {
  connectEndpoint,
  type Endpoint,
  formatEndpoint,
  MigrationListener,
  parseEndpoint,
} from "./transport.js";
export {
  Workload,
  type WorkloadOptions,
} from "./workload.js";
