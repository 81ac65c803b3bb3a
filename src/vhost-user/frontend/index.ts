/**
 * src/vhost-user/frontend: the VMM's side of vhost-user, driving any backend (ours, QEMU's
 * libvhost-user daemons, rust-vmm ones) over its unix socket: feature and protocol-feature
 * negotiation, the memory table (SET_MEM_TABLE or ADD/REM_MEM_REG), vring setup with kick/call/err
 * eventfds, dirty logging into a shared log that can be replaced while the device runs, and the
 * log read back as a DirtySource; and the postcopy messages (the back-end's userfaultfd and
 * address table). Peer failures are VhostUserError naming the request; misuse
 * of the negotiated protocol is a FrontendError.
 */
export * from "./dirty-source.js";
export * from "./errors.js";
export * from "./features.js";
export * from "./frontend.js";
export * from "./vring.js";
