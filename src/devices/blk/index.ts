/**
 * src/devices/blk: vhost-user-blk over a raw image file (virtio 1.2, 5.2 "Block Device"), on
 * the backend framework: device.ts is the control plane (features, config space), handler.ts
 * the per-queue request loop in each queue's worker thread, image.ts the file I/O.
 */
export * from "./config.js";
export * from "./constants.js";
export * from "./device.js";
export { BlkQueueHandler, type BlkWorkerData } from "./handler.js";
export * from "./image.js";
