/**
 * src/vhost-user/backend: a framework for writing vhost-user device back-ends, in the spirit of
 * rust-vmm's vhost-user-backend: a daemon (VhostUserDaemon) serving one front-end at a time, a
 * session handling every control message (BackendSession), and queue workers — threads sharing
 * guest memory, one per virtqueue or one per group of them (DeviceInfo.queueWorkers) — that call
 * the device's QueueHandler for each request.
 */
export {
  type DaemonEvents,
  type DaemonOptions,
  VhostUserDaemon,
} from "./daemon.js";
export type {
  DeviceInfo,
  QueueContext,
  QueueHandler,
  QueueHandlerFactory,
  VhostUserDevice,
} from "./device.js";
export { BackendMemoryTable, type MappedRegion } from "./memory-table.js";
export { autoQueueWorkers, queueGroups } from "./queue-thread.js";
export {
  BackendSession,
  FRAMEWORK_PROTOCOL_FEATURES,
  HANDLERS,
  MAX_MEM_SLOTS,
  type SessionEvents,
  type SessionOptions,
} from "./session.js";
export type { LogBaseReply } from "./state.js";
