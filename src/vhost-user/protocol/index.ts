/**
 * src/vhost-user/protocol: everything about the vhost-user wire format and nothing about what a
 * message means to a device. Request codes, header flags and feature bits (constants.ts), payload
 * layouts (payloads.ts), one request table per direction (frontend-requests.ts,
 * backend-requests.ts), header + table-driven encode/decode (message.ts), typed errors (errors.ts).
 * Handlers get typed messages; no one outside this folder reads a raw offset.
 */
export * from "./backend-requests.js";
export * from "./constants.js";
export * from "./errors.js";
export * from "./frontend-requests.js";
export * from "./message.js";
export * from "./payloads.js";
