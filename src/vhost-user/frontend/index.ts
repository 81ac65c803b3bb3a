/**
 * src/vhost-user/frontend: the VMM's side of vhost-user, driving any backend (ours, QEMU's
 * libvhost-user daemons, rust-vmm ones) over its unix socket: feature and protocol-feature
 * negotiation, the memory table (SET_MEM_TABLE or ADD/REM_MEM_REG), vring setup with kick/call/err
 * eventfds, dirty logging into a shared log that can be replaced while the device runs, and the
 * log read back as a DirtySource; and the postcopy messages (the back-end's userfaultfd and
 * address table). Peer failures are VhostUserError naming the request; misuse
 * of the negotiated protocol is a FrontendError.
 */
export { VhostUserLogSource } from "./dirty-source.js";
export {
  FrontendError,
  type FrontendErrorCode,
} from "./errors.js";
export {
  type DeviceKind,
  featureNames,
  protocolFeatureNames,
  VirtioBlkFeature,
} from "./features.js";
export {
  type BackendChannelEvents,
  type BackendRegionBase,
  FRONTEND_PROTOCOL_FEATURES,
  type FrontendOptions,
  type MemTableOptions,
  type Negotiated,
  VhostUserFrontend,
} from "./frontend.js";
export {
  FrontendVring,
  type VringLayout,
} from "./vring.js";
