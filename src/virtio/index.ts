/**
 * src/virtio: split and packed virtqueues, both sides. SplitQueue is the device side (what a vhost-user
 * backend runs), SplitQueueDriver the driver side (tests, and a frontend in Node). Layout and
 * flags in ring.ts, feature bits in features.ts, typed errors in errors.ts. See README.md.
 */

export { inGuestMemory } from "./bounds.js";
export * from "./chain.js";
export * from "./driver.js";
export * from "./errors.js";
export * from "./features.js";
export * from "./packed.js";
export * from "./packed-driver.js";
export * from "./packed-ring.js";
export * from "./queue.js";
export * from "./ring.js";
export * from "./status.js";
export * from "./virtqueue.js";
