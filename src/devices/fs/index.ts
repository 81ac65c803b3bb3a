/**
 * src/devices/fs: vhost-user-fs (virtio 1.2, 5.11 "File System Device") over one shared
 * directory, on the backend framework. protocol.ts: the FUSE layouts; decode.ts: the checked
 * request decoder; passthrough.ts: the confined file system with its inode and handle tables;
 * server.ts: the FUSE session (request → operation → reply); handler.ts: the queue workers;
 * device.ts: the control plane (features, migration state); state.ts: the state's wire form.
 */
export * from "./decode.js";
export * from "./device.js";
export { type FsChannelMessage, type FsWorkerData, GuestChain } from "./handler.js";
export * from "./passthrough.js";
export * from "./protocol.js";
export * from "./server.js";
export * from "./state.js";
